"""Fixtures shared by the whole test suite."""

from tests.s3_server import *  # noqa
from tests.s3_fault_proxy import *  # noqa
from tests.mlflow_server import *  # noqa
from tests.ray_cluster import *  # noqa
from tests.job_traces import *  # noqa
from tests.ray_head import *  # noqa
