"""SwiGLU's backward cast in one pass (`te_model.swiglu_kernels`) against the same math in torch.

On the CPU the kernel runs under Triton's interpreter, which rounds fp32 to FP8 wrongly (see
test_fp8_kernels), so it writes fp16 here: that checks the indexing, the math, the transpose and the
amax. The `gpu` tests check the FP8 rounding and TE's `LayerNormMLP` with the kernel in its backward.
"""

from __future__ import annotations

import textwrap

import torch

from tests.support.triton_interpreted import run_interpreted
from te_model import swiglu_kernels

SHAPES = [(1, 1), (70, 130), (64, 64), (3, 200), (129, 65)]  # within, at and across 64 x 64 tiles

INTERPRETED = textwrap.dedent("""
    import json, torch
    from te_model import swiglu_kernels as k
    gen, out = torch.Generator().manual_seed(0), {}
    for rows, cols in SHAPES:
        g = torch.randn(rows, cols, generator=gen).bfloat16()
        x = (torch.randn(rows, 2 * cols, generator=gen) * 3).bfloat16()
        scale, amax = torch.tensor([7.5]), torch.tensor([0.25])
        assert k.usable(g, x)
        q, qt, scale_inv = k.dswiglu_fp8(g, x, scale, amax, torch.float16)
        q2, qt2, _ = k.dswiglu_fp8(g, x, scale.clone(), amax.clone(), torch.float16, transpose_in_kernel=True)
        ref = k.dswiglu_reference(g, x)
        want = (ref * 7.5).half()
        out[str((rows, cols))] = {
            "shapes": [list(q.shape), list(qt.shape)],
            "q_err": (q.float() - want.float()).abs().max().item() / want.float().abs().max().item(),
            "transpose": torch.equal(qt, q.t().contiguous()),
            "in_kernel": [list(qt2.shape), torch.equal(q2, q), torch.equal(qt2, q.t().contiguous())],
            "amax": [amax.item(), max(ref.abs().max().item(), 0.25)],
            "scale_inv": scale_inv.item(),
        }
    print(json.dumps(out))
""").replace("SHAPES", repr(SHAPES))


def test_kernel_matches_torch_interpreted():
    results = run_interpreted(INTERPRETED)
    for rows, cols in SHAPES:
        got = results[str((rows, cols))]
        assert got["shapes"] == [[rows, 2 * cols], [2 * cols, rows]], (rows, cols)
        assert got["q_err"] < 2e-3, (rows, cols, got["q_err"])  # fp16's rounding, exp's last bits
        assert got["transpose"], (rows, cols)
        assert got["in_kernel"] == [[2 * cols, rows], True, True], (rows, cols)  # written by the kernel itself
        amax, want = got["amax"]
        assert abs(amax - want) <= 1e-6 * want, (rows, cols, amax, want)  # raised, never lowered
        assert got["scale_inv"] == torch.tensor([7.5]).reciprocal().item()  # fp32, rounded once


def test_reference_is_the_gradient_of_swiglu():
    x = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    g = torch.randn(5, 6, dtype=torch.float64)
    a, b = x.chunk(2, dim=-1)
    (torch.nn.functional.silu(a) * b).backward(g)
    torch.testing.assert_close(swiglu_kernels.dswiglu_reference(g, x.detach()), x.grad.float())


def test_not_usable_on_cpu_tensors_or_other_shapes():
    g, x = torch.randn(4, 8), torch.randn(4, 16)
    assert not swiglu_kernels.usable(g, x)  # a CPU tensor, no interpreter
    assert not swiglu_kernels.usable(g, torch.randn(4, 15))
