"""A stand-in for Transformer Engine's attention module, laid out as `te_model.rope_te.install` expects it
(its `MultiheadAttention.forward` calls the module-level `SplitAlongDim.apply` and `apply_rotary_pos_emb` as
TE 2.20's does for THD self-attention), so the CPU tests can check that glue without TE."""

from __future__ import annotations

import torch

from te_model.rope_kernels import segment_positions


class SplitAlongDim(torch.autograd.Function):
    """TE's split: views of the projection's output; backward concatenates the gradients."""

    @staticmethod
    def forward(ctx, mixed, split_dim, sections):
        ctx.split_dim = split_dim
        return torch.split(mixed, list(sections), dim=split_dim)

    @staticmethod
    def backward(ctx, *grads):
        return torch.cat(grads, dim=ctx.split_dim), None, None


rope_calls: list[tuple] = []


def apply_rotary_pos_emb(t, freqs, tensor_format="sbhd", start_positions=None, interleaved=False, fused=False,
                         cu_seqlens=None, cp_size=1, cp_rank=0):
    """TE's RoPE for THD `t` [T, heads, D]: rotate-half in fp32, rounded once, positions from each segment's
    start."""
    rope_calls.append(tuple(t.shape))
    size = t.shape[-1]
    pos = segment_positions(cu_seqlens, t.shape[0])
    angle = freqs.reshape(freqs.shape[0], size)[pos].float()[:, None, :]
    x = t.float()
    rotated = torch.cat((-x[..., size // 2:], x[..., : size // 2]), dim=-1)
    return (x * angle.cos() + rotated * angle.sin()).to(t.dtype)


class MultiheadAttention:
    """The part of TE's forward between the Q/K/V projection and the attention kernel."""

    rotary_pos_interleaved = False

    def __init__(self, q_groups: int, size: int) -> None:
        self.q_groups, self.size = q_groups, size

    def forward(self, mixed, rotary_pos_emb, cu_seqlens):
        query, key, value = SplitAlongDim.apply(mixed, -3, (self.q_groups, 1, 1))
        query, key, value = (x.reshape(x.size(0), -1, self.size) for x in (query, key, value))
        query = apply_rotary_pos_emb(query, rotary_pos_emb, "thd", fused=True, cu_seqlens=cu_seqlens,
                                     interleaved=self.rotary_pos_interleaved)
        key = apply_rotary_pos_emb(key, rotary_pos_emb, "thd", fused=True, cu_seqlens=cu_seqlens,
                                   interleaved=self.rotary_pos_interleaved)
        return query, key, value


class OtherAttention:
    """An attention whose forward calls neither: `install` must leave its module alone."""

    def forward(self, mixed):
        return mixed
