"""The decoder's FP8 weights written by the optimizer's update, not cast from the bf16 weights in forward.

Under FP8, each of TE's linear layers casts its bf16 weight to FP8 in forward, row-wise and transposed: a
read of every weight each step, beside the update that has just written it. `FP8WeightsFromUpdate` gives
the optimizer (`pipeline.train.optim.AdamW.fp8_weights`) each weight's place in TE's cached FP8 weight
(the module's `_fp8_workspaces`, TE's first-micro-batch cache), so the update writes the FP8 codes as it
writes the weight, under the scale the next forward casts with and with the weight's amax recorded as TE's
cast records it. The transpose is then made from the FP8 codes. The model's forward passes
`is_first_microbatch=False`, which makes TE use the cached weights as they are. The bits of TE's own cast
(its GPU test, tests/gpu/test_te.py): delayed scaling only, one GPU or DDP (not FSDP2, not CUDA graphs).

The bf16 weights stay the model's parameters: checkpoints, export and evaluation read them as before. The
first forward, and the first after `drop` (weights loaded from elsewhere), casts and caches as TE does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import transformer_engine.pytorch as te
import transformer_engine_torch as tex
from transformer_engine.pytorch.module.base import TransformerEngineBaseModule
from transformer_engine.pytorch.tensor.float8_tensor import Float8Quantizer, Float8Tensor

from .fp8 import FP8Target

def cached_weights(module) -> dict[str, list[str]]:
    """The FP8 weights a TE module caches (by TE's cache name) and the parameters whose rows each holds, in
    order (Q, K and V share one); empty for a module that keeps none."""
    if isinstance(module, te.LayerNormMLP):
        return {"fc1_weight": ["fc1_weight"], "fc2_weight": ["fc2_weight"]}
    if isinstance(module, (te.LayerNormLinear, te.Linear)):
        return {"weight": list(module.weight_names)}
    return {}


@dataclass(frozen=True)
class _Slot:
    """One parameter's rows in one cached FP8 weight, and the parameters that share it."""

    module: TransformerEngineBaseModule
    cache_name: str
    row: int
    rows: int
    group: tuple[int, ...]


class FP8WeightsFromUpdate:
    """`optim.FP8Weights` over the TE linear layers of `model`'s decoder."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.slots: dict[int, _Slot] = {}
        self.modules: list[TransformerEngineBaseModule] = []
        for module in model.modules():
            cached = cached_weights(module)
            if cached:
                self.modules.append(module)
            for cache_name, names in cached.items():
                params = [getattr(module, name) for name in names]
                group, row = tuple(id(p) for p in params), 0
                for p in params:
                    self.slots[id(p)] = _Slot(module, cache_name, row, p.shape[0], group)
                    row += p.shape[0]
        if not self.slots:
            raise ValueError("the model has no Transformer Engine linear layers whose FP8 weights an update could write")
        self._pending: dict[tuple[int, str], set[int]] = {}

    def covers(self, p: torch.Tensor) -> bool:
        return id(p) in self.slots

    def _workspace(self, slot: _Slot) -> Float8Tensor | None:
        ws = slot.module._fp8_workspaces.get(slot.cache_name)
        if not isinstance(ws, Float8Tensor) or not isinstance(ws._quantizer, Float8Quantizer) or ws._data is None:
            return None  # none cached yet (or not by delayed scaling): the next forward casts and caches one
        return ws

    def target(self, p: torch.Tensor) -> FP8Target | None:
        slot = self.slots[id(p)]
        ws = self._workspace(slot)
        if ws is None:
            return None
        if ws._fp8_dtype != tex.DType.kFloat8E4M3:  # the forward's format under both of TE's recipes' formats
            raise ValueError(f"{slot.cache_name}: the cached FP8 weight is {ws._fp8_dtype}, not E4M3")
        rows = ws._data.view(torch.float8_e4m3fn)[slot.row:slot.row + slot.rows]
        if rows.shape != p.shape:
            raise ValueError(f"{slot.cache_name}: rows {slot.row}-{slot.row + slot.rows} of the cached FP8 weight "
                             f"{tuple(ws._data.shape)} do not hold a {tuple(p.shape)} parameter")
        quantizer = ws._quantizer
        key = (id(slot.module), slot.cache_name)
        if id(p) not in self._pending.get(key, ()):  # the first of its cached weight this step (or a new round)
            self._pending[key] = set(slot.group)
        return FP8Target(rows, quantizer.scale.view(1), quantizer.amax.view(1), ws._scale_inv.view(1))

    def written(self, p: torch.Tensor) -> None:
        """Once every parameter of a cached weight is written, its transpose is made from the new codes."""
        slot = self.slots[id(p)]
        key = (id(slot.module), slot.cache_name)
        left = self._pending.get(key)
        if left is None:
            return
        left.discard(id(p))
        if not left:
            del self._pending[key]
            ws = self._workspace(slot)
            if ws is not None and ws._transpose is not None:
                ws._create_transpose()

    def drop(self) -> None:
        """Forget every cached FP8 weight (after the bf16 weights were loaded from elsewhere): the next forward
        casts them again."""
        for module in self.modules:
            module._fp8_workspaces.clear()
        self._pending.clear()
