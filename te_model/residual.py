"""The gradient along a decoder layer's residual connection, added by the norm backward that ends the branch.

A pre-norm block computes `out = x + branch(norm(x))`. In backward `x` gets two gradients, the one through
the branch (which ends in the norm's backward) and `out`'s own along the residual, and autograd adds them
in an elementwise kernel of its own: two reads and a write of a (tokens, hidden) tensor, twice a layer.
Transformer Engine has a norm backward that adds a tensor to its result as it writes it
(`rmsnorm_bwd_add`). `add` hands `out`'s gradient to that norm backward instead: `ResidualAdd`'s backward
leaves `x` no gradient of its own and keeps `out`'s, keyed by `x`'s memory, until the norm backward of the
same `x` takes it (`take`). `te_model.residual_te` puts `take` into TE's modules.

A gradient kept and never taken would be lost, so each residual input checks, once its whole gradient is
known, that nothing is still kept; anything kept raises there, in the same backward, before any update.
What a backward that was abandoned midway kept (an out-of-memory error caught and retried, as batch-size
finders do) is dropped by the next backward, not blamed on it: each gradient is kept with the id of the
backward pass that kept it.

This module does not import Transformer Engine (the CPU tests run it with a torch norm).
"""

from __future__ import annotations

import torch

# data_ptr of a residual input -> (the backward pass that kept it, the gradient its norm backward adds)
_kept: dict[int, tuple[int, torch.Tensor]] = {}


def _this_backward() -> int:
    """The running backward pass (autograd's graph task), after dropping what other passes left kept."""
    task = torch._C._current_graph_task_id()
    for key in [key for key, (kept_by, _) in _kept.items() if kept_by != task]:
        del _kept[key]
    return task


class ResidualGradientLost(RuntimeError):
    """A residual gradient was kept for a norm backward that never took it."""


def _lost() -> ResidualGradientLost:
    count = len(_kept)
    _kept.clear()
    return ResidualGradientLost(
        f"{count} residual gradient(s) kept for a norm backward that did not take them (te_model.residual): "
        "a branch starts with a norm whose backward is not the one te_model.residual_te installs; set "
        "fuse_residual_grad = False on the model's decoder layers")


class ResidualAdd(torch.autograd.Function):
    """`residual + branch`, whose backward keeps the gradient for `residual`'s norm backward to add."""

    @staticmethod
    def forward(ctx, residual: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(residual)  # in backward: the tensor the norm backward sees (recomputed or not)
        return residual + branch

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (residual,) = ctx.saved_tensors
        keep(residual, grad)
        return None, grad


def keep(x: torch.Tensor, grad: torch.Tensor) -> None:
    """Keep `grad` for the norm backward of `x` to add (`take`), in this backward pass."""
    task = _this_backward()
    if _kept:  # the one this pass kept before was never taken
        raise _lost()
    _kept[x.data_ptr()] = (task, grad)


def _check_taken(grad: torch.Tensor) -> None:
    _this_backward()
    if _kept:
        raise _lost()


def add(residual: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """`residual + branch`, its backward handing `residual`'s gradient to the norm backward of `residual`, which
    must call `take`. Only where `residual` needs a gradient: that norm backward then runs."""
    if not (torch.is_grad_enabled() and residual.requires_grad):
        return residual + branch
    residual.register_hook(_check_taken)  # runs once residual's gradient is complete
    return ResidualAdd.apply(residual, branch)


def take(x: torch.Tensor) -> torch.Tensor | None:
    """In the backward of a norm whose input is `x`: the residual gradient to add to `x`'s gradient, if
    one was kept for it (and then no longer kept)."""
    if not _kept:
        return None
    _this_backward()
    kept = _kept.pop(x.data_ptr(), None)
    return None if kept is None else kept[1]
