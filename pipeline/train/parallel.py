"""How the model is spread over the training workers: DDP (replicated) or FSDP2 (sharded).

The model code is written for one device, and parallelism is applied from outside, here. So the
training loop and the checkpoint code ask this module instead of testing wrapper types. Sharded
parameters and moments are DTensors: `full_tensor` gathers one and `shard_like` cuts a whole tensor
into the local shard. So checkpoints keep one layout, whole tensors by name, whatever the wrapping.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel

STRATEGIES = ("ddp", "fsdp")


def wrap(model: torch.nn.Module, strategy: str, *, reshard_after_forward: bool = True) -> torch.nn.Module:
    """The module the training step calls: `model` wrapped for `strategy` (FSDP2 shards it in place).

    - `ddp`: DistributedDataParallel, as Ray Train's `prepare_model` makes it, but without needing a Ray
      worker around it. Every worker holds the whole model, its gradients and AdamW moments: about 8
      bytes per parameter in bf16, so roughly 3B parameters per 80 GB GPU once activations count.
    - `fsdp`: FSDP2 `fully_shard`, one unit per decoder layer plus the root (embedding, final norm, LM
      head; a tied head stays with its embedding). Parameters, gradients and moments are sharded over
      the workers. Each layer is all-gathered for its forward and again for its backward. All-gathers
      and reductions stay in the training dtype. TE layers work unchanged under FP8 autocast: FSDP2
      hands them whole bf16 weights to quantize.

    `reshard_after_forward` (FSDP2 only): free each layer's gathered weights after its forward and gather
    them again for its backward (least memory), or keep them until the backward (one all-gather fewer per
    layer and step, for models whose whole weights fit). The last layer always keeps them: its backward
    follows its forward at once. The root does too (FSDP2's own rule).
    """
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        layers = model.model.layers
        for index, layer in enumerate(layers):
            fully_shard(layer, reshard_after_forward=reshard_after_forward and index < len(layers) - 1)
        fully_shard(model)
        return model
    if dist.get_world_size() == 1:
        return model
    device = next(model.parameters()).device
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


@contextlib.contextmanager
def gradient_sync(wrapped: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Backward passes inside reduce gradients over workers only when `enabled` (the last micro-batch)."""
    if isinstance(wrapped, DistributedDataParallel) and not enabled:
        with wrapped.no_sync():
            yield
    elif hasattr(wrapped, "set_requires_gradient_sync"):  # an FSDP2 module
        wrapped.set_requires_gradient_sync(enabled)
        try:
            yield
        finally:
            wrapped.set_requires_gradient_sync(True)
    else:
        yield


def is_sharded(tensor: torch.Tensor) -> bool:
    return isinstance(tensor, DTensor)


def _fp8(dtype: torch.dtype) -> bool:
    """Whether tensors of `dtype` must travel as bytes: gloo's collectives have no FP8 type."""
    return dtype.itemsize == 1 and dtype.is_floating_point


def _retyped(tensor: DTensor, dtype: torch.dtype) -> DTensor:
    """A DTensor's bytes seen as another dtype of the same size, laid out as it is."""
    return DTensor.from_local(tensor.to_local().view(dtype), tensor.device_mesh, tensor.placements,
                              shape=tensor.shape, stride=tensor.stride())


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor; for a shard, gathered from every worker (all of them must call this). FP8 (optimizer
    moments) travels as bytes."""
    if not isinstance(tensor, DTensor):
        return tensor
    if _fp8(tensor.dtype):
        return _retyped(tensor, torch.uint8).full_tensor().view(tensor.dtype)
    return tensor.full_tensor()


def shard_like(whole: torch.Tensor, like: torch.Tensor, *, keep_dtype: bool = False) -> torch.Tensor:
    """`whole` laid out as `like`: this worker's shard when `like` is sharded, else `whole` on its device; in
    `like`'s dtype, or its own with `keep_dtype` (an fp32 master copy of a bf16 parameter, FP8 moments, their
    scales: any tensor sharded by `like`'s rows)."""
    whole = whole.to(device=like.device, dtype=whole.dtype if keep_dtype else like.dtype)
    if not isinstance(like, DTensor):
        return whole
    if _fp8(whole.dtype):  # as bytes, as `full_tensor` gathers them
        return _retyped(distribute_tensor(whole.view(torch.uint8), like.device_mesh, like.placements), whole.dtype)
    return distribute_tensor(whole, like.device_mesh, like.placements)
