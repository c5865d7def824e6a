"""Our decoder layers' attention: the Q/K/V split and RoPE in one kernel (`rope_kernels.qkv_rope`).

TE's `MultiheadAttention` splits the projection's output with `SplitAlongDim.apply` and then rotates the
query and the key with `apply_rotary_pos_emb`, both through its module-level names. `install` gives the
module a split that, inside `fused(angles, cu_seqlens)` (which our layers enter around TE's forward),
returns the query and key already rotated, and a RoPE that passes those two through unchanged. Outside
that context, or for a tensor the kernels do not take, both are TE's own: every other attention in the
process (a peer's, in the benchmarks) runs as before, bit for bit.

Transformer Engine is imported by `install`, not by importing this module.
"""

from __future__ import annotations

import contextlib
import inspect
import threading

import torch

from . import rope_kernels

MARK = "_rope_applied"  # on the query and key the fused split rotated
CALLS = ("SplitAlongDim.apply(", "apply_rotary_pos_emb(")  # how TE 2.20's attention calls the two
_state = threading.local()


@contextlib.contextmanager
def fused(angles: torch.Tensor, cu_seqlens: torch.Tensor):
    """Within: the next self-attention split on this thread rotates with these (TE's THD arguments)."""
    _state.pending = (angles, cu_seqlens)
    try:
        yield
    finally:
        _state.pending = None


class _Split:
    """`SplitAlongDim` for TE's attention module: the fused split where it applies, TE's otherwise."""

    def __init__(self, te_split) -> None:
        self.te_split = te_split

    def apply(self, mixed, split_dim, sections, *args):
        pending = getattr(_state, "pending", None)
        if pending is not None and not args and split_dim == -3 and isinstance(sections, (tuple, list)) \
                and len(sections) == 3 and tuple(sections[1:]) == (1, 1) and type(mixed) is torch.Tensor \
                and rope_kernels.usable(mixed, pending[0], sections[0]):
            _state.pending = None  # one split per layer forward
            q, k, v = rope_kernels.qkv_rope(mixed, *pending)
            for t in (q, k):
                t.__dict__[MARK] = pending
            return q, k, v
        return self.te_split.apply(mixed, split_dim, sections, *args)


class _Rope:
    """`apply_rotary_pos_emb` for TE's attention module: TE's, except for a query or key the fused split
    rotated already, which it passes through once it has checked it was asked for the same rotation."""

    def __init__(self, te_rope) -> None:
        self.te_rope = te_rope

    def __call__(self, t, freqs, tensor_format="sbhd", start_positions=None, interleaved=False, fused=False,
                 cu_seqlens=None, cp_size=1, cp_rank=0):
        done = (t._base if t._base is not None else t).__dict__.get(MARK)
        if done is None:
            return self.te_rope(t, freqs, tensor_format, start_positions=start_positions, interleaved=interleaved,
                                fused=fused, cu_seqlens=cu_seqlens, cp_size=cp_size, cp_rank=cp_rank)
        if not (freqs is done[0] and cu_seqlens is done[1] and tensor_format == "thd" and start_positions is None
                and not interleaved and cp_size == 1):
            raise RuntimeError("TE's attention asked to rotate a query or key the fused split rotated already, "
                               "with other arguments (te_model.rope_te was written against TE 2.20)")
        return t


def install(module=None) -> bool:
    """Give TE's attention module (or `module`, laid out as it is) the fused split and RoPE, once per
    process. False, with the module left alone, where it does not call the two as this was written against."""
    if module is None:
        from transformer_engine.pytorch.attention import multi_head_attention as module
    if isinstance(module.SplitAlongDim, _Split):
        return True
    try:
        source = inspect.getsource(module.MultiheadAttention.forward)
    except (OSError, TypeError):  # no source to read: not the TE this was written against
        return False
    if not all(call in source for call in CALLS) or "rotary_pos_interleaved" not in source:
        return False
    module.SplitAlongDim = _Split(module.SplitAlongDim)
    module.apply_rotary_pos_emb = _Rope(module.apply_rotary_pos_emb)
    return True
