"""Object storage for checkpoints and exports: one small API over `s3://`, `file://` and local paths.

fsspec/s3fs does the I/O; any S3-compatible endpoint works. Credentials come only from the standard
AWS chain, and error messages carry the uri and the failure, nothing else. Local writes are atomic, and
`publish` uploads the manifest last, so a reader never sees half a file or half a checkpoint.
`pull_checkpoint` fills a node-local cache once per node, verified against the manifest. Data that does
not match its manifest is an `IntegrityError`, never confused with a plain storage failure.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import botocore.exceptions
import fsspec
import s3fs
from fsspec import AbstractFileSystem

from pipeline.storage import hub
from pipeline.errors import IntegrityError, PipelineError
from pipeline.storage.manifest import (
    MANIFEST_NAME,
    FileEntry,
    parse_manifest,
    publishable_files,
    read_manifest,
    sha256_file,
    verify_file,
    write_manifest,
)

log = logging.getLogger(__name__)

_CHUNK = 8 * 1024 * 1024
_COMPLETE_MARKER = ".complete"
_LOCK_NAME = ".lock"
_PART_SUFFIX = ".part"
# An allowlist, not a denylist: *.bin/*.pt/*.pkl/*.pth may hold pickles and must never reach a loader.
_CHECKPOINT_SUFFIXES = (".safetensors", ".json", ".txt", ".jinja")
_CHECKPOINT_NAMES = ("tokenizer.model",)
_STORAGE_ERRORS = (OSError, botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError)
_S3_CALL_TRIES = 1
_TRANSIENT_HINT = " (still failing after retries: check the endpoint, or raise storage.max_attempts/read_timeout_s)"


@dataclass(frozen=True)
class StorageOptions:
    """How to reach object storage. Credentials are deliberately absent: they come from the AWS chain.

    Transient S3 failures (5xx, throttling, connection errors, timeouts) are retried by botocore's
    "standard" mode: `max_attempts` tries with exponential backoff and jitter. Every request is bounded
    by the connect and read timeouts, so a dead endpoint ends in a PipelineError naming the uri, never a
    hang. s3fs's own retry loop is cut to one try (`_S3_CALL_TRIES`). Its tries multiply botocore's (and
    nest, in `cat_file`), which would stretch a persistent stall to many times `max_attempts` timeouts.
    The price: a failure while reading a response body, which botocore does not retry, fails the call.
    The caller (a checkpoint pull, a training attempt) is then retried as a whole. Ray Train writes
    checkpoints through this same filesystem.
    """

    endpoint_url: str | None = None
    """S3-compatible endpoint such as http://minio:9000; None falls back to AWS_ENDPOINT_URL, then AWS."""

    region: str | None = None
    """Region used to sign requests; None lets botocore resolve it (AWS_DEFAULT_REGION, ~/.aws/config)."""

    max_attempts: int = 5
    """Tries per S3 request, the first included, before its failure is an error (botocore standard mode:
    5xx, throttling, connection errors and timeouts, exponential backoff with jitter)."""

    connect_timeout_s: float = 10.0
    """Seconds to open a connection to the endpoint before that try fails."""

    read_timeout_s: float = 60.0
    """Seconds without a byte from the endpoint (headers or body) before that try fails."""

    @classmethod
    def from_config(cls, section) -> "StorageOptions":
        """The options of a `pipeline.config.StorageConfig` section."""
        return cls(section.endpoint_url, section.region, section.max_attempts, section.connect_timeout_s,
                   section.read_timeout_s)


def _describe(exc: BaseException) -> str:
    """Exception class and the first line of its message, short enough for a one-line error.

    s3fs turns botocore's ClientError into a bare OSError; the ClientError it keeps as the cause names
    the S3 error code, the operation and the retries, so that is the one described.
    """
    if isinstance(exc.__cause__, botocore.exceptions.ClientError):
        exc = exc.__cause__
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0][:300] if lines else 'no details'}"
    return text + (_TRANSIENT_HINT if _is_transient(exc) else "")


def _is_transient(exc: BaseException) -> bool:
    """Whether `exc` is a failure that retries were meant to outlast (5xx, throttling, timeouts)."""
    if isinstance(exc, botocore.exceptions.ClientError):
        return exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) >= 500
    transient = (TimeoutError, botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError)
    return isinstance(exc, transient) or "timeout" in type(exc).__name__.lower()


