"""The loss's cross-entropy kernel: both implementations against autograd's cross-entropy.

The Triton kernel runs here through Triton's interpreter (`TRITON_INTERPRET=1`, set before Triton is
imported, so in a fresh process); on a GPU the `gpu` tests run it compiled, at Llama 3's vocabulary.
"""

from __future__ import annotations

import textwrap

import pytest
import torch

from tests.support.triton_interpreted import run_interpreted
from te_model import ce_kernel
from te_model import loss as loss_module
from te_model.loss import _gemm_fp32, causal_lm_loss



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
    from tests.unit.test_ce_kernel import reference
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
            if dtype == torch.bfloat16:  # the gradient x 2**15 in a buffer of its own, as the FP8 head asks
                want = reference(logits, targets, 2.0**-15)[1]
                worst = {}
                # Triton's interpreter rounds fp32 to E5M2 wrongly (1.9 -> 1.0: the carry into the exponent
                # is lost), so here the kernel's own buffer is fp16; the torch path is checked in E5M2.
                for use_triton, grad_dtype in ((True, torch.float16), (False, torch.float8_e5m2)):
                    d, kept = torch.empty(logits.shape, dtype=grad_dtype), logits.clone()
                    ce_kernel.logits_ce_(kept, targets, 2.0**-15, want_grad=True, grad_out=d, use_triton=use_triton)
                    assert torch.equal(kept, logits)
                    worst[str(grad_dtype)] = float(((d.double() - want).abs() / (want.abs() + 1e-3)).max())
                out[f"own-buffer-{vocab}"] = worst
    print(json.dumps(out))
""")


def test_triton_kernel_matches_torch_path_interpreted():
    results = run_interpreted(INTERPRETED)
    assert len(results) == 9
    for vocab in (7, 4096, 5000):
        worst = results.pop(f"own-buffer-{vocab}")  # largest relative error of one rounding to that format:
        assert worst["torch.float16"] <= 2**-11 and worst["torch.float8_e5m2"] <= 2**-3, (vocab, worst)
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
    _gemm_fp32(a, b, acc)
    torch.testing.assert_close(acc, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_chunk_and_many_give_the_same_gradients(dtype):
    """One chunk writes the head's weight gradient in the weight's dtype at once; several accumulate it in
    fp32. Both are the same gradient, and the backward's scaling leaves the saved one as it was."""
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 9, 16, generator=gen).to(dtype)
    weight = (torch.randn(40, 16, generator=gen) * 0.3).to(dtype)
    labels = torch.randint(0, 40, (2, 9), generator=gen)
    labels[0, 3] = -100
    results = {}
    for chunk in (1000, 4):  # 16 scored tokens: one chunk, then four
        loss_module.CHUNK_ELEMENTS, saved = chunk * 40, loss_module.CHUNK_ELEMENTS
        try:
            h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
            loss = causal_lm_loss(h, w, labels)
            (loss * 3.0).backward(retain_graph=True)
            first = w.grad.clone()
            w.grad = None
            (loss * 3.0).backward()  # a second backward: the same gradient, not one scaled twice
        finally:
            loss_module.CHUNK_ELEMENTS = saved
        assert w.grad.dtype == dtype and torch.equal(w.grad, first), chunk
        results[chunk] = (loss.detach(), h.grad, w.grad)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    for one, many in zip(results[1000], results[4]):
        torch.testing.assert_close(one.float(), many.float(), rtol=tol, atol=tol)


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
    # the FP8 head's call: the gradient x 2**15 straight into E5M2, logits untouched
    dq, kept = torch.empty(logits.shape, dtype=torch.float8_e5m2, device="cuda"), logits.clone()
    ce_kernel.logits_ce_(kept, targets, 2.0**-15, want_grad=True, grad_out=dq)
    assert torch.equal(kept, logits)
    want = reference(logits[:64], targets[:64], 2.0**-15)[1]
    assert float(((dq[:64].double() - want).abs() / (want.abs() + 1e-3)).max()) <= 2**-3  # one E5M2 rounding


@pytest.mark.gpu
@gpu
def test_fp32_accumulating_gemm_on_gpu():
    gen = torch.Generator(device="cuda").manual_seed(0)
    acc = torch.randn(4096, 512, generator=gen, device="cuda")
    a = torch.randn(4096, 1000, generator=gen, device="cuda").bfloat16()
    b = torch.randn(1000, 512, generator=gen, device="cuda").bfloat16()
    want = acc + a.double().matmul(b.double()).float()
    _gemm_fp32(a, b, acc)
    torch.testing.assert_close(acc, want, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(_gemm_fp32(a, b), a.double().matmul(b.double()).float(), rtol=1e-4, atol=1e-3)
    assert loss_module._FP32_OUT_GEMM["ok"], "the fp32-output GEMM failed and the fallback ran"



# --------------------------------------------------------------------------------------------------
# the opt-in FP8 head (torch._scaled_mm runs on CPU too)


def _loss_and_grads(fp8_head: bool, hidden, weight, labels, fast_accumulation: bool = False):
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    loss = causal_lm_loss(h, w, labels, fp8_head=fp8_head, fp8_head_fast_accumulation=fast_accumulation)
    loss.backward()
    return loss.item(), h.grad.float(), w.grad.float()


def test_fp8_head_tracks_the_bf16_head():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 37, 64, generator=gen).bfloat16()  # 67 scored rows: padded to 80 for the GEMMs
    weight = (torch.randn(320, 64, generator=gen) * 0.05).bfloat16()
    labels = torch.randint(0, 320, (2, 37), generator=gen)
    labels[0, :5] = -100
    ref_loss, ref_dh, ref_dw = _loss_and_grads(False, hidden, weight, labels)
    loss, dh, dw = _loss_and_grads(True, hidden, weight, labels)

    def cosine(a, b):
        return float((a * b).sum() / a.norm() / b.norm())

    assert loss == pytest.approx(ref_loss, rel=5e-3)
    assert cosine(dh, ref_dh) > 0.995 and cosine(dw, ref_dw) > 0.995
    assert float((dh - ref_dh).norm() / ref_dh.norm()) < 0.1  # E5M2 gradients: a few % per element
    # positions whose label is -100 are left out of the GEMMs: their gradient is exactly zero
    assert torch.count_nonzero(dh[0, :4]) == 0


