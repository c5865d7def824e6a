"""FP8 training with Transformer Engine: recipes by name, the autocast, and proof that it is on.

In FP8 training every TE linear layer casts its GEMM inputs (activations, weights, and in backward the
gradients) to 8-bit floats with a per-tensor or per-block scale. The products accumulate in higher
precision. Weights, optimizer state and everything outside TE's modules stay in bf16/fp32. The recipe
(`make_recipe`) decides where the scales come from. `fp8_autocast` wraps the forward pass only; TE
runs the matching backward itself. `fp8_evidence` reads TE's scaling state, so a run can show FP8 ran.
"""

import contextlib
from typing import NamedTuple

import torch

RECIPES = ("delayed", "current", "block", "mxfp8")
FP8_TOKEN_MULTIPLE = 16


class FP8UnsupportedError(RuntimeError):
    """The recipe is unknown or this GPU / TE build cannot run it."""


# the per-tensor recipes: the only ones whose attention can run in FP8 too, or whose gradients' GEMMs may
# accumulate fast (the block recipes need fp32 promotion)
PER_TENSOR_RECIPES = ("delayed", "current")
ATTENTION_LAYOUTS = ("thd", "bshd", "sbhd")  # TE's names: packed tokens, batch-major, sequence-major
# TE's FP8 fused attention in the THD layout (ours): cuDNN 9.23+, and its backward only on compute
# capability 10.0+ (Transformer Engine 2.20: "FP8 fused attention with THD format supports backward on sm100+
# only"), so on Hopper it cannot train.
FP8_THD_ATTENTION_CUDNN = (9, 23, 0)
FP8_THD_ATTENTION_TRAINING_SM = (10, 0)


