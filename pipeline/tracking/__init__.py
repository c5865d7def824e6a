"""MLflow tracking for the pipeline: one parent run per job, a nested run per stage, metrics off the hot path.

Only `MlflowClient` with an explicit tracking uri is used, never the fluent `mlflow.start_run` API. Its
active-run stack is process-global and thread-unsafe, and stages run in different processes, which
pass run ids around instead. Failing to create a run is a one-line `PipelineError`. Everything after
that (params, tags, metrics, ending runs) is best effort: a warning and a count, never a crash. Text is
redacted by `pipeline.storage.redact`; per-step metrics go through `pipeline.tracking.metrics` (both re-exported here).
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import (
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
)

from pipeline.errors import PipelineError
from pipeline.tracking.metrics import AsyncMetricLogger, NullLogger, metric_logger  # noqa: F401 - re-exported
from pipeline.storage.redact import (  # noqa: F401 - is_secret_key and REDACTED are re-exported
    REDACTED,
    error_line,
    fit_key,
    fit_text,
    is_secret_key,
    redact,
    redact_text,
    tracking_uri_label,
)

log = logging.getLogger(__name__)

CODE_VERSION_ENV = "FINETUNE_CODE_VERSION"
ROLE_TAG = "pipeline.role"
STAGE_TAG = "pipeline.stage"
_PARENT_TAG = "mlflow.parentRunId"
_RUN_NAME_TAG = "mlflow.runName"
_DIRTY_SUFFIX = "-dirty"
# Pickled formats run code when loaded; a registered model must load from safetensors alone.
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def flatten_params(nested: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1e-4}} -> {"train.lr": 1e-4}; already-flat mappings come back unchanged."""
    flat: dict[str, Any] = {}
    for key, value in nested.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, prefix=f"{name}."))
        else:
            flat[name] = value
    return flat


# Code version and tracking uri.
def _git(repo_dir: str | Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(repo_dir), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def code_version(repo_dir: str | Path) -> dict[str, Any]:
    """{"commit", "dirty", "source"} from git in `repo_dir`, else from $FINETUNE_CODE_VERSION, else unknown.

    Untracked files count as dirty: they ship with the job's working dir. A Ray job's working dir has no
    .git, so the submitter passes its version along with `code_version_env`.
    """
    commit = _git(repo_dir, "rev-parse", "HEAD")
    if commit:
        status = _git(repo_dir, "status", "--porcelain")
        return {"commit": commit, "dirty": None if status is None else bool(status), "source": "git"}
    value = os.environ.get(CODE_VERSION_ENV, "").strip()
    if value:
        dirty = value.endswith(_DIRTY_SUFFIX)
        return {"commit": value.removesuffix(_DIRTY_SUFFIX), "dirty": dirty, "source": "env"}
    return {"commit": "unknown", "dirty": None, "source": "unknown"}


def code_version_env(version: Mapping[str, Any]) -> dict[str, str]:
    """Environment that carries `version` into a job without git, e.g. a Ray runtime_env's env_vars."""
    return {CODE_VERSION_ENV: version["commit"] + (_DIRTY_SUFFIX if version.get("dirty") else "")}


def code_version_tags(version: Mapping[str, Any]) -> dict[str, str]:
    """Run tags for a code version; the git commit also goes where the MLflow UI shows it."""
    dirty = "unknown" if version.get("dirty") is None else str(bool(version["dirty"])).lower()
    tags = {"code.commit": str(version["commit"]), "code.dirty": dirty, "code.source": str(version["source"])}
    if version["source"] != "unknown":
        tags["mlflow.source.git.commit"] = str(version["commit"])
    return tags


def resolve_tracking_uri(uri: str | None, output_dir: str | Path | None = None, *, create: bool = True) -> str:
    """The uri MLflow gets: servers pass through; local stores become absolute (their folder created unless
    `create` is False; `make_local_store` makes it later).

    Empty means `<output_dir>/mlflow.db`; `sqlite:///relative.db` and plain folders resolve against the
    current directory, so every process of a job agrees on one absolute location.

    Local tracking uses SQLite (`sqlite:///<dir>/mlflow.db`, artifacts beside it in `<dir>/mlartifacts`).
    One SQLite file must not be shared by several nodes, so multi-node jobs use a tracking server.
    """
    if not uri:
        if output_dir is None:
            raise PipelineError("tracking.uri: empty and no output dir was given for a local MLflow database")
        return _sqlite_uri(Path(output_dir) / "mlflow.db", create)
    scheme = urllib.parse.urlsplit(uri).scheme
    if scheme == "sqlite":
        if not uri.startswith("sqlite:///") or uri.endswith(":memory:"):
            raise PipelineError(f"tracking.uri: {uri!r} is not a SQLite file uri like sqlite:///path/mlflow.db")
        return _sqlite_uri(Path(uri.removeprefix("sqlite:///")), create)
    if scheme in ("", "file"):
        folder = Path(urllib.parse.unquote(urllib.parse.urlsplit(uri).path) if scheme else uri).resolve()
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        return folder.as_uri()
    return uri.rstrip("/")


def local_store_path(uri: str) -> Path | None:
    """The SQLite file or folder of a resolved local tracking uri (`resolve_tracking_uri`); None for a server."""
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///"))
    if uri.startswith("file:"):
        return Path(urllib.parse.unquote(urllib.parse.urlsplit(uri).path))
    return None


def make_local_store(uri: str) -> None:
    """Create the folder of a resolved local tracking uri (`resolve_tracking_uri(..., create=False)`)."""
    resolve_tracking_uri(uri)


def _sqlite_uri(db_path: Path, create: bool = True) -> str:
    db_path = db_path.resolve()
    if create:
        db_path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db_path}"