def test_fp8_head_refuses_shapes_the_fp8_gemm_cannot_take():
    hidden, labels = torch.randn(1, 8, 60).bfloat16(), torch.randint(0, 320, (1, 8))
    with pytest.raises(ValueError, match=r"fp8 head: the hidden size \(60\) must be divisible by 16"):
        causal_lm_loss(hidden.requires_grad_(), torch.randn(320, 60).bfloat16(), labels, fp8_head=True)


@pytest.mark.gpu
@gpu
def test_fp8_head_on_gpu_at_llama3_vocab():
    """Against the bf16 head: the FP8 head's loss and gradients, with the promoted accumulation and with
    fast accumulation in its logits and weight-gradient GEMMs (no further from bf16 than the promoted)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(2, 2048, 4096, generator=gen, device="cuda").bfloat16()
    weight = (torch.randn(128256, 4096, generator=gen, device="cuda") * 0.02).bfloat16()
    labels = torch.randint(0, 128256, (2, 2048), generator=gen, device="cuda")
    ref_loss, ref_dh, ref_dw = _loss_and_grads(False, hidden, weight, labels)
    loss, dh, dw = _loss_and_grads(True, hidden, weight, labels)
    fast_loss, fast_dh, fast_dw = _loss_and_grads(True, hidden, weight, labels, fast_accumulation=True)
    cosine = lambda a, b: float((a * b).sum() / a.norm() / b.norm())  # noqa: E731
    error = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    print(f"\nFP8 head, fast accumulation: loss {fast_loss:.6f} (promoted {loss:.6f}, bf16 {ref_loss:.6f}); "
          f"dh error vs bf16 {error(fast_dh, ref_dh):.3e} (promoted {error(dh, ref_dh):.3e}); "
          f"dW {error(fast_dw, ref_dw):.3e} (promoted {error(dw, ref_dw):.3e})")
    assert loss == pytest.approx(ref_loss, rel=5e-3)
    assert cosine(dh, ref_dh) > 0.99 and cosine(dw, ref_dw) > 0.99, (cosine(dh, ref_dh), cosine(dw, ref_dw))
    assert fast_loss == pytest.approx(loss, rel=1e-3)
    assert error(fast_dh, ref_dh) <= 1.05 * error(dh, ref_dh)
    assert error(fast_dw, ref_dw) <= 1.05 * error(dw, ref_dw)


def test_fp8_head_fast_accumulation_reaches_the_logits_and_weight_gradient_gemms_only(monkeypatch):
    """The input gradient's GEMM reduces over the whole vocabulary and keeps the promoted accumulation."""
    calls, scaled_mm = [], torch._scaled_mm

    def spy(a, b, **kwargs):
        out = scaled_mm(a, b, **kwargs)
        calls.append((tuple(out.shape), kwargs["use_fast_accum"]))
        return out

    monkeypatch.setattr(torch, "_scaled_mm", spy)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, 80, 64, generator=gen).bfloat16().requires_grad_()
    weight = (torch.randn(320, 64, generator=gen) * 0.05).bfloat16().requires_grad_()
    labels = torch.randint(0, 320, (1, 80), generator=gen)
    for fast in (True, False):
        calls.clear()
        causal_lm_loss(hidden, weight, labels, fp8_head=True, fp8_head_fast_accumulation=fast).backward()
        # 79 scored rows padded to 80: logits (80, V), input gradient (80, H), weight gradient (V, H)
        assert calls == [((80, 320), fast), ((80, 64), False), ((320, 64), fast)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_backward_scales_as_the_plain_product(dtype):
    """The loss backward's scaling by the incoming gradient (a foreach kernel) is the product with the scale
    in the gradient's dtype, bit for bit, in a new tensor."""
    gen = torch.Generator().manual_seed(2)
    t = torch.randn(300, 37, generator=gen).to(dtype)
    for scale in (torch.tensor(3.3), torch.tensor(1.0), torch.tensor(1 / 7, dtype=torch.float64)):
        got = loss_module._times(t, scale)
        assert got.data_ptr() != t.data_ptr() and got.dtype == dtype and torch.equal(got, t * scale.to(dtype))
