"""Checksums published beside every checkpoint and export, so a reader can prove what it pulled.

`manifest.json` sits in the published directory and maps each relative file name to its size and sha256:

    {"format": 1, "files": {"model-00001-of-00003.safetensors": {"size": 123, "sha256": "ab..."}, ...}}

The manifest never lists itself. Hidden files (lock files, completion markers, temp downloads) are not
part of a checkpoint and are left out. Publishing uploads the manifest last, so its presence implies the
files it lists were all uploaded first.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import IntegrityError, PipelineError

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
_HASH_CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class FileEntry:
    """What a published file must look like once downloaded."""

    size: int  # bytes
    sha256: str  # lowercase hex digest of the whole file


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a local file, read in chunks so multi-GB shards do not fill memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def publishable_files(local_dir: str | Path) -> list[str]:
    """Posix relative names of the files of `local_dir` that get published, manifest excluded, sorted."""
    root = Path(local_dir)
    names = []
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        hidden = any(part.startswith(".") for part in relative.parts)
        if path.is_file() and not hidden and relative.as_posix() != MANIFEST_NAME:
            names.append(relative.as_posix())
    return names


def build_manifest(local_dir: str | Path, known: dict[str, FileEntry] | None = None) -> dict[str, FileEntry]:
    """Size and sha256 of every publishable file in `local_dir`, keyed by posix relative name.

    `known`: entries of files hashed as they were written; each is reused when the file still has its
    size, so a multi-GB checkpoint is not read back just to hash it."""
    root = Path(local_dir)
    if not root.is_dir():
        raise PipelineError(f"cannot build manifest: {root} is not a directory")
    known = known or {}
    entries = {}
    for name in publishable_files(root):
        size = (root / name).stat().st_size
        entry = known.get(name)
        entries[name] = entry if entry is not None and entry.size == size else FileEntry(size, sha256_file(root / name))
    return entries


def manifest_bytes(entries: dict[str, FileEntry]) -> bytes:
    """The JSON encoding of a manifest, sorted so identical directories give identical bytes."""
    files = {name: {"size": e.size, "sha256": e.sha256} for name, e in sorted(entries.items())}
    return (json.dumps({"format": MANIFEST_FORMAT, "files": files}, indent=2) + "\n").encode()


def write_manifest(local_dir: str | Path, known: dict[str, FileEntry] | None = None) -> dict[str, FileEntry]:
    """Write `manifest.json` into `local_dir` describing its files; returns its entries.
    `known`: as for `build_manifest`."""
    entries = build_manifest(local_dir, known)
    (Path(local_dir) / MANIFEST_NAME).write_bytes(manifest_bytes(entries))
    return entries


def parse_manifest(data: bytes, where: str) -> dict[str, FileEntry]:
    """Decode manifest bytes read from `where`; any structural problem is a PipelineError naming it."""
    try:
        files = json.loads(data)["files"]
        entries = {str(n): FileEntry(int(e["size"]), str(e["sha256"]).lower()) for n, e in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise IntegrityError(f"malformed manifest {where}: {type(exc).__name__}: {exc}") from None
    return entries


def read_manifest(local_dir: str | Path) -> dict[str, FileEntry]:
    """The manifest of a local directory; a PipelineError when it is missing or malformed."""
    path = Path(local_dir) / MANIFEST_NAME
    if not path.is_file():
        raise PipelineError(f"no {MANIFEST_NAME} in {local_dir}")
    return parse_manifest(path.read_bytes(), str(path))


def verify_file(path: str | Path, entry: FileEntry, name: str) -> None:
    """Raise a PipelineError naming `name` unless the file at `path` has the entry's size and sha256."""
    size = Path(path).stat().st_size
    if size != entry.size:
        raise IntegrityError(f"size mismatch for {name}: {size} bytes, manifest says {entry.size}")
    actual = sha256_file(path)
    if actual != entry.sha256:
        raise IntegrityError(f"sha256 mismatch for {name}: got {actual}, manifest says {entry.sha256}")


def verify_dir(local_dir: str | Path, names: list[str] | None = None) -> None:
    """Check files of `local_dir` against its manifest: all of them, or only `names` when given."""
    entries = read_manifest(local_dir)
    for name in names if names is not None else sorted(entries):
        if name not in entries:
            raise PipelineError(f"{name} is not listed in the manifest of {local_dir}")
        path = Path(local_dir) / name
        if not path.is_file():
            raise PipelineError(f"{name} is listed in the manifest of {local_dir} but missing")
        verify_file(path, entries[name], name)
