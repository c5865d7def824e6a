"""AdamW whose update is one Triton kernel per large parameter, with master-weight options for bf16 models.

The update is memory-bound: 14 bytes a bf16 parameter. torch's fused AdamW cuts big parameters into
many small launches; here each parameter of a million elements or more is one launch over its whole
length. Smaller ones (norm weights) still go to torch's fused kernel, several to a launch.
A bf16 weight moves in steps too coarse for most fine-tuning updates, so `master_weights` says how
bf16 parameters keep them (`AdamW` lists the options). `moments_fp8` keeps the moments of weight
matrices in a byte each instead of two. The kernel is `adamw_kernel.py`; on CPU, `adamw_reference` runs
its math in plain torch, so a CPU run trains as a GPU run does. Speed: docs/performance.md (Optimizer).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import torch
from torch.optim.adamw import adamw as torch_fused_adamw  # the functional form of torch.optim.AdamW

from te_model.fp8 import FP8Target
from te_model.triton_kernels import cdiv, interpreted, lazy_kernel, runs_on

if TYPE_CHECKING:
    from pipeline.config import TrainConfig

BLOCK, WARPS = 4096, 8  # elements and warps per program: 16 elements a thread
# With FP8 moments the update is bound by its arithmetic, not memory, and ran faster in smaller programs
FP8_BLOCK, FP8_WARPS = 1024, 4
# Smaller parameters (norm weights) go to torch's fused kernel, several to a launch: one launch each would
# cost the host more than the update costs the GPU.
SMALL = 1 << 20
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MASTER_WEIGHTS = ("fp32", "bf16_sr", "bf16_kahan", "bf16_kahan8", "bf16")
KERNEL_MODE = {"bf16": 0, "fp32": 1, "bf16_sr": 2, "bf16_kahan": 3, "bf16_kahan8": 4}
# optimizer state each option adds
EXTRA_STATE = {"fp32": "master", "bf16_kahan": "compensation", "bf16_kahan8": "compensation_codes"}
# FP8 moments (`moments_fp8`): E4M3 codes, one power-of-two scale per QBLOCK consecutive elements of a row
QBLOCK = 256
E4M3_MAX = 448.0
E4M3_MIN_NORMAL = 2.0**-6  # below it E4M3 steps by its smallest subnormal, 2^-9
FP8_STATE = {  # each moment's state in the parameter's dtype -> its (codes, scales) state
    "exp_avg": ("exp_avg_fp8", "exp_avg_scale"),
    "exp_avg_sq": ("exp_avg_sq_root_fp8", "exp_avg_sq_root_scale"),
}


def _build(triton, tl):
    from . import adamw_kernel  # imports Triton, which `lazy_kernel` has found by now

    return adamw_kernel.adamw_update


_triton_kernel = lazy_kernel(_build)  # the kernel, compiled on first use, or None without Triton


# ---------------------------------------------------------------------------------------------------
# the same math in plain torch
# ---------------------------------------------------------------------------------------------------
_MASK32 = 0xFFFFFFFF


def _fmix32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finalizer on uint32 values held in int64: a bijection whose every output bit
    depends on every input bit."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _MASK32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _MASK32
    return x ^ (x >> 16)


def element_hash(step: torch.Tensor, stream: int, numel: int) -> torch.Tensor:
    """The kernel's random bits, as it draws them: for element i of a parameter at optimizer step `step` (its
    count after the step) in `stream`, h = fmix32(i ^ fmix32(step * 0x9E3779B1 + stream)), uint32 in int64.
    Distinct elements of one step hash distinct inputs; a cheap hash, a few integer operations an element,
    where a counter-based generator such as Philox spends about a hundred."""
    key = _fmix32(((step.to(torch.int64) * 0x9E3779B1) + stream) & _MASK32)
    return _fmix32(torch.arange(numel, device=step.device, dtype=torch.int64) ^ key)


def moment_bits(step: torch.Tensor, stream: int, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The random bits FP8 moments are rounded with: m's rounding takes the low 16 bits of `element_hash`,
    sqrt(v)'s its high 16 (each as the top of the 20 bits `quantize_moment` reads)."""
    return _moment_bits(element_hash(step, stream, numel))


def rounding_bits(step: torch.Tensor, stream: int, numel: int) -> torch.Tensor:
    """The 16 random bits `bf16_sr` rounds its weights with and `bf16_kahan8` its codes: the top half of
    `element_hash` times an odd constant (modulo 2^32), which mixes both halves the moments take their bits
    from, in two operations."""
    return _rounding_bits(element_hash(step, stream, numel))