def _local_artifact_root(tracking_uri: str) -> str | None:
    """Artifacts of a SQLite store live beside the database, not in ./mlruns of whatever the cwd is."""
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    return None


def _client(tracking_uri: str | None) -> tuple[MlflowClient, str]:
    uri = tracking_uri or mlflow.get_tracking_uri()
    return MlflowClient(tracking_uri=uri, registry_uri=uri), uri


# Runs.
def find_or_start_parent(
    experiment: str, run_name: str, tags: Mapping[str, Any] | None = None, *,
    params: Mapping[str, Any] | None = None, parent_id: str | None = None, tracking_uri: str | None = None,
) -> str:
    """The job's parent run id: `parent_id` if given (checked), else the newest live parent run named
    `run_name` in `experiment`, else a new one with `tags` and `params`. Raises PipelineError on failure.

    Finding the parent by name lets a stage re-run later attach to the same parent. The parent's params
    and tags are written when it is created. A stage run carries its own (a re-run may differ), because
    MLflow params can never change once logged.
    """
    client, uri = _client(tracking_uri)
    name_filter = f"tags.{_RUN_NAME_TAG} = {_quote(run_name)} and tags.`{ROLE_TAG}` = 'parent'"
    try:
        if parent_id:
            if client.get_run(parent_id).info.lifecycle_stage == "deleted":
                raise MlflowException(f"run {parent_id} is deleted")
            return parent_id
        experiment_id = _experiment_id(client, experiment, uri)
        existing = client.search_runs(
            [experiment_id], filter_string=name_filter, order_by=["attributes.start_time DESC"], max_results=1
        )
        if existing:
            return existing[0].info.run_id
        run_tags = {**(tags or {}), ROLE_TAG: "parent", _RUN_NAME_TAG: run_name}
        run_id = client.create_run(experiment_id, tags=_clean_tags(run_tags), run_name=run_name).info.run_id
    except Exception as exc:  # noqa: BLE001 - any failure here means the job cannot be tracked
        where = f"MLflow parent run {run_name!r} at {tracking_uri_label(uri)}"
        raise PipelineError(f"cannot start {where}: {error_line(exc)}") from exc
    if params:
        log_params(run_id, params, tracking_uri=uri)
    return run_id


def experiment_id(name: str, *, tracking_uri: str) -> str:
    """The id of experiment `name`, created (with local artifacts beside a SQLite store) if missing."""
    client, uri = _client(tracking_uri)
    return _experiment_id(client, name, uri)


def _experiment_id(client: MlflowClient, name: str, tracking_uri: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=_local_artifact_root(tracking_uri))
    except MlflowException:  # another job created it first
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def _quote(value: str) -> str:
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise PipelineError(f"run name {value!r}: must not contain both ' and \" (MLflow search cannot quote it)")


