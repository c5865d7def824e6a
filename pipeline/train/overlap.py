"""The optimizer's update overlapped with the next forward pass, on one GPU.

After a step's backward, `UpdateOverlap.step` queues the update on a side stream, so the host goes on to
queue the next step's forward on the main stream at once. The forward waits, on the device, block by
block: the embedding, then each decoder layer, for the update of that block's own parameters alone;
before the final norm (and the head after it) it waits for the whole update. The update's memory-bound
kernels then run beside the forward's first layers instead of before them. The values are the same as
an update run in line: each parameter is read only after its own update.

The optimizer (`optim.AdamW`) queues every group's small parameters first and the rest in parameter
order, which for a Llama model is the forward's order; it tells `launched` of each update as it queues
it. The gradients the update reads are marked as in use by the side stream, so memory freed by
`zero_grad` is not handed to the next forward before the update has read it.
"""

from __future__ import annotations

from collections import Counter

import torch

from pipeline.train import optim


def forward_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks of a Llama causal LM in the order its forward runs them: the embedding, each decoder layer,
    and the final norm (whose turn comes before the head's)."""
    body = model.model
    return [body.embed_tokens, *body.layers, body.norm]


class UpdateOverlap:
    """Runs `optimizer.step()` on a side stream, each block of `model`'s next forward waiting for its own part."""

    def __init__(self, model: torch.nn.Module, optimizer: optim.AdamW, device: torch.device) -> None:
        if device.type != "cuda":
            raise ValueError(f"overlapping the update needs a CUDA device, not {device}")
        self.optimizer, self.device = optimizer, device
        self.stream = torch.cuda.Stream(device)
        blocks = forward_blocks(model)
        self.last = len(blocks) - 1
        self.block_of: dict[int, int] = {}
        for i, block in enumerate(blocks[:-1]):
            for p in block.parameters():
                self.block_of.setdefault(id(p), i)  # a tied head is the embedding's: its first use waits
        self.events: list[torch.cuda.Event | None] = [None] * len(blocks)
        self.remaining: Counter[int] = Counter()
        for i, block in enumerate(blocks):
            block.register_forward_pre_hook(self._waiter(i))

    def _block(self, p: torch.Tensor) -> int:
        return self.block_of.get(id(p), self.last)  # the final norm, the head: whatever comes after the layers

    def _waiter(self, i: int):
        def wait(module, args):
            if torch.cuda.is_current_stream_capturing():  # a graph capture waits on no event from outside it
                return
            if i == self.last:
                self.join()
            elif self.events[i] is not None:
                torch.cuda.current_stream(self.device).wait_event(self.events[i])
        return wait

    def _launched(self, p: torch.Tensor) -> None:
        i = self._block(p)
        self.remaining[i] -= 1
        if self.remaining[i] == 0 and i != self.last:
            self._record(i)

    def _record(self, i: int) -> None:
        event = torch.cuda.Event()
        event.record(self.stream)
        self.events[i] = event

    def step(self) -> None:
        """`optimizer.step()`, queued on the side stream after everything queued so far on the main one."""
        main = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(main)
        params = [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        for p in params:
            p.grad.record_stream(self.stream)
        for flag in (getattr(self.optimizer, "found_inf", None), getattr(self.optimizer, "grad_factor", None)):
            if flag is not None:
                flag.record_stream(self.stream)
        self.events = [None] * len(self.events)
        self.remaining = Counter(self._block(p) for p in params)
        self.optimizer.launched = self._launched
        try:
            with torch.cuda.stream(self.stream):
                self.optimizer.step()
                for i, left in self.remaining.items():  # not announced (an optimizer that does not): the whole update
                    if left > 0 and i != self.last:
                        self._record(i)
        finally:
            self.optimizer.launched = None

    def join(self) -> None:
        """Whatever the main stream queues from now on runs after the whole update."""
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
