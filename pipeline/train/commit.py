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
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import ray.train

from pipeline.train import checkpoint as ckpt
from pipeline import progress as progress_lines
from pipeline import storage
from pipeline.train.checkpoint import gather_bytes
from pipeline.errors import IntegrityError, PipelineError
from pipeline.storage.manifest import MANIFEST_NAME, FileEntry

log = logging.getLogger(__name__)

COMMIT_MARKER = "COMMITTED"
MARKER_FORMAT = 1
_CHECKPOINT_DIR = re.compile(r"^checkpoint_(\d+)-")


def upload_and_commit(local_dir: str | Path, uri: str, options: storage.StorageOptions,
                      known: dict[str, FileEntry] | None = None,
                      pause: Callable[[str], None] | None = None) -> None:
    """Upload a checkpoint directory to `uri`: every file, then its manifest, then the commit marker.

    `known`: the entries of files hashed as they were written (what `checkpoint.write_snapshot`
    returns), reused for the files that still have their sizes. `pause` (test hooks only) is called
    with "before_commit" and "after_commit" around the marker."""
    storage.publish(local_dir, uri, options, known)  # files first, manifest.json last
    commit_in_place(local_dir, uri, options, pause)


def commit_in_place(local_dir: str | Path, uri: str, options: storage.StorageOptions,
                    pause: Callable[[str], None] | None = None) -> None:
    """Write the commit marker of the checkpoint at `uri`, whose files and manifest (those of `local_dir`)
    are all there already."""
    manifest = (Path(local_dir) / MANIFEST_NAME).read_bytes()
    marker = {"format": MARKER_FORMAT, "manifest_sha256": hashlib.sha256(manifest).hexdigest()}
    if pause is not None:
        pause("before_commit")
    storage.write_bytes(storage.join(uri, COMMIT_MARKER), json.dumps(marker).encode(), options)
    if pause is not None:
        pause("after_commit")


@dataclass
class CheckpointTimes:
    """What one checkpoint cost, on rank 0."""

    step: int
    """The optimizer step it holds."""

    stall_s: float = 0.0
    """Seconds the training loop was blocked: the previous upload waited for, the snapshot, the report."""

    waited_s: float = 0.0
    """The part of `stall_s` spent waiting for the previous checkpoint's upload (the writer fell behind)."""

    upload_s: float | None = None
    """Seconds to write, upload and commit it in the background; None until it is committed."""

    size_bytes: int = 0
    """Bytes of tensor data in it (the host snapshot's size)."""


@dataclass
class _Upload:
    """The checkpoint being written and uploaded on Ray's upload thread."""

    times: CheckpointTimes
    sealed: threading.Event  # set once the snapshot has its trainer_state.json
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