@contextmanager
def _storage_errors(action: str, uri: str) -> Iterator[None]:
    """Turn fsspec/botocore failures into a one-line PipelineError naming the action and the uri."""
    try:
        yield
    except PipelineError:
        raise
    except FileNotFoundError:
        raise PipelineError(f"cannot {action} {uri}: not found") from None
    except _STORAGE_ERRORS as exc:
        raise PipelineError(f"cannot {action} {uri}: {_describe(exc)}") from None


class _S3FileSystem(s3fs.S3FileSystem):
    """s3fs with its own retry loop cut to `_S3_CALL_TRIES` (a class attribute: it survives pickling,
    so Ray's copies of the filesystem keep it)."""

    retries = _S3_CALL_TRIES


def _s3_filesystem(options: StorageOptions) -> AbstractFileSystem:
    endpoint_url = options.endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
    client_kwargs = {"endpoint_url": endpoint_url, "region_name": options.region}
    config_kwargs = {"retries": {"total_max_attempts": options.max_attempts, "mode": "standard"},
                     "connect_timeout": options.connect_timeout_s, "read_timeout": options.read_timeout_s}
    # No listing cache: another node may publish between two listings made by this process.
    return _S3FileSystem(
        client_kwargs={k: v for k, v in client_kwargs.items() if v}, config_kwargs=config_kwargs,
        use_listings_cache=False,
    )


def filesystem(uri: str, options: StorageOptions | None = None) -> tuple[AbstractFileSystem, str]:
    """The filesystem serving `uri` and the path to pass to it ("bucket/key" for S3, absolute locally)."""
    if uri.startswith("s3://"):
        path = uri[len("s3://") :].strip("/")
        if not path:
            raise PipelineError(f"s3 uri names no bucket: {uri!r}")
        return _s3_filesystem(options or StorageOptions()), path
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    elif uri.startswith(hub.SCHEME):
        uri = str(hub.local_path(uri))  # read-only: the node's Hugging Face cache (pipeline.storage.hub)
    elif "://" in uri:
        raise PipelineError(f"unsupported storage uri {uri!r}: use s3://, file://, hf:// or a local path")
    return fsspec.filesystem("file", auto_mkdir=True), os.path.abspath(os.path.expanduser(uri))


def _is_local(fs: AbstractFileSystem) -> bool:
    return "file" in fs.protocol


def writable_local_path(uri: str) -> Path | None:
    """The folder `uri` names on this machine (a local path or file://), None for object storage and hf://."""
    if uri.startswith(hub.SCHEME) or uri.startswith("s3://"):
        return None
    fs, path = filesystem(uri)
    return Path(path) if _is_local(fs) else None


def join(uri: str, *parts: str) -> str:
    """`uri` with `parts` appended using "/" (works for s3://, file:// and local paths alike)."""
    pieces = [part.strip("/") for part in parts if part.strip("/")]
    return "/".join([uri.rstrip("/"), *pieces]) if pieces else uri


def exists(uri: str, options: StorageOptions | None = None) -> bool:
    """Whether a file or directory (prefix) exists at `uri`."""
    fs, path = filesystem(uri, options)
    with _storage_errors("check", uri):
        return bool(fs.exists(path))


def read_bytes(uri: str, options: StorageOptions | None = None) -> bytes:
    """The whole content of the file at `uri`."""
    fs, path = filesystem(uri, options)
    with _storage_errors("read", uri):
        return fs.cat_file(path)


def _atomic_write_local(target: Path, data: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}{_PART_SUFFIX}")
    try:
        with open(temp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)


def write_bytes(uri: str, data: bytes, options: StorageOptions | None = None) -> None:
    """Write `data` to `uri`, atomically: local files via temp + rename, S3 objects by a single PUT."""
    fs, path = filesystem(uri, options)
    with _storage_errors("write", uri):
        if _is_local(fs):
            _atomic_write_local(Path(path), data)
        else:
            fs.pipe_file(path, data)


