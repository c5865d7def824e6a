"""A checkpoint whose upload was cut off, or whose bytes changed in storage, is never loaded: the resume
skips it with a warning that names it and takes the one before. A storage outage is not mistaken for
damage: it stops the resume with its own error.

Checkpoints here are folders of random files uploaded to the test S3 server with the same function
rank 0 hands Ray Train; a real training run through these paths is in test_train_faults.py.
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

import pytest

from pipeline.train import commit
from pipeline import storage
from pipeline.errors import PipelineError
from pipeline.storage import StorageOptions

FILES = {"model.safetensors": 20_000, "optimizer.safetensors": 40_000, "trainer_state.json": 300,
         "rank-0/rng.safetensors": 1_000}


def make_run(bucket: str, tmp_path: Path, steps: list[int], options: StorageOptions) -> dict[int, str]:
    """Committed checkpoints of a run at `steps`; returns step -> checkpoint uri."""
    run_uri = f"s3://{bucket}/runs/ray/run-{uuid.uuid4().hex[:6]}"
    uris = {}
    for step in steps:
        local = tmp_path / f"local-{step}"
        for name, size in FILES.items():
            (local / name).parent.mkdir(parents=True, exist_ok=True)
            (local / name).write_bytes(os.urandom(size))
        uris[step] = storage.join(run_uri, f"checkpoint_{step:06d}-{uuid.uuid4().hex[:8]}")
        commit.upload_and_commit(local, uris[step], options)
    return uris


def run_of(uris: dict[int, str]) -> str:
    return next(iter(uris.values())).rsplit("/", 1)[0]


def damage(s3_server, uri: str, how: str) -> str:
    """Damage the checkpoint at `uri` in storage; returns the reason the resume must give."""
    client, (bucket, prefix) = s3_server.client(), uri[len("s3://"):].split("/", 1)
    key = f"{prefix}/model.safetensors"
    if how == "cut-off upload":  # files after the first never arrived, nor did manifest and marker
        for name in ("optimizer.safetensors", "manifest.json", commit.COMMIT_MARKER):
            client.delete_object(Bucket=bucket, Key=f"{prefix}/{name}")
        return "no COMMITTED marker"
    if how == "flipped byte":
        data = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
        data[100] ^= 0xFF
        client.put_object(Bucket=bucket, Key=key, Body=bytes(data))
        return "sha256 mismatch"
    if how == "missing file":
        client.delete_object(Bucket=bucket, Key=key)
        return "listed in the manifest but missing"
    client.put_object(Bucket=bucket, Key=f"{prefix}/manifest.json", Body=b'{"format": 1, "files": {}}')
    return "not the one its COMMITTED marker vouches for"


@pytest.mark.parametrize("how", ["cut-off upload", "flipped byte", "missing file", "replaced manifest"])
def test_a_damaged_newest_checkpoint_is_skipped_for_the_one_before(how, s3_server, s3_bucket, tmp_path, caplog):
    options = StorageOptions(endpoint_url=s3_server.endpoint_url)
    uris = make_run(s3_bucket, tmp_path, [5, 10, 15], options)
    reason = damage(s3_server, uris[15], how)
    with caplog.at_level(logging.WARNING, logger="pipeline.train.commit"):
        uri, local = commit.newest_committed(run_of(uris), tmp_path / "cache", options)
    assert uri == uris[10]
    assert (local / "model.safetensors").read_bytes() == (tmp_path / "local-10" / "model.safetensors").read_bytes()
    skipped = [r.getMessage() for r in caplog.records]
    assert len(skipped) == 1 and f"skipping checkpoint {uris[15]}: " in skipped[0] and reason in skipped[0], skipped


def test_two_damaged_checkpoints_fall_back_two_steps(s3_server, s3_bucket, tmp_path, caplog):
    options = StorageOptions(endpoint_url=s3_server.endpoint_url)
    uris = make_run(s3_bucket, tmp_path, [5, 10, 15], options)
    damage(s3_server, uris[15], "cut-off upload")
    damage(s3_server, uris[10], "flipped byte")
    with caplog.at_level(logging.WARNING, logger="pipeline.train.commit"):
        found = commit.resume_checkpoint(run_of(uris), tmp_path / "cache", options, rank=0, ray_has_one=True)
    assert found[0] == uris[5] and len(caplog.records) == 2


def test_no_committed_checkpoint_starts_fresh_unless_ray_registered_one(s3_server, s3_bucket, tmp_path):
    options = StorageOptions(endpoint_url=s3_server.endpoint_url)
    uris = make_run(s3_bucket, tmp_path, [5], options)
    damage(s3_server, uris[5], "cut-off upload")
    assert commit.resume_checkpoint(run_of(uris), tmp_path, options, rank=0, ray_has_one=False) is None
    with pytest.raises(PipelineError, match=f"no complete checkpoint under {run_of(uris)} .*start a new run.name"):
        commit.resume_checkpoint(run_of(uris), tmp_path, options, rank=0, ray_has_one=True)
    missing_run = f"s3://{s3_bucket}/runs/ray/never-ran"
    assert commit.resume_checkpoint(missing_run, tmp_path, options, rank=0, ray_has_one=False) is None


def test_a_storage_outage_is_an_error_not_a_reason_to_fall_back(s3_fault_proxy, s3_bucket, tmp_path, caplog):
    options = StorageOptions(endpoint_url=s3_fault_proxy.url, max_attempts=2)
    uris = make_run(s3_bucket, tmp_path, [5, 10], options)
    outage = s3_fault_proxy.fail("GET", r"/COMMITTED$", times=10**6, status=503)
    with pytest.raises(PipelineError, match=f"cannot read {uris[10]}/COMMITTED: .*ServiceUnavailable"):
        commit.newest_committed(run_of(uris), tmp_path / "cache", options)
    assert outage.hits == 2 and not caplog.records  # nothing skipped: the newest was never judged damaged
