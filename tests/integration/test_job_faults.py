"""The job's driver killed mid-train: `jobs/finetune.py` runs as a real subprocess on the test session's
Ray cluster (joined by RAY_ADDRESS, as a driver on a head node would), gets SIGKILL once training has
passed a checkpoint, and is submitted again with the same run name. It must resume (same MLflow parent
run, training from the latest checkpoint, one metric history) and not start over; a new run name must
start a new run, and reusing a run name with other training data is refused. An error no restart can
fix ends the job at its first occurrence in one line; the same job, fixed, then survives a killed worker.
A driver killed after a commit Ray never registered: the resumed job's later stages use the newest
checkpoint training committed, and report its step. A driver stopped by Ctrl-C or SIGTERM says so in one
line and records the stop; the same command carries on.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file

from jobs import finetune
import te_model
from pipeline.train import commit, permanent
from pipeline import storage
from pipeline.train.faults import BAD_INPUT_AT_STEP_ENV, PAUSE_UPLOAD_ENV, STATE_DIR_ENV
from pipeline.demo import make_tiny_checkpoint

REPO = Path(__file__).resolve().parents[2]
STEPS = 12
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def job(tmp_path_factory, s3_server, mlflow_server, ray_cluster):
    """Inputs in S3 and the --set overrides of a data+train job named `driver-kill`."""
    bucket = s3_server.create_bucket("job-faults")
    options = storage.StorageOptions(endpoint_url=s3_server.endpoint_url)
    base = make_tiny_checkpoint(tmp_path_factory.mktemp("base"))
    storage.publish(base, f"s3://{bucket}/base/tiny-llama", options)
    storage.write_bytes(f"s3://{bucket}/data/text.jsonl", (REPO / "data/tiny_text.jsonl").read_bytes(), options)
    overrides = [
        "run.experiment=job-faults", f"run.output_uri=s3://{bucket}/runs",
        f"run.cache_dir={tmp_path_factory.mktemp('node')}", f"storage.endpoint_url={s3_server.endpoint_url}",
        f"model.base_uri=s3://{bucket}/base/tiny-llama", "model.backend=torch", "model.dtype=fp32",
        f"data.train_files=[s3://{bucket}/data/text.jsonl]", "data.seq_len=64", "data.max_documents=80",
        "train.workers=2", "train.micro_batch_size=2", f"train.max_steps={STEPS}", "train.checkpoint_every=2",
        "train.warmup_steps=1", f"tracking.uri={mlflow_server.uri}",
    ]
    return {"bucket": bucket, "options": options, "client": MlflowClient(mlflow_server.uri),
            "args": [a for o in overrides for a in ("--set", o)] + ["--stages", "data,train"]}


def finetune_subprocess(args: list[str], state_dir: Path, **hooks: str) -> subprocess.Popen:
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "PYTHONPATH": str(REPO),
           STATE_DIR_ENV: str(state_dir), **hooks}
    return subprocess.Popen([sys.executable, "jobs/finetune.py", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def events(state_dir: Path, rank: int = 0) -> list[dict]:
    path = state_dir / f"rank-{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_for(condition, what: str, timeout_s: float = 240.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def parents(client: MlflowClient, name: str):
    experiment = client.get_experiment_by_name("job-faults")
    return client.search_runs([experiment.experiment_id],
                              filter_string=f"tags.`pipeline.role` = 'parent' and tags.`mlflow.runName` = '{name}'")


def train_runs(client: MlflowClient, parent_id: str):
    experiment = client.get_experiment_by_name("job-faults")
    runs = client.search_runs([experiment.experiment_id], filter_string=(
        f"tags.`mlflow.parentRunId` = '{parent_id}' and tags.`pipeline.stage` = 'train'"))
    return runs


def driver_lines(output: str) -> list[str]:
    """The driver's own lines, without those Ray forwards from its workers and actors: "(Name pid=N) ..."."""
    return [line for line in output.splitlines() if not re.match(r"(\x1b\[[0-9;]*m)?\([^)]*\)", line)]


def kill_driver_at(args: list[str], state_dir: Path, pause: str, event: str, what: str) -> None:
    """Run the job until rank 0's upload pauses at `pause` and reports `event`, then SIGKILL the driver and
    wait for Ray to stop its workers."""
    driver = finetune_subprocess(args, state_dir, **{PAUSE_UPLOAD_ENV: pause})
    try:
        wait_for(lambda: any(e["event"] == event for e in events(state_dir)), what)
    finally:
        driver.kill()  # SIGKILL
        output = driver.communicate(timeout=60)[0]
    assert driver.returncode == -9, output[-2000:]
    workers = {e["pid"] for rank in (0, 1) for e in events(state_dir, rank)}
    wait_for(lambda: all(gone(pid) for pid in workers), "Ray to stop the dead driver's workers", 60)