@contextmanager
def stage_run(
    parent_id: str, stage: str, *,
    params: Mapping[str, Any] | None = None, tags: Mapping[str, Any] | None = None, tracking_uri: str | None = None,
    run_id: str | None = None,
) -> Iterator[str]:
    """A new nested run for one execution of `stage` under the parent; yields its id.

    The run ends FINISHED, FAILED when the block raises, KILLED on Ctrl-C or an exit (SIGTERM). Running
    a stage again later makes another nested run under the same parent. `run_id`: an unfinished run of
    this stage (its driver died or was stopped) to carry on in instead of a new one.
    """
    client, uri = _client(tracking_uri)
    run_tags = {**(tags or {}), _PARENT_TAG: parent_id, STAGE_TAG: stage, ROLE_TAG: "stage"}
    try:
        experiment_id = client.get_run(parent_id).info.experiment_id
        if run_id is None:
            run_id = client.create_run(experiment_id, tags=_clean_tags(run_tags), run_name=stage).info.run_id
    except Exception as exc:  # noqa: BLE001 - any failure here means the stage cannot be tracked
        where = f"MLflow run of stage {stage!r} at {tracking_uri_label(uri)}"
        raise PipelineError(f"cannot start {where}: {error_line(exc)}") from exc
    if params:
        log_params(run_id, params, tracking_uri=uri)
    status = RunStatus.to_string(RunStatus.FAILED)
    try:
        yield run_id
        status = RunStatus.to_string(RunStatus.FINISHED)
    except (KeyboardInterrupt, SystemExit):
        status = RunStatus.to_string(RunStatus.KILLED)
        raise
    finally:
        end_run(run_id, status, tracking_uri=uri)


def run_status(run_id: str, *, tracking_uri: str | None = None) -> str | None:
    """RUNNING / FINISHED / FAILED / KILLED, or None when the run is unknown, deleted or unreachable."""
    info = _run_info(run_id, tracking_uri)
    return None if info is None or info.lifecycle_stage == "deleted" else info.status


def run_start_ms(run_id: str, *, tracking_uri: str | None = None) -> int | None:
    """When the run was created (ms since the epoch), or None when it cannot be read."""
    info = _run_info(run_id, tracking_uri)
    return None if info is None else info.start_time


def _run_info(run_id: str, tracking_uri: str | None):
    client, _ = _client(tracking_uri)
    try:
        return client.get_run(run_id).info
    except Exception:  # noqa: BLE001 - unknown is an answer here
        return None


def _clean_tags(tags: Mapping[str, Any]) -> dict[str, str]:
    return {fit_key(k): fit_text(v, MAX_TAG_VAL_LENGTH) for k, v in redact(tags).items()}


_best_effort_failures = 0


def best_effort_failures() -> int:
    """How many best-effort calls (params, tags, metrics, text, ending runs) failed in this process."""
    return _best_effort_failures


def _best_effort(action: str, run_id: str, tracking_uri: str, call: Callable[[], object]) -> bool:
    """Run `call`; on failure count it, warn (the job goes on) and return False."""
    global _best_effort_failures
    try:
        call()
        return True
    except Exception as exc:  # noqa: BLE001 - any tracking failure must not end the job
        _best_effort_failures += 1
        log.warning("MLflow: could not %s for run %s at %s: %s",
                    action, run_id, tracking_uri_label(tracking_uri), error_line(exc))
        return False


def log_params(run_id: str, params: Mapping[str, Any], *, tracking_uri: str | None = None) -> bool:
    """Log redacted, truncated params; values already logged are skipped, changed ones warned about
    (MLflow params are immutable). False, with a warning, when the server could not take them."""
    client, uri = _client(tracking_uri)
    wanted = {fit_key(k): fit_text(v, MAX_PARAM_VAL_LENGTH) for k, v in redact(params).items()}

    def send() -> None:
        logged = client.get_run(run_id).data.params
        changed = sorted(k for k in wanted if k in logged and logged[k] != wanted[k])
        if changed:
            log.warning("MLflow: run %s already has different values for %s; keeping the first ones", run_id, changed)
        fresh = [Param(k, v) for k, v in wanted.items() if k not in logged]
        for start in range(0, len(fresh), MAX_PARAMS_TAGS_PER_BATCH):
            client.log_batch(run_id, params=fresh[start : start + MAX_PARAMS_TAGS_PER_BATCH], synchronous=True)

    return _best_effort("log params", run_id, uri, send)


def set_tags(run_id: str, tags: Mapping[str, Any], *, tracking_uri: str | None = None) -> bool:
    """Set redacted, truncated tags; False, with a warning, when the server could not take them."""
    client, uri = _client(tracking_uri)
    entities = [RunTag(k, v) for k, v in _clean_tags(tags).items()]

    def send() -> None:
        for start in range(0, len(entities), MAX_PARAMS_TAGS_PER_BATCH):
            client.log_batch(run_id, tags=entities[start : start + MAX_PARAMS_TAGS_PER_BATCH], synchronous=True)

    return _best_effort("set tags", run_id, uri, send)


def log_metrics(run_id: str, metrics: Mapping[str, float], step: int = 0, *, tracking_uri: str | None = None) -> bool:
    """Log a few summary metrics (evaluation results) synchronously; False, with a warning, on failure."""
    client, uri = _client(tracking_uri)

    def send() -> None:
        now = int(time.time() * 1000)
        entities = [Metric(fit_key(k), float(v), now, step) for k, v in metrics.items()]
        for start in range(0, len(entities), MAX_METRICS_PER_BATCH):
            client.log_batch(run_id, metrics=entities[start : start + MAX_METRICS_PER_BATCH], synchronous=True)

    return _best_effort("log metrics", run_id, uri, send)


