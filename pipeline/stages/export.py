"""Export: the fine-tuned weights as a standard Hugging Face checkpoint, published and registered.

Training writes TE-style parameters; users load plain `AutoModelForCausalLM` checkpoints. This stage
converts one into the other (`convert`, on the CPU, no GPU needed). It publishes the result at
`{run.output_uri}/exports/{run.name}/` and registers it in MLflow. The folder is also an MLflow
transformers model, so it loads with `from_pretrained` and `mlflow.transformers.load_model` alike.
The weights are serialized once, into one local folder, and every copy is a file upload from there.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

import te_model
from pipeline import progress, storage, tracking
from pipeline.config import Config
from pipeline.stages.data import TOKENIZER_FILES
from pipeline.errors import PipelineError
from pipeline.job.resolved import storage_options
from pipeline.stages.evaluate import load_trained_model, local_base, model_dtype, trained_weights
from pipeline.tracking.mlflow_model import MLMODEL_FILE, write_mlflow_model
from pipeline.storage.manifest import MANIFEST_NAME, FileEntry, parse_manifest, read_manifest, write_manifest

log = logging.getLogger(__name__)
# what MLflow writes into every MLmodel anew: a random id and the time of writing
MLMODEL_STAMPS = ("model_uuid", "utc_time_created")

MODEL_ARTIFACT_PATH = "model"
_CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


@dataclass(frozen=True)
class ExportResult:
    """Where the export went."""

    uri: str  # {run.output_uri}/exports/{run.name}
    local_dir: Path  # the converted checkpoint on this node (loadable with AutoModelForCausalLM)
    version: str | None  # registered model version; None when not registered
    reused: bool = False  # an identical export was already at `uri`: nothing was uploaded there


def export_uri(cfg: Config) -> str:
    """Where the export of this run is published."""
    return storage.join(cfg.run.output_uri, "exports", cfg.run.name)


def export_dir(cfg: Config) -> Path:
    """The node-local directory `convert` writes by default; each conversion replaces it (a cache)."""
    return Path(cfg.run.cache_dir) / "exports" / cfg.run.name


# ---------------------------------------------------------------------------------------------------
# conversion


def copy_tokenizer(base_dir: Path, out_dir: Path, chat_template: str | None) -> list[str]:
    """Copy the base's tokenizer files (never pickles: a fixed list of names) and apply `chat_template`."""
    skipped = _CHAT_TEMPLATE_FILES if chat_template else ()
    copied = [name for name in TOKENIZER_FILES if (base_dir / name).is_file() and name not in skipped]
    if "tokenizer_config.json" not in copied and "tokenizer.json" not in copied:
        raise PipelineError(f"{base_dir}: no tokenizer files (tokenizer.json, tokenizer_config.json) to export")
    for name in copied:
        shutil.copyfile(base_dir / name, out_dir / name)
    if chat_template:
        config_path = out_dir / "tokenizer_config.json"
        try:
            config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        except json.JSONDecodeError as exc:
            raise PipelineError(f"{base_dir / 'tokenizer_config.json'}: invalid JSON ({exc.msg})") from None
        config["chat_template"] = chat_template
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return copied


def _conversion_source(cfg: Config, base: Path, checkpoint: Path) -> str:
    """What a conversion depends on: the weights file, the base it maps onto, the export settings."""
    weights = (checkpoint / "model.safetensors").stat()
    parts = [str(checkpoint.resolve()), str(weights.st_size), str(weights.st_mtime_ns), str(base.resolve()),
             cfg.model.dtype, cfg.export.max_shard_size, cfg.data.chat_template or ""]
    return json.dumps(parts)


