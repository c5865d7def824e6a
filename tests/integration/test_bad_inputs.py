"""Bad inputs are refused before the job writes anything, in one line naming what, where and the fix.

Every case runs the real entry point, `jobs/finetune.py`'s `main`, in-process (or, for a few, as a
subprocess) against moto's S3 over HTTP and a real MLflow server. Both already hold an earlier job's
traces (the `world` fixture of tests/fixtures/job_traces.py: its state file and an export in the bucket and in
a local output folder, its parent run and a registered model version). Each case asserts exit code 1,
exactly one stderr line that holds the exact key, file, row or tensor and the fix, no traceback, an
unchanged bucket, output folder and MLflow record, and that Ray was not started. docs/reliability.md
lists the cases.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest
import ray
import torch
from safetensors.torch import load_file, save_file

from jobs import finetune
from pipeline import storage
from tests.fixtures.job_traces import World, job_stderr_lines

REPO = Path(__file__).resolve().parents[2]
INDEX = "model.safetensors.index.json"


# ---------------------------------------------------------------------------------------------------
# arranging bad inputs: each returns (extra arguments, substrings the error line must hold)


def _shard_of(folder: Path, tensor: str) -> str:
    return json.loads((folder / INDEX).read_text())["weight_map"][tensor]


def _checkpoint_copy(world: World, tmp: Path) -> Path:
    return Path(shutil.copytree(world.base_dir, tmp / "ckpt", ignore=shutil.ignore_patterns("manifest.json")))


def _rewrite_shard(folder: Path, shard: str, change: Callable[[dict], None]) -> None:
    tensors = load_file(folder / shard)
    change(tensors)
    save_file(tensors, folder / shard, metadata={"format": "pt"})


def _published(world: World, folder: Path, name: str) -> str:
    uri = f"s3://{world.bucket}/variants/{name}-{uuid.uuid4().hex[:6]}"
    storage.publish(folder, uri, world.options)
    return uri


def _jsonl(path: Path, lines: list[str]) -> str:
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def not_llama(w, tmp):
    folder = _checkpoint_copy(w, tmp)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "mistral"}))
    return ["--set", f"model.base_uri={folder}"], [f"{folder}/config.json: model_type is 'mistral'", "only Llama"]


def fp8_head_on_an_odd_vocabulary(w, tmp):
    from pipeline.demo import make_tiny_checkpoint

    folder = make_tiny_checkpoint(tmp / "odd", vocab_size=500)  # a whole, valid checkpoint: 500 tokens
    return (["--set", f"model.base_uri={folder}", "--set", "train.fp8=delayed", "--set", "train.fp8_fallback=true",
             "--set", "train.fp8_head=true"],
            [f"{folder}/config.json: train.fp8_head=true cannot run on this model: the vocabulary (500) must be "
             "divisible by 16", "set it to null"])


def missing_shard(w, tmp):
    folder = _checkpoint_copy(w, tmp)
    uri = _published(w, folder, "missing-shard")
    shard = _shard_of(folder, "model.norm.weight")
    key = f"{uri.removeprefix(f's3://{w.bucket}/')}/{shard}"
    boto3.client("s3", endpoint_url=w.endpoint).delete_object(Bucket=w.bucket, Key=key)
    return ["--set", f"model.base_uri={uri}"], [f"{uri}/{INDEX}: names shard {shard}, which is missing", "upload it"]


def truncated_shard(w, tmp):
    folder = _checkpoint_copy(w, tmp)
    shard = _shard_of(folder, "model.norm.weight")
    data = (folder / shard).read_bytes()
    (folder / shard).write_bytes(data[: len(data) // 2])
    uri = _published(w, folder, "truncated")  # the manifest vouches for the cut file: only its header can tell
    return ["--set", f"model.base_uri={uri}"], [f"{uri}/{shard}: {len(data) // 2} bytes, but its header describes "
                                       f"{len(data)}", "publish the checkpoint again"]


def shape_mismatch(w, tmp):
    folder = _checkpoint_copy(w, tmp)
    shard = _shard_of(folder, "model.norm.weight")
    _rewrite_shard(folder, shard, lambda t: t.update({"model.norm.weight": torch.ones(32)}))
    return ["--set", f"model.base_uri={folder}"], [f"{folder}/{shard}: tensor 'model.norm.weight' has shape (32,), "
                                          "config.json implies (64,)", "different models"]


def index_names_absent_tensor(w, tmp):
    folder = _checkpoint_copy(w, tmp)
    index = json.loads((folder / INDEX).read_text())
    shard = _shard_of(folder, "model.norm.weight")
    index["weight_map"]["model.layers.7.mlp.up_proj.weight"] = shard
    (folder / INDEX).write_text(json.dumps(index))
    return ["--set", f"model.base_uri={folder}"], [f"{INDEX}: names tensor 'model.layers.7.mlp.up_proj.weight' in "
                                          f"{shard}, which does not hold it"]


def missing_tensor(w, tmp):
    folder = _checkpoint_copy(w, tmp)
    shard = _shard_of(folder, "model.norm.weight")
    _rewrite_shard(folder, shard, lambda t: t.pop("model.norm.weight"))
    index = json.loads((folder / INDEX).read_text())
    del index["weight_map"]["model.norm.weight"]
    (folder / INDEX).write_text(json.dumps(index))
    return ["--set", f"model.base_uri={folder}"], [f"{folder}: tensor 'model.norm.weight' in no shard", "incomplete"]


def pickle_only(w, tmp):
    folder = _checkpoint_copy(w, tmp)
    for path in folder.glob("model*.safetensors*"):
        path.unlink()
    torch.save({"model.norm.weight": torch.ones(64)}, folder / "pytorch_model.bin")
    return ["--set", f"model.base_uri={folder}"], [f"{folder}/pytorch_model.bin: pickled weights are never loaded",
                                          "convert the checkpoint to safetensors"]


def no_config(w, tmp):
    folder = _checkpoint_copy(w, tmp)
    (folder / "config.json").unlink()
    return ["--set", f"model.base_uri={folder}"], [f"{folder}: no config.json", "Hugging Face checkpoint folder"]


def config_value(change: dict, expect: list[str], file: str = "config.json"):
    """A copy of the base checkpoint whose config.json has `change` applied; the error names `file`."""
    def arrange(w, tmp):
        folder = _checkpoint_copy(w, tmp)
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **change}))
        return ["--set", f"model.base_uri={folder}"], [f"{folder}/{file}: ", *expect]
    return arrange


def int8_weight(w, tmp):
    folder = _checkpoint_copy(w, tmp)
    shard = _shard_of(folder, "model.norm.weight")
    _rewrite_shard(folder, shard, lambda t: t.update({"model.norm.weight": torch.ones(64, dtype=torch.int8)}))
    return ["--set", f"model.base_uri={folder}"], [f"{folder}/{shard}: tensor 'model.norm.weight' has dtype I8",
                                          "must be floating point"]


def header_dtype_disagrees_with_bytes(w, tmp):
    """The header says F16 where the bytes are F32: a valid file length, a wrong byte span."""
    folder = _checkpoint_copy(w, tmp)
    shard = _shard_of(folder, "model.norm.weight")
    data = (folder / shard).read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    header["model.norm.weight"]["dtype"] = "F16"
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    (folder / shard).write_bytes(len(head).to_bytes(8, "little") + head + data[8 + length:])
    return ["--set", f"model.base_uri={folder}"], [f"{folder}/{shard}: tensor 'model.norm.weight' spans 256 bytes, "
                                          "but F16 of shape (64,) needs 128"]


def tracking_nobody_listens(w, tmp):
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return ["--set", f"tracking.uri=http://127.0.0.1:{port}"], [
        f"tracking.uri: no MLflow server answers at http://127.0.0.1:{port}", "start it, or fix tracking.uri"]


def cache_dir_is_a_file(w, tmp):
    (tmp / "node-cache").write_text("not a folder\n")
    return ["--set", f"run.cache_dir={tmp / 'node-cache'}"], [f"run.cache_dir: {tmp / 'node-cache'} is a file"]


def data_file(name: str, lines: list[str], *more: str, expect: Callable[[str], list[str]]):
    def arrange(w, tmp):
        path = _jsonl(tmp / name, lines)
        return ["--set", f"data.train_files=[{path}]", *more], expect(path)
    return arrange


def raw_data_file(name: str, data: bytes, expect: Callable[[str], list[str]]):
    def arrange(w, tmp):
        (tmp / name).write_bytes(data)
        return ["--set", f"data.train_files=[{tmp / name}]"], expect(str(tmp / name))
    return arrange


def settings(*sets: str, expect: list[str] | Callable[[World], list[str]]):
    def arrange(w, tmp):
        return [s.format(w=w, tmp=tmp) for s in sets], expect(w) if callable(expect) else expect
    return arrange


def yaml_with_unknown_key(w, tmp):
    (tmp / "job.yaml").write_text("train:\n  lr: 1.0e-4\n  warmup: 2\n")
    return ["--config", str(tmp / "job.yaml")], ["unknown key 'train.warmup'", "did you mean 'train.warmup_steps'"]


def run_name_into_shared_folder(w, tmp):
    """A shared results folder (inside the snapshotted output folder) named as run.name: nothing there may change."""
    shared = w.out / "shared-results"
    shared.mkdir(parents=True, exist_ok=True)
    (shared / "colleague.csv").write_text("not this job's\n")
    return ["--set", f"run.name={shared}"], ["run.name must be a name, not a path", "run.output_uri and run.cache_dir"]


def yaml_file(name: str, data: bytes, expect: Callable[[Path], list[str]]):
    def arrange(w, tmp):
        (tmp / name).write_bytes(data)
        return ["--config", str(tmp / name)], expect(tmp / name)
    return arrange


def tokenizer_config_cut_off(w, tmp):
    folder = _checkpoint_copy(w, tmp)
    data = (folder / "tokenizer_config.json").read_bytes()
    (folder / "tokenizer_config.json").write_bytes(data[: len(data) // 2])
    return ["--set", f"model.base_uri={folder}"], [f"{folder}/tokenizer_config.json: invalid JSON"]


def prepared_stats_cut_off(w, tmp):
    """The job's data, prepared once; then its stats.json cut short in the bucket."""
    from pipeline.config import load_config
    from pipeline.stages.data import prepare

    cfg = load_config(None, [a for a in w.settings() if a != "--set"])
    prepared = prepare(cfg, cfg.model.base_uri)
    stats = f"{prepared.uri}/stats.json"
    storage.write_bytes(stats, storage.read_bytes(stats, w.options)[:20], w.options)
    return [], [f"{stats}: invalid JSON", f"delete {prepared.uri}"]


