"""Scheduled retraining with a champion gate: retrain when the data changed, promote only what is better.

A tick fingerprints the training data and does nothing if it is unchanged. Otherwise it submits the
fine-tuning job through Ray's Job Submission API and waits for it. Its eval stage scores the new model
and the current champion on the same rows. The registry alias moves only if the new model is strictly
better. All state is in MLflow and Ray, never in this process, so a crashed scheduler can simply run
again (`Retrainer` says how).
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from mlflow import MlflowClient
from mlflow.entities import Run

from pipeline.tracking import compare
from pipeline import tracking
from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.tracking.run_tags import FINGERPRINT_TAG, data_fingerprint

ROLE = "retrain"
OF_TAG, STATUS_TAG, ATTEMPT_TAG = "retrain.of", "retrain.status", "retrain.attempt"
DECIDED = ("promoted", "kept")


@dataclass(frozen=True)
class Gate:
    """Which eval metric decides, which direction is better, and the registry alias of the winner."""

    metric: str = "finetuned/val_loss"
    higher_is_better: bool = False
    alias: str = "champion"

    def beats(self, candidate: float, champion: float) -> bool:
        return candidate > champion if self.higher_is_better else candidate < champion


@dataclass(frozen=True)
class JobOutcome:
    """A finished fine-tuning job as MLflow holds it."""

    name: str
    version: str  # registered model version of its export
    metric: float
    champion_version: str | None = None  # the champion its eval stage scored on the same rows
    champion_metric: float | None = None
    scored_on: str = ""  # the held-out rows both were scored on (eval.val_uri) and their data hash
    scored_data_hash: str = ""


@dataclass(frozen=True)
class TickResult:
    action: str  # "unchanged", "promoted" or "kept"
    fingerprint: str
    job: str | None = None
    version: str | None = None


def _no_crash(point: str) -> None:
    """Crash-point hook: tests replace it to kill the scheduler between two steps."""


@dataclass
class Retrainer:
    """Everything a tick needs; no state is kept between ticks.

    Idempotence: the state is in MLflow (record tags, the job's runs, the alias) and in Ray (submission
    ids), never in this process. A crash between two steps repeats only the work after the last durable
    one:
    - after the submit, Ray refuses the resubmit and the tick waits;
    - after the job finished, MLflow holds it and nothing is submitted;
    - after the alias moved, the champion IS the candidate: it is recorded as promoted, not compared
      against itself;
    - after the record, the data is unchanged.
    Assumed: one scheduler per job (a CronJob with `concurrencyPolicy: Forbid`). Ray remembers submission
    ids per cluster; a cluster rebuilt from scratch forgets them, MLflow does not.
    """

    cfg: Config
    ray_client: object  # ray.job_submission.JobSubmissionClient
    gate: Gate = field(default_factory=Gate)
    config_path: str | None = None
    overrides: list[str] = field(default_factory=list)
    runtime_env: dict = field(default_factory=dict)
    entrypoint_script: str = "jobs/finetune.py"
    poll_s: float = 10.0
    timeout_s: float = 24 * 3600.0
    sleep: Callable[[float], None] = time.sleep
    crash_point: Callable[[str], None] = _no_crash
    echo: Callable[[str], None] = print

    def __post_init__(self) -> None:
        self.model = self.cfg.export.registered_model_name
        if not self.model:
            raise PipelineError("export.registered_model_name is not set: retraining promotes a registered "
                                "model version, so set it in the config")
        self.uri = tracking.resolve_tracking_uri(self.cfg.tracking.uri)
        self.mlflow = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        self.experiment_id = tracking.experiment_id(self.cfg.tracking.experiment, tracking_uri=self.uri)

    # -------------------------------------------------------------------------------------------
    def tick(self) -> TickResult:
        """One tick: submit a retrain when the data changed, and promote its model only if better.

        1. Fingerprint the training data (`pipeline.tracking.run_tags.data_fingerprint`: settings and file
           identities).
        2. If the newest DECIDED retrain of this job had that fingerprint, do nothing.
        3. Find or create the fingerprint's retrain record: an MLflow run (`pipeline.role=retrain`). Its
           tags are the tick's state: attempt, submission id, status, decision.
        4. Unless MLflow already holds the finished job, submit `python jobs/finetune.py ... --set
           run.name=<job>-<fp12>` through Ray's Job Submission API, submission id
           `<job>-<fp12>-<attempt>`. With a champion, the job also gets
           `eval.champion=models:/<model>/<champion version>`: its eval stage scores the champion on the
           same held-out rows, with the same code, as the new model. Ray refuses an id it has seen, so a
           restarted scheduler waits on the job it submitted instead of starting a second one.
        5. Wait for the job. A failed job bumps the record's attempt and fails the tick. The next tick
           submits the next attempt, which resumes the same job (same run.name) from its checkpoint.
        6. Read the job's eval run from MLflow: the new version's metric and the champion's
           (`champion/...`), both over the same rows. A champion the job did not score (the alias moved
           since the submit) is an error naming what to re-run. Scores over different held-out sets are
           never compared.
        7. Move the alias to the new version only if it is strictly better on the metric (lower or
           higher is better, configurable). With no champion yet, the first version becomes champion.
        8. Write the decision (`promoted` or `kept`) to the record, with both scores (metrics
           `candidate/...` and `champion/...`), the champion version and the rows they came from (tags
           `retrain.scored_on`, `retrain.scored_data_hash`). That is step 2's "last decided" retrain.
        """
        fp = data_fingerprint(self.cfg)
        last = self._last_decided()
        if last is not None and last.data.tags[FINGERPRINT_TAG] == fp:
            self.echo(f"data unchanged since {last.data.tags['retrain.job']} (fingerprint {fp[:12]}): nothing to do")
            return TickResult("unchanged", fp)
        record = self._record(fp)
        job = record.data.tags["retrain.job"]
        outcome = self._finished_job(job)
        if outcome is None:
            self._run_job(record, job)
            outcome = self._finished_job(job)
            if outcome is None:
                raise PipelineError(f"job {job} succeeded but MLflow has no finished eval and export for it "
                                    f"in experiment {self.cfg.tracking.experiment!r}; check its stage runs")
        action = self._promote_if_better(outcome)
        self._decide(record, outcome, action)
        return TickResult(action, fp, job, outcome.version)

    # -------------------------------------------------------------------------------------------
    # the record: this module's state in MLflow

    def _records(self, extra: str = "") -> list[Run]:
        query = f"tags.`{tracking.ROLE_TAG}` = '{ROLE}' and tags.`{OF_TAG}` = '{self.cfg.run.name}'{extra}"
        return self.mlflow.search_runs([self.experiment_id], filter_string=query, max_results=1000)

    def _last_decided(self) -> Run | None:
        decided = [r for r in self._records() if r.data.tags.get(STATUS_TAG) in DECIDED]
        return max(decided, key=lambda r: float(r.data.tags["retrain.decided_at"]), default=None)

    def _record(self, fp: str) -> Run:
        found = self._records(f" and tags.`{FINGERPRINT_TAG}` = '{fp}'")
        if found:
            return min(found, key=lambda r: r.info.start_time)
        job = f"{self.cfg.run.name}-{fp[:12]}"
        tags = {tracking.ROLE_TAG: ROLE, OF_TAG: self.cfg.run.name, FINGERPRINT_TAG: fp, "retrain.job": job,
                ATTEMPT_TAG: "1", STATUS_TAG: "new"}
        return self.mlflow.create_run(self.experiment_id, run_name=f"retrain {job}", tags=tags)

    def _decide(self, record: Run, outcome: JobOutcome, action: str) -> None:
        run_id = record.info.run_id
        self.mlflow.log_metric(run_id, self.gate.metric, outcome.metric)
        self.mlflow.log_metric(run_id, f"candidate/{self._metric_name}", outcome.metric)
        tags = {"retrain.version": outcome.version, "retrain.scored_on": outcome.scored_on,
                "retrain.scored_data_hash": outcome.scored_data_hash}
        if outcome.champion_metric is not None:
            self.mlflow.log_metric(run_id, f"champion/{self._metric_name}", outcome.champion_metric)
            tags["retrain.champion_version"] = outcome.champion_version
        for key, value in {**tags, "retrain.decided_at": f"{time.time():.6f}", STATUS_TAG: action}.items():
            self.mlflow.set_tag(run_id, key, value)  # the status last: it marks the record decided
        self.crash_point("recorded")
        self.mlflow.set_terminated(run_id, "FINISHED")

    # -------------------------------------------------------------------------------------------
    # the job: submitted through Ray, read back from MLflow

    @property
    def _metric_name(self) -> str:
        return self.gate.metric.rpartition("/")[2]  # finetuned/val_loss -> val_loss

    def _entrypoint(self, job: str) -> str:
        args = ["python", self.entrypoint_script, *(["--config", self.config_path] if self.config_path else [])]
        champion = self._champion_version()
        scored = [f"eval.champion=models:/{self.model}/{champion}"] if champion else []
        args += [a for o in [*self.overrides, f"run.name={job}", *scored] for a in ("--set", o)]
        return shlex.join(args)

    def _submit(self, record: Run, job: str) -> str:
        attempt = record.data.tags[ATTEMPT_TAG]
        submission_id = f"{job}-{attempt}"
        self.mlflow.set_tag(record.info.run_id, "retrain.submission_id", submission_id)
        try:
            self.ray_client.submit_job(entrypoint=self._entrypoint(job), submission_id=submission_id,
                                       runtime_env=self.runtime_env, metadata={OF_TAG: self.cfg.run.name})
            self.echo(f"submitted Ray job {submission_id}")
        except RuntimeError as exc:
            if "already exists" not in str(exc):
                raise PipelineError(f"Ray job {submission_id}: submit failed: {tracking.error_line(exc)}") from exc
            self.echo(f"Ray job {submission_id} was submitted before: waiting for it")
        self.crash_point("submitted")
        return submission_id

    def _run_job(self, record: Run, job: str) -> None:
        submission_id = self._submit(record, job)
        status = self._wait(submission_id)
        if status != "SUCCEEDED":
            attempt = int(record.data.tags[ATTEMPT_TAG]) + 1
            self.mlflow.set_tag(record.info.run_id, ATTEMPT_TAG, str(attempt))
            self.mlflow.set_tag(record.info.run_id, STATUS_TAG, "failed")
            message = tracking.error_line(self.ray_client.get_job_info(submission_id).message or "no message")
            raise PipelineError(f"Ray job {submission_id} {status}: {message}; "
                                f"the next tick submits attempt {attempt} (see `ray job logs {submission_id}`)")
        self.crash_point("finished")

    def _wait(self, submission_id: str) -> str:
        deadline = time.monotonic() + self.timeout_s
        while True:
            status = self.ray_client.get_job_status(submission_id)
            if status.is_terminal():
                return str(status.value)
            if time.monotonic() > deadline:
                raise PipelineError(f"Ray job {submission_id} still {status.value} after {self.timeout_s:.0f}s; "
                                    "the next tick waits for it again")
            self.sleep(self.poll_s)

    def _finished_job(self, job: str) -> JobOutcome | None:
        parent = compare.find_parent(self.mlflow, self.experiment_id, job)
        if parent is None or parent.info.status != "FINISHED":
            return None
        return self._outcome(parent)

    def _outcome(self, parent: Run) -> JobOutcome | None:
        stages = compare.stage_runs(self.mlflow, self.experiment_id, parent.info.run_id)
        if "eval" not in stages or "export" not in stages:
            return None
        metrics, tags = stages["eval"].data.metrics, stages["eval"].data.tags
        if self.gate.metric not in metrics:
            raise PipelineError(f"job {compare.run_name(parent)}: no eval metric {self.gate.metric!r} "
                                f"(it has {sorted(metrics)}); choose --metric from those")
        version = stages["export"].data.tags.get("export.registered_version")
        if version is None:
            raise PipelineError(f"job {compare.run_name(parent)}: its export registered no model version")
        champion = tags.get("eval.champion")
        return JobOutcome(compare.run_name(parent), version, metrics[self.gate.metric],
                          champion_version=champion.rpartition("/")[2] if champion else None,
                          champion_metric=metrics.get(f"champion/{self._metric_name}") if champion else None,
                          scored_on=tags.get("eval.val_uri", ""), scored_data_hash=tags.get("eval.data_hash", ""))

    # -------------------------------------------------------------------------------------------
    # the gate

    def _champion_version(self) -> str | None:
        try:
            version = self.mlflow.get_registered_model(self.model).aliases.get(self.gate.alias)
        except Exception:  # noqa: BLE001 - no registered model yet: no champion
            return None
        return None if version is None else str(version)

    def _champion(self, candidate: JobOutcome) -> JobOutcome | None:
        """The champion as the candidate's own eval run scored it, on the candidate's held-out rows."""
        version = self._champion_version()
        if version is None or version == candidate.version:
            return None if version is None else candidate
        if candidate.champion_version != version or candidate.champion_metric is None:
            scored = f"v{candidate.champion_version}" if candidate.champion_version else "no champion"
            raise PipelineError(
                f"job {candidate.name} scored {scored} on its held-out rows, but {self.gate.alias} is now "
                f"{self.model} v{version}; score it on the same rows: python jobs/finetune.py ... --set "
                f"run.name={candidate.name} --set eval.champion=models:/{self.model}/{version} --stages eval")
        return JobOutcome(f"{self.model} v{version}", version, candidate.champion_metric)

    def _promote_if_better(self, candidate: JobOutcome) -> str:
        champion = self._champion(candidate)
        name = f"{self.model} v{candidate.version} ({self.gate.metric} {candidate.metric:.4g})"
        if champion is not None and champion.version == candidate.version:
            self.echo(f"{name} is {self.gate.alias} already")
            return "promoted"
        rows = f" on the same rows ({candidate.scored_on})" if candidate.scored_on else ""
        if champion is not None and not self.gate.beats(candidate.metric, champion.metric):
            self.echo(f"kept {self.gate.alias} v{champion.version} ({champion.metric:.4g}{rows}): {name} is not better")
            return "kept"
        self.mlflow.set_registered_model_alias(self.model, self.gate.alias, candidate.version)
        was = f" over v{champion.version} ({champion.metric:.4g}{rows})" if champion else " (first champion)"
        self.echo(f"promoted {name} to {self.gate.alias}{was}")
        self.crash_point("promoted")
        return "promoted"
