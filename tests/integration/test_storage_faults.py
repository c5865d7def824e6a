"""S3 faults on the wire: 5xx answers and stalled requests injected by a proxy in front of the test S3
server, on reads and writes. Transient ones are retried with backoff and the files arrive intact; a
persistent one ends in a one-line PipelineError naming the uri within a bounded time, never a hang.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from pipeline import storage
from pipeline.errors import PipelineError
from pipeline.storage import StorageOptions

FILES = {"model.safetensors": 300_000, "config.json": 200, "sub/rng.safetensors": 5_000}


@pytest.fixture
def checkpoint_dir(tmp_path) -> Path:
    """A folder of random files (content does not matter, only that every byte arrives)."""
    root = tmp_path / "checkpoint"
    for name, size in FILES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(os.urandom(size))
    return root


def options_via(proxy, **overrides) -> StorageOptions:
    return StorageOptions(endpoint_url=proxy.url, **{"max_attempts": 4, "read_timeout_s": 5.0, **overrides})


def test_transient_5xx_on_upload_and_pull_are_retried(s3_fault_proxy, s3_bucket, checkpoint_dir, tmp_path):
    uri = f"s3://{s3_bucket}/runs/ck"
    options = options_via(s3_fault_proxy)
    puts = s3_fault_proxy.fail("PUT", r"/ck/model\.safetensors$", times=2, status=503)
    manifest_put = s3_fault_proxy.fail("PUT", r"/ck/manifest\.json$", times=1, status=500)
    storage.publish(checkpoint_dir, uri, options)
    assert (puts.hits, manifest_put.hits) == (2, 1)

    gets = s3_fault_proxy.fail("GET", r"/ck/model\.safetensors$", times=3, status=500)
    listing = s3_fault_proxy.fail("GET", rf"^/{s3_bucket}/?$", times=1, status=503)
    pulled = storage.pull_checkpoint(uri, tmp_path / "cache", options)
    assert (gets.hits, listing.hits) == (3, 1)
    for name in FILES:  # pull_checkpoint checked every sha256 too
        assert (pulled / name).read_bytes() == (checkpoint_dir / name).read_bytes()


def test_transient_5xx_on_single_objects_are_retried(s3_fault_proxy, s3_bucket):
    uri = f"s3://{s3_bucket}/jobs/state.json"
    options = options_via(s3_fault_proxy)
    put = s3_fault_proxy.fail("PUT", r"/state\.json$", times=2, status=503)
    storage.write_bytes(uri, b'{"stage": "train"}', options)
    get = s3_fault_proxy.fail("GET", r"/state\.json$", times=2, status=502)
    assert storage.read_bytes(uri, options) == b'{"stage": "train"}'
    assert (put.hits, get.hits) == (2, 2)


@pytest.mark.parametrize("method", ["GET", "PUT"])
def test_a_persistent_503_fails_fast_with_the_uri(method, s3_fault_proxy, s3_bucket):
    uri = f"s3://{s3_bucket}/jobs/state.json"
    options = options_via(s3_fault_proxy, max_attempts=3)
    storage.write_bytes(uri, b"{}", options)
    fault = s3_fault_proxy.fail(method, r"/state\.json$", times=10**6, status=503)
    start = time.monotonic()
    with pytest.raises(PipelineError) as error:
        storage.read_bytes(uri, options) if method == "GET" else storage.write_bytes(uri, b"{}", options)
    elapsed = time.monotonic() - start
    message = str(error.value)
    assert uri in message and "\n" not in message and "(ServiceUnavailable)" in message, message
    assert "still failing after retries" in message and "storage.max_attempts" in message
    # exactly storage.max_attempts tries, with backoff of at most 1 s + 2 s between them
    assert fault.hits == 3 and elapsed < 10, (fault.hits, elapsed)


def test_a_stall_past_the_read_timeout_is_retried(s3_fault_proxy, s3_bucket):
    uri = f"s3://{s3_bucket}/runs/ck/model.safetensors"
    options = options_via(s3_fault_proxy, read_timeout_s=1.0)
    storage.write_bytes(uri, b"weights" * 1000, options)
    stall = s3_fault_proxy.stall("GET", r"/model\.safetensors$", times=1, seconds=8.0)
    start = time.monotonic()
    assert storage.read_bytes(uri, options) == b"weights" * 1000
    elapsed = time.monotonic() - start
    assert stall.hits == 1 and 1.0 <= elapsed < 8.0, elapsed  # timed out at 1 s, did not wait 8 s


def test_a_stalled_endpoint_is_an_error_not_a_hang(s3_fault_proxy, s3_bucket):
    uri = f"s3://{s3_bucket}/runs/ck/model.safetensors"
    options = options_via(s3_fault_proxy, read_timeout_s=0.5, max_attempts=2)
    storage.write_bytes(uri, b"weights", options)
    stall = s3_fault_proxy.stall("GET", r"/model\.safetensors$", times=10**6, seconds=30.0)
    start = time.monotonic()
    with pytest.raises(PipelineError, match=f"cannot read {uri}: .*[Tt]imeout.*still failing after retries"):
        storage.read_bytes(uri, options)
    assert stall.hits == 2 and time.monotonic() - start < 25  # two 0.5 s timeouts, not a 30 s stall
