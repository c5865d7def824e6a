"""Causal-LM cross-entropy straight from the last hidden states, without a (batch, seq, vocab) logits tensor.

With Llama 3's 128,256-token vocabulary the logits are the model's largest activation. HF makes them in
bf16 for every position, casts them to fp32 for the loss, and the backward makes one more fp32 copy.
Here only the scored positions are projected, a chunk of tokens at a time, and each chunk's gradients
are computed as soon as its logits are. Peak memory is one chunk's logits plus the gradients, whatever
the batch. The semantics are HF's `ForCausalLMLoss` (`causal_lm_loss` has both).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .ce_kernel import logits_ce_, triton_available
from .fp8_head import FP8HeadGemms
from .segments import to_device

IGNORE_INDEX = -100
# Logit elements per chunk on the torch path: 2**28 fp32 values, 1 GiB (2,093 tokens of a 128k vocabulary).
CHUNK_ELEMENTS = 2**28


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T` against `targets`, gradients computed in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, divisor, chunk_tokens, fp8_head, fast_accumulation):
        # hidden (N, H), weight (V, H), targets (N,)
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.weight_dtype = weight.dtype
        gemms = (FP8HeadGemms(hidden, weight, divisor, fast_accumulation) if fp8_head
                 else HeadGemms(hidden, weight, divisor))
        grad_hidden = torch.empty_like(hidden) if want_h else None
        # written by the first chunk's GEMM and accumulated into by the others in fp32; where one chunk holds
        # every token there is nothing to accumulate, and the GEMM writes it in the weight's dtype at once
        grad_weight = None
        one_chunk = hidden.shape[0] <= chunk_tokens
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_tokens):
            stop = min(start + chunk_tokens, hidden.shape[0])
            logits = gemms.logits(start, stop)  # (c, V), or more rows when the GEMM pads them
            if not (want_h or want_w):
                total += logits_ce_(logits[: stop - start], targets[start:stop], 1.0, want_grad=False)
                continue
            dlogits = gemms.grad_buffer(logits, stop - start)  # (softmax - onehot) / grad_divisor goes here
            total += logits_ce_(logits[: stop - start], targets[start:stop], gemms.grad_divisor, want_grad=True,
                                grad_out=dlogits[: stop - start])
            del logits  # the FP8 head's gradient is a buffer of its own: the bf16 logits can go now
            if want_h:
                grad_hidden[start:stop] = gemms.grad_hidden(dlogits)[: stop - start]
            if want_w:
                grad_weight = gemms.grad_weight(dlogits, start, stop, grad_weight, final=one_chunk)
        if want_w and grad_weight is None:  # nothing scored: a zero gradient, as DDP expects one
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total / divisor

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        grad_h = _times(grad_hidden, grad_output) if grad_hidden is not None else None
        if grad_weight is None:
            grad_w = None
        elif grad_weight.dtype == ctx.weight_dtype:
            grad_w = _times(grad_weight, grad_output)  # the saved gradient stays as it was
        else:  # cast first, then scale in place: one fp32 read instead of an fp32 product written and read again
            grad_w = grad_weight.to(ctx.weight_dtype).mul_(grad_output)
        return grad_h, grad_w, None, None, None, None, None


def _times(t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`t * scale.to(t.dtype)` for a 0-dim `scale`, as a foreach kernel: it reads `scale` on the device and runs
    vectorized, where the plain product broadcasts `scale` and does not (the head's weight gradient is 1 GB at
    Llama 3.1 8B's shape). Its fast path takes a scale of `t`'s dtype only."""
    return torch._foreach_mul([t], scale.to(t.dtype))[0]


class HeadGemms:
    """The head's three GEMMs in the weight's dtype (bf16): logits, dlogits @ W, dlogits.T @ h."""

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, divisor: float):
        self.hidden, self.weight = hidden, weight
        self.grad_divisor = divisor  # dlogits = (softmax - onehot) / divisor, the loss's own gradient

    def logits(self, start: int, stop: int) -> torch.Tensor:
        return self.hidden[start:stop] @ self.weight.T

    @staticmethod
    def grad_buffer(logits: torch.Tensor, rows: int) -> torch.Tensor:
        return logits  # the gradient overwrites the logits

    def grad_hidden(self, dlogits: torch.Tensor) -> torch.Tensor:
        return dlogits @ self.weight

    def grad_weight(self, dlogits, start: int, stop: int, acc: torch.Tensor | None, final: bool) -> torch.Tensor:
        """dlogits.T @ h, added into `acc` (fp32); `final`: the only chunk, its product is the gradient."""
        if final:
            return dlogits.T @ self.hidden[start:stop]
        return _gemm_fp32(dlogits.T, self.hidden[start:stop], acc)


_FP32_OUT_GEMM = {"ok": True}  # cleared if this torch build has no CUDA GEMM with an fp32 output


def _fp32_gemm_here(a: torch.Tensor) -> bool:
    return a.is_cuda and a.dtype in (torch.bfloat16, torch.float16) and _FP32_OUT_GEMM["ok"]


