"""The job's state file: what earlier runs of a job left for later ones, typed, saved as JSON.

`{run.output_uri}/jobs/{run.name}/state.json` holds the parent MLflow run, the job's identity and each
stage's outputs, so a later `--stages eval` finds what `train` wrote. The JSON keeps the layout it
always had: one key per field, a field never set is left out. A file this code cannot read (an
unknown key, a value of the wrong type) is a one-line error naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import json
from typing import TYPE_CHECKING, Any

from pipeline import storage
from pipeline.errors import PipelineError

if TYPE_CHECKING:
    from pipeline.stages.data import PreparedData


@dataclasses.dataclass
class ExportRecord:
    """What the export stage published."""

    uri: str
    """The exported HF checkpoint (`{output_uri}/exports/{run.name}`)."""

    version: str | None = None
    """The registered model version; None when no model name was set."""

    checkpoint_uri: str | None = None
    """The training checkpoint it was converted from."""

    settings: dict[str, Any] | None = None
    """The `export` section it was made with (registered model name, shard size)."""


LATER_EXPORT_FIELDS = ("checkpoint_uri", "settings")  # added to ExportRecord after its first layout


@dataclasses.dataclass
class JobState:
    """The job's state file, field by field."""

    identity: dict[str, Any] | None = None
    """The settings the job's checkpoints were made with (`driver.IDENTITY_KEYS`), from its first run."""

    parent_run_id: str | None = None
    """The job's MLflow parent run."""

    running: dict[str, str] | None = None
    """Stage name -> its MLflow run while the stage runs; a killed driver's stage carries on in that run."""

    data: PreparedData | None = None
    """The data stage's prepared rows."""

    checkpoint_uri: str | None = None
    """The train stage's final committed checkpoint."""

    eval: dict[str, float] | None = None
    """The eval stage's metrics."""

    export: ExportRecord | None = None
    """What the export stage published."""

    def to_json(self) -> bytes:
        raw = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        raw = {key: dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
               for key, value in raw.items() if value is not None}
        if "export" in raw:  # its later fields are written once set: a state file keeps the layout it had
            raw["export"] = {k: v for k, v in raw["export"].items() if v is not None or k not in LATER_EXPORT_FIELDS}
        return json.dumps(raw, indent=2).encode()

    @classmethod
    def from_json(cls, text: bytes | str, where: str) -> JobState:
        """The state in `text` (the file at `where`); PipelineError naming the file and key it cannot read."""
        try:
            raw = json.loads(text)
        except ValueError as exc:
            raise PipelineError(f"{where}: the job's state file is not valid JSON ({exc})") from None
        if not isinstance(raw, dict):
            raise PipelineError(f"{where}: the job's state file must hold a JSON object, not {type(raw).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise PipelineError(f"{where}: unknown key {unknown[0]!r} in the job's state file (known: "
                                f"{', '.join(sorted(known))}); it was written by another version of the pipeline")
        return cls(**{key: _field(key, value, where) for key, value in raw.items()})


def _field(key: str, value: Any, where: str) -> Any:
    """One field of the file, checked and typed."""
    # imports tokenizers: only where a state is read
    from pipeline.stages.data import PreparedData

    kinds = {"identity": dict, "parent_run_id": str, "running": dict, "data": dict, "checkpoint_uri": str,
             "eval": dict, "export": dict}
    if value is None:
        return None
    if not isinstance(value, kinds[key]):
        raise PipelineError(f"{where}: {key!r} in the job's state file must be a {kinds[key].__name__}, "
                            f"not {type(value).__name__}")
    typed = {"data": PreparedData, "export": ExportRecord}.get(key)
    if typed is None:
        return value
    try:
        return typed(**value)
    except TypeError as exc:
        raise PipelineError(f"{where}: {key!r} in the job's state file does not fit {typed.__name__} ({exc})") from None


def load_state(uri: str, options: storage.StorageOptions) -> JobState:
    """The job's state file at `uri`; an empty state when the job never ran."""
    if not storage.exists(uri, options):
        return JobState()
    return JobState.from_json(storage.read_bytes(uri, options), uri)


def save_state(state: JobState, uri: str, options: storage.StorageOptions) -> None:
    storage.write_bytes(uri, state.to_json(), options)
