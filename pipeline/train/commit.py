"""Committed checkpoints: a checkpoint counts once every byte of it is in storage.

An upload cut off (preempted node, storage outage) leaves a folder holding some of its files, and
bytes can change at rest. Loading either would crash the resume or continue from a state that never
existed; Ray Train does not check. Here the `COMMITTED` marker is written last, after every file and
the manifest, and a resume loads the newest checkpoint whose marker and files prove it. Damaged ones
are skipped with a warning; a storage outage is an error. Details: docs/architecture.md ("Checkpoints").
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Callable

from pipeline import storage
from pipeline.train.checkpoint import gather_bytes
from pipeline.errors import IntegrityError, PipelineError
from pipeline.storage.manifest import MANIFEST_NAME

log = logging.getLogger(__name__)

COMMIT_MARKER = "COMMITTED"
MARKER_FORMAT = 1
_CHECKPOINT_DIR = re.compile(r"^checkpoint_(\d+)-")


def upload_and_commit(local_dir: str | Path, uri: str, options: storage.StorageOptions,
                      pause: Callable[[str], None] | None = None) -> None:
    """Upload a checkpoint directory to `uri`: every file, then its manifest, then the commit marker.

    `pause` (test hooks only) is called with "before_commit" and "after_commit" around the marker."""
    storage.publish(local_dir, uri, options)  # files first, manifest.json last
    manifest = (Path(local_dir) / MANIFEST_NAME).read_bytes()
    marker = {"format": MARKER_FORMAT, "manifest_sha256": hashlib.sha256(manifest).hexdigest()}
    if pause is not None:
        pause("before_commit")
    storage.write_bytes(storage.join(uri, COMMIT_MARKER), json.dumps(marker).encode(), options)
    if pause is not None:
        pause("after_commit")


def ray_upload_fn(run_uri: str, options: storage.StorageOptions,
                  pause: Callable[[str], None] | None = None) -> Callable:
    """The `checkpoint_upload_fn` for `ray.train.report`: `upload_and_commit` into Ray's run folder."""

    def upload(checkpoint, checkpoint_dir_name: str):
        import ray.train

        upload_and_commit(checkpoint.path, storage.join(run_uri, checkpoint_dir_name), options, pause)
        context = ray.train.get_context().get_storage()
        return ray.train.Checkpoint(path=f"{context.experiment_fs_path}/{checkpoint_dir_name}",
                                    filesystem=context.storage_filesystem)

    return upload


def checkpoint_names(run_uri: str, options: storage.StorageOptions) -> list[str]:
    """Checkpoint folder names of a run in storage, newest step first."""
    found = [(int(m.group(1)), name) for name in storage.list_dirs(run_uri, options)
             if (m := _CHECKPOINT_DIR.match(name))]
    return [name for _, name in sorted(found, reverse=True)]


def verify_commit(uri: str, options: storage.StorageOptions) -> None:
    """IntegrityError unless the checkpoint at `uri` has a marker that vouches for its manifest."""
    marker_uri, manifest_uri = storage.join(uri, COMMIT_MARKER), storage.join(uri, MANIFEST_NAME)
    if not storage.exists(marker_uri, options):
        raise IntegrityError(f"no {COMMIT_MARKER} marker: its upload did not finish")
    try:
        expected = json.loads(storage.read_bytes(marker_uri, options))["manifest_sha256"]
    except (ValueError, KeyError, TypeError) as exc:
        raise IntegrityError(f"unreadable {COMMIT_MARKER} marker ({type(exc).__name__})") from None
    if not storage.exists(manifest_uri, options):
        raise IntegrityError(f"no {MANIFEST_NAME} beside its {COMMIT_MARKER} marker")
    if hashlib.sha256(storage.read_bytes(manifest_uri, options)).hexdigest() != expected:
        raise IntegrityError(f"{MANIFEST_NAME} is not the one its {COMMIT_MARKER} marker vouches for")


def newest_committed_uri(run_uri: str, options: storage.StorageOptions) -> str | None:
    """The uri of the run's newest checkpoint whose marker vouches for its manifest; None when none does.

    This, not the checkpoint Ray registered, is what training reached: a driver killed while its workers
    went on leaves checkpoints committed in storage that the next driver's Ray never heard of, and its
    workers resume from the newest of them."""
    for name in checkpoint_names(run_uri, options):
        uri = storage.join(run_uri, name)
        try:
            verify_commit(uri, options)
            return uri
        except IntegrityError as exc:
            log.warning("checkpoint %s is not a result of training: %s", uri, exc)
    return None


def pull_committed(uri: str, cache_root: str | Path, options: storage.StorageOptions) -> Path:
    """Pull a committed checkpoint into the node cache, every file checked against its manifest."""
    verify_commit(uri, options)
    return storage.pull_checkpoint(uri, cache_root, options)


def newest_committed(run_uri: str, cache_root: str | Path,
                     options: storage.StorageOptions) -> tuple[str, Path] | None:
    """(uri, local dir) of the run's newest complete, verified checkpoint; None when there is none."""
    for name in checkpoint_names(run_uri, options):
        uri = storage.join(run_uri, name)
        try:
            return uri, pull_committed(uri, cache_root, options)
        except IntegrityError as exc:
            log.warning("skipping checkpoint %s: %s; falling back to the one before it", uri, exc)
    return None


def resume_checkpoint(run_uri: str, cache_root: str | Path, options: storage.StorageOptions, *,
                      rank: int, ray_has_one: bool) -> tuple[str, Path] | None:
    """The checkpoint every rank resumes from, chosen by rank 0 (a collective: all ranks call it)."""
    chosen = newest_committed(run_uri, cache_root, options) if rank == 0 else None
    if rank == 0 and chosen is None and ray_has_one:
        raise PipelineError(f"no complete checkpoint under {run_uri} although Ray Train registered one; "
                            "every checkpoint of the run is damaged or deleted: start a new run.name")
    # "@" first: gather_bytes cannot carry an empty blob, and "no checkpoint" is the empty uri.
    uri = gather_bytes(("@" + (chosen[0] if chosen else "")).encode())[0].decode()[1:]
    if not uri:
        return None
    return chosen if chosen else (uri, pull_committed(uri, cache_root, options))
