"""What a uri in the config may look like: a scheme the storage layer serves, and no credentials.

Why it exists: the resolved config goes into MLflow params and into every checkpoint, and a uri is the
one setting where a password hides easily (`s3://key:secret@bucket/...`, `http://user:password@mlflow`).
Such uris are refused, naming the config key and where credentials belong instead, and the message
never repeats them. `hf://org/name@revision` (Hugging Face Hub, `pipeline.storage.hub`) is a storage uri too:
its '@' names a revision, not a user. `pipeline.config` applies these rules to every uri field.
"""

from __future__ import annotations

import re
import urllib.parse

from pipeline.errors import PipelineError

_STORAGE_SCHEMES = ("s3", "file", "hf")
# user:password@ after the scheme; the password may hold '/' (AWS secret keys do), which urlsplit misreads.
_CREDENTIALS = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://(?:[^/?#@]*|[^/@:]+:[^@]*)@([^/?#]*)")


def _refuse_credentials(key: str, uri: str) -> None:
    """A uri must not carry user:password; the message never repeats them."""
    found = _CREDENTIALS.match(uri)
    if found:
        raise PipelineError(f"{key}: the uri carries credentials before '@{found[1]}'; remove them and "
                            + _CREDENTIAL_SOURCES.get(key.split(".")[0], _CREDENTIAL_SOURCES["storage"]))


_CREDENTIAL_SOURCES = {
    "storage": "give them through the environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or an AWS profile)",
    "tracking": "set MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)",
}


def split_uri(key: str, uri: str) -> urllib.parse.SplitResult:
    """The parts of the uri set at config `key`; a PipelineError if it is malformed or holds credentials."""
    _refuse_credentials(key, uri)
    try:
        parts = urllib.parse.urlsplit(uri)
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        raise PipelineError(f"{key}: malformed uri; use s3://bucket/key, file:///path or a local path") from None
    return parts


def check_storage_uri(key: str, uri: str) -> None:
    """Schemes the storage layer serves, with a bucket for s3, and no credentials inside."""
    parts = split_uri(key, uri)
    if "://" in uri and parts.scheme not in _STORAGE_SCHEMES:
        raise PipelineError(f"{key}: unsupported uri scheme '{parts.scheme}://'; "
                            "use s3://bucket/key, file:///path, hf://org/name or a local path")
    if parts.scheme == "s3" and not parts.netloc:
        raise PipelineError(f"{key}: {uri!r} names no bucket; use s3://bucket/key")