def make_recipe(name: str, *, amax_history_len: int = 1024, fp8_format: str = "hybrid",
                fp8_attention: bool = False, attention_layout: str = "thd", fast_accumulation: bool = False):
    """TE recipe object for a recipe name, after checking this GPU supports it.

    - `delayed`: DelayedScaling, scales from an amax history of `amax_history_len` steps. Cheapest;
      Hopper and Ada.
    - `current`: Float8CurrentScaling, each tensor's scale from its own amax at cast time.
    - `block`: Float8BlockScaling, 1x128 / 128x128 block scales (Hopper).
    - `mxfp8`: MXFP8BlockScaling, 32-element microscaling (Blackwell only).

    `fp8_attention` (opt-in, `delayed` and `current` only) runs attention in FP8 too. TE casts Q, K, V
    and the softmax output to FP8 for cuDNN's FP8 fused attention (TE's `fp8_dpa`, a beta feature).
    Without it, attention stays bf16 between FP8 projections.

    `fp8_format` applies to the per-tensor recipes: "hybrid" (E4M3 forward, E5M2 gradients) or
    "e4m3" (both); the block recipes are E4M3 by construction. `attention_layout` is the layout the
    attention will be called in. The limits checked here are THD's: TE's batch- and sequence-major
    layouts ("bshd", "sbhd") train FP8 attention on Hopper with cuDNN 9.2.1+, which TE checks itself.

    `fast_accumulation` (`delayed` and `current` only) runs the backward FP8 GEMMs of TE's layers (data and
    weight gradients) with Hopper's fast accumulation, as TE runs their forward ones, instead of promoting
    partial sums to fp32 every few blocks (TE's default for gradients, `use_split_accumulator`). The FP8
    LM head's GEMMs (`fp8_head`) are not TE's: the model's `fp8_head_fast_accumulation` sets theirs.
    """
    if name not in RECIPES:
        raise FP8UnsupportedError(f"fp8 recipe {name!r} is unknown (choose from {', '.join(RECIPES)})")
    if attention_layout not in ATTENTION_LAYOUTS:
        raise ValueError(f"attention_layout {attention_layout!r} is unknown (choose from {', '.join(ATTENTION_LAYOUTS)})")
    if fast_accumulation and name not in PER_TENSOR_RECIPES:
        raise FP8UnsupportedError(f"fp8 recipe {name!r} cannot run its gradients' GEMMs with fast accumulation "
                                  f"(only {' and '.join(PER_TENSOR_RECIPES)} can)")
    if fp8_attention and name not in PER_TENSOR_RECIPES:
        raise FP8UnsupportedError(f"fp8 recipe {name!r} cannot run attention in FP8 "
                                  f"(only {' and '.join(PER_TENSOR_RECIPES)} can)")
    try:
        import transformer_engine.common.recipe as r
        import transformer_engine.pytorch as te
    except ImportError as exc:
        raise FP8UnsupportedError(f"fp8 recipe {name!r} needs Transformer Engine: {exc}") from exc
    check = {
        "delayed": te.is_fp8_available,
        "current": te.is_fp8_available,
        "block": te.is_fp8_block_scaling_available,
        "mxfp8": te.is_mxfp8_available,
    }[name]
    ok, reason = check(return_reason=True)
    if not ok:
        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
        raise FP8UnsupportedError(f"fp8 recipe {name!r} is not supported on {gpu}: {reason}")
    if fp8_attention and attention_layout == "thd":
        from transformer_engine.pytorch.utils import get_cudnn_version  # the cuDNN TE itself runs on

        capability = torch.cuda.get_device_capability()
        if capability < FP8_THD_ATTENTION_TRAINING_SM:
            raise FP8UnsupportedError(
                "FP8 attention in the THD layout trains only on compute capability 10.0 or later (Transformer "
                f"Engine runs its backward on Blackwell only); {torch.cuda.get_device_name()} is "
                f"{capability[0]}.{capability[1]}")
        cudnn = tuple(get_cudnn_version())
        if cudnn < FP8_THD_ATTENTION_CUDNN:
            raise FP8UnsupportedError("FP8 attention in the THD layout needs cuDNN >= 9.23; Transformer Engine "
                                      f"runs on {'.'.join(map(str, cudnn))}")
    fmt = {"hybrid": r.Format.HYBRID, "e4m3": r.Format.E4M3}[fp8_format]
    if name in PER_TENSOR_RECIPES:
        try:
            if name == "delayed":
                made = r.DelayedScaling(fp8_format=fmt, amax_history_len=amax_history_len,
                                        amax_compute_algo="max", fp8_dpa=fp8_attention)
            else:
                made = r.Float8CurrentScaling(fp8_format=fmt, fp8_dpa=fp8_attention)
        except AssertionError as exc:  # this TE version refuses FP8 attention with the recipe
            raise FP8UnsupportedError(f"fp8 recipe {name!r} with FP8 attention: {exc}") from exc
        if fast_accumulation:
            # TE's layers take dgrad's and wgrad's accumulation from the recipe where it has these fields,
            # else from their module defaults (split); DelayedScaling does not declare them
            made.fp8_gemm_dgrad = made.fp8_gemm_wgrad = r.MMParams(use_split_accumulator=False)
        return made
    if name == "block":
        return r.Float8BlockScaling(fp8_format=r.Format.E4M3)
    return r.MXFP8BlockScaling(fp8_format=r.Format.E4M3)


def fp8_autocast(recipe: str | None, *, amax_history_len: int = 1024, fp8_format: str = "hybrid",
                 fp8_attention: bool = False, attention_layout: str = "thd", fast_accumulation: bool = False,
                 group=None):
    """Context for the forward pass: FP8 with the named recipe, or nothing when `recipe` is None.

    Token counts must be divisible by 16 (TE's FP8 GEMM constraint); `pad_to_multiple` pads a batch.
    `group` is the process group the amax is reduced over.
    """
    if recipe is None or recipe == "none":
        return contextlib.nullcontext()
    import transformer_engine.pytorch as te

    made = make_recipe(recipe, amax_history_len=amax_history_len, fp8_format=fp8_format,
                       fp8_attention=fp8_attention, attention_layout=attention_layout,
                       fast_accumulation=fast_accumulation)
    return te.autocast(enabled=True, recipe=made, amax_reduction_group=group)


class FP8Target(NamedTuple):
    """Where an optimizer's update writes a weight's FP8 copy for the next forward (`te_model.fp8_weights`):
    E4M3 codes of the parameter's elements (`data`, float8_e4m3fn, as many elements as the parameter,
    contiguous), the per-tensor `scale` they are cast under, the `amax` the weight's largest magnitude is
    folded into, and the `scale_inv` the GEMMs read. Each a 1-element fp32 tensor, shared by every parameter
    of one FP8 tensor."""
    data: torch.Tensor
    scale: torch.Tensor
    amax: torch.Tensor
    scale_inv: torch.Tensor