def test_a_killed_driver_resumes_when_submitted_again_and_exports_the_newest_committed_checkpoint(job, tmp_path):
    name = "driver-kill"
    args = [*job["args"], "--set", f"run.name={name}", "--set", "export.registered_model_name="]
    # First killed mid-upload: step 6's files are in storage, its commit marker is not.
    kill_driver_at(args, tmp_path, "before_commit:6", "before_commit",
                   "training past its step-2 and step-4 checkpoints, uploading step 6's")
    killed_at = max(e["step"] for e in events(tmp_path))
    state_uri = f"s3://{job['bucket']}/runs/jobs/{name}/state.json"
    parent_before = json.loads(storage.read_bytes(state_uri, job["options"]))["parent_run_id"]

    # Submitted again, and killed once its last checkpoint is committed in storage but not yet registered
    # by Ray: the third driver's workers resume at the last step and train nothing, so Ray's newest
    # registered checkpoint is an older one.
    kill_driver_at(args, tmp_path, f"after_commit:{STEPS}", "after_commit", "the driver to commit its last checkpoint")
    starts = [e["step"] for e in events(tmp_path) if e["event"] == "start"]
    # Uploads run in the background: the first driver trained to at most step 8, whose checkpoint waits
    # for step 6's. The resume is from the newest committed checkpoint: not step 0, nor step 6's folder,
    # which has no marker.
    assert 6 <= killed_at <= 8 and starts[-1] == 4, (killed_at, starts)

    again = finetune_subprocess([*args, "--stages", "data,train,export"], tmp_path)  # the later --stages wins
    output = again.communicate(timeout=600)[0]
    assert again.returncode == 0, output[-3000:]
    (line,) = [line for line in output.splitlines() if line.startswith("[train] ")]
    reported_steps = int(line.split()[1])
    checkpoint_uri = line.split(" -> ")[1].rsplit(" (", 1)[0]
    options = job["options"]
    run_uri = f"s3://{job['bucket']}/runs/ray/{name}"
    assert reported_steps == STEPS
    assert [e["step"] for e in events(tmp_path) if e["event"] == "start"][-1] == STEPS
    assert checkpoint_uri == commit.newest_committed_uri(run_uri, options)
    trained = storage.pull_checkpoint(checkpoint_uri, tmp_path / "cache", options)
    assert json.loads((trained / "trainer_state.json").read_text())["step"] == reported_steps

    exported = storage.pull_checkpoint(f"s3://{job['bucket']}/runs/exports/{name}", tmp_path / "cache", options)
    model = te_model.from_hf_checkpoint(exported, backend="torch", dtype=torch.float32)
    weights = load_file(trained / "model.safetensors")
    parameters = dict(model.named_parameters())
    assert set(parameters) == set(weights)
    for key, tensor in weights.items():
        assert torch.equal(parameters[key].detach(), tensor), key

    client = job["client"]
    (parent,) = parents(client, name)
    assert parent.info.run_id == parent_before == json.loads(storage.read_bytes(state_uri, options))["parent_run_id"]
    (train_run,) = train_runs(client, parent_before)  # the killed drivers' train run, carried on
    assert train_run.info.status == "FINISHED"
    for key in ("loss", "lr", "grad_norm"):
        steps = sorted(m.step for m in client.get_metric_history(train_run.info.run_id, key))
        assert steps == list(range(1, STEPS + 1)), (key, steps)  # one value per step across the three drivers