def _gemm_fp32(a: torch.Tensor, b: torch.Tensor, acc: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b in fp32, added into `acc` when given (and returned).

    On CUDA with bf16/fp16 operands it is one GEMM with an fp32 output (cuBLAS with an fp32 C matrix).
    That avoids writing a (V, H) product in the operands' dtype and then upcasting or adding it: for a
    128k x 4096 head, about 6 GB less memory traffic.
    """
    if _fp32_gemm_here(a):
        try:
            if acc is None:
                return torch.mm(a, b, out_dtype=torch.float32)
            return torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
        except (RuntimeError, NotImplementedError, TypeError):
            _FP32_OUT_GEMM["ok"] = False
    product = (a @ b).float()
    return product if acc is None else acc.add_(product)


def _chunk_tokens(vocab_size: int, device: torch.device) -> int:
    """Scored tokens per chunk: CHUNK_ELEMENTS logits, or four times that with the Triton kernel.

    The kernel keeps the logits in bf16 with no fp32 copy, so a chunk can be larger: 8,372 tokens of a
    128k vocabulary. That is one chunk for most micro-batches, so the head's weight gradient is one GEMM,
    written once in bf16 instead of accumulated in fp32.
    """
    elements = CHUNK_ELEMENTS * (4 if device.type == "cuda" and triton_available() else 1)
    return max(1, elements // vocab_size)


@dataclass(frozen=True)
class ScoredTokens:
    """The positions a causal-LM loss scores, and their targets, found once from a batch's labels.

    Position t of a row predicts label t + 1, so the scored positions are those t < S - 1 whose next label
    is not -100. Found from the host's labels and moved with `to`, they spare the device the host syncs
    of selecting with a boolean mask on the device (one in the forward pass, one in its backward)."""

    index: torch.Tensor  # (N,) int64 into the batch's flattened (B * S) positions, row by row
    targets: torch.Tensor  # (N,) int64
    shape: tuple[int, int]  # (B, S) of the labels

    def to(self, device: torch.device) -> "ScoredTokens":
        return dataclasses.replace(self, index=to_device(self.index, device), targets=to_device(self.targets, device))


def scored_tokens(labels: torch.Tensor) -> ScoredTokens:
    """The scored positions of `labels` (B, S), aligned with the inputs as HF takes them."""
    b, s = labels.shape
    targets = labels[:, 1:]
    rows, cols = (targets != IGNORE_INDEX).nonzero(as_tuple=True)  # a host sync when labels are on a GPU
    return ScoredTokens(index=rows * s + cols, targets=targets[rows, cols], shape=(b, s))


def causal_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                   num_items_in_batch: int | torch.Tensor | None = None,
                   reduction: str = "mean", fp8_head: bool = False, fp8_head_fast_accumulation: bool = False,
                   scored: ScoredTokens | None = None) -> torch.Tensor:
    """Cross-entropy of the LM head `weight` (vocab, hidden) over `hidden` (batch, seq, hidden).

    `labels` (batch, seq) are aligned with the inputs, as HF takes them. `reduction="sum"` returns the
    summed token losses (the eval stage adds them up over batches). `fp8_head` runs the head's three GEMMs
    in FP8 (`te_model.fp8_head`); off by default, the head stays in the weight's dtype.
    `fp8_head_fast_accumulation`: two of them with fast accumulation (`FP8HeadGemms`). `scored`: the
    labels' `scored_tokens`, found beforehand (the training loop finds them on the host); None finds them
    here.

    Per chunk of c scored tokens:

        logits = h @ W.T              (c, V) in the weight's dtype; the math below runs in fp32
        loss  += logsumexp(logits) - logits[target]
        dlogits = softmax(logits) - onehot(target), scaled by 1 / tokens, written over the logits
        dh = dlogits @ W ;  dW += dlogits.T @ h

    The middle two lines are one Triton kernel on a GPU (`te_model.ce_kernel`). The forward pass does the
    backward's two matmuls, so nothing is recomputed; the backward only scales the stored gradients.
    Semantics are HF's `ForCausalLMLoss`: position t predicts label t+1 and -100 is ignored. The loss is
    the mean over scored tokens, or the sum divided by `num_items_in_batch` when given (as HF's Trainer
    does under gradient accumulation).
    """
    if scored is None:
        scored = scored_tokens(labels)
    elif scored.shape != tuple(labels.shape):
        raise ValueError(f"scored tokens are for labels of shape {scored.shape}, the labels have shape "
                         f"{tuple(labels.shape)}")
    hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, scored.index)  # (N, H): scored positions
    targets = scored.targets
    if reduction == "sum":
        divisor = 1.0
    elif num_items_in_batch is not None:
        divisor = float(num_items_in_batch)
    else:
        divisor = float(max(1, targets.numel()))
    chunk = _chunk_tokens(weight.shape[0], weight.device)
    return _LinearCrossEntropy.apply(hidden, weight, targets, divisor, chunk, fp8_head, fp8_head_fast_accumulation)
