"""Sharded training (FSDP2) against data-parallel training on a real local Ray cluster, 2 CPU workers.

Both start from the same base checkpoint and read the same rows, so in fp32 their per-step losses agree
to reduction-order noise. An FSDP run stopped after its step-4 checkpoint resumes with ONE worker on the
same global batch (grad_accum doubled), reaches the last step and matches the uninterrupted run; its
final checkpoint holds whole tensors that convert to a standard HF checkpoint. Last, in one process,
what `train.fsdp_reshard_after_forward` changes, and the FP8 head under FSDP2.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM

import te_model
from pipeline.train import checkpoint as ckpt
from pipeline.train import parallel
from pipeline import demo, storage
from pipeline.config import Config
from pipeline.stages.data import prepare
from pipeline.errors import PipelineError
from pipeline.train.faults import FAIL_AT_STEP_ENV
from pipeline.train.launch import train

STEPS, FAIL_AT = 8, 4
SHIPPED_TEXT = str(Path(__file__).resolve().parents[2] / "data" / "tiny_text.jsonl")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel")
    base = demo.make_tiny_checkpoint(root / "base")

    def cfg_for(name: str, **train) -> Config:
        return Config.from_dict({
            "run": {"name": name, "output_uri": str(root / "runs"), "cache_dir": str(root / "node")},
            "model": {"base_uri": str(base), "backend": "torch", "dtype": "fp32"},
            "data": {"train_files": [SHIPPED_TEXT], "seq_len": 64, "max_documents": 80, "val_fraction": 0.1},
            "train": {"workers": 2, "use_gpu": False, "micro_batch_size": 1, "grad_accum_steps": 1, "lr": 3e-3,
                      "warmup_steps": 2, "max_steps": STEPS, "checkpoint_every": 2, "keep_checkpoints": 2,
                      "log_every": 1, **train},
        })

    return cfg_for, prepare(cfg_for("data"), str(base)), base


@pytest.fixture(scope="module")
def ddp_run(ray_cluster, setup):
    cfg_for, prepared, _ = setup
    return train(cfg_for("ddp"), prepared)


def losses(result) -> list[float]:
    return [m["loss"] for m in result.metrics]


def test_fsdp_trains_like_ddp_and_exports_whole_tensors(ddp_run, setup, tmp_path):
    cfg_for, prepared, base = setup
    fsdp = train(cfg_for("fsdp", parallelism="fsdp"), prepared)
    assert fsdp.steps == STEPS
    assert losses(fsdp) == pytest.approx(losses(ddp_run), rel=1e-4, abs=1e-5)
    assert losses(fsdp)[-1] < losses(fsdp)[0]

    local = storage.pull_checkpoint(fsdp.checkpoint_uri, tmp_path / "pulled")
    model = te_model.from_hf_checkpoint(base, backend="torch", dtype=torch.float32)
    ckpt.load_model_weights(model, local / ckpt.MODEL_FILE)  # strict: every tensor whole, by name
    ddp_weights = load_file(storage.pull_checkpoint(ddp_run.checkpoint_uri, tmp_path / "ddp") / ckpt.MODEL_FILE)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param, ddp_weights[name], rtol=1e-3, atol=1e-5, msg=name)
    moments = load_file(local / ckpt.OPTIMIZER_FILE)
    assert moments[f"{name}.exp_avg"].shape == param.shape  # moments gathered whole too

    te_model.save_hf_checkpoint(model, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    ids = torch.tensor([[1, 5, 9, 14, 3]])
    torch.testing.assert_close(hf(ids).logits, model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_fsdp_run_resumes_with_another_worker_count(ddp_run, setup, monkeypatch):
    cfg_for, prepared, _ = setup
    monkeypatch.setenv(FAIL_AT_STEP_ENV, str(FAIL_AT))
    with pytest.raises(PipelineError, match=f"{FAIL_AT_STEP_ENV}={FAIL_AT}"):
        train(cfg_for("regrid", parallelism="fsdp", max_failures=0), prepared)
    monkeypatch.delenv(FAIL_AT_STEP_ENV)

    # One worker, two micro-batches per step: the same global batch, so the same rows in each step, and
    # with one row per micro-batch also the same micro-batches (a step's loss is the mean of their means).
    resumed = train(cfg_for("regrid", parallelism="fsdp", workers=1, grad_accum_steps=2), prepared)
    assert resumed.resumed_from_step == FAIL_AT and resumed.steps == STEPS
    assert losses(resumed) == pytest.approx(losses(ddp_run), rel=1e-4, abs=1e-5)


def test_regrid_refuses_a_position_the_new_grid_cannot_start_at():
    state = {"world_size": 2, "config": {"train": {"micro_batch_size": 2}}}
    assert ckpt.regrid_position({"epoch": 1, "offset": 3}, state, 1, 2, "ck") == {"epoch": 1, "offset": 6}
    assert ckpt.regrid_position({"epoch": 0, "offset": 4}, state, 4, 1, "ck") == {"epoch": 0, "offset": 4}
    with pytest.raises(PipelineError, match="read 12 rows of epoch 1.*train.workers x train.micro_batch_size = 8"):
        ckpt.regrid_position({"epoch": 1, "offset": 3}, state, 4, 2, "ck")


def test_fsdp_keeps_gathered_weights_until_backward_only_when_asked(tmp_path):
    """In one process (a world of one, gloo): with reshard_after_forward false a layer's parameters stay
    whole between its forward and backward; true gives them back as shards. Same loss and gradients."""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    base = demo.make_tiny_checkpoint(tmp_path / "base")
    tokens = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        seen = {}
        for reshard in (True, False):
            model = te_model.from_hf_checkpoint(base, backend="torch", dtype=torch.float32)
            parallel.wrap(model, "fsdp", reshard_after_forward=reshard)
            loss = model(input_ids=tokens, labels=tokens).loss
            between = [isinstance(next(model.model.layers[0].parameters()), DTensor)]
            last = [isinstance(p, DTensor) for p in model.model.layers[-1].parameters()]
            loss.backward()
            grads = [parallel.full_tensor(p.grad) for p in model.parameters()]
            seen[reshard] = (between, last, loss.item(), grads)
        assert seen[True][0] == [True] and seen[False][0] == [False]
        assert not any(seen[True][1]) and not any(seen[False][1])  # the last layer keeps its weights
        assert seen[True][2] == seen[False][2]
        assert all(torch.equal(a, b) for a, b in zip(seen[True][3], seen[False][3]))
    finally:
        dist.destroy_process_group()


def test_the_fp8_head_trains_under_fsdp_as_without_it(tmp_path):
    """The FP8 head (on with FP8 by default) reads the head's weight inside the forward and hands back its
    gradient from its own autograd function: under FSDP2 (a world of one, gloo; the FP8 GEMMs run on the CPU
    too) the loss and every gradient equal the unwrapped model's."""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    base = demo.make_tiny_checkpoint(tmp_path / "base")
    tokens = torch.randint(0, 500, (2, 32), generator=torch.Generator().manual_seed(0))
    seen = {}
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        for sharded in (False, True):
            model = te_model.from_hf_checkpoint(base, backend="torch", dtype=torch.bfloat16)
            model.fp8_head = True
            if sharded:
                parallel.wrap(model, "fsdp")
            loss = model(input_ids=tokens, labels=tokens).loss
            loss.backward()
            seen[sharded] = (loss.item(), {n: parallel.full_tensor(p.grad) for n, p in model.named_parameters()})
    finally:
        dist.destroy_process_group()
    assert seen[True][0] == seen[False][0]
    assert seen[True][1].keys() == seen[False][1].keys()
    for name, grad in seen[False][1].items():
        torch.testing.assert_close(seen[True][1][name], grad, rtol=0, atol=0, msg=name)
    assert seen[True][1]["lm_head.weight"].abs().sum() > 0