def test_a_stopped_driver_records_the_stop_in_one_line_and_the_same_command_carries_on(job, tmp_path):
    """Ctrl-C (Ray Train's graceful abort) and SIGTERM (`ray job stop`) each while a checkpoint upload is
    held: the driver exits with the shell's code for the signal and one line, the train run and the parent
    are KILLED, and the same command then resumes training in that train run."""
    name = "driver-stop"
    args = [*job["args"], "--set", f"run.name={name}"]
    client = job["client"]
    for sig, code, how, held in ((signal.SIGINT, 130, "Ctrl-C", 4), (signal.SIGTERM, 143, "SIGTERM", 8)):
        driver = finetune_subprocess(args, tmp_path, **{PAUSE_UPLOAD_ENV: f"after_commit:{held}"})
        try:
            wait_for(lambda: any(e["event"] == "after_commit" and e["step"] == held for e in events(tmp_path)),
                     f"step {held}'s checkpoint to be committed")
            driver.send_signal(sig)
            output = driver.communicate(timeout=120)[0]
        finally:
            driver.kill()
        assert driver.returncode == code, output[-3000:]
        assert "Traceback" not in "\n".join(driver_lines(output)), output[-3000:]
        lines = [line for line in output.splitlines() if line.startswith("finetune: ")]
        assert lines == [f"finetune: stopped by {how} during train; the same command resumes the job (training "
                         "from its newest committed checkpoint)"], output[-3000:]
        (parent,) = parents(client, name)
        (train_run,) = train_runs(client, parent.info.run_id)
        assert (parent.info.status, train_run.info.status) == ("KILLED", "KILLED")
        workers = {e["pid"] for rank in (0, 1) for e in events(tmp_path, rank)}
        wait_for(lambda: all(gone(pid) for pid in workers), "Ray to stop the stopped driver's workers", 60)

    again = finetune_subprocess(args, tmp_path)
    output = again.communicate(timeout=600)[0]
    assert again.returncode == 0, output[-3000:]
    assert [e["step"] for e in events(tmp_path) if e["event"] == "start"] == [0, 4, 8]
    (parent,) = parents(client, name)
    (train_run,) = train_runs(client, parent.info.run_id)  # the stopped drivers' train run, carried on
    assert (parent.info.status, train_run.info.status) == ("FINISHED", "FINISHED")
    steps = sorted(m.step for m in client.get_metric_history(train_run.info.run_id, "loss"))
    assert steps == list(range(1, STEPS + 1))  # one value per step across the three drivers


def test_a_new_run_name_starts_a_new_run_and_a_reused_name_keeps_its_data(job, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(STATE_DIR_ENV, str(tmp_path))
    args = [*job["args"], "--set", "run.name=driver-new", "--set", "train.max_steps=2"]
    assert finetune.main(args) == 0
    starts = [e["step"] for e in events(tmp_path) if e["event"] == "start"]
    assert starts == [0]  # not the other run's checkpoints
    (parent,) = parents(job["client"], "driver-new")
    assert parent.info.run_id not in {p.info.run_id for p in parents(job["client"], "driver-kill")}
    (train_run,) = train_runs(job["client"], parent.info.run_id)
    assert sorted(m.step for m in job["client"].get_metric_history(train_run.info.run_id, "loss")) == [1, 2]

    capsys.readouterr()
    assert finetune.main([*args, "--set", "data.seq_len=32"]) == 1
    error = capsys.readouterr().err.strip()
    assert error == ("finetune: error: run.name 'driver-new' is a job with data.seq_len=64 "
                     f"(s3://{job['bucket']}/runs/jobs/driver-new/state.json), not 32; "
                     "use a new run.name to start a new run")


def test_bad_input_on_a_worker_fails_the_job_once_in_one_line_and_the_fixed_job_survives_a_killed_worker(
        job, tmp_path, capsys, monkeypatch):
    from tests.integration.test_train_faults import Signaller, starts

    args = [*job["args"], "--set", "run.name=bad-input", "--set", "train.max_failures=3"]
    failed, fixed = tmp_path / "failed", tmp_path / "fixed"
    failed.mkdir(), fixed.mkdir()
    monkeypatch.setenv(STATE_DIR_ENV, str(failed))
    monkeypatch.setenv(BAD_INPUT_AT_STEP_ENV, "3")
    capsys.readouterr()
    assert finetune.main(args) == 1
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("finetune: error:")]
    assert line == ("finetune: error: train: training run 'bad-input' stopped on rank 0: "
                    f"{BAD_INPUT_AT_STEP_ENV}=3: bad input on purpose after step 3")
    assert [e["step"] for e in events(failed) if e["event"] == "bad_input"] == [3]  # raised once
    assert len(starts(failed, 0)) == 1  # trained once; Ray's one restart found the record and ended
    assert [e["event"] for e in events(failed, 1) if e["event"] != "step"] == ["start", "permanent_seen"]
    record = permanent.record_uri(f"s3://{job['bucket']}/runs/ray/bad-input")
    assert "bad input on purpose" in json.loads(storage.read_bytes(record, job["options"]))["reason"]

    monkeypatch.delenv(BAD_INPUT_AT_STEP_ENV)
    monkeypatch.setenv(STATE_DIR_ENV, str(fixed))
    killer = Signaller(fixed, [(1, 7)], signal.SIGKILL)
    killer.start()
    assert finetune.main(args) == 0  # not stopped by the failed attempt's record, and a killed worker retried
    killer.join(timeout=5)
    assert len(killer.sent) == 1
    assert len(starts(fixed, 1)) == 2  # the first try and one restart
    assert max(e["step"] for e in events(fixed) if e["event"] == "step") == STEPS
    assert not storage.exists(record, job["options"])  # the fixed job cleared the failed one's record
