"""RoPE on the Q/K/V projection's output in one kernel, and its backward writing that output's gradient.

In the THD layout Transformer Engine's attention splits the projection's output `[T, R + 2, G, D]` (R query
heads per K/V group, G groups, head size D) into query, key and value views, rotates the query and the key
in a kernel each, and in backward concatenates the three gradients again. `qkv_rope` does the same in
one kernel each way: forward reads the query and key parts once and writes them rotated; backward reads
the rotated gradients and the value's and writes the projection's gradient in place, with no
concatenation after it.

The rotation is HF's rotate-half convention (TE's non-interleaved one), position by position within each
segment of `cu_seqlens`, from TE's angle table `[L, 1, 1, D]` (both halves the same angles), computed in
fp32 and rounded once.
"""

from __future__ import annotations

import torch

from .triton_kernels import cdiv, lazy_kernel, runs_on

TOKENS, HEADS = 32, 4  # a program's tokens, and the heads it rotates with one look-up of their angles


def _build(triton, tl):
    @triton.jit
    def rope_qkv(packed_ptr, q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, cu_ptr, tokens, segments, q_heads, kv_heads,
                 v_token_stride, v_head_stride, HALF: tl.constexpr, TOKENS: tl.constexpr, HEADS: tl.constexpr,
                 SEARCH: tl.constexpr, BACKWARD: tl.constexpr):
        # packed [T, q_heads + 2 kv_heads, 2 HALF] (the projection's output, or in backward its gradient);
        # q [T, q_heads, 2 HALF] and k [T, kv_heads, 2 HALF] (the rotated tensors, or their gradients).
        # Forward rotates packed -> q, k; backward rotates q, k -> packed by the opposite angle, and its
        # programs past the rotating ones copy the value's gradient v into packed's last kv_heads heads.
        t = tl.program_id(0) * TOKENS + tl.arange(0, TOKENS)
        inside = t < tokens
        d = tl.arange(0, HALF)
        at = inside[:, None]
        t64 = t.to(tl.int64)[:, None]
        rotated = q_heads + kv_heads
        first = tl.program_id(1) * HEADS
        packed = packed_ptr + t64 * ((rotated + kv_heads) * 2 * HALF) + d[None, :]
        if first < rotated:
            # each token's position in its segment: the last segment start at or before it (empty segments
            # repeat a start, and the last of the equal starts is the one holding the token)
            tc = tl.where(inside, t, 0)
            lo = tl.zeros_like(tc)
            hi = lo + segments
            for _ in tl.static_range(SEARCH):
                mid = (lo + hi + 1) // 2
                at_or_before = tl.load(cu_ptr + mid) <= tc
                lo = tl.where(at_or_before, mid, lo)
                hi = tl.where(at_or_before, hi, mid - 1)
            table = (tc - tl.load(cu_ptr + lo)).to(tl.int64)[:, None] * HALF + d[None, :]
            c = tl.load(cos_ptr + table, mask=at, other=0.0)
            s = tl.load(sin_ptr + table, mask=at, other=0.0)
            if BACKWARD:
                s = -s
            for i in tl.static_range(HEADS):
                head = first + i
                if head < rotated:
                    if head < q_heads:
                        split = q_ptr + t64 * (q_heads * 2 * HALF) + head * 2 * HALF + d[None, :]
                    else:
                        split = k_ptr + t64 * (kv_heads * 2 * HALF) + (head - q_heads) * 2 * HALF + d[None, :]
                    if BACKWARD:
                        src = split
                        dst = packed + head * 2 * HALF
                    else:
                        src = packed + head * 2 * HALF
                        dst = split
                    x1 = tl.load(src, mask=at, other=0.0).to(tl.float32)
                    x2 = tl.load(src + HALF, mask=at, other=0.0).to(tl.float32)
                    tl.store(dst, (x1 * c - x2 * s).to(dst.dtype.element_ty), mask=at)
                    tl.store(dst + HALF, (x2 * c + x1 * s).to(dst.dtype.element_ty), mask=at)
        else:  # backward only: the value's gradient
            for i in tl.static_range(HEADS):
                head = first - tl.cdiv(rotated, HEADS) * HEADS + i  # the value's head
                if head < kv_heads:
                    v = v_ptr + t64 * v_token_stride + head * v_head_stride + d[None, :]
                    dst = packed + (rotated + head) * 2 * HALF
                    tl.store(dst, tl.load(v, mask=at, other=0.0), mask=at)
                    tl.store(dst + HALF, tl.load(v + HALF, mask=at, other=0.0), mask=at)

    return rope_qkv


_kernels = lazy_kernel(_build)


