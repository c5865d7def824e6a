"""One small all-reduce per step, so every rank takes the same decision about it.

Ranks must agree on the step's loss and gradient norm, on which ranks saw a non-finite value and on
which got SIGTERM: a checkpoint is a collective, and a skipped update must be skipped everywhere. The
flags are built and summed on the device, and the fused optimizer skips a non-finite step's update
from them (`found_nonfinite`), so the host reads them only once (`read_agreement`), after it has
queued the next step's work. What the loop then does about a non-finite step: `pipeline.train.loop`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from pipeline.train import sigterm


@dataclass(frozen=True)
class StepAgreement:
    """What every rank knows after the step's all-reduce; identical on all ranks."""

    loss: float  # mean over ranks of each rank's mean token loss
    grad_norm: float  # before clipping
    nonfinite_loss_ranks: tuple[int, ...]
    nonfinite_grad_ranks: tuple[int, ...]
    sigterm_ranks: tuple[int, ...]

    @property
    def nonfinite(self) -> bool:
        return bool(self.nonfinite_loss_ranks or self.nonfinite_grad_ranks)

    def describe(self, step: int) -> str:
        if self.nonfinite_loss_ranks:
            return f"non-finite loss on rank {_ranks(self.nonfinite_loss_ranks)} at step {step}"
        return f"non-finite gradient norm on rank {_ranks(self.nonfinite_grad_ranks)} at step {step}"


def _ranks(ranks: tuple[int, ...]) -> str:
    return ",".join(str(r) for r in ranks)


def agreement_flags(loss: torch.Tensor, grad_norm: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This step's flags, summed over ranks by an all-reduce the host does not wait for.

    Layout: [loss, gradient norm, then per rank: 1 non-finite loss + 2 non-finite gradient norm, then
    per rank: SIGTERM]. Built from device values on the device, so nothing here reads the step's results
    on the host.
    """
    flags = torch.zeros(2 + 2 * world, dtype=torch.float32, device=loss.device)
    flags[0] = loss
    flags[1] = grad_norm
    flags[2 + rank] = (~torch.isfinite(loss)).float() + 2.0 * (~torch.isfinite(grad_norm)).float()
    # fill_, not `=`: assigning a Python number copies it from the host, which waits for the device
    flags[2 + world + rank].fill_(float(sigterm.requested()))
    if world > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.SUM)  # gloo has no AVG
    return flags


def found_nonfinite(flags: torch.Tensor, world: int) -> torch.Tensor:
    """1.0 on the device when any rank's loss or gradient norm was non-finite, else 0.0: what a fused
    optimizer takes as `found_inf` to skip its update without the host reading anything."""
    return (flags[2 : 2 + world] != 0).any().float()


class HostFlags:
    """A step's flags on their way to the host.

    On a GPU they are copied into pinned memory as soon as they are made, and an event marks the copy.
    So reading them waits for the step up to its flags alone, not for what was queued after them (the
    update, the next step's passes). Elsewhere they are the flags.
    """

    def __init__(self, flags: torch.Tensor):
        self.ready = None
        self.values = flags
        if flags.device.type == "cuda":
            self.values = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
            self.values.copy_(flags, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record()

    def tolist(self) -> list[float]:
        if self.ready is not None:
            self.ready.synchronize()
        return self.values.tolist()


def read_agreement(flags: HostFlags, world: int) -> StepAgreement:
    """The flags on the host: here the host waits for the step that made them, up to its flags."""
    values = flags.tolist()
    codes = [int(c) for c in values[2 : 2 + world]]
    return StepAgreement(
        loss=values[0] / world,
        grad_norm=values[1] / world,  # every rank computed the same norm
        nonfinite_loss_ranks=tuple(r for r, c in enumerate(codes) if c & 1),
        nonfinite_grad_ranks=tuple(r for r, c in enumerate(codes) if c & 2),
        sigterm_ranks=tuple(r for r, c in enumerate(values[2 + world :]) if c),
    )


def nonfinite_count(history: list[dict[str, float]]) -> int:
    """Non-finite steps so far, as the last logged step recorded them."""
    return int(history[-1].get("nonfinite_steps", 0)) if history else 0
