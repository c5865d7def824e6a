"""A fault-injecting HTTP reverse proxy on 127.0.0.1 in front of the test S3 server.

Why it exists: Ray Train writes checkpoints through pyarrow (wrapping our s3fs filesystem), and worker
processes build their own clients, so no in-process hook (botocore events, monkeypatching) reaches every
request the pipeline makes. A proxy on the wire does: point `storage.endpoint_url` at it and every
client, in any process, goes through it.

A test sets the fault schedule: `fail(method, path, times, status)` answers the next `times` matching
requests with an S3-style 5xx error; `stall(method, path, times, seconds)` holds them for `seconds`
and then drops the connection without an answer (the client's read timeout must fire first);
`hold(method, path, release)` keeps them until the test sets `release`, then forwards them. Every
other request is forwarded to the upstream server unchanged. Each `Fault` counts its hits, so a test
can prove the fault really happened.

Import the fixture in a conftest with `from tests.s3_fault_proxy import *  # noqa`.
"""

from __future__ import annotations

import http.client
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest

__all__ = ["Fault", "S3FaultProxy", "s3_fault_proxy"]

# Headers that describe one hop, not the message: never forwarded as they are.
_HOP_HEADERS = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "expect", "te", "upgrade"}
_ERROR_BODY = ("<?xml version='1.0' encoding='UTF-8'?>"
               "<Error><Code>{code}</Code><Message>injected by the test proxy</Message></Error>")
_CODES = {500: "InternalError", 502: "BadGateway", 503: "ServiceUnavailable", 504: "GatewayTimeout"}


@dataclass
class Fault:
    """One scheduled fault: the next `times` requests whose method and path match get it."""

    method: str
    path: re.Pattern
    times: int
    status: int | None = None  # answer with this 5xx status
    stall_s: float = 0.0  # or hold the request this long, then close without an answer
    release: threading.Event | None = None  # or hold it until this is set (at most stall_s), then forward it
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        return self.hits < self.times and method == self.method and bool(self.path.search(path))


class S3FaultProxy:
    """The proxy server: a thread per connection, forwarding to `upstream` (http://host:port)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = urlsplit(upstream)
        self.faults: list[Fault] = []
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, in arrival order
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="s3-fault-proxy", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def fail(self, method: str, path: str, times: int = 1, status: int = 503) -> Fault:
        """Answer the next `times` requests matching `method` and the regex `path` with `status`."""
        return self._add(Fault(method, re.compile(path), times, status=status))

    def stall(self, method: str, path: str, times: int = 1, seconds: float = 5.0) -> Fault:
        """Hold the next `times` matching requests for `seconds`, then close without answering."""
        return self._add(Fault(method, re.compile(path), times, stall_s=seconds))

    def hold(self, method: str, path: str, release: threading.Event, times: int = 1,
             longest_s: float = 50.0) -> Fault:
        """Keep the next `times` matching requests until `release` is set (at most `longest_s`, under the
        client's read timeout), then forward them: a slow request that still succeeds."""
        return self._add(Fault(method, re.compile(path), times, stall_s=longest_s, release=release))

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _add(self, fault: Fault) -> Fault:
        with self._lock:
            self.faults.append(fault)
        return fault

    def take_fault(self, method: str, path: str) -> Fault | None:
        """Log the request; the first scheduled fault it matches, counted as hit, or None."""
        with self._lock:
            self.requests.append((method, path))
            for fault in self.faults:
                if fault.matches(method, path):
                    fault.hits += 1
                    return fault
        return None


def _handler_for(proxy: S3FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, and 100-continue answered by the base class

        def log_message(self, *args) -> None:  # one stderr line per request is noise
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(chunks)
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _handle(self) -> None:
            body = self._body()  # read first: the connection stays usable whatever we answer
            fault = proxy.take_fault(self.command, urlsplit(self.path).path)
            if fault is not None and fault.release is not None:
                fault.release.wait(fault.stall_s)
                fault = None
            if fault is not None and fault.stall_s:
                time.sleep(fault.stall_s)
                self.close_connection = True
                return
            if fault is not None:
                return self._answer(fault.status, {"Content-Type": "application/xml"},
                                    _ERROR_BODY.format(code=_CODES.get(fault.status, "InternalError")).encode())
            status, headers, data = self._forward(body)
            self._answer(status, headers, data)

        def _forward(self, body: bytes) -> tuple[int, dict[str, str], bytes]:
            upstream = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=120)
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS}
                if self.command not in ("GET", "HEAD", "DELETE") or body:
                    headers["Content-Length"] = str(len(body))
                upstream.request(self.command, self.path, body=body, headers=headers)
                response = upstream.getresponse()
                data = response.read()
                return response.status, {k: v for k, v in response.getheaders() if k.lower() not in _HOP_HEADERS}, data
            finally:
                upstream.close()

        def _answer(self, status: int, headers: dict[str, str], data: bytes) -> None:
            self.send_response(status)
            for key, value in headers.items():
                if key.lower() != "content-length" or self.command == "HEAD":
                    self.send_header(key, value)  # HEAD keeps the object's size, and has no body
            if self.command != "HEAD":
                self.send_header("Content-Length", str(len(data)))
            elif "content-length" not in {k.lower() for k in headers}:
                self.send_header("Content-Length", "0")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

    return Handler


@pytest.fixture
def s3_fault_proxy(s3_server) -> Iterator[S3FaultProxy]:
    """A proxy in front of the session's S3 server, with an empty fault schedule; closed after the test."""
    proxy = S3FaultProxy(s3_server.endpoint_url)
    try:
        yield proxy
    finally:
        proxy.close()
