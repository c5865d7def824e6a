"""Transformer Engine's RMSNorm backward, in its `LayerNormLinear` and `LayerNormMLP`, taking the residual
gradient `te_model.residual` kept for it, and adding it with `tex.rmsnorm_bwd_add` as it writes its result.

Both modules call `tex.rmsnorm_bwd(dz, x, rsigma, gamma, sm_margin, zero_centered_gamma)` through their
module-level name `tex`. `install` gives those two modules a copy of `transformer_engine_torch` whose
`rmsnorm_bwd` asks `residual.take(x)` first: with nothing kept for `x` it is TE's own call, so every other
norm in the process (a peer's, in the benchmarks) runs as before, bit for bit.

Importing this module imports Transformer Engine.
"""

from __future__ import annotations

import inspect
import types

import transformer_engine.pytorch  # noqa: F401 - before its extension module, which it loads
import transformer_engine_torch as tex
from transformer_engine.pytorch.module import layernorm_linear as te_layernorm_linear
from transformer_engine.pytorch.module import layernorm_mlp as te_layernorm_mlp

from . import residual

MODULES = (te_layernorm_linear, te_layernorm_mlp)
CALL = "tex.rmsnorm_bwd("  # how both modules call the norm backward (TE 2.20)


def rmsnorm_bwd(dz, x, rsigma, gamma, sm_margin, zero_centered_gamma):
    """TE's RMSNorm backward, plus the residual gradient kept for `x` if there is one."""
    add = residual.take(x)
    if add is None:
        return tex.rmsnorm_bwd(dz, x, rsigma, gamma, sm_margin, zero_centered_gamma)
    return tex.rmsnorm_bwd_add(dz, x, add.reshape(x.shape).contiguous(), rsigma, gamma, sm_margin,
                               zero_centered_gamma)


def install() -> bool:
    """Give both modules the norm backward (once per process). False, with TE left alone, where this TE has
    no `rmsnorm_bwd_add` or its modules do not call `tex.rmsnorm_bwd` as this was written against."""
    if all(getattr(getattr(m, "tex", None), "rmsnorm_bwd", None) is rmsnorm_bwd for m in MODULES):
        return True
    if not hasattr(tex, "rmsnorm_bwd_add"):
        return False
    try:
        if not all(getattr(m, "tex", None) is tex and CALL in inspect.getsource(m) for m in MODULES):
            return False
    except (OSError, TypeError):  # no source to read: not the TE this was written against
        return False
    patched = types.ModuleType(tex.__name__)
    patched.__dict__.update(tex.__dict__)
    patched.rmsnorm_bwd = rmsnorm_bwd
    for m in MODULES:
        m.tex = patched
    return True
