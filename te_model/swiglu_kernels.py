"""SwiGLU's backward written straight to FP8, in both layouts FC1's backward GEMMs read.

Under delayed scaling Transformer Engine's `LayerNormMLP` backward writes the SwiGLU gradient in bf16,
then reads it again to cast it to FP8 and transpose it (FC1's input-gradient GEMM reads it row-major, its
weight-gradient GEMM column-major). `dswiglu_fp8` reads the gradient of the SwiGLU output and FC1's
output once and writes the FP8 gradient and its amax, rounding once from fp32. The transpose is copied
from the FP8 gradient (6 bytes an element of the SwiGLU gradient, where TE's kernels move 9), or, with
`transpose_in_kernel`, written by the same kernel from the tile it has just stored (5 bytes).

SwiGLU here is TE's: FC1's output is `[a; b]` (gate, then up) and the activation is `silu(a) * b`.
"""

from __future__ import annotations

import torch

from . import fp8_kernels
from .triton_kernels import cdiv, lazy_kernel, runs_on

ROWS, COLS, WARPS = 64, 64, 4  # a program's tile of the gradient of the SwiGLU output, and its warps


def _build(triton, tl):
    @triton.jit
    def dswiglu_cast(g_ptr, x_ptr, q_ptr, qt_ptr, scale_ptr, scale_inv_ptr, amax_ptr, rows, cols,
                     ROWS: tl.constexpr, COLS: tl.constexpr, TRANSPOSE: tl.constexpr):
        # g (rows, cols); x = [a; b] (rows, 2 cols); q = [da; db] (rows, 2 cols); qt = q.T (2 cols, rows)
        r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        c = tl.program_id(1) * COLS + tl.arange(0, COLS)
        inside = (r[:, None] < rows) & (c[None, :] < cols)
        r64, c64 = r.to(tl.int64), c.to(tl.int64)
        g = tl.load(g_ptr + r64[:, None] * cols + c64[None, :], mask=inside, other=0.0).to(tl.float32)
        x_row = x_ptr + r64[:, None] * (2 * cols) + c64[None, :]
        a = tl.load(x_row, mask=inside, other=0.0).to(tl.float32)
        b = tl.load(x_row + cols, mask=inside, other=0.0).to(tl.float32)
        sig = 1.0 / (1.0 + tl.exp(-a))
        da = g * b * sig * (1.0 + a * (1.0 - sig))  # d silu(a) / da = sig + a sig (1 - sig)
        db = g * a * sig
        tl.atomic_max(amax_ptr, tl.maximum(tl.max(tl.abs(da)), tl.max(tl.abs(db))))
        scale = tl.load(scale_ptr)
        qa = (da * scale).to(q_ptr.dtype.element_ty)
        qb = (db * scale).to(q_ptr.dtype.element_ty)
        q_row = q_ptr + r64[:, None] * (2 * cols) + c64[None, :]
        tl.store(q_row, qa, mask=inside)
        tl.store(q_row + cols, qb, mask=inside)
        if TRANSPOSE:
            # Transposed straight from registers, every fourth row of the transpose came out wrong on Hopper
            # (Triton 3.6, triton-lang/triton#11111). Instead the program reads back the bytes it has just
            # stored, from cache, and writes them transposed, as `fp8_kernels.transpose_tiles` does.
            tl.debug_barrier()  # the stores above are the other threads' loads below
            inside_t = (c[:, None] < cols) & (r[None, :] < rows)
            for half in tl.static_range(2):
                tile = tl.load(q_ptr + r64[:, None] * (2 * cols) + half * cols + c64[None, :], mask=inside,
                               cache_modifier=".cg")
                tl.store(qt_ptr + (half * cols + c64[:, None]) * rows + r64[None, :], tl.trans(tile),
                         mask=inside_t)
        first = (tl.program_id(0) == 0) & (tl.program_id(1) == 0)
        tl.store(scale_inv_ptr, tl.fdiv(1.0, scale, ieee_rounding=True), mask=first)

    return dswiglu_cast


_kernel = lazy_kernel(_build)


def dswiglu_reference(grad: torch.Tensor, fc1_out: torch.Tensor) -> torch.Tensor:
    """The SwiGLU gradient `[da; db]` in fp32: what the kernel rounds once to FP8."""
    a, b = fc1_out.float().chunk(2, dim=-1)
    g = grad.float()
    sig = torch.sigmoid(a)
    return torch.cat([g * b * sig * (1 + a * (1 - sig)), g * a * sig], dim=-1)


def usable(grad: torch.Tensor, fc1_out: torch.Tensor) -> bool:
    """Whether the kernel takes these: 2-D, contiguous, FC1's output twice the gradient's width."""
    return (runs_on(grad) and grad.dim() == 2 and fc1_out.dim() == 2 and grad.is_contiguous()
            and fc1_out.is_contiguous() and fc1_out.shape == (grad.shape[0], 2 * grad.shape[1])
            and _kernel() is not None)


def dswiglu_fp8(grad: torch.Tensor, fc1_out: torch.Tensor, scale: torch.Tensor, amax: torch.Tensor,
                dtype: torch.dtype, *, transpose_in_kernel: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(q, q.T, 1 / scale)`: the SwiGLU gradient times `scale`, rounded once to `dtype`.

    grad: (N, F), the gradient of the SwiGLU output; fc1_out: (N, 2F). `amax` (one fp32 element) is
    raised to the gradient's largest magnitude, as TE's casts do, for the next scale. `scale` and `amax`
    are tensors on the device, so the call needs no host synchronisation. Check `usable` first.
    `transpose_in_kernel` has the kernel write `q.T` too; otherwise it is copied from `q` afterwards.
    """
    rows, cols = grad.shape
    q = torch.empty((rows, 2 * cols), dtype=dtype, device=grad.device)
    scale_inv = torch.empty(1, dtype=torch.float32, device=grad.device)
    if not grad.numel():
        return q, q.t().contiguous(), torch.reciprocal(scale.float().reshape(1))
    grid = (cdiv(rows, ROWS), cdiv(cols, COLS))
    qt = torch.empty((2 * cols, rows), dtype=dtype, device=grad.device) if transpose_in_kernel else q
    _kernel()[grid](grad, fc1_out, q, qt, scale, scale_inv, amax, rows, cols, ROWS=ROWS, COLS=COLS,
                    TRANSPOSE=transpose_in_kernel, num_warps=WARPS)
    return q, qt if transpose_in_kernel else fp8_kernels.transpose(q), scale_inv
