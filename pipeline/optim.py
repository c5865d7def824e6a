"""AdamW whose update runs at the memory's speed on a GPU: one Triton kernel per parameter.

The update is memory-bound: per parameter it reads the weight, its gradient and both moments and writes
the weight and the moments back, 14 bytes in bf16. torch's fused AdamW moves those bytes at about half an
H200's bandwidth (2.3 TB/s measured: 16.7 ms a step for 2.8B bf16 parameters, docs/performance.md): it
cuts the parameter list into launches of at most 320 blocks of 65,536 elements, a few waves each, with a
tail between launches. Here each parameter of a million elements or more is one launch over its whole
length, 4,096 elements a program, so a 500M-element embedding streams as one grid; smaller ones (norm
weights) still go to torch's fused kernel, several to a launch.

`AdamW` is `torch.optim.AdamW(fused=True)` with that kernel in its place where it applies (CUDA tensors,
or any under `TRITON_INTERPRET=1`; bf16, fp16 or fp32; no amsgrad, maximize or grad scaling) and torch's
own fused kernel elsewhere (CPU). Same state (`step` per parameter as a float32 tensor on the parameter's
device, `exp_avg`, `exp_avg_sq` in its dtype), so checkpoints load either way, and the same `found_inf`:
set as an attribute (as a GradScaler or `pipeline.train.Steps` does), a non-zero value skips the update
on the device and leaves `step` where it was.

The math is torch's, in fp32 (torch's kernel mixes in fp64 scalars): decoupled weight decay
`p -= lr * wd * p`, then `m = b1 m + (1 - b1) g`, `v = b2 v + (1 - b2) g^2`,
`p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)`; the result is rounded once to the
parameter's dtype. FSDP2's sharded parameters (DTensors) are updated shard by shard.
"""

from __future__ import annotations

import torch
from torch.optim.adamw import adamw as torch_fused_adamw  # the functional form of torch.optim.AdamW

from te_model.triton_kernels import lazy_kernel, runs_on

BLOCK = 4096  # elements per program: 16 per thread at 8 warps
# Smaller parameters (norm weights) go to torch's fused kernel, several to a launch: one launch each would
# cost the host more than the update costs the GPU.
SMALL = 1 << 20
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _build(triton, tl):
    @triton.jit
    def adamw_update(p_ptr, g_ptr, m_ptr, v_ptr, n, corrections_ptr, index, found_inf_ptr, lr, weight_decay,
                     beta1, beta2, eps, HAS_FOUND_INF: tl.constexpr, BLOCK: tl.constexpr):
        if HAS_FOUND_INF:
            if tl.load(found_inf_ptr) != 0:
                return
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        p = tl.load(p_ptr + offsets, mask=mask).to(tl.float32)
        g = tl.load(g_ptr + offsets, mask=mask).to(tl.float32)
        m = tl.load(m_ptr + offsets, mask=mask).to(tl.float32)
        v = tl.load(v_ptr + offsets, mask=mask).to(tl.float32)
        bias1 = tl.load(corrections_ptr + 2 * index)  # 1 - beta1^step
        bias2_sqrt = tl.load(corrections_ptr + 2 * index + 1)  # sqrt(1 - beta2^step)
        p = p - lr * weight_decay * p
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        p = p - (lr / bias1) * m / (tl.sqrt(v) / bias2_sqrt + eps)
        tl.store(p_ptr + offsets, p.to(p_ptr.dtype.element_ty), mask=mask)
        tl.store(m_ptr + offsets, m.to(m_ptr.dtype.element_ty), mask=mask)
        tl.store(v_ptr + offsets, v.to(v_ptr.dtype.element_ty), mask=mask)

    return adamw_update


_triton_kernel = lazy_kernel(_build)  # the kernel, compiled on first use, or None without Triton


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (which shares its storage), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


class AdamW(torch.optim.AdamW):
    """`torch.optim.AdamW(fused=True)`, its update one Triton kernel per parameter where that applies."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, triton_min_numel: int = SMALL):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=True)
        self.triton_min_numel = triton_min_numel  # smaller parameters: torch's fused kernel

    def triton_applies(self) -> bool:
        """Whether `step` runs the Triton kernel for the parameters that have gradients now."""
        if _triton_kernel() is None or getattr(self, "grad_scale", None) is not None:
            return False
        for group in self.param_groups:
            if group["amsgrad"] or group["maximize"] or group["differentiable"]:
                return False
            for p in group["params"]:
                if p.grad is None:
                    continue
                local, grad = _local(p), _local(p.grad)
                if not (runs_on(local) and local.dtype in DTYPES and grad.dtype == local.dtype
                        and local.is_contiguous() and grad.is_contiguous() and not grad.is_sparse):
                    return False
        return True

    @torch.no_grad()
    def step(self, closure=None):
        if not self.triton_applies():
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        found_inf = getattr(self, "found_inf", None)
        kernel = _triton_kernel()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            beta1, beta2 = group["betas"]
            lr, weight_decay, eps = float(group["lr"]), float(group["weight_decay"]), float(group["eps"])
            for p in params:
                state = self.state[p]
                if not state:  # the layout torch's fused AdamW makes: checkpoints load either way
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            small = [p for p in params if p.numel() < self.triton_min_numel]
            if small:
                states = [self.state[p] for p in small]
                torch_fused_adamw(
                    small, [p.grad for p in small], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                    [], [s["step"] for s in states], fused=True, found_inf=found_inf, amsgrad=False, beta1=beta1,
                    beta2=beta2, lr=lr, weight_decay=weight_decay, eps=eps, maximize=False)
            params = [p for p in params if p.numel() >= self.triton_min_numel]
            if not params:
                continue
            steps = [self.state[p]["step"] for p in params]
            torch._foreach_add_(steps, 1.0)
            step = torch.stack(steps)
            # (1 - beta1^t, sqrt(1 - beta2^t)) per parameter, made on the device: the host never reads a step
            corrections = torch.stack([1 - torch.pow(beta1, step), (1 - torch.pow(beta2, step)).sqrt()], dim=1)
            for i, p in enumerate(params):
                state = self.state[p]
                local = _local(p)
                n = local.numel()
                if n == 0:
                    continue
                kernel[(-(-n // BLOCK),)](
                    local, _local(p.grad), _local(state["exp_avg"]), _local(state["exp_avg_sq"]), n,
                    corrections, i, found_inf if found_inf is not None else corrections, lr, weight_decay,
                    float(beta1), float(beta2), eps, HAS_FOUND_INF=found_inf is not None, BLOCK=BLOCK, num_warps=8)
            if found_inf is not None:  # a skipped update leaves the count where it was, as torch's does
                torch._foreach_sub_(steps, [found_inf] * len(steps))
        return loss
