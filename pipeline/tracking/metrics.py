"""Per-step training metrics to MLflow, off the training thread.

A training step logs loss, learning rate and throughput, and must never wait on the tracking server,
nor fail because it is slow or down. So per-step metrics go through a bounded queue drained by a
daemon thread (`AsyncMetricLogger`). Summary metrics, params and tags are few and go synchronously
through `pipeline.tracking`. Only rank 0 of a tracked run logs; others get a `NullLogger`.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pipeline.storage.redact import error_line, fit_key, tracking_uri_label

if TYPE_CHECKING:
    from mlflow.entities import Metric

# Warnings of the whole MLflow layer share one logger, so one setting shows or silences all of them.
log = logging.getLogger("pipeline.tracking")

CLOSE_RETRY_S = 1.0  # while closing, failed sends are retried this often until the close deadline


class AsyncMetricLogger:
    """Per-step metrics to one run through a bounded queue and a daemon thread; `log` never blocks.

    The thread sends what is queued every `flush_every_s` (sooner once `batch_steps` steps wait) with
    `MlflowClient.log_batch`. A failed send is counted and warned about once per outage; its steps go
    back to the queue and are retried with backoff. When the queue is full the oldest step is dropped.

    - HTTP retries are MLflow's (MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_TIMEOUT); unsent
      steps stay queued on top of them.
    - Steps the server rejects (4xx other than 429) are dropped, not resent: the same data cannot
      succeed.
    - Closing waits a bounded time, retrying failed sends every second until then. Steps not sent by
      then count as dropped.
    - Losses are never silent: a warning when the queue first overflows, and one with the count of dropped
      steps at close.
    - A request that timed out may still have reached the server. Resent, it does no harm (MLflow's SQL
      store keeps one copy of a metric logged twice with the same step, time and value); dropped from a full
      queue, its steps count as dropped though they arrived, so `dropped` bounds the steps lost from above.
    """

    def __init__(self, run_id: str, tracking_uri: str | None = None, *, max_pending_steps: int = 10_000,
                 flush_every_s: float = 1.0, batch_steps: int = 100) -> None:
        self.run_id = run_id
        self.dropped = 0  # steps given up on: queue overflow, rejected by the server, or unsent at close
        self.failures = 0  # failed log_batch calls
        self.sent = 0  # steps the server accepted
        import mlflow

        self._uri = tracking_uri or mlflow.get_tracking_uri()
        self._client = mlflow.MlflowClient(tracking_uri=self._uri, registry_uri=self._uri)
        self._max_pending, self._flush_every_s, self._batch_steps = max_pending_steps, flush_every_s, batch_steps
        self._pending: collections.deque[tuple[int, int, dict[str, float]]] = collections.deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = False
        self._abandoned = False  # close() gave up on a request still in flight
        self._in_flight = 0  # steps in the request being sent
        self._in_outage = False
        self._give_up_at = float("inf")
        self._warned_overflow = False
        self._thread = threading.Thread(target=self._drain_forever, name="mlflow-metrics", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        """Steps not yet accepted by the server: queued, or in the request being sent."""
        with self._lock:
            return len(self._pending) + self._in_flight

    def log(self, step: int, metrics: Mapping[str, Any], timestamp_ms: int | None = None) -> None:
        """Queue one step's metrics. Pass Python numbers: a CUDA tensor would sync the GPU in `float()`.

        `timestamp_ms` (default: now) lets a step be sent again unchanged: MLflow's database stores an
        identical (key, value, step, timestamp) once.
        """
        stamp = int(time.time() * 1000) if timestamp_ms is None else int(timestamp_ms)
        entry = (step, stamp, {key: float(value) for key, value in metrics.items()})
        with self._lock:
            if self._closing:
                self.dropped += 1
                return
            overflow = len(self._pending) >= self._max_pending
            if overflow:
                self._pending.popleft()
                self.dropped += 1
            self._pending.append(entry)
            full = len(self._pending) >= self._batch_steps and not self._in_outage  # no hammering a down server
        if full:
            self._wake.set()
        if overflow and not self._warned_overflow:
            self._warned_overflow = True  # once per logger: the count comes with close()
            log.warning("MLflow: %d steps of metrics queued for %s and it still does not take them; dropping "
                        "the oldest from now on, training goes on", self._max_pending, tracking_uri_label(self._uri))

    def close(self, timeout: float = 10.0) -> bool:
        """Send what is queued, waiting at most `timeout` seconds; True when every step was sent.

        Steps not sent by then count as dropped; a request still hanging then is abandoned to the daemon
        thread (its steps count as dropped too, though they may still arrive).
        """
        with self._lock:
            self._closing = True
            self._give_up_at = time.monotonic() + timeout
        self._wake.set()
        self._thread.join(timeout)
        with self._lock:
            self._abandoned = self._thread.is_alive()
            lost = len(self._pending) + (self._in_flight if self._abandoned else 0)
            self.dropped += lost
            self._pending.clear()
        if self.dropped:
            log.warning("MLflow: %d steps of metrics were dropped for run %s (queue overflow during an outage, "
                        "rejected, or unsent at close; a request that timed out may have arrived all the same); "
                        "%d steps confirmed", self.dropped, self.run_id, self.sent)
        return lost == 0

    def __enter__(self) -> "AsyncMetricLogger":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _drain_forever(self) -> None:
        backoff = 0.0
        while True:
            self._wake.wait(self._wait_s(backoff))
            self._wake.clear()
            if time.monotonic() >= self._give_up_at:
                return
            sent_all = self._send_pending()
            if sent_all and self._closing and not self._pending:
                return
            backoff = 0.0 if sent_all else min(max(2 * backoff, 1.0), 30.0)

    def _wait_s(self, backoff: float) -> float:
        if not self._closing:
            return backoff or self._flush_every_s
        # Closing is the last chance: retry every CLOSE_RETRY_S until the deadline, whatever backoff an
        # outage built up, or a server back a second after the last failure would get nothing.
        return min(backoff, CLOSE_RETRY_S, max(self._give_up_at - time.monotonic(), 0.0))

    def _send_pending(self) -> bool:
        """Send queued steps batch by batch; False at the first failure."""
        while batch := self._take_batch():
            try:
                self._client.log_batch(self.run_id, metrics=_metric_entities(batch), synchronous=True)
            except Exception as exc:  # noqa: BLE001 - tracking outages must not reach training
                self._on_failure(batch, exc)
                return False
            with self._lock:
                self._in_flight = 0
                self.sent += 0 if self._abandoned else len(batch)
            if self._in_outage:
                log.warning("MLflow: metric logging to %s works again", tracking_uri_label(self._uri))
                self._in_outage = False
        return True

    def _take_batch(self) -> list[tuple[int, int, dict[str, float]]]:
        """The oldest queued steps, up to MLflow's metrics-per-request limit; none past the deadline."""
        from mlflow.utils.validation import MAX_METRICS_PER_BATCH

        batch: list[tuple[int, int, dict[str, float]]] = []
        count = 0
        with self._lock:
            if time.monotonic() >= self._give_up_at:
                return batch
            while self._pending and (not batch or count + len(self._pending[0][2]) <= MAX_METRICS_PER_BATCH):
                batch.append(self._pending.popleft())
                count += len(batch[-1][2])
            self._in_flight = len(batch)
        return batch

    def _on_failure(self, batch: list[tuple[int, int, dict[str, float]]], exc: Exception) -> None:
        """Count the failure; requeue the steps unless the server rejected them or time is up."""
        from mlflow.exceptions import MlflowException

        self.failures += 1
        status = exc.get_http_status_code() if isinstance(exc, MlflowException) else 500
        rejected = 400 <= status < 500 and status != 429  # resending the same data cannot help
        with self._lock:
            self._in_flight = 0
            if self._abandoned:
                return  # close() already counted these steps
            if rejected or time.monotonic() >= self._give_up_at:
                self.dropped += len(batch)
            else:
                self._pending.extendleft(reversed(batch))
                while len(self._pending) > self._max_pending:
                    self._pending.popleft()
                    self.dropped += 1
        if rejected or not self._in_outage:
            log.warning("MLflow: metric logging to %s failed (%s); training goes on, %d steps queued",
                        tracking_uri_label(self._uri), error_line(exc), self.pending)
        self._in_outage = not rejected