def log_text(run_id: str, text: str, artifact_file: str, *, tracking_uri: str | None = None) -> bool:
    """A small redacted text artifact (evaluation samples, a report); False, with a warning, on failure."""
    client, uri = _client(tracking_uri)
    text = redact_text(text)
    return _best_effort(f"log {artifact_file}", run_id, uri, lambda: client.log_text(run_id, text, artifact_file))


def end_run(run_id: str, status: str = "FINISHED", *, tracking_uri: str | None = None) -> bool:
    """Mark a run FINISHED / FAILED / KILLED; False, with a warning, on failure."""
    client, uri = _client(tracking_uri)
    return _best_effort(f"end run as {status}", run_id, uri, lambda: client.set_terminated(run_id, status))


# Export: the checkpoint as run artifacts and a registered model version.
def log_model_dir(
    run_id: str, local_dir: str | Path, artifact_path: str = "model", *, tracking_uri: str | None = None
) -> str:
    """Upload a Hugging Face checkpoint folder as artifacts of the run; returns its runs:/ uri.

    Refuses pickled weight files: whoever loads the registered model must never unpickle.
    """
    folder = Path(local_dir)
    files = sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []
    if not files:
        raise PipelineError(f"{folder}: no checkpoint files to log to MLflow")
    pickled = [str(p.relative_to(folder)) for p in files if p.suffix in _PICKLE_SUFFIXES]
    if pickled:
        raise PipelineError(f"{folder}: refusing to log pickled files {pickled}; save weights as safetensors")
    client, uri = _client(tracking_uri)
    try:
        client.log_artifacts(run_id, str(folder), artifact_path)
    except Exception as exc:  # noqa: BLE001 - one line naming where it failed
        where = f"{folder} to run {run_id} at {tracking_uri_label(uri)}"
        raise PipelineError(f"cannot log {where}: {error_line(exc)}") from exc
    return f"runs:/{run_id}/{artifact_path}"


def register_model(
    run_id: str, artifact_path: str, name: str, *, source_uri: str | None = None, tracking_uri: str | None = None
) -> str:
    """Register a model version whose files are the run's `artifact_path`; returns the version number.

    Big models are never copied twice. The usual path logs the checkpoint once (`log_model_dir`) and
    registers the `runs:/<run_id>/<artifact_path>` uri: the version points at those artifacts, nothing
    is re-uploaded. When the export already lives in object storage, skip `log_model_dir` and pass
    `source_uri` (e.g. s3://bucket/exports/model): the version points at that copy, still linked to the
    run, and readers fetch it with their own storage credentials.

    The version's source is the artifacts as they are: an HF folder that carries its own MLmodel file
    (`pipeline.tracking.mlflow_model`), which `models:/` uris load with MLflow's transformers and pyfunc flavors.
    """
    client, uri = _client(tracking_uri)
    source = source_uri or f"runs:/{run_id}/{artifact_path}"
    try:
        try:
            client.create_registered_model(name)
        except MlflowException as exc:
            if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                raise
        return str(client.create_model_version(name, source, run_id=run_id).version)
    except Exception as exc:  # noqa: BLE001 - one line naming where it failed
        where = f"{redact_text(source)} as model {name!r} at {tracking_uri_label(uri)}"
        raise PipelineError(f"cannot register {where}: {error_line(exc)}") from exc


def model_version_exists(name: str, version: str, *, tracking_uri: str | None = None) -> bool:
    """Whether the registry holds `name` version `version` (deleted versions and models do not count)."""
    client, uri = _client(tracking_uri)
    try:
        client.get_model_version(name, version)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise PipelineError(f"cannot read model {name!r} version {version} at {tracking_uri_label(uri)}: "
                            f"{error_line(exc)}") from exc
    return True


def download_model_version(name: str, version: str, dst_dir: str | Path, *, tracking_uri: str | None = None) -> Path:
    """Download a registered version's files into `dst_dir`; returns the checkpoint folder to load."""
    client, uri = _client(tracking_uri)
    try:
        source = client.get_model_version_download_uri(name, version)
        Path(dst_dir).mkdir(parents=True, exist_ok=True)
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dst_dir), tracking_uri=uri))
    except Exception as exc:  # noqa: BLE001 - one line naming where it failed
        where = f"model {name!r} version {version} from {tracking_uri_label(uri)}"
        raise PipelineError(f"cannot download {where}: {error_line(exc)}") from exc
