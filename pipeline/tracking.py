"""MLflow tracking for the pipeline: one parent run per job, a nested run per stage, metrics off the hot path.

What this module decides:
- Only `MlflowClient` with an explicit tracking uri is used, never the fluent `mlflow.start_run` API: its
  active-run stack is process-global and thread-unsafe, and stages run in different processes (Ray
  workers, a later re-run of one stage), which pass run ids around instead.
- A job is one parent run; every stage execution is a nested run under it. The caller persists the parent
  run id; `find_or_start_parent` also finds the parent again by experiment and run name, so a stage re-run
  later attaches to the same parent. The parent's params and tags are written when it is created; a stage
  run carries its own (a re-run may differ), because MLflow params can never change once logged.
- Failing to create a run is an error (`PipelineError`, one line naming the tracking uri). Everything
  after that (params, tags, metrics, ending runs) is best effort: a warning and a count, never a crash.
- Everything logged passes through `redact` and is truncated to MLflow's length limits.
- Per-step training metrics go through `AsyncMetricLogger`: a bounded queue drained by a daemon thread with
  `MlflowClient.log_batch`, so a slow or dead server never stalls a training step. HTTP retries are MLflow's
  (MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_TIMEOUT); on top, unsent steps stay queued and are
  retried with backoff, and when the queue is full the oldest step is dropped and counted.
- Local tracking uses SQLite (`sqlite:///<dir>/mlflow.db`, artifacts beside it in `<dir>/mlartifacts`);
  one SQLite file must not be shared by several nodes, so multi-node jobs use a tracking server.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import re
import subprocess
import threading
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
    MAX_ENTITY_KEY_LENGTH,
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
)

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

CODE_VERSION_ENV = "FINETUNE_CODE_VERSION"
REDACTED = "<redacted>"
ROLE_TAG = "pipeline.role"
STAGE_TAG = "pipeline.stage"
_PARENT_TAG = "mlflow.parentRunId"
_RUN_NAME_TAG = "mlflow.runName"
_DIRTY_SUFFIX = "-dirty"
# Pickled formats run code when loaded; a registered model must load from safetensors alone.
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")

# Redaction: secrets are recognised by key words and by the shape of values (signed urls, known tokens).
_SECRET_WORDS = frozenset({
    "secret", "password", "passwd", "passphrase", "pwd", "credential", "credentials", "apikey",
    "authorization", "auth", "cookie", "signature", "privatekey",
})
_SECRET_PAIRS = frozenset({
    ("api", "key"), ("access", "key"), ("secret", "key"), ("private", "key"), ("account", "key"),
    ("ssh", "key"), ("signing", "key"), ("encryption", "key"), ("sas", "key"), ("master", "key"),
})
# "token" is a secret in `hf_token` but a vocabulary entry in `pad_token` or `eos_token_id`.
_VOCAB_TOKEN_WORDS = frozenset({"pad", "eos", "bos", "unk", "sep", "cls", "mask", "special", "added", "start"})
_SIGNED_QUERY_NAMES = frozenset({
    "x-amz-signature", "x-amz-credential", "x-amz-security-token", "x-goog-signature", "x-goog-credential",
    "signature", "sig", "token", "access_token", "api_key", "apikey", "key", "password",
})
_CAMEL_BOUNDARY = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>,\]]+")
_TOKEN_SHAPES = re.compile(
    r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b|\bhf_[A-Za-z0-9]{20,}\b|\bgh[pousr]_[A-Za-z0-9]{20,}\b"
    r"|\bBearer\s+[A-Za-z0-9._~+/=-]+|\beyJ[\w-]{5,}\.[\w-]{5,}\.[\w-]+"
    r"|-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?(?:-----END [A-Z ]*PRIVATE KEY-----|$)"
)


def is_secret_key(key: str) -> bool:
    """True for names like aws_secret_access_key, hf_token, db.password, apiKey; False for pad_token_id."""
    words = [w for w in re.split(r"[^a-z0-9]+", _CAMEL_BOUNDARY.sub("_", key).lower()) if w]
    if any(word in _SECRET_WORDS for word in words) or set(zip(words, words[1:])) & _SECRET_PAIRS:
        return True
    return any(w == "token" and (i == 0 or words[i - 1] not in _VOCAB_TOKEN_WORDS) for i, w in enumerate(words))


def _redact_url(match: re.Match[str]) -> str:
    url = match.group(0)
    parts = urllib.parse.urlsplit(url)
    netloc, query = parts.netloc, parts.query
    if "@" in netloc:  # user:password@host
        netloc = f"{REDACTED}@{netloc.rsplit('@', 1)[1]}"
    names = {name.lower() for name, _ in urllib.parse.parse_qsl(query, keep_blank_values=True)}
    if names & _SIGNED_QUERY_NAMES:
        query = REDACTED
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_text(text: str) -> str:
    """The text with signed-url queries, url passwords and well-known token formats masked."""
    return _TOKEN_SHAPES.sub(REDACTED, _URL.sub(_redact_url, text))


def redact(params: Mapping[str, Any]) -> dict[str, str]:
    """Params as MLflow strings, with secret-looking keys masked and secrets inside values masked."""
    return {str(k): REDACTED if is_secret_key(str(k)) else redact_text(str(v)) for k, v in params.items()}


def _fit(text: str, limit: int) -> str:
    """Text cut to `limit` characters, saying how much was cut, so MLflow never rejects it."""
    if len(text) <= limit:
        return text
    marker = f"...<{len(text)} chars, truncated>"
    return text[: limit - len(marker)] + marker


def _fit_key(key: str) -> str:
    """A key within MLflow's limit that stays unique: a cut key ends with a hash of the full one."""
    if len(key) <= MAX_ENTITY_KEY_LENGTH:
        return key
    return key[: MAX_ENTITY_KEY_LENGTH - 9] + "~" + hashlib.sha256(key.encode()).hexdigest()[:8]


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


