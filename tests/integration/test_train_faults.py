"""Worker faults on a real local Ray cluster: 2 CPU workers (gloo), checkpoints in moto S3, metrics to MLflow.

An uninterrupted run is the reference (fp32 on CPU is deterministic); it also shows that training goes on
while a checkpoint uploads. Then: workers are SIGKILLed three times in one run, once while a checkpoint's
weights are still on the wire; a worker gets SIGTERM; one rank's loss turns NaN. Kills are real signals to
the worker processes, which the test finds through the pid files of the PIPELINE_WORKER_STATE_DIR hook.
Last, the hand-over of held metrics alone, with the controller's answers played by the test.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow import MlflowClient

from pipeline.train import commit
from pipeline.train import permanent
from pipeline import demo, storage, tracking
from pipeline.config import Config
from pipeline.stages.data import prepare
from pipeline.errors import PermanentError, PipelineError
from pipeline.train.faults import POISON_LOSS_ENV, STATE_DIR_ENV
from pipeline.train.launch import train
from tests.fixtures.s3_fault_proxy import S3FaultProxy

STEPS = 12
SHIPPED_TEXT = str(Path(__file__).resolve().parents[2] / "data" / "tiny_text.jsonl")
MLFLOW_KEYS = ("loss", "lr", "grad_norm", "tokens_per_s", "nonfinite_steps")


@pytest.fixture(scope="module")
def setup(s3_server, tmp_path_factory):
    """(config factory, prepared data): base checkpoint in S3, data prepared there."""
    bucket = s3_server.create_bucket(f"faults-{uuid.uuid4().hex[:12]}")
    options = storage.StorageOptions(endpoint_url=s3_server.endpoint_url)
    base = demo.make_tiny_checkpoint(tmp_path_factory.mktemp("base") / "tiny-llama")
    storage.publish(base, f"s3://{bucket}/base/tiny-llama", options)
    cache_dir = tmp_path_factory.mktemp("node-cache")

    def cfg_for(name: str, **train) -> Config:
        return Config.from_dict({
            "run": {"name": name, "seed": 0, "output_uri": f"s3://{bucket}/runs", "cache_dir": str(cache_dir)},
            "storage": {"endpoint_url": s3_server.endpoint_url},
            "model": {"base_uri": f"s3://{bucket}/base/tiny-llama", "backend": "torch", "dtype": "fp32"},
            "data": {"train_files": [SHIPPED_TEXT], "seq_len": 64, "max_documents": 80, "val_fraction": 0.1},
            "train": {"workers": 2, "use_gpu": False, "micro_batch_size": 2, "lr": 3e-3, "warmup_steps": 3,
                      "max_steps": STEPS, "checkpoint_every": 2, "keep_checkpoints": 2, "log_every": 1, **train},
        })

    return cfg_for, prepare(cfg_for("data"), str(base))


@pytest.fixture(scope="module")
def reference_run(ray_cluster, setup, s3_server, tmp_path_factory):
    """The uninterrupted run every fault run is compared to, with step 2's commit marker held on the wire
    until rank 0 has finished step 4: (result, times the hold was hit, rank 0's steps and commits in order)."""
    cfg_for, prepared = setup
    state_dir = tmp_path_factory.mktemp("reference-events")
    proxy = S3FaultProxy(s3_server.endpoint_url)
    release = threading.Event()
    held = proxy.hold("PUT", r"/checkpoint_000002-[^/]+/COMMITTED$", release)
    try:
        with pytest.MonkeyPatch.context() as env:
            env.setenv(STATE_DIR_ENV, str(state_dir))
            releaser = release_when(state_dir, 0, 4, lambda pid: release.set())
            result = train(through_proxy(cfg_for("reference"), proxy), prepared)
            releaser.join(timeout=5)
    finally:
        proxy.close()
    return SimpleNamespace(result=result, held_hits=held.hits, events=order(state_dir))


@pytest.fixture(scope="module")
def reference(reference_run):
    return reference_run.result


def tracked_train(cfg: Config, prepared, mlflow_uri: str):
    """train() under a stage run of a fresh parent; (result, stage run id)."""
    parent = tracking.find_or_start_parent("train-faults", cfg.run.name, tracking_uri=mlflow_uri)
    with tracking.stage_run(parent, "train", tracking_uri=mlflow_uri) as run_id:
        return train(cfg, prepared, run_id=run_id, tracking_uri=mlflow_uri), run_id


def assert_one_value_per_step(mlflow_uri: str, run_id: str, result) -> None:
    client = MlflowClient(tracking_uri=mlflow_uri)
    for key in MLFLOW_KEYS:
        steps = sorted(m.step for m in client.get_metric_history(run_id, key))
        assert steps == list(range(1, STEPS + 1)), (key, steps)
    logged = {m.step: m.value for m in client.get_metric_history(run_id, "loss")}
    assert logged == pytest.approx({m["step"]: m["loss"] for m in result.metrics})


def worker_events(state_dir: Path, rank: int) -> list[dict]:
    path = state_dir / f"rank-{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


class Signaller(threading.Thread):
    """Sends `sig` to rank r's worker process once it has finished step s, for each (r, s) in `plan`;
    every signal goes to a worker process that has not had one yet."""

    def __init__(self, state_dir: Path, plan: list[tuple[int, int]], sig: int, timeout_s: float = 240.0) -> None:
        super().__init__(daemon=True)
        self.state_dir, self.plan, self.sig, self.timeout_s = state_dir, plan, sig, timeout_s
        self.sent: list[dict] = []  # {"rank", "pid", "step"} of every signal sent

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        signalled = set()
        for rank, at_step in self.plan:
            while time.monotonic() < deadline:
                fresh = [e for e in worker_events(self.state_dir, rank)
                         if e["event"] == "step" and e["step"] >= at_step and e["pid"] not in signalled]
                if fresh:
                    os.kill(fresh[-1]["pid"], self.sig)
                    signalled.add(fresh[-1]["pid"])
                    self.sent.append({"rank": rank, "pid": fresh[-1]["pid"], "step": fresh[-1]["step"]})
                    break
                time.sleep(0.02)


def starts(state_dir: Path, rank: int) -> list[tuple[int, int]]:
    """(pid, step it started from) of every attempt of `rank`, oldest first."""
    return [(e["pid"], e["step"]) for e in worker_events(state_dir, rank) if e["event"] == "start"]


def last_step(state_dir: Path, rank: int, pid: int) -> int:
    return max(e["step"] for e in worker_events(state_dir, rank) if e["pid"] == pid and e["event"] == "step")


@pytest.mark.slow
def test_workers_sigkilled_three_times_once_mid_upload_resume_exactly_and_log_each_step_once(
        reference, setup, mlflow_server, s3_fault_proxy, monkeypatch, tmp_path):
    cfg_for, prepared = setup
    monkeypatch.setenv(STATE_DIR_ENV, str(tmp_path))
    # First, rank 0 dies past step 5 while step 4's weights are held on the wire: step 4 never commits.
    release = threading.Event()
    held = s3_fault_proxy.hold("PUT", r"/checkpoint_000004-[^/]+/model\.safetensors$", release)
    mid_upload: list[int] = []

    def kill(pid: int | None) -> None:
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            mid_upload.append(pid)
        release.set()

    first = release_when(tmp_path, 0, 5, kill, timeout_s=300.0, also=lambda: held.hits == 1)
    # Then rank 1 and rank 0 again, in the processes that resumed: no first-attempt process reaches step 7.
    killer = Signaller(tmp_path, [(1, 7), (0, 10)], signal.SIGKILL, timeout_s=300.0)
    killer.start()
    cfg = through_proxy(cfg_for("sigkill", max_failures=3), s3_fault_proxy)
    result, run_id = tracked_train(cfg, prepared, mlflow_server.uri)
    first.join(timeout=5)
    killer.join(timeout=5)
    assert len(mid_upload) == 1, (held.hits, order(tmp_path))
    assert [k["rank"] for k in killer.sent] == [1, 0], killer.sent
    for rank in (0, 1):
        attempts = starts(tmp_path, rank)
        assert len(attempts) == 4, attempts  # the first attempt and three restarts
        resumed = [step for _, step in attempts[1:]]
        # Each from the newest checkpoint Ray had committed (checkpoint_every=2): step 2 after the first
        # kill, since step 4's checkpoint was never committed.
        assert resumed[0] == 2 and all(step % 2 == 0 for step in resumed) and resumed == sorted(resumed), resumed
    assert starts(tmp_path, 0)[0] == (mid_upload[0], 0)
    assert ("committed", 4) not in [(e["event"], e["step"]) for e in worker_events(tmp_path, 0)
                                    if e["pid"] == mid_upload[0]]
    assert result.steps == STEPS
    assert [m["loss"] for m in result.metrics] == [m["loss"] for m in reference.metrics]  # exactly
    assert [m["grad_norm"] for m in result.metrics] == [m["grad_norm"] for m in reference.metrics]
    assert_one_value_per_step(mlflow_server.uri, run_id, result)
    # The weights of step 4's first checkpoint reached storage; its commit marker never did.
    options = storage.StorageOptions(endpoint_url=cfg_for("x").storage.endpoint_url)
    run_uri = f"{cfg.run.output_uri}/ray/{cfg.run.name}"
    partial = [n for n in commit.checkpoint_names(run_uri, options) if n.startswith("checkpoint_000004-")]
    assert any(not _committed(storage.join(run_uri, n), options) for n in partial), partial


@pytest.mark.slow
def test_sigterm_checkpoints_that_step_and_the_restart_loses_none(reference, setup, s3_fault_proxy, monkeypatch,
                                                                   tmp_path):
    cfg_for, prepared = setup
    monkeypatch.setenv(STATE_DIR_ENV, str(tmp_path))
    terminator = Signaller(tmp_path, [(1, 3)], signal.SIGTERM)
    terminator.start()
    # checkpoint_every=0: the only checkpoint before the end is the one SIGTERM asked for. Its commit
    # marker is held back 4 s on the wire: rank 1, signalled, has no files to upload, and must not fail
    # (ending the group) before rank 0 has committed the checkpoint.
    late_commit = s3_fault_proxy.stall("PUT", r"/checkpoint_\d+-[^/]+/COMMITTED$", times=1, seconds=4)
    raw = cfg_for("sigterm", checkpoint_every=0, max_failures=1).to_dict()
    raw["storage"]["endpoint_url"] = s3_fault_proxy.url
    result = train(Config.from_dict(raw), prepared)
    terminator.join(timeout=5)
    assert len(terminator.sent) == 1 and late_commit.hits == 1
    for rank in (0, 1):
        (first_pid, first_start), (_, restart) = starts(tmp_path, rank)
        assert first_start == 0
        assert restart == last_step(tmp_path, rank, first_pid) >= 3  # every finished step kept
    assert result.steps == STEPS and result.resumed_from_step == restart
    assert [m["loss"] for m in result.metrics] == [m["loss"] for m in reference.metrics]


def through_proxy(cfg: Config, proxy) -> Config:
    raw = cfg.to_dict()
    raw["storage"]["endpoint_url"] = proxy.url
    return Config.from_dict(raw)


def release_when(state_dir: Path, rank: int, step: int, then, timeout_s: float = 120.0,
                 also=lambda: True) -> threading.Thread:
    """A thread that calls `then(pid)` once rank `rank` has finished `step` and `also()` holds (or at the
    timeout, with None)."""
    def run() -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            done = [e for e in worker_events(state_dir, rank) if e["event"] == "step" and e["step"] >= step]
            if done and also():
                return then(done[-1]["pid"])
            time.sleep(0.02)
        then(None)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def order(state_dir: Path) -> list[tuple[str, int]]:
    """Rank 0's steps and checkpoint commits, in the order they happened."""
    return [(e["event"], e["step"]) for e in worker_events(state_dir, 0) if e["event"] in ("step", "committed")]


def test_training_goes_on_while_a_checkpoint_uploads_and_waits_for_it_at_the_next(reference_run):
    # The reference run held step 2's commit marker on the wire until rank 0 had finished step 4: were
    # training blocked by the upload, step 4 would never come and the marker would go through only at the
    # hold's limit.
    result, events = reference_run.result, reference_run.events
    assert reference_run.held_hits == 1
    assert events.index(("step", 4)) < events.index(("committed", 2)) < events.index(("step", 5))  # one in flight
    assert [step for event, step in events if event == "committed"] == list(range(2, STEPS + 1, 2))
    assert events[-1] == ("committed", STEPS)  # the final checkpoint committed before train() returned
    assert result.checkpoint_uri.rstrip("/").split("/")[-1].startswith(f"checkpoint_{STEPS:06d}-")
    assert [c["step"] for c in result.checkpoints] == list(range(2, STEPS + 1, 2))
    assert all(c["upload_s"] is not None and c["stall_s"] >= 0 and c["size_bytes"] > 0 for c in result.checkpoints)
    by_step = {m["step"]: m for m in result.metrics}
    assert all("checkpoint_stall_s" in by_step[s] for s in range(2, STEPS + 1, 2))
    # A checkpoint's upload time reaches the history of the checkpoints after it.
    assert all("checkpoint_upload_s" in by_step[s] for s in range(2, STEPS, 2))


def _committed(uri: str, options) -> bool:
    try:
        commit.verify_commit(uri, options)
        return True
    except PipelineError:
        return False


POISON_STEP = 6  # after the step-4 checkpoint (checkpoint_every=4)


@pytest.mark.parametrize("policy", ["skip", "rollback"])
def test_nonfinite_loss_on_one_rank_is_skipped_or_rolled_back(
        policy, reference, setup, mlflow_server, monkeypatch):
    cfg_for, prepared = setup
    monkeypatch.setenv(POISON_LOSS_ENV, f"1:{POISON_STEP}")
    cfg = cfg_for(f"nonfinite-{policy}", on_nonfinite=policy, checkpoint_every=4)
    result, run_id = tracked_train(cfg, prepared, mlflow_server.uri)
    assert result.steps == STEPS and result.metrics[-1]["nonfinite_steps"] == 1
    losses, expected = [m["loss"] for m in result.metrics], [m["loss"] for m in reference.metrics]
    same_until = POISON_STEP - 1 if policy == "skip" else 4  # rollback: back to the step-4 checkpoint
    assert losses[:same_until] == expected[:same_until]
    assert losses[same_until] != expected[same_until]  # the data after the non-finite step, not the same batch
    assert_one_value_per_step(mlflow_server.uri, run_id, result)


def test_nonfinite_loss_stops_the_run_naming_step_and_rank(ray_cluster, setup, monkeypatch):
    cfg_for, prepared = setup
    monkeypatch.setenv(POISON_LOSS_ENV, "1:3")
    with pytest.raises(PipelineError) as caught:
        train(cfg_for("nonfinite-stop", on_nonfinite="stop"), prepared)
    message = str(caught.value)
    assert "stopped: non-finite loss on rank 1 at step 3 (train.on_nonfinite=stop)" in message
    assert "\n" not in message


def test_bad_input_met_on_the_workers_stops_the_run_at_once_and_is_recorded(ray_cluster, setup, monkeypatch, tmp_path):
    cfg_for, prepared = setup
    monkeypatch.setenv(STATE_DIR_ENV, str(tmp_path))
    # Past the driver (train() alone runs no preflight): every rank's shard is empty, on every try alike.
    with pytest.raises(PermanentError) as caught:
        train(cfg_for("bad-input", micro_batch_size=1000, max_failures=3), prepared)
    message = str(caught.value)
    assert message.startswith("training run 'bad-input' stopped on rank ")
    assert "fewer than train.workers x train.micro_batch_size = 2000" in message
    assert "resume" not in message and "\n" not in message
    # The first try failed building the workers; Ray's one restart read the record and ended at once.
    for rank in (0, 1):
        assert [e["event"] for e in worker_events(tmp_path, rank)] == ["permanent_seen"], rank
    record_uri = permanent.record_uri(f"{cfg_for('bad-input').run.output_uri}/ray/bad-input")
    options = storage.StorageOptions(endpoint_url=cfg_for("x").storage.endpoint_url)
    assert "fewer than train.workers" in json.loads(storage.read_bytes(record_uri, options))["reason"]
    # That a fixed rerun clears the record and trains: test_job_faults, through the job's entry point.


def test_only_errors_no_restart_can_fix_are_permanent_and_a_record_stops_only_its_own_attempt(tmp_path):
    from te_model import CheckpointError

    assert permanent.is_permanent(PermanentError("x")) and permanent.is_permanent(CheckpointError("x"))
    assert permanent.is_permanent(PermissionError(13, "Permission denied", "/ro"))
    for transient in (PipelineError("cannot read s3://b/k: ConnectTimeoutError"), RuntimeError("gloo"),
                      ConnectionError("reset"), OSError("disk")):
        assert not permanent.is_permanent(transient), transient
    options = storage.StorageOptions()
    run_uri = str(tmp_path / "ray" / "run")
    earlier, now = permanent.new_attempt(), permanent.new_attempt()
    permanent.write(run_uri, earlier, 1, PermanentError("model.base_uri: tensor 'x' has shape (2,)"), options)
    assert permanent.read(run_uri, earlier, options) == "rank 1: model.base_uri: tensor 'x' has shape (2,)"
    assert permanent.read(run_uri, now, options) is None  # a later attempt is not stopped by it
    permanent.clear(run_uri, options)
    assert permanent.read(run_uri, earlier, options) is None and not list((tmp_path / "ray" / "run").iterdir())


# ---------------------------------------------------------------------------------------------------
# the hand-over of held metrics, with the controller's answer played by a test
# ---------------------------------------------------------------------------------------------------
class RecordingLogger:
    run_id = "run"

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.closed = False

    def log(self, step: int, metrics: dict, timestamp_ms: int | None = None) -> None:
        self.steps.append(step)

    def close(self, timeout: float = 10.0) -> bool:
        self.closed = True
        return True


def reported(step: int) -> SimpleNamespace:
    """A checkpoint as Ray's controller lists it (ReportedCheckpoint): the checkpoint and its metrics."""
    return SimpleNamespace(checkpoint=f"checkpoint_{step:06d}", metrics={"step": step})


def controller_commits(monkeypatch, step_of) -> None:
    """The controller's answer, played by the test: one committed checkpoint at step `step_of()`."""
    from pipeline.train import exactly_once  # where the controller is asked

    monkeypatch.setattr(exactly_once, "_committed_checkpoints", lambda: [reported(step_of())])


def _wait_for(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def test_held_steps_are_logged_only_once_a_commit_covers_them_in_order_and_never_twice(monkeypatch):
    from pipeline.train.exactly_once import CommittedMetrics

    committed = {"step": -1}
    logger = RecordingLogger()
    controller_commits(monkeypatch, lambda: committed["step"])
    metrics = CommittedMetrics(logger)
    for step in range(1, 11):
        metrics.hold({"step": step, "loss": 1.0})
        if step % 5 == 0:
            metrics.checkpoint_reported()  # checkpoints at steps 5 and 10
    time.sleep(0.3)
    assert logger.steps == []  # nothing committed yet: nothing logged
    committed["step"] = 5
    assert _wait_for(lambda: logger.steps == [1, 2, 3, 4, 5])
    committed["step"] = 10  # one answer may cover several checkpoints, and skip notifications in between
    assert _wait_for(lambda: logger.steps == list(range(1, 11)))
    metrics.hold({"step": 11, "loss": 1.0})
    metrics.discard_held()  # a rollback re-does step 11: it is never logged
    assert metrics.close(timeout=2.0) and logger.closed
    assert logger.steps == list(range(1, 11)) and metrics.unconfirmed == 0


def test_steps_of_a_checkpoint_never_confirmed_are_counted_and_warned_about_at_close(monkeypatch, caplog):
    from pipeline.train.exactly_once import CommittedMetrics

    logger = RecordingLogger()
    controller_commits(monkeypatch, lambda: 3)
    metrics = CommittedMetrics(logger)
    for step in range(1, 7):
        metrics.hold({"step": step, "loss": 1.0})
        if step % 3 == 0:
            metrics.checkpoint_reported()
    assert _wait_for(lambda: logger.steps == [1, 2, 3])
    assert not metrics.close(timeout=1.0)
    assert logger.steps == [1, 2, 3] and metrics.unconfirmed == 3 and logger.closed
    assert "metrics of steps 4-6 not logged" in caplog.text


def test_a_rollback_waits_for_the_commit_of_the_newest_checkpoint_it_reported(monkeypatch):
    from pipeline.train import exactly_once  # where the controller is asked

    answers = iter([[reported(2)], [reported(2)], [reported(2), reported(4)]])  # the controller catches up
    monkeypatch.setattr(exactly_once, "_committed_checkpoints", lambda: next(answers))
    monkeypatch.setattr(exactly_once, "COMMIT_POLL_S", 0.01)
    assert exactly_once.latest_committed_checkpoint(4) == "checkpoint_000004"
    monkeypatch.setattr(exactly_once, "_committed_checkpoints", lambda: [])
    assert exactly_once.latest_committed_checkpoint(0) is None  # nothing reported yet: nothing to wait for
