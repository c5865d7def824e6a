"""The train stage, driver side: Ray Train's TorchTrainer runs `train.workers` training workers.

`train` resolves what workers need into a `WorkerSpec`, points Ray at the run's storage, starts the
workers (`pipeline.train.worker`), and turns how they ended into a `TrainResult` or an error. The
result is read from storage: the newest committed checkpoint, which may be newer than Ray's own. A
run with checkpoints resumes. What this stage decides, in full: docs/architecture.md ("The train
stage").
"""

from __future__ import annotations

import functools
import math
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pyarrow.fs
import ray.train
import ray.train.torch

from pipeline import storage
from pipeline.config import Config, require_max_steps
from pipeline.errors import Interrupted, PermanentError, PipelineError
from pipeline.job.resolved import ResolvedJob, absolute_path, resolve_job
from pipeline.stages.data import PreparedData
from pipeline.train import checkpoint as ckpt
from pipeline.train import commit, faults, permanent
from pipeline.train.worker import WorkerSpec, train_loop_per_worker


@dataclass
class TrainResult:
    """What a finished training run left behind."""

    checkpoint_uri: str  # the final checkpoint (layout: pipeline.train.checkpoint)
    steps: int  # optimizer steps done, across resumes
    final_loss: float
    metrics: list[dict[str, float]]  # every logged step, oldest first, across resumes
    ray_result_path: str  # uri of Ray's run folder, {run.output_uri}/ray/{run.name}
    resumed_from_step: int  # step the last attempt started from; 0 = from the base checkpoint
    checkpoints: list[dict[str, float]] = field(default_factory=list)
    # the last attempt's checkpoints, oldest first: step, stall_s (training blocked), waited_s (the part
    # of it spent waiting for the previous upload), upload_s (background write, upload and commit), size_bytes



def train(job: ResolvedJob | Config, prepared: PreparedData, *, run_id: str | None = None,
          tracking_uri: str | None = None, code_version: dict | None = None) -> TrainResult:
    """Fine-tune `model.base_uri` on `prepared.train_uri` with Ray Train; a run with checkpoints resumes.

    Needs a running Ray (`ray.init` or a cluster address). `job`: the job resolved at its start (a plain
    Config is resolved here); training runs with `job.train_config`. `run_id`/`tracking_uri`: the MLflow
    run that receives per-step metrics from rank 0; None logs nothing to MLflow.
    """
    require_max_steps(job if isinstance(job, Config) else job.config)  # before anything starts
    job = resolve_job(job) if isinstance(job, Config) else job
    cfg, options = job.train_config, job.storage
    ray_uri = job.folders.ray_uri
    storage_path, storage_fs = _ray_storage(ray_uri, options)
    run_uri, attempt = storage.join(ray_uri, cfg.run.name), permanent.new_attempt()
    permanent.clear(run_uri, options)  # an earlier attempt's reason to stop does not stop this one
    spec = WorkerSpec(config=cfg, options=options, train_uri=absolute_path(prepared.train_uri), run_uri=run_uri,
                      attempt=attempt, code_version=code_version, run_id=run_id, tracking_uri=tracking_uri,
                      run_started_ms=_run_started_ms(run_id, tracking_uri), faults=faults.Hooks.from_env())
    trainer = ray.train.torch.TorchTrainer(
        functools.partial(train_loop_per_worker, spec),
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.train.workers, use_gpu=cfg.train.use_gpu),
        run_config=ray.train.RunConfig(
            name=cfg.run.name, storage_path=storage_path, storage_filesystem=storage_fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
        ),
    )
    try:
        with _stops_as_interrupted():
            result = trainer.fit()
    except ray.train.TrainingFailedError as exc:
        reason = permanent.read(run_uri, attempt, options)
        if reason:  # Ray ran out of restarts (or had none) before a restarted group could read the record
            raise PermanentError(f"training run {cfg.run.name!r} stopped on {reason}") from exc
        raise PipelineError(f"training run {cfg.run.name!r} failed ({_failure_summary(exc)}); run it again with "
                            "the same run.name and run.output_uri to resume from its latest checkpoint") from exc
    reason = (result.return_value or {}).get("permanent")
    if reason:
        raise PermanentError(f"training run {cfg.run.name!r} stopped on {reason}")
    stopped = (result.return_value or {}).get("stopped")
    if stopped:
        raise PipelineError(f"training run {cfg.run.name!r} stopped: {stopped}; lower train.lr or check the data, "
                            "or set train.on_nonfinite=skip or rollback")
    return train_result(cfg, ray_uri, options, checkpoints=(result.return_value or {}).get("checkpoints", []))


