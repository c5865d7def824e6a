"""The FP8 head's transpose and scaled cast against torch's own.

Here the Triton kernels run through Triton's interpreter in a fresh process. The interpreter rounds fp32
to FP8 wrongly (a carry into the exponent is lost), so on the CPU the scaled cast writes fp16, which
checks its indexing and math; the `gpu` test checks the FP8 rounding itself, compiled.
"""

from __future__ import annotations

import textwrap

import pytest
import torch

from tests.support.triton_interpreted import run_interpreted
from te_model import fp8_kernels

SHAPES = [(1, 1), (70, 130), (64, 64), (3, 200), (129, 65)]  # within, at and across 64 x 64 tiles

INTERPRETED = textwrap.dedent("""
    import json, torch
    from te_model import fp8_kernels as k
    gen, out = torch.Generator().manual_seed(0), {}
    for shape in SHAPES:
        t = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8).view(torch.float8_e4m3fn)
        assert k._usable(t)
        y = k.transpose_tiles(t)
        out[str(shape)] = [list(y.shape), torch.equal(y.view(torch.uint8), t.t().contiguous().view(torch.uint8))]
    x = (torch.randn(9000, generator=gen) * 3).bfloat16()
    scale = torch.tensor(0.37)
    out["cast"] = torch.equal(k.scaled_cast(x, scale, torch.float16), (x.float() / scale).half())
    print(json.dumps(out))
""").replace("SHAPES", repr(SHAPES))


def test_kernels_match_torch_interpreted():
    results = run_interpreted(INTERPRETED)
    assert results.pop("cast") is True
    for shape in SHAPES:
        got_shape, equal = results[str(shape)]
        assert got_shape == [shape[1], shape[0]] and equal, shape


def test_torch_fallback_on_cpu():
    t = torch.randint(0, 256, (5, 7), dtype=torch.uint8).view(torch.float8_e5m2)
    assert not fp8_kernels._usable(t)  # a CPU tensor, no interpreter: torch's own ops
    assert torch.equal(fp8_kernels.transpose(t).view(torch.uint8), t.t().contiguous().view(torch.uint8))
    x, scale = torch.randn(100).bfloat16() * 50, torch.tensor(0.25)
    got = fp8_kernels.scaled_cast(x, scale, torch.float8_e4m3fn)
    assert torch.equal(got.view(torch.uint8), (x.float() / scale).to(torch.float8_e4m3fn).view(torch.uint8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kernels_match_torch_on_gpu_at_llama3_head_shapes():
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = (torch.randn(128256, 4096, generator=gen, device="cuda") * 0.02).bfloat16()
    assert fp8_kernels._usable(w)
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        scale = (w.float().abs().max() / torch.finfo(dtype).max).clamp(min=1e-12)
        got = fp8_kernels.scaled_cast(w, scale, dtype)
        want = (w.float() / scale).to(dtype)  # one rounding from fp32, to nearest even
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), dtype
        for transpose in (fp8_kernels.transpose, fp8_kernels.transpose_tiles):
            got_t = transpose(got)
            assert got_t.dtype == dtype
            assert torch.equal(got_t.view(torch.uint8), want.t().contiguous().view(torch.uint8))
    odd = torch.randint(0, 256, (8191, 130), generator=gen, device="cuda", dtype=torch.uint8)
    assert torch.equal(fp8_kernels.transpose(odd), odd.t().contiguous())
    assert torch.equal(fp8_kernels.transpose_tiles(odd), odd.t().contiguous())
