"""The model's final RMSNorm on Transformer Engine's RMSNorm kernels, one each way.

HF's `LlamaRMSNorm` runs as torch's small kernels: a cast to fp32, a power, a mean, the products and the
cast back, each a pass over the (tokens, hidden) activations, and as many again in backward. The decoder
layers' norms are TE's already (`LayerNormLinear`, `LayerNormMLP`); `LlamaTERMSNorm` gives the final norm
TE's `rmsnorm_fwd` and `rmsnorm_bwd` too. It keeps HF's parameter (`weight`) and epsilon
(`variance_epsilon`), so checkpoints are unchanged, and computes in fp32 with one rounding where HF rounds
the normalised value before scaling it. Off CUDA, in fp32 or on sharded parameters it runs HF's math.

Transformer Engine is imported on the first call that uses its kernels, not by importing this module.
"""

from __future__ import annotations

import functools

import torch

from .layer import rms_norm


@functools.cache
def _te():
    import transformer_engine.pytorch  # noqa: F401 - before its extension module, which it loads
    import transformer_engine_torch as tex
    from transformer_engine.pytorch.constants import TE_DType

    return tex, TE_DType


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        tex, te_dtype = _te()
        rows = x.reshape(-1, x.shape[-1])
        y, _, rsigma = tex.rmsnorm_fwd(rows, weight, eps, None, None, te_dtype[x.dtype], 0, False)
        ctx.save_for_backward(rows, rsigma, weight)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, grad):
        rows, rsigma, weight = ctx.saved_tensors
        tex, _ = _te()
        dx, dw = tex.rmsnorm_bwd(grad.reshape(rows.shape).contiguous(), rows, rsigma, weight, 0, False)
        return dx.view(grad.shape), dw, None


class LlamaTERMSNorm(torch.nn.Module):
    """HF's `LlamaRMSNorm` (same parameter, same epsilon), on TE's kernels for CUDA tensors in bf16/fp16."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (hidden_states.is_cuda and hidden_states.dtype in (torch.bfloat16, torch.float16)
                and w.dtype == hidden_states.dtype and type(w.data) is torch.Tensor):
            return _RMSNorm.apply(hidden_states, w, self.variance_epsilon)
        return rms_norm(hidden_states, w, self.variance_epsilon)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"