LONG = "The old lighthouse keeper climbed the stairs every evening and lit the lamp for the ships at sea."
CHAT_OK = json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]})
CHAT_HUMAN = json.dumps({"messages": [{"role": "human", "content": "Hi"}, {"role": "gpt", "content": "Hello."}]})
MISSING_BUCKET = f"no-such-bucket-{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class Case:
    id: str
    arrange: Callable  # (world, tmp_path) -> (extra argv, substrings of the error line)
    subprocess: bool = False
    during: Callable = nullcontext  # (world) -> context manager the job runs in


@contextmanager
def s3_denies_every_key(world: World):
    """moto checks credentials only when told to: with auth on it knows no access key, so it denies ours.

    The server runs in this process (tests/fixtures/s3_server.py), so its settings are switched here directly.
    """
    from moto import settings as moto_settings
    from moto.core.authorization import ActionAuthenticatorMixin

    saved = moto_settings.INITIAL_NO_AUTH_ACTION_COUNT
    moto_settings.INITIAL_NO_AUTH_ACTION_COUNT, ActionAuthenticatorMixin.request_count = 0, 0
    try:
        yield
    finally:
        moto_settings.INITIAL_NO_AUTH_ACTION_COUNT = saved


CASES = [
    # config
    Case("config-unknown-key", settings("--set", "train.learning_rate=1e-4",
                                        expect=["unknown key 'train.learning_rate'", "did you mean 'train.lr'"])),
    Case("config-unknown-key-in-yaml", yaml_with_unknown_key, subprocess=True),
    Case("config-wrong-type", settings("--set", "train.workers=two",
                                       expect=["train.workers: expected int, got str 'two'"])),
    Case("config-wrong-type-list", settings("--set", "data.train_files=text.jsonl",
                                            expect=["data.train_files: expected list of str, got str"])),
    Case("config-negative-lr", settings("--set", "train.lr=-1e-4", expect=["train.lr must be > 0 (got -0.0001)"])),
    Case("config-batch-not-divisible-by-workers", settings(
        "--set", "train.global_batch_size=10",
        expect=["train.global_batch_size must be a multiple of train.workers x train.micro_batch_size = 2 x 4 = 8",
                "change one of the three"])),
    Case("config-fp8-on-cpu-workers", settings("--set", "train.fp8=delayed",
                                               expect=["train.fp8 needs GPU workers", "train.fp8=none"])),
    Case("config-gpu-workers-on-a-machine-without-gpu", settings(
        "--set", "train.use_gpu=true", "--set", "train.fp8=delayed",
        expect=["train.use_gpu=true, but this machine has no CUDA GPU", "set train.use_gpu=false"])),
    Case("config-yaml-syntax-error", yaml_file("syntax.yaml", b"train:\n  lr: [1\n",
                                              lambda p: [f"invalid YAML at {p}:3:1", "expected ',' or ']'"]),
         subprocess=True),
    Case("config-yaml-duplicate-key", yaml_file("twice.yaml", b"train:\n  lr: 1.0e-4\n  lr: 2.0e-4\n",
                                                lambda p: [f"{p}:3:3", "key 'lr' given twice (first on line 2)"]),
         subprocess=True),
    Case("config-yaml-not-utf8", yaml_file("latin1.yaml", b"run:\n  name: caf\xe9\n",
                                           lambda p: [f"{p}: not UTF-8 (byte 0xe9", "re-encode"]), subprocess=True),
    Case("config-file-missing", settings("--config", "{tmp}/nope.yaml",
                                         expect=["config file not found:", "nope.yaml", "preset name"]),
         subprocess=True),
    Case("config-run-name-absolute-path", run_name_into_shared_folder),
    Case("config-run-name-parent-dir", settings(
        "--set", "run.name=../../x", expect=["run.name must be a name, not a path", "got '../../x'"])),
    Case("config-run-name-nested", settings(
        "--set", "run.name=team/exp1", expect=["run.name must be a name, not a path", "got 'team/exp1'"])),
    Case("config-registered-model-name-path", settings(
        "--set", "export.registered_model_name=../models", expect=["export.registered_model_name must be a name"])),
    # dataset
    Case("data-missing-file", settings(
        "--set", "data.train_files=[{tmp}/missing.jsonl]",
        expect=["data.train_files[0]: input not found:", "missing.jsonl; fix the uri or upload the file"])),
    Case("data-missing-object", settings(
        "--set", "data.train_files=[{w.data_uri},s3://{w.bucket}/data/missing.jsonl]",
        expect=lambda w: [f"data.train_files[1]: input not found: s3://{w.bucket}/data/missing.jsonl"])),
    Case("data-empty-file", data_file("empty.jsonl", [], expect=lambda p: [f"{p}: holds no records", "remove it"])),
    Case("data-malformed-json-line", data_file(
        "bad.jsonl", ['{"text": "one"}', '{"text": "two"}', '{"text": "three"'],
        expect=lambda p: [f"{p}:3: invalid JSON", "fix or remove that line"])),
    Case("data-missing-column", data_file(
        "body.jsonl", ['{"body": "one"}'],
        expect=lambda p: [f"{p}:1: field 'text' is missing (fields: body)", "set data.text_field"])),
    Case("data-wrong-format", data_file(
        "text.jsonl", ['{"text": "one"}'], "--set", "data.format=instruction",
        expect=lambda p: [f"{p}:1: field 'instruction' is missing", "need 'instruction' and 'output'"])),
    Case("data-wrong-chat-role", data_file(
        "chat.jsonl", [CHAT_OK, CHAT_HUMAN], "--set", "data.format=chat",
        expect=lambda p: [f"{p}:2: message 0 has role 'human'", "use one of system, user, assistant"])),
    Case("data-all-rows-too-long", data_file(
        "long.jsonl", [json.dumps({"text": LONG})] * 5, "--set", "data.seq_len=16", "--set", "data.val_fraction=0",
        expect=lambda p: [f"every one of the 5 training documents ({p})", "data.seq_len=16", "raise data.seq_len"])),
    Case("data-not-utf8", raw_data_file(
        "latin1.jsonl", b'{"text": "fine"}\n{"text": "caf\xe9"}\n',
        expect=lambda p: [f"{p}:2: not UTF-8 (byte 0xe9", "re-encode the file as UTF-8"])),
    Case("data-fewer-rows-than-workers", settings(
        "--set", "data.max_documents=3",
        expect=["fewer than train.workers x train.micro_batch_size = 8", "add training data"])),
    # checkpoint
    Case("ckpt-not-llama", not_llama),
    Case("ckpt-fp8-head-on-an-odd-vocabulary", fp8_head_on_an_odd_vocabulary),
    Case("ckpt-no-config", no_config),
    Case("ckpt-missing-shard", missing_shard),
    Case("ckpt-truncated-safetensors", truncated_shard),
    Case("ckpt-shape-mismatch", shape_mismatch),
    Case("ckpt-index-names-absent-tensor", index_names_absent_tensor),
    Case("ckpt-missing-tensor", missing_tensor),
    Case("ckpt-pickle-only", pickle_only),
    Case("ckpt-heads-do-not-divide-hidden", config_value(
        {"num_attention_heads": 5, "num_key_value_heads": 5},
        ["num_attention_heads 5 does not divide hidden_size 64"])),
    Case("ckpt-vocab-smaller-than-tokenizer", config_value(
        {"vocab_size": 100}, ["token id", "outside config.json's vocab_size 100"], file="tokenizer.json")),
    Case("ckpt-string-where-a-number-belongs", config_value(
        {"hidden_size": "64"}, ["hidden_size must be an integer >= 1, got '64'"])),
    Case("ckpt-int8-weight", int8_weight),
    Case("ckpt-header-dtype-disagrees-with-bytes", header_dtype_disagrees_with_bytes),
    Case("ckpt-tokenizer-json-cut-off", tokenizer_config_cut_off),
    Case("data-prepared-stats-cut-off", prepared_stats_cut_off),
    # tracking, local folders, stages
    Case("tracking-nobody-listens", tracking_nobody_listens),
    Case("tracking-unsupported-scheme", settings(
        "--set", "tracking.uri=postgresql://db/mlflow",
        expect=["tracking.uri must be an http(s):// MLflow server, a sqlite:/// database or a local folder"])),
    Case("cache-dir-is-a-file", cache_dir_is_a_file),
    Case("stages-none", settings("--stages", ",", expect=["--stages names no stage"]), subprocess=True),
    Case("stages-eval-without-a-checkpoint", settings(
        "--stages", "eval", expect=["stage 'eval' needs the train stage's output", "add train to --stages"])),
    # storage
    Case("storage-bad-uri-scheme", settings(
        "--set", "run.output_uri=gs://{w.bucket}/runs",
        expect=["run.output_uri: unsupported uri scheme 'gs://'", "use s3://bucket/key"])),
    Case("storage-uri-without-bucket", settings(
        "--set", "model.base_uri=s3:///base", expect=["model.base_uri: 's3:///base' names no bucket"])),
    Case("storage-bad-endpoint", settings(
        "--set", "storage.endpoint_url=localhost:9000", expect=["storage.endpoint_url must look like http://"])),
    Case("storage-missing-bucket", settings(
        "--set", f"run.output_uri=s3://{MISSING_BUCKET}/runs",
        expect=[f"run.output_uri: bucket '{MISSING_BUCKET}' does not exist", "create it"]), subprocess=True),
    Case("storage-missing-bucket-for-data", settings(
        "--set", f"data.train_files=[s3://{MISSING_BUCKET}/text.jsonl]",
        expect=[f"data.train_files[0]: bucket '{MISSING_BUCKET}' does not exist"])),
    Case("storage-denied-credentials", settings(
        expect=lambda w: [f"run.output_uri: access to bucket '{w.bucket}'", "denied",
                          "check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"]), during=s3_denies_every_key),
]


