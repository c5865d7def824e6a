"""What a training worker does about faults: preemption notices, non-finite steps, metrics logged once.

What this module decides:
- Dead or failed workers are Ray Train's to handle: it restarts the whole worker group up to
  `train.max_failures` times, each time from the latest checkpoint its controller committed. An error no
  restart can fix stops the run instead (`pipeline.train.permanent`).
- SIGTERM (a preemption notice) only raises a flag. Ray runs the training loop on a thread of the worker
  actor, and Python takes signal handlers on the main thread alone, so the handler is installed by a call
  to the worker actor itself (its methods run on the main thread). Outside training the handler passes
  SIGTERM on to the one it replaced, so Ray can still stop its worker.
- All ranks decide together, with one small all-reduce per step (`agreement_flags`): the mean loss, the
  gradient norm, which ranks saw a non-finite loss or gradient norm, and which ranks got SIGTERM. The
  flags stay on the device: the optimizer skips a non-finite step's update there (`found_nonfinite`),
  and the host reads a copy (`HostFlags`, `read_agreement`) once it has queued the next step's passes
  (`pipeline.train.launch.Steps`). A checkpoint is a collective, so a SIGTERM on any rank makes every rank
  checkpoint that step, wait until rank 0 has uploaded and committed it, and then fail together (Ray
  restarts them).
- Metrics are logged once: rank 0 holds each step's metrics until a checkpoint that covers them is
  committed by Ray's controller (`get_all_reported_checkpoints(COMMITTED)`, asked on a thread so
  training goes on), then hands them to the MLflow logger. Steps whose commit is still unconfirmed
  when training ends are counted and warned about, never dropped silently. Steps re-done after a
  restart were never handed over. Steps handed over but still queued when the worker died are in that
  checkpoint's history with their timestamps: a resumed worker sends again the history's steps taken
  since its MLflow run started (older ones went to an earlier run of the job), and MLflow's database
  stores an identical (key, value, step, timestamp) only once.
- Test-only hooks, read from the environment where training starts: PIPELINE_FAIL_AT_STEP=N (rank 0
  raises after step N), PIPELINE_BAD_INPUT_AT_STEP=N (rank 0 raises an error no restart can fix after
  step N, `pipeline.train.permanent`), PIPELINE_WORKER_STATE_DIR=dir (every worker appends its pid and each step as it
  finishes, before that step's checkpoint, to dir/rank-R.jsonl, so a test can find the process to
  kill), PIPELINE_POISON_LOSS=R:N (rank R's loss at step N becomes NaN, once per worker process),
  PIPELINE_PAUSE_UPLOAD=PHASE:N (the upload of step N's checkpoint records PHASE, before_commit or
  after_commit, to the state dir and then waits, so a test can kill the driver right there); with a
  state dir, every checkpoint's commit is recorded as "committed".
"""

from __future__ import annotations

import collections
import json
import logging
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
import torch.distributed as dist

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

FAIL_AT_STEP_ENV = "PIPELINE_FAIL_AT_STEP"
BAD_INPUT_AT_STEP_ENV = "PIPELINE_BAD_INPUT_AT_STEP"
STATE_DIR_ENV = "PIPELINE_WORKER_STATE_DIR"
POISON_LOSS_ENV = "PIPELINE_POISON_LOSS"
PAUSE_UPLOAD_ENV = "PIPELINE_PAUSE_UPLOAD"
UPLOAD_PHASES = ("before_commit", "after_commit")
UPLOAD_PAUSE_S = 300.0  # long enough for a test to kill the driver; Ray then stops the worker
TIME_KEY = "time_ms"  # when a step's metrics were taken; kept in the history, not logged as a metric
COMMIT_TIMEOUT_S = 600.0  # a checkpoint's commit not confirmed by then: its steps wait for a resume
COMMIT_POLL_S = 2.0  # longest single wait for the controller's answer


