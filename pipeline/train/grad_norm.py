"""The gradients' total L2 norm, for clipping: one Triton launch over every gradient of a dtype.

Clipping reads every gradient once for the norm (the update's kernel applies the factor as it reads them
again). torch's `get_total_norm`, which `clip_grad_norm_` calls, runs `_foreach_norm`: a launch per few
hundred chunks of 64k elements, per-tensor norms rounded to the gradients' dtype, then the norm of those.
Here one launch per dtype reads every gradient in programs of `ITERS` blocks of `BLOCK` elements, found
through a table of (tensor, start) per program that is made once for a model's gradient sizes; only the
gradients' addresses are copied to the device each step. A program looks its tensor up once and then has
its `ITERS` loads in flight together: with one block a program, the look-ups' latency, not the memory,
set the pace. Each program writes its sum of squares; their sum, in a fixed order, is the norm's square, in
fp32. The norm is the same from run to run, as torch's is. `bench/grad_norm.py` times other program sizes.

Where the kernel cannot run (CPU tensors, FSDP2's sharded gradients, no Triton) `total_norm` is torch's,
in fp32. `TRITON_INTERPRET=1` runs the kernel on CPU tensors for the tests. The pipeline still clips with
torch's norm: `bench/train_step.py`'s `_kernel_norm` variant times this one against it
(docs/performance.md, Open).
"""

from __future__ import annotations

import functools

import torch
from torch.distributed.tensor import DTensor

from te_model.triton_kernels import cdiv, lazy_kernel, runs_on

BLOCK = 4096  # elements a load: 16 per thread at 8 warps, two 16-byte loads of bf16
ITERS = 8  # blocks a program
WARPS = 8
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _build(triton, tl):
    @triton.jit
    def sum_squares(addresses, numels, tensor_of, start_of, out, BLOCK: tl.constexpr, ITERS: tl.constexpr,
                    DTYPE: tl.constexpr):
        program = tl.program_id(0)
        tensor = tl.load(tensor_of + program)
        start = tl.load(start_of + program)
        base = tl.load(addresses + tensor).to(tl.pointer_type(DTYPE))
        end = tl.load(numels + tensor)
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for k in tl.static_range(ITERS):  # unrolled: the loads need not wait for each other
            i = start + k * BLOCK + tl.arange(0, BLOCK)
            x = tl.load(base + i, mask=i < end, other=0.0).to(tl.float32)
            acc += x * x
        tl.store(out + program, tl.sum(acc, axis=0))

    return sum_squares


_kernel = lazy_kernel(_build)


def _triton_dtype(dtype: torch.dtype):
    import triton.language as tl

    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}[dtype]


@functools.cache
def _programs(numels: tuple[int, ...], device: torch.device, span: int = BLOCK * ITERS,
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(numel per tensor, tensor per program, start per program) on `device`, for gradients of these sizes
    read in programs of `span` elements."""
    counts = torch.tensor([cdiv(n, span) for n in numels], dtype=torch.int64)
    tensor_of = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int32), counts)
    first = torch.cumsum(counts, 0) - counts  # each tensor's first program
    start_of = (torch.arange(len(tensor_of), dtype=torch.int64) - first.repeat_interleave(counts)) * span
    return (torch.tensor(numels, dtype=torch.int64).to(device), tensor_of.to(device), start_of.to(device))


def _addresses(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The gradients' addresses on `device`, copied without making the host wait for the device."""
    host = torch.tensor([g.data_ptr() for g in grads], dtype=torch.int64)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)  # torch keeps the pinned buffer until the copy ran


def usable(grads: list[torch.Tensor]) -> bool:
    """Whether the kernel takes these gradients: plain contiguous tensors on one device it runs on."""
    return (bool(grads) and _kernel() is not None and len({g.device for g in grads}) == 1
            and all(not isinstance(g, DTensor) and runs_on(g) and g.is_contiguous() and g.dtype in DTYPES
                    for g in grads))


def total_norm(grads: list[torch.Tensor], *, block: int = BLOCK, iters: int = ITERS, warps: int = WARPS,
               ) -> torch.Tensor:
    """The L2 norm of all of `grads` together, a 0-dim fp32 tensor on their device (inf or nan if any
    gradient holds one). No host synchronisation. `block`, `iters` and `warps` size the programs."""
    grads = [g for g in grads if g.numel()]
    if not usable(grads):
        if not grads:
            return torch.zeros((), dtype=torch.float32)
        return torch.nn.utils.get_total_norm(grads).float()
    device = grads[0].device
    squares = []
    for dtype in DTYPES:
        group = [g for g in grads if g.dtype == dtype]
        if not group:
            continue
        numels, tensor_of, start_of = _programs(tuple(g.numel() for g in group), device, block * iters)
        out = torch.empty(len(tensor_of), dtype=torch.float32, device=device)
        _kernel()[(len(tensor_of),)](_addresses(group, device), numels, tensor_of, start_of, out,
                                     BLOCK=block, ITERS=iters, DTYPE=_triton_dtype(dtype), num_warps=warps)
        squares.append(out.sum())
    return torch.stack(squares).sum().sqrt()