def list_files(uri: str, options: StorageOptions | None = None) -> dict[str, int]:
    """Every file below the directory/prefix `uri`, recursively: posix relative name -> size in bytes."""
    fs, path = filesystem(uri, options)
    with _storage_errors("list", uri):
        found = fs.find(path, detail=True)
    prefix = path.rstrip("/") + "/"
    files = {
        name[len(prefix) :]: int(info["size"])
        for name, info in found.items()
        if info.get("type") == "file" and name.startswith(prefix)
    }
    if _is_local(fs):
        files.update(_symlinked_files(Path(path), {n: i for n, i in found.items() if i.get("islink")}, uri))
    if not files:
        raise PipelineError(f"no files at {uri} (missing bucket, prefix or directory?)")
    return files


def _symlinked_files(folder: Path, links: dict[str, dict], uri: str) -> dict[str, int]:
    """Files of a local folder that are symlinks (a Hugging Face cache snapshot links each file into the
    repo's `blobs/`): relative name -> size of the target. A link may only point inside the folder, or
    inside the cache's repo folder (`models--org--name`) when the folder is one of its snapshots."""
    root = folder.resolve()
    if root.parent.name == "snapshots" and root.parent.parent.name.startswith(("models--", "datasets--")):
        root = root.parent.parent
    files = {}
    for name, _ in sorted(links.items()):
        target = Path(name).resolve()
        if not target.is_relative_to(root):
            raise PipelineError(f"{name} links to {target}, outside {root}; copy the file into {uri} instead")
        if target.is_file():
            files[Path(name).relative_to(folder).as_posix()] = target.stat().st_size
    return files


def list_dirs(uri: str, options: StorageOptions | None = None) -> list[str]:
    """Names of the directories (prefixes) right below `uri`, sorted; none when `uri` does not exist."""
    fs, path = filesystem(uri, options)
    with _storage_errors("list", uri):
        try:
            entries = fs.ls(path, detail=True)
        except FileNotFoundError:
            return []
    return sorted(entry["name"].rstrip("/").rsplit("/", 1)[-1] for entry in entries
                  if entry.get("type") == "directory")


def upload_dir(
    local_dir: str | Path, uri: str, options: StorageOptions | None = None, names: list[str] | None = None
) -> list[str]:
    """Upload files of `local_dir` under `uri` keeping relative names: `names`, or every publishable file."""
    root = Path(local_dir)
    if not root.is_dir():
        raise PipelineError(f"cannot upload {root}: not a directory")
    names = publishable_files(root) if names is None else names
    fs, path = filesystem(uri, options)
    with _storage_errors("upload to", uri):
        if names:
            fs.put([str(root / name) for name in names], [f"{path}/{name}" for name in names])
    return names


def publish(
    local_dir: str | Path, uri: str, options: StorageOptions | None = None,
    known: dict[str, FileEntry] | None = None,
) -> dict[str, FileEntry]:
    """Write the manifest of `local_dir`, upload every file, then the manifest; returns its entries.
    `known`: entries of files hashed as they were written (`manifest.build_manifest`)."""
    if not Path(local_dir).is_dir():
        raise PipelineError(f"cannot publish {local_dir}: not a directory")
    if not publishable_files(local_dir):
        raise PipelineError(f"cannot publish {local_dir}: it holds no files")
    manifest_uri = join(uri, MANIFEST_NAME)
    fs, manifest_path = filesystem(manifest_uri, options)
    entries = write_manifest(local_dir, known)
    # An older manifest at the destination would vouch for files this upload is about to replace.
    with _storage_errors("replace", manifest_uri):
        if fs.exists(manifest_path):
            fs.rm(manifest_path)  # rm, not rm_file: s3fs implements only the former with older fsspec
    upload_dir(local_dir, uri, options, names=sorted(entries))
    upload_dir(local_dir, uri, options, names=[MANIFEST_NAME])
    log.info("published %d files from %s to %s", len(entries), local_dir, uri)
    return entries


def _stream_to(fs: AbstractFileSystem, path: str, temp: Path) -> tuple[int, str]:
    """Copy a remote file into `temp`, hashing on the way; returns (size, sha256 hex)."""
    digest, size = hashlib.sha256(), 0
    with fs.open(path, "rb") as source, open(temp, "wb") as sink:
        while chunk := source.read(_CHUNK):
            digest.update(chunk)
            sink.write(chunk)
            size += len(chunk)
        sink.flush()
        os.fsync(sink.fileno())
    return size, digest.hexdigest()