# ---------------------------------------------------------------------------------------------------
# SIGTERM: a flag the training loop reads once per step
# ---------------------------------------------------------------------------------------------------
_sigterm = threading.Event()
_training = threading.Event()
_replaced_handler: Any = None


def _on_sigterm(signum: int, frame: Any) -> None:
    if _training.is_set():
        _sigterm.set()
        return
    if callable(_replaced_handler):
        _replaced_handler(signum, frame)
    else:
        raise SystemExit(128 + signum)


def _install_sigterm_handler() -> None:
    """Runs on the worker's main thread; installs once per process."""
    global _replaced_handler
    if signal.getsignal(signal.SIGTERM) is not _on_sigterm:
        _replaced_handler = signal.signal(signal.SIGTERM, _on_sigterm)


def watch_sigterm() -> None:
    """From now on until `unwatch_sigterm`, SIGTERM to this process only sets the flag `agreement_flags` reads.

    Ray runs the training loop on a thread of the worker actor, and Python runs signal handlers on the
    main thread only. So the handler is installed by a call to the worker actor itself, whose methods
    run on the main thread. Outside training the handler passes SIGTERM on to the one it replaced, so Ray
    can still stop its worker.
    """
    _sigterm.clear()
    if threading.current_thread() is threading.main_thread():
        _install_sigterm_handler()
    else:  # Ray's worker actor: its own methods run on the main thread (RayTrainWorker.execute)
        actor = ray.get_runtime_context().current_actor
        ray.get(actor.execute.remote(_install_sigterm_handler))
    _training.set()


def unwatch_sigterm() -> None:
    _training.clear()


# ---------------------------------------------------------------------------------------------------
# one all-reduce per step: loss, gradient norm, non-finite ranks, SIGTERM ranks
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepAgreement:
    """What every rank knows after the step's all-reduce; identical on all ranks."""

    loss: float  # mean over ranks of each rank's mean token loss
    grad_norm: float  # before clipping
    nonfinite_loss_ranks: tuple[int, ...]
    nonfinite_grad_ranks: tuple[int, ...]
    sigterm_ranks: tuple[int, ...]

    @property
    def nonfinite(self) -> bool:
        return bool(self.nonfinite_loss_ranks or self.nonfinite_grad_ranks)

    def describe(self, step: int) -> str:
        if self.nonfinite_loss_ranks:
            return f"non-finite loss on rank {_ranks(self.nonfinite_loss_ranks)} at step {step}"
        return f"non-finite gradient norm on rank {_ranks(self.nonfinite_grad_ranks)} at step {step}"


def _ranks(ranks: tuple[int, ...]) -> str:
    return ",".join(str(r) for r in ranks)