def resolve_tracking_uri(uri: str | None, output_dir: str | Path | None = None) -> str:
    """The uri MLflow gets: servers pass through; local stores become absolute with their folder created.

    Empty means `<output_dir>/mlflow.db`; `sqlite:///relative.db` and plain folders resolve against the
    current directory, so every process of a job agrees on one absolute location.
    """
    if not uri:
        if output_dir is None:
            raise PipelineError("tracking.uri: empty and no output dir was given for a local MLflow database")
        return _sqlite_uri(Path(output_dir) / "mlflow.db")
    scheme = urllib.parse.urlsplit(uri).scheme
    if scheme == "sqlite":
        if not uri.startswith("sqlite:///") or uri.endswith(":memory:"):
            raise PipelineError(f"tracking.uri: {uri!r} is not a SQLite file uri like sqlite:///path/mlflow.db")
        return _sqlite_uri(Path(uri.removeprefix("sqlite:///")))
    if scheme in ("", "file"):
        folder = Path(urllib.parse.unquote(urllib.parse.urlsplit(uri).path) if scheme else uri).resolve()
        folder.mkdir(parents=True, exist_ok=True)
        return folder.as_uri()
    return uri.rstrip("/")


def _sqlite_uri(db_path: Path) -> str:
    db_path = db_path.resolve()
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


def _where(tracking_uri: str) -> str:
    return f"tracking uri {redact_text(tracking_uri)}"


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {redact_text(lines[0])[:300] if lines else 'no details'}"


# Runs.
def find_or_start_parent(
    experiment: str, run_name: str, tags: Mapping[str, Any] | None = None, *,
    params: Mapping[str, Any] | None = None, parent_id: str | None = None, tracking_uri: str | None = None,
) -> str:
    """The job's parent run id: `parent_id` if given (checked), else the newest live parent run named
    `run_name` in `experiment`, else a new one with `tags` and `params`. Raises PipelineError on failure."""
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
        where = f"MLflow parent run {run_name!r} at {_where(uri)}"
        raise PipelineError(f"cannot start {where}: {_one_line(exc)}") from exc
    if params:
        log_params(run_id, params, tracking_uri=uri)
    return run_id


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
) -> Iterator[str]:
    """A new nested run for one execution of `stage` under the parent; yields its id.

    The run ends FINISHED, FAILED when the block raises, KILLED on Ctrl-C. Running a stage again
    later makes another nested run under the same parent.
    """
    client, uri = _client(tracking_uri)
    run_tags = {**(tags or {}), _PARENT_TAG: parent_id, STAGE_TAG: stage, ROLE_TAG: "stage"}
    try:
        experiment_id = client.get_run(parent_id).info.experiment_id
        run_id = client.create_run(experiment_id, tags=_clean_tags(run_tags), run_name=stage).info.run_id
    except Exception as exc:  # noqa: BLE001 - any failure here means the stage cannot be tracked
        where = f"MLflow run of stage {stage!r} at {_where(uri)}"
        raise PipelineError(f"cannot start {where}: {_one_line(exc)}") from exc
    if params:
        log_params(run_id, params, tracking_uri=uri)
    status = RunStatus.to_string(RunStatus.FAILED)
    try:
        yield run_id
        status = RunStatus.to_string(RunStatus.FINISHED)
    except KeyboardInterrupt:
        status = RunStatus.to_string(RunStatus.KILLED)
        raise
    finally:
        end_run(run_id, status, tracking_uri=uri)


def _clean_tags(tags: Mapping[str, Any]) -> dict[str, str]:
    return {_fit_key(k): _fit(v, MAX_TAG_VAL_LENGTH) for k, v in redact(tags).items()}


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
        log.warning("MLflow: could not %s for run %s at %s: %s", action, run_id, _where(tracking_uri), _one_line(exc))
        return False


