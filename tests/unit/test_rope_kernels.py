"""The Q/K/V split with RoPE in one kernel (`te_model.rope_kernels`) against the same rotation in torch.

The kernels run through Triton's interpreter in a fresh process: grouped-query shapes, packed segments
with empty ones among them (as padded plans and CUDA graphs' layouts have), token and head counts that
are not multiples of a program's; the backward against autograd through the torch reference. The `gpu`
test runs them compiled; `tests/gpu/test_te.py` runs them beside TE's own split and RoPE.
"""

from __future__ import annotations

import textwrap

import pytest
import torch

from te_model import rope_kernels
from te_model.rope import angles_table
from tests.support.triton_interpreted import run_interpreted

CASE = textwrap.dedent("""
    import json, torch
    from te_model import rope_kernels as r
    from te_model.rope import angles_table

    def case(tokens, q_groups, groups, size, cu, dtype=torch.bfloat16, seed=0, device="cpu"):
        gen = torch.Generator().manual_seed(seed)
        inv_freq = 1.0 / (500000.0 ** (torch.arange(0, size, 2).float() / size))
        angles = angles_table(inv_freq, tokens).to(device)
        cu = torch.tensor(cu, dtype=torch.int32, device=device)
        x = torch.randn(tokens, q_groups + 2, groups, size, generator=gen).to(device, dtype).requires_grad_()
        q, k, v = r.qkv_rope(x, angles, cu)
        want = r.qkv_rope_reference(x.detach(), angles, cu)
        grads = [torch.randn(t.shape, generator=gen).to(device, dtype) for t in (q, k, v)]
        torch.autograd.backward((q, k, v), grads)
        ref_x = x.detach().clone().requires_grad_()
        torch.autograd.backward(r.qkv_rope_reference(ref_x, angles, cu), grads)
        ulp = lambda a, b: float(((a.float() - b.float()).abs() / b.float().abs().clamp_min(1e-3)).max())
        return {"q": ulp(q, want[0]), "k": ulp(k, want[1]), "v_is_view": v.data_ptr() == x[:, -1:].data_ptr(),
                "v": float((v - want[2]).abs().max()), "dx": ulp(x.grad, ref_x.grad),
                "shapes": [list(q.shape), list(k.shape), list(x.grad.shape)]}
""")

INTERPRETED = CASE + textwrap.dedent("""
    out = {
        "gqa": case(45, 4, 2, 16, [0, 13, 13, 40, 45, 45]),  # an empty segment inside and at the end
        "one_segment": case(33, 1, 3, 8, [0, 33]),
        "one_token_rows": case(5, 2, 1, 32, [0, 1, 2, 3, 4, 5]),
        "more_groups_than_a_program": case(40, 1, 5, 8, [0, 17, 40]),  # the values' heads over two programs
        "fp16": case(20, 2, 2, 16, [0, 7, 20], dtype=torch.float16),
    }
    angles = angles_table(torch.ones(8), 4)
    x = torch.zeros(4, 3, 2, 16, dtype=torch.bfloat16)
    out["usable"] = [r.usable(x, angles, 1), r.usable(x.float(), angles, 1), r.usable(x, angles, 2),
                     r.usable(x.transpose(0, 2), angles, 1),
                     r.usable(x[..., :12].contiguous(), angles_table(torch.ones(6), 4), 1)]
    print(json.dumps(out))
""")


def test_qkv_rope_matches_the_torch_rotation_interpreted():
    result = run_interpreted(INTERPRETED)
    # taken; then refused: fp32, the wrong query groups, not contiguous, a half head that is no power of two
    assert result.pop("usable") == [True, False, False, False, False]
    for name, got in result.items():
        # the kernel and the reference round the same fp32 value once: equal, or one ulp apart where the
        # kernel's fused multiply-add rounds the fp32 sum differently (2**-7 relative in bf16)
        assert got["q"] <= 2 ** -7 and got["k"] <= 2 ** -7 and got["dx"] <= 2 ** -7, (name, got)
        assert got["v"] == 0 and got["v_is_view"], (name, got)
    assert result["gqa"]["shapes"] == [[45, 4, 2, 16], [45, 1, 2, 16], [45, 6, 2, 16]]


