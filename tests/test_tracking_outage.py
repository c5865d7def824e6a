"""The MLflow server goes down mid-run and comes back: training steps keep their pace, the metrics
logged meanwhile arrive once the server is back (exactly one value per step), and a logger whose queue
is too small for the outage reports what it lost, with a count, in a warning.

A dedicated `mlflow server` (same port, same SQLite store) is stopped for OUTAGE_S and started again.
The "training" is a loop of steps at a steady rate on a thread of its own, logging to two runs: one
through a queue large enough for the outage, one through a queue of SMALL_QUEUE steps.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import threading
import time

import pytest
from mlflow import MlflowClient

from pipeline.metrics import AsyncMetricLogger
from tests.mlflow_server import RestartableMlflowServer

STEP_S = 0.02  # one "training step": a sleep, so any slowdown comes from logging
OUTAGE_S = 10.0
SMALL_QUEUE = 30


class SteadyTraining(threading.Thread):
    """Steps at a steady rate, each logging to every logger; records (start time, step duration)."""

    def __init__(self, loggers: list[AsyncMetricLogger]) -> None:
        super().__init__(daemon=True)
        self.loggers, self.steps, self.done = loggers, [], threading.Event()

    def run(self) -> None:
        step = 0
        while not self.done.is_set():
            start = time.monotonic()
            time.sleep(STEP_S)
            for logger in self.loggers:
                logger.log(step, {"loss": 1.0 / (step + 1), "lr": 1e-3})
            self.steps.append((start, time.monotonic() - start))
            step += 1

    def durations(self, since: float, until: float) -> list[float]:
        return [d for t, d in self.steps if since <= t < until]


@pytest.fixture
def server(tmp_path):
    server = RestartableMlflowServer(tmp_path)
    server.start()
    yield server
    server.stop()


def test_metrics_logged_while_mlflow_is_down_arrive_once_it_is_back(server, monkeypatch, caplog):
    # The logger's own requeue-and-backoff is under test; MLflow's per-request retries (minutes of backoff
    # by default, on the logger's thread) would only delay the delivery this test waits for.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    client = MlflowClient(tracking_uri=server.uri)
    experiment = client.create_experiment("outage")
    full, small = (client.create_run(experiment).info.run_id for _ in range(2))
    loggers = [AsyncMetricLogger(full, server.uri, flush_every_s=0.2),
               AsyncMetricLogger(small, server.uri, flush_every_s=0.2, max_pending_steps=SMALL_QUEUE)]
    training = SteadyTraining(loggers)
    with caplog.at_level(logging.WARNING, logger="pipeline.tracking"):
        training.start()
        time.sleep(3.0)
        down = time.monotonic()
        server.stop()
        time.sleep(OUTAGE_S)
        up = time.monotonic()
        server.start()
        deadline = time.monotonic() + 60
        while loggers[0].pending and time.monotonic() < deadline:
            time.sleep(0.2)  # training goes on while the queue drains
        training.done.set()
        training.join()
        assert all(logger.close(timeout=30) for logger in loggers)

    before, outage = training.durations(0, down), training.durations(down, up)
    # Steps are sleeps, so only a blocking log() could slow them; 25% covers scheduling noise on a busy
    # 2-core machine (the drain thread and the stopped server's exit compete for the same cores).
    assert statistics.mean(outage) <= 1.25 * statistics.mean(before), (statistics.mean(before), statistics.mean(outage))
    assert sorted(outage)[int(0.99 * len(outage))] < STEP_S + 0.02
    total = len(training.steps)
    assert len(outage) > SMALL_QUEUE * 5  # the outage really outlasted the small queue

    history = [m.step for m in client.get_metric_history(full, "loss")]
    assert sorted(history) == list(range(total))  # exactly one value per step, none lost
    assert loggers[0].dropped == 0 and loggers[0].failures >= 1 and loggers[0].sent == total

    kept = [m.step for m in client.get_metric_history(small, "loss")]
    assert len(set(kept)) == len(kept) and loggers[1].dropped == total - len(kept) > 0
    sent_before_outage = len(training.durations(0, down - 1.0))  # flushed every 0.2 s while the server was up
    assert set(range(sent_before_outage)) <= set(kept)  # only steps queued in the outage were lost
    assert f"{loggers[1].dropped} steps of metrics were lost for run {small}" in caplog.text
    assert "still does not take them; dropping the oldest" in caplog.text


# ---------------------------------------------------------------------------------------------------
# the same outage during a real training run: 2 Ray Train workers, rank 0 logging to the stopped server
# ---------------------------------------------------------------------------------------------------
# Seconds the server stays down while the model trains (it comes back earlier if training reaches 80% of
# its steps first, so steps are also logged after it is back); the recorded run in docs/reliability.md
# sets 60 s and 6000 steps.
TRAIN_OUTAGE_S = float(os.environ.get("PIPELINE_TEST_MLFLOW_OUTAGE_S", "10"))
TRAIN_STEPS = int(os.environ.get("PIPELINE_TEST_MLFLOW_OUTAGE_STEPS", "400"))


@pytest.mark.slow
def test_a_training_run_goes_on_through_an_mlflow_outage(ray_cluster, server, tmp_path, monkeypatch):
    from pipeline import tiny
    from pipeline.config import Config
    from pipeline.data import prepare
    from pipeline.faults import STATE_DIR_ENV
    from pipeline.train import train
    from tests.test_train import SHIPPED_TEXT

    base = tiny.make_tiny_checkpoint(tmp_path / "base")
    steps = TRAIN_STEPS
    monkeypatch.setenv(STATE_DIR_ENV, str(tmp_path))  # rank 0 appends each finished step there
    cfg = Config.from_dict({
        "run": {"name": "outage", "output_uri": str(tmp_path / "runs"), "cache_dir": str(tmp_path / "node")},
        "model": {"base_uri": str(base), "backend": "torch", "dtype": "fp32"},
        "data": {"train_files": [SHIPPED_TEXT], "seq_len": 64, "max_documents": 80},
        "train": {"workers": 2, "micro_batch_size": 2, "lr": 1e-3, "warmup_steps": 2, "max_steps": steps,
                  "checkpoint_every": 50, "log_every": 1},
    })
    prepared = prepare(cfg, str(base))
    client = MlflowClient(tracking_uri=server.uri)
    run_id = client.create_run(client.create_experiment("train-outage")).info.run_id
    window = {}

    def step() -> int:
        lines = (tmp_path / "rank-0.jsonl").read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0

    def outage() -> None:
        while not client.get_metric_history(run_id, "loss"):  # training is logging: take the server away
            time.sleep(0.5)
        window["down"] = time.time()
        server.stop()
        back_at = time.monotonic() + TRAIN_OUTAGE_S
        while time.monotonic() < back_at and step() < 0.8 * steps:
            time.sleep(0.2)
        window["up"] = time.time()
        server.start()

    thread = threading.Thread(target=outage, daemon=True)
    thread.start()
    result = train(cfg, prepared, run_id=run_id, tracking_uri=server.uri)
    thread.join(timeout=120)
    assert {"down", "up"} <= set(window), "the run ended before the outage did"

    def rates(since: float, until: float) -> list[float]:
        return [m["tokens_per_s"] for m in result.metrics if since * 1e3 <= m["time_ms"] < until * 1e3]

    before, during, after = (rates(0, window["down"]), rates(window["down"], window["up"]),
                             rates(window["up"], float("inf")))
    print(f"\nMLflow down {window['up'] - window['down']:.0f} s: {len(before)} steps before, {len(during)} "
          f"during, {len(after)} after; median tokens/s {statistics.median(before):.0f} before, "
          f"{statistics.median(during):.0f} during")
    assert result.steps == steps and len(during) >= 10 and after
    # never stalled: the steps during the outage ran at the pace of those before (CPU noise allowed)
    assert statistics.median(during) >= 0.7 * statistics.median(before)
    deadline = time.monotonic() + 120
    while len(client.get_metric_history(run_id, "loss")) < steps and time.monotonic() < deadline:
        time.sleep(1.0)  # the worker's logger sent what it could by close; MLflow may still be writing
    logged = sorted(m.step for m in client.get_metric_history(run_id, "loss"))
    assert logged == list(range(1, steps + 1))  # every step exactly once, the outage's steps included
