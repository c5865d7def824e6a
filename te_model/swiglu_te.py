"""Our decoder layers' MLP: TE's `LayerNormMLP`, whose backward under delayed scaling computes the SwiGLU
gradient and casts it to FP8 in one kernel (`swiglu_kernels`), where TE writes it in bf16 and reads it
back to cast it.

TE's backward looks its activation kernels up, at every call, in its module's table `_act_func`; the
table's third entry for an activation is a fused "gradient, cast to FP8" kernel, which TE has for GELU
and its kin under delayed scaling but not for SwiGLU. `install` wraps the table so that SwiGLU under
delayed scaling has one. What that entry runs is decided per module: our layers' `LlamaLayerNormMLP`
marks its own FP8 gradient quantizer, and only a marked quantizer gets the one-pass kernel. Every other
`LayerNormMLP` in the process (a peer's, in the benchmarks) runs the same two TE kernels its own path
runs, in the same order, bit for bit.

Importing this module imports Transformer Engine.
"""

from __future__ import annotations

import torch
import transformer_engine.pytorch as te
import transformer_engine_torch as tex
from transformer_engine.common.recipe import DelayedScaling
from transformer_engine.pytorch.constants import TE_DType_To_Torch, FP8BwdTensorIdx
from transformer_engine.pytorch.module import layernorm_mlp as te_layernorm_mlp
from transformer_engine.pytorch.tensor.float8_tensor import Float8Quantizer
from transformer_engine.pytorch.tensor.storage.float8_tensor_storage import Float8TensorStorage

from . import swiglu_kernels

MARK = "llama_one_pass_dswiglu"  # set on a quantizer whose module asked for the one-pass kernel
MARK_TRANSPOSE = "llama_dswiglu_transpose_in_kernel"  # ... and for the transpose written by that kernel


class LlamaLayerNormMLP(te.LayerNormMLP):
    """`te.LayerNormMLP` that marks its SwiGLU gradient's quantizer for the one-pass cast while
    `one_pass_dswiglu` is set (TE remakes quantizers when the recipe changes, so every forward marks).
    `dswiglu_transpose_in_kernel` has that kernel write the transpose too, instead of a copy after it."""

    one_pass_dswiglu = True
    dswiglu_transpose_in_kernel = False

    def _get_quantizers(self, fp8_output, is_grad_enabled):
        quantizers = super()._get_quantizers(fp8_output, is_grad_enabled)
        if self.fp8 and is_grad_enabled:
            quantizer = self.quantizers["scaling_bwd"][FP8BwdTensorIdx.GRAD_OUTPUT1]
            setattr(quantizer, MARK, self.one_pass_dswiglu and not self.use_bias)
            setattr(quantizer, MARK_TRANSPOSE, self.dswiglu_transpose_in_kernel)
        return quantizers


def dswiglu_cast(grad: torch.Tensor, fc1_out: torch.Tensor, quantizer, **params):
    """TE's fused entry: `(bias gradient, FP8 SwiGLU gradient)` from the gradient of the SwiGLU output.

    A marked Float8Quantizer (delayed scaling) on tensors the kernel takes gets the one-pass kernel, and
    no bias gradient (our layers have no bias). Anything else gets TE's own two kernels.
    """
    if (getattr(quantizer, MARK, False) and not params and isinstance(quantizer, Float8Quantizer)
            and swiglu_kernels.usable(grad, fc1_out)):
        q, qt, scale_inv = swiglu_kernels.dswiglu_fp8(
            grad, fc1_out, quantizer.scale, quantizer.amax, TE_DType_To_Torch[quantizer.dtype],
            transpose_in_kernel=getattr(quantizer, MARK_TRANSPOSE, False))
        return None, Float8TensorStorage(data=q.view(torch.uint8), fp8_scale_inv=scale_inv,
                                         fp8_dtype=quantizer.dtype, fake_dtype=grad.dtype,
                                         data_transpose=qt.view(torch.uint8), quantizer=quantizer)
    return tex.bgrad_quantize(tex.dswiglu(grad, fc1_out, None, **params), quantizer)


def install() -> bool:
    """Give TE's activation table the SwiGLU entry (once per process). False, and TE's table left alone,
    where this TE has no such table, or one whose SwiGLU entry is not the three kernels with no fused
    one that this module was written against (TE 2.20)."""
    table = getattr(te_layernorm_mlp, "_act_func", None)
    if table is None:
        return False
    if getattr(table, "te_table", None) is not None:
        return True
    try:
        entry = table("swiglu", DelayedScaling())
    except Exception:  # noqa: BLE001 - any other table keeps TE's own path
        return False
    if not (isinstance(entry, tuple) and len(entry) == 3 and entry[2] is None):
        return False

    def act_func(activation: str, recipe=None):
        funcs = table(activation, recipe)
        if activation == "swiglu" and recipe is not None and recipe.delayed() and funcs[2] is None:
            return funcs[0], funcs[1], dswiglu_cast
        return funcs

    act_func.te_table = table
    te_layernorm_mlp._act_func = act_func
    return True