def test_fp8_moments_under_fsdp_as_without_it(tmp_path):
    """`train.moments_fp8` under FSDP2 (a world of one, gloo): the codes' scales are sharded by the rows their
    matrix is sharded by; steps give the unwrapped model's weights and moments bit for bit, and the sharded
    moments go through the checkpoint's files and back unchanged."""
    from pipeline.train.optim import FP8_STATE, make_optimizer

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    base = demo.make_tiny_checkpoint(tmp_path / "base", layers=1, hidden=256, intermediate=512)
    tokens = torch.randint(0, 500, (2, 32), generator=torch.Generator().manual_seed(0))
    cfg = Config.from_dict({"train": {"moments_fp8": True, "lr": 1e-3, "max_steps": 3}})
    fp8_keys = {key for pair in FP8_STATE.values() for key in pair}
    seen = {}
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        for sharded in (False, True):
            model = te_model.from_hf_checkpoint(base, backend="torch", dtype=torch.bfloat16)
            if sharded:
                parallel.wrap(model, "fsdp")
            optimizer = make_optimizer(model, cfg.train)
            for _ in range(3):
                model(input_ids=tokens, labels=tokens).loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            state = {(name, key): parallel.full_tensor(value).float()
                     for name, p in model.named_parameters() for key, value in optimizer.state[p].items()}
            seen[sharded] = ({n: parallel.full_tensor(p).float() for n, p in model.named_parameters()}, state)
            if sharded:
                qkv = model.model.layers[0].self_attention.layernorm_qkv.query_weight
                assert isinstance(optimizer.state[qkv]["exp_avg_scale"], DTensor)
                assert optimizer.state[qkv]["exp_avg_scale"].placements == qkv.placements
                entries, groups = ckpt.optimizer_entries(model, optimizer)
                ckpt.save_streamed(entries, tmp_path / "optimizer.safetensors")
                fresh = make_optimizer(model, cfg.train)
                ckpt.load_optimizer_state(model, fresh, tmp_path / "optimizer.safetensors", groups)
                for name, p in model.named_parameters():
                    for key, value in optimizer.state[p].items():
                        again = fresh.state[p][key]
                        assert again.dtype == value.dtype and torch.equal(parallel.full_tensor(again).float(),
                                                                          parallel.full_tensor(value).float())
    finally:
        dist.destroy_process_group()
    weights, state = seen[False]
    assert {key for _, key in state} >= fp8_keys  # the matrices kept FP8 moments
    for name, w in weights.items():
        assert torch.equal(seen[True][0][name], w), name
    assert state.keys() == seen[True][1].keys()
    for key, value in state.items():
        assert torch.equal(seen[True][1][key], value), key