def agreement_flags(loss: torch.Tensor, grad_norm: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This step's flags, summed over ranks by an all-reduce the host does not wait for.

    Layout: [loss, gradient norm, then per rank: 1 non-finite loss + 2 non-finite gradient norm, then
    per rank: SIGTERM]. Built from device values on the device, so nothing here reads the step's results
    on the host. The optimizer skips a non-finite step's update on the device (`found_nonfinite`). A
    checkpoint is a collective, so a SIGTERM on any rank makes every rank checkpoint that step, wait for
    rank 0 to commit it, and then fail together; Ray restarts them.
    """
    flags = torch.zeros(2 + 2 * world, dtype=torch.float32, device=loss.device)
    flags[0] = loss
    flags[1] = grad_norm
    flags[2 + rank] = (~torch.isfinite(loss)).float() + 2.0 * (~torch.isfinite(grad_norm)).float()
    # fill_, not `=`: assigning a Python number copies it from the host, which waits for the device
    flags[2 + world + rank].fill_(float(_sigterm.is_set()))
    if world > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.SUM)  # gloo has no AVG
    return flags


def found_nonfinite(flags: torch.Tensor, world: int) -> torch.Tensor:
    """1.0 on the device when any rank's loss or gradient norm was non-finite, else 0.0: what a fused
    optimizer takes as `found_inf` to skip its update without the host reading anything."""
    return (flags[2 : 2 + world] != 0).any().float()


class HostFlags:
    """A step's flags on their way to the host.

    On a GPU they are copied into pinned memory as soon as they are made, and an event marks the copy.
    So reading them waits for the step up to its flags alone, not for what was queued after them (the
    update, the next step's passes). Elsewhere they are the flags.
    """

    def __init__(self, flags: torch.Tensor):
        self.ready = None
        self.values = flags
        if flags.device.type == "cuda":
            self.values = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
            self.values.copy_(flags, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record()

    def tolist(self) -> list[float]:
        if self.ready is not None:
            self.ready.synchronize()
        return self.values.tolist()


def read_agreement(flags: HostFlags, world: int) -> StepAgreement:
    """The flags on the host: here the host waits for the step that made them, up to its flags."""
    values = flags.tolist()
    codes = [int(c) for c in values[2 : 2 + world]]
    return StepAgreement(
        loss=values[0] / world,
        grad_norm=values[1] / world,  # every rank computed the same norm
        nonfinite_loss_ranks=tuple(r for r, c in enumerate(codes) if c & 1),
        nonfinite_grad_ranks=tuple(r for r, c in enumerate(codes) if c & 2),
        sigterm_ranks=tuple(r for r, c in enumerate(values[2 + world :]) if c),
    )


def latest_committed_checkpoint(reported_step: int) -> ray.train.Checkpoint | None:
    """The newest checkpoint of this run that Ray committed, the same on every rank: within a run,
    `ray.train.get_checkpoint()` learns of new checkpoints only on rank 0, the one that reports them.

    `reported_step` is the step of the newest checkpoint this rank reported (or resumed from; 0: none):
    the controller is asked until it has committed that one, at most COMMIT_TIMEOUT_S.
    """
    deadline = time.monotonic() + COMMIT_TIMEOUT_S
    while True:
        newest = max(_committed_checkpoints(), key=_checkpoint_step, default=None)
        if reported_step <= (_checkpoint_step(newest) if newest else 0) or time.monotonic() > deadline:
            return newest.checkpoint if newest else None
        time.sleep(COMMIT_POLL_S / 4)


def _committed_checkpoints() -> list:
    """The checkpoints Ray's controller has committed (ReportedCheckpoint), after waiting at most
    COMMIT_POLL_S for it to take the reports made so far. Asked again rather than waited on at length:
    its wait ends only on an exact report count, which a notification arriving late can step past."""
    return ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED,
                                                  timeout_s=COMMIT_POLL_S)


def _checkpoint_step(reported) -> int:
    return int(reported.metrics.get("step", -1))


def preempted_error(agreed: StepAgreement, step: int) -> PipelineError:
    return PipelineError(f"preempted: SIGTERM on rank {_ranks(agreed.sigterm_ranks)}; checkpoint of step {step} "
                         "written, the restart goes on from it")


def nonfinite_count(history: list[dict[str, float]]) -> int:
    """Non-finite steps so far, as the last logged step recorded them."""
    return int(history[-1].get("nonfinite_steps", 0)) if history else 0


# ---------------------------------------------------------------------------------------------------
# metrics reach MLflow once a checkpoint covering them is committed
# ---------------------------------------------------------------------------------------------------
class CommittedMetrics:
    """Rank 0's step metrics, held until a checkpoint that covers them is committed, then logged.

    `logger` is a `pipeline.tracking.metrics` logger; with a NullLogger (other ranks, untracked runs) nothing is
    held and Ray is never asked. One thread hands steps over: it asks the controller for the highest
    committed checkpoint step (`_committed_step`), a few seconds at a time, and logs every held step a
    committed checkpoint covers, in order. Asking again and comparing steps, rather than one long wait
    per checkpoint, means a late or missed notification costs seconds, not the steps.

    Steps whose commit is still unconfirmed when training ends are counted and warned about, never
    dropped silently. Steps re-done after a restart were never handed over. Steps handed over but still
    queued when the worker died are in that checkpoint's history, with their timestamps. A resumed worker
    sends again the history's steps taken since its MLflow run started. MLflow's database stores an
    identical (key, value, step, timestamp) only once.
    """

    def __init__(self, logger: Any) -> None:
        self.logger = logger
        self.active = logger.run_id is not None
        self.unconfirmed = 0  # steps never handed over: their checkpoint's commit was not confirmed in time
        self._held: list[dict[str, float]] = []
        self._reported: collections.deque[tuple[float, list[dict[str, float]]]] = collections.deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = False
        self._thread: threading.Thread | None = None

    def resend(self, history: list[dict[str, float]], since_ms: int | None) -> None:
        """Send again the steps of a resumed checkpoint's history taken since `since_ms` (when this MLflow
        run started; None sends none): they went to this run, and MLflow stores an identical step once."""
        for entry in history if self.active and since_ms is not None else []:
            if entry.get(TIME_KEY, 0) >= since_ms:
                self._log(entry)

    def hold(self, metrics: dict[str, float]) -> None:
        if self.active:
            self._held.append(metrics)

    def discard_held(self) -> None:
        """Forget steps after the last checkpoint: a rollback re-does them."""
        self._held = []

    def checkpoint_reported(self) -> None:
        """Call after `ray.train.report` with a checkpoint returned: hand over what it covers once committed."""
        if not self._held:
            return
        with self._lock:
            self._reported.append((time.monotonic(), self._held))
        self._held = []
        if self._thread is None:
            self._thread = threading.Thread(target=self._hand_over_forever, daemon=True, name="metrics-handover")
            self._thread.start()
        self._wake.set()

    def close(self, timeout: float) -> bool:
        """Hand over what the committed checkpoints cover, then close the logger, each within `timeout`.

        Steps whose checkpoint is still unconfirmed then are counted in `unconfirmed` and warned about; a
        resume sends them from the checkpoint's history.
        """
        with self._lock:
            self._closing = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._lock:
            left = [entry for _, held in self._reported for entry in held]
            self._reported.clear()
        if left:
            self.unconfirmed += len(left)
            log.warning("metrics of steps %d-%d not logged: the commit of their checkpoint was not confirmed "
                        "by the end of training; a resume of this run sends them", left[0]["step"], left[-1]["step"])
        return self.logger.close(timeout=timeout) and not left

    def _hand_over_forever(self) -> None:
        while True:
            with self._lock:
                idle = not self._reported
                if idle and self._closing:
                    return
                if idle:
                    self._wake.clear()
            if idle:
                self._wake.wait()
                continue
            committed = _committed_step()
            ready: list[dict[str, float]] = []
            with self._lock:
                while self._reported and self._reported[0][1][-1]["step"] <= committed:
                    ready.extend(self._reported.popleft()[1])
                expired = self._reported and time.monotonic() - self._reported[0][0] > COMMIT_TIMEOUT_S
                given_up = self._reported.popleft()[1] if expired else []
            for entry in ready:
                self._log(entry)
            if given_up:
                self.unconfirmed += len(given_up)
                log.warning("metrics of steps %d-%d wait for a resume: checkpoint commit not confirmed in %.0f s",
                            given_up[0]["step"], given_up[-1]["step"], COMMIT_TIMEOUT_S)
            if not ready and not given_up:
                time.sleep(COMMIT_POLL_S / 4)  # the controller answered without our checkpoint: ask again soon

    def _log(self, entry: dict[str, float]) -> None:
        fields = {k: v for k, v in entry.items() if k not in ("step", TIME_KEY)}
        self.logger.log(int(entry["step"]), fields, timestamp_ms=entry.get(TIME_KEY))


def _committed_step() -> int:
    """The highest step among the checkpoints Ray's controller has committed; -1 when it cannot say.

    Waits at most COMMIT_POLL_S for the controller to take the reports made so far.
    """
    try:
        reported = _committed_checkpoints()
    except Exception as exc:  # noqa: BLE001 - asked again; past COMMIT_TIMEOUT_S the steps wait for a resume
        log.debug("committed checkpoints not known yet (%s)", type(exc).__name__)
        return -1
    return max((_checkpoint_step(r) for r in reported), default=-1)


# ---------------------------------------------------------------------------------------------------
# test-only hooks
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Hooks:
    """Test-only fault injection, read from the environment where training starts.

    - PIPELINE_FAIL_AT_STEP=N: rank 0 raises after step N.
    - PIPELINE_BAD_INPUT_AT_STEP=N: rank 0 raises an error no restart can fix after step N
      (`pipeline.train.permanent`).
    - PIPELINE_WORKER_STATE_DIR=dir: every worker appends its pid, and each step as it finishes (before
      that step's checkpoint), to dir/rank-R.jsonl, so a test can find the process to kill.
    - PIPELINE_POISON_LOSS=R:N: rank R's loss at step N becomes NaN, once per worker process.
    - PIPELINE_PAUSE_UPLOAD=PHASE:N: the upload of step N's checkpoint records PHASE (before_commit or
      after_commit) to the state dir, then waits, so a test can kill the driver right there.
    """

    fail_at_step: int | None = None
    bad_input_at_step: int | None = None
    state_dir: str | None = None
    poison_rank: int | None = None
    poison_step: int | None = None
    pause_phase: str | None = None
    pause_step: int | None = None

    @classmethod
    def from_env(cls) -> "Hooks":
        poison = os.environ.get(POISON_LOSS_ENV, "").strip()
        rank, _, step = poison.partition(":")
        if poison and not (rank.isdigit() and step.isdigit()):
            raise PipelineError(f"{POISON_LOSS_ENV} must look like RANK:STEP, got {poison!r}")
        pause = os.environ.get(PAUSE_UPLOAD_ENV, "").strip()
        phase, _, pause_step = pause.partition(":")
        if pause and not (phase in UPLOAD_PHASES and pause_step.isdigit()):
            raise PipelineError(f"{PAUSE_UPLOAD_ENV} must look like PHASE:STEP with PHASE one of "
                                f"{', '.join(UPLOAD_PHASES)}, got {pause!r}")
        state_dir = os.environ.get(STATE_DIR_ENV, "").strip() or None
        return cls(fail_at_step=_step_number(FAIL_AT_STEP_ENV), bad_input_at_step=_step_number(BAD_INPUT_AT_STEP_ENV),
                   state_dir=state_dir,
                   poison_rank=int(rank) if poison else None, poison_step=int(step) if poison else None,
                   pause_phase=phase if pause else None, pause_step=int(pause_step) if pause else None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def poisoned(self, loss: torch.Tensor, rank: int, step: int) -> torch.Tensor:
        """`loss` turned NaN on the chosen rank and step, once per process."""
        global _poisoned
        if _poisoned or (rank, step) != (self.poison_rank, self.poison_step):
            return loss
        _poisoned = True
        return loss * float("nan")

    def pause_upload(self, phase: str, step: int) -> None:
        """At the chosen phase of step `step`'s checkpoint upload: record it (rank 0's file), then wait.
        Every commit is recorded too ("committed"), so a test can order it among the steps."""
        if phase == "after_commit":
            self.record(0, "committed", step)
        if (phase, step) == (self.pause_phase, self.pause_step):
            self.record(0, phase, step)
            time.sleep(UPLOAD_PAUSE_S)

    def record(self, rank: int, event: str, step: int) -> None:
        """Append {pid, event, step} to state_dir/rank-R.jsonl."""
        if self.state_dir:
            line = json.dumps({"pid": os.getpid(), "event": event, "step": step})
            with open(Path(self.state_dir) / f"rank-{rank}.jsonl", "a") as out:
                out.write(line + "\n")


_poisoned = False


def _step_number(env: str) -> int | None:
    value = os.environ.get(env, "").strip()
    if not value:
        return None
    if not value.isdigit():
        raise PipelineError(f"{env} must be a step number, got {value!r}")
    return int(value)