def test_reference_is_hf_rotate_half_at_each_segment_position():
    """The reference's positions restart at each segment, and its rotation is HF's `apply_rotary_pos_emb`."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    gen = torch.Generator().manual_seed(3)
    size, groups = 8, 2
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, size, 2).float() / size))
    angles = angles_table(inv_freq, 16)
    cu = torch.tensor([0, 5, 5, 12], dtype=torch.int32)
    x = torch.randn(12, 3, groups, size, generator=gen, dtype=torch.float64)
    q, k, v = rope_kernels.qkv_rope_reference(x, angles, cu)
    pos = torch.tensor(list(range(5)) + list(range(7)))
    cos, sin = angles.reshape(16, size)[pos].double().cos(), angles.reshape(16, size)[pos].double().sin()
    # HF: (batch, heads, seq, dim) with cos/sin (batch, seq, dim)
    hq, hk = apply_rotary_pos_emb(x[:, :1].reshape(12, -1, size).transpose(0, 1)[None],
                                  x[:, 1:2].reshape(12, -1, size).transpose(0, 1)[None], cos[None], sin[None])
    # the reference rotates in fp32, as the kernels do
    torch.testing.assert_close(q.reshape(12, -1, size), hq[0].transpose(0, 1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k.reshape(12, -1, size), hk[0].transpose(0, 1), rtol=1e-5, atol=1e-5)
    assert torch.equal(v, x[:, 2:])


def test_kernels_refuse_cpu_tensors_without_the_interpreter():
    angles = angles_table(torch.ones(8), 4)
    assert not rope_kernels.usable(torch.zeros(4, 3, 2, 16, dtype=torch.bfloat16), angles, 1)


@pytest.mark.gpu
def test_qkv_rope_matches_the_torch_rotation_on_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    namespace: dict = {}
    exec(CASE, namespace)
    for args in ((8192, 4, 8, 128, [0, 1000, 1000, 4096, 8192]), (4096, 1, 32, 64, [0, 4096])):
        got = namespace["case"](*args, device="cuda")
        assert got["q"] <= 2 ** -7 and got["k"] <= 2 ** -7 and got["dx"] <= 2 ** -7, got
        assert got["v"] == 0 and got["v_is_view"], got


GLUE = textwrap.dedent("""
    import contextlib, json, types, torch
    from te_model import rope_kernels, rope_te
    from te_model.rope import angles_table
    from tests.support import fake_te_attention as te

    other = types.SimpleNamespace(SplitAlongDim=te.SplitAlongDim, MultiheadAttention=te.OtherAttention,
                                  apply_rotary_pos_emb=te.apply_rotary_pos_emb)
    result = {"other": rope_te.install(other), "other_left_alone": other.SplitAlongDim is te.SplitAlongDim}
    result["install"] = [rope_te.install(te), rope_te.install(te)]  # the second finds it installed
    gen = torch.Generator().manual_seed(0)
    q_groups, groups, size, tokens = 2, 2, 16, 24
    angles = angles_table(1.0 / (10000.0 ** (torch.arange(0, size, 2).float() / size)), tokens)
    cu = torch.tensor([0, 9, 9, 24], dtype=torch.int32)
    x = torch.randn(tokens, q_groups + 2, groups, size, generator=gen).bfloat16()
    grads = [torch.randn(tokens, h * groups, size, generator=gen).bfloat16() for h in (q_groups, 1, 1)]
    attention = te.MultiheadAttention(q_groups, size)
    calls, qkv_rope = [], rope_kernels.qkv_rope
    rope_kernels.qkv_rope = lambda *a: calls.append(1) or qkv_rope(*a)

    def run(fused):
        mixed = x.clone().requires_grad_()
        te.rope_calls.clear()
        with rope_te.fused(angles, cu) if fused else contextlib.nullcontext():
            out = attention.forward(mixed, angles, cu)
        torch.autograd.backward(out, grads)
        return out, mixed.grad, len(te.rope_calls)

    (q0, k0, v0), dx0, ropes0 = run(False)
    (q1, k1, v1), dx1, ropes1 = run(True)
    (q2, k2, v2), dx2, ropes2 = run(False)  # the context left nothing behind
    rel = lambda a, b: float(((a.float() - b.float()).abs() / b.float().abs().clamp_min(1e-3)).max())
    result.update(te_path_ropes=[ropes0, ropes2], fused_ropes=ropes1, kernel_calls=len(calls),
                  q=rel(q1, q0), k=rel(k1, k0), v=float((v1 - v0).abs().max()), dx=rel(dx1, dx0),
                  again=float((q2 - q0).abs().max()) + float((dx2 - dx0).abs().max()))
    mixed = x.clone()
    with rope_te.fused(angles, cu):
        q, _, _ = te.SplitAlongDim.apply(mixed, -3, (q_groups, 1, 1))
    try:
        te.apply_rotary_pos_emb(q.reshape(tokens, -1, size), angles.clone(), "thd", fused=True, cu_seqlens=cu)
        result["other_angles"] = "passed through"
    except RuntimeError as error:
        result["other_angles"] = str(error)
    print(json.dumps(result))
""")


def test_fused_split_and_rope_replace_tes_only_inside_the_context_interpreted():
    """`rope_te` on an attention module laid out as TE's (`tests/support/fake_te_attention.py`): installed
    once, and not on a module whose attention calls neither name; inside `fused(...)` the split rotates
    the query and key in one kernel call and the RoPE calls pass them through, giving TE's path's outputs
    and projection gradient (within a bf16 ulp); outside it, and after it, TE's own calls; a RoPE call with
    other angles than the split's is refused."""
    result = run_interpreted(GLUE)
    assert result["other"] is False and result["other_left_alone"] is True
    assert result["install"] == [True, True]
    assert result["te_path_ropes"] == [2, 2] and result["fused_ropes"] == 0 and result["kernel_calls"] == 1
    assert result["q"] <= 2 ** -7 and result["k"] <= 2 ** -7 and result["dx"] <= 2 ** -7, result
    assert result["v"] == 0 and result["again"] == 0
    assert "other arguments" in result["other_angles"]