def _fp8_moments_on_two_ranks(rank: int, port: int, out: str, master_weights: str) -> None:
    """One of two gloo ranks: a 7-row matrix sharded 4 + 3 by FSDP2, three steps with FP8 moments, the state
    written through the checkpoint's files and read back into a fresh optimizer; rank 0 saves what it saw."""
    from torch.distributed.fsdp import fully_shard

    from pipeline.train import optim

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        module = torch.nn.Sequential(torch.nn.Linear(512, 7, bias=False)).to(torch.bfloat16)
        fully_shard(module)
        weight = module[0].weight
        opt = optim.AdamW(module.parameters(), lr=1e-3, moments_fp8=True, master_weights=master_weights)
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            x = torch.randn(5, 512, generator=gen).bfloat16()  # the same rows on both ranks
            module(x).float().square().sum().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        state = opt.state[weight]
        local_rows = (weight.to_local().shape[0], state["exp_avg_scale"].to_local().shape[0])
        entries, groups = ckpt.optimizer_entries(module, opt)
        path = Path(out).parent / "optimizer.safetensors"
        if rank == 0:
            ckpt.save_streamed(entries, path)
        else:
            for _, tensor in entries:  # the gathers are collectives: rank 1 takes part in them too
                parallel.full_tensor(tensor)
        dist.barrier()
        fresh = optim.AdamW(module.parameters(), lr=1e-3, moments_fp8=True, master_weights=master_weights)
        ckpt.load_optimizer_state(module, fresh, path, groups)
        same = all(torch.equal(fresh.state[weight][k].to_local().float(), v.to_local().float())
                   for k, v in state.items() if isinstance(v, DTensor))
        whole = {k: parallel.full_tensor(v).float() for k, v in state.items()}
        whole["weight"] = parallel.full_tensor(weight).float()
        if rank == 0:
            torch.save({"local_rows": local_rows, "same": same, "whole": whole}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("master_weights", ["bf16_kahan", "bf16_kahan8"])
def test_fp8_moments_shard_unevenly_over_two_ranks(master_weights, tmp_path):
    """Two processes, 7 rows over 2 ranks: each rank's scales cover its own rows; the checkpoint gathers and
    re-shards codes and scales (and `bf16_kahan8`'s compensation codes) bit for bit; and the sharded run's
    moments are the unsharded run's on rank 0's rows and within the rounding on rank 1's (each shard draws its
    own random bits)."""
    import torch.multiprocessing as mp

    from pipeline.train import optim

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    out = str(tmp_path / "seen.pt")
    mp.start_processes(_fp8_moments_on_two_ranks, args=(port, out, master_weights), nprocs=2, start_method="spawn")
    seen = torch.load(out, weights_only=True)
    assert seen["local_rows"] == (4, 4) and seen["same"]

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(512, 7, bias=False)).to(torch.bfloat16)
    opt = optim.AdamW(module.parameters(), lr=1e-3, moments_fp8=True, master_weights=master_weights)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        module(torch.randn(5, 512, generator=gen).bfloat16()).float().square().sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    m, v, scales = optim._moments(opt.state[module[0].weight])
    whole = seen["whole"]
    assert whole["exp_avg_scale"].shape == (7, 2)
    for codes, scale, (key_codes, key_scale) in ((m, scales[0], optim.FP8_STATE["exp_avg"]),
                                                 (v, scales[1], optim.FP8_STATE["exp_avg_sq"])):
        assert torch.equal(whole[key_scale], scale)  # the same blocks, so the same scales
        assert torch.equal(whole[key_codes][:4], codes[:4].float())  # rank 0 draws the unsharded run's bits
        # rank 1's rows: two independent stochastic roundings a step, each up or down to a neighbouring code
        # (1/16 to 1/8 of the value apart), so the two runs differ by some percent on average
        decoded = optim.dequantize_moment(whole[key_codes].to(torch.float8_e4m3fn), whole[key_scale])[4:]
        unsharded = optim.dequantize_moment(codes, scale)[4:]
        assert 0 < float((decoded - unsharded).abs().mean() / unsharded.abs().mean()) < 0.1
    torch.testing.assert_close(whole["weight"], module[0].weight.float(), rtol=0, atol=2**-12)
    if master_weights == "bf16_kahan8":  # rank 0's rows: the unsharded run's compensation codes
        codes = opt.state[module[0].weight]["compensation_codes"]
        assert whole["compensation_codes"].shape == (7, 512) and whole["compensation_codes"][:4].any()
        assert torch.equal(whole["compensation_codes"][:4], codes[:4].float())
