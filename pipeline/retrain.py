"""Scheduled retraining: fine-tune again when, and only when, the training data changed.

Each round prepares the data first (cheap: data-prep is cached by a content hash of inputs, tokenizer
and settings). If the newest successful retrain of this job already trained on exactly that data hash,
the round is skipped. Otherwise a new job `{run.name}-{UTC timestamp}` runs every stage and registers a
new model version; its MLflow parent run is tagged with the data hash, so the next round can tell.
Run one round from cron (`--once`, the default) or keep one process looping (`--every 24h`).
"""

from __future__ import annotations

import time
from datetime import datetime, timezone

from mlflow import MlflowClient

from pipeline import tracking
from pipeline.config import Config
from pipeline.driver import STAGES, ensure_demo_base, run_job

DATA_HASH_TAG = "data.hash"
RETRAIN_OF_TAG = "retrain.of"


def last_trained_hash(cfg: Config) -> tuple[str, str] | None:
    """(job name, data hash) of the newest retrain of this job that finished every stage."""
    client = MlflowClient(tracking_uri=tracking.resolve_tracking_uri(cfg.tracking.uri))
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    if experiment is None:
        return None
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`{RETRAIN_OF_TAG}` = '{cfg.run.name}'",
        order_by=["attributes.start_time DESC"], max_results=1,
    )
    if not runs:
        return None
    return runs[0].data.tags.get("mlflow.runName", runs[0].info.run_id), runs[0].data.tags[DATA_HASH_TAG]


def retrain_once(cfg: Config, code_version: dict, *, force: bool = False, echo=print) -> str | None:
    """One round; returns the new job's name, or None when the data did not change."""
    from pipeline.data import prepare

    ensure_demo_base(cfg)
    data_hash = prepare(cfg, cfg.model.base_uri).stats["data_hash"]
    previous = last_trained_hash(cfg)
    if previous and previous[1] == data_hash and not force:
        echo(f"data unchanged since job {previous[0]} (hash {data_hash[:12]}): nothing to retrain")
        return None
    raw = cfg.to_dict()
    raw["run"]["name"] = f"{cfg.run.name}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    job_cfg = Config.from_dict(raw)
    ctx = run_job(job_cfg, list(STAGES), code_version, echo=echo)
    # tagged only after every stage succeeded: a failed round is retried by the next one
    tracking.set_tags(ctx.state["parent_run_id"], {DATA_HASH_TAG: data_hash, RETRAIN_OF_TAG: cfg.run.name},
                      tracking_uri=ctx.tracking_uri)
    return job_cfg.run.name


def parse_interval(text: str) -> float:
    """Seconds in '30m', '6h', '1d' or a plain number of seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = text.strip().lower()
    try:
        return float(text[:-1]) * units[text[-1]] if text[-1] in units else float(text)
    except (ValueError, IndexError):
        raise ValueError(f"--every {text!r} is not an interval like 30m, 6h or 1d") from None


def retrain_forever(cfg: Config, code_version: dict, every_s: float, echo=print) -> None:
    while True:
        started = time.time()
        retrain_once(cfg, code_version, echo=echo)
        time.sleep(max(0.0, every_s - (time.time() - started)))
