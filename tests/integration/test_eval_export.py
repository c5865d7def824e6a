"""Eval and export on real parts: a tiny Llama base, packed validation rows from `pipeline.stages.data`, a
"trained" checkpoint in the training stage's format (TE-style `model.safetensors`), a moto S3 bucket and a
real `mlflow server`. References are computed independently with HF's own LlamaForCausalLM."""

from __future__ import annotations

import json
import logging
import math
import shutil
import uuid
from pathlib import Path

import boto3
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from mlflow import MlflowClient
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import te_model
from pipeline import storage, tracking
from pipeline.config import Config
from pipeline.stages.data import format_instruction_prompt, prepare
from pipeline.errors import IntegrityError, PipelineError
from pipeline.stages.evaluate import _prompt_ids, evaluate, generate_samples, load_trained_model
from pipeline.stages.export import convert, export
from pipeline.storage.manifest import MANIFEST_NAME, read_manifest, write_manifest
from pipeline.demo import make_tiny_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[2]
BATCH_SIZE, MAX_BATCHES = 2, 3


def make_cfg(root: Path, **sections) -> Config:
    raw = {
        "run": {"name": "eval-export", "output_uri": str(root / "runs"), "cache_dir": str(root / "node")},
        "model": {"backend": "torch", "dtype": "fp32"},
        "data": {"train_files": [str(REPO_ROOT / "data" / "tiny_text.jsonl")], "max_documents": 80,
                 "val_fraction": 0.25, "seq_len": 128},
        "eval": {"batch_size": BATCH_SIZE, "max_batches": MAX_BATCHES},
        "export": {"max_shard_size": "100KB", "registered_model_name": None},
    }
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    return Config.from_dict(raw)


def write_trained_checkpoint(base_dir: Path, out_dir: Path, seed: int):
    """What the training stage writes: the TE-style parameters (weights moved a little), state, manifest."""
    model = te_model.from_hf_checkpoint(base_dir, backend="torch", dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn(param.shape, generator=generator))
    out_dir.mkdir(parents=True)
    save_file({name: p.detach().contiguous() for name, p in model.named_parameters()}, out_dir / "model.safetensors")
    (out_dir / "trainer_state.json").write_text(json.dumps({"step": 30, "config": {}}))
    write_manifest(out_dir)
    return model.eval()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("eval-export")


@pytest.fixture(scope="module")
def base_dir(workdir) -> Path:
    return make_tiny_checkpoint(workdir / "base")


@pytest.fixture(scope="module")
def val_uri(workdir, base_dir) -> str:
    prepared = prepare(make_cfg(workdir), str(base_dir))
    assert prepared.val_uri is not None
    return prepared.val_uri


@pytest.fixture(scope="module")
def trained(workdir, base_dir):
    """(checkpoint dir, the TE-style model it holds)."""
    directory = workdir / "checkpoint-a"
    return directory, write_trained_checkpoint(base_dir, directory, seed=1)


def reference_loss(model, val_uri: str, n_rows: int) -> float:
    """Token-weighted loss of an HF model run document by document (no packing at all)."""
    rows = pq.read_table(val_uri).slice(0, n_rows).to_pydict()
    total, count = 0.0, 0
    for ids, labels, positions in zip(rows["input_ids"], rows["labels"], rows["position_ids"]):
        starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
        for start, end in zip(starts, starts[1:]):
            targets = torch.tensor(labels[start + 1 : end])
            keep = targets != -100
            if not keep.any():
                continue  # the trailing pad segment
            with torch.no_grad():
                logits = model(torch.tensor([ids[start:end]])).logits[0, :-1].double()
            total += F.cross_entropy(logits[keep], targets[keep], reduction="sum").item()
            count += int(keep.sum())
    return total / count


def hf_logits(directory: Path, ids: torch.Tensor) -> torch.Tensor:
    model, info = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    with torch.no_grad():
        return model.eval()(ids).logits