def _moment_bits(hashed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (hashed & 0xFFFF) << 4, (hashed >> 16) << 4


def _rounding_bits(hashed: torch.Tensor) -> torch.Tensor:
    return ((hashed * 0x9E3779B1) & _MASK32) >> 16


def _compensation_step(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a code's value, its inverse) for bf16 values `x`: 1/256 of the bf16 step at |x|, both powers of two.
    With x's biased exponent e, the bf16 step is 2^(e - 127 - 7) and a code's value 2^(e - 142): biased, e - 15;
    its inverse's, 269 - e. e is held at 16 or more, so both stay normal fp32 numbers (weights under 2^-111
    share the step of 2^-111)."""
    exponent = ((_as_bits(x.float()) >> 23) & 0xFF).clamp(min=16)
    return _as_float((exponent - 15) << 23), _as_float((269 - exponent) << 23)


def encode_compensation(lost: torch.Tensor, stored: torch.Tensor, random_bits: torch.Tensor) -> torch.Tensor:
    """fp32 `lost` (what rounding the weight to bf16 `stored` left out, at most half its bf16 step) as int8
    codes in steps of 1/256 of that bf16 step: lost / step, rounded stochastically (unbiased) with the low 16
    bits of `random_bits`, held in [-128, 127]. The Triton kernel computes the same codes."""
    y = lost * _compensation_step(stored)[1]
    y = torch.where(y == y, y, 0.0)
    codes = torch.floor(y + (random_bits & 0xFFFF).to(torch.float32) * (1.0 / 65536.0))
    return codes.clamp(-128, 127).to(torch.int8)


def decode_compensation(codes: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """fp32 values of `encode_compensation`'s codes, made against the bf16 `weights` they belong to."""
    return codes.float() * _compensation_step(weights)[0]


def round_stochastic(x: torch.Tensor, random_bits: torch.Tensor) -> torch.Tensor:
    """fp32 `x` to bf16, rounded up in magnitude with probability (what truncation drops) / 2^16: the low 16
    bits of `random_bits` are added below the bf16 mantissa and the sum truncated."""
    bits = ((_as_bits(x) + (random_bits & 0xFFFF)) >> 16 << 16) & _MASK32
    return _as_float(bits).to(torch.bfloat16)


def _as_bits(x: torch.Tensor) -> torch.Tensor:
    """fp32 values' bit patterns as uint32 held in int64."""
    return x.view(torch.int32).to(torch.int64) & _MASK32


def _as_float(bits: torch.Tensor) -> torch.Tensor:
    """uint32 bit patterns held in int64 as the fp32 values they encode."""
    return (bits - (bits >> 31 << 32)).to(torch.int32).view(torch.float32)


def quantize_moment(x: torch.Tensor, random_bits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 `x` (its last dimension a multiple of QBLOCK) as (E4M3 codes, fp32 scales of shape
    `x.shape[:-1] + (x.shape[-1] // QBLOCK,)`), codes times their block's scale approximating `x`.

    Each block's scale is the power of two at or above its largest magnitude / 448, so dividing by it is
    exact. Each code is rounded stochastically (unbiased) with the low 20 bits of `random_bits` (uint32 in
    int64, `x`'s shape): an EMA whose steps are smaller than a code's spacing still moves on average, where
    rounding to nearest would hold it in place. The Triton kernel computes the same codes."""
    blocks = x.float().reshape(*x.shape[:-1], x.shape[-1] // QBLOCK, QBLOCK)
    top = _as_bits(blocks.abs().amax(dim=-1) * (1.0 / E4M3_MAX))
    exponent = (top >> 23) + ((top & 0x7FFFFF) != 0).to(torch.int64)
    scale = _as_float(exponent << 23)
    inverse = torch.where(exponent > 0, _as_float((254 - exponent).clamp(min=0) << 23), 0.0)
    y = (blocks * inverse[..., None]).clamp(-E4M3_MAX, E4M3_MAX).reshape(x.shape)
    fraction = random_bits & 0xFFFFF
    normal = _as_float(((_as_bits(y) + fraction) >> 20 << 20) & _MASK32)
    subnormal = torch.floor(y * 512.0 + fraction.to(torch.float32) * (1.0 / 1048576.0)) * (1.0 / 512.0)
    codes = torch.where(y.abs() < E4M3_MIN_NORMAL, subnormal, normal)
    return codes.to(torch.float8_e4m3fn), scale


def dequantize_moment(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp32 values of `quantize_moment`'s (codes, scales)."""
    blocks = codes.float().reshape(*codes.shape[:-1], codes.shape[-1] // QBLOCK, QBLOCK)
    return (blocks * scale[..., None]).reshape(codes.shape)


class FP8Weights(Protocol):
    """The FP8 weights an update writes (`te_model.fp8_weights.FP8WeightsFromUpdate`)."""

    def covers(self, p: torch.Tensor) -> bool:
        """Whether `p` has an FP8 copy the update must keep current (once it exists)."""

    def target(self, p: torch.Tensor) -> FP8Target | None:
        """Where `p`'s update writes its FP8 copy now; None while there is none to write."""

    def written(self, p: torch.Tensor) -> None:
        """`p`'s update, and its FP8 copy, are queued."""

    def drop(self) -> None:
        """Forget every FP8 copy (the weights were loaded from elsewhere): the next forward makes them again."""


def cast_fp8_weight(w: torch.Tensor, target: FP8Target, found_inf: torch.Tensor | None = None) -> None:
    """Transformer Engine's delayed-scaling cast of weight `w` into `target`, as the kernel's FP8_WEIGHT does it:
    E4M3 codes of w * scale (saturated at +-448, rounded to nearest even), max|w| folded into amax, scale_inv =
    1 / scale. A non-zero `found_inf` leaves all three as they were."""
    w32 = w.detach().float().reshape(-1)
    scale = target.scale.float().reshape(())
    codes = (w32 * scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    amax = torch.maximum(target.amax, w32.abs().amax().reshape(target.amax.shape))
    scale_inv = (1.0 / scale).reshape(target.scale_inv.shape)
    if found_inf is not None:
        skip = found_inf != 0
        codes = torch.where(skip, target.data.reshape(-1).float(), codes.float()).to(torch.float8_e4m3fn)
        amax, scale_inv = torch.where(skip, target.amax, amax), torch.where(skip, target.scale_inv, scale_inv)
    target.data.view(-1).copy_(codes)
    target.amax.copy_(amax)
    target.scale_inv.copy_(scale_inv)


def adamw_reference(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, extra: torch.Tensor | None,
                    step: torch.Tensor, stream: int, found_inf: torch.Tensor | None, *, mode: str, lr: float,
                    weight_decay: float, beta1: float, beta2: float, eps: float,
                    factor: torch.Tensor | None = None,
                    scales: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """One update of one parameter (local tensors), in place: the Triton kernel's math in plain torch.
    `step` is the parameter's count after this step; a non-zero `found_inf` leaves everything as it was;
    `factor` (fp32, 0-dim) multiplies the gradient. `scales`: FP8 moments, `m` and `v` then holding the
    E4M3 codes of m and of sqrt(v), `scales` their blocks' scales (`quantize_moment`)."""
    f32 = torch.float32
    old = extra if mode == "fp32" else p.float()
    g = g.float() if factor is None else g.float() * factor
    if scales is None:
        m_old, v_old = m.float(), v.float()
    else:
        m_old, root = dequantize_moment(m, scales[0]), dequantize_moment(v, scales[1])
        v_old = root * root
    m32 = beta1 * m_old + (1 - beta1) * g
    v32 = beta2 * v_old + (1 - beta2) * g * g
    root = v32.sqrt()
    bias1, bias2_sqrt = 1 - torch.pow(beta1, step), (1 - torch.pow(beta2, step)).sqrt()
    delta = -(torch.tensor(lr, dtype=f32) * weight_decay) * old \
        - (lr / bias1 * bias2_sqrt) * m32 / (root + eps * bias2_sqrt)
    if mode == "bf16_kahan":
        delta = delta + extra.float()
    elif mode == "bf16_kahan8":
        delta = delta + decode_compensation(extra, old)
    new = old + delta
    # the random bits of stochastic rounding, FP8 moments and one-byte compensation codes, hashed as the kernel does
    hashed = element_hash(step, stream, new.numel()).view(new.shape) \
        if scales is not None or mode in ("bf16_sr", "bf16_kahan8") else None
    stored = round_stochastic(new, _rounding_bits(hashed)) if mode == "bf16_sr" else new.to(p.dtype)
    skip = None if found_inf is None else found_inf != 0
    keep = (lambda new_value, target: torch.where(skip, target, new_value)) if skip is not None else (lambda x, _: x)
    if mode == "fp32":
        extra.copy_(keep(new, extra))
    elif mode == "bf16_kahan":
        extra.copy_(keep((delta - (stored.float() - old)).to(extra.dtype), extra))
    if mode == "bf16_kahan8":
        codes = encode_compensation(delta - (stored.float() - old), stored.float(), _rounding_bits(hashed))
        extra.copy_(keep(codes, extra))
    p.copy_(keep(stored, p))
    if scales is None:
        m.copy_(keep(m32.to(m.dtype), m))
        v.copy_(keep(v32.to(v.dtype), v))
        return
    m_bits, v_bits = _moment_bits(hashed)
    for codes, scale, value, bits in ((m, scales[0], m32, m_bits), (v, scales[1], root, v_bits)):
        new_codes, new_scale = quantize_moment(value, bits)
        codes.copy_(new_codes if skip is None else torch.where(skip, codes.float(), new_codes.float()))
        scale.copy_(keep(new_scale, scale))


# ---------------------------------------------------------------------------------------------------
# the optimizer
# ---------------------------------------------------------------------------------------------------
def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (which shares its storage), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def _shard_index(p: torch.Tensor) -> int:
    """Which shard of a DTensor this process holds (its mesh coordinate, flattened); 0 for a plain tensor."""
    if not hasattr(p, "device_mesh"):
        return 0
    mesh, index = p.device_mesh, 0
    for coordinate, size in zip(mesh.get_coordinate() or [], mesh.shape):
        index = index * size + coordinate
    return index


class AdamW(torch.optim.AdamW):
    """`torch.optim.AdamW(fused=True)`, its update one Triton kernel per parameter where that applies.

    The kernel applies to CUDA tensors (or any under `TRITON_INTERPRET=1`) in bf16, fp16 or fp32, without
    amsgrad, maximize or grad scaling. Elsewhere (CPU) `bf16` runs torch's own fused kernel, and the other
    options run `adamw_reference`, its random bits included.

    Master weights (`master_weights`, the config's `train.master_weights`). A bf16 weight near 0.02 moves
    only in steps of 2^-13. An update rounded to nearest vanishes when it is under half of that, which
    at fine-tuning learning rates is most updates. So for bf16 parameters:
    - `fp32`: an fp32 master copy (state `master`; for a DTensor, of the local shard). The update is
      computed from it and written to it, and to the bf16 parameter rounded to nearest, in one kernel.
      4 more bytes a parameter.
    - `bf16_sr`: the fp32 result is rounded stochastically to bf16: unbiased, no more memory. The random
      bits are hashed from the element, the step count and the parameter's index (`rounding_bits`). Both
      are on the device, so the kernel never waits for the host, and a resumed run draws the same bits.
    - `bf16_kahan`: a bf16 compensation buffer (state `compensation`) carries what each rounding lost
      into the next step's update (Kahan summation). 2 more bytes a parameter.
    - `bf16_kahan8`: the same compensation in one byte a parameter (state `compensation_codes`, int8):
      what rounding lost, which is at most half the weight's bf16 step, in steps of 1/256 of that bf16
      step, rounded stochastically (`encode_compensation`, bits from `rounding_bits`). Its finest step
      is what bounds `bf16_kahan` too: a bf16 compensation near half a weight step keeps 8 bits.
    - `bf16`: rounded to nearest, nothing kept.
    fp32 parameters are their own master: every option updates them as `bf16` does. Moments are kept in
    the parameter's dtype in every option, or, with `moments_fp8`, as FP8 (below).

    FP8 moments (`moments_fp8`, the config's `train.moments_fp8`): each matrix whose rows are whole
    blocks of QBLOCK elements keeps m and sqrt(v) as E4M3 codes with one fp32 scale a block
    (`quantize_moment`), 1 byte a moment instead of 2, rounded stochastically with hashed bits
    (`moment_bits`); the update computes in fp32 from the decoded moments as before. State `exp_avg_fp8`,
    `exp_avg_scale`, `exp_avg_sq_root_fp8`, `exp_avg_sq_root_scale` in place of `exp_avg`, `exp_avg_sq`; a
    checkpoint of either kind loads into either (the moments are converted). Norm weights and other vectors
    keep theirs in their dtype.

    FP8 copies of weights (`fp8_weights`, set as an attribute: an `FP8Weights`, the config's
    `train.fp8_weights_from_update`): for each parameter it covers whose `target` is not None, the update also
    writes the new weight's E4M3 codes under the target's per-tensor scale, folds the weight's largest
    magnitude into the target's amax and writes 1 / scale (Transformer Engine's delayed-scaling cast, done as
    the weight is written; `cast_fp8_weight` is the same in torch), then calls `written`. Covered parameters
    never go to torch's fused kernel, which writes no copy.

    State is torch's (`step` per parameter as a float32 tensor on its device; `exp_avg`, `exp_avg_sq` in
    its dtype) plus `master` or `compensation`, so checkpoints load either way. `found_inf` works as in
    torch: set as an attribute (as a GradScaler or `Steps` does), a non-zero value skips the update on
    the device and leaves `step` where it was. `grad_factor`, set the same way (`clip_in_update`: a 0-dim
    fp32 tensor on the parameters' device), multiplies every gradient as the update reads it: gradient
    clipping without a pass over the gradients of its own. The gradients of parameters that the Triton
    kernel (or `adamw_reference`) updates stay as they were; those that go to torch's fused kernel are
    scaled in place first.

    The math is torch's, in fp32 (torch's kernel mixes in fp64 scalars):

        p -= lr * wd * p                                  decoupled weight decay
        m = b1 m + (1 - b1) g ;  v = b2 v + (1 - b2) g^2
        p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

    FSDP2's sharded parameters (DTensors) are updated shard by shard.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, master_weights: str = "bf16", moments_fp8: bool = False,
                 triton_min_numel: int = SMALL):
        if master_weights not in MASTER_WEIGHTS:
            raise ValueError(f"master_weights={master_weights!r}: must be one of {', '.join(MASTER_WEIGHTS)}")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=True)
        self.master_weights = master_weights
        self.moments_fp8 = moments_fp8
        self.triton_min_numel = triton_min_numel  # smaller parameters: torch's fused kernel
        self.launched: Callable[[torch.Tensor], None] | None = None  # called as each update is queued
        self.fp8_weights: FP8Weights | None = None  # FP8 copies of weights the update writes too

    def keeps_updates(self, p: torch.Tensor) -> bool:
        """Whether `p` is updated through `master_weights` (bf16 parameters, an option other than `bf16`)."""
        return self.master_weights != "bf16" and p.dtype == torch.bfloat16

    def quantizes_moments(self, p: torch.Tensor) -> bool:
        """Whether `p` keeps FP8 moments: `moments_fp8` on, and `p` a matrix whose rows are whole blocks."""
        return (self.moments_fp8 and p.dim() >= 2 and p.shape[-1] % QBLOCK == 0 and p.dtype in DTYPES
                and _local(p).is_contiguous())

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

    def _init_state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state and self.quantizes_moments(p):
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            for codes, scale in FP8_STATE.values():
                state[codes] = torch.zeros_like(p, dtype=torch.float8_e4m3fn)
                state[scale] = _zeros_for_scales(p)
        elif not state:  # the layout torch's fused AdamW makes: checkpoints load either way
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        extra = EXTRA_STATE.get(self.master_weights) if self.keeps_updates(p) else None
        if extra == "master" and extra not in state:  # from the weights (also a checkpoint saved without one)
            state["master"] = p.detach().to(torch.float32, copy=True)
        elif extra == "compensation" and extra not in state:
            state["compensation"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        elif extra == "compensation_codes" and extra not in state:
            state["compensation_codes"] = torch.zeros_like(p, dtype=torch.int8)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        triton = self.triton_applies()
        factor = getattr(self, "grad_factor", None)
        if not triton and self.master_weights == "bf16" and not self.moments_fp8 and self.fp8_weights is None:
            if factor is not None:
                _scale_grads([p for group in self.param_groups for p in group["params"]], factor)
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        found_inf = getattr(self, "found_inf", None)
        # a parameter's place in the optimizer, and its shard's, key its random bits
        streams = {id(p): (_shard_index(p) << 16) + i
                   for i, p in enumerate(p for group in self.param_groups for p in group["params"])}
        # Every group's small parameters first (one fused launch each), then the rest in parameter order: so
        # the update reaches the model's blocks in the order a forward pass uses them (`UpdateOverlap`).
        rest_by_group = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                rest_by_group.append((group, self._step_small(group, params, triton, found_inf, factor)))
        for group, rest in rest_by_group:
            if rest:
                self._step_own(group, rest, triton, found_inf, factor, streams)
        return loss

    def _step_small(self, group: dict, params: list[torch.Tensor], triton: bool, found_inf: torch.Tensor | None,
                    factor: torch.Tensor | None) -> list[tuple[torch.Tensor, dict]]:
        """Updates the group's parameters that go to torch's fused kernel: those without master weights that are
        small (or all, without Triton). Returns the others, with their state."""
        beta1, beta2 = group["betas"]
        states = [self._init_state(p) for p in params]
        fused = [not (self.keeps_updates(p) or self.quantizes_moments(p) or self._writes_fp8(p))
                 and (not triton or p.numel() < self.triton_min_numel) for p in params]
        if any(fused):
            small = [(p, s) for p, s, f in zip(params, states, fused) if f]
            if factor is not None:
                _scale_grads([p for p, _ in small], factor)
            torch_fused_adamw(
                [p for p, _ in small], [p.grad for p, _ in small], [s["exp_avg"] for _, s in small],
                [s["exp_avg_sq"] for _, s in small], [], [s["step"] for _, s in small], fused=True,
                found_inf=found_inf, amsgrad=False, beta1=beta1, beta2=beta2, lr=float(group["lr"]),
                weight_decay=float(group["weight_decay"]), eps=float(group["eps"]), maximize=False)
            self._announce(p for p, _ in small)
        return [(p, s) for p, s, f in zip(params, states, fused) if not f]

    def _writes_fp8(self, p: torch.Tensor) -> bool:
        return self.fp8_weights is not None and self.fp8_weights.covers(p)

    def _fp8_target(self, p: torch.Tensor) -> FP8Target | None:
        target = self.fp8_weights.target(p) if self._writes_fp8(p) else None
        if target is not None and (target.data.numel() != _local(p).numel() or not target.data.is_contiguous()
                                   or target.data.dtype != torch.float8_e4m3fn):
            raise ValueError(f"the FP8 copy of a {tuple(p.shape)} parameter is {target.data.dtype} "
                             f"{tuple(target.data.shape)}: it must be contiguous float8_e4m3fn of as many elements")
        return target

    def _written(self, p: torch.Tensor, target: FP8Target | None) -> None:
        if target is not None:
            self.fp8_weights.written(p)

    def _announce(self, params) -> None:
        """Tells `launched` (when set) of each parameter whose update is now queued."""
        if self.launched is not None:
            for p in params:
                self.launched(p)

    def _step_own(self, group: dict, own: list[tuple[torch.Tensor, dict]], triton: bool,
                  found_inf: torch.Tensor | None, factor: torch.Tensor | None, streams: dict[int, int]) -> None:
        beta1, beta2 = group["betas"]
        lr, weight_decay, eps = float(group["lr"]), float(group["weight_decay"]), float(group["eps"])
        steps = [s["step"] for _, s in own]
        torch._foreach_add_(steps, 1.0)
        hyper = dict(lr=lr, weight_decay=weight_decay, beta1=float(beta1), beta2=float(beta2), eps=eps)
        if triton:
            self._launch(own, found_inf, factor, streams, hyper)
        else:
            for p, s in own:
                mode = self.master_weights if self.keeps_updates(p) else "bf16"
                extra = s.get(EXTRA_STATE.get(mode, ""))
                m, v, scales = _moments(s)
                adamw_reference(_local(p), _local(p.grad), m, v, None if extra is None else _local(extra), s["step"],
                                streams[id(p)], found_inf, mode=mode, factor=factor, scales=scales, **hyper)
                target = self._fp8_target(p)
                if target is not None:
                    cast_fp8_weight(_local(p), target, found_inf)
                self._written(p, target)
                self._announce([p])
        if found_inf is not None:  # a skipped update leaves the count where it was, as torch's does
            torch._foreach_sub_(steps, [found_inf] * len(steps))

    def _launch(self, own: list[tuple[torch.Tensor, dict]], found_inf: torch.Tensor | None,
                factor: torch.Tensor | None, streams: dict[int, int], hyper: dict) -> None:
        """One Triton launch per parameter."""
        kernel = _triton_kernel()
        by_hand = interpreted()  # the interpreter's FP8 conversion rounds otherwise than the GPU's
        step = torch.stack([s["step"] for _, s in own])
        # (1 - beta1^t, sqrt(1 - beta2^t), t) per parameter, made on the device: the host never reads a step
        corrections = torch.stack([1 - torch.pow(hyper["beta1"], step), (1 - torch.pow(hyper["beta2"], step)).sqrt(),
                                   step], dim=1).contiguous()
        for i, (p, state) in enumerate(own):
            local = _local(p)
            n = local.numel()
            mode = self.master_weights if self.keeps_updates(p) else "bf16"
            extra = state.get(EXTRA_STATE.get(mode, ""))
            m, v, scales = _moments(state)
            block, warps = (FP8_BLOCK, FP8_WARPS) if scales else (BLOCK, WARPS)
            target = self._fp8_target(p)
            if n:
                kernel[(cdiv(n, block),)](
                    local, _local(p.grad), m, v, local if extra is None else _local(extra),
                    *(scales or (corrections, corrections)), n, corrections, i, streams[id(p)],
                    found_inf if found_inf is not None else corrections,
                    factor if factor is not None else corrections, *(target or (corrections,) * 4), hyper["lr"],
                    hyper["weight_decay"], hyper["beta1"], hyper["beta2"], hyper["eps"], MODE=KERNEL_MODE[mode],
                    HAS_FOUND_INF=found_inf is not None, HAS_FACTOR=factor is not None,
                    BF16=local.dtype == torch.bfloat16, MOMENTS_FP8=scales is not None,
                    FP8_WEIGHT=target is not None, BLOCK=block, QBLOCK=QBLOCK, INTERPRETED=by_hand,
                    num_warps=warps)
            self._written(p, target)
            self._announce([p])

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's, keeping `master` in fp32 and FP8 moments and compensation codes as they are (torch casts
        every floating state to the parameter's dtype), dropping extra state this `master_weights` option does
        not keep, converting a Kahan compensation saved by `bf16_kahan` or `bf16_kahan8` to the other's, and
        converting moments saved with or without `moments_fp8` to what this optimizer keeps."""
        wanted = set(EXTRA_STATE.values()) & {EXTRA_STATE.get(self.master_weights)}
        own = set(EXTRA_STATE.values()) | {key for pair in FP8_STATE.values() for key in pair}
        saved = {index: {k: v for k, v in fields.items() if k in own} for index, fields in state_dict["state"].items()}
        state = {index: {k: v for k, v in fields.items() if k not in own}
                 for index, fields in state_dict["state"].items()}
        super().load_state_dict({**state_dict, "state": state})
        params = [p for group in self.param_groups for p in group["params"]]
        for index, fields in saved.items():
            p = params[index]
            for key, value in fields.items():
                if key in wanted and self.keeps_updates(p):
                    dtype = {"master": torch.float32, "compensation_codes": torch.int8}.get(key, p.dtype)
                    self.state[p][key] = value.to(device=p.device, dtype=dtype)
                elif key not in EXTRA_STATE.values():
                    self.state[p][key] = value.to(device=p.device)
            if self.keeps_updates(p):
                _convert_compensation(self.state[p], fields, EXTRA_STATE.get(self.master_weights), p)
        for p in params:
            if p in self.state:
                _convert_moments(self.state[p], self.quantizes_moments(p), p)


def _zeros_for_scales(p: torch.Tensor) -> torch.Tensor:
    """fp32 zeros of shape `p.shape[:-1] + (p.shape[-1] // QBLOCK,)`, laid out over devices as `p` is (a
    DTensor sharded by rows, as FSDP2 shards, has its scales sharded by the same rows)."""
    local = _local(p)
    zeros = torch.zeros((*local.shape[:-1], local.shape[-1] // QBLOCK), dtype=torch.float32, device=local.device)
    if local is p:
        return zeros
    from torch.distributed.tensor import DTensor

    shape = (*p.shape[:-1], p.shape[-1] // QBLOCK)
    return DTensor.from_local(zeros, p.device_mesh, p.placements, shape=shape,
                              stride=torch.empty(shape, device="meta").stride())


def _moments(state: dict) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """(m, v, scales) of a parameter's state as local tensors: scales None for moments in the parameter's dtype,
    else m and v are the E4M3 codes of m and sqrt(v) and scales their blocks' scales."""
    if "exp_avg" in state:
        return _local(state["exp_avg"]), _local(state["exp_avg_sq"]), None
    (m, m_scale), (v, v_scale) = ((_local(state[c]), _local(state[s])) for c, s in FP8_STATE.values())
    return m, v, (m_scale, v_scale)


def _convert_moments(state: dict, fp8: bool, p: torch.Tensor) -> None:
    """Moments loaded from a checkpoint of the other kind, converted in place to what `state` should hold.
    Codes are rounded to nearest here (the random bits' middle), as nothing draws bits outside a step."""
    if fp8 and "exp_avg" in state:
        m, v = (_local(state.pop(key)).float() for key in ("exp_avg", "exp_avg_sq"))
        half = torch.full(m.shape, 0x80000, dtype=torch.int64, device=m.device)
        for (codes, scale), value in zip(FP8_STATE.values(), (m, v.sqrt())):
            state[codes], state[scale] = torch.zeros_like(p, dtype=torch.float8_e4m3fn), _zeros_for_scales(p)
            new_codes, new_scale = quantize_moment(value, half)
            _local(state[codes]).copy_(new_codes)
            _local(state[scale]).copy_(new_scale)
    elif not fp8 and "exp_avg" not in state and FP8_STATE["exp_avg"][0] in state:
        m, v, (m_scale, v_scale) = _moments(state)
        values = (dequantize_moment(m, m_scale), dequantize_moment(v, v_scale).square())
        for key, (codes, scale), value in zip(("exp_avg", "exp_avg_sq"), FP8_STATE.values(), values):
            state[key] = torch.zeros_like(p)
            _local(state[key]).copy_(value)
            del state[codes], state[scale]


def _convert_compensation(state: dict, saved: dict, wanted: str | None, p: torch.Tensor) -> None:
    """A Kahan compensation saved by the other of `bf16_kahan` (bf16 values) and `bf16_kahan8` (int8 codes),
    converted into `state` as the one `wanted`. Codes are rounded to nearest here (the random bits' middle),
    as nothing draws bits outside a step."""
    if wanted == "compensation_codes" and "compensation" in saved and wanted not in state:
        lost, weights = _local(saved["compensation"]).to(_local(p).device).float(), _local(p).float()
        half = torch.full(lost.shape, 0x8000, dtype=torch.int64, device=lost.device)
        state[wanted] = torch.zeros_like(p, dtype=torch.int8)
        _local(state[wanted]).copy_(encode_compensation(lost, weights, half))
    elif wanted == "compensation" and "compensation_codes" in saved and wanted not in state:
        codes = _local(saved["compensation_codes"]).to(_local(p).device)
        state[wanted] = torch.zeros_like(p)
        _local(state[wanted]).copy_(decode_compensation(codes, _local(p)))


def _scale_grads(params: list[torch.Tensor], factor: torch.Tensor) -> None:
    grads = [_local(p.grad) for p in params if p.grad is not None]  # a shard shares its DTensor's storage
    if grads:
        torch._foreach_mul_(grads, factor)


def clip_factor(grad_norm: torch.Tensor, max_norm: float) -> torch.Tensor | None:
    """What torch's `clip_grad_norm_` multiplies the gradients by, as an fp32 tensor on `grad_norm`'s device
    (`AdamW.grad_factor`): min(1, max_norm / (grad_norm + 1e-6)). None for `max_norm` 0, no clipping."""
    if not max_norm:
        return None
    return (max_norm / (grad_norm.float() + 1e-6)).clamp(max=1.0)


def clip_in_update(optimizer: AdamW, params, max_norm: float,
                   reduce: Callable[[torch.Tensor], torch.Tensor] = lambda norm: norm,
                   norm_of: Callable[[list[torch.Tensor]], torch.Tensor] = torch.nn.utils.get_total_norm,
                   ) -> torch.Tensor:
    """torch's `clip_grad_norm_`, with the scaling left to `optimizer`'s next step: the total norm of the
    gradients of `params` (through `reduce`: a sharded norm made whole), returned, and its clipping factor
    set as `optimizer.grad_factor` (None for `max_norm` 0). The gradients are not touched here. `norm_of`
    finds the norm: torch's `get_total_norm`, or `grad_norm.total_norm` (the benchmarks' `_kernel_norm`)."""
    norm = reduce(norm_of([p.grad for p in params if p.grad is not None]))
    optimizer.grad_factor = clip_factor(norm, max_norm)
    return norm


# ---------------------------------------------------------------------------------------------------
# the optimizer and learning-rate schedule a run trains with
# ---------------------------------------------------------------------------------------------------
def make_optimizer(model: torch.nn.Module, train: TrainConfig) -> AdamW:
    """AdamW with weight decay on 2-D weights (matmuls, embeddings) only, not on norms.

    The fused update takes `found_inf`, which lets a non-finite step skip its update on the device
    without the host looking (`pipeline.train.loop`). With data parallelism each replica runs the whole
    update every step, so its cost does not shrink as workers are added. FSDP2's sharded parameters
    (DTensors) are updated shard by shard. `train.master_weights` says how bf16 parameters keep small
    updates; the optimizer holds that state per parameter or per local shard.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": train.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return AdamW([g for g in groups if g["params"]], lr=train.lr, betas=(0.9, 0.95),
                 master_weights=train.master_weights, moments_fp8=train.moments_fp8)


def lr_multiplier(step: int, train: TrainConfig) -> float:
    """Factor on `train.lr` for optimizer step `step` (0-based): linear warmup, then cosine decay."""
    if step < train.warmup_steps:
        return (step + 1) / train.warmup_steps
    progress = min(1.0, (step - train.warmup_steps) / max(1, train.max_steps - train.warmup_steps))
    return train.min_lr_ratio + (1 - train.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    # A plain function (not a partial): LambdaLR then saves no state for it, and its state stays JSON.
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, train))
