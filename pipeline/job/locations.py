"""Where a job's relative output locations resolve when it runs under `ray job submit --working-dir`.

Ray unpacks the submitted working directory into a per-job temporary folder and deletes it later. A
relative `run.output_uri`, `run.cache_dir` or local `tracking.uri` resolved there would vanish with it.
Under such a job they resolve against a base that lasts: $FINETUNE_BASE_DIR when set, else
`~/finetune` of the job's user. Absolute paths, s3:// and http(s):// locations are left alone, and so
are inputs, which ship with the working directory on purpose. The job prints where each one went.
"""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Mapping
from pathlib import Path

from pipeline.config import Config

BASE_DIR_ENV = "FINETUNE_BASE_DIR"
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray in the driver of a submitted job
_OUTPUT_KEYS = (("run", "output_uri"), ("run", "cache_dir"))


def in_ray_working_dir(environ: Mapping[str, str], cwd: Path) -> bool:
    """True in the driver of a Ray job whose working directory is Ray's unpacked (temporary) copy."""
    return bool(environ.get(RAY_JOB_ENV)) and "runtime_resources" in cwd.resolve().parts


def lasting_base(environ: Mapping[str, str]) -> Path:
    return Path(environ.get(BASE_DIR_ENV) or Path.home() / "finetune").expanduser().resolve()


def _relative_local(uri: str) -> bool:
    return "://" not in uri and not Path(uri).expanduser().is_absolute()


def _relative_tracking(uri: str, base: Path) -> str | None:
    """The tracking uri moved under `base` when it is a relative local store; None otherwise."""
    if uri.startswith("sqlite:///"):
        path = uri.removeprefix("sqlite:///")
        return None if Path(path).is_absolute() else f"sqlite:///{base / path}"
    if urllib.parse.urlsplit(uri).scheme == "" and _relative_local(uri):
        return str(base / uri)
    return None


def lasting_locations(cfg: Config, environ: Mapping[str, str] | None = None,
                      cwd: Path | None = None) -> tuple[Config, list[str]]:
    """`cfg` with its relative output locations under the lasting base when run in Ray's temporary
    working directory (else unchanged); and a description of each move (`run.output_uri: a -> b`)."""
    environ = os.environ if environ is None else environ
    if not in_ray_working_dir(environ, cwd or Path.cwd()):
        return cfg, []
    base = lasting_base(environ)
    raw, moved = cfg.to_dict(), []
    for section, key in _OUTPUT_KEYS:
        value = raw[section][key]
        if _relative_local(value):
            raw[section][key] = str(base / value)
            moved.append(f"{section}.{key}: {value} -> {raw[section][key]}")
    tracking = _relative_tracking(raw["tracking"]["uri"], base)
    if tracking is not None:
        moved.append(f"tracking.uri: {raw['tracking']['uri']} -> {tracking}")
        raw["tracking"]["uri"] = tracking
    return Config.from_dict(raw), moved
