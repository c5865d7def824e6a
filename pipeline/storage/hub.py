"""Hugging Face Hub inputs: `hf://` uris resolved to files in the node's Hugging Face cache.

Base models and datasets are usually named by their Hub repo, not copied into object storage first.
The storage layer hands every `hf://` uri to `local_path` here. From then on the files are read,
listed, pulled and checked exactly like local ones. Only safetensors, config and tokenizer files are
fetched from model repos: never pickled weights or code. The token is huggingface_hub's own and is
never read or logged here.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import PipelineError

SCHEME = "hf://"
MODEL_FILES = ("*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json",
               "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
               "chat_template.jinja", "chat_template.json")


@dataclass(frozen=True)
class HubUri:
    repo_type: str  # "model" or "dataset"
    repo_id: str  # org/name
    revision: str | None
    path: str  # inside the repo; "" = the repo itself


def parse(uri: str) -> HubUri:
    """The parts of an `hf://` uri; a PipelineError naming the uri when it is not one of the two forms."""
    parts = [p for p in uri.removeprefix(SCHEME).split("/") if p]
    repo_type = "dataset" if parts[:1] == ["datasets"] else "model"
    if repo_type == "dataset":
        parts = parts[1:]
    if len(parts) < 2 or (repo_type == "dataset" and len(parts) < 3):
        form = "hf://datasets/<org>/<name>[@<revision>]/<file>" if repo_type == "dataset" else \
            "hf://<org>/<name>[@<revision>]"
        raise PipelineError(f"{uri}: not a Hugging Face Hub uri; use {form}")
    name, _, revision = parts[1].partition("@")
    return HubUri(repo_type, f"{parts[0]}/{name}", revision or None, "/".join(parts[2:]))


def local_path(uri: str) -> Path:
    """The local file or folder `uri` names, fetched into this node's Hub cache first if needed.

    - Uri forms: `hf://<org>/<name>[@<revision>][/<path>]` for a model repo, and
      `hf://datasets/<org>/<name>[@<revision>]/<path>` for a file (or folder) of a dataset repo. Pin a
      commit as the revision for a repeatable run; a branch moves.
    - From model repos only `MODEL_FILES`: safetensors shards, their index, config and tokenizer files.
      Never `*.bin`, `*.pt` or Python code, so nothing from the repo can run. From dataset repos only
      the named path.
    - `huggingface_hub.snapshot_download` fetches into this node's Hub cache ($HF_HUB_CACHE), once per
      node and revision, under its own file locks. The token is $HF_TOKEN or `hf auth login`.
    - Offline ($HF_HUB_OFFLINE=1) the cache alone answers; a repo or revision not in it is a one-line
      error naming the uri.
    """
    hub = parse(uri)
    if hub.repo_type == "model":  # one snapshot serves every file of the repo (the storage layer joins names)
        return _snapshot(hub.repo_type, hub.repo_id, hub.revision, MODEL_FILES) / hub.path
    return _snapshot(hub.repo_type, hub.repo_id, hub.revision, (hub.path, f"{hub.path}/*")) / hub.path


@functools.lru_cache(maxsize=64)  # once per process: online, each snapshot_download asks the Hub
def _snapshot(repo_type: str, repo_id: str, revision: str | None, patterns: tuple[str, ...]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, repo_type=repo_type, revision=revision, allow_patterns=list(patterns)))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        kind = "datasets/" if repo_type == "dataset" else ""
        uri = f"{SCHEME}{kind}{repo_id}" + (f"@{revision}" if revision else "")
        raise PipelineError(f"{uri}: cannot fetch from the Hugging Face Hub ({first}); check the repo and "
                            "revision, HF_TOKEN for gated repos, or pre-fill the cache and set HF_HUB_OFFLINE=1") from None
