r"""Progress lines an operator can watch: one line per event, flushed, on stdout.

A stage's one-line summary comes at its end, so an hours-long training run would say nothing until it
is over. So training prints from rank 0 the same metrics MLflow gets, every `train.log_every` steps and
at least every `train.progress_every_s` seconds; the other stages print a line per phase. Lines start
with the stage in brackets (`[train] step 12/300 ...`), so `grep '^\S*\[train\]'` follows one stage.
`ray job logs --follow` shows them too. Other ranks get a `NullProgress`: no rank checks around prints.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator, Mapping


def echo(stage: str, text: str) -> None:
    """Write one progress line of `stage` now, flushed (a pipe to Ray's log would otherwise buffer it).

    Written to the stream, not with `print`: Ray Train patches `print` in its workers to send each line
    to its logger as well as to stdout, and the job's log would show every line twice.
    """
    write_line(f"[{stage}] {text}")


def write_line(line: str) -> None:
    """`line` and its newline in one write, flushed. `print` writes them apart, and on a driver Ray's log
    thread prints workers' lines to the same stdout: one could land between a line and its newline."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


@contextlib.contextmanager
def no_progress_bars() -> Iterator[None]:
    """transformers' tqdm bars (writing shards, loading weights) off inside the block and back as they were
    after it: in a job's log each bar is a line of carriage returns among the progress lines."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def duration(seconds: float) -> str:
    """1:02:03 / 4:05 style, for elapsed times and ETAs."""
    seconds = max(int(round(seconds)), 0)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def step_line(metrics: Mapping[str, float], max_steps: int, elapsed_s: float, eta_s: float | None) -> str:
    """`step 12/300 loss 2.3141 lr 1.9e-05 grad_norm 0.87 tokens/s 41,200 mfu 38.2% elapsed 4:01 eta 1:36:10`."""
    eta = duration(eta_s) if eta_s is not None else "?"
    # A checkpoint's step shows how long it blocked training; its upload gets a line of its own when committed.
    stall = f" checkpoint_stall {metrics['checkpoint_stall_s']:.2f}s" if "checkpoint_stall_s" in metrics else ""
    return (f"step {int(metrics['step'])}/{max_steps} loss {metrics['loss']:.4f} lr {metrics['lr']:.3g} "
            f"grad_norm {metrics['grad_norm']:.3g} tokens/s {tokens_per_s_text(metrics['tokens_per_s'])} "
            f"mfu {mfu_text(metrics['mfu'])}{stall} elapsed {duration(elapsed_s)} eta {eta}")


def tokens_per_s_text(value: float) -> str:
    """`41,200`."""
    return f"{value:,.0f}"


def mfu_text(value: float) -> str:
    """`38.2%`; `n/a` for 0, logged where the device's peak is unknown (CPU)."""
    return f"{100 * value:.1f}%" if value else "n/a"


class StepProgress:
    """Rank 0's training progress: `update(metrics)` after every step prints a line when one is due.

    A line is due every `every_steps` steps, when `every_s` seconds passed since the last line (slow
    steps still show life), and at the last step. The ETA is this attempt's mean step time (a resumed
    run counts from its resume) times the steps left.
    """

    def __init__(self, max_steps: int, every_steps: int, every_s: float, *, first_step: int = 0,
                 print_line: Callable[[str], None] | None = None, clock: Callable[[], float] = time.monotonic):
        self.max_steps, self.every_steps, self.every_s = max_steps, every_steps, every_s
        self.first_step = first_step
        self.print_line = print_line or (lambda text: echo("train", text))
        self.clock = clock
        self.started = self.last_line = clock()

    def update(self, metrics: Mapping[str, float]) -> bool:
        """Print a line for this step if one is due; True when it did."""
        now, step = self.clock(), int(metrics["step"])
        due = step % self.every_steps == 0 or step >= self.max_steps or now - self.last_line >= self.every_s
        if not due:
            return False
        elapsed, done = now - self.started, step - self.first_step
        eta = elapsed / done * (self.max_steps - step) if done > 0 else None
        self.print_line(step_line(metrics, self.max_steps, elapsed, eta))
        self.last_line = now
        return True


class NullProgress:
    """What ranks other than 0 get: the `StepProgress` interface, printing nothing."""

    def update(self, metrics: Mapping[str, float]) -> bool:
        return False


def step_progress(rank: int, max_steps: int, every_steps: int, every_s: float,
                  first_step: int = 0) -> StepProgress | NullProgress:
    return StepProgress(max_steps, every_steps, every_s, first_step=first_step) if rank == 0 else NullProgress()


def megabytes(size: int) -> str:
    return f"{size / 1e6:,.1f} MB"
