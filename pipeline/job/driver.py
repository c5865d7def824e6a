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
import time
from pathlib import Path
from typing import Any, Callable

import ray

from pipeline.job import precision, preflight
from pipeline.tracking import run_tags
from pipeline import storage, tracking
from pipeline.config import DEMO_BASE_URI, STAGES, Config  # noqa: F401 - STAGES is re-exported
from pipeline.errors import JobError, PipelineError  # noqa: F401 - JobError is re-exported

# Settings a job's checkpoints were made with: a run name cannot be resumed under other values.
IDENTITY_KEYS = ("run.seed", "model.base_uri", "data.train_files", "data.format", "data.seq_len")
log = logging.getLogger(__name__)


@dataclasses.dataclass
class JobContext:
    cfg: Config
    options: storage.StorageOptions
    tracking_uri: str
    code_version: dict
    state: dict  # persisted between stage runs: parent run id and each stage's outputs
    prepared: Any = None  # the data stage's result, made before the job was opened

    @property
    def state_uri(self) -> str:
        return preflight.job_state_uri(self.cfg)

    def save_state(self) -> None:
        storage.write_bytes(self.state_uri, json.dumps(self.state, indent=2).encode(), self.options)

    def need(self, key: str, stage: str) -> Any:
        if key not in self.state:
            raise PipelineError(f"no {key!r} from an earlier run of job {self.cfg.run.name!r} "
                                f"({self.state_uri}); run the stages before {stage!r} first")
        return self.state[key]


def open_job(cfg: Config, code_version: dict) -> JobContext:
    """Load (or start) the job's state and make sure its MLflow parent run exists."""
    options = storage.StorageOptions.from_config(cfg.storage)
    uri = tracking.resolve_tracking_uri(cfg.tracking.uri)
    ctx = JobContext(cfg, options, uri, code_version, {})
    if storage.exists(ctx.state_uri, options):
        ctx.state = json.loads(storage.read_bytes(ctx.state_uri, options))
    _check_same_run(ctx)
    params = {**cfg.flat_params(), "run.seed": cfg.run.seed}
    tags = {**tracking.code_version_tags(code_version), "job.output_uri": cfg.run.output_uri}
    ctx.state["parent_run_id"] = tracking.find_or_start_parent(
        cfg.tracking.experiment, cfg.run.name, tags, params=params,
        parent_id=ctx.state.get("parent_run_id"), tracking_uri=uri,
    )
    ctx.save_state()
    return ctx


def _check_same_run(ctx: JobContext) -> None:
    """Record the job's identity on its first run; refuse a later one under the same name that differs."""
    flat = ctx.cfg.flat_params()
    identity = {key: flat[key] for key in IDENTITY_KEYS}
    recorded = ctx.state.setdefault("identity", identity)
    for key in IDENTITY_KEYS:
        if key in recorded and recorded[key] != identity[key]:
            raise PipelineError(f"run.name {ctx.cfg.run.name!r} is a job with {key}={recorded[key]!r} "
                                f"({ctx.state_uri}), not {identity[key]!r}; use a new run.name to start a new run")


def _interrupted_run(ctx: JobContext, stage: str) -> str | None:
    """The MLflow run of `stage` that a killed driver left RUNNING, to carry on in."""
    run_id = ctx.state.get("running", {}).get(stage)
    return run_id if run_id and tracking.run_status(run_id, tracking_uri=ctx.tracking_uri) == "RUNNING" else None


def ensure_demo_base(cfg: Config) -> None:
    """The embedded default trains a tiny model that the job builds itself, once."""
    if cfg.model.base_uri == DEMO_BASE_URI:
        from pipeline.demo import ensure_demo_base as build

        build(Path(DEMO_BASE_URI).parent)


# ---------------------------------------------------------------------------------------------------
# stages: each takes the context and its stage run id, updates ctx.state, returns a one-line summary