def log_params(run_id: str, params: Mapping[str, Any], *, tracking_uri: str | None = None) -> bool:
    """Log redacted, truncated params; values already logged are skipped, changed ones warned about
    (MLflow params are immutable). False, with a warning, when the server could not take them."""
    client, uri = _client(tracking_uri)
    wanted = {_fit_key(k): _fit(v, MAX_PARAM_VAL_LENGTH) for k, v in redact(params).items()}

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
        entities = [Metric(_fit_key(k), float(v), now, step) for k, v in metrics.items()]
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


# Per-step metrics, off the training thread.
class AsyncMetricLogger:
    """Per-step metrics to one run through a bounded queue and a daemon thread; `log` never blocks.

    The thread sends what is queued every `flush_every_s` (sooner once `batch_steps` steps wait) with
    `MlflowClient.log_batch`. A failed send is counted and warned about once per outage; its steps go
    back to the queue and are retried with backoff. When the queue is full the oldest step is dropped.
    """

    def __init__(self, run_id: str, tracking_uri: str | None = None, *, max_pending_steps: int = 10_000,
                 flush_every_s: float = 1.0, batch_steps: int = 100) -> None:
        self.run_id = run_id
        self.dropped = 0  # steps lost: queue overflow, rejected by the server, or unsent at close
        self.failures = 0  # failed log_batch calls
        self.sent = 0  # steps the server accepted
        self._client, self._uri = _client(tracking_uri)
        self._max_pending, self._flush_every_s, self._batch_steps = max_pending_steps, flush_every_s, batch_steps
        self._pending: collections.deque[tuple[int, int, dict[str, float]]] = collections.deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = False
        self._abandoned = False  # close() gave up on a request still in flight
        self._in_flight = 0  # steps in the request being sent
        self._in_outage = False
        self._give_up_at = float("inf")
        self._thread = threading.Thread(target=self._drain_forever, name="mlflow-metrics", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        """Steps queued and not yet accepted by the server."""
        return len(self._pending)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Queue one step's metrics. Pass Python numbers: a CUDA tensor would sync the GPU in `float()`."""
        entry = (step, int(time.time() * 1000), {key: float(value) for key, value in metrics.items()})
        with self._lock:
            if self._closing:
                self.dropped += 1
                return
            if len(self._pending) >= self._max_pending:
                self._pending.popleft()
                self.dropped += 1
            self._pending.append(entry)
            full = len(self._pending) >= self._batch_steps and not self._in_outage  # no hammering a down server
        if full:
            self._wake.set()

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
        return min(backoff, max(self._give_up_at - time.monotonic(), 0.0))

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
                log.warning("MLflow: metric logging to %s works again", _where(self._uri))
                self._in_outage = False
        return True

    def _take_batch(self) -> list[tuple[int, int, dict[str, float]]]:
        """The oldest queued steps, up to MLflow's metrics-per-request limit; none past the deadline."""
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
                        _where(self._uri), _one_line(exc), self.pending)
        self._in_outage = not rejected


def _metric_entities(batch: list[tuple[int, int, dict[str, float]]]) -> list[Metric]:
    return [Metric(_fit_key(k), value, stamp, step) for step, stamp, metrics in batch for k, value in metrics.items()]


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

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        pass

    def close(self, timeout: float = 10.0) -> bool:
        return True

    def __enter__(self) -> "NullLogger":
        return self

    def __exit__(self, *exc_info: object) -> None:
        pass


def metric_logger(rank: int, run_id: str | None, tracking_uri: str | None = None) -> AsyncMetricLogger | NullLogger:
    """An AsyncMetricLogger on rank 0 of a tracked run, a NullLogger everywhere else."""
    return AsyncMetricLogger(run_id, tracking_uri) if rank == 0 and run_id else NullLogger()


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
        raise PipelineError(f"cannot log {folder} to run {run_id} at {_where(uri)}: {_one_line(exc)}") from exc
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

    `mlflow.register_model` is not used: for a `runs:/` uri without an MLmodel file it looks for an
    MLflow-flavoured logged model, while ours is a plain Hugging Face folder.
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
        where = f"{redact_text(source)} as model {name!r} at {_where(uri)}"
        raise PipelineError(f"cannot register {where}: {_one_line(exc)}") from exc


def download_model_version(name: str, version: str, dst_dir: str | Path, *, tracking_uri: str | None = None) -> Path:
    """Download a registered version's files into `dst_dir`; returns the checkpoint folder to load."""
    client, uri = _client(tracking_uri)
    try:
        source = client.get_model_version_download_uri(name, version)
        Path(dst_dir).mkdir(parents=True, exist_ok=True)
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dst_dir), tracking_uri=uri))
    except Exception as exc:  # noqa: BLE001 - one line naming where it failed
        where = f"model {name!r} version {version} from {_where(uri)}"
        raise PipelineError(f"cannot download {where}: {_one_line(exc)}") from exc
