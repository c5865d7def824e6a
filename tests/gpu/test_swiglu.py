"""The one-pass SwiGLU backward cast on a real GPU: its FP8 bytes, and TE's `LayerNormMLP` with it.

Skipped (cleanly) wherever TE or CUDA is missing.
"""

import pytest
import torch

from te_model import swiglu_kernels
from te_model.backend import te_unavailable_reason

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(te_unavailable_reason() is not None, reason=f"TE backend: {te_unavailable_reason()}"),
]


def te_two_pass(grad, fc1_out, dtype, scale):
    """TE's own path: the SwiGLU gradient in bf16 (`tex.dswiglu`), then cast (`tex.bgrad_quantize`)."""
    import transformer_engine_torch as tex
    from transformer_engine.pytorch.constants import TE_DType
    from transformer_engine.pytorch.tensor.float8_tensor import Float8Quantizer

    quantizer = Float8Quantizer(scale.clone(), torch.zeros(1, device="cuda"), TE_DType[dtype])
    return tex.bgrad_quantize(tex.dswiglu(grad, fc1_out, None), quantizer)[1]


def fp8_steps(a, b, dtype):
    """How many FP8 steps apart two FP8 tensors are, element by element (same sign assumed)."""
    return (a.view(torch.uint8).int() - b.view(torch.uint8).int()).abs()


def test_kernel_rounds_once_to_fp8_at_llama_8b_mlp_width():
    gen = torch.Generator(device="cuda").manual_seed(0)
    grad = (torch.randn(2048, 14336, generator=gen, device="cuda") * 1e-3).bfloat16()
    fc1_out = (torch.randn(2048, 2 * 14336, generator=gen, device="cuda") * 2).bfloat16()
    ref = swiglu_kernels.dswiglu_reference(grad, fc1_out)
    for dtype in (torch.float8_e5m2, torch.float8_e4m3fn):
        scale = (torch.finfo(dtype).max / ref.abs().max()).reshape(1)
        amax = torch.zeros(1, device="cuda")
        assert swiglu_kernels.usable(grad, fc1_out)
        q, qt, scale_inv = swiglu_kernels.dswiglu_fp8(grad, fc1_out, scale, amax, dtype)
        once = (ref * scale).to(dtype)
        apart = fp8_steps(q, once, dtype)
        # the kernel's exp is not torch's: a value next to a rounding boundary may land on the other side
        assert (apart == 0).float().mean().item() > 0.999 and apart.max().item() <= 1, dtype
        assert torch.equal(qt.view(torch.uint8), q.view(torch.uint8).t().contiguous()), dtype
        # the transpose written by the kernel itself: the same bytes in both layouts
        q2, qt2, _ = swiglu_kernels.dswiglu_fp8(grad, fc1_out, scale, amax.clone(), dtype, transpose_in_kernel=True)
        wrong_rows = (qt2.view(torch.uint8) != qt.view(torch.uint8)).any(dim=1).nonzero().flatten()
        assert torch.equal(q2.view(torch.uint8), q.view(torch.uint8)), dtype
        assert wrong_rows.numel() == 0, (dtype, wrong_rows[:10].tolist())
        assert torch.allclose(amax, ref.abs().max(), rtol=1e-6)
        assert torch.equal(scale_inv, scale.reciprocal())
        te = te_two_pass(grad, fc1_out, dtype, scale)
        # TE rounds twice (to bf16, then to FP8): where bf16 lands on an FP8 midpoint the two differ by a step
        te_apart = fp8_steps(q, te._data.view(dtype), dtype)
        assert te_apart.max().item() <= 1, dtype
        print(f"{dtype}: {(apart > 0).float().mean().item():.2e} of the bytes off a single rounding in fp32, "
              f"{(te_apart > 0).float().mean().item():.2e} off TE's two roundings")


