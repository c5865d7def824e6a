"""Object storage: publish/pull round trips through a real S3 server and file:// uris, once-per-node
pulls under concurrency, and the failures a checkpoint pull must catch (corruption, cut downloads,
full disks, missing uris).
"""

from __future__ import annotations

import multiprocessing
import re
import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest

from pipeline import storage
from pipeline.errors import PipelineError
from pipeline.storage.manifest import MANIFEST_NAME, read_manifest, verify_dir, write_manifest
from pipeline.storage import StorageOptions, list_files, publish, pull_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[2]
PICKLED_FILES = ("training_args.bin", "optimizer.pt")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A real sharded HF Llama checkpoint with a tokenizer, a chat template and pickled extras."""
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = tmp_path_factory.mktemp("tiny") / "checkpoint"
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
    )
    LlamaForCausalLM(config).save_pretrained(directory, max_shard_size="100KB")
    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "chat_template.jinja").write_text("{{ messages }}")
    for name in PICKLED_FILES:
        (directory / name).write_bytes(b"\x80\x04not a checkpoint file")
    assert len(shards(directory)) >= 3
    return directory


def shards(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("*.safetensors"))


def pulled_names(directory: Path) -> list[str]:
    """Files a pull must bring back: everything published except pickles, plus the manifest."""
    return sorted(
        p.name for p in directory.iterdir() if not p.name.startswith(".") and p.name not in PICKLED_FILES
    )


def assert_same_checkpoint(source: Path, pulled: Path) -> None:
    assert sorted(p.name for p in pulled.iterdir() if not p.name.startswith(".")) == pulled_names(source)
    for name in pulled_names(source):
        assert (pulled / name).read_bytes() == (source / name).read_bytes(), name
    verify_dir(pulled, names=[name for name in pulled_names(source) if name != MANIFEST_NAME])
    assert (pulled / ".complete").is_file()


def published_copy(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    """A private copy, for tests that change the files they publish."""
    return Path(shutil.copytree(tiny_checkpoint, tmp_path / "local"))


def test_s3_round_trip_pulls_everything_but_pickles(s3_server, s3_bucket, tiny_checkpoint, tmp_path):
    uri = f"s3://{s3_bucket}/base/tiny"
    options = StorageOptions(endpoint_url=s3_server.endpoint_url)
    entries = publish(tiny_checkpoint, uri, options)

    assert set(list_files(uri, options)) == set(entries) | {MANIFEST_NAME}
    pulled = pull_checkpoint(uri, tmp_path / "cache", options)
    assert pulled.parent == tmp_path / "cache"
    assert_same_checkpoint(tiny_checkpoint, pulled)
    assert not any((pulled / name).exists() for name in PICKLED_FILES)
    assert all(s3_server.object_gets(s3_bucket, f"base/tiny/{name}") == 0 for name in PICKLED_FILES)

    served = len(s3_server.requests)
    assert pull_checkpoint(uri + "/", tmp_path / "cache", options) == pulled
    assert len(s3_server.requests) == served  # a completed cache is reused without touching storage


def test_file_uri_round_trip(tiny_checkpoint, tmp_path):
    uri = (tmp_path / "store" / "tiny").as_uri()
    publish(tiny_checkpoint, uri)
    assert set(list_files(uri)) == set(read_manifest(tiny_checkpoint)) | {MANIFEST_NAME}
    assert_same_checkpoint(tiny_checkpoint, pull_checkpoint(uri, tmp_path / "cache"))


def test_endpoint_comes_from_options_before_environment(s3_server, s3_bucket, tiny_checkpoint, monkeypatch):
    uri = f"s3://{s3_bucket}/env"
    publish(tiny_checkpoint, uri)  # no options: AWS_ENDPOINT_URL (set by the fixture) is honoured
    assert MANIFEST_NAME in list_files(uri)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    assert MANIFEST_NAME in list_files(uri, StorageOptions(endpoint_url=s3_server.endpoint_url))


def _pull_after_barrier(barrier, results, uri: str, cache_root: str, endpoint_url: str) -> None:
    barrier.wait(timeout=60)  # all processes ask at once, as workers on one node do at start-up
    try:
        results.put(str(pull_checkpoint(uri, cache_root, StorageOptions(endpoint_url=endpoint_url))))
    except Exception as exc:  # reported to the parent, which fails the test with it
        results.put(f"error: {exc!r}")


def test_concurrent_processes_download_each_file_once(s3_server, s3_bucket, tiny_checkpoint, tmp_path):
    uri = f"s3://{s3_bucket}/concurrent"
    publish(tiny_checkpoint, uri, StorageOptions(endpoint_url=s3_server.endpoint_url))
    context = multiprocessing.get_context("spawn")
    barrier, results, workers = context.Barrier(4), context.Queue(), []
    for _ in range(4):
        args = (barrier, results, uri, str(tmp_path / "cache"), s3_server.endpoint_url)
        workers.append(context.Process(target=_pull_after_barrier, args=args))
        workers[-1].start()
    returned = [results.get(timeout=90) for _ in workers]
    for worker in workers:
        worker.join(timeout=30)
        if worker.is_alive():
            worker.kill()

    assert len(set(returned)) == 1 and not returned[0].startswith("error"), returned
    assert_same_checkpoint(tiny_checkpoint, Path(returned[0]))
    for name in pulled_names(tiny_checkpoint):
        assert s3_server.object_gets(s3_bucket, f"concurrent/{name}") == 1, name


def test_corrupted_object_is_rejected_and_removed(s3_server, s3_bucket, tiny_checkpoint, tmp_path):
    uri = f"s3://{s3_bucket}/corrupt"
    options = StorageOptions(endpoint_url=s3_server.endpoint_url)
    publish(tiny_checkpoint, uri, options)
    victim = shards(tiny_checkpoint)[1]
    original = (tiny_checkpoint / victim).read_bytes()
    flipped = original[:-1] + bytes([original[-1] ^ 0xFF])  # same size: only the checksum can tell
    s3_server.client().put_object(Bucket=s3_bucket, Key=f"corrupt/{victim}", Body=flipped)

    with pytest.raises(PipelineError, match=re.escape(f"sha256 mismatch for {uri}/{victim}")):
        pull_checkpoint(uri, tmp_path / "cache", options)
    cache_dir = storage.checkpoint_cache_dir(uri, tmp_path / "cache")
    assert not (cache_dir / victim).exists()
    assert not (cache_dir / ".complete").exists()
    assert not list(cache_dir.glob("*.part"))

    s3_server.client().put_object(Bucket=s3_bucket, Key=f"corrupt/{victim}", Body=original)
    assert_same_checkpoint(tiny_checkpoint, pull_checkpoint(uri, tmp_path / "cache", options))


def test_cut_download_never_becomes_a_shard(s3_server, s3_bucket, tiny_checkpoint, tmp_path, monkeypatch):
    uri = f"s3://{s3_bucket}/cut"
    options = StorageOptions(endpoint_url=s3_server.endpoint_url)
    publish(tiny_checkpoint, uri, options)
    victim = shards(tiny_checkpoint)[0]
    real_stream_to = storage._stream_to

    def connection_dies_mid_shard(fs, path, temp):
        # Fault injection: a dropped connection cannot be produced on demand with a real server.
        if path.endswith(victim):
            temp.write_bytes((tiny_checkpoint / victim).read_bytes()[:1000])
            raise ConnectionResetError("connection reset by peer")
        return real_stream_to(fs, path, temp)

    monkeypatch.setattr(storage, "_stream_to", connection_dies_mid_shard)
    expected = f"cannot download {uri}/{victim}: ConnectionResetError"
    with pytest.raises(PipelineError, match=re.escape(expected)):
        pull_checkpoint(uri, tmp_path / "cache", options)
    cache_dir = storage.checkpoint_cache_dir(uri, tmp_path / "cache")
    assert not (cache_dir / victim).exists() and not (cache_dir / ".complete").exists()

    monkeypatch.undo()
    crashed_part = cache_dir / f".{victim}.0badc0de.part"  # what a killed process leaves behind
    crashed_part.write_bytes(b"truncated")
    assert_same_checkpoint(tiny_checkpoint, pull_checkpoint(uri, tmp_path / "cache", options))
    assert not crashed_part.exists()


def test_disk_space_is_checked_first(s3_server, s3_bucket, tiny_checkpoint, tmp_path, monkeypatch):
    uri = f"s3://{s3_bucket}/space"
    options = StorageOptions(endpoint_url=s3_server.endpoint_url)
    publish(tiny_checkpoint, uri, options)
    # shutil.disk_usage is monkeypatched: filling a real disk is no option in a test.
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 4096, 4096))
    needed = sum(e.size for n, e in read_manifest(tiny_checkpoint).items() if n not in PICKLED_FILES)

    with pytest.raises(PipelineError, match=f"needs {needed} bytes, 4096 bytes free"):
        pull_checkpoint(uri, tmp_path / "cache", options)
    assert all(s3_server.object_gets(s3_bucket, f"space/{name}") == 0 for name in shards(tiny_checkpoint))


def test_object_listed_in_manifest_but_missing(s3_server, s3_bucket, tiny_checkpoint, tmp_path):
    uri = f"s3://{s3_bucket}/partial"
    options = StorageOptions(endpoint_url=s3_server.endpoint_url)
    publish(tiny_checkpoint, uri, options)
    victim = shards(tiny_checkpoint)[-1]
    s3_server.client().delete_object(Bucket=s3_bucket, Key=f"partial/{victim}")
    expected = f"{uri}/{victim} is listed in the manifest but missing"
    with pytest.raises(PipelineError, match=re.escape(expected)):
        pull_checkpoint(uri, tmp_path / "cache", options)


@pytest.mark.parametrize("where", ["absent prefix", "absent bucket", "absent directory"])
def test_missing_uri_is_named(where, s3_server, s3_bucket, tmp_path):
    uri = {
        "absent prefix": f"s3://{s3_bucket}/no/such/checkpoint",
        "absent bucket": "s3://no-such-bucket-for-tests/checkpoint",
        "absent directory": (tmp_path / "nothing-here").as_uri(),
    }[where]
    with pytest.raises(PipelineError, match=re.escape(uri)):
        pull_checkpoint(uri, tmp_path / "cache", StorageOptions(endpoint_url=s3_server.endpoint_url))


def test_republish_replaces_files_and_manifest(s3_server, s3_bucket, tiny_checkpoint, tmp_path):
    uri = f"s3://{s3_bucket}/again"
    options = StorageOptions(endpoint_url=s3_server.endpoint_url)
    local = published_copy(tiny_checkpoint, tmp_path)
    publish(local, uri, options)
    (local / "generation_config.json").write_text('{"max_length": 7}')
    publish(local, uri, options)
    assert_same_checkpoint(local, pull_checkpoint(uri, tmp_path / "cache", options))


def test_manifest_detects_local_changes(tiny_checkpoint, tmp_path):
    local = published_copy(tiny_checkpoint, tmp_path)
    write_manifest(local)
    verify_dir(local)
    (local / "config.json").write_text("{}")
    with pytest.raises(PipelineError, match="config.json"):
        verify_dir(local)


def run_publish_cli(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO_ROOT / "jobs" / "publish.py"), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)


def test_publish_cli(s3_server, s3_bucket, tiny_checkpoint, tmp_path):
    uri = f"s3://{s3_bucket}/cli"
    done = run_publish_cli(str(tiny_checkpoint), uri, "--endpoint-url", s3_server.endpoint_url)
    assert done.returncode == 0, done.stderr
    assert MANIFEST_NAME in list_files(uri, StorageOptions(endpoint_url=s3_server.endpoint_url))

    for bad_args, named in [
        ((str(tmp_path / "missing"), uri), str(tmp_path / "missing")),
        ((str(tiny_checkpoint), "gs://bucket/x"), "gs://bucket/x"),
    ]:
        failed = run_publish_cli(*bad_args)
        assert failed.returncode == 1
        assert len(failed.stderr.strip().splitlines()) == 1 and named in failed.stderr, failed.stderr
        assert "Traceback" not in failed.stderr


def test_publish_stopped_by_ctrl_c_leaves_no_manifest_to_vouch_for_a_cut_upload(tiny_checkpoint, tmp_path,
                                                                                  monkeypatch, capsys):
    from jobs import publish as publish_job
    from pipeline import storage

    dest = tmp_path / "published"
    publish(tiny_checkpoint, str(dest))  # an earlier, complete upload with its manifest
    real_upload = storage.upload_dir

    def cut(local_dir, uri, options=None, names=None):
        real_upload(local_dir, uri, options, names=names[:1])
        raise KeyboardInterrupt  # Ctrl-C after the first file

    monkeypatch.setattr(storage, "upload_dir", cut)
    assert publish_job.main([str(tiny_checkpoint), str(dest)]) == 130
    assert capsys.readouterr().err.strip().splitlines() == [
        f"publish: stopped by Ctrl-C; {dest} has no manifest.json until the same command runs again to the end"]
    assert not (dest / MANIFEST_NAME).exists()
    monkeypatch.undo()
    assert publish_job.main([str(tiny_checkpoint), str(dest)]) == 0
    assert_same_checkpoint(tiny_checkpoint, pull_checkpoint(str(dest), tmp_path / "cache", StorageOptions()))


def _hf_cache_snapshot(cache: Path, source: Path) -> Path:
    """The layout `huggingface_hub` downloads into: snapshots/<rev>/<file> are symlinks into blobs/."""
    repo = cache / "models--org--tiny"
    snapshot, blobs = repo / "snapshots" / "0123abc", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for file in sorted(source.iterdir()):
        blob = blobs / f"blob-{file.name}"
        shutil.copyfile(file, blob)
        (snapshot / file.name).symlink_to(Path("../../blobs") / blob.name)
    return snapshot


def test_a_hugging_face_cache_snapshot_is_a_base_checkpoint_and_its_links_stay_in_the_repo(tmp_path):
    from pipeline.job import preflight
    from pipeline.demo import make_tiny_checkpoint

    source = make_tiny_checkpoint(tmp_path / "source")
    snapshot = _hf_cache_snapshot(tmp_path / "hub", source)
    assert list_files(str(snapshot)) == list_files(str(source))
    assert preflight.check_base_checkpoint(str(snapshot), StorageOptions()).startswith("llama, 3 shard(s)")
    pulled = pull_checkpoint(str(snapshot), tmp_path / "node", StorageOptions())
    for name in list_files(str(source)):
        assert (pulled / name).read_bytes() == (source / name).read_bytes() and not (pulled / name).is_symlink()

    outside = tmp_path / "secret.json"
    outside.write_text("{}")
    (snapshot / "extra.json").symlink_to(outside)
    with pytest.raises(PipelineError, match=rf"extra.json links to {re.escape(str(outside))}, outside "
                                            rf"{re.escape(str(snapshot.parent.parent))}"):
        list_files(str(snapshot))


def test_a_local_checkpoint_is_verified_where_it_is_and_a_damaged_one_is_refused_untouched(
        s3_server, s3_bucket, tiny_checkpoint, tmp_path):
    folder = tmp_path / "runs" / "checkpoint_000004-ab"
    shutil.copytree(tiny_checkpoint, folder)
    write_manifest(folder)
    cache = tmp_path / "cache"
    assert storage.checkpoint_dir(str(folder), cache) == folder  # read in place: nothing copied
    assert not [p for p in cache.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json")]
    one = next(folder.glob("*.safetensors")).name
    assert storage.checkpoint_dir(f"file://{folder}", cache, only=[one]) == folder

    damaged = tmp_path / "runs" / "checkpoint_000006-cd"
    shutil.copytree(folder, damaged)
    shard = next(damaged.glob("*.safetensors"))
    shard.write_bytes(b"x" + shard.read_bytes()[1:])
    before = shard.read_bytes()
    with pytest.raises(PipelineError, match=f"sha256 mismatch for .*{shard.name}"):
        storage.checkpoint_dir(str(damaged), cache)
    assert shard.read_bytes() == before  # the user's folder is never changed
    (damaged / "config.json").unlink()
    with pytest.raises(PipelineError, match="config.json is listed in the manifest but missing"):
        storage.checkpoint_dir(str(damaged), tmp_path / "cache2")

    # object storage is still pulled into the node cache
    options = StorageOptions(endpoint_url=s3_server.endpoint_url)
    publish(folder, f"s3://{s3_bucket}/ck", options)
    pulled = storage.checkpoint_dir(f"s3://{s3_bucket}/ck", cache, options)
    assert pulled.is_relative_to(cache) and read_manifest(pulled) == read_manifest(folder)
