"""Hugging Face Hub inputs, offline: no hub is reachable here, so each test builds a Hub cache by hand in
the layout huggingface_hub writes (blobs, snapshots/<commit> of symlinks, refs/<branch>) and sets
HF_HUB_OFFLINE=1. huggingface_hub's own `snapshot_download` then resolves the uris from that cache, as it
would on a node that fetched them before. What this cannot test: downloading, gated repos and HF_TOKEN,
and allow_patterns filtering a real download (offline, the cache is returned as it is: that is why the
pull below must still refuse pickles and code that sit in the snapshot)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from pipeline.storage import hub
from pipeline.job import preflight
from pipeline import storage
from pipeline.config import load_config
from pipeline.stages.data import prepare
from pipeline.errors import PipelineError
from pipeline.demo import make_tiny_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[2]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def add_to_hub_cache(cache: Path, repo_type: str, repo_id: str, files: dict[str, Path], branch: str = "main") -> None:
    """`files` (name in repo -> local file) as one commit of `repo_id` in the Hub cache at `cache`."""
    repo = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    for name, source in files.items():
        data = source.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path("../" * (name.count("/") + 2)) / "blobs" / blob.name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / branch).write_text(COMMIT)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hf-cache"
    base = make_tiny_checkpoint(tmp_path / "tiny")
    files = {p.name: p for p in base.iterdir() if p.is_file() and p.name not in ("manifest.json", ".complete")}
    (tmp_path / "pytorch_model.bin").write_bytes(b"a pickle: never fetched")
    (tmp_path / "modeling_llama.py").write_text("raise SystemExit('remote code ran')\n")
    files |= {"pytorch_model.bin": tmp_path / "pytorch_model.bin", "modeling_llama.py": tmp_path / "modeling_llama.py"}
    add_to_hub_cache(cache, "model", "acme/tiny-llama", files)
    add_to_hub_cache(cache, "dataset", "acme/stories", {"data/train.jsonl": REPO_ROOT / "data/tiny_text.jsonl"})
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    hub._snapshot.cache_clear()
    yield base
    hub._snapshot.cache_clear()


def test_uris_name_repo_revision_and_path():
    assert hub.parse("hf://acme/Llama-3.1-8B") == hub.HubUri("model", "acme/Llama-3.1-8B", None, "")
    assert hub.parse("hf://acme/tiny@v2/config.json") == hub.HubUri("model", "acme/tiny", "v2", "config.json")
    assert hub.parse("hf://datasets/acme/stories@0123abc/data/train.jsonl") == hub.HubUri(
        "dataset", "acme/stories", "0123abc", "data/train.jsonl")
    with pytest.raises(PipelineError, match=r"hf://datasets/acme/stories: not a Hugging Face Hub uri; use hf://datasets/"):
        hub.parse("hf://datasets/acme/stories")
    cfg = load_config(None, ["model.base_uri=hf://acme/Llama-3.1-8B@main",
                             "data.train_files=[hf://datasets/acme/stories/train.jsonl]"])
    assert cfg.model.base_uri == "hf://acme/Llama-3.1-8B@main"


def test_a_hub_base_model_is_checked_and_pulled_like_an_s3_one_without_pickles_or_code(hub_cache, tmp_path):
    options = storage.StorageOptions()
    for uri in ("hf://acme/tiny-llama", "hf://acme/tiny-llama@main", f"hf://acme/tiny-llama@{COMMIT}"):
        assert preflight.check_base_checkpoint(uri, options).startswith("llama, ")
    pulled = storage.pull_checkpoint("hf://acme/tiny-llama@main", tmp_path / "node", options)
    names = {p.name for p in pulled.iterdir() if not p.name.startswith(".")}
    assert "config.json" in names and any(n.endswith(".safetensors") for n in names)
    assert "pytorch_model.bin" not in names and "modeling_llama.py" not in names
    for name in names:
        if name.endswith(".safetensors"):
            assert (pulled / name).read_bytes() == (hub_cache / name).read_bytes()


def test_a_hub_dataset_file_is_prepared_like_a_local_one(hub_cache, tmp_path):
    def cfg(train_file):
        return load_config(None, [f"data.train_files=[{train_file}]", "data.max_documents=40",
                                  f"run.output_uri={tmp_path / 'runs'}", f"run.cache_dir={tmp_path / 'node'}"])
    from_hub = prepare(cfg("hf://datasets/acme/stories@main/data/train.jsonl"), str(hub_cache))
    local = prepare(cfg(str(REPO_ROOT / "data/tiny_text.jsonl")), str(hub_cache))
    assert from_hub.stats["train"] == local.stats["train"] and from_hub.stats["train"]["rows"] > 0


def test_what_the_cache_lacks_offline_is_one_line_naming_the_uri(hub_cache):
    options = storage.StorageOptions()
    with pytest.raises(PipelineError, match=r"^hf://acme/other@main: cannot fetch from the Hugging Face Hub .*HF_HUB_OFFLINE"):
        storage.list_files("hf://acme/other@main", options)
    with pytest.raises(PipelineError, match=r"^hf://acme/tiny-llama@v9: cannot fetch"):
        storage.list_files("hf://acme/tiny-llama@v9", options)
    assert not storage.exists("hf://datasets/acme/stories@main/data/missing.jsonl", options)
