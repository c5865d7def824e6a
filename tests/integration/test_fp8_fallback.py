"""FP8 requested where it cannot run, on CPU: a one-line error before training starts, or, with
`train.fp8_fallback: true`, a loud warning, training without FP8 and an `fp8.fallback` MLflow tag.

The reason comes from where training would run: a real Ray task on the test cluster's CPU workers, or
the same check in this (CPU-only) process.
"""

from __future__ import annotations

import json
import logging
import uuid

import pytest
from mlflow import MlflowClient

from pipeline.job import precision
from pipeline import tracking
from pipeline.config import load_config
from pipeline.errors import PipelineError

NO_CUDA = "no CUDA device is visible"


def test_fp8_on_cpu_workers_without_the_opt_in_is_a_config_error():
    with pytest.raises(PipelineError) as error:
        load_config(None, ["train.fp8=delayed"])
    assert str(error.value) == ("train.fp8 needs GPU workers: set train.use_gpu=true, or train.fp8=none (or "
                                "train.fp8_fallback=true) to train on CPU without FP8 (got 'delayed')")


def test_a_worker_reports_why_fp8_cannot_run_there(ray_cluster):
    cfg = load_config(None, ["train.fp8=delayed", "train.fp8_fallback=true", "model.backend=auto"])
    assert precision.probe_workers(cfg) == (f"{NO_CUDA} (train.use_gpu=false)", None)
    torch_layers = load_config(None, ["train.fp8=current", "train.fp8_fallback=true", "model.backend=torch",
                                      "train.fp8_attention=true"])
    reason, attention = precision.probe_workers(torch_layers)
    assert reason.startswith("model.backend=torch has no FP8 layers") and attention is None


def test_without_the_opt_in_inactive_fp8_stops_the_job_with_the_reason():
    cfg = load_config(None, ["train.fp8=delayed", "train.use_gpu=true"])  # a GPU preset, run on this CPU
    reason = precision.fp8_unavailable_reason(cfg.train.fp8, cfg.model.backend)
    assert reason == NO_CUDA
    with pytest.raises(PipelineError) as error:
        precision.apply_fp8_policy(cfg, reason, [], None)
    assert str(error.value) == (f"train.fp8=delayed cannot run on the training workers: {NO_CUDA}; set "
                                "train.fp8=none, or train.fp8_fallback=true to train without FP8")


def test_fp8_attention_that_cannot_run_is_named_or_dropped_alone(caplog):
    """FP8 runs, its attention cannot (a cuDNN too old, say): the error names train.fp8_attention, and the
    fallback keeps FP8 in the linear layers."""
    why = "FP8 attention in the THD layout needs cuDNN >= 9.23; Transformer Engine runs on 9.14.0"
    cfg = load_config(None, ["train.fp8=delayed", "train.use_gpu=true", "train.fp8_attention=true"])
    with pytest.raises(PipelineError) as error:
        precision.apply_fp8_policy(cfg, None, [], None, attention_reason=why)
    assert str(error.value) == (f"train.fp8_attention=true cannot run on the training workers: {why}; set "
                                "train.fp8_attention=false, or train.fp8_fallback=true to train with bf16 attention")
    fallback = load_config(None, ["train.fp8=delayed", "train.use_gpu=true", "train.fp8_attention=true",
                                  "train.fp8_fallback=true"])
    with caplog.at_level(logging.WARNING, logger="pipeline.job.precision"):
        settled = precision.apply_fp8_policy(fallback, None, [], None, attention_reason=why)
    assert settled.train == type(fallback.train)(**{**vars(fallback.train), "fp8_attention": False})
    assert "train.fp8_attention=true cannot run" in caplog.text and "FP8 delayed layers" in caplog.text
    assert precision.apply_fp8_policy(cfg, None, [], None) is cfg  # both can run: nothing changes


def test_with_the_opt_in_training_goes_on_without_fp8_and_the_runs_say_so(ray_cluster, mlflow_server, caplog):
    cfg = load_config(None, ["train.fp8=delayed", "train.fp8_fallback=true", "model.dtype=bf16"])
    parent = tracking.find_or_start_parent("fp8-tests", f"job-{uuid.uuid4().hex[:6]}", tracking_uri=mlflow_server.uri)
    with tracking.stage_run(parent, "train", tracking_uri=mlflow_server.uri) as run_id:
        with caplog.at_level(logging.WARNING, logger="pipeline.job.precision"):
            settled = precision.settle_fp8(cfg, [run_id, parent], mlflow_server.uri)
    assert settled.train.fp8 == "none" and settled.model.dtype == "bf16"
    assert settled.train == type(cfg.train)(**{**vars(cfg.train), "fp8": "none"})  # nothing else changed
    assert "FP8 FALLBACK: train.fp8=delayed cannot run" in caplog.text and "training in bf16" in caplog.text
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    for run in (run_id, parent):
        assert client.get_run(run).data.tags[precision.FALLBACK_TAG] == f"{NO_CUDA} (train.use_gpu=false)"
    untouched = load_config(None, [])
    assert precision.settle_fp8(untouched, [run_id], mlflow_server.uri) is untouched  # no FP8 asked: no probe


def test_a_job_decides_fp8_once_and_its_workers_train_with_the_decision(ray_cluster, mlflow_server, tmp_path):
    """The whole driver: FP8 checked before the job opens, the fallback tagged, the workers train without it."""
    from pathlib import Path

    from pipeline.demo import make_tiny_checkpoint
    from pipeline.job.driver import run_job
    from pipeline.train.checkpoint import TRAINER_STATE_FILE

    repo = Path(__file__).resolve().parents[2]
    base = make_tiny_checkpoint(tmp_path / "base")
    name = f"fp8-job-{uuid.uuid4().hex[:6]}"
    cfg = load_config(None, ["train.fp8=delayed", "train.fp8_fallback=true", f"run.name={name}",
                             f"run.output_uri={tmp_path}/out", f"run.cache_dir={tmp_path}/node", f"model.base_uri={base}",
                             f"data.train_files=[{repo}/data/tiny_text.jsonl]", "data.seq_len=64", "train.max_steps=2",
                             "train.warmup_steps=1", "train.checkpoint_every=0", f"tracking.uri={mlflow_server.uri}"])
    ctx = run_job(cfg, ["data", "train"], {"commit": "abc123", "dirty": False, "source": "git"}, echo=lambda line: None)
    reason = f"{NO_CUDA} (train.use_gpu=false)"
    assert (ctx.job.fp8.requested, ctx.job.fp8.recipe, ctx.job.fp8.fallback) == ("delayed", "none", reason)
    assert ctx.job.config.train.fp8 == "delayed"  # the config asked for is never swapped
    trained = json.loads(Path(ctx.state.checkpoint_uri, TRAINER_STATE_FILE).read_text())
    assert trained["config"]["train"]["fp8"] == "none" and trained["config"] == ctx.job.train_config.to_dict()
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    parent = client.get_run(ctx.state.parent_run_id)
    (train_run,) = client.search_runs([parent.info.experiment_id],
                                      filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' "
                                                    "and tags.`pipeline.stage` = 'train'")
    for run in (parent, train_run):
        assert run.data.tags[precision.FALLBACK_TAG] == reason and run.data.params["train.fp8"] == "delayed"
        assert run.data.tags["lm_head"] == cfg.model.dtype == "fp32"  # the FP8 head went with the rest of FP8