def mlp_pair(seed: int = 0):
    """Our MLP and a plain `te.LayerNormMLP` with the same weights, at a small Llama-like shape."""
    import transformer_engine.pytorch as te
    from te_model import swiglu_te

    assert swiglu_te.install()
    torch.manual_seed(seed)
    args = dict(hidden_size=512, ffn_hidden_size=1408, bias=False, normalization="RMSNorm", activation="swiglu",
                params_dtype=torch.bfloat16, device="cuda")
    ours, plain = swiglu_te.LlamaLayerNormMLP(**args), te.LayerNormMLP(**args)
    plain.load_state_dict(ours.state_dict())
    return ours, plain


def train_steps(mlp, steps: int = 4):
    """Each step's output, input gradient and weight gradients, under delayed scaling (amax history
    of 4, so the scales move within the run)."""
    import transformer_engine.pytorch as te
    from transformer_engine.common.recipe import DelayedScaling

    recipe = DelayedScaling(amax_history_len=4)
    gen = torch.Generator(device="cuda").manual_seed(1)
    out = []
    for _ in range(steps):
        x = torch.randn(1024, 512, generator=gen, device="cuda").bfloat16().requires_grad_()
        with te.autocast(enabled=True, recipe=recipe):
            y = mlp(x)
        y.backward(torch.randn(y.shape, generator=gen, device="cuda").bfloat16())
        out.append([y.detach(), x.grad] + [p.grad.clone() for p in mlp.parameters()])
        mlp.zero_grad()
    return out


def rel_err(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def counted(monkeypatch) -> list:
    """The calls of the one-pass kernel, counted."""
    calls, kernel = [], swiglu_kernels.dswiglu_fp8
    monkeypatch.setattr(swiglu_kernels, "dswiglu_fp8",
                        lambda *args, **kwargs: calls.append(1) or kernel(*args, **kwargs))
    return calls


def test_layernorm_mlp_trains_as_te_does_with_the_one_pass_cast(monkeypatch):
    ours, plain = mlp_pair()
    calls = counted(monkeypatch)
    got = train_steps(ours)
    assert len(calls) == 4  # every backward took the one-pass cast
    want = train_steps(plain)
    assert len(calls) == 4  # a plain LayerNormMLP never does
    for step, (g, w) in enumerate(zip(got, want)):
        assert torch.equal(g[0], w[0]), step  # the forward is TE's own
        for name, a, b in zip(["input grad", "norm", "fc1", "fc2"], g[1:], w[1:]):
            # the same gradient, rounded to FP8 once from fp32 where TE rounds it to bf16 first: a few
            # percent of the FP8 values a step apart, a few percent of the norm (e5m2 steps are 25%)
            assert rel_err(a, b) < 5e-2, (step, name, rel_err(a, b))


def test_the_transpose_written_by_the_kernel_trains_bit_for_bit_as_the_copied_one(monkeypatch):
    copied, _ = mlp_pair()
    written, _ = mlp_pair()
    written.dswiglu_transpose_in_kernel = True
    calls = counted(monkeypatch)
    want, got = train_steps(copied), train_steps(written)
    assert len(calls) == 8
    for step, (g, w) in enumerate(zip(got, want)):
        assert all(torch.equal(a, b) for a, b in zip(g, w)), step


def test_the_one_pass_cast_is_ours_alone_and_can_be_turned_off(monkeypatch):
    import transformer_engine.pytorch.module.layernorm_mlp as te_mlp

    calls = counted(monkeypatch)

    with_table = train_steps(mlp_pair()[1])
    plain = mlp_pair()[1]  # each run on fresh modules: the FP8 scales are state
    ours_off = mlp_pair()[0]
    ours_off.one_pass_dswiglu = False
    off = train_steps(ours_off)
    table = te_mlp._act_func
    te_mlp._act_func = table.te_table  # TE's own table, as if never installed
    try:
        te_own = train_steps(plain)
    finally:
        te_mlp._act_func = table
    for a, b, c in zip(with_table, off, te_own):
        assert all(torch.equal(x, z) for x, z in zip(a, c))  # another module's MLP: TE's path, bit for bit
        assert all(torch.equal(y, z) for y, z in zip(b, c))  # ours turned off: the same
    assert not calls