@contextmanager
def _stops_as_interrupted() -> Iterator[None]:
    """Ray Train's `fit` answers Ctrl-C by aborting the run (its workers stopped), then exits the driver
    from inside `ray.get` with a SystemExit; a SIGTERM's SystemExit (raised here) comes out of `ray.get`
    the same way. Either becomes `Interrupted` naming the signal, so the job can record the stop and say
    how to resume. `fit` leaves its Ctrl-C handler installed, which would abort a run that has ended: the
    driver's own handlers come back (those Python can set again: a handler set outside Python reads None)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers belong to the main thread; elsewhere Ray installs none either
        return
    sigterm = []
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def on_sigterm(signum, frame):
        sigterm.append(signum)
        raise SystemExit(128 + signum)

    if previous[signal.SIGTERM] is not signal.SIG_IGN:
        signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    except SystemExit:
        raise Interrupted("SIGTERM" if sigterm else "Ctrl-C") from None
    finally:
        for sig, handler in previous.items():
            if handler is not None:
                signal.signal(sig, handler)


def train_result(cfg: Config, ray_uri: str, options: storage.StorageOptions,
                 checkpoints: list[dict[str, float]] | None = None) -> TrainResult:
    """What training reached: the newest committed checkpoint in storage, not the one Ray registered.

    A driver killed mid-run leaves workers that may commit later checkpoints Ray never registers. The
    next run's workers resume from the newest of them (`commit.resume_checkpoint`). So the
    result must be that one too, or eval and export would use older weights than the step reported."""
    checkpoint_uri = commit.newest_committed_uri(storage.join(ray_uri, cfg.run.name), options)
    if checkpoint_uri is None:
        raise PipelineError(f"training run {cfg.run.name!r} finished without a committed checkpoint under "
                            f"{storage.join(ray_uri, cfg.run.name)}")
    state_uri = storage.join(checkpoint_uri, ckpt.TRAINER_STATE_FILE)
    state = ckpt.parse_trainer_state(storage.read_bytes(state_uri, options), state_uri)
    metrics = state["metrics"]
    return TrainResult(checkpoint_uri=checkpoint_uri, steps=state["step"],
                       final_loss=metrics[-1]["loss"] if metrics else math.nan, metrics=metrics,
                       ray_result_path=storage.join(ray_uri, cfg.run.name),
                       resumed_from_step=state["resumed_from_step"], checkpoints=checkpoints or [])


def _run_started_ms(run_id: str | None, tracking_uri: str | None) -> int | None:
    """Steps of a resumed history logged after this is when they went to this same MLflow run."""
    if run_id is None:
        return None
    from pipeline import tracking  # imports mlflow: the driver only

    return tracking.run_start_ms(run_id, tracking_uri=tracking_uri)


def _ray_storage(ray_uri: str, options: storage.StorageOptions) -> tuple[str, pyarrow.fs.FileSystem | None]:
    """Ray's (storage_path, storage_filesystem): a plain path locally, s3fs wrapped for pyarrow for S3."""
    fs, path = storage.filesystem(ray_uri, options)
    if "file" in fs.protocol:
        return path, None
    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))  # path without the s3:// scheme


def _failure_summary(exc: Exception) -> str:
    failures = getattr(exc, "worker_failures", None) or {}
    error, where = (failures[min(failures)], f"rank {min(failures)}: ") if failures else (exc, "")
    lines = [line for line in str(error).splitlines() if line.strip()]
    return where + (lines[-1].strip()[:300] if lines else type(error).__name__)
