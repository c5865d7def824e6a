"""MLflow tracking against a real `mlflow server`: run nesting, what reaches the server (and what must
not), metric delivery off the training thread, and a registered model that Transformers can load."""

from __future__ import annotations

import inspect
import logging
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path

import boto3
import mlflow
import pytest
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from pipeline import tracking
from pipeline.errors import PipelineError

TRAIN_METRICS = ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "gpu_mem_gb")
SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
SIGNED_AWAY = "https://bucket.s3.amazonaws.com/data/train.jsonl?<redacted>"
PRESIGNED = (
    "https://bucket.s3.amazonaws.com/data/train.jsonl?X-Amz-Algorithm=AWS4-HMAC-SHA256"
    "&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20240101%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Signature=0123abcdef"
)


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _dead_uri() -> str:
    """A tracking uri where nothing listens: connections are refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture
def client(mlflow_server) -> MlflowClient:
    return MlflowClient(tracking_uri=mlflow_server.uri, registry_uri=mlflow_server.uri)


@pytest.fixture
def parent_id(mlflow_server) -> str:
    return tracking.find_or_start_parent(_name("exp"), _name("job"), tracking_uri=mlflow_server.uri)


@pytest.fixture
def no_http_retries(monkeypatch):
    """MLflow's own HTTP retry policy (minutes of backoff by default) cut to zero, so failures surface now."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")


def test_stages_nest_under_one_parent_that_a_rerun_finds_again(mlflow_server, client):
    experiment, job = _name("exp"), _name("job")
    parent = tracking.find_or_start_parent(experiment, job, {"owner": "ml"}, tracking_uri=mlflow_server.uri)
    assert tracking.find_or_start_parent(experiment, job, tracking_uri=mlflow_server.uri) == parent
    assert tracking.find_or_start_parent(experiment, "x", parent_id=parent, tracking_uri=mlflow_server.uri) == parent
    assert tracking.find_or_start_parent(experiment, _name("other-job"), tracking_uri=mlflow_server.uri) != parent

    with tracking.stage_run(parent, "data-prep", tracking_uri=mlflow_server.uri) as prep:
        assert client.get_run(prep).info.status == "RUNNING"
    with pytest.raises(RuntimeError, match="boom"):
        with tracking.stage_run(parent, "train", tracking_uri=mlflow_server.uri):
            raise RuntimeError("boom")
    with tracking.stage_run(parent, "train", tracking_uri=mlflow_server.uri) as train_rerun:
        pass
    for stop in (KeyboardInterrupt(), SystemExit(15)):  # Ctrl-C; SIGTERM through Ray's driver handler
        with pytest.raises(type(stop)):
            with tracking.stage_run(parent, "eval", tracking_uri=mlflow_server.uri):
                raise stop

    experiment_id = client.get_run(parent).info.experiment_id
    children = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    by_status = sorted((r.data.tags["pipeline.stage"], r.info.status) for r in children)
    assert by_status == [("data-prep", "FINISHED"), ("eval", "KILLED"), ("eval", "KILLED"), ("train", "FAILED"),
                         ("train", "FINISHED")]
    assert client.get_run(train_rerun).data.tags["mlflow.runName"] == "train"
    assert client.get_run(parent).data.tags["owner"] == "ml"

    client.delete_run(parent)
    with pytest.raises(PipelineError, match="deleted"):
        tracking.find_or_start_parent(experiment, job, parent_id=parent, tracking_uri=mlflow_server.uri)
    assert tracking.find_or_start_parent(experiment, job, tracking_uri=mlflow_server.uri) != parent


def test_params_reach_the_server_flattened_truncated_and_without_secrets(mlflow_server, client, tmp_path):
    config = {
        "train": {"lr": 3e-4, "seed": 7},
        "data": {"pad_token_id": 2, "train_files": [PRESIGNED, "s3://bucket/plain.jsonl"], "template": "x" * 10_000},
        "storage": {"aws_secret_access_key": SECRET, "hf_token": "hf_abcdefghijklmnopqrstuvwxyz0123"},
        "tracking": {"uri": f"http://bob:{SECRET}@mlflow.internal:5000"},
    }
    parent = tracking.find_or_start_parent(
        _name("exp"), _name("job"), tracking.code_version_tags(tracking.code_version(tmp_path)),
        params=tracking.flatten_params(config), tracking_uri=mlflow_server.uri,
    )
    params = client.get_run(parent).data.params

    assert params["train.lr"] == "0.0003" and params["train.seed"] == "7" and params["data.pad_token_id"] == "2"
    assert len(params["data.template"]) == 6000 and params["data.template"].endswith("x...<10000 chars, truncated>")
    assert params["storage.aws_secret_access_key"] == tracking.REDACTED
    assert params["storage.hf_token"] == tracking.REDACTED
    assert "s3://bucket/plain.jsonl" in params["data.train_files"]
    assert SIGNED_AWAY in params["data.train_files"]
    everything = " ".join(params.values())
    for leaked in (SECRET, "X-Amz-Signature", "AKIAIOSFODNN7EXAMPLE", "hf_abcdefghij"):
        assert leaked not in everything
    tags = client.get_run(parent).data.tags
    assert tags["code.source"] == "unknown" and tags["code.commit"] == "unknown"

    assert tracking.log_text(parent, f"prompt from {PRESIGNED}", "samples.txt", tracking_uri=mlflow_server.uri)
    samples = mlflow.artifacts.download_artifacts(
        run_id=parent, artifact_path="samples.txt", dst_path=str(tmp_path / "dl"), tracking_uri=mlflow_server.uri
    )
    assert Path(samples).read_text() == f"prompt from {SIGNED_AWAY}"