def download_file(
    uri: str,
    local_path: str | Path,
    options: StorageOptions | None = None,
    *,
    size: int | None = None,
    sha256: str | None = None,
) -> Path:
    """Download `uri` to `local_path` via a temp file, checking `size`/`sha256` when given."""
    target = Path(local_path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}{_PART_SUFFIX}")
    fs, path = filesystem(uri, options)
    try:
        with _storage_errors("download", uri):
            got_size, got_sha256 = _stream_to(fs, path, temp)
        if size is not None and got_size != size:
            raise IntegrityError(f"size mismatch for {uri}: downloaded {got_size} bytes, expected {size}")
        if sha256 is not None and got_sha256 != sha256:
            raise IntegrityError(f"sha256 mismatch for {uri}: got {got_sha256}, manifest says {sha256}")
        os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)
    return target


def is_checkpoint_file(name: str) -> bool:
    """Whether `name` is a file `pull_checkpoint` fetches: safetensors, json, tokenizer files."""
    base = name.rsplit("/", 1)[-1]
    if base.startswith("."):
        return False
    return base in _CHECKPOINT_NAMES or base.endswith(_CHECKPOINT_SUFFIXES)


def checkpoint_cache_dir(uri: str, cache_root: str | Path) -> Path:
    """The node-local directory `pull_checkpoint` uses for `uri` (same dir with or without a trailing /)."""
    return Path(cache_root) / hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]


@contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on `path`; other processes (and threads) on this node wait for it."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def pull_checkpoint(
    uri: str,
    cache_root: str | Path,
    options: StorageOptions | None = None,
    max_workers: int = 8,
    only: Collection[str] | None = None,
) -> Path:
    """Pull the checkpoint directory at `uri` into a node-local cache, once per node; returns the dir.

    `only` names the files wanted (e.g. the weights of a training checkpoint, not its optimizer state);
    such a partial pull gets a cache directory of its own.

    However many worker processes ask at the same time, the pull happens once: a file lock, plus a
    `.complete` marker written last. Every file pulled is verified. Only safetensors, json and tokenizer
    files are pulled; pickled formats are never fetched.
    """
    key = uri if only is None else f"{uri.rstrip('/')}#{','.join(sorted(only))}"
    cache_dir = checkpoint_cache_dir(key, cache_root)
    _once_per_node(cache_dir, lambda: _pull_into(uri, cache_dir, options, max_workers, only))
    return cache_dir


def _once_per_node(cache_dir: Path, work: Callable[[], None]) -> None:
    """Run `work` (which writes `cache_dir`'s `.complete` marker last) unless some process on this node
    already did: under the folder's file lock, so concurrent callers wait and then find the marker."""
    marker = cache_dir / _COMPLETE_MARKER
    if marker.is_file():
        return  # done earlier on this node: no network access at all
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(cache_dir / _LOCK_NAME):
        if marker.is_file():
            log.info("%s was prepared by another process", cache_dir)
        else:
            work()


def checkpoint_dir(uri: str, cache_root: str | Path, options: StorageOptions | None = None,
                   only: Collection[str] | None = None) -> Path:
    """A local directory holding the training checkpoint at `uri`, verified against its manifest.

    A checkpoint already on this machine (a local path or file://, with its manifest) is verified where
    it is, once per node, and read there: no copy of tens of GB into `cache_root`. Any other is pulled
    (`pull_checkpoint`). Only for checkpoints this pipeline wrote: a folder read in place is not
    filtered to safetensors and JSON the way a pull is.
    """
    local = writable_local_path(uri)
    if local is None or not (local / MANIFEST_NAME).is_file():
        return pull_checkpoint(uri, cache_root, options, only=only)
    key = f"{uri.rstrip('/')}#in-place" + ("" if only is None else f"#{','.join(sorted(only))}")
    cache_dir = checkpoint_cache_dir(key, cache_root)

    def verify() -> None:
        _verify_in_place(uri, local, only)
        _atomic_write_local(cache_dir / _COMPLETE_MARKER, json.dumps({"uri": uri, "in_place": str(local)}).encode())

    _once_per_node(cache_dir, verify)
    return local


