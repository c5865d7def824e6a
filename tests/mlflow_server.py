"""A real MLflow tracking server for tests: `mlflow server` in a subprocess, shared by the whole session.

Tests talk to it over HTTP exactly as the pipeline talks to a production tracking server: SQLite backend
store and proxied artifacts (`--artifacts-destination`) in a temporary folder, bound to 127.0.0.1 on a
free port. The server's job runner (huey worker processes for GenAI jobs) is switched off: tracking does
not use it, and on a small CI machine it would slow start-up down considerably.

Import the fixtures in a conftest with `from tests.mlflow_server import *  # noqa`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = ["MlflowServer", "RestartableMlflowServer", "mlflow_server"]

_START_TIMEOUT_S = 90.0
_LOG_TAIL_CHARS = 4000


@dataclass(frozen=True)
class MlflowServer:
    """Where the running server listens and where it keeps its files."""

    uri: str  # http://127.0.0.1:PORT
    root: Path  # backend database, artifacts and the server log live here
    log_path: Path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _server_command(root: Path, port: int) -> list[str]:
    return [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]


def _healthy(uri: str) -> bool:
    # A handler without proxies: a developer's HTTP_PROXY must not swallow requests to 127.0.0.1.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"{uri}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _log_tail(log_path: Path) -> str:
    return log_path.read_text(errors="replace")[-_LOG_TAIL_CHARS:] if log_path.exists() else "(no log)"


def _wait_until_healthy(process: subprocess.Popen, uri: str, log_path: Path) -> None:
    deadline = time.monotonic() + _START_TIMEOUT_S
    while not _healthy(uri):
        if process.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {process.returncode}; log:\n{_log_tail(log_path)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"mlflow server not healthy after {_START_TIMEOUT_S:.0f}s; log:\n{_log_tail(log_path)}")
        time.sleep(0.25)


def _stop(process: subprocess.Popen) -> None:
    """Stop the server and the worker processes it spawned: they share the server's process group."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=15)


def _spawn(root: Path, port: int, log_path: Path) -> subprocess.Popen:
    """Start `mlflow server` as the leader of a new process group (it holds the uvicorn worker too)."""
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(log_path, "ab") as log_file:
        return subprocess.Popen(
            _server_command(root, port), cwd=root, env=env, stdout=log_file, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )


class RestartableMlflowServer:
    """A dedicated server a test may stop and start again: same port, same backend store and artifacts.

    For outage tests only; everything else shares the session's `mlflow_server`.
    """

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, _free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log_path = root / "server.log"
        self._process: subprocess.Popen | None = None
        self._black_hole: socket.socket | None = None

    def start(self) -> None:
        self._process = _spawn(self.root, self.port, self.log_path)
        _wait_until_healthy(self._process, self.uri, self.log_path)

    def stop(self) -> None:
        if self._process is not None:
            _stop(self._process)
        if self._black_hole is not None:
            self._black_hole.close()
            self._black_hole = None

    def hang(self) -> None:
        """Stop the server and leave a listener on its port that takes connections and never answers.

        A refused connection fails at once; a hung one makes every synchronous request wait for its
        timeout, so a client that logs on the caller's thread stalls there, whatever the machine's load.
        """
        self.stop()
        self._black_hole = socket.socket()
        self._black_hole.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._black_hole.bind(("127.0.0.1", self.port))
        self._black_hole.listen(1024)  # never accepted: the kernel completes handshakes, nobody reads

    def resume(self) -> None:
        """Take the hanging listener away and start the server again on the same port and store."""
        self.stop()
        self.start()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """A running `mlflow server` on 127.0.0.1 for the whole session, stopped at teardown."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    log_path = root / "server.log"
    no_proxy = ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1", "localhost"]))
    session_env = pytest.MonkeyPatch()
    session_env.setenv("NO_PROXY", no_proxy)  # MLflow clients in the tests must reach 127.0.0.1 directly
    process = _spawn(root, port, log_path)
    try:
        _wait_until_healthy(process, uri, log_path)
        yield MlflowServer(uri=uri, root=root, log_path=log_path)
    finally:
        _stop(process)
        session_env.undo()