def test_changed_params_keep_the_first_value_and_do_not_fail(mlflow_server, client, parent_id, caplog):
    assert tracking.log_params(parent_id, {"train.lr": 1e-3}, tracking_uri=mlflow_server.uri)
    with caplog.at_level(logging.WARNING, logger="pipeline.tracking"):
        assert tracking.log_params(parent_id, {"train.lr": 5e-3, "train.steps": 3}, tracking_uri=mlflow_server.uri)
    assert client.get_run(parent_id).data.params == {"train.lr": "0.001", "train.steps": "3"}
    assert "train.lr" in caplog.text


def test_code_version_comes_from_git_else_from_the_environment(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (repo / "a.py").write_text("x = 1\n")
    subprocess.run([*git, "add", "a.py"], check=True)
    subprocess.run([*git, "commit", "-qm", "init"], check=True)
    commit = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()

    assert tracking.code_version(repo) == {"commit": commit, "dirty": False, "source": "git"}
    (repo / "a.py").write_text("x = 2\n")
    version = tracking.code_version(repo)
    assert version == {"commit": commit, "dirty": True, "source": "git"}

    # A Ray job's working dir has no .git: the submitter's version arrives through the environment.
    monkeypatch.setenv(*tracking.code_version_env(version).popitem())
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    assert tracking.code_version(job_dir) == version | {"source": "env"}
    assert tracking.code_version_tags(version)["mlflow.source.git.commit"] == commit


def test_redaction_masks_secret_keys_and_values_but_keeps_vocabulary_tokens():
    assert all(map(tracking.is_secret_key, ["AWS_SECRET_ACCESS_KEY", "hf_token", "db.password", "apiKey", "token"]))
    assert not any(map(tracking.is_secret_key, ["data.pad_token_id", "eos_token", "tokenizer", "tokens_per_s"]))
    assert tracking.redact_text(f"see {PRESIGNED} now") == f"see {SIGNED_AWAY} now"
    assert tracking.redact_text("Authorization: Bearer abc.def-ghi") == "Authorization: <redacted>"
    # AWS secret keys hold '/', which ends the host part for urlsplit; s3:///key has no host at all
    assert tracking.redact_text("s3://AKIA:wJal/K7MD+x@bucket/k") == "s3://<redacted>@bucket/k"
    assert tracking.redact_text("s3:///key and s3://b/a:b@c") == "s3:///key and s3://b/a:b@c"


def test_metric_logger_delivers_every_step_in_order(mlflow_server, client, parent_id):
    with tracking.stage_run(parent_id, "train", tracking_uri=mlflow_server.uri) as run_id:
        logger = tracking.metric_logger(0, run_id, mlflow_server.uri)
        assert isinstance(logger, tracking.AsyncMetricLogger)
        for step in range(200):
            logger.log(step, {name: step + i / 10 for i, name in enumerate(TRAIN_METRICS)})
        assert logger.close(timeout=60)
    assert (logger.sent, logger.dropped, logger.failures, logger.pending) == (200, 0, 0, 0)
    for i, name in enumerate(TRAIN_METRICS):
        history = client.get_metric_history(run_id, name)
        assert [m.step for m in history] == list(range(200))
        assert [m.value for m in history] == pytest.approx([step + i / 10 for step in range(200)])


def _log_steps(logger, steps: int) -> list[float]:
    durations = []
    for step in range(steps):
        start = time.perf_counter()
        logger.log(step, {name: 1.0 for name in TRAIN_METRICS})
        durations.append(time.perf_counter() - start)
    return sorted(durations)


def test_a_dead_tracking_server_never_blocks_logging(no_http_retries, caplog):
    logger = tracking.AsyncMetricLogger(uuid.uuid4().hex, _dead_uri(), max_pending_steps=300, flush_every_s=0.05)
    with caplog.at_level(logging.WARNING, logger="pipeline.tracking"):
        durations = _log_steps(logger, 1000)
        time.sleep(0.3)  # let the thread try (and fail) at least once
        start = time.monotonic()
        assert not logger.close(timeout=1.0)
        assert time.monotonic() - start < 10.0
    # a log() that sent on the caller's thread would pay a connection attempt every time: the median shows it
    assert durations[len(durations) // 2] < 0.001 and durations[-1] < 1.0
    assert logger.failures >= 1 and logger.sent == 0 and logger.dropped == 1000
    assert "failed" in caplog.text and "training goes on" in caplog.text


def test_a_server_that_never_answers_never_blocks_logging_or_close(no_http_retries):
    with socket.socket() as black_hole:  # accepts connections in the kernel, never answers a request
        black_hole.bind(("127.0.0.1", 0))
        black_hole.listen(64)
        uri = f"http://127.0.0.1:{black_hole.getsockname()[1]}"
        logger = tracking.AsyncMetricLogger(uuid.uuid4().hex, uri, flush_every_s=0.05)
        durations = _log_steps(logger, 1000)
        start = time.monotonic()
        assert not logger.close(timeout=1.0)
        assert time.monotonic() - start < 60.0  # a close that waited on the request would take its 120 s timeout
    assert durations[-1] < 1.0 and logger.sent == 0  # likewise any log() that waited on the network


class _ServerBackAt:
    """A tracking client whose server is down until `back_at` (time.monotonic), then takes every batch."""

    def __init__(self, back_at: float) -> None:
        self.back_at, self.steps = back_at, set()

    def log_batch(self, run_id, metrics, synchronous=True) -> None:
        if time.monotonic() < self.back_at:
            raise MlflowException("connection refused", error_code=INTERNAL_ERROR)
        self.steps.update(m.step for m in metrics)


def test_close_keeps_trying_until_its_deadline_whatever_the_outage_backoff():
    """An outage grows the retry backoff (1, 2, 4, 8 s ...); a server that comes back while the logger
    closes still gets every step, even when the next backoff would outlast the close timeout."""
    start = time.monotonic()
    logger = tracking.AsyncMetricLogger(uuid.uuid4().hex, _dead_uri(), flush_every_s=0.05)
    logger._client = _ServerBackAt(back_at=start + 3.5)
    for step in range(1, 51):
        logger.log(step, {"loss": 1.0})
    time.sleep(max(0.0, start + 3.2 - time.monotonic()))  # three failed sends: the next backoff is 4 s, then 8
    assert logger.close(timeout=2.5), "steps were dropped though the server was back before the deadline"
    assert logger._client.steps == set(range(1, 51)) and logger.dropped == 0


class _HeldRequest:
    """A tracking client whose log_batch waits until released, as a request to a slow server does."""

    def __init__(self) -> None:
        self.started, self.release, self.steps = threading.Event(), threading.Event(), set()

    def log_batch(self, run_id, metrics, synchronous=True) -> None:
        self.started.set()
        self.release.wait(30)
        self.steps.update(m.step for m in metrics)


def test_steps_in_a_request_still_being_sent_count_as_pending():
    """A caller that waits for `pending == 0` before it relies on delivery (a drained queue) must not be
    told "done" while the last batch is still on the wire: that batch may yet fail and be requeued."""
    logger = tracking.AsyncMetricLogger(uuid.uuid4().hex, _dead_uri(), flush_every_s=0.05)
    logger._client = held = _HeldRequest()
    for step in range(3):
        logger.log(step, {"loss": 1.0})
    assert held.started.wait(10)
    assert logger.pending == 3
    held.release.set()
    assert logger.close(timeout=10) and logger.pending == 0 and held.steps == {0, 1, 2}


def test_null_logger_has_the_async_logger_interface(mlflow_server, parent_id):
    def public(obj) -> dict[str, str]:
        names = [n for n in dir(obj) if not n.startswith("_")]
        return {n: str(inspect.signature(getattr(obj, n))) if callable(getattr(obj, n)) else "attr" for n in names}

    real = tracking.metric_logger(0, parent_id, mlflow_server.uri)
    null = tracking.metric_logger(1, parent_id, mlflow_server.uri)
    assert isinstance(null, tracking.NullLogger)
    assert isinstance(tracking.metric_logger(0, None, mlflow_server.uri), tracking.NullLogger)
    assert public(null) == public(real)
    null.log(0, {"loss": 1.0})
    with null:
        assert null.close(timeout=1) and null.pending == 0
    assert real.close(timeout=10)


def test_tracking_outage_fails_the_parent_run_but_only_warns_later(no_http_retries, caplog):
    uri = _dead_uri()
    with pytest.raises(PipelineError) as failure:
        tracking.find_or_start_parent("exp", "job", tracking_uri=uri)
    assert uri in str(failure.value) and "\n" not in str(failure.value)
    failures_before = tracking.best_effort_failures()
    with caplog.at_level(logging.WARNING, logger="pipeline.tracking"):
        assert not tracking.log_params(uuid.uuid4().hex, {"train.lr": 1}, tracking_uri=uri)
        assert not tracking.end_run(uuid.uuid4().hex, tracking_uri=uri)
    assert tracking.best_effort_failures() == failures_before + 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and all(f"tracking uri {uri}:" in w for w in warnings)


def _tiny_checkpoint(out_dir: Path) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out_dir)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 64)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, **special).save_pretrained(out_dir)
    return model


