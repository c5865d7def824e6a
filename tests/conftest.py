"""Fixtures shared by the whole test suite: real servers and a local Ray cluster, started on loopback.

Tests are grouped as `unit/` (one module, no servers), `integration/` (a local Ray cluster, the S3
server, the MLflow server) and `gpu/` (CUDA and Transformer Engine; skipped without them).
"""

from tests.fixtures.job_traces import world  # noqa: F401
from tests.fixtures.mlflow_server import mlflow_server  # noqa: F401
from tests.fixtures.ray_cluster import ray_cluster  # noqa: F401
from tests.fixtures.ray_head import ray_head  # noqa: F401
from tests.fixtures.s3_fault_proxy import s3_fault_proxy  # noqa: F401
from tests.fixtures.s3_server import s3_bucket, s3_server  # noqa: F401
