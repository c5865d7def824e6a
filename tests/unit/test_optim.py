"""`pipeline.train.optim.AdamW`: its Triton update against torch's fused AdamW, step by step.

Each step starts both optimizers from the same state (weights, moments, step count) with the same
gradients, so a difference is that step's alone: within a rounding or two of the tensor's scale (the two
kernels round the same math differently: torch's mixes in fp64 scalars). A step with `found_inf` set
must change nothing, its count included. Every other step clips: torch's `clip_grad_norm_` scales the
reference's gradients, ours gets the same factor as `grad_factor` and applies it inside the update. The Triton kernel runs here through Triton's interpreter
(`TRITON_INTERPRET=1`, in a fresh process); on a GPU the `gpu` test runs it compiled against torch's CUDA
kernel.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pipeline.train import optim, overlap

REPO = Path(__file__).resolve().parents[2]
# largest |ours - torch| over the largest |torch| of a tensor, after one step from the same state
TOLERANCE = {"torch.float32": 4e-7, "torch.bfloat16": 2**-7}

COMPARE = textwrap.dedent('''
    import json, sys, torch
    from pipeline.train import optim

    def compare(dtype, device, steps=4, skip_at=2):
        gen = torch.Generator().manual_seed(0)
        shapes = [(70, 130), (5000,), (3,)]  # across several blocks, one block and a bit, a tiny one
        ours_p = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype).to(device)) for s in shapes]
        ref_p = [torch.nn.Parameter(p.detach().clone()) for p in ours_p]
        groups = lambda ps: [{"params": ps[:2], "weight_decay": 0.1}, {"params": ps[2:], "weight_decay": 0.0}]
        # the two larger through the Triton kernel, the tiny one through torch's fused kernel, as norms go
        ours = optim.AdamW(groups(ours_p), lr=1e-2, betas=(0.9, 0.95), triton_min_numel=1000)
        ref = torch.optim.AdamW(groups(ref_p), lr=1e-2, betas=(0.9, 0.95), fused=True)
        worst, applied, unchanged_when_skipped = {}, [], None
        for step in range(steps):
            for a, b in zip(ours_p, ref_p):
                g = torch.randn(a.shape, generator=gen).to(dtype).to(device)
                a.grad, b.grad = g.clone(), g.clone()
            before = [p.detach().clone() for p in ours_p]
            applied.append(ours.triton_applies())
            if step % 2:  # clipped, the reference's gradients scaled in place, ours in the update
                norm = torch.nn.utils.get_total_norm([p.grad for p in ours_p])
                ours.grad_factor = optim.clip_factor(norm, 0.5)
                assert float(ours.grad_factor) < 0.1  # the clipping bites
                torch.nn.utils.clip_grad_norm_(ref_p, 0.5)
            for o in (ours, ref):
                for group in o.param_groups:
                    group["lr"] = 1e-2 * (step + 1) / steps  # a schedule, as LambdaLR sets it
                if step == skip_at:
                    o.found_inf = torch.ones((), device=device)
                o.step()
                if step == skip_at:
                    del o.found_inf
            ours.__dict__.pop("grad_factor", None)
            if step == skip_at:
                unchanged_when_skipped = all(torch.equal(p.detach(), q) for p, q in zip(ours_p, before))
            for a, b in zip(ours_p, ref_p):
                sa, sb = ours.state[a], ref.state[b]
                assert float(sa["step"]) == float(sb["step"]) == step + (step < skip_at), (step, sa["step"])
                for name, x, y in (("param", a.detach(), b.detach()), ("exp_avg", sa["exp_avg"], sb["exp_avg"]),
                                   ("exp_avg_sq", sa["exp_avg_sq"], sb["exp_avg_sq"])):
                    error = float((x.double() - y.double()).abs().max() / y.double().abs().max())
                    worst[name] = max(worst.get(name, 0.0), error)
                    x.copy_(y)  # the same state again before the next step
        return {"worst": worst, "applied": applied, "unchanged_when_skipped": unchanged_when_skipped}

    device = sys.argv[1]
    print(json.dumps({str(d): compare(d, device) for d in (torch.float32, torch.bfloat16)}))
''')


def check(results: dict) -> None:
    for dtype, r in results.items():
        assert r["applied"] == [True] * 4, (dtype, r)  # the Triton kernel ran, not torch's fallback
        assert r["unchanged_when_skipped"], (dtype, r)
        for name, error in r["worst"].items():
            assert error <= TOLERANCE[dtype], (dtype, name, r["worst"])


def run_compare(device: str, env: dict) -> dict:
    done = subprocess.run([sys.executable, "-c", COMPARE, device], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_triton_update_matches_torch_fused_adamw_interpreted():
    pytest.importorskip("triton")
    results = run_compare("cpu", {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)})
    print(f"\nlargest error over the tensor's scale, one step: {results}")
    check(results)


def test_on_cpu_it_is_torch_fused_adamw():
    """Without a GPU (or the interpreter) the update is torch's own fused kernel: bit for bit the same."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the interpreter runs the Triton kernel on CPU tensors")
    gen = torch.Generator().manual_seed(1)
    ours_p = torch.nn.Parameter(torch.randn(40, 30, generator=gen))
    ref_p = torch.nn.Parameter(ours_p.detach().clone())
    ours = optim.AdamW([ours_p], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    ref = torch.optim.AdamW([ref_p], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    for step in range(3):
        g = torch.randn(40, 30, generator=gen)
        ours_p.grad, ref_p.grad = g.clone(), g.clone()
        assert not ours.triton_applies()
        if step == 1:  # clipped: the factor scales our gradient in place, as torch's clip_grad_norm_ does
            ours.grad_factor = optim.clip_factor(torch.nn.utils.get_total_norm([ours_p.grad]), 1.0)
            torch.nn.utils.clip_grad_norm_([ref_p], 1.0)
        ours.step()
        ours.__dict__.pop("grad_factor", None)
        ref.step()
    assert torch.equal(ours_p, ref_p)
    # the same state layout: each optimizer's state loads into the other
    again = torch.optim.AdamW([torch.nn.Parameter(ref_p.detach().clone())], lr=1e-2, fused=True)
    again.load_state_dict(ours.state_dict())
    for key in ("step", "exp_avg", "exp_avg_sq"):
        assert torch.equal(again.state_dict()["state"][0][key], ref.state_dict()["state"][0][key]), key


def test_each_update_is_announced_as_queued_small_parameters_first():
    """`launched` hears of every parameter with a gradient once, as its update is queued: every group's
    small (fused-kernel) parameters first, then the rest in parameter order, the order a forward pass uses
    them (`pipeline.train.overlap`). Hearing of them changes no value."""
    gen = torch.Generator().manual_seed(2)

    def params():
        made = {"a": torch.randn(6, 5, generator=gen).bfloat16(), "small": torch.randn(7, generator=gen),
                "b": torch.randn(4, 5, generator=gen).bfloat16(), "norm": torch.randn(5, generator=gen).bfloat16(),
                "other_small": torch.randn(3, generator=gen), "frozen": torch.randn(2, 2, generator=gen).bfloat16()}
        return {k: torch.nn.Parameter(v) for k, v in made.items()}

    heard, plain, told = [], params(), params()
    for p, q in zip(plain.values(), told.values()):
        q.data.copy_(p.data)
    names = {id(p): k for k, p in told.items()}

    def optimizer(ps):  # bf16 weights keep updates (`bf16_kahan`); fp32 ones go to torch's fused kernel
        return optim.AdamW([{"params": [ps["a"], ps["small"], ps["b"], ps["frozen"]], "weight_decay": 0.1},
                            {"params": [ps["norm"], ps["other_small"]], "weight_decay": 0.0}],
                           lr=1e-3, master_weights="bf16_kahan")

    ours, ref = optimizer(told), optimizer(plain)
    ours.launched = lambda p: heard.append(names[id(p)])
    for _ in range(2):
        heard.clear()
        for ps in (plain, told):
            for k, p in ps.items():
                p.grad = None if k == "frozen" else torch.ones_like(p)
        ours.step()
        ref.step()
        assert heard == ["small", "other_small", "a", "b", "norm"]
    assert all(torch.equal(plain[k], told[k]) for k in plain)


def test_no_clipping_is_no_factor():
    assert optim.clip_factor(torch.tensor(5.0), 0.0) is None
    assert float(optim.clip_factor(torch.tensor(0.5), 1.0)) == 1.0  # under the bound: unscaled
    assert float(optim.clip_factor(torch.tensor(4.0, dtype=torch.bfloat16), 1.0)) == pytest.approx(0.25)


def test_the_overlapped_update_needs_a_gpu():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="needs a CUDA device, not cpu"):
        overlap.UpdateOverlap(model, optim.AdamW(model.parameters()), torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_triton_update_matches_torch_fused_adamw_on_gpu():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    results = run_compare("cuda", {**env, "PYTHONPATH": str(REPO)})
    print(f"\nlargest error over the tensor's scale, one step, CUDA: {results}")
    check(results)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("master_weights", optim.MASTER_WEIGHTS)
def test_the_update_never_waits_for_the_gpu(master_weights):
    """A step, with `found_inf` and the clipping factor on the device as the training step sets them, makes
    no host sync: torch raises on any synchronizing call (`set_sync_debug_mode("error")`). Stochastic
    rounding reads its step on the device too."""
    pytest.importorskip("triton")
    params = [torch.nn.Parameter(torch.randn(shape, device="cuda", dtype=torch.bfloat16))
              for shape in ((2048, 1024), (1024,))]  # one large, one small (a norm weight)
    opt = optim.AdamW(params, lr=1e-3, master_weights=master_weights)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.found_inf = torch.zeros((), device="cuda")
    opt.grad_factor = optim.clip_factor(torch.nn.utils.get_total_norm([p.grad for p in params]), 1.0)
    opt.step()  # compiles the kernel, makes the state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        assert opt.triton_applies()
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert float(opt.state[params[0]]["step"]) == float(opt.state[params[1]]["step"]) == 2