def _assert_same_weights(loaded_dir: Path, original: LlamaForCausalLM) -> None:
    loaded = AutoModelForCausalLM.from_pretrained(loaded_dir)
    for (name, expected), actual in zip(original.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(expected, actual), name
    assert AutoTokenizer.from_pretrained(loaded_dir)("w3 w4")["input_ids"][-2:] == [3, 4]


def test_registered_model_downloads_as_a_loadable_checkpoint(mlflow_server, parent_id, tmp_path, monkeypatch):
    original = _tiny_checkpoint(tmp_path / "export")
    name = _name("tiny-llama")
    with tracking.stage_run(parent_id, "export", tracking_uri=mlflow_server.uri) as run_id:
        logged = tracking.log_model_dir(run_id, tmp_path / "export", "model", tracking_uri=mlflow_server.uri)
        assert logged == f"runs:/{run_id}/model"
        assert tracking.register_model(run_id, "model", name, tracking_uri=mlflow_server.uri) == "1"
        assert tracking.register_model(run_id, "model", name, tracking_uri=mlflow_server.uri) == "2"

    downloaded = tracking.download_model_version(name, "1", tmp_path / "dl", tracking_uri=mlflow_server.uri)
    _assert_same_weights(downloaded, original)
    # What a consumer with only MLFLOW_TRACKING_URI set does.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    downloaded = mlflow.artifacts.download_artifacts(f"models:/{name}/2", dst_path=str(tmp_path / "dl2"))
    _assert_same_weights(Path(downloaded), original)


def test_pickled_weights_are_never_logged(mlflow_server, parent_id, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(PipelineError, match="pytorch_model.bin"):
        tracking.log_model_dir(parent_id, tmp_path, tracking_uri=mlflow_server.uri)


def test_a_version_can_point_at_the_object_storage_export(mlflow_server, s3_bucket, parent_id, tmp_path):
    original = _tiny_checkpoint(tmp_path / "export")
    s3 = boto3.client("s3")
    for path in (tmp_path / "export").iterdir():
        s3.upload_file(str(path), s3_bucket, f"exports/tiny/{path.name}")
    name = _name("tiny-llama-s3")
    source = f"s3://{s3_bucket}/exports/tiny"
    version = tracking.register_model(parent_id, "model", name, source_uri=source, tracking_uri=mlflow_server.uri)
    assert MlflowClient(registry_uri=mlflow_server.uri).get_model_version(name, version).source == source
    downloaded = tracking.download_model_version(name, version, tmp_path / "dl", tracking_uri=mlflow_server.uri)
    _assert_same_weights(downloaded, original)


def test_local_tracking_keeps_database_and_artifacts_in_the_output_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert tracking.resolve_tracking_uri("http://mlflow:5000/") == "http://mlflow:5000"
    assert tracking.resolve_tracking_uri("sqlite:///rel/mlflow.db") == f"sqlite:///{tmp_path}/rel/mlflow.db"
    assert tracking.resolve_tracking_uri("runs-folder") == (tmp_path / "runs-folder").as_uri()
    with pytest.raises(PipelineError, match="tracking.uri"):
        tracking.resolve_tracking_uri("sqlite://:memory:")

    uri = tracking.resolve_tracking_uri("", output_dir=tmp_path / "out")
    parent = tracking.find_or_start_parent("local", "job", tracking_uri=uri)
    with tracking.stage_run(parent, "export", tracking_uri=uri) as run_id:
        (tmp_path / "ckpt").mkdir()
        (tmp_path / "ckpt" / "config.json").write_text("{}")
        tracking.log_model_dir(run_id, tmp_path / "ckpt", tracking_uri=uri)
    assert (tmp_path / "out" / "mlflow.db").is_file()
    assert list((tmp_path / "out" / "mlartifacts").rglob("model/config.json"))
