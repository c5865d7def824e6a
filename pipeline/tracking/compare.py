"""Side-by-side comparison of fine-tuning jobs recorded in MLflow: a table, loss curves, an MLflow record.

A job is a parent run (`pipeline.role=parent`) with one nested run per stage execution. For each job
this module gathers what an engineer compares: the settings that differ, the training outcome, the
evaluation and the loss curve (`load_jobs` says how each is read). The comparison itself becomes a run
(`pipeline.role=comparison`) holding the table and the PNG of the curves overlaid, so a comparison
shown in a review can be found again.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Experiment, Run
from mlflow.exceptions import MlflowException

from pipeline import progress, tracking
from pipeline.errors import PipelineError

PARENT_TAG = "mlflow.parentRunId"
COMPARED_TAGS = ("precision", "lm_head", "fp8_gradient_accumulation", "model_name", "model_size", "data_fingerprint",
                 "hardware", "code.commit")
EVAL_METRICS = ("base/val_loss", "finetuned/val_loss", "base/perplexity", "finetuned/perplexity")
THROUGHPUT_METRICS = ("tokens_per_s", "mfu")


@dataclass
class JobRecord:
    name: str
    run_id: str
    experiment_id: str
    params: dict[str, str]
    tags: dict[str, str]
    metrics: dict[str, float] = field(default_factory=dict)
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, loss), oldest first


def run_name(run: Run) -> str:
    return run.data.tags.get("mlflow.runName", run.info.run_id)


def find_parent(client: MlflowClient, experiment_id: str, name: str) -> Run | None:
    """The newest parent run of the job called `name`."""
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.`{tracking.ROLE_TAG}` = 'parent' and tags.`mlflow.runName` = '{name}'",
        order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def _children(client: MlflowClient, experiment_id: str, parent_id: str, finished: bool = True) -> list[Run]:
    status = " and attributes.status = 'FINISHED'" if finished else ""
    return client.search_runs([experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'{status}",
                              order_by=["attributes.start_time DESC"], max_results=1000)


def stage_runs(client: MlflowClient, experiment_id: str, parent_id: str) -> dict[str, Run]:
    """Newest FINISHED run of each stage under a parent."""
    newest: dict[str, Run] = {}
    for run in _children(client, experiment_id, parent_id):
        newest.setdefault(run.data.tags.get(tracking.STAGE_TAG), run)
    return newest


def _history(client: MlflowClient, train_runs: list[Run], metric: str) -> list[tuple[int, float]]:
    by_step: dict[int, float] = {}
    for run in sorted(train_runs, key=lambda r: r.info.start_time):  # newer runs overwrite shared steps
        by_step.update({m.step: m.value for m in client.get_metric_history(run.info.run_id, metric)})
    return sorted(by_step.items())


def _job_record(client: MlflowClient, parent: Run) -> JobRecord:
    exp = parent.info.experiment_id
    job = JobRecord(run_name(parent), parent.info.run_id, exp, dict(parent.data.params), dict(parent.data.tags))
    children = _children(client, exp, parent.info.run_id, finished=False)
    train_runs = [r for r in children if r.data.tags.get(tracking.STAGE_TAG) == "train"]
    job.curve = _history(client, train_runs, "loss")
    if job.curve:
        job.metrics["final_loss"] = job.curve[-1][1]
    for name in THROUGHPUT_METRICS:
        values = [v for _, v in _history(client, train_runs, name)]
        if values:
            job.metrics[name] = statistics.median(values[1:] or values)
    evals = stage_runs(client, exp, parent.info.run_id).get("eval")
    if evals is not None:
        job.metrics.update({k: v for k, v in evals.data.metrics.items() if k in EVAL_METRICS})
    return job


def _parent_by_ref(client: MlflowClient, ref: str, experiment: Experiment | None) -> Run:
    """A parent run by job name within the experiment, or by run id."""
    if experiment is not None:
        found = find_parent(client, experiment.experiment_id, ref)
        if found is not None:
            return found
    try:
        run = client.get_run(ref)
    except MlflowException:  # not a run id either: say what was looked for
        where = (f"is not a job name in experiment {experiment.name!r} nor a run id" if experiment
                 else "is not a run id; pass --experiment to look jobs up by name")
        raise PipelineError(f"run {ref!r} {where}") from None
    if run.data.tags.get(tracking.ROLE_TAG) != "parent":
        raise PipelineError(f"run {ref!r} is a {run.data.tags.get(tracking.ROLE_TAG, 'plain')} run, "
                            "not a job's parent run: pass the job's run id or name")
    return run


def _existing_store(tracking_uri: str) -> str:
    """The resolved uri of a store that exists: reading from a local path with no store would make an empty
    one there (a relative uri from another folder, a typo)."""
    uri = tracking.resolve_tracking_uri(tracking_uri, create=False)
    local = tracking.local_store_path(uri)
    if local is not None and not local.exists():
        raise PipelineError(f"tracking uri {tracking_uri!r}: no MLflow store at {local}")
    return uri


def load_jobs(tracking_uri: str, refs: list[str] | None = None, experiment: str | None = None,
              last: int = 10, names_in: str | None = None) -> list[JobRecord]:
    """The jobs named or run-id'd in `refs`, else the newest `last` jobs of `experiment`. Job names in `refs`
    are looked up in `experiment`, or where it is None in `names_in` if that experiment exists.

    - Settings: the comparison tags (`pipeline.tracking.run_tags`) and the code commit first, then the parent's
      params.
    - Training outcome: the final loss, and throughput (tokens/s, MFU) as the median over logged steps
      after the first, which includes start-up and compilation.
    - Evaluation: validation loss and perplexity of base and fine-tuned model, from the newest finished
      eval run.
    - Loss curve: a resumed job has several train runs. Their histories are joined by step, the newer
      run winning where two logged the same step.
    """
    client = MlflowClient(tracking_uri=_existing_store(tracking_uri))
    found = None
    if experiment is not None:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise PipelineError(f"no MLflow experiment {experiment!r} at {tracking.tracking_uri_label(tracking_uri)}")
    elif refs and names_in is not None:
        found = client.get_experiment_by_name(names_in)  # None: the refs can still be run ids
    if refs:
        parents = [_parent_by_ref(client, ref, found) for ref in refs]
    elif found is not None:
        parents = client.search_runs([found.experiment_id], filter_string=f"tags.`{tracking.ROLE_TAG}` = 'parent'",
                                     order_by=["attributes.start_time DESC"], max_results=last)
    else:
        raise PipelineError("nothing to compare: name runs (ids or job names) or an --experiment")
    return [_job_record(client, parent) for parent in parents]


def differing_settings(jobs: list[JobRecord]) -> list[str]:
    """Comparison tags, then params, whose values are not the same in every job."""
    def differs(values):
        return len(set(values)) > 1
    tags = [t for t in COMPARED_TAGS if differs(j.tags.get(t) for j in jobs)]
    params = sorted({k for j in jobs for k in j.params})
    return tags + [p for p in params if p not in tags and differs(j.params.get(p) for j in jobs)]


def _setting(job: JobRecord, key: str) -> str:
    value = job.tags.get(key) if key in COMPARED_TAGS else job.params.get(key)
    return "-" if value is None else value[:12] if key in ("data_fingerprint", "code.commit") else value


def _metric(name: str, value: float | None) -> str:
    """Throughput as the progress lines show it (`progress.tokens_per_s_text`, `progress.mfu_text`), the rest
    to four significant digits."""
    if value is None:
        return "-"
    if name == "tokens_per_s":
        return progress.tokens_per_s_text(value)
    if name == "mfu":
        return progress.mfu_text(value)
    return f"{value:.4g}"


def format_table(jobs: list[JobRecord], sort_by: str = "finetuned/val_loss") -> str:
    """A plain-text table: one row per job, the differing settings, then the results."""
    jobs = sorted(jobs, key=lambda j: j.metrics.get(sort_by, float("inf")))
    settings = differing_settings(jobs)
    wanted = ("final_loss", *EVAL_METRICS, *THROUGHPUT_METRICS)
    metrics = [m for m in wanted if any(m in j.metrics for j in jobs)]
    header = ["job", *settings, *metrics]
    rows = [[job.name, *(_setting(job, s) for s in settings), *(_metric(m, job.metrics.get(m)) for m in metrics)]
            for job in jobs]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot_losses(jobs: list[JobRecord], path: str | Path):
    """The jobs' training loss curves overlaid, written as a PNG; returns the figure."""
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes and CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for job in jobs:
        label = " ".join([job.name, *(job.tags[t] for t in ("precision", "hardware") if t in job.tags)])
        ax.plot([s for s, _ in job.curve], [v for _, v in job.curve], label=label)
    ax.set(xlabel="optimizer step", ylabel="training loss", title="training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return fig


def log_comparison(tracking_uri: str, jobs: list[JobRecord], table: str, png: str | Path) -> str:
    """A new run in the first job's experiment holding the table and the loss-curve PNG; its run id."""
    client = MlflowClient(tracking_uri=tracking.resolve_tracking_uri(tracking_uri))
    tags = {tracking.ROLE_TAG: "comparison", "comparison.runs": ",".join(j.run_id for j in jobs),
            "comparison.jobs": ",".join(j.name for j in jobs)[:5000]}
    name = "compare " + " vs ".join(j.name for j in jobs)
    run_id = client.create_run(jobs[0].experiment_id, run_name=name[:250], tags=tags).info.run_id
    client.log_artifact(run_id, str(png))
    client.log_text(run_id, table + "\n", "comparison.txt")
    client.set_terminated(run_id, "FINISHED")
    return run_id
