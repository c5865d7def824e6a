"""A real S3 endpoint for tests: moto's server over HTTP on 127.0.0.1, shared by the whole session.

Tests talk to it exactly as the pipeline talks to production object storage (s3fs/boto3 over HTTP,
credentials from the environment). The server also keeps a log of the requests it served, so a test can
prove how often an object was fetched (for example, that concurrent pulls download each shard once).

Import the fixtures in a conftest with `from tests.s3_server import *  # noqa`.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import boto3
import pytest
from moto.server import ThreadedMotoServer

__all__ = ["S3Server", "s3_server", "s3_bucket"]

_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
# Settings from a developer's shell that could send test traffic elsewhere or sign it differently.
_UNSET_ENV = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3")


class _LoggingMotoServer(ThreadedMotoServer):
    """ThreadedMotoServer whose WSGI app records (method, path) of every request it serves."""

    def __init__(self, requests: list[tuple[str, str]], **kwargs) -> None:
        super().__init__(**kwargs)
        self._requests = requests

    def _server_entry(self) -> None:
        # Same as the parent's, with the app wrapped: moto offers no public hook for a request log.
        from moto.server import DomainDispatcherApplication, create_backend_app
        from werkzeug.serving import make_server

        app = DomainDispatcherApplication(create_backend_app)

        def logged_app(environ, start_response):
            self._requests.append((environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")))
            return app(environ, start_response)

        self._server = make_server(self._ip_address, self._port, logged_app, True)
        self._server_ready_event.set()
        self._server.serve_forever()


@dataclass
class S3Server:
    """Handle on the running server: where it listens and what it has served."""

    endpoint_url: str
    requests: list[tuple[str, str]] = field(default_factory=list)  # (method, path), in arrival order

    def client(self):
        """A boto3 S3 client bound to this server, for arranging state behind the pipeline's back."""
        return boto3.client("s3", endpoint_url=self.endpoint_url)

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def object_gets(self, bucket: str, key: str) -> int:
        """How many GET requests fetched the object `key` of `bucket` (path-style addressing)."""
        return sum(1 for method, path in self.requests if method == "GET" and path == f"/{bucket}/{key}")


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A moto S3 server on 127.0.0.1 with test credentials in the environment for the whole session.

    AWS_ENDPOINT_URL points at the server as well, so code that omits an endpoint still never reaches
    real AWS; the previous environment is restored at teardown.
    """
    env = pytest.MonkeyPatch()
    for name, value in _TEST_ENV.items():
        env.setenv(name, value)
    for name in _UNSET_ENV:
        env.delenv(name, raising=False)
    no_proxy = ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1", "localhost"]))
    env.setenv("NO_PROXY", no_proxy)
    werkzeug_log = logging.getLogger("werkzeug")
    werkzeug_level = werkzeug_log.level
    werkzeug_log.setLevel(logging.WARNING)  # one access-log line per request is noise

    requests: list[tuple[str, str]] = []
    server = _LoggingMotoServer(requests, ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint_url = f"http://{host}:{port}"
    env.setenv("AWS_ENDPOINT_URL", endpoint_url)
    try:
        yield S3Server(endpoint_url=endpoint_url, requests=requests)
    finally:
        server.stop()
        werkzeug_log.setLevel(werkzeug_level)
        env.undo()


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    """A new, empty bucket on the session server; its name is unique per test."""
    return s3_server.create_bucket(f"test-{uuid.uuid4().hex[:16]}")