def check_fp8_tokens(num_tokens: int, where: str = "batch") -> None:
    if num_tokens % FP8_TOKEN_MULTIPLE:
        raise FP8UnsupportedError(
            f"{where} has {num_tokens} tokens; FP8 needs a multiple of {FP8_TOKEN_MULTIPLE} "
            f"(pad with te_model.pad_to_multiple)"
        )


def fp8_active() -> bool:
    """Whether a TE FP8 autocast is active in this thread (False where TE is absent)."""
    try:
        from transformer_engine.pytorch.quantization import FP8GlobalStateManager
    except ImportError:
        return False
    return FP8GlobalStateManager.is_fp8_enabled()


def pad_to_multiple(batch: dict, pad_token_id: int, multiple: int = FP8_TOKEN_MULTIPLE) -> dict:
    """Right-pad input_ids/labels/position_ids (and attention_mask) so seq length % multiple == 0.

    The padding is its own segment (positions restart at 0, labels -100), so it changes no real token's
    output or loss.
    """
    seqlen = batch["input_ids"].shape[1]
    extra = -seqlen % multiple
    if not extra:
        return batch
    fill = {"input_ids": pad_token_id, "labels": -100, "attention_mask": 0}
    out = {}
    for key, value in batch.items():
        if key == "position_ids":
            pad = torch.arange(extra, device=value.device).expand(value.shape[0], extra)
            out[key] = torch.cat([value, pad.to(value.dtype)], dim=1)
        elif key in fill:
            pad = torch.full((value.shape[0], extra), fill[key], dtype=value.dtype, device=value.device)
            out[key] = torch.cat([value, pad], dim=1)
        else:
            out[key] = value
    if "attention_mask" not in batch and "position_ids" not in batch:
        mask = torch.ones_like(batch["input_ids"])
        out["attention_mask"] = torch.cat([mask, torch.zeros_like(mask[:, :extra])], dim=1)
    return out


# ---------------------------------------------------------------------------------------------------
# evidence


def delayed_scaling_state(model) -> dict:
    """Summary of every TE module's forward FP8 meta (DelayedScaling): amax seen, scales in use."""
    amax, scales, modules = [], [], 0
    for module in model.modules():
        meta = getattr(module, "fp8_meta", None)
        state = meta.get("scaling_fwd") if meta else None
        if state is None or not hasattr(state, "amax_history"):  # other recipes keep no history
            continue
        modules += 1
        amax.append(state.amax_history.detach().abs().max().float())
        scales.append(state.scale.detach().float().flatten())
    if not modules:
        return {"modules": 0}
    scales = torch.cat(scales)
    return {
        "modules": modules,
        "amax_max": float(torch.stack(amax).max()),
        "scale_min": float(scales.min()),
        "scale_max": float(scales.max()),
        "scales_not_one": int((scales != 1).sum()),
        "scale_sum": float(scales.sum()),  # moves whenever any scale does
        "amax_sum": float(torch.stack(amax).sum()),
    }


FP8_STORAGE_DTYPES = (torch.uint8, torch.float8_e4m3fn, torch.float8_e5m2)


@contextlib.contextmanager
def record_fp8_saved_tensors():
    """Counts, during a forward pass, the FP8 tensors autograd keeps for the backward pass.

    TE saves its quantized activations and weights either as QuantizedTensor objects or, split up, as
    their raw 8-bit storage; both are counted, with their bytes. A bf16 forward saves none, so a
    non-zero count is evidence of FP8 GEMMs for every recipe, read from what TE actually produced.
    """
    try:
        from transformer_engine.pytorch.tensor import QuantizedTensor
    except ImportError:
        QuantizedTensor = ()
    seen = {"fp8_tensors": 0, "fp8_bytes": 0, "types": set()}

    def pack(t):
        if isinstance(t, QuantizedTensor) or t.dtype in FP8_STORAGE_DTYPES:
            seen["fp8_tensors"] += 1
            seen["types"].add(type(t).__name__ if isinstance(t, QuantizedTensor) else str(t.dtype))
            if t.dtype in FP8_STORAGE_DTYPES:
                seen["fp8_bytes"] += t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield seen
    seen["types"] = sorted(seen["types"])