def run_data(ctx: JobContext, run_id: str) -> str:
    prepared = ctx.prepared
    ctx.state["data"] = dataclasses.asdict(prepared)
    stats = prepared.stats
    flat = tracking.flatten_params(stats, prefix="data.")
    numeric = {k: v for k, v in flat.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    tracking.log_metrics(run_id, numeric, tracking_uri=ctx.tracking_uri)
    train = stats.get("train", {})
    hit = "cache hit" if prepared.cache_hit else "prepared"
    return (f"{train.get('rows', '?')} train rows, {train.get('tokens', '?')} tokens, "
            f"{stats.get('truncated', 0)} truncated, {stats.get('dropped', 0)} dropped ({hit}) -> {prepared.uri}")


def run_train(ctx: JobContext, run_id: str) -> str:
    from pipeline.stages.data import PreparedData
    from pipeline.train.launch import train

    prepared = PreparedData(**ctx.need("data", "train"))
    # Before Ray Train starts: FP8 that cannot run is an error here, or (train.fp8_fallback) a tagged fallback.
    ctx.cfg = precision.settle_fp8(ctx.cfg, [run_id, ctx.state["parent_run_id"]], ctx.tracking_uri)
    result = train(ctx.cfg, prepared, run_id=run_id, tracking_uri=ctx.tracking_uri,
                   code_version=ctx.code_version)
    ctx.state["checkpoint_uri"] = result.checkpoint_uri
    return f"{result.steps} steps, final loss {result.final_loss:.4f} -> {result.checkpoint_uri}"


def run_eval(ctx: JobContext, run_id: str) -> str:
    data = ctx.need("data", "eval")
    checkpoint_uri = ctx.need("checkpoint_uri", "eval")
    metrics, samples = _on_worker(ctx, _eval_task, ctx.cfg, ctx.options, checkpoint_uri, data["val_uri"],
                                  ctx.tracking_uri)
    tracking.log_metrics(run_id, metrics, tracking_uri=ctx.tracking_uri)
    # what the scores are of: a gate compares only results over the same rows
    scored = {"eval.val_uri": data["val_uri"] or "", "eval.data_hash": data.get("stats", {}).get("data_hash", "")}
    if ctx.cfg.eval.champion and "champion/val_loss" in metrics:
        scored["eval.champion"] = ctx.cfg.eval.champion
    tracking.set_tags(run_id, scored, tracking_uri=ctx.tracking_uri)
    tracking.log_text(run_id, json.dumps(samples, indent=2), "samples.json", tracking_uri=ctx.tracking_uri)
    ctx.state["eval"] = metrics
    shown = ", ".join(f"{k} {v:.3f}" for k, v in sorted(metrics.items()))
    return f"{shown}; {len(samples)} samples"


def run_export(ctx: JobContext, run_id: str) -> str:
    checkpoint_uri = ctx.need("checkpoint_uri", "export")
    result = _on_worker(ctx, _export_task, ctx.cfg, ctx.options, checkpoint_uri, run_id, ctx.tracking_uri)
    ctx.state["export"] = result
    version = f", registered {ctx.cfg.export.registered_model_name} v{result['version']}" if result["version"] else ""
    return f"{result['uri']}{version}"


STAGE_FUNCTIONS: dict[str, Callable[[JobContext, str], str]] = {
    "data": run_data, "train": run_train, "eval": run_eval, "export": run_export,
}


# ---------------------------------------------------------------------------------------------------
# eval and export run where the GPUs are


def _on_worker(ctx: JobContext, fn, *args):
    gpus = 1 if ctx.cfg.train.use_gpu else 0
    return ray.get(ray.remote(num_cpus=1, num_gpus=gpus)(fn).remote(*args))


def _local_dirs(cfg: Config, options, checkpoint_uri: str) -> tuple[Path, Path]:
    """The base checkpoint and the trained weights (not the optimizer state) on this node."""
    base = storage.pull_checkpoint(cfg.model.base_uri, cfg.run.cache_dir, options)
    checkpoint = storage.pull_checkpoint(checkpoint_uri, cfg.run.cache_dir, options, only=["model.safetensors"])
    return base, checkpoint


def _eval_task(cfg: Config, options, checkpoint_uri: str, val_uri: str | None, tracking_uri: str):
    from pipeline.stages.evaluate import evaluate, generate_samples, score_champion
    from pipeline.stages.export import convert

    base, checkpoint = _local_dirs(cfg, options, checkpoint_uri)
    metrics = evaluate(cfg, base, checkpoint, val_uri, options=options) if val_uri else {}
    if cfg.eval.champion and val_uri:
        name, version = cfg.eval.champion.removeprefix("models:/").split("/")
        folder = Path(cfg.run.cache_dir) / "champions" / f"{name}-v{version}"
        champion = tracking.download_model_version(name, version, folder, tracking_uri=tracking_uri)
        metrics.update(score_champion(cfg, champion, val_uri, options))
    hf_dir = convert(cfg, base, checkpoint)
    samples = generate_samples(hf_dir, cfg.eval.prompts, cfg.eval.max_new_tokens, cfg.eval.num_samples,
                               prompt_format=cfg.data.format, add_bos=cfg.data.add_bos)
    return metrics, samples


def _export_task(cfg: Config, options, checkpoint_uri: str, run_id: str, tracking_uri: str):
    from pipeline.stages.export import export

    base, checkpoint = _local_dirs(cfg, options, checkpoint_uri)
    result = export(cfg, base, checkpoint, run_id=run_id, tracking_uri=tracking_uri, options=options)
    return {"uri": result.uri, "version": result.version}


# ---------------------------------------------------------------------------------------------------


def run_job(cfg: Config, stages: list[str], code_version: dict, echo=print,
            connect: Callable[[], None] | None = None) -> JobContext:
    """Run `stages` in pipeline order; raises JobError naming the stage that failed.

    Inputs are checked and the data prepared first; `connect` (e.g. starting Ray) and opening the job
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
    - Submitting a job again under the same `run.name` resumes it: same parent run, training from its
      latest checkpoint. A stage whose driver was killed mid-way (its MLflow run left RUNNING, recorded in
      the state file) carries on in that same run, so the train stage keeps one metric history.
    - A run name stands for one run. Submitting it with another base model, seed or training data
      (`IDENTITY_KEYS`) is refused rather than resuming that run's checkpoints.
    """
    ensure_demo_base(cfg)
    preflight.check_inputs(cfg, stages)
    started = {"data": time.time()}
    prepared = _prepare_data(cfg, train="train" in stages) if "data" in stages else None
    if connect is not None:
        connect()
    ctx = open_job(cfg, code_version)
    ctx.prepared = prepared
    compared = _comparison_tags(ctx, lambda: run_tags.comparison_tags(cfg, ctx.options))
    tracking.set_tags(ctx.state["parent_run_id"], compared, tracking_uri=ctx.tracking_uri)
    params = {**cfg.flat_params(), "run.seed": cfg.run.seed}
    tags = {**tracking.code_version_tags(code_version), **compared}
    for stage in [s for s in STAGES if s in stages]:
        start = started.get(stage, time.time())
        try:
            with tracking.stage_run(ctx.state["parent_run_id"], stage, params=params, tags=tags,
                                    tracking_uri=ctx.tracking_uri, run_id=_interrupted_run(ctx, stage)) as run_id:
                ctx.state.setdefault("running", {})[stage] = run_id
                ctx.save_state()
                summary = STAGE_FUNCTIONS[stage](ctx, run_id)
        except (PipelineError, ValueError, RuntimeError, OSError) as exc:
            tracking.end_run(ctx.state["parent_run_id"], "FAILED", tracking_uri=ctx.tracking_uri)
            raise JobError(f"{stage}: {_one_line(exc)}") from exc
        ctx.state["running"].pop(stage)
        ctx.save_state()
        if stage == "train":
            hardware = _comparison_tags(ctx, lambda: run_tags.hardware_tags(cfg))
            for tagged in (ctx.state["parent_run_id"], run_id):
                tracking.set_tags(tagged, hardware, tracking_uri=ctx.tracking_uri)
            tags.update(hardware)
        echo(f"[{stage}] {summary} ({time.time() - start:.0f}s)")
    # a later re-run of a stage attaches to this parent again, whatever its status
    tracking.end_run(ctx.state["parent_run_id"], "FINISHED", tracking_uri=ctx.tracking_uri)
    return ctx


def _prepare_data(cfg: Config, train: bool):
    """The data stage's work, done before the job is opened; JobError("data: ...") on bad data."""
    from pipeline.stages.data import prepare

    min_rows = cfg.train.workers * cfg.train.micro_batch_size if train else 1
    try:
        prepared = prepare(cfg, cfg.model.base_uri, min_train_rows=min_rows)
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


def dry_run(cfg: Config) -> list[tuple[str, bool, str]]:
    """(check, ok, detail) for data inputs, the base checkpoint, output storage and tracking."""
    options = storage.StorageOptions.from_config(cfg.storage)
    checks = [("config", True, f"{len(cfg.flat_params())} settings valid"),
              _check("storage buckets", lambda: preflight.check_buckets(cfg, options) or "reachable")]
    for uri in [*cfg.data.train_files, *(cfg.data.validation_files or [])]:
        checks.append(_check(f"data {uri}", lambda u=uri: _exists(u, options)))
    if cfg.model.base_uri == DEMO_BASE_URI and not storage.exists(cfg.model.base_uri, options):
        checks.append(("base checkpoint", True, "demo base will be built on first run"))
    else:
        checks.append(_check(f"base checkpoint {cfg.model.base_uri}", lambda: _check_base(cfg, options)))
    checks.append(_check(f"output {cfg.run.output_uri}", lambda: _check_writable(cfg.run.output_uri, options)))
    checks.append(_check("tracking", lambda: _check_tracking(cfg.tracking.uri)))
    return checks


def _check(name: str, fn) -> tuple[str, bool, str]:
    try:
        return name, True, fn()
    except Exception as exc:  # noqa: BLE001 - a dry run reports every failure, one line each
        return name, False, _one_line(exc)


def _exists(uri: str, options) -> str:
    if not storage.exists(uri, options):
        raise PipelineError(f"not found: {uri}")
    return "found"


def _check_base(cfg: Config, options) -> str:
    return preflight.check_base_checkpoint(cfg.model.base_uri, options)


def _check_writable(uri: str, options) -> str:
    probe = storage.join(uri, ".dry-run-probe")
    storage.write_bytes(probe, b"ok", options)
    fs, path = storage.filesystem(probe, options)
    fs.rm(path)
    return "writable"


def _check_tracking(uri: str) -> str:
    from mlflow import MlflowClient

    resolved = tracking.resolve_tracking_uri(uri)
    MlflowClient(tracking_uri=resolved).search_experiments(max_results=1)
    return "reachable"