def cos_sin(angles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of TE's angle table `[L, 1, 1, D]` as `[L, D / 2]` fp32 tables (its halves are equal).

    Kept on the table, which the model makes once a forward for all its layers, so the layers share them."""
    kept = angles.__dict__.get("_rope_cos_sin")
    if kept is None:
        half = angles.reshape(angles.shape[0], -1)[:, : angles.shape[-1] // 2].float()
        kept = angles.__dict__["_rope_cos_sin"] = (half.cos().contiguous(), half.sin().contiguous())
    return kept


def usable(x: torch.Tensor, angles: torch.Tensor, q_groups: int) -> bool:
    """Whether the kernels take this projection output `[T, R + 2, G, D]` (R = `q_groups`)."""
    return (runs_on(x) and _kernels() is not None and x.dim() == 4 and x.shape[1] == q_groups + 2
            and x.is_contiguous() and x.dtype in (torch.bfloat16, torch.float16) and x.shape[-1] % 2 == 0
            and (x.shape[-1] // 2) & (x.shape[-1] // 2 - 1) == 0 and angles.shape[-1] == x.shape[-1])


def _search_steps(segments: int) -> int:
    return max(1, int(segments).bit_length())


class QKVRope(torch.autograd.Function):
    """`(q, k, v)` of a projection output `x [T, R + 2, G, D]`: q `[T, R, G, D]` and k `[T, 1, G, D]`
    rotated into new tensors, v a view of `x`."""

    @staticmethod
    def forward(ctx, x, angles, cu_seqlens):
        tokens, groups, size = x.shape[0], x.shape[2], x.shape[3]
        q_heads, kv_heads = (x.shape[1] - 2) * groups, groups
        cos, sin = cos_sin(angles)
        q = torch.empty((tokens, x.shape[1] - 2, groups, size), dtype=x.dtype, device=x.device)
        k = torch.empty((tokens, 1, groups, size), dtype=x.dtype, device=x.device)
        segments = cu_seqlens.numel() - 1
        if tokens:
            _kernels()[(cdiv(tokens, TOKENS), cdiv(q_heads + kv_heads, HEADS))](
                x, q, k, x, cos, sin, cu_seqlens, tokens, segments, q_heads, kv_heads, 0, 0, HALF=size // 2,
                TOKENS=TOKENS, HEADS=HEADS, SEARCH=_search_steps(segments), BACKWARD=False)
        ctx.save_for_backward(cos, sin, cu_seqlens)
        ctx.shape = x.shape
        return q, k, x[:, -1:]

    @staticmethod
    def backward(ctx, dq, dk, dv):
        cos, sin, cu_seqlens = ctx.saved_tensors
        tokens, heads, groups, size = ctx.shape
        q_heads, kv_heads = (heads - 2) * groups, groups
        like = next(g for g in (dq, dk, dv) if g is not None)
        dq = torch.zeros((tokens, heads - 2, groups, size), dtype=like.dtype, device=like.device) if dq is None \
            else dq.contiguous()
        dk = torch.zeros((tokens, 1, groups, size), dtype=like.dtype, device=like.device) if dk is None \
            else dk.contiguous()
        dv = torch.zeros((tokens, 1, groups, size), dtype=like.dtype, device=like.device) if dv is None else dv
        dv = dv.reshape(tokens, groups, size)
        if dv.stride(-1) != 1:
            dv = dv.contiguous()
        dx = torch.empty(ctx.shape, dtype=like.dtype, device=like.device)
        segments = cu_seqlens.numel() - 1
        if tokens:
            _kernels()[(cdiv(tokens, TOKENS), cdiv(q_heads + kv_heads, HEADS) + cdiv(kv_heads, HEADS))](
                dx, dq, dk, dv, cos, sin, cu_seqlens, tokens, segments, q_heads, kv_heads, dv.stride(0),
                dv.stride(1), HALF=size // 2, TOKENS=TOKENS, HEADS=HEADS, SEARCH=_search_steps(segments),
                BACKWARD=True)
        return dx, None, None


def qkv_rope(x: torch.Tensor, angles: torch.Tensor, cu_seqlens: torch.Tensor):
    """`QKVRope`: the rotated query and key, and the value, of a projection output `[T, R + 2, G, D]`."""
    return QKVRope.apply(x, angles, cu_seqlens)


def segment_positions(cu_seqlens: torch.Tensor, tokens: int) -> torch.Tensor:
    """Each of `tokens` packed tokens' position within its segment of `cu_seqlens` (empty segments allowed):
    what the kernels find by their binary search."""
    starts = cu_seqlens.long()
    t = torch.arange(tokens, device=cu_seqlens.device)
    return t - starts[torch.searchsorted(starts, t, right=True) - 1]


def qkv_rope_reference(x: torch.Tensor, angles: torch.Tensor, cu_seqlens: torch.Tensor):
    """The same in torch, in fp32 and rounded once: what the kernels compute."""
    tokens, size = x.shape[0], x.shape[-1]
    pos = segment_positions(cu_seqlens, tokens)
    ang = angles.reshape(angles.shape[0], size)[pos].float()[:, None, None, :]  # [T, 1, 1, D]
    cos, sin = ang.cos(), ang.sin()
    qk = x[:, :-1].float()
    x1, x2 = qk[..., : size // 2], qk[..., size // 2:]
    rotated = qk * cos + torch.cat((-x2, x1), dim=-1) * sin
    rotated = rotated.to(x.dtype)
    return rotated[:, :-1], rotated[:, -1:], x[:, -1:]
