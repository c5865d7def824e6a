"""SIGTERM during training: a flag the step's agreement reads, not an exit.

A preempted node gets SIGTERM some seconds before it goes. Exiting at once would lose the steps since the
last checkpoint. So while training, SIGTERM only sets a flag. Each step's all-reduce tells every rank
which ranks saw it (`pipeline.train.agreement`); they all checkpoint that step, then fail together, and
Ray restarts them from it. Outside training, SIGTERM goes to the handler it replaced, so Ray can still
stop its worker.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import ray

from pipeline.errors import PipelineError

_sigterm = threading.Event()
_training = threading.Event()
_replaced_handler: Any = None


def watch() -> None:
    """From now on until `unwatch`, SIGTERM to this process only sets the flag `requested` reads.

    Ray runs the training loop on a thread of the worker actor, and Python runs signal handlers on the
    main thread only. So the handler is installed by a call to the worker actor itself, whose methods
    run on the main thread.
    """
    _sigterm.clear()
    if threading.current_thread() is threading.main_thread():
        _install_handler()
    else:  # Ray's worker actor: its own methods run on the main thread (RayTrainWorker.execute)
        actor = ray.get_runtime_context().current_actor
        ray.get(actor.execute.remote(_install_handler))
    _training.set()


def unwatch() -> None:
    _training.clear()


def requested() -> bool:
    """Whether this process got SIGTERM since `watch`."""
    return _sigterm.is_set()


def preempted_error(ranks: tuple[int, ...], step: int) -> PipelineError:
    """What every rank raises once the checkpoint of `step`, the step that saw SIGTERM on `ranks`, is committed."""
    return PipelineError(f"preempted: SIGTERM on rank {','.join(str(r) for r in ranks)}; checkpoint of step "
                         f"{step} written, the restart goes on from it")


def _on_sigterm(signum: int, frame: Any) -> None:
    if _training.is_set():
        _sigterm.set()
        return
    if callable(_replaced_handler):
        _replaced_handler(signum, frame)
    else:
        raise SystemExit(128 + signum)


def _install_handler() -> None:
    """Runs on the worker's main thread; installs once per process."""
    global _replaced_handler
    if signal.getsignal(signal.SIGTERM) is not _on_sigterm:
        _replaced_handler = signal.signal(signal.SIGTERM, _on_sigterm)