def convert(
    cfg: Config,
    base_dir: str | Path,
    checkpoint_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    options: storage.StorageOptions | None = None,
) -> Path:
    """Write the trained checkpoint as a loadable HF checkpoint (weights, config, tokenizer, manifest).

    It loads the checkpoint on the CPU with the torch backend (TE-style names are the same for both
    backends), in `model.dtype`. It writes sharded safetensors (`export.max_shard_size`), the base's
    tokenizer files, and the base's `generation_config.json`. The stop tokens and sampling defaults
    are the base's; the model config alone would lose Llama 3's `<|eot_id|>`, for example.

    `data.chat_template`, when set, is what the model was trained with, so it goes into
    `tokenizer_config.json`. The base's `chat_template.jinja`/`.json` are then left out: transformers
    prefers those files over the config entry.

    `out_dir` (default `export_dir(cfg)`) is replaced as a whole: the new directory is built beside it
    and swapped in, so a reader never sees a half-written export. Only a directory an earlier conversion
    made (its `.source` stamp beside it) is replaced; anything else there is a PipelineError.
    """
    options = options or storage_options(cfg)
    base = local_base(base_dir, cfg, options)
    checkpoint = trained_weights(checkpoint_dir, cfg, options)
    target = Path(out_dir) if out_dir is not None else export_dir(cfg)
    stamp = target.parent / f"{target.name}.source"  # which checkpoint `target` was converted from
    source = _conversion_source(cfg, base, checkpoint)
    if target.is_dir() and stamp.is_file() and stamp.read_text() == source:
        return target  # eval converted this checkpoint already on this node
    if target.exists() and not stamp.is_file():  # only a folder an earlier conversion made is ever replaced
        raise PipelineError(f"{target} exists but was not written by an export of this job (no {stamp.name} "
                            "beside it); move it away, or choose another run.cache_dir or run.name")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model = load_trained_model(checkpoint, base, backend="torch", dtype=model_dtype(cfg), device="cpu")
        te_model.save_hf_checkpoint(model, staging, max_shard_size=cfg.export.max_shard_size)
        del model
        if (base / "generation_config.json").is_file():
            shutil.copyfile(base / "generation_config.json", staging / "generation_config.json")
        tokenizer_files = copy_tokenizer(base, staging, cfg.data.chat_template)
        write_mlflow_model(staging, tokenizer_files, source_model=cfg.model.base_uri)
        write_manifest(staging)
        stamp.write_text("")  # claims `target` before it exists, so a crash right after leaves it ours
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
        stamp.write_text(source)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    shards = sorted(target.glob("*.safetensors"))
    progress.echo("export", f"converted to {len(shards)} safetensors shard(s), "
                            f"{progress.megabytes(sum(p.stat().st_size for p in shards))} in {target}")
    return target


# ---------------------------------------------------------------------------------------------------
# publishing and registration


def _published_manifest(uri: str, options: storage.StorageOptions | None) -> dict[str, FileEntry] | None:
    manifest_uri = storage.join(uri, MANIFEST_NAME)
    if not storage.exists(manifest_uri, options):
        return None
    return parse_manifest(storage.read_bytes(manifest_uri, options), manifest_uri)


def _same_mlmodel(local_dir: Path, uri: str, options: storage.StorageOptions | None) -> bool:
    """Whether the MLmodel at `uri` is the one in `local_dir` but for the id and time MLflow stamps each
    description it writes with: the same checkpoint converted again (on another node, or after its
    cached conversion was cleared) is the same export."""
    def content(text: bytes | str) -> dict:
        described = yaml.safe_load(text) or {}
        return {k: v for k, v in described.items() if k not in MLMODEL_STAMPS}

    published = storage.read_bytes(storage.join(uri, MLMODEL_FILE), options)
    return content(published) == content((local_dir / MLMODEL_FILE).read_text())


