"""The MLflow server hangs mid-run and comes back: training steps never wait on it, the metrics logged
meanwhile arrive once the server is back (exactly one value per step), and a logger whose queue is too
small for the outage reports what it lost, with a count, in a warning.

A dedicated `mlflow server` behind a relay: the relay cuts its connections and then takes new ones and
never answers them, for a fixed number of steps, then forwards again. Every request sent meanwhile waits
for its timeout, so a `log()` that touched the network on the training thread would
stall the steps for good; the tests bound nothing but the whole outage, by a deadline far beyond any
machine's load. The "training" is a loop of steps on a thread of its own, logging to two runs: one
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

from pipeline.tracking.metrics import AsyncMetricLogger
from tests.fixtures.mlflow_server import HangingMlflowServer

STEP_S = 0.02  # one "training step": a sleep
OUTAGE_STEPS = 250  # steps taken while the server hangs
SMALL_QUEUE = 30
STALL_DEADLINE_S = 120.0  # a stalled log() would need OUTAGE_STEPS request timeouts to get through


class SteadyTraining(threading.Thread):
    """Steps at a steady rate, each logging to every logger; `steps` counts the steps whose log() returned."""

    def __init__(self, loggers: list[AsyncMetricLogger]) -> None:
        super().__init__(daemon=True)
        self.loggers, self.steps, self.done = loggers, 0, threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            time.sleep(STEP_S)
            for logger in self.loggers:
                logger.log(self.steps, {"loss": 1.0 / (self.steps + 1), "lr": 1e-3})
            self.steps += 1


def wait_for(condition, what: str, timeout: float = STALL_DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} not within {timeout:.0f} s"
        time.sleep(0.05)


@pytest.fixture
def server(tmp_path):
    server = HangingMlflowServer(tmp_path)
    server.start()
    yield server
    server.stop()


def test_metrics_logged_while_mlflow_hangs_arrive_once_it_is_back(server, monkeypatch, caplog):
    # The logger's own requeue-and-backoff is under test; MLflow's per-request retries (minutes of backoff
    # by default, on the logger's thread) would only delay the delivery this test waits for.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    client = MlflowClient(tracking_uri=server.uri)
    experiment = client.create_experiment("outage")
    full, small = (client.create_run(experiment).info.run_id for _ in range(2))
    loggers = [AsyncMetricLogger(full, server.uri, flush_every_s=0.2),
               AsyncMetricLogger(small, server.uri, flush_every_s=0.2, max_pending_steps=SMALL_QUEUE)]
    training = SteadyTraining(loggers)
    with caplog.at_level(logging.WARNING, logger="pipeline.tracking"):
        training.start()
        wait_for(lambda: training.steps >= 50, "50 steps with the server up")
        logged = training.steps  # steps below this were logged; steps go out oldest first
        wait_for(lambda: all(logger.sent >= logged for logger in loggers), f"steps 0-{logged - 1} arriving")
        server.hang()
        hung_at = training.steps
        wait_for(lambda: training.steps >= hung_at + OUTAGE_STEPS, "training stalled while MLflow hung:"
                 f" {OUTAGE_STEPS} steps")
        server.resume()
        resumed_at = training.steps
        wait_for(lambda: loggers[0].sent >= resumed_at, "the steps of the outage arriving once the server is back")
        training.done.set()
        training.join()
        assert all(logger.close(timeout=30) for logger in loggers)

    total = training.steps
    history = [m.step for m in client.get_metric_history(full, "loss")]
    assert sorted(history) == list(range(total))  # exactly one value per step, none lost
    assert loggers[0].dropped == 0 and loggers[0].failures >= 1 and loggers[0].sent == total

    kept = [m.step for m in client.get_metric_history(small, "loss")]
    # every step not kept was counted dropped; a dropped step whose request timed out may have arrived too
    assert len(set(kept)) == len(kept) and loggers[1].dropped >= total - len(kept) > 0
    assert set(range(logged)) <= set(kept)  # only steps queued in the outage were lost
    assert f"{loggers[1].dropped} steps of metrics were dropped for run {small}" in caplog.text
    assert "still does not take them; dropping the oldest" in caplog.text


# ---------------------------------------------------------------------------------------------------
# the same outage during a real training run: 2 Ray Train workers, rank 0 logging to the hung server
# ---------------------------------------------------------------------------------------------------
# The server hangs from rank 0's first metrics until training reaches 80% of its steps, so steps are also
# logged after it is back; the recorded run in docs/reliability.md sets 6000 steps.
TRAIN_STEPS = int(os.environ.get("PIPELINE_TEST_MLFLOW_OUTAGE_STEPS", "400"))


@pytest.mark.slow
def test_a_training_run_goes_on_through_an_mlflow_outage(ray_cluster, server, tmp_path, monkeypatch):
    from pipeline import demo
    from pipeline.config import Config
    from pipeline.stages.data import prepare
    from pipeline.train.faults import STATE_DIR_ENV
    from pipeline.train.launch import train
    from tests.integration.test_train import SHIPPED_TEXT

    base = demo.make_tiny_checkpoint(tmp_path / "base")
    steps = TRAIN_STEPS
    monkeypatch.setenv(STATE_DIR_ENV, str(tmp_path))  # rank 0 appends each finished step there
    cfg = Config.from_dict({
        "run": {"name": "outage", "output_uri": str(tmp_path / "runs"), "cache_dir": str(tmp_path / "node")},
        "model": {"base_uri": str(base), "backend": "torch", "dtype": "fp32"},
        "data": {"train_files": [SHIPPED_TEXT], "seq_len": 64, "max_documents": 80},
        "train": {"workers": 2, "use_gpu": False, "micro_batch_size": 2, "lr": 1e-3, "warmup_steps": 2, "max_steps": steps,
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
        server.hang()
        give_up_at = time.monotonic() + 3 * STALL_DEADLINE_S
        while step() < 0.8 * steps and time.monotonic() < give_up_at:
            time.sleep(0.2)
        window["stalled"] = step() < 0.8 * steps
        window["up"] = time.time()
        server.resume()

    thread = threading.Thread(target=outage, daemon=True)
    thread.start()
    result = train(cfg, prepared, run_id=run_id, tracking_uri=server.uri)
    thread.join(timeout=120)
    assert {"down", "up"} <= set(window), "the run ended before the outage did"
    assert not window["stalled"], "training stopped advancing while MLflow hung"

    def rates(since: float, until: float) -> list[float]:
        return [m["tokens_per_s"] for m in result.metrics if since * 1e3 <= m["time_ms"] < until * 1e3]

    before, during, after = (rates(0, window["down"]), rates(window["down"], window["up"]),
                             rates(window["up"], float("inf")))
    print(f"\nMLflow hung {window['up'] - window['down']:.0f} s: {len(before)} steps before, {len(during)} "
          f"during, {len(after)} after; median tokens/s {statistics.median(before):.0f} before, "
          f"{statistics.median(during):.0f} during")
    assert result.steps == steps and len(during) >= 10 and after
    deadline = time.monotonic() + 120
    while len(client.get_metric_history(run_id, "loss")) < steps and time.monotonic() < deadline:
        time.sleep(1.0)  # the worker's logger sent what it could by close; MLflow may still be writing
    logged = sorted(m.step for m in client.get_metric_history(run_id, "loss"))
    assert logged == list(range(1, steps + 1))  # every step exactly once, the outage's steps included
