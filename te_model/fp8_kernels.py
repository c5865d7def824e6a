"""The FP8 head's transposes and scaled casts, each one pass over memory where Triton can run.

Hopper's FP8 GEMMs take both operands K-major, so each of the head's three GEMMs wants its own layout of
the same FP8 tensor. torch's `.t().contiguous()` on 1-byte elements is a slow generic strided copy;
`transpose` uses Transformer Engine's FP8 transpose where TE runs, else `transpose_tiles`, which copies
square tiles (`bench/fp8_transpose.py` times both; TE's is the faster). `scaled_cast` divides and casts in
one kernel, rounding once from fp32 where torch rounds twice. Both fall back to torch where Triton cannot
run (CPU tensors, no Triton); `TRITON_INTERPRET=1` runs the kernels on the CPU for the tests.
"""

from __future__ import annotations

import functools

import torch

from .triton_kernels import cdiv, lazy_kernel, runs_on

TILE = 64  # a transpose program's square tile
BLOCK = 4096  # a scaled cast program's elements


def _build(triton, tl):
    @triton.jit
    def transpose_tiles(x_ptr, y_ptr, rows, cols, TILE: tl.constexpr):
        # y (cols, rows) = x (rows, cols).T, one TILE x TILE tile a program
        r = tl.program_id(0) * TILE + tl.arange(0, TILE)
        c = tl.program_id(1) * TILE + tl.arange(0, TILE)
        inside = (r[:, None] < rows) & (c[None, :] < cols)
        tile = tl.load(x_ptr + r[:, None].to(tl.int64) * cols + c[None, :], mask=inside)
        tl.store(y_ptr + c[:, None].to(tl.int64) * rows + r[None, :], tl.trans(tile),
                 mask=(c[:, None] < cols) & (r[None, :] < rows))

    @triton.jit
    def scaled_cast_block(x_ptr, scale_ptr, q_ptr, n, BLOCK: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + i, mask=i < n).to(tl.float32)
        tl.store(q_ptr + i, (x / tl.load(scale_ptr)).to(q_ptr.dtype.element_ty), mask=i < n)

    return transpose_tiles, scaled_cast_block


_kernels = lazy_kernel(_build)  # (transpose, scaled cast), compiled on first use, or None without Triton


def _usable(t: torch.Tensor) -> bool:
    return runs_on(t) and t.is_contiguous() and _kernels() is not None


@functools.cache
def te_transpose():
    """TE's transpose of 1-byte data as a function of a uint8 tensor, or None where TE does not run."""
    from .backend import te_unavailable_reason

    if te_unavailable_reason() is not None:
        return None
    import transformer_engine.pytorch  # noqa: F401 - loads the extension module
    import transformer_engine_torch as tex

    return lambda t: tex.fp8_transpose(t, tex.DType.kFloat8E4M3, out=None)  # a byte copy: any FP8 type does


def transpose(t: torch.Tensor) -> torch.Tensor:
    """`t.t().contiguous()` of a 2-D tensor of 1-byte elements (FP8), by the fastest way that runs here.

    The head needs the weight as (V, H) for the logits and as (H, V) for the input gradient. It needs
    the loss's gradient (N, V) as (V, N) for the weight gradient; the SwiGLU gradient's cast wants both
    layouts too.
    """
    te = (te_transpose() if t.is_cuda and t.dim() == 2 and t.element_size() == 1 and t.is_contiguous() and t.numel()
          else None)
    if te is None:
        return transpose_tiles(t)
    return te(t.view(torch.uint8)).view(t.dtype)


def transpose_tiles(t: torch.Tensor, *, tile: int = TILE, warps: int = 4) -> torch.Tensor:
    """`transpose` by Triton: each program copies one square tile, reading and writing whole lines of it.
    `tile` and `warps` size the programs (`bench/fp8_transpose.py`)."""
    if t.dim() != 2 or t.element_size() != 1 or not _usable(t):
        return t.t().contiguous()
    rows, cols = t.shape
    out = torch.empty((cols, rows), dtype=t.dtype, device=t.device)
    if t.numel():
        grid = (cdiv(rows, tile), cdiv(cols, tile))
        _kernels()[0][grid](t.view(torch.uint8), out.view(torch.uint8), rows, cols, TILE=tile, num_warps=warps)
    return out


def scaled_cast(t: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t / scale` in `dtype` (FP8), rounded once from fp32; `scale` a 0-dim fp32 tensor on t's device.

    torch divides by a 0-dim device tensor in a non-vectorised kernel. It writes a bf16 quotient that is
    read again for the cast, so it rounds twice; this kernel reads `t` once and rounds once.
    """
    if not _usable(t):
        return (t.float() / scale).to(dtype)
    out = torch.empty(t.shape, dtype=dtype, device=t.device)
    if t.numel():
        _kernels()[1][(cdiv(t.numel(), BLOCK),)](t, scale, out, t.numel(), BLOCK=BLOCK, num_warps=8)
    return out
