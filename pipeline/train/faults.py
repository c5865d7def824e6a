"""Fault injection for the tests: named points the training loop calls, which do nothing in production.

The loop and the worker call a `FaultInjector` at fixed points: a worker started, a loss was computed, a
step finished, a checkpoint upload reached a phase. The base class does nothing there. `Hooks`, read from
the environment where training starts, can turn a loss NaN, raise after a step, record each step for a
test to find the process to kill, or hold an upload so a test can kill the driver right there. The
production code paths stay the same either way.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.errors import PermanentError, PipelineError

FAIL_AT_STEP_ENV = "PIPELINE_FAIL_AT_STEP"
BAD_INPUT_AT_STEP_ENV = "PIPELINE_BAD_INPUT_AT_STEP"
STATE_DIR_ENV = "PIPELINE_WORKER_STATE_DIR"
POISON_LOSS_ENV = "PIPELINE_POISON_LOSS"
PAUSE_UPLOAD_ENV = "PIPELINE_PAUSE_UPLOAD"
UPLOAD_PHASES = ("before_commit", "after_commit")
UPLOAD_PAUSE_S = 300.0  # long enough for a test to kill the driver; Ray then stops the worker


class FaultInjector:
    """The points where a test may inject a fault; here each one does nothing."""

    def worker_started(self, rank: int, step: int) -> None:
        """A worker resumed (or started) at `step`, before its first step."""

    def permanent_seen(self, rank: int) -> None:
        """A restarted worker found an earlier try's error no restart can fix, and stops."""

    def loss(self, loss: torch.Tensor, rank: int, step: int) -> torch.Tensor:
        """A micro-batch's loss of step `step`, straight after its forward pass: the loss to go on with."""
        return loss

    def step_finished(self, rank: int, step: int) -> None:
        """Step `step` is done; its checkpoint, if any, follows."""

    def after_step(self, rank: int, step: int) -> None:
        """Step `step` and its checkpoint are done; the next step has not started."""

    def upload_phase(self, phase: str, step: int) -> None:
        """Rank 0's upload of step `step`'s checkpoint reached `phase` (one of UPLOAD_PHASES)."""


NO_FAULTS = FaultInjector()  # production's injector


@dataclass(frozen=True)
class Hooks(FaultInjector):
    """Faults the tests ask for through the environment where training starts (`from_env`).

    - PIPELINE_FAIL_AT_STEP=N: rank 0 raises after step N.
    - PIPELINE_BAD_INPUT_AT_STEP=N: rank 0 raises an error no restart can fix after step N
      (`pipeline.train.permanent`).
    - PIPELINE_WORKER_STATE_DIR=dir: every worker appends its pid, and each step as it finishes (before
      that step's checkpoint), to dir/rank-R.jsonl, so a test can find the process to kill.
    - PIPELINE_POISON_LOSS=R:N: rank R's loss at step N becomes NaN, once per worker process.
    - PIPELINE_PAUSE_UPLOAD=PHASE:N: the upload of step N's checkpoint records PHASE (before_commit or
      after_commit) to the state dir, then waits, so a test can kill the driver right there.
    """

    fail_at_step: int | None = None  # rank 0 raises after this step
    bad_input_at_step: int | None = None  # rank 0 raises a PermanentError after this step
    state_dir: str | None = None  # where each rank's events go, one JSON line each
    poison_rank: int | None = None  # the rank whose loss turns NaN ...
    poison_step: int | None = None  # ... at this step, once per process
    pause_phase: str | None = None  # the upload phase to record and wait at ...
    pause_step: int | None = None  # ... in this step's checkpoint

    @classmethod
    def from_env(cls) -> Hooks:
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

    def worker_started(self, rank: int, step: int) -> None:
        self.record(rank, "start", step)

    def permanent_seen(self, rank: int) -> None:
        self.record(rank, "permanent_seen", 0)

    def loss(self, loss: torch.Tensor, rank: int, step: int) -> torch.Tensor:
        """`loss` turned NaN on the chosen rank and step, once per process."""
        global _poisoned
        if _poisoned or (rank, step) != (self.poison_rank, self.poison_step):
            return loss
        _poisoned = True
        return loss * float("nan")

    def step_finished(self, rank: int, step: int) -> None:
        self.record(rank, "step", step)

    def after_step(self, rank: int, step: int) -> None:
        if rank == 0 and self.fail_at_step == step:
            raise RuntimeError(f"{FAIL_AT_STEP_ENV}={step}: failing on purpose after step {step}")
        if rank == 0 and self.bad_input_at_step == step:
            self.record(rank, "bad_input", step)
            raise PermanentError(f"{BAD_INPUT_AT_STEP_ENV}={step}: bad input on purpose after step {step}")

    def upload_phase(self, phase: str, step: int) -> None:
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


_poisoned = False  # once per process: the step that is redone, or restarted, goes through


def _step_number(env: str) -> int | None:
    value = os.environ.get(env, "").strip()
    if not value:
        return None
    if not value.isdigit():
        raise PipelineError(f"{env} must be a step number, got {value!r}")
    return int(value)