class Checkpointer:
    """Checkpoints that training does not wait for: a snapshot in the loop, the rest in the background.

    `save` (every rank; a collective) waits for the previous upload if it is still running (at most
    one in flight: the host buffers are reused), takes a host snapshot (`checkpoint.snapshot`) and
    reports it with `ray.train.report(checkpoint_upload_mode=ASYNC)`. Ray's one upload thread then runs
    our upload function: write the directory from the snapshot, then `upload_and_commit`. Ray registers
    the checkpoint only after that function returns, and raises a failed upload in the training thread.
    `finish` waits for the upload in flight; the loop calls it before it returns.
    """

    def __init__(self, *, rank: int, world: int, run_uri: str, options: storage.StorageOptions,
                 module, optimizer, scheduler, run_state: dict[str, Any],
                 pause: Callable[[str, int], None] | None = None) -> None:
        """`run_state`: what every trainer_state.json carries besides the progress (config, data uri,
        code version). `pause(phase, step)`: test hooks around the commit marker."""
        self.rank, self.world, self.run_uri, self.options = rank, world, run_uri, options
        self.module, self.optimizer, self.scheduler = module, optimizer, scheduler
        self.run_state, self.pause = run_state, pause
        self.buffers = ckpt.HostBuffers() if rank == 0 else None
        self.times: list[CheckpointTimes] = []
        self._upload: _Upload | None = None

    def save(self, progress, metrics: dict[str, Any], *, wait: bool = False) -> None:
        """Checkpoint `progress` (step, tokens_seen, resumed_from_step, epoch, offset, history; its
        checkpoint_step is set) with `metrics`, the step's own dict. That dict gets `checkpoint_stall_s`
        now and `checkpoint_upload_s` once committed, before MLflow sees it. `wait`: return only once
        this checkpoint is committed (a preemption's checkpoint)."""
        started = time.perf_counter()
        times = CheckpointTimes(progress.step)
        self._wait()
        times.waited_s = time.perf_counter() - started
        ranks = ckpt.gather_rank_files(ckpt.rank_files({"epoch": progress.epoch, "offset": progress.offset}))
        snap = ckpt.snapshot(module=self.module, optimizer=self.optimizer, scheduler=self.scheduler,
                             ranks=ranks, buffers=self.buffers)
        progress.checkpoint_step = progress.step
        name = f"checkpoint_{progress.step:06d}-{uuid.uuid4().hex[:8]}"
        upload = _Upload(times, sealed=threading.Event())
        if snap is None:
            ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name,
                             checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC)
        else:
            local = tempfile.mkdtemp(prefix="train-checkpoint-")
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(local), checkpoint_dir_name=name,
                             checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
                             delete_local_checkpoint_after_upload=False,
                             checkpoint_upload_fn=self._upload_fn(snap, upload, metrics))
            self._upload = upload
            self.times.append(times)
        times.stall_s = metrics["checkpoint_stall_s"] = time.perf_counter() - started
        if snap is not None:
            # The history is encoded now, stall included: the loop appends to it while the upload runs.
            times.size_bytes = snap.nbytes
            state = {"step": progress.step, "tokens_seen": progress.tokens_seen,
                     "resumed_from_step": progress.resumed_from_step, **self.run_state, "metrics": progress.history}
            try:
                ckpt.with_trainer_state(snap, state, self.world)
            finally:
                upload.sealed.set()
        if wait:  # the run stops after this checkpoint: not a stall of training
            self._wait()

    def prepare(self) -> None:
        """Start allocating rank 0's host buffers in the background: call once, when the optimizer has
        state, so the first checkpoint does not stall on pinning tens of GB of host memory."""
        if self.buffers is not None:
            ckpt.reserve_buffers(self.module, self.optimizer, self.buffers)

    def finish(self) -> list[CheckpointTimes]:
        """Wait for the upload in flight (a failed one raises); what every checkpoint of this attempt cost."""
        self._wait()
        return self.times

    def close(self) -> None:
        """On the way out of a failed loop: let the upload in flight finish, its failure only logged."""
        try:
            self._wait()
        except PipelineError as exc:
            log.warning("%s", exc)

    def _wait(self) -> None:
        upload, self._upload = self._upload, None
        if upload is None:
            return
        upload.done.wait()
        if upload.error is not None:
            raise PipelineError(f"checkpoint of step {upload.times.step} was not committed: "
                                f"{type(upload.error).__name__}: {upload.error}") from upload.error

    def _upload_fn(self, snap: ckpt.Snapshot, upload: _Upload, metrics: dict[str, Any]) -> Callable:
        """The `checkpoint_upload_fn` Ray runs on its upload thread for this checkpoint."""
        step = upload.times.step
        pause = (lambda phase: self.pause(phase, step)) if self.pause else None

        def write_upload_commit(checkpoint, checkpoint_dir_name: str):
            started = time.perf_counter()
            try:
                upload.sealed.wait()
                if ckpt.TRAINER_STATE_FILE not in snap.files:  # the loop failed before it was sealed
                    raise PipelineError(f"checkpoint of step {step} has no {ckpt.TRAINER_STATE_FILE}")
                uri = storage.join(self.run_uri, checkpoint_dir_name)
                local = storage.writable_local_path(uri)
                if local is not None:  # a local or mounted output: written in place, no staging copy
                    ckpt.write_snapshot(local, snap)
                    commit_in_place(local, uri, self.options, pause)
                else:
                    known = ckpt.write_snapshot(checkpoint.path, snap)
                    upload_and_commit(checkpoint.path, uri, self.options, known, pause)
                upload.times.upload_s = metrics["checkpoint_upload_s"] = time.perf_counter() - started
                progress_lines.echo("train", f"checkpoint of step {step} committed: "
                                             f"{progress_lines.megabytes(upload.times.size_bytes)} in "
                                             f"{upload.times.upload_s:.1f} s, training blocked "
                                             f"{upload.times.stall_s:.2f} s ({upload.times.waited_s:.2f} s of it "
                                             f"for the previous checkpoint)")
                context = ray.train.get_context().get_storage()
                return ray.train.Checkpoint(path=f"{context.experiment_fs_path}/{checkpoint_dir_name}",
                                            filesystem=context.storage_filesystem)
            except BaseException as exc:
                upload.error = exc
                raise
            finally:
                shutil.rmtree(checkpoint.path, ignore_errors=True)
                upload.done.set()

        return write_upload_commit


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
    """A committed checkpoint on this node, every file checked against its manifest: pulled into the node
    cache, or read where it is when it is on this machine (`storage.checkpoint_dir`)."""
    verify_commit(uri, options)
    return storage.checkpoint_dir(uri, cache_root, options)


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
