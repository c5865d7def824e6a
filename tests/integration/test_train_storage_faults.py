"""A real training run (Ray Train, 2 CPU workers, tiny Llama) whose storage traffic goes through the
fault-injecting proxy: transient 5xx on checkpoint uploads are retried; a checkpoint upload that keeps
failing is cut off mid-way, the run fails with an error naming it, and the run started again skips that
partial checkpoint, resumes from the one before through failing and stalled reads, and finishes.
"""

from __future__ import annotations

import uuid

import pytest

from pipeline.train import commit
from pipeline import storage
from pipeline.errors import PipelineError
from pipeline.storage import StorageOptions
from pipeline.train.launch import train
from tests.integration.test_train import base_dir, bucket, make_cfg  # noqa: F401 - module fixtures reused

STEPS, EVERY = 12, 4


@pytest.fixture(scope="module")
def prepared_run(bucket, base_dir, s3_server, tmp_path_factory):  # noqa: F811
    from pipeline.stages.data import prepare

    storage.publish(base_dir, f"s3://{bucket}/base/tiny-llama", StorageOptions(endpoint_url=s3_server.endpoint_url))
    cfg = make_cfg(bucket, s3_server.endpoint_url, tmp_path_factory.mktemp("cache"), "data")
    return prepare(cfg, str(base_dir))


def test_checkpoint_upload_and_resume_pull_survive_s3_faults(ray_cluster, bucket, s3_fault_proxy,  # noqa: F811
                                                            prepared_run, tmp_path):
    name = f"faulty-{uuid.uuid4().hex[:6]}"
    cfg = make_cfg(bucket, s3_fault_proxy.url, tmp_path / "cache", name, max_steps=STEPS,
                   checkpoint_every=EVERY, max_failures=0)  # the failed upload ends the run; a rerun resumes
    raw = cfg.to_dict()
    raw["storage"].update(max_attempts=3, read_timeout_s=2.0)
    cfg = type(cfg).from_dict(raw)
    options = StorageOptions.from_config(cfg.storage)
    run_uri = storage.join(cfg.run.output_uri, "ray", name)

    transient = s3_fault_proxy.fail("PUT", r"/checkpoint_000004-[^/]+/model\.safetensors$", times=2, status=503)
    cut_off = s3_fault_proxy.fail("PUT", r"/checkpoint_000008-[^/]+/optimizer\.safetensors$", times=10**6)
    with pytest.raises(PipelineError, match=r"cannot upload to s3://\S+/checkpoint_000008-\w+: .*ServiceUnavailable"):
        train(cfg, prepared_run)
    assert transient.hits == 2 and cut_off.hits == 3  # retried twice then stored; 3 tries then given up
    names = commit.checkpoint_names(run_uri, options)
    assert [n[:17] for n in names] == ["checkpoint_000008", "checkpoint_000004"]
    with pytest.raises(PipelineError, match="no COMMITTED marker"):
        commit.verify_commit(storage.join(run_uri, names[0]), options)  # the cut-off one: partial

    s3_fault_proxy.clear()
    failing = s3_fault_proxy.fail("GET", r"/checkpoint_000004-[^/]+/optimizer\.safetensors$", times=2, status=500)
    stalled = s3_fault_proxy.stall("GET", r"/checkpoint_000004-[^/]+/model\.safetensors$", times=1, seconds=6)
    result = train(cfg, prepared_run)
    assert result.resumed_from_step == 4 and result.steps == STEPS  # fell back past the partial step-8 one
    assert [m["step"] for m in result.metrics] == list(range(1, STEPS + 1))
    assert failing.hits == 2 and stalled.hits == 1
    commit.verify_commit(result.checkpoint_uri, options)  # the final checkpoint is committed
