"""Training on a real local Ray cluster: 2 CPU workers (DDP over gloo), checkpoints in a moto S3 bucket.

One uninterrupted 20-step run is the reference: its loss must fall, only the newest checkpoints may stay
in the bucket, and its per-step metrics must reach a real MLflow server from rank 0 alone. A second run
fails on purpose after its step-10 checkpoint and is started again under the same name: it must resume
there and reproduce the reference's losses and final weights exactly (fp32 on CPU is deterministic).
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file
from transformers import LlamaConfig

import te_model
from pipeline.train import checkpoint as ckpt
from pipeline.train import commit
from pipeline import demo, storage, tracking
from pipeline.config import Config
from pipeline.stages.data import prepare
from pipeline.errors import PipelineError
from pipeline.storage import manifest
from pipeline.storage.manifest import FileEntry, read_manifest, sha256_file
from pipeline.train.faults import FAIL_AT_STEP_ENV
from pipeline.train.launch import train
from pipeline.train.optim import lr_multiplier

STEPS, CHECKPOINT_EVERY, KEEP, FAIL_AT = 20, 5, 2, 10
SHIPPED_TEXT = str(Path(__file__).resolve().parents[2] / "data" / "tiny_text.jsonl")


@pytest.fixture(scope="module")
def bucket(s3_server) -> str:
    return s3_server.create_bucket(f"train-{uuid.uuid4().hex[:12]}")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return demo.make_tiny_checkpoint(tmp_path_factory.mktemp("base") / "tiny-llama")


def make_cfg(bucket: str, endpoint_url: str, cache_dir: Path, name: str, **train) -> Config:
    raw = {
        "run": {"name": name, "seed": 0, "output_uri": f"s3://{bucket}/runs", "cache_dir": str(cache_dir)},
        "storage": {"endpoint_url": endpoint_url},
        "model": {"base_uri": f"s3://{bucket}/base/tiny-llama", "backend": "torch", "dtype": "fp32"},
        "data": {"train_files": [SHIPPED_TEXT], "seq_len": 64, "max_documents": 80, "val_fraction": 0.1},
        "train": {"workers": 2, "use_gpu": False, "micro_batch_size": 2, "grad_accum_steps": 2, "lr": 3e-3,
                  "warmup_steps": 3, "max_steps": STEPS, "checkpoint_every": CHECKPOINT_EVERY,
                  "keep_checkpoints": KEEP, "log_every": 1, **train},
    }
    return Config.from_dict(raw)


@pytest.fixture(scope="module")
def setup(bucket, base_dir, s3_server, tmp_path_factory):
    """(config factory, prepared data): the base checkpoint is published to S3, the data prepared there."""
    options = storage.StorageOptions(endpoint_url=s3_server.endpoint_url)
    cache_dir = tmp_path_factory.mktemp("node-cache")
    storage.publish(base_dir, f"s3://{bucket}/base/tiny-llama", options)

    def cfg_for(name: str, **train) -> Config:
        return make_cfg(bucket, s3_server.endpoint_url, cache_dir, name, **train)

    prepared = prepare(cfg_for("data"), str(base_dir))
    assert prepared.stats["train"]["rows"] >= 40  # several micro-batches per rank and epoch
    return cfg_for, prepared, options


@pytest.fixture(scope="module")
def reference(ray_cluster, setup, mlflow_server):
    """The uninterrupted run, tracked in MLflow: (result, config, MLflow run id)."""
    cfg_for, prepared, _ = setup
    cfg = cfg_for("reference")
    parent = tracking.find_or_start_parent("train-tests", "reference", tracking_uri=mlflow_server.uri)
    with tracking.stage_run(parent, "train", tracking_uri=mlflow_server.uri) as run_id:
        result = train(cfg, prepared, run_id=run_id, tracking_uri=mlflow_server.uri,
                       code_version={"commit": "abc123", "dirty": False, "source": "test"})
    return result, cfg, run_id


def checkpoint_dirs(run_uri: str, options: storage.StorageOptions) -> list[str]:
    folders = {name.split("/")[0] for name in storage.list_files(run_uri, options) if "/" in name}
    return sorted(folder for folder in folders if folder.startswith("checkpoint_"))


def test_loss_falls_and_only_the_newest_checkpoints_stay(reference, setup):
    result, cfg, _ = reference
    _, _, options = setup
    assert result.steps == STEPS and result.resumed_from_step == 0
    assert [m["step"] for m in result.metrics] == list(range(1, STEPS + 1))
    losses = [m["loss"] for m in result.metrics]
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
    assert result.final_loss == losses[-1]
    for m in result.metrics:
        assert m["lr"] == pytest.approx(cfg.train.lr * lr_multiplier(m["step"] - 1, cfg.train))
        assert m["grad_norm"] > 0 and m["tokens_per_s"] > 0
        assert m["mfu"] == 0.0 and m["gpu_mem_gb"] == 0.0  # CPU: no known peak, no GPU memory
    kept = checkpoint_dirs(result.ray_result_path, options)
    assert [name[len("checkpoint_"):][:6] for name in kept] == ["000015", "000020"]
    assert result.checkpoint_uri == storage.join(result.ray_result_path, kept[-1])
    for name in kept:
        assert storage.exists(storage.join(result.ray_result_path, name, "manifest.json"), options)


def test_checkpoint_holds_full_state_as_safetensors_and_json(reference, setup, base_dir, tmp_path):
    result, cfg, _ = reference
    _, _, options = setup
    local = storage.pull_checkpoint(result.checkpoint_uri, tmp_path, options)  # verifies every sha256
    files = set(read_manifest(local))
    assert files == {p.relative_to(local).as_posix() for p in local.rglob("*")
                     if p.is_file() and not p.name.startswith(".") and p.name != "manifest.json"}
    assert all(name.endswith((".safetensors", ".json")) for name in files)
    for rank in (0, 1):
        assert {f"rank-{rank}/rng.safetensors", f"rank-{rank}/state.json"} <= files
    model = te_model.from_hf_checkpoint(base_dir, backend="torch", dtype=torch.float32)
    params = load_file(local / ckpt.MODEL_FILE)
    assert set(params) == {name for name, _ in model.named_parameters()}
    assert "model.layers.0.self_attention.layernorm_qkv.query_weight" in params
    assert not any("_extra_state" in name for name in params)
    moments = load_file(local / ckpt.OPTIMIZER_FILE)
    assert set(moments) == {f"{name}.{field}" for name in params for field in ("exp_avg", "exp_avg_sq", "step")}
    state = ckpt.read_trainer_state(local)
    assert state["step"] == STEPS and state["world_size"] == 2
    assert state["config"] == cfg.to_dict() and state["code_version"]["commit"] == "abc123"


def test_metrics_reach_mlflow_from_rank_zero_only(reference, mlflow_server):
    result, _, run_id = reference
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "gpu_mem_gb"):
        history = client.get_metric_history(run_id, key)
        assert sorted(m.step for m in history) == list(range(1, STEPS + 1)), key  # one value per step
    logged = {m.step: m.value for m in client.get_metric_history(run_id, "loss")}
    assert logged == pytest.approx({m["step"]: m["loss"] for m in result.metrics})


def test_a_restarted_run_resumes_from_its_latest_checkpoint_exactly(reference, setup, monkeypatch, tmp_path):
    expected, _, _ = reference
    cfg_for, prepared, options = setup
    cfg = cfg_for("resumed", max_failures=0)  # no restart by Ray: the run fails, a second run resumes
    monkeypatch.setenv(FAIL_AT_STEP_ENV, str(FAIL_AT))
    with pytest.raises(PipelineError, match=f"{FAIL_AT_STEP_ENV}={FAIL_AT}"):
        train(cfg, prepared)
    run_uri = storage.join(cfg.run.output_uri, "ray", cfg.run.name)
    assert [name[len("checkpoint_"):][:6] for name in checkpoint_dirs(run_uri, options)] == ["000005", "000010"]

    monkeypatch.delenv(FAIL_AT_STEP_ENV)
    resumed = train(cfg, prepared)
    assert resumed.resumed_from_step == FAIL_AT and resumed.steps == STEPS
    assert [m["loss"] for m in resumed.metrics] == [m["loss"] for m in expected.metrics]  # exactly
    assert [m["grad_norm"] for m in resumed.metrics] == [m["grad_norm"] for m in expected.metrics]
    final = load_file(storage.pull_checkpoint(resumed.checkpoint_uri, tmp_path, options) / ckpt.MODEL_FILE)
    reference_final = load_file(storage.pull_checkpoint(expected.checkpoint_uri, tmp_path, options) / ckpt.MODEL_FILE)
    assert all(final[name].equal(reference_final[name]) for name in reference_final)


def test_checkpoint_round_trip_and_clear_errors(base_dir, tmp_path):
    """In one process (world size 1): state written, loaded into fresh objects, and mismatches refused."""
    from pipeline.train.optim import make_optimizer, make_scheduler

    cfg = Config.from_dict({"train": {"warmup_steps": 1, "max_steps": 4}})

    def build():
        model = te_model.from_hf_checkpoint(base_dir, backend="torch", dtype=torch.float32)
        optimizer = make_optimizer(model, cfg.train)
        return model, optimizer, make_scheduler(optimizer, cfg.train)

    model, optimizer, scheduler = build()
    ids = torch.randint(0, 400, (2, 32))
    model(input_ids=ids, labels=ids, position_ids=torch.arange(32).expand(2, 32)).loss.backward()
    optimizer.step()
    scheduler.step()
    ranks = ckpt.gather_rank_files(ckpt.rank_files({"epoch": 1, "offset": 3}))
    ckpt.write_checkpoint(tmp_path / "ck", module=model, optimizer=optimizer, scheduler=scheduler,
                          trainer_state={"step": 1, "tokens_seen": 64, "metrics": []}, ranks=ranks)
    expected_random = torch.rand(3)

    fresh, fresh_optimizer, fresh_scheduler = build()
    state, position = ckpt.load_checkpoint(tmp_path / "ck", module=fresh, optimizer=fresh_optimizer,
                                           scheduler=fresh_scheduler, rank=0, world_size=1)
    assert state["step"] == 1 and position == {"epoch": 1, "offset": 3}
    assert torch.rand(3).equal(expected_random)  # the RNG continues where the checkpoint left it
    assert all(p.equal(q) for p, q in zip(model.parameters(), fresh.parameters()))
    assert fresh_scheduler.get_last_lr() == scheduler.get_last_lr()
    saved, loaded = optimizer.state_dict()["state"], fresh_optimizer.state_dict()["state"]
    assert saved.keys() == loaded.keys()
    assert all(saved[i][field].equal(loaded[i][field]) for i in saved for field in ("exp_avg", "exp_avg_sq", "step"))

    with pytest.raises(PipelineError, match="written by 1 workers.*train.workers=1"):
        ckpt.load_checkpoint(tmp_path / "ck", module=fresh, optimizer=fresh_optimizer, scheduler=fresh_scheduler,
                             rank=0, world_size=2)
    one_layer = LlamaConfig.from_pretrained(base_dir, num_hidden_layers=1)
    smaller = te_model.build_model(one_layer, backend="torch", dtype=torch.float32)
    smaller_optimizer = make_optimizer(smaller, cfg.train)
    with pytest.raises(PipelineError, match="model.layers.1.* is not a model parameter"):
        ckpt.load_checkpoint(tmp_path / "ck", module=smaller, optimizer=smaller_optimizer,
                             scheduler=make_scheduler(smaller_optimizer, cfg.train), rank=0, world_size=1)


def test_streamed_safetensors_read_back_by_safetensors_itself(tmp_path):
    """Checkpoints are written a tensor at a time with a header computed up front; safetensors' own reader
    must get every tensor back bit for bit, whatever its dtype and rank (0-d AdamW steps included)."""
    tensors = {"w": torch.randn(3, 5).bfloat16(), "w.exp_avg": torch.randn(3, 5), "w.step": torch.tensor(7.0),
               "ids": torch.arange(10), "x": torch.randn(4, 2, 3, dtype=torch.float64), "flags": torch.ones(3).bool(),
               "w.exp_avg_fp8": torch.randn(3, 5).to(torch.float8_e4m3fn)}
    entry = ckpt.save_streamed(list(tensors.items()), tmp_path / "t.safetensors")
    back = load_file(tmp_path / "t.safetensors")
    assert back.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    # hashed while written: what the manifest gets without reading the file back
    assert entry == FileEntry((tmp_path / "t.safetensors").stat().st_size, sha256_file(tmp_path / "t.safetensors"))


def test_a_snapshot_is_written_with_a_manifest_that_vouches_for_it_without_reading_the_big_files_back(
        tmp_path, monkeypatch):
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(3, 6)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    buffers = ckpt.HostBuffers()
    ckpt.reserve_buffers(model, optimizer, buffers)  # in the background, as the loop does after its first step
    snap = ckpt.snapshot(module=model, optimizer=optimizer, scheduler=scheduler,
                         ranks=[ckpt.rank_files({"epoch": 0, "offset": 3})], buffers=buffers)
    reserved = dict(buffers.tensors)
    assert [name for name, _ in snap.model] == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert all(reserved["model." + name] is host for name, host in snap.model)  # copied into, not reallocated
    ckpt.with_trainer_state(snap, {"step": 1}, 1)

    hashed = []
    real = manifest.sha256_file
    monkeypatch.setattr(manifest, "sha256_file", lambda path: hashed.append(Path(path).name) or real(path))
    out = tmp_path / "ck"
    entries = ckpt.write_snapshot(out, snap)
    assert ckpt.MODEL_FILE not in hashed and ckpt.OPTIMIZER_FILE not in hashed and ckpt.SCHEDULER_FILE in hashed
    assert entries == read_manifest(out)  # what it returns is the manifest it wrote
    hashed.clear()  # the upload publishes the same manifest from these entries: nothing is read back to hash
    commit.upload_and_commit(out, str(tmp_path / "uploaded"), storage.StorageOptions(), entries)
    assert hashed == [] and read_manifest(tmp_path / "uploaded") == entries
    monkeypatch.undo()
    manifest.verify_dir(out)  # every file, the two big ones included, has the size and sha256 it states
    back = load_file(out / ckpt.MODEL_FILE)
    assert all(torch.equal(back[name], p.detach()) for name, p in model.named_parameters())
