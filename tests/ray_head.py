"""A real `ray start --head` cluster with its dashboard and job server, for jobs submitted over HTTP.

`ray job submit` and `JobSubmissionClient` need the dashboard's job server, which the session's
`ray_cluster` (a plain `ray.init`) does not start. This head runs beside it on its own ports, with
token authentication on and a fresh token; `head.env` is the environment a client process needs
(`ray job submit`), `head.headers` what an in-process `JobSubmissionClient` sends. Jobs run with this
process's environment (S3 endpoint, NO_PROXY for the MLflow server) minus Ray's own variables.

Import the fixture in a conftest with `from tests.ray_head import *  # noqa`.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = ["RayHead", "ray_head"]

_START_TIMEOUT_S = 120


@dataclass(frozen=True)
class RayHead:
    address: str  # http://127.0.0.1:<dashboard port>
    env: dict[str, str]
    headers: dict[str, str]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_job_agent(address: str, headers: dict[str, str], proc: subprocess.Popen) -> None:
    """The dashboard answers before the head's job agent registered: run one trivial job to be sure."""
    from ray.job_submission import JobSubmissionClient

    deadline = time.time() + _START_TIMEOUT_S
    submission_id = None
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start --head exited with {proc.returncode}")
        try:
            client = JobSubmissionClient(address, headers=headers)
            submission_id = submission_id or client.submit_job(entrypoint="echo ready")
            if client.get_job_status(submission_id).is_terminal():
                return
        except (ConnectionError, RuntimeError, OSError):  # not up yet, or "No available agent"
            pass
        time.sleep(1)
    raise TimeoutError(f"no Ray job server at {address} after {_START_TIMEOUT_S}s")


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory, mlflow_server) -> Iterator[RayHead]:
    """A 3-CPU head node for the session; stopped (only it) at teardown."""
    token = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token,
               RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.5")  # as in `ray_cluster`: short runs end sooner
    port, dash = _free_port(), _free_port()
    # The session's other local cluster holds Ray's default agent ports: this head gets its own.
    agent_ports = [f"--{name}={_free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
        "metrics-export-port", "ray-client-server-port")]
    ray_bin = str(Path(sys.executable).with_name("ray"))
    # --block keeps the head's processes in one process group, so teardown stops exactly this cluster
    # (`ray stop` would also stop the session's other local cluster).
    # On SIGTERM `ray start --block` first drains the node for Serve replicas to move, up to 30 s; this
    # head runs none, and its teardown would wait out most of that.
    head_env = {**env, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    head = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", f"--port={port}", "--num-cpus=3", "--include-dashboard=true",
         f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1", f"--temp-dir=/tmp/rayh{os.getpid()}",
         *agent_ports],
        env=head_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    address, headers = f"http://127.0.0.1:{dash}", {"Authorization": f"Bearer {token}"}
    try:
        _wait_for_job_agent(address, headers, head)
        yield RayHead(address, env, headers)
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=15)  # a clean stop takes seconds; a stuck one is killed
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