# ---------------------------------------------------------------------------------------------------
# evaluation


def test_losses_match_hf_scoring_each_document_alone(workdir, base_dir, val_uri, trained):
    rows = pq.read_table(val_uri)
    n_scored = BATCH_SIZE * MAX_BATCHES
    assert rows.num_rows > n_scored  # max_batches must cut the split short
    packed = [sum(1 for p in row if p == 0) for row in rows.column("position_ids").to_pylist()[:n_scored]]
    assert max(packed) >= 3  # several documents share a row, so the packing is what is tested

    cfg = make_cfg(workdir)
    metrics = evaluate(cfg, base_dir, trained[0], val_uri, device="cpu")
    assert set(metrics) == {"base/val_loss", "base/perplexity", "finetuned/val_loss", "finetuned/perplexity"}

    hf_base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    assert metrics["base/val_loss"] == pytest.approx(reference_loss(hf_base, val_uri, n_scored), rel=1e-5)
    assert metrics["base/perplexity"] == pytest.approx(math.exp(metrics["base/val_loss"]), rel=1e-12)
    assert metrics["finetuned/perplexity"] == pytest.approx(math.exp(metrics["finetuned/val_loss"]), rel=1e-12)
    assert abs(metrics["finetuned/val_loss"] - metrics["base/val_loss"]) > 1e-3

    exported = convert(cfg, base_dir, trained[0], workdir / "converted-for-eval")
    hf_finetuned = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    assert metrics["finetuned/val_loss"] == pytest.approx(reference_loss(hf_finetuned, val_uri, n_scored), rel=1e-5)


def test_no_validation_split_skips_the_metrics_with_a_reason(workdir, base_dir, trained, caplog):
    with caplog.at_level(logging.WARNING, logger="pipeline.stages.evaluate"):
        assert evaluate(make_cfg(workdir), base_dir, trained[0], None) == {}
    assert "no validation split" in caplog.text


def test_a_checkpoint_that_does_not_match_the_model_is_refused(base_dir, trained, tmp_path):
    fc2 = "model.layers.1.layernorm_mlp.fc2_weight"
    damages = [
        (lambda t: t.pop(fc2), f"missing tensors {fc2}"),
        (lambda t: t.update({"model.layers.0.mlp.gate_proj.weight": torch.ones(2)}),
         "unexpected tensors model.layers.0.mlp.gate_proj.weight"),
        (lambda t: t.update({"model.norm.weight": torch.ones(63)}), r"'model.norm.weight' has shape \(63,\)"),
    ]
    for i, (damage, message) in enumerate(damages):
        broken = load_file(trained[0] / "model.safetensors")
        damage(broken)
        (tmp_path / str(i)).mkdir()
        save_file(broken, tmp_path / str(i) / "model.safetensors")
        with pytest.raises(PipelineError, match=message):
            load_trained_model(tmp_path / str(i), base_dir, backend="torch", dtype=torch.float32)
    with pytest.raises(PipelineError, match="no model.safetensors"):
        load_trained_model(tmp_path / "missing", base_dir, backend="torch")


# ---------------------------------------------------------------------------------------------------
# export


