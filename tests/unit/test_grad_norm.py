"""The clipping norm's kernel (`pipeline.train.grad_norm`) against the norm in float64.

The kernel runs through Triton's interpreter in a fresh process, on gradients that end inside, at and
across its programs' blocks, in two dtypes; the `gpu` test runs it compiled.
"""

from __future__ import annotations

import math
import textwrap

import pytest
import torch

from pipeline.train import grad_norm
from tests.support.triton_interpreted import run_interpreted

INTERPRETED = textwrap.dedent("""
    import json, math, torch
    from pipeline.train import grad_norm as g
    gen = torch.Generator().manual_seed(0)
    span = g.BLOCK * g.ITERS  # a program's elements
    sizes = [1, 5, g.BLOCK + 3, span, span + 1, 2 * span + g.BLOCK + 77, 300]
    def grads():
        out = [(torch.randn(n, generator=gen) * (i + 1)).bfloat16() for i, n in enumerate(sizes)]
        return out + [torch.randn(7, 9, generator=gen), torch.randn(0).bfloat16()]  # fp32, and an empty one
    def exact(gs):
        return math.sqrt(sum(float(t.double().pow(2).sum()) for t in gs))
    first, second = grads(), grads()  # the same sizes at other addresses: the cached tables, new addresses
    result = {"usable": g.usable([t for t in first if t.numel()])}
    result["norms"] = [[float(g.total_norm(gs)), exact(gs)] for gs in (first, second)]
    result["dtype"] = str(g.total_norm(first).dtype)
    first[4][span - 2] = float("inf")  # in a program's last block
    result["inf"] = float(g.total_norm(first))
    first[0][0] = float("nan")
    result["nan"] = float(g.total_norm(first))
    print(json.dumps(result))
""")


def test_kernel_norm_is_the_exact_norm_interpreted():
    result = run_interpreted(INTERPRETED)
    assert result["usable"] is True and result["dtype"] == "torch.float32"
    for got, want in result["norms"]:
        assert got == pytest.approx(want, rel=1e-6)
    assert result["inf"] == math.inf and math.isnan(result["nan"])


def test_without_the_kernel_the_norm_is_torchs_in_fp32():
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(40, generator=gen).bfloat16(), torch.randn(3, 5, generator=gen)]
    assert not grad_norm.usable(grads)  # CPU tensors, no interpreter: torch's norm
    norm = grad_norm.total_norm(grads)
    assert norm.dtype == torch.float32
    assert norm == torch.nn.utils.get_total_norm(grads).float()
    assert grad_norm.total_norm([]) == 0 and grad_norm.total_norm([torch.zeros(0)]) == 0


def test_program_table_covers_every_element_once():
    span = grad_norm.BLOCK * grad_norm.ITERS
    numels = (1, span, span + 1, 3 * span)
    sizes, tensor_of, start_of = grad_norm._programs(numels, torch.device("cpu"))
    assert sizes.tolist() == list(numels)
    assert tensor_of.tolist() == [0, 1, 2, 2, 3, 3, 3]
    assert start_of.tolist() == [0, 0, 0, span, 0, span, 2 * span]
    assert grad_norm._programs((10, 10), torch.device("cpu"), 4)[2].tolist() == [0, 4, 8, 0, 4, 8]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kernel_norm_on_gpu_at_llama_gradient_sizes():
    pytest.importorskip("triton")
    gen = torch.Generator(device="cuda").manual_seed(0)
    # a 1B model's kinds of gradient: an embedding, projections, a norm weight; and one fp32 gradient
    shapes = [(128256, 2048), (2048, 2048), (512, 2048), (16384, 2048), (2048,), (333, 7)]
    grads = [torch.randn(s, generator=gen, device="cuda").bfloat16() for s in shapes[:-1]]
    grads.append(torch.randn(shapes[-1], generator=gen, device="cuda"))
    assert grad_norm.usable(grads)
    want = math.sqrt(sum(float(t.double().pow(2).sum()) for t in grads))
    for _ in range(2):  # the second call with the tables already made
        assert float(grad_norm.total_norm(grads)) == pytest.approx(want, rel=1e-5)
    for block, iters, warps in ((8192, 1, 8), (2048, 8, 4), (1024, 3, 2)):  # other program sizes
        assert float(grad_norm.total_norm(grads, block=block, iters=iters, warps=warps)) == pytest.approx(want, rel=1e-5)
    torch_norm = float(torch.nn.utils.get_total_norm(grads[:-1]))  # bf16 only: torch's norm, rounded to bf16
    mine = float(grad_norm.total_norm(grads[:-1]))
    assert mine == pytest.approx(torch_norm, rel=2**-8)


def test_bench_takes_a_models_gradient_sizes_and_refuses_bad_program_sizes(capsys):
    from transformers import LlamaForCausalLM

    from bench import common
    from bench import grad_norm as bench_grad_norm

    shapes = bench_grad_norm.gradient_shapes("tiny", 3)
    model = LlamaForCausalLM(common.llama_config("tiny", 3))
    assert shapes == [p.shape for p in model.parameters()]
    assert bench_grad_norm.parse_args(["--programs", "4096x8x8,1024x3x2"]).programs == [(4096, 8, 8), (1024, 3, 2)]
    with pytest.raises(SystemExit):
        bench_grad_norm.parse_args(["--programs", "4096x8"])
    assert "--programs '4096x8': expected BLOCKxITERSxWARPS" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="run it on a CUDA device"):
        bench_grad_norm.main(["--device", "cpu"])
