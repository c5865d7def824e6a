"""`te_model.residual`: the residual gradient handed to the norm backward of the branch, with a torch RMSNorm
that takes it as TE's does once `te_model.residual_te` is installed (the TE side: tests/gpu/test_te.py)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from te_model import residual


class TakingNorm(torch.autograd.Function):
    """RMSNorm whose backward adds the residual gradient kept for its input, as the installed TE backward does."""

    taken = 0

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return _rmsnorm(x, weight)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        with torch.enable_grad():
            xx, ww = x.detach().requires_grad_(), weight.detach().requires_grad_()
            dx, dw = torch.autograd.grad(_rmsnorm(xx, ww), (xx, ww), grad)
        add = residual.take(x)
        if add is not None:
            TakingNorm.taken += 1
            dx = dx + add
        return dx, dw


def _rmsnorm(x, weight):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight


def _stack(blocks: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    params = [(torch.rand(16, generator=g, dtype=torch.float64) + 0.5,
               torch.randn(16, 16, generator=g, dtype=torch.float64)) for _ in range(2 * blocks)]
    return [(w.requires_grad_(), m.requires_grad_()) for w, m in params]


def _forward(x, params, fused: bool, norm=TakingNorm.apply, wrap=None):
    def block(h, w1, m1, w2, m2):  # a decoder layer: attention-like then MLP-like branch, each pre-norm
        add = residual.add if fused else torch.add
        h = add(h, torch.tanh(norm(h, w1) @ m1))
        return add(h, torch.tanh(norm(h, w2) @ m2))

    for (w1, m1), (w2, m2) in zip(params[::2], params[1::2]):
        args = (x, w1, m1, w2, m2)
        x = wrap(block, *args) if wrap is not None else block(*args)
    return x


def _grads(fused: bool, wrap=None):
    params = _stack(3)
    x = torch.randn(5, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    _forward(x, params, fused, wrap=wrap).pow(2).sum().backward()
    return [x.grad] + [t.grad for pair in params for t in pair]


@pytest.mark.parametrize("wrap", [None, "non-reentrant", "reentrant"])
def test_the_norm_backward_adds_the_residual_gradient_autograd_would(wrap):
    """Each block's two residual gradients reach the norm backward and come out the same as autograd's sum,
    with whole blocks recomputed in backward too (the checkpoint's recomputed input is what both sides see)."""
    wrappers = {None: None, "non-reentrant": lambda f, *a: checkpoint(f, *a, use_reentrant=False),
                "reentrant": lambda f, *a: checkpoint(f, *a, use_reentrant=True)}
    TakingNorm.taken = 0
    fused = _grads(True, wrappers[wrap])
    assert TakingNorm.taken == 6 and not residual._kept  # two a block, all taken
    plain = _grads(False, wrappers[wrap])
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_a_gradient_no_norm_takes_is_an_error_in_the_same_backward():
    """A branch whose norm backward does not take the kept gradient would lose it: the residual input's own
    gradient check raises before any update could use the gradients, and nothing stays kept after."""
    params = _stack(1)
    x = torch.randn(5, 16, dtype=torch.float64, requires_grad=True)
    out = _forward(x, params, fused=True, norm=lambda h, w: _rmsnorm(h, w))  # autograd's norm: takes nothing
    with pytest.raises(residual.ResidualGradientLost, match="did not take"):
        out.sum().backward()
    assert not residual._kept
    out = _forward(x, params, fused=True)  # the next backward is not poisoned
    out.sum().backward()
    assert x.grad is not None and not residual._kept


def test_without_a_gradient_to_hand_on_it_is_the_plain_sum():
    a, b = torch.randn(3, 4), torch.randn(3, 4, requires_grad=True)
    out = residual.add(a, b)  # the residual needs no gradient: its norm backward would not run
    assert out.grad_fn is not None and type(out.grad_fn).__name__ != "ResidualAddBackward"
    out.sum().backward()
    assert not residual._kept
    with torch.no_grad():
        torch.testing.assert_close(residual.add(b, a), a + b)


def test_what_an_abandoned_backward_kept_is_dropped_not_blamed_on_the_next():
    """A backward stopped midway (an out-of-memory error caught and retried in the same process) leaves a
    gradient kept; the next backward drops it and runs as if nothing had been left."""
    params = _stack(1)
    x = torch.randn(5, 16, dtype=torch.float64, requires_grad=True)
    out = _forward(x, params, fused=True)

    class Stop(Exception):
        pass

    def stop(grad):
        raise Stop

    params[1][1].register_hook(stop)  # the MLP-like branch's weight: after its gradient was kept
    with pytest.raises(Stop):
        out.sum().backward()
    assert residual._kept  # left by the abandoned pass
    x.grad = None
    fresh = _stack(1)
    _forward(x, fresh, fused=True).sum().backward()
    assert not residual._kept and x.grad is not None
    plain_x = x.detach().clone().requires_grad_()
    _forward(plain_x, _stack(1), fused=False).sum().backward()
    torch.testing.assert_close(x.grad, plain_x.grad, rtol=1e-12, atol=1e-12)


def test_a_gradient_kept_is_taken_once_by_the_norm_of_the_same_input():
    x, other, grad = torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4)
    residual.keep(x, grad)
    assert residual.take(other) is None  # another input's norm: nothing for it
    assert residual.take(x) is grad and residual.take(x) is None and not residual._kept
