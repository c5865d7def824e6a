"""Step metrics reach MLflow exactly once, across restarts, and the committed checkpoints they wait for.

A restarted worker group re-does the steps after its checkpoint. Had rank 0 logged them as they ran,
MLflow would get those steps twice, with different values. So rank 0 holds each step's metrics until
Ray's controller has committed a checkpoint that covers them (`CommittedMetrics`). The same question
to the controller finds the checkpoint a rollback goes back to (`latest_committed_checkpoint`).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any

import ray.train

log = logging.getLogger(__name__)

TIME_KEY = "time_ms"  # when a step's metrics were taken; kept in the history, not logged as a metric
COMMIT_TIMEOUT_S = 600.0  # a checkpoint's commit not confirmed by then: its steps wait for a resume
COMMIT_POLL_S = 2.0  # longest single wait for the controller's answer


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