def test_export_publishes_a_loadable_checkpoint_and_never_overwrites_a_different_one(
    base_dir, trained, s3_server, s3_bucket, tmp_path
):
    cfg = make_cfg(tmp_path, run={"output_uri": f"s3://{s3_bucket}/runs"})
    options = storage.StorageOptions(endpoint_url=s3_server.endpoint_url)
    result = export(cfg, base_dir, trained[0], options=options)
    assert result.uri == f"s3://{s3_bucket}/runs/exports/eval-export" and result.version is None and not result.reused

    listed = boto3.client("s3").list_objects_v2(Bucket=s3_bucket, Prefix="runs/exports/eval-export/")
    keys = {item["Key"].removeprefix("runs/exports/eval-export/") for item in listed["Contents"]}
    assert {MANIFEST_NAME, "config.json", "generation_config.json", "model.safetensors.index.json",
            "tokenizer.json", "tokenizer_config.json"} <= keys
    assert len([k for k in keys if k.endswith(".safetensors")]) >= 3  # sharded at export.max_shard_size
    assert set(read_manifest(result.local_dir)) == keys - {MANIFEST_NAME}

    pulled = storage.pull_checkpoint(result.uri, tmp_path / "pulled", options)
    ids = torch.randint(0, trained[1].config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = trained[1](ids).logits
    torch.testing.assert_close(hf_logits(pulled, ids), expected, rtol=1e-5, atol=1e-5)
    text = "The old lighthouse keeper"
    assert AutoTokenizer.from_pretrained(pulled)(text)["input_ids"] == AutoTokenizer.from_pretrained(base_dir)(text)["input_ids"]
    assert json.loads((pulled / "generation_config.json").read_text())["eos_token_id"] == \
        json.loads((base_dir / "generation_config.json").read_text())["eos_token_id"]

    again = export(cfg, base_dir, trained[0], options=options)  # a re-run with the same weights
    assert again.reused and again.uri == result.uri
    # ... on another node, whose conversion is made anew: MLflow stamps its MLmodel with another id and time
    elsewhere = make_cfg(tmp_path / "node-b", run={"output_uri": f"s3://{s3_bucket}/runs"})
    converted = export(elsewhere, base_dir, trained[0], options=options)
    assert converted.local_dir != result.local_dir and converted.reused
    assert (converted.local_dir / "MLmodel").read_text() != (result.local_dir / "MLmodel").read_text()

    other = tmp_path / "checkpoint-b"
    write_trained_checkpoint(base_dir, other, seed=2)
    with pytest.raises(PipelineError, match=f"different export already exists at {result.uri}"):
        export(cfg, base_dir, other, options=options)
    # the published export is still the first one
    torch.testing.assert_close(hf_logits(storage.pull_checkpoint(result.uri, tmp_path / "pulled-2", options), ids),
                               expected, rtol=1e-5, atol=1e-5)


def export_registered(base_dir, checkpoint, mlflow_server, tmp_path, job: str):
    """Export `checkpoint` in a stage run of `job`, registered under a fresh name: (name, parent, run id, result)."""
    name = f"tiny-llama-{uuid.uuid4().hex[:8]}"
    cfg = make_cfg(tmp_path, export={"registered_model_name": name}, tracking={"uri": mlflow_server.uri})
    parent = tracking.find_or_start_parent("eval-export-tests", job, tracking_uri=mlflow_server.uri)
    with tracking.stage_run(parent, "export", tracking_uri=mlflow_server.uri) as run_id:
        return name, parent, run_id, export(cfg, base_dir, checkpoint, run_id=run_id)


def test_export_logs_artifacts_and_registers_a_loadable_version(
    base_dir, trained, mlflow_server, tmp_path
):
    name, parent, run_id, result = export_registered(base_dir, trained[0], mlflow_server, tmp_path, "export-job")
    assert result.version == "1"

    client = MlflowClient(tracking_uri=mlflow_server.uri, registry_uri=mlflow_server.uri)
    logged = {Path(a.path).name for a in client.list_artifacts(run_id, "model")}
    assert {n.split("/")[0] for n in read_manifest(result.local_dir)} | {MANIFEST_NAME} == logged
    assert {"MLmodel", "components", "requirements.txt", "python_env.yaml", "conda.yaml"} <= logged
    assert client.get_model_version(name, "1").run_id == run_id
    assert client.get_run(run_id).data.tags["export.uri"] == result.uri

    downloaded = tracking.download_model_version(name, "1", tmp_path / "download", tracking_uri=mlflow_server.uri)
    ids = torch.randint(0, trained[1].config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = trained[1](ids).logits
    torch.testing.assert_close(hf_logits(downloaded, ids), expected, rtol=1e-5, atol=1e-5)

    unregistered = make_cfg(tmp_path / "unregistered", tracking={"uri": mlflow_server.uri})
    with tracking.stage_run(parent, "export", tracking_uri=mlflow_server.uri) as run_id:
        assert export(unregistered, base_dir, trained[0], run_id=run_id).version is None
    assert {Path(a.path).name for a in client.list_artifacts(run_id, "model")} == logged


def test_tied_embeddings_and_a_configured_chat_template_survive_the_export(tmp_path):
    base = make_tiny_checkpoint(tmp_path / "tied-base", tie_word_embeddings=True, layers=1)
    model = write_trained_checkpoint(base, tmp_path / "tied-checkpoint", seed=3)
    assert "lm_head.weight" not in load_file(tmp_path / "tied-checkpoint" / "model.safetensors")
    template = "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>{{ m['content'] }}{% endfor %}"
    cfg = make_cfg(tmp_path, data={"chat_template": template})
    out = convert(cfg, base, tmp_path / "tied-checkpoint")

    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(hf_logits(out, ids), model(ids).logits, rtol=1e-5, atol=1e-5)
    assert AutoTokenizer.from_pretrained(out).chat_template == template
    assert not (out / "chat_template.jinja").exists()


# ---------------------------------------------------------------------------------------------------
# samples


def test_samples_are_greedy_completions_of_the_exported_model(workdir, base_dir, trained):
    cfg = make_cfg(workdir)
    out = convert(cfg, base_dir, trained[0], workdir / "converted-for-samples")
    prompts = ["The old lighthouse keeper", "In the morning the baker", "never sampled"]
    samples = generate_samples(out, prompts, max_new_tokens=8, num_samples=2, device="cpu")
    assert [s["prompt"] for s in samples] == prompts[:2]

    # The same greedy decoding done by hand with the TE-style model, no KV cache.
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    stop = set(json.loads((base_dir / "generation_config.json").read_text())["eos_token_id"])
    for sample in samples:
        ids = tokenizer(sample["prompt"])["input_ids"]  # the tiny tokenizer prepends BOS itself
        new = []
        with torch.no_grad():
            while len(new) < 8 and (not new or new[-1] not in stop):
                new.append(int(trained[1](torch.tensor([ids + new])).logits[0, -1].argmax()))
        assert sample["completion"] == tokenizer.decode(new, skip_special_tokens=True)
        assert sample["completion"].strip()
    assert generate_samples(out, prompts, max_new_tokens=4, num_samples=0) == []


def test_sample_prompts_are_laid_out_as_in_training(base_dir):
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    instruction = tokenizer.decode(_prompt_ids(tokenizer, "Name a color.", "instruction", add_bos=True))
    assert instruction == "<s>" + format_instruction_prompt("Name a color.")
    chat = tokenizer.decode(_prompt_ids(tokenizer, "Hi", "chat", add_bos=True))
    assert chat == "<s><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    assert tokenizer.decode(_prompt_ids(tokenizer, "Hi", "text", add_bos=False)) == "Hi"
    with pytest.raises(PipelineError, match="prompt_format"):
        _prompt_ids(tokenizer, "Hi", "markdown", add_bos=True)


def test_a_folder_the_export_did_not_write_is_never_replaced(workdir, base_dir, trained, tmp_path):
    cfg = make_cfg(tmp_path)
    foreign = tmp_path / "node" / "exports" / "eval-export"
    foreign.mkdir(parents=True)
    (foreign / "results.csv").write_text("somebody else's results\n")
    with pytest.raises(PipelineError, match=r"exists but was not written by an export of this job"):
        convert(cfg, base_dir, trained[0])
    assert (foreign / "results.csv").read_text() == "somebody else's results\n"

    shutil.rmtree(foreign)  # gone: the export converts, and a second conversion replaces its own folder
    first = convert(cfg, base_dir, trained[0])
    (first / "stale.txt").write_text("left by an earlier conversion")
    (first.parent / f"{first.name}.source").write_text("another checkpoint")
    assert convert(cfg, base_dir, trained[0]) == first and not (first / "stale.txt").exists()


def test_eval_and_export_verify_a_local_checkpoint_where_it_is_and_refuse_a_damaged_one(
    workdir, base_dir, val_uri, tmp_path
):
    """A training checkpoint on this machine is read in place (no copy into the node cache), after its
    weights are checked against the manifest; damaged weights are refused by name and left as they were."""
    checkpoint = tmp_path / "checkpoint-local"
    write_trained_checkpoint(base_dir, checkpoint, seed=3)
    cfg = make_cfg(tmp_path)
    assert convert(cfg, base_dir, checkpoint).is_dir()
    cache = Path(cfg.run.cache_dir)
    assert not list(cache.rglob("model.safetensors"))  # verified where it is, not pulled

    damaged = tmp_path / "checkpoint-damaged"
    write_trained_checkpoint(base_dir, damaged, seed=4)
    weights = damaged / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"checkpoint-damaged/model\.safetensors"):
        evaluate(cfg, base_dir, damaged, val_uri, device="cpu")
    with pytest.raises(IntegrityError, match=r"checkpoint-damaged/model\.safetensors"):
        convert(cfg, base_dir, damaged, tmp_path / "never-written")
    assert weights.read_bytes() == bytes(data) and not (tmp_path / "never-written").exists()


def test_the_registered_version_loads_as_an_mlflow_transformers_and_pyfunc_model(
    base_dir, trained, mlflow_server, tmp_path, monkeypatch
):
    """What a user of the registry does: MLFLOW_TRACKING_URI set, `models:/` uris, no other setup."""
    name, _, _, result = export_registered(base_dir, trained[0], mlflow_server, tmp_path, "mlflow-model-job")
    client = MlflowClient(tracking_uri=mlflow_server.uri, registry_uri=mlflow_server.uri)
    client.set_registered_model_alias(name, "champion", result.version)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    import mlflow.pyfunc
    import mlflow.transformers

    prompt, new_tokens = "The old lighthouse keeper", 8
    reference = AutoModelForCausalLM.from_pretrained(result.local_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(result.local_dir)
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        greedy = reference.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    expected = tokenizer.decode(greedy[0, ids.shape[1]:], skip_special_tokens=True)

    pipe = mlflow.transformers.load_model(f"models:/{name}/{result.version}", dst_path=str(tmp_path))
    assert pipe.task == "text-generation" and type(pipe.model).__name__ == "LlamaForCausalLM"
    for loaded, param in zip(pipe.model.state_dict().values(), reference.state_dict().values()):
        torch.testing.assert_close(loaded, param, rtol=0, atol=0)
    out = pipe(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
               return_full_text=False)
    assert out[0]["generated_text"] == expected

    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    answer = model.predict([prompt], params={"max_new_tokens": new_tokens, "min_new_tokens": new_tokens,
                                             "do_sample": False, "return_full_text": False})
    assert answer == [expected]


def test_mlflow_models_serve_answers_with_the_registered_version(
    base_dir, trained, mlflow_server, tmp_path
):
    """`mlflow models serve` (in this environment: --env-manager local) serves the registered version."""
    import os
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    name, _, _, result = export_registered(base_dir, trained[0], mlflow_server, tmp_path, "serve-job")
    version = result.version
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server.uri, "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{name}/{version}",
                               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    body = json.dumps({"inputs": ["The old lighthouse keeper"], "params": {"max_new_tokens": 6}}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        deadline, answer = time.monotonic() + 180, None
        while answer is None and time.monotonic() < deadline and server.poll() is None:
            try:
                answer = json.loads(opener.open(request, timeout=30).read())
            except OSError:
                time.sleep(1)
    finally:
        server.terminate()
        server.wait(30)
    assert answer is not None, "mlflow models serve did not answer"
    (text,) = answer["predictions"]
    assert isinstance(text, str) and text.strip()
