"""Side-by-side comparison of fine-tuning jobs recorded in MLflow.

A job is a parent run (`pipeline.role=parent`) with one nested run per stage execution. For each job
this module gathers what an engineer compares: the settings that differ between the jobs (the parent's
params), the training outcome (final loss, steps, tokens/s) and the evaluation (validation loss and
perplexity of base and fine-tuned model), from the newest finished run of each stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mlflow import MlflowClient

from pipeline import tracking
from pipeline.errors import PipelineError

TRAIN_METRICS = ("loss", "tokens_per_s", "mfu")
EVAL_METRICS = ("base/val_loss", "finetuned/val_loss", "base/perplexity", "finetuned/perplexity")


@dataclass
class JobRecord:
    name: str
    run_id: str
    start_time: int
    params: dict[str, str]
    metrics: dict[str, float] = field(default_factory=dict)


def _stage_runs(client: MlflowClient, experiment_id: str, parent_id: str) -> dict[str, object]:
    """Newest FINISHED run of each stage under a parent."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
    )
    newest = {}
    for run in runs:
        newest.setdefault(run.data.tags.get(tracking.STAGE_TAG), run)
    return newest


def load_jobs(experiment: str, tracking_uri: str, names: list[str] | None = None, last: int = 10) -> list[JobRecord]:
    """The newest `last` jobs of an experiment (or the ones named), with their key metrics."""
    client = MlflowClient(tracking_uri=tracking.resolve_tracking_uri(tracking_uri))
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise PipelineError(f"no MLflow experiment {experiment!r} at {tracking_uri}")
    parents = client.search_runs(
        [found.experiment_id], filter_string=f"tags.`{tracking.ROLE_TAG}` = 'parent'",
        order_by=["attributes.start_time DESC"], max_results=1000 if names else last,
    )
    jobs = []
    for parent in parents:
        name = parent.data.tags.get("mlflow.runName", parent.info.run_id)
        if names and name not in names:
            continue
        job = JobRecord(name, parent.info.run_id, parent.info.start_time, dict(parent.data.params))
        stages = _stage_runs(client, found.experiment_id, parent.info.run_id)
        if "train" in stages:
            job.metrics.update({k: v for k, v in stages["train"].data.metrics.items() if k in TRAIN_METRICS})
        if "eval" in stages:
            job.metrics.update({k: v for k, v in stages["eval"].data.metrics.items() if k in EVAL_METRICS})
        jobs.append(job)
    missing = sorted(set(names or []) - {j.name for j in jobs})
    if missing:
        raise PipelineError(f"no job named {missing[0]!r} in experiment {experiment!r}")
    return jobs


def differing_params(jobs: list[JobRecord]) -> list[str]:
    keys = sorted({k for job in jobs for k in job.params})
    return [k for k in keys if len({job.params.get(k) for job in jobs}) > 1]


def format_table(jobs: list[JobRecord], sort_by: str = "finetuned/val_loss") -> str:
    """A plain-text table: one row per job, the differing params, then the metrics."""
    jobs = sorted(jobs, key=lambda j: j.metrics.get(sort_by, float("inf")))
    params = differing_params(jobs)
    metrics = [m for m in (*EVAL_METRICS, *TRAIN_METRICS) if any(m in j.metrics for j in jobs)]
    header = ["job", *params, *metrics]
    rows = [[job.name, *(job.params.get(p, "-") for p in params),
             *(f"{job.metrics[m]:.4g}" if m in job.metrics else "-" for m in metrics)] for job in jobs]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