def _metric_entities(batch: list[tuple[int, int, dict[str, float]]]) -> list[Metric]:
    from mlflow.entities import Metric

    return [Metric(fit_key(k), value, stamp, step) for step, stamp, metrics in batch for k, value in metrics.items()]


class NullLogger:
    """What ranks other than 0 get: the AsyncMetricLogger interface, doing nothing."""

    def __init__(self) -> None:
        self.run_id: str | None = None
        self.dropped = 0
        self.failures = 0
        self.sent = 0

    @property
    def pending(self) -> int:
        return 0

    def log(self, step: int, metrics: Mapping[str, Any], timestamp_ms: int | None = None) -> None:
        pass

    def close(self, timeout: float = 10.0) -> bool:
        return True

    def __enter__(self) -> "NullLogger":
        return self

    def __exit__(self, *exc_info: object) -> None:
        pass


# In a training worker the logger's own requeue-and-backoff (at most 30 s apart) rides out an outage.
# MLflow's per-request defaults (7 retries with exponential backoff, a 120 s timeout) would instead keep one
# request asleep for minutes after the server is back; a worker logs nothing else through MLflow.
WORKER_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


def metric_logger(rank: int, run_id: str | None, tracking_uri: str | None = None) -> AsyncMetricLogger | NullLogger:
    """An AsyncMetricLogger on rank 0 of a tracked run, a NullLogger everywhere else.

    Meant for training workers: it sets `WORKER_HTTP_DEFAULTS` in this process, unless the environment
    already sets them. MLflow is imported only once an AsyncMetricLogger is made: the import is slow,
    and every other training worker would pay for it at each (re)start.
    """
    if rank != 0 or not run_id:
        return NullLogger()
    for key, value in WORKER_HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    return AsyncMetricLogger(run_id, tracking_uri)
