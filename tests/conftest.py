"""Fixtures shared by the whole test suite: real servers and a local Ray cluster, started on loopback.

Tests are grouped as `unit/` (one module, no servers), `integration/` (a local Ray cluster, the S3
server, the MLflow server) and `gpu/` (CUDA and Transformer Engine; skipped without them).
"""

import collections

from tests.fixtures.job_traces import world  # noqa: F401
from tests.fixtures.mlflow_server import mlflow_server  # noqa: F401
from tests.fixtures.ray_cluster import ray_cluster  # noqa: F401
from tests.fixtures.ray_head import ray_head  # noqa: F401
from tests.fixtures.s3_fault_proxy import s3_fault_proxy  # noqa: F401
from tests.fixtures.s3_server import s3_bucket, s3_server  # noqa: F401



def pytest_collection_modifyitems(items):
    """Files with the most Ray jobs (tests with a Ray cluster among their fixtures, or marked slow) go
    first. The suite runs in two processes a file at a time (pytest-xdist, `--no-loadscope-reorder`), so
    the long files then run side by side and the short ones fill in at the end, instead of a long file
    starting last and running alone."""
    ray_tests = collections.Counter(item.path for item in items if item.get_closest_marker("slow")
                                    or {"ray_cluster", "ray_head"} & set(item.fixturenames))
    items.sort(key=lambda item: -ray_tests[item.path])  # stable: each file keeps its own order