def publish_export(local_dir: Path, uri: str, options: storage.StorageOptions | None = None) -> bool:
    """Publish `local_dir` at `uri` unless an export is there already; True when an identical one was.

    A different export at `uri` is a PipelineError naming the uri and a file that differs: publishing
    never silently replaces an export. A re-run of the same job converts to the same bytes, but for the
    id and time in the MLflow description (`_same_mlmodel`), so it counts as identical and nothing is
    uploaded. Files under the uri without a manifest are a publish
    that died midway. They are overwritten, with a warning, and the manifest, uploaded last, completes
    the export.
    """
    entries = read_manifest(local_dir)
    existing = _published_manifest(uri, options)
    if existing == entries:
        log.info("export at %s is identical to %s: nothing to upload", uri, local_dir)
        return True
    if existing is not None:
        differing = sorted(n for n in set(entries) | set(existing) if entries.get(n) != existing.get(n))
        if differing == [MLMODEL_FILE] and _same_mlmodel(local_dir, uri, options):
            log.info("export at %s is %s converted again (only MLflow's stamps differ): nothing to upload",
                     uri, local_dir)
            return True
        raise PipelineError(
            f"a different export already exists at {uri} ({len(differing)} file(s) differ, e.g. {differing[0]}); "
            "refusing to overwrite it: choose another run.name or delete it first")
    if storage.exists(uri, options):
        log.warning("%s holds files but no %s (an interrupted publish?): overwriting them", uri, MANIFEST_NAME)
    size, started = sum(entry.size for entry in entries.values()), time.monotonic()
    progress.echo("export", f"uploading {len(entries)} files, {progress.megabytes(size)} to {uri}")
    storage.publish(local_dir, uri, options)
    seconds = time.monotonic() - started
    progress.echo("export", f"uploaded {progress.megabytes(size)} to {uri} in {progress.duration(seconds)} "
                            f"({size / 1e6 / max(seconds, 1e-3):,.1f} MB/s)")
    return False


def register_export(
    run_id: str, local_dir: Path, model_name: str | None, tracking_uri: str, export_location: str
) -> str | None:
    """Log `local_dir` as the run's `model/` artifacts and register it as `model_name`; the version.

    Nothing is re-serialized: `mlflow.transformers` logging would load the model again and save it a
    second time. The MLflow model description (`pipeline.tracking.mlflow_model`) sits beside the weights instead.
    The registered version uploads nothing: its source is the `runs:/<run_id>/model` uri of these
    artifacts, so the registry and the run share one copy. A version pointing at the object-storage
    copy would skip this upload, but readers of the registry would then need storage credentials.
    """
    size, started = sum(p.stat().st_size for p in local_dir.rglob("*") if p.is_file()), time.monotonic()
    progress.echo("export", f"logging {progress.megabytes(size)} as MLflow model artifacts of run {run_id}")
    tracking.log_model_dir(run_id, local_dir, MODEL_ARTIFACT_PATH, tracking_uri=tracking_uri)
    progress.echo("export", f"logged {progress.megabytes(size)} in {progress.duration(time.monotonic() - started)}")
    version = None
    if model_name is None:
        log.info("export.registered_model_name is not set: the export is not registered")
    else:
        version = tracking.register_model(run_id, MODEL_ARTIFACT_PATH, model_name, tracking_uri=tracking_uri)
    tracking.set_tags(run_id, export_tags(export_location, version), tracking_uri=tracking_uri)
    return version


def export_tags(export_location: str, version: str | None) -> dict[str, str]:
    """The export stage run's tags: where the export is, and its registered version if it has one."""
    return {"export.uri": export_location, **({"export.registered_version": version} if version else {})}


def export(
    cfg: Config,
    base_dir: str | Path,
    checkpoint_dir: str | Path,
    *,
    run_id: str | None = None,
    tracking_uri: str | None = None,
    options: storage.StorageOptions | None = None,
) -> ExportResult:
    """Convert, publish to `export_uri(cfg)`, and (with `run_id`) log to MLflow and register.

    `tracking_uri` (resolved, as a job's `ResolvedJob.tracking.uri`) defaults to `tracking.uri` of the config.
    """
    options = options or storage_options(cfg)
    local_dir = convert(cfg, base_dir, checkpoint_dir, options=options)
    uri = export_uri(cfg)
    reused = publish_export(local_dir, uri, options)
    version = None
    if run_id is not None:
        resolved = tracking_uri or tracking.resolve_tracking_uri(cfg.tracking.uri)
        version = register_export(run_id, local_dir, cfg.export.registered_model_name, resolved, uri)
    return ExportResult(uri=uri, local_dir=local_dir, version=version, reused=reused)