def run_job(argv: list[str], as_subprocess: bool, cwd: Path, capfd) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of the entry point, in this process or in a new one."""
    if not as_subprocess:
        code = finetune.main(argv)
        out, err = capfd.readouterr()
        return code, out, err
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(REPO / "jobs/finetune.py"), *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)
    return done.returncode, done.stdout, done.stderr


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_is_refused_in_one_line_and_leaves_no_trace(case, world, tmp_path, capfd):
    if case.id == "config-gpu-workers-on-a-machine-without-gpu" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    extra, expected = case.arrange(world, tmp_path)
    before, ray_was_up = world.snapshot(), ray.is_initialized()
    capfd.readouterr()
    with case.during(world):
        code, out, err = run_job([*world.settings(), *extra], case.subprocess, tmp_path, capfd)
    after = world.snapshot()
    assert ray.is_initialized() == ray_was_up

    assert code == 1, out + err
    lines = job_stderr_lines(err)
    assert len(lines) == 1, err
    assert lines[0].startswith("finetune: error: ")
    for part in expected:
        assert part in lines[0]
    assert "Traceback" not in out + err
    assert before.changes(after) == []


# What a bad record does to the job, a dry run finds too: it reads each input as data preparation does.
RECORD_CASES = [case for case in CASES if case.id in {
    "data-missing-file", "data-missing-object", "data-empty-file", "data-malformed-json-line",
    "data-missing-column", "data-wrong-format", "data-wrong-chat-role", "data-not-utf8"}]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", RECORD_CASES, ids=[case.id for case in RECORD_CASES])
def test_a_dry_run_names_the_same_bad_input_and_checks_the_rest(case, world, tmp_path, capfd):
    extra, expected = case.arrange(world, tmp_path)
    before = world.snapshot()
    capfd.readouterr()
    code, out, err = run_job([*world.settings(), *extra, "--dry-run"], case.subprocess, tmp_path, capfd)
    assert code == 1, out + err
    failed = [line for line in out.splitlines() if line.startswith("FAIL ")]
    assert len(failed) == 1 and failed[0].startswith("FAIL data "), out
    for part in expected:  # the job's line names the config key before the input; the dry run's, the input
        assert re.sub(r"^data\.\w+\[\d+\]: ", "", part) in failed[0]
    assert [line for line in out.splitlines() if line.startswith("ok   base checkpoint ")], out
    assert "Traceback" not in out + err
    assert before.changes(world.snapshot()) == []


@pytest.mark.parametrize("flag", ["--debug", "--traceback"])
def test_debug_adds_the_traceback_before_the_same_line(flag, world, tmp_path, capfd):
    missing = tmp_path / "missing.jsonl"
    argv = [*world.settings(), "--set", f"data.train_files=[{missing}]"]
    assert finetune.main(argv) == 1
    quiet = capfd.readouterr().err.strip().splitlines()
    assert finetune.main([*argv, flag]) == 1
    loud = capfd.readouterr().err.strip().splitlines()
    assert loud[0] == "Traceback (most recent call last):" and len(loud) > 3
    assert loud[-1] == quiet[0] and f"input not found: {missing}" in quiet[0]
