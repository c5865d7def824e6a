"""Errors no restart can fix stop a training run at their first occurrence.

Ray Train restarts the worker group after any worker error, and its failure policy cannot be told
that an error is permanent (`is_permanent`: bad input such as a tensor that does not fit, FP8 that
cannot run, too few rows). So a failing worker writes a one-line record into the run's folder before
raising. Every (re)started group looks for it first and, when found, ends at once, so Ray makes no more
restarts. The record names its attempt, so a record from an earlier, since-fixed attempt stops nothing.
"""

from __future__ import annotations

import json
import logging
import uuid

import torch
import torch.distributed as dist

from pipeline import storage
from pipeline.errors import PermanentError, PipelineError
from te_model import CheckpointError, FP8UnsupportedError, GraphsUnsupportedError, UnsupportedRopeError

log = logging.getLogger(__name__)

RECORD_NAME = "permanent_error.json"
# Raised where no retry changes the outcome: our own input errors, the model package's input errors, and
# a local folder this process may not write.
PERMANENT_TYPES = (PermanentError, CheckpointError, FP8UnsupportedError, GraphsUnsupportedError, UnsupportedRopeError,
                   PermissionError)


def is_permanent(exc: BaseException) -> bool:
    return isinstance(exc, PERMANENT_TYPES)


def new_attempt() -> str:
    return uuid.uuid4().hex


def record_uri(run_uri: str) -> str:
    return storage.join(run_uri, RECORD_NAME)


def clear(run_uri: str, options: storage.StorageOptions) -> None:
    """Delete the record an earlier attempt left (driver side, before training starts)."""
    uri = record_uri(run_uri)
    if storage.exists(uri, options):
        fs, path = storage.filesystem(uri, options)
        fs.rm(path)


def write(run_uri: str, attempt: str, rank: int, exc: BaseException, options: storage.StorageOptions) -> None:
    """Record `exc` as this attempt's reason to stop; a failed write leaves the error to Ray's retries."""
    record = {"attempt": attempt, "rank": rank, "reason": one_line(exc)}
    try:
        storage.write_bytes(record_uri(run_uri), json.dumps(record).encode(), options)
    except (PipelineError, OSError) as failure:
        log.warning("rank %d: permanent error not recorded (%s); Ray may restart the run", rank, failure)


def read(run_uri: str, attempt: str, options: storage.StorageOptions) -> str | None:
    """The recorded reason of this attempt as `rank R: reason`; None when there is none (or it is unreadable)."""
    uri = record_uri(run_uri)
    try:
        if not storage.exists(uri, options):
            return None
        record = json.loads(storage.read_bytes(uri, options))
    except (PipelineError, OSError, ValueError) as failure:
        log.warning("permanent-error record %s not readable (%s)", uri, failure)
        return None
    if not isinstance(record, dict) or record.get("attempt") != attempt:
        return None
    return f"rank {record.get('rank')}: {record.get('reason')}"


def agreed_reason(run_uri: str, attempt: str, rank: int, options: storage.StorageOptions,
                  device: torch.device) -> str | None:
    """`read` on rank 0, the same answer on every rank (over `device`'s process group): all end, or none.

    A group that ends this way builds nothing. Ray sees the run finish, and the driver raises the
    recorded reason with no advice to resume. Anything else (a killed worker, a lost node, a storage
    outage, a preemption) stays Ray's to retry.
    """
    answer = [read(run_uri, attempt, options) if rank == 0 else None]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(answer, src=0, device=device)
    return answer[0]


def one_line(exc: BaseException) -> str:
    """Our errors' own line; others prefixed with their type (`PermissionError: [Errno 13] ...`)."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
    return (text if isinstance(exc, PipelineError) else f"{type(exc).__name__}: {text}")[:500]
