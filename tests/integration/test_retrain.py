"""Scheduled retraining against real parts: a `ray start --head` job server and a real MLflow server.

The crash tests kill the scheduler between submit, wait, promote and the state write (an exception
in-process, `os._exit` in a subprocess), start a new one and check, from Ray's job list and MLflow's
registry rather than from the scheduler's own words, that no data was submitted twice and no version
promoted twice. They submit `tests/support/retrain_job.py`, a tiny real job; one test submits the real
`jobs/finetune.py`.
"""

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from ray.job_submission import JobSubmissionClient

import te_model
from pipeline.config import load_config
from pipeline.stages.evaluate import evaluate_model
from pipeline.errors import PipelineError
from pipeline.ops.retrain import Gate, Retrainer
from pipeline.tracking.run_tags import data_fingerprint
from pipeline.demo import make_tiny_checkpoint

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


class Crash(BaseException):
    """The scheduler dies here: nothing in it may catch this."""


def _write_data(path: Path, val_loss: float, fail: bool = False) -> None:
    rows = [{"text": f"model quality {val_loss}", "val_loss": val_loss, "fail": fail}, {"text": "more text"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def setup(tmp_path, mlflow_server, ray_head):
    """Overrides of a fresh job (own experiment and registered model) whose data is `data.jsonl`."""
    tag = uuid.uuid4().hex[:6]
    data = tmp_path / "data.jsonl"
    overrides = [f"run.name=nightly{tag}", f"run.experiment=retrain-{tag}", f"tracking.uri={mlflow_server.uri}",
                 f"data.train_files=[{data}]", f"export.registered_model_name=model-{tag}",
                 f"run.output_uri={tmp_path / 'out'}"]
    return {"data": data, "overrides": overrides, "model": f"model-{tag}", "job": f"nightly{tag}",
            "mlflow": MlflowClient(mlflow_server.uri),
            "ray": JobSubmissionClient(ray_head.address, headers=ray_head.headers)}


def _retrainer(setup, ray_head, *, crash_at=None, echo=None, script="tests/support/retrain_job.py", overrides=()):
    """A new scheduler, as after a restart: it shares nothing in memory with the previous one."""
    def crash_point(point):
        if point == crash_at:
            raise Crash(point)
    all_overrides = [*setup["overrides"], *overrides]
    return Retrainer(load_config(None, all_overrides), JobSubmissionClient(ray_head.address, headers=ray_head.headers),
                     Gate("finetuned/val_loss"), overrides=all_overrides, entrypoint_script=script,
                     runtime_env={"working_dir": str(REPO), "env_vars": {"FINETUNE_CODE_VERSION": "abc123"}},
                     poll_s=0.5, timeout_s=600, crash_point=crash_point, echo=echo or (lambda line: None))


def _submissions(setup) -> list[str]:
    jobs = setup["ray"].list_jobs()
    return sorted(j.submission_id for j in jobs if (j.metadata or {}).get("retrain.of") == setup["job"])


def _champion(setup) -> str | None:
    return setup["mlflow"].get_registered_model(setup["model"]).aliases.get("champion")


_KILL_AFTER_PROMOTE = """
import json, os, sys
from ray.job_submission import JobSubmissionClient
import torch

import te_model
from pipeline.config import load_config
from pipeline.stages.evaluate import evaluate_model
from pipeline.ops.retrain import Retrainer
args = json.loads(sys.argv[1])
def die(point):
    if point == "promoted":
        os._exit(3)
Retrainer(load_config(None, args["overrides"]), JobSubmissionClient(args["address"], headers=args["headers"]),
          overrides=args["overrides"], entrypoint_script="tests/support/retrain_job.py", runtime_env=args["env"],
          poll_s=0.5, crash_point=die).tick()
"""


def test_crashes_at_every_step_never_submit_twice_nor_promote_twice(setup, ray_head):
    lines = []
    tick = lambda crash_at=None: _retrainer(setup, ray_head, crash_at=crash_at, echo=lines.append).tick()  # noqa: E731

    _write_data(setup["data"], 2.0)  # first data: crash after the submit, then after the job finished
    with pytest.raises(Crash):
        tick("submitted")
    with pytest.raises(Crash):
        tick("finished")
    assert any("was submitted before: waiting for it" in line for line in lines)  # Ray refused the resubmit
    first = tick()
    assert first.action == "promoted" and _champion(setup) == first.version

    _write_data(setup["data"], 1.0)  # better data: the process dies right after the alias moved
    env = {"working_dir": str(REPO), "env_vars": {"FINETUNE_CODE_VERSION": "abc123"}}
    args = json.dumps({"overrides": setup["overrides"], "address": ray_head.address, "headers": ray_head.headers,
                       "env": env})
    died = subprocess.run([sys.executable, "-c", _KILL_AFTER_PROMOTE, args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert died.returncode == 3, died.stderr[-2000:]
    better = _champion(setup)
    assert better != first.version
    assert tick().action == "promoted" and _champion(setup) == better
    assert lines[-1].endswith("is champion already")  # recorded, not promoted a second time

    _write_data(setup["data"], 1.5)  # worse data: kept; crash after the state write, then nothing to do
    with pytest.raises(Crash):
        tick("recorded")
    assert lines[-1].startswith(f"kept champion v{better}")
    assert tick().action == "unchanged" and _champion(setup) == better

    submissions = _submissions(setup)
    assert len(submissions) == 3 and all(s.endswith("-1") for s in submissions), submissions
    versions = setup["mlflow"].search_model_versions(f"name='{setup['model']}'")
    assert len(versions) == 3  # one trained job per data version
    assert sum(line.startswith("promoted ") for line in lines) == 1  # the subprocess made the other one


def test_a_failed_job_is_retried_as_the_next_attempt(setup, ray_head):
    _write_data(setup["data"], 2.0, fail=True)
    for attempt in (1, 2):
        with pytest.raises(PipelineError, match=f"-{attempt} FAILED: .*the next tick submits attempt {attempt + 1}"):
            _retrainer(setup, ray_head).tick()
    assert [s[-2:] for s in _submissions(setup)] == ["-1", "-2"]
    assert not setup["mlflow"].search_model_versions(f"name='{setup['model']}'")


def test_the_real_finetune_job_is_submitted_promoted_and_tagged(setup, ray_head, tmp_path):
    base = make_tiny_checkpoint(tmp_path / "base")
    setup["data"].write_text((REPO / "data/tiny_text.jsonl").read_text())
    tiny = [f"model.base_uri={base}", f"run.cache_dir={tmp_path / 'node'}", "model.backend=torch",
            "data.max_documents=60", "data.seq_len=64", "train.workers=1", "train.max_steps=2",
            "train.warmup_steps=1", "eval.max_batches=1", "eval.num_samples=1", "eval.max_new_tokens=4"]
    lines = []
    result = _retrainer(setup, ray_head, script="jobs/finetune.py", overrides=tiny, echo=lines.append).tick()
    assert result.action == "promoted" and _champion(setup) == result.version, lines
    assert _retrainer(setup, ray_head, script="jobs/finetune.py", overrides=tiny).tick().action == "unchanged"
    assert len(_submissions(setup)) == 1

    client = setup["mlflow"]
    experiment = client.get_experiment_by_name(setup["overrides"][1].split("=")[1])
    (parent,) = client.search_runs([experiment.experiment_id], filter_string="tags.`pipeline.role` = 'parent'")
    tags = parent.data.tags
    cfg = load_config(None, [*setup["overrides"], *tiny])
    assert tags["data_fingerprint"] == data_fingerprint(cfg) == result.fingerprint
    assert (tags["precision"], tags["hardware"], tags["code.commit"]) == ("fp32", "cpu x1", "abc123")
    assert int(tags["model_params"]) > 0 and tags["model_name"] == "base"

    # New data: the next job scores the champion on its own held-out rows, in its own eval stage.
    setup["data"].write_text("".join((REPO / "data/tiny_text.jsonl").read_text().splitlines(True)[::-1]))
    second = _retrainer(setup, ray_head, script="jobs/finetune.py", overrides=tiny, echo=lines.append).tick()
    assert second.action in ("promoted", "kept") and second.version != result.version
    (record,) = client.search_runs([experiment.experiment_id], filter_string=(
        f"tags.`pipeline.role` = 'retrain' and tags.`retrain.version` = '{second.version}'"))
    eval_run = _eval_run(client, experiment.experiment_id, second.job)
    assert eval_run.data.tags["eval.champion"] == f"models:/{setup['model']}/{result.version}"
    assert record.data.tags["retrain.champion_version"] == result.version
    assert record.data.tags["retrain.scored_on"] == eval_run.data.tags["eval.val_uri"] != ""
    assert len(record.data.tags["retrain.scored_data_hash"]) == 64
    assert record.data.metrics["candidate/val_loss"] == eval_run.data.metrics["finetuned/val_loss"]
    champion_score = record.data.metrics["champion/val_loss"]
    assert champion_score == eval_run.data.metrics["champion/val_loss"]
    better = record.data.metrics["candidate/val_loss"] < champion_score
    assert second.action == ("promoted" if better else "kept"), lines

    # The champion's score is that registered version's loss over exactly those rows.
    downloaded = client.download_artifacts(client.get_model_version(setup["model"], result.version).run_id,
                                           "model", str(tmp_path))
    champion = te_model.from_hf_checkpoint(downloaded, backend="torch", dtype=torch.float32)
    rescored = evaluate_model(champion, eval_run.data.tags["eval.val_uri"], cfg)
    assert rescored["val_loss"] == pytest.approx(champion_score, rel=1e-4)


def _eval_run(client, experiment_id, job):
    (parent,) = client.search_runs([experiment_id], filter_string=(
        f"tags.`pipeline.role` = 'parent' and tags.`mlflow.runName` = '{job}'"))
    (run,) = client.search_runs([experiment_id], filter_string=(
        f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and tags.`pipeline.stage` = 'eval'"))
    return run
