"""Security guarantees of a job, each proven against the real entry point or the real loaders.

- Credentials in the environment never reach the job's output, logs, MLflow params, tags or artifacts,
  or what it writes to storage; credentials inside a uri are refused without being repeated.
- Checkpoint code never runs: no `trust_remote_code=True` and no unpickling anywhere in the product code,
  and a checkpoint whose config names custom code (`auto_map`) is ignored or refused without importing it.
- Weights are read from safetensors only, and a shard changed in storage after publishing is refused by
  name. (Same-size changes are caught by sha256 when the shard is pulled:
  tests/integration/test_storage.py::test_corrupted_object_is_rejected_and_removed. Pickles are never pulled:
  test_storage.py::test_s3_round_trip_pulls_everything_but_pickles, nor logged to MLflow:
  test_tracking.py::test_pickled_weights_are_never_logged.)
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import uuid
from pathlib import Path

import boto3
import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.entities import ViewType

from jobs import finetune
from pipeline import storage
from pipeline.stages.data import load_tokenizer
from pipeline.config import DataConfig
from pipeline.job.preflight import check_base_checkpoint
from te_model.weights import load_config
from tests.fixtures.job_traces import folder_files, job_stderr_lines

REPO = Path(__file__).resolve().parents[2]
PRODUCT_CODE = [p for d in ("pipeline", "te_model", "jobs", "bench") for p in sorted((REPO / d).rglob("*.py"))]
# Shaped like the real thing, so that value-based redaction would also have to recognise them.
SECRETS = {
    "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzSECRETzKEY",
    "AWS_SESSION_TOKEN": "FwoGZXIvYXdzEBaaDSESSIONzTOKENzVALUE0123456789",
    "HF_TOKEN": "hf_SECRETzHFzTOKENzabcdefghijklmnop",
    "MLFLOW_TRACKING_PASSWORD": "mlflow-SECRET-password-0123",
}


def _one_line(code: int, out: str, err: str, secret: str | None = None) -> str:
    """The single stderr line of a failed job (which never repeats `secret`)."""
    assert code == 1 and (secret is None or secret not in out + err)
    lines = job_stderr_lines(err)
    assert len(lines) == 1 and "Traceback" not in out + err, err
    return lines[0]


# ---------------------------------------------------------------------------------------------------
# credentials


@pytest.mark.parametrize("key, uri", [
    ("data.train_files[0]", "s3://AKIAIOSFODNN7EXAMPLE:{secret}@{bucket}/data/text.jsonl"),
    ("model.base_uri", "s3://AKIAIOSFODNN7EXAMPLE:{secret}@{bucket}/base/tiny-llama"),
    ("run.output_uri", "s3://AKIAIOSFODNN7EXAMPLE:{secret}@{bucket}/runs"),
    ("storage.endpoint_url", "http://minio:{secret}@127.0.0.1:9000"),
    ("tracking.uri", "http://bob:{secret}@127.0.0.1:5000"),
])
def test_a_uri_with_credentials_is_refused_without_repeating_them(key, uri, world, capfd):
    secret = SECRETS["AWS_SECRET_ACCESS_KEY"]
    value = uri.format(secret=secret, bucket=world.bucket)
    setting = f"{key.removesuffix('[0]')}=[{value}]" if key.endswith("[0]") else f"{key}={value}"
    before = world.snapshot()
    code = finetune.main([*world.settings(), "--set", setting])
    line = _one_line(code, *capfd.readouterr(), secret=secret)
    assert line.startswith(f"finetune: error: {key}: the uri carries credentials before '@")
    assert "remove them" in line
    assert before.changes(world.snapshot()) == []


def _everything_mlflow_holds(tracking_uri: str, experiment: str, dst: Path) -> str:
    """Params, tags and every artifact file of every run of `experiment`, and model version sources."""
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id],
                              run_view_type=ViewType.ALL)
    texts = []
    for run in runs:
        texts += [*map(str, run.data.params.items()), *map(str, run.data.tags.items())]
        folder = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=str(dst / run.info.run_id),
                                                     tracking_uri=tracking_uri)
        texts += [p.read_bytes().decode("latin-1") for p in Path(folder).rglob("*") if p.is_file()]
    texts += [str(v.source) for v in client.search_model_versions(f"name='{experiment}'")]
    assert len(runs) == 5  # the parent and four stages
    return "\n".join(texts)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_secrets_in_the_environment_reach_no_log_param_tag_artifact_or_file(
        world, tmp_path, mlflow_server, ray_cluster, monkeypatch, capfd, caplog):
    for name, secret in SECRETS.items():
        monkeypatch.setenv(name, secret)  # moto accepts any key while its auth is off
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "bob")
    experiment = f"secrets-{uuid.uuid4().hex[:6]}"
    out = tmp_path / "out"
    sets = [f"run.name={experiment}", f"run.experiment={experiment}", f"run.output_uri={out}",
            f"run.cache_dir={tmp_path / 'node'}", f"storage.endpoint_url={world.endpoint}",
            f"model.base_uri={world.base_uri}", "model.backend=torch", f"data.train_files=[{world.data_uri}]",
            "data.seq_len=64", "data.max_documents=60",
            "train.workers=1", "train.max_steps=2", "train.warmup_steps=1", "train.checkpoint_every=1",
            "eval.max_batches=1", "eval.num_samples=1", "eval.max_new_tokens=4",
            f"export.registered_model_name={experiment}", f"tracking.uri={mlflow_server.uri}"]
    with caplog.at_level(logging.INFO):
        assert finetune.main([a for s in sets for a in ("--set", s)]) == 0
    stdout, stderr = capfd.readouterr()
    import ray

    # Ray has no public call for its session folder; the workers' own log files are in there.
    ray_logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    places = {
        "job output": stdout + stderr, "log records": caplog.text,
        "Ray logs": "".join(p.read_text(errors="replace") for p in ray_logs.rglob("*") if p.is_file()),
        "MLflow": _everything_mlflow_holds(mlflow_server.uri, experiment, tmp_path / "artifacts"),
        "output files": "".join((out / name).read_bytes().decode("latin-1") for name in folder_files(out)),
    }
    assert "[export]" in stdout and "exports" in places["output files"] + stdout
    for place, text in places.items():
        for name, secret in SECRETS.items():
            assert secret not in text, f"{name} found in {place}"


# ---------------------------------------------------------------------------------------------------
# no code from checkpoints, no pickles


def test_product_code_never_trusts_remote_code_or_unpickles():
    offenders = []
    for path in PRODUCT_CODE:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            trusting = re.search(r"trust_remote_code\s*=\s*(?!False\b)", line)
            unpickling = re.search(r"\b(torch\.load|pickle\.loads?|joblib\.load|dill\.load)\(", line)
            if trusting or unpickling:
                offenders.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert len(PRODUCT_CODE) > 30 and offenders == []


def _checkpoint_with_custom_code(world, tmp_path: Path, model_type: str) -> tuple[Path, Path]:
    """A copy of the base checkpoint whose config and tokenizer name code that, if imported, leaves a file."""
    folder = Path(shutil.copytree(world.base_dir, tmp_path / "custom", ignore=shutil.ignore_patterns("manifest.json")))
    marker = tmp_path / "custom-code-ran"
    for module in ("configuration_custom", "modeling_custom", "tokenization_custom"):
        (folder / f"{module}.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type=model_type, auto_map={"AutoConfig": "configuration_custom.CustomConfig",
                                                   "AutoModelForCausalLM": "modeling_custom.CustomModel"})
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config["auto_map"] = {"AutoTokenizer": ["tokenization_custom.CustomTokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return folder, marker


def test_custom_code_named_by_a_llama_checkpoint_is_ignored(world, tmp_path):
    folder, marker = _checkpoint_with_custom_code(world, tmp_path, "llama")
    assert check_base_checkpoint(str(folder), world.options).startswith("llama")
    assert type(load_config(folder)).__module__.startswith("transformers.")
    assert type(load_tokenizer(str(folder), DataConfig())).__module__.startswith("transformers.")
    uri = f"s3://{world.bucket}/custom/{uuid.uuid4().hex[:6]}"
    storage.upload_dir(folder, uri, world.options)
    pulled = storage.pull_checkpoint(uri, tmp_path / "cache", world.options)
    assert not list(pulled.glob("*.py"))  # code is never even downloaded
    assert not marker.exists()


def test_a_checkpoint_of_custom_code_is_refused_without_running_it(world, tmp_path, capfd):
    folder, marker = _checkpoint_with_custom_code(world, tmp_path, "custom")
    before = world.snapshot()
    code = finetune.main([*world.settings(), "--set", f"model.base_uri={folder}"])
    line = _one_line(code, *capfd.readouterr())
    assert f"{folder}/config.json: model_type is 'custom'; only Llama checkpoints" in line
    with pytest.raises(ValueError):
        load_config(folder)  # the worker-side loader refuses it as well
    assert not marker.exists()
    assert before.changes(world.snapshot()) == []


# ---------------------------------------------------------------------------------------------------
# shards checked against the manifest


def test_a_shard_changed_in_storage_after_publishing_is_refused_by_name(world, tmp_path, capfd):
    uri = f"s3://{world.bucket}/tampered/{uuid.uuid4().hex[:6]}"
    storage.publish(Path(shutil.copytree(world.base_dir, tmp_path / "ckpt")), uri, world.options)
    shard = sorted(p.name for p in world.base_dir.glob("model-*.safetensors"))[0]
    original = (world.base_dir / shard).read_bytes()
    s3 = boto3.client("s3", endpoint_url=world.endpoint)
    s3.put_object(Bucket=world.bucket, Key=f"{uri.split('/', 3)[3]}/{shard}", Body=original + b"\0" * 16)
    before = world.snapshot()
    code = finetune.main([*world.settings(), "--set", f"model.base_uri={uri}"])
    line = _one_line(code, *capfd.readouterr())
    assert f"{uri}/{shard}: {len(original) + 16} bytes in storage, manifest.json says {len(original)}" in line
    assert before.changes(world.snapshot()) == []
