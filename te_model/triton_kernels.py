"""Triton kernels: built on first use where Triton imports, and the tensors they run on.

A kernel module hands `lazy_kernel` a function that defines its `@triton.jit` kernel. The kernel is
made on the first call and kept; the call returns None where Triton cannot be imported. So importing a
kernel module never needs Triton. `runs_on` says whether a kernel can take a tensor: a CUDA tensor, or
any tensor under `TRITON_INTERPRET=1` (Triton's interpreter, which the CPU tests use).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch


def lazy_kernel(build: Callable) -> Callable:
    """A function returning `build(triton, tl)`, made on its first call, or None without Triton."""
    @functools.cache
    def kernel():
        try:
            import triton
            import triton.language as tl
        except ImportError:
            return None
        return build(triton, tl)

    return kernel


def cdiv(a: int, b: int) -> int:
    """How many programs of `b` elements cover `a`: a launch grid's size."""
    return -(-a // b)


def interpreted() -> bool:
    """Whether Triton's kernels run in its interpreter (`TRITON_INTERPRET=1`, read when Triton is imported)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def runs_on(tensor: torch.Tensor) -> bool:
    """Whether a Triton kernel can run on `tensor`: on a GPU, or on any device under the interpreter."""
    return tensor.is_cuda or interpreted()