def _verify_in_place(uri: str, local: Path, only: Collection[str] | None, max_workers: int = 8) -> None:
    entries = read_manifest(local)
    absent = sorted(set(only or ()) - set(entries))
    if absent:
        raise PipelineError(f"{join(uri, absent[0])} is not listed in {join(uri, MANIFEST_NAME)}")

    def check(name: str, entry: FileEntry) -> None:
        if not (local / name).is_file():
            raise IntegrityError(f"{join(uri, name)} is listed in the manifest but missing")
        verify_file(local / name, entry, join(uri, name))

    wanted = {n: e for n, e in entries.items() if only is None or n in only}
    with ThreadPoolExecutor(max_workers=max(1, max_workers)) as pool:
        for future in [pool.submit(check, name, entry) for name, entry in sorted(wanted.items())]:
            future.result()
    log.info("verified %d files of %s in place", len(wanted), uri)


def _wanted_files(
    uri: str, options: StorageOptions | None, only: Collection[str] | None = None
) -> tuple[dict[str, int], dict[str, FileEntry], bytes | None]:
    """(name -> remote size, name -> manifest entry, manifest bytes) of the files to pull from `uri`."""
    remote = list_files(uri, options)
    if only is not None:
        absent = sorted(set(only) - set(remote))
        if absent:
            raise PipelineError(f"{join(uri, absent[0])} not found")
        remote = {n: s for n, s in remote.items() if n in only or n == MANIFEST_NAME}
    if MANIFEST_NAME not in remote:
        return {n: s for n, s in remote.items() if is_checkpoint_file(n)}, {}, None
    manifest_data = read_bytes(join(uri, MANIFEST_NAME), options)
    entries = parse_manifest(manifest_data, join(uri, MANIFEST_NAME))
    # With a manifest, it decides what the checkpoint is: stray objects at the prefix are not pulled.
    wanted = {n: e for n, e in entries.items() if is_checkpoint_file(n) and (only is None or n in only)}
    missing = sorted(set(wanted) - set(remote))
    if missing:
        raise IntegrityError(f"{join(uri, missing[0])} is listed in the manifest but missing")
    return {n: remote[n] for n in wanted}, wanted, manifest_data


def _already_pulled(path: Path, size: int, entry: FileEntry | None) -> bool:
    """A file left by an interrupted pull is reused only if the manifest vouches for its content."""
    if entry is None or not path.is_file() or path.stat().st_size != size:
        return False
    return sha256_file(path) == entry.sha256


def _check_disk_space(cache_dir: Path, needed: int, uri: str) -> None:
    free = shutil.disk_usage(cache_dir).free
    if needed > free:
        raise PipelineError(
            f"not enough disk space in {cache_dir} to pull {uri}: needs {needed} bytes, {free} bytes free"
        )


def _pull_file(
    uri: str, cache_dir: Path, name: str, size: int, entry: FileEntry | None, options: StorageOptions | None
) -> None:
    sha256 = entry.sha256 if entry is not None else None
    download_file(join(uri, name), cache_dir / name, options, size=size, sha256=sha256)


def _pull_into(
    uri: str, cache_dir: Path, options: StorageOptions | None, max_workers: int, only: Collection[str] | None
) -> None:
    for leftover in cache_dir.rglob(f"*{_PART_SUFFIX}"):
        leftover.unlink()  # a download cut short by a crash; the lock says nobody is writing it now
    sizes, entries, manifest_data = _wanted_files(uri, options, only)
    todo = {n: s for n, s in sizes.items() if not _already_pulled(cache_dir / n, s, entries.get(n))}
    _check_disk_space(cache_dir, sum(todo.values()), uri)
    log.info("pulling %d files (%d bytes) from %s into %s", len(todo), sum(todo.values()), uri, cache_dir)
    with ThreadPoolExecutor(max_workers=max(1, max_workers)) as pool:
        futures = [
            pool.submit(_pull_file, uri, cache_dir, name, size, entries.get(name), options)
            for name, size in todo.items()
        ]
        try:
            for future in as_completed(futures):
                future.result()
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    if manifest_data is not None:
        _atomic_write_local(cache_dir / MANIFEST_NAME, manifest_data)
    marker = json.dumps({"uri": uri, "files": sizes}, indent=2, sort_keys=True).encode()
    _atomic_write_local(cache_dir / _COMPLETE_MARKER, marker)
