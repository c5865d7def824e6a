"""The job: data-prep → train → eval → export under one MLflow parent run, each stage re-runnable alone.

A job is identified by `run.name` under `run.output_uri`. Its state file
(`{output_uri}/jobs/{name}/state.json`) records the parent run and each stage's outputs, so a later
`--stages eval` finds what `train` wrote. The driver only orchestrates: training runs in Ray Train
workers, eval and export in a Ray task with a GPU when training had one. Bad input leaves no trace:
inputs are checked and the data prepared before anything is written. `run_job` has the rules.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import ray

from pipeline.job import precision, preflight
from pipeline.job.resolved import Fp8Decision, ResolvedJob, resolve_job
from pipeline.job.state import ExportRecord, JobState, load_state, save_state
from pipeline.storage.manifest import MANIFEST_NAME
from pipeline.tracking import run_tags
from pipeline import storage, tracking
from pipeline.config import STAGES, Config, built_base  # noqa: F401 - STAGES is re-exported
from pipeline.errors import Interrupted, JobError, PipelineError  # noqa: F401 - JobError is re-exported
from pipeline.progress import megabytes, write_line

if TYPE_CHECKING:
    from pipeline.stages.data import PreparedData

# Settings a job's checkpoints were made with: a run name cannot be resumed under other values.
IDENTITY_KEYS = ("run.seed", "model.base_uri", "data.train_files", "data.format", "data.seq_len")
log = logging.getLogger(__name__)


@dataclasses.dataclass
class JobContext:
    """One run of a job: its resolved settings, and its state as the stages change it."""

    job: ResolvedJob
    """The job resolved at its start (config, storage, tracking, folders, FP8)."""

    code_version: dict
    """The code version every run is tagged with (`tracking.code_version`)."""

    state: JobState = dataclasses.field(default_factory=JobState)
    """The job's state file, saved after each change (`pipeline.job.state`)."""

    prepared: PreparedData | None = None
    """The data stage's result, made before the job was opened."""

    @property
    def cfg(self) -> Config:
        return self.job.config

    @property
    def tracking_uri(self) -> str:
        return self.job.tracking.uri

    def save_state(self) -> None:
        save_state(self.state, self.job.folders.state_uri, self.job.storage)

    def need(self, key: str, stage: str) -> Any:
        value = getattr(self.state, key)
        if value is None:
            raise PipelineError(f"no {key!r} from an earlier run of job {self.cfg.run.name!r} "
                                f"({self.job.folders.state_uri}); run the stages before {stage!r} first")
        return value


def open_job(job: ResolvedJob, code_version: dict) -> JobContext:
    """Load (or start) the job's state and make sure its MLflow parent run exists."""
    ctx = JobContext(job, code_version, load_state(job.folders.state_uri, job.storage))
    _check_same_run(ctx)
    tracking.make_local_store(job.tracking.uri)
    params = {**job.given.flat_params(), "run.seed": job.given.run.seed}
    tags = {**tracking.code_version_tags(code_version), "job.output_uri": job.given.run.output_uri}
    ctx.state.parent_run_id = tracking.find_or_start_parent(
        job.tracking.experiment, job.config.run.name, tags, params=params,
        parent_id=ctx.state.parent_run_id, tracking_uri=job.tracking.uri,
    )
    ctx.save_state()
    return ctx


def _check_same_run(ctx: JobContext) -> None:
    """Record the job's identity on its first run; refuse a later one under the same name that differs."""
    flat = ctx.job.given.flat_params()
    identity = {key: flat[key] for key in IDENTITY_KEYS}
    if ctx.state.identity is None:
        ctx.state.identity = identity
    recorded = ctx.state.identity
    for key in IDENTITY_KEYS:
        if key in recorded and recorded[key] != identity[key]:
            raise PipelineError(f"run.name {ctx.cfg.run.name!r} is a job with {key}={recorded[key]!r} "
                                f"({ctx.job.folders.state_uri}), not {identity[key]!r}; use a new run.name to "
                                "start a new run")


