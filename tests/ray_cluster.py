"""A real local Ray cluster for tests: `ray.init` on this machine, shared by the whole session.

The workers it starts inherit this process's environment, so the cluster comes up after the S3 test
server (its endpoint and test credentials are in the environment by then), like cluster nodes that
hold their own object-store credentials. The repository root goes on the workers' PYTHONPATH so they
import `pipeline` and `te_model` from this checkout. Both go through the environment rather than a
job runtime_env: with a runtime_env no actor can start on one of the worker processes Ray starts ahead
of time, and every Train run starts several helper actors (controller, placement-group cleaner,
synchronization) besides its workers.

Ray 2.60 turns token authentication on for a cluster it starts and, when no token is given, writes one
to ~/.ray/auth_token. The fixture keeps authentication on with a fresh token in the environment
instead, so no file outside the test's temporary folders is written.

Import the fixture in a conftest with `from tests.ray_cluster import *  # noqa`.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = ["ray_cluster"]

REPO_ROOT = Path(__file__).resolve().parent.parent
_NUM_CPUS = 4


@pytest.fixture(scope="session")
def ray_cluster(s3_server) -> Iterator[dict]:
    """`ray.init` with 4 CPUs and no dashboard for the whole session; yields the cluster's resources."""
    import ray

    env = pytest.MonkeyPatch()
    env.delenv("RAY_AUTH_MODE", raising=False)  # ray.init sets it in os.environ; undo() removes it again
    env.setenv("RAY_AUTH_TOKEN", secrets.token_hex(32))
    env.setenv("RAY_USAGE_STATS_ENABLED", "0")
    # The Train controller takes worker reports and notices failures once per health-check poll (2 s by
    # default); polling faster keeps the many short runs of the tests short.
    env.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    env.setenv("NO_PROXY", ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1", "localhost"])))
    env.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    # Ray keeps its sockets under the temp dir: a short path stays under the 107-byte AF_UNIX limit.
    temp_dir = tempfile.mkdtemp(prefix="ray-")
    ray.init(num_cpus=_NUM_CPUS, include_dashboard=False, _temp_dir=temp_dir)
    try:
        yield ray.cluster_resources()
    finally:
        ray.shutdown()
        env.undo()
        shutil.rmtree(temp_dir, ignore_errors=True)
