"""The loss's cross-entropy kernel: both implementations against autograd's cross-entropy.

The Triton kernel runs here through Triton's interpreter (`TRITON_INTERPRET=1`, set before Triton is
imported, so in a fresh process); on a GPU the `gpu` tests run it compiled, at Llama 3's vocabulary.
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

from te_model import ce_kernel
from te_model.loss import _accumulate_fp32

REPO = Path(__file__).resolve().parents[1]


def reference(logits: torch.Tensor, targets: torch.Tensor, divisor: float):
    """(summed loss, gradient of sum / divisor) from autograd over float64 logits."""
    x = logits.detach().double().requires_grad_()
    loss = torch.nn.functional.cross_entropy(x, targets, reduction="sum")
    (loss / divisor).backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [7, 4096, 5000])  # below, at and across one Triton block
def test_torch_path_matches_autograd(dtype, vocab):
    gen = torch.Generator().manual_seed(vocab)
    logits = (torch.randn(6, vocab, generator=gen) * 4).to(dtype)
    targets = torch.randint(0, vocab, (6,), generator=gen)
    want_loss, want_grad = reference(logits, targets, divisor=5.0)
    got = logits.clone()
    loss = ce_kernel.logits_ce_(got, targets, 5.0, want_grad=True, use_triton=False)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=1e-4)
    tol = {torch.float32: 1e-6, torch.bfloat16: 4e-3}[dtype]  # the gradient is stored in the logits' dtype
    torch.testing.assert_close(got.double(), want_grad, rtol=0, atol=tol)
    untouched = logits.clone()
    ce_kernel.logits_ce_(untouched, targets, 5.0, want_grad=False, use_triton=False)
    assert torch.equal(untouched, logits)  # without a gradient the logits are left alone


INTERPRETED = textwrap.dedent("""
    import json, sys, torch
    from te_model import ce_kernel
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        for vocab in (7, 4096, 5000):
            gen = torch.Generator().manual_seed(vocab)
            logits = (torch.randn(5, vocab, generator=gen) * 4).to(dtype)
            targets = torch.randint(0, vocab, (5,), generator=gen)
            assert ce_kernel.triton_usable(logits)
            a, b = logits.clone(), logits.clone()
            la = ce_kernel.logits_ce_(a, targets, 3.0, want_grad=True, use_triton=True)
            lb = ce_kernel.logits_ce_(b, targets, 3.0, want_grad=True, use_triton=False)
            c = logits.clone()
            lc = ce_kernel.logits_ce_(c, targets, 3.0, want_grad=False, use_triton=True)
            out[f"{dtype}-{vocab}"] = {"loss": [float(la), float(lb), float(lc)],
                                       "grad_max_diff": float((a.double() - b.double()).abs().max()),
                                       "untouched": bool(torch.equal(c, logits))}
    print(json.dumps(out))
""")


def test_triton_kernel_matches_torch_path_interpreted():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", INTERPRETED], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(results) == 6
    for case, r in results.items():
        triton_loss, torch_loss, no_grad_loss = r["loss"]
        assert triton_loss == pytest.approx(torch_loss, rel=1e-5), case
        assert no_grad_loss == pytest.approx(torch_loss, rel=1e-5), case
        tol = 1e-6 if "float32" in case else 4e-3  # one bf16 rounding of the same fp32 value, at most
        assert r["grad_max_diff"] <= tol, (case, r)
        assert r["untouched"], case


def test_fp32_accumulation_on_cpu_adds_the_product():
    gen = torch.Generator().manual_seed(0)
    acc = torch.randn(8, 6, generator=gen)
    a, b = torch.randn(8, 5, generator=gen).bfloat16(), torch.randn(5, 6, generator=gen).bfloat16()
    want = acc + (a @ b).float()
    _accumulate_fp32(acc, a, b)
    torch.testing.assert_close(acc, want)


# --------------------------------------------------------------------------------------------------
# GPU: compiled kernel at Llama 3's vocabulary, and the fp32-output GEMM


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@gpu
def test_triton_kernel_on_gpu_at_llama3_vocab():
    pytest.importorskip("triton")
    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = (torch.randn(1024, 128256, generator=gen, device="cuda") * 3).bfloat16()
    targets = torch.randint(0, 128256, (1024,), generator=gen, device="cuda")
    assert ce_kernel.triton_usable(logits)
    a, b = logits.clone(), logits.clone()
    la = ce_kernel.logits_ce_(a, targets, 1024.0, want_grad=True)
    lb = ce_kernel.logits_ce_(b, targets, 1024.0, want_grad=True, use_triton=False)
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-3)
    assert float((a.float() - b.float()).abs().max()) <= 1e-6  # grads here are ~1e-8..1e-3: bf16 ulps
    want_loss, want_grad = reference(logits[:64], targets[:64], 1024.0)
    torch.testing.assert_close(a[:64].double(), want_grad, rtol=0, atol=2e-6)


@pytest.mark.gpu
@gpu
def test_fp32_accumulating_gemm_on_gpu():
    gen = torch.Generator(device="cuda").manual_seed(0)
    acc = torch.randn(4096, 512, generator=gen, device="cuda")
    a = torch.randn(4096, 1000, generator=gen, device="cuda").bfloat16()
    b = torch.randn(1000, 512, generator=gen, device="cuda").bfloat16()
    want = acc + a.double().matmul(b.double()).float()
    _accumulate_fp32(acc, a, b)
    torch.testing.assert_close(acc, want, rtol=1e-4, atol=1e-3)
