"""What text may reach MLflow and the logs: secrets masked, lengths within MLflow's limits.

Params, tags, text artifacts and warnings are built from configs, uris and exceptions, and any of them
can carry a credential (a signed url, a token in a setting, a password in a server uri). Every path
from the pipeline to MLflow or to a log line goes through these functions, so the rules live in one
place. Cut text says how much was cut; an exception is reported as one redacted line.
"""

from __future__ import annotations

import hashlib
import re
import urllib.parse
from collections.abc import Mapping
from typing import Any

REDACTED = "<redacted>"

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
# user:password@ whose password holds '/' (AWS secret keys do): urlsplit alone would see no '@' in it.
_URL_PASSWORD = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/@:]+:[^@]*@")
_TOKEN_SHAPES = re.compile(
    r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b|\bhf_[A-Za-z0-9]{20,}\b|\bgh[pousr]_[A-Za-z0-9]{20,}\b"
    r"|\bBearer\s+[A-Za-z0-9._~+/=-]+|\beyJ[\w-]{5,}\.[\w-]{5,}\.[\w-]+"
    r"|-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?(?:-----END [A-Z ]*PRIVATE KEY-----|$)"
)


def is_secret_key(key: str) -> bool:
    """True for names like aws_secret_access_key, hf_token, db.password, apiKey; False for pad_token_id.

    A key is secret when one of its words (snake, dotted or camel case) names a credential. "token" is a
    secret in `hf_token` but a vocabulary entry in `pad_token` or `eos_token_id`.
    """
    words = [w for w in re.split(r"[^a-z0-9]+", _CAMEL_BOUNDARY.sub("_", key).lower()) if w]
    if any(word in _SECRET_WORDS for word in words) or set(zip(words, words[1:])) & _SECRET_PAIRS:
        return True
    return any(w == "token" and (i == 0 or words[i - 1] not in _VOCAB_TOKEN_WORDS) for i, w in enumerate(words))


def _redact_url(match: re.Match[str]) -> str:
    url = _URL_PASSWORD.sub(rf"\1{REDACTED}@", match.group(0))
    parts = urllib.parse.urlsplit(url)
    netloc, query = parts.netloc, parts.query
    if "@" in netloc:  # user:password@host
        netloc = f"{REDACTED}@{netloc.rsplit('@', 1)[1]}"
    names = {name.lower() for name, _ in urllib.parse.parse_qsl(query, keep_blank_values=True)}
    if names & _SIGNED_QUERY_NAMES:
        query = REDACTED
    if (netloc, query) == (parts.netloc, parts.query):
        return url  # nothing secret; urlunsplit would also turn s3:///key into s3:/key
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_text(text: str) -> str:
    """The text with signed-url queries, url passwords and well-known token formats masked."""
    return _TOKEN_SHAPES.sub(REDACTED, _URL.sub(_redact_url, text))


def redact(params: Mapping[str, Any]) -> dict[str, str]:
    """Params as MLflow strings, with secret-looking keys masked and secrets inside values masked.

    In values, signed-url queries, url passwords and well-known token formats become REDACTED.
    """
    return {str(k): REDACTED if is_secret_key(str(k)) else redact_text(str(v)) for k, v in params.items()}


def fit_text(text: str, limit: int) -> str:
    """Text cut to `limit` characters, saying how much was cut, so MLflow never rejects it."""
    if len(text) <= limit:
        return text
    marker = f"...<{len(text)} chars, truncated>"
    return text[: limit - len(marker)] + marker


def fit_key(key: str) -> str:
    """A key within MLflow's limit that stays unique: a cut key ends with a hash of the full one."""
    # Imported here: training workers use this module without MLflow, whose import costs them a second.
    from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH

    if len(key) <= MAX_ENTITY_KEY_LENGTH:
        return key
    return key[: MAX_ENTITY_KEY_LENGTH - 9] + "~" + hashlib.sha256(key.encode()).hexdigest()[:8]


def tracking_uri_label(tracking_uri: str) -> str:
    """'tracking uri <uri>' with any credential in the uri masked, for messages naming the server."""
    return f"tracking uri {redact_text(tracking_uri)}"


def error_line(exc: BaseException) -> str:
    """'<Type>: <first line of the message>', redacted and cut to 300 characters."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {redact_text(lines[0])[:300] if lines else 'no details'}"