def _interrupted_run(ctx: JobContext, stage: str) -> str | None:
    """The MLflow run of `stage` that a killed driver left RUNNING, or a stopped one KILLED, to carry on in."""
    run_id = (ctx.state.running or {}).get(stage)
    status = tracking.run_status(run_id, tracking_uri=ctx.tracking_uri) if run_id else None
    return run_id if status in ("RUNNING", "KILLED") else None


def ensure_built_base(job: ResolvedJob) -> None:
    """The embedded default (and `configs/gpu-small-fp8.yaml`) train a random-weight model that the job
    builds itself, once (`pipeline.config.built_base`)."""
    name = built_base(job.given.model.base_uri)
    if name:
        from pipeline.demo import ensure_built_base as build

        build(Path(job.config.model.base_uri).parent, name)


# ---------------------------------------------------------------------------------------------------
# stages: each takes the context and its stage run id, updates ctx.state, returns a one-line summary


def run_data(ctx: JobContext, run_id: str) -> str:
    prepared = ctx.prepared
    ctx.state.data = prepared
    stats = prepared.stats
    flat = tracking.flatten_params(stats, prefix="data.")
    numeric = {k: v for k, v in flat.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    tracking.log_metrics(run_id, numeric, tracking_uri=ctx.tracking_uri)
    train = stats.get("train", {})
    hit = "cache hit" if prepared.cache_hit else "prepared"
    return (f"{train.get('rows', '?')} train rows, {train.get('tokens', '?')} tokens, "
            f"{stats.get('truncated', 0)} truncated, {stats.get('dropped', 0)} dropped ({hit}) -> {prepared.uri}")


def run_train(ctx: JobContext, run_id: str) -> str:
    from pipeline.train.launch import train

    prepared = ctx.need("data", "train")
    # decided before the job opened (`run_job`); the runs say when training has less FP8 than asked
    precision.tag_fallback(ctx.job.fp8, [run_id, ctx.state.parent_run_id], ctx.tracking_uri)
    result = train(ctx.job, prepared, run_id=run_id, tracking_uri=ctx.tracking_uri, code_version=ctx.code_version)
    ctx.state.checkpoint_uri = result.checkpoint_uri
    return f"{result.steps} steps, final loss {result.final_loss:.4f} -> {result.checkpoint_uri}"


def run_eval(ctx: JobContext, run_id: str) -> str:
    data = ctx.need("data", "eval")
    checkpoint_uri = ctx.need("checkpoint_uri", "eval")
    metrics, samples = _on_worker(ctx, _eval_task, ctx.job, checkpoint_uri, data.val_uri)
    tracking.log_metrics(run_id, metrics, tracking_uri=ctx.tracking_uri)
    # what the scores are of: a gate compares only results over the same rows
    scored = {"eval.val_uri": data.val_uri or "", "eval.data_hash": data.stats.get("data_hash", "")}
    if ctx.cfg.eval.champion and "champion/val_loss" in metrics:
        scored["eval.champion"] = ctx.cfg.eval.champion
    tracking.set_tags(run_id, scored, tracking_uri=ctx.tracking_uri)
    tracking.log_text(run_id, json.dumps(samples, indent=2), "samples.json", tracking_uri=ctx.tracking_uri)
    ctx.state.eval = metrics
    shown = ", ".join(f"{k} {v:.3f}" for k, v in sorted(metrics.items()))
    return f"{shown}; {len(samples)} samples"


def run_export(ctx: JobContext, run_id: str) -> str:
    checkpoint_uri = ctx.need("checkpoint_uri", "export")
    name, settings = ctx.cfg.export.registered_model_name, dataclasses.asdict(ctx.cfg.export)
    done = ctx.state.export
    if _export_stands(ctx, done, checkpoint_uri, settings):
        # the job run again with nothing new to export: the registry gets no second copy of the same model
        from pipeline.stages.export import export_tags

        tags = {**export_tags(done.uri, done.version), "export.reused": "true"}
        tracking.set_tags(run_id, tags, tracking_uri=ctx.tracking_uri)
        version = f", already registered {name} v{done.version}" if done.version else ""
        return f"{done.uri}{version} (exported from the same checkpoint by an earlier run)"
    result = _on_worker(ctx, _export_task, ctx.job, checkpoint_uri, run_id)
    ctx.state.export = dataclasses.replace(result, checkpoint_uri=checkpoint_uri, settings=settings)
    version = f", registered {name} v{result.version}" if result.version else ""
    return f"{result.uri}{version}"


def _export_stands(ctx: JobContext, done: ExportRecord | None, checkpoint_uri: str, settings: dict) -> bool:
    """Whether an earlier export of this job is of this checkpoint, with these settings, and still there:
    its files, and its registered version if it has one."""
    if done is None or done.checkpoint_uri != checkpoint_uri or done.settings != settings:
        return False
    if not storage.exists(storage.join(done.uri, MANIFEST_NAME), ctx.job.storage):  # uploaded last: complete
        return False
    name = settings["registered_model_name"]
    return done.version is None or tracking.model_version_exists(name, done.version, tracking_uri=ctx.tracking_uri)


STAGE_FUNCTIONS: dict[str, Callable[[JobContext, str], str]] = {
    "data": run_data, "train": run_train, "eval": run_eval, "export": run_export,
}


# ---------------------------------------------------------------------------------------------------
# eval and export run where the GPUs are


def _on_worker(ctx: JobContext, fn, *args):
    gpus = 1 if ctx.cfg.train.use_gpu else 0
    return ray.get(ray.remote(num_cpus=1, num_gpus=gpus)(fn).remote(*args))


def _eval_task(job: ResolvedJob, checkpoint_uri: str, val_uri: str | None):
    from pipeline.stages.evaluate import evaluate, generate_samples, score_champion
    from pipeline.stages.export import convert

    cfg, options = job.config, job.storage
    base, checkpoint = cfg.model.base_uri, checkpoint_uri  # each stage reads them locally, once per node
    metrics = evaluate(cfg, base, checkpoint, val_uri, options=options) if val_uri else {}
    if cfg.eval.champion and val_uri:
        name, version = cfg.eval.champion.removeprefix("models:/").split("/")
        folder = Path(job.folders.cache_dir) / "champions" / f"{name}-v{version}"
        champion = tracking.download_model_version(name, version, folder, tracking_uri=job.tracking.uri)
        metrics.update(score_champion(cfg, champion, val_uri, options))
    hf_dir = convert(cfg, base, checkpoint, options=options)
    samples = generate_samples(hf_dir, cfg.eval.prompts, cfg.eval.max_new_tokens, cfg.eval.num_samples,
                               prompt_format=cfg.data.format, add_bos=cfg.data.add_bos)
    return metrics, samples


def _export_task(job: ResolvedJob, checkpoint_uri: str, run_id: str) -> ExportRecord:
    from pipeline.stages.export import export

    result = export(job.config, job.config.model.base_uri, checkpoint_uri, run_id=run_id,
                    tracking_uri=job.tracking.uri, options=job.storage)
    return ExportRecord(uri=result.uri, version=result.version)


# ---------------------------------------------------------------------------------------------------


def run_job(job: ResolvedJob | Config, stages: list[str], code_version: dict, echo=write_line,
            connect: Callable[[], None] | None = None) -> JobContext:
    """Run `stages` in pipeline order; raises JobError naming the stage that failed.

    `job` is resolved once (`pipeline.job.resolved`); a plain Config is resolved here. Inputs are checked
    and the data prepared first; `connect` (e.g. starting Ray) and opening the job
    come after, so a bad input raises PipelineError or JobError("data: ...") with nothing written.

    - Each stage execution is a nested MLflow run carrying the resolved config, seed and code version.
    - Checks (`pipeline.job.preflight`) and data preparation come before the job writes anything (MLflow
      runs, its state file, Ray): tokenizing is where bad records show. Prepared data goes to a
      content-addressed cache folder only once it is complete. The data stage's MLflow run then records
      what preparation found.
    - Eval records what its scores are of (tags `eval.val_uri`, `eval.data_hash`). With `eval.champion`
      set it also scores that registered version on the same rows (`champion/...`), so the retrain gate
      compares only results over the same rows.
    - Runs are tagged with what runs are compared by (`pipeline.tracking.run_tags`). Precision, model and data
      fingerprint are tagged at the start of every invocation. Hardware is tagged once training ran (its
      nodes are up by then), on the parent, the train run and the stage runs after it.
    - Every failure is one line naming the stage and the reason (`JobError`), or the bad input
      (`PipelineError`); `jobs/finetune.py` turns it into an exit code.
    - A driver told to stop (Ctrl-C, SIGTERM) during a stage raises `Interrupted` naming the stage, with
      that stage's run and the parent KILLED; running the job again carries on in that stage's run.
    - Submitting a job again under the same `run.name` resumes it: same parent run, training from its
      latest checkpoint. A stage whose driver was killed mid-way (its MLflow run left RUNNING, recorded in
      the state file) carries on in that same run, so the train stage keeps one metric history.
    - A run name stands for one run. Submitting it with another base model, seed or training data
      (`IDENTITY_KEYS`) is refused rather than resuming that run's checkpoints.
    """
    job = resolve_job(job) if isinstance(job, Config) else job  # stages and workers get this `job`
    ensure_built_base(job)
    preflight.check_inputs(job, stages)
    started = {"data": time.time()}
    prepared = _prepare_data(job, train="train" in stages) if "data" in stages else None
    if connect is not None:
        connect()
    if "train" in stages:
        job = job.with_fp8(_decide_fp8(job))
    ctx = open_job(job, code_version)
    ctx.prepared = prepared
    compared = _comparison_tags(ctx, lambda: run_tags.comparison_tags(job.given, job.storage, job.train_config.train))
    tracking.set_tags(ctx.state.parent_run_id, compared, tracking_uri=ctx.tracking_uri)
    params = {**job.given.flat_params(), "run.seed": job.given.run.seed}
    tags = {**tracking.code_version_tags(code_version), **compared}
    for stage in [s for s in STAGES if s in stages]:
        start = started.get(stage, time.time())
        try:
            with tracking.stage_run(ctx.state.parent_run_id, stage, params=params, tags=tags,
                                    tracking_uri=ctx.tracking_uri, run_id=_interrupted_run(ctx, stage)) as run_id:
                ctx.state.running = {**(ctx.state.running or {}), stage: run_id}
                ctx.save_state()
                summary = STAGE_FUNCTIONS[stage](ctx, run_id)
        except (PipelineError, ValueError, RuntimeError, OSError) as exc:
            tracking.end_run(ctx.state.parent_run_id, "FAILED", tracking_uri=ctx.tracking_uri)
            raise JobError(f"{stage}: {_one_line(exc)}") from exc
        except (KeyboardInterrupt, SystemExit) as exc:
            if isinstance(exc, SystemExit) and exc.code != signal.SIGTERM:  # Ray's driver handler: sys.exit(15)
                raise
            # the stage's run stays in the state file: running the job again carries on in it
            tracking.end_run(ctx.state.parent_run_id, "KILLED", tracking_uri=ctx.tracking_uri)
            how = exc.signal if isinstance(exc, Interrupted) else "Ctrl-C" if isinstance(exc, KeyboardInterrupt) \
                else "SIGTERM"
            raise Interrupted(how, stage) from None
        ctx.state.running.pop(stage)
        ctx.save_state()
        if stage == "train":
            hardware = _comparison_tags(ctx, lambda: run_tags.hardware_tags(job.config))
            for tagged in (ctx.state.parent_run_id, run_id):
                tracking.set_tags(tagged, hardware, tracking_uri=ctx.tracking_uri)
            tags.update(hardware)
        echo(f"[{stage}] {summary} ({time.time() - start:.0f}s)")
    # a later re-run of a stage attaches to this parent again, whatever its status
    tracking.end_run(ctx.state.parent_run_id, "FINISHED", tracking_uri=ctx.tracking_uri)
    return ctx


def _decide_fp8(job: ResolvedJob) -> Fp8Decision:
    """FP8 checked where training runs, once Ray is up and before the job opens; JobError("train: ...")
    when it cannot run and no fallback was asked for, so nothing is written."""
    try:
        return precision.decide_fp8(job.config)
    except PipelineError as exc:
        raise JobError(f"train: {_one_line(exc)}") from exc


def _prepare_data(job: ResolvedJob, train: bool):
    """The data stage's work, done before the job is opened; JobError("data: ...") on bad data."""
    from pipeline.stages.data import prepare

    cfg = job.config
    min_rows = cfg.train.workers * cfg.train.micro_batch_size if train else 1
    try:
        prepared = prepare(cfg, cfg.model.base_uri, min_train_rows=min_rows, options=job.storage)
    except (PipelineError, ValueError, RuntimeError, OSError) as exc:
        raise JobError(f"data: {_one_line(exc)}") from exc
    return prepared


def _comparison_tags(ctx: JobContext, make_tags: Callable[[], dict[str, str]]) -> dict[str, str]:
    """Best effort, like all tags: a missing input fails its stage later with a clearer message."""
    try:
        return make_tags()
    except (PipelineError, ValueError, RuntimeError, OSError, KeyError) as exc:
        log.warning("comparison tags of job %s not set: %s", ctx.cfg.run.name, _one_line(exc))
        return {}


def _one_line(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None) or exc  # Ray wraps task errors; show the original
    text = str(cause).strip().splitlines()
    return text[-1] if text else type(cause).__name__



# ---------------------------------------------------------------------------------------------------
# --dry-run: every check a real run would fail on, without training


def dry_run(job: ResolvedJob) -> list[tuple[str, bool, str]]:
    """(check, ok, detail) for data inputs, the base checkpoint, output storage and tracking."""
    cfg, options = job.config, job.storage
    checks = [("config", True, f"{len(cfg.flat_params())} settings valid"),
              _check("storage buckets", lambda: preflight.check_buckets(cfg, options) or "reachable")]
    for uri in [*cfg.data.train_files, *(cfg.data.validation_files or [])]:
        checks.append(_check(f"data {uri}", lambda u=uri: _check_records(u, cfg, options)))
    if built_base(job.given.model.base_uri) and not storage.exists(cfg.model.base_uri, options):
        checks.append((f"base checkpoint {cfg.model.base_uri}", True, "a random-weight base, built on first run"))
    else:
        checks.append(_check(f"base checkpoint {cfg.model.base_uri}", lambda: _check_base(cfg, options)))
    checks.append(_check(f"output {cfg.run.output_uri}", lambda: _check_writable(cfg.run.output_uri, options)))
    checks.append(_check("tracking", lambda: _check_tracking(job.tracking.uri)))
    return checks


def _check(name: str, fn) -> tuple[str, bool, str]:
    try:
        return name, True, fn()
    except Exception as exc:  # noqa: BLE001 - a dry run reports every failure, one line each
        return name, False, _one_line(exc)


def _check_records(uri: str, cfg: Config, options) -> str:
    """Every record of one input read and turned into a document as data preparation does it, so a bad
    line fails here with the same message. The whole input is read, as the data stage reads it."""
    from pipeline.stages import sources

    source = sources.read_source(uri, options)
    docs = sources.documents([source], dataclasses.replace(cfg.data, max_documents=None))
    size = sum(map(len, source.blobs.values()))
    return f"{len(docs):,} records, each a valid {cfg.data.format} record ({megabytes(size)})"


def _check_base(cfg: Config, options) -> str:
    return preflight.check_base_checkpoint(cfg.model.base_uri, options, cfg.train)


def _creatable(path: Path) -> str:
    """A local folder or file that is not there yet: its nearest existing parent must be writable (checked
    without making anything, as a dry run writes nothing)."""
    parent = next(p for p in path.parents if p.exists())
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PipelineError(f"cannot create {path}: {parent} is not writable")
    return f"created on first run ({parent} is writable)"


def _check_writable(uri: str, options) -> str:
    local = storage.writable_local_path(uri)
    if local is not None and not local.exists():
        return _creatable(local)
    probe = storage.join(uri, ".dry-run-probe")
    storage.write_bytes(probe, b"ok", options)
    fs, path = storage.filesystem(probe, options)
    fs.rm(path)
    return "writable"


def _check_tracking(uri: str) -> str:
    from mlflow import MlflowClient

    local = tracking.local_store_path(uri)
    if local is not None and not local.exists():
        return f"local store {local}, {_creatable(local)}"
    MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    return "reachable"
