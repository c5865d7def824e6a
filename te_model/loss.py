"""Causal-LM cross-entropy straight from the last hidden states, without a (batch, seq, vocab) logits tensor.

Why it exists: with Llama 3's 128,256-token vocabulary the logits are the largest activation of the
model. HF's `LlamaForCausalLM` computes them in bf16 for every position, casts them to fp32 for the loss,
and cross-entropy's backward makes one more fp32 tensor of the same size: about 8 GiB each for 8 x 2048
tokens. Here only the positions that are scored (label not -100) are projected, a chunk of tokens at a
time, and each chunk's gradients are computed as soon as its logits are:

    logits = h @ W.T              (c, V) in the weight's dtype; the math below runs in fp32
    loss  += logsumexp(logits) - logits[target]
    dlogits = softmax(logits) - onehot(target), scaled by 1 / tokens, written over the logits
    dh = dlogits @ W ;  dW += dlogits.T @ h

The middle two lines are one Triton kernel on a GPU (`te_model.ce_kernel`): it reads each bf16 logit
twice and writes its gradient once, so the loss never makes an fp32 copy of the logits.

The forward pass does the backward's two matmuls, so there is no recomputation and no extra FLOPs; the
backward pass only scales the stored gradients by the incoming gradient. Peak memory is one chunk's
logits (`CHUNK_ELEMENTS`) plus the gradients, whatever the batch. The semantics are HF's
`ForCausalLMLoss`: position t predicts label t+1, -100 is ignored, and the loss is the mean over scored
tokens (or the sum divided by `num_items_in_batch` when given, as HF's Trainer does under gradient
accumulation).
"""

from __future__ import annotations

import torch

from .ce_kernel import logits_ce_

IGNORE_INDEX = -100
# Logit elements per chunk: 2**28 is 512 MiB of bf16 logits, e.g. 2,093 tokens of a 128,256-token vocabulary.
CHUNK_ELEMENTS = 2**28


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T` against `targets`, gradients computed in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, divisor, chunk_tokens):  # hidden (N, H), weight (V, H), targets (N,)
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.weight_dtype = weight.dtype
        grad_hidden = torch.empty_like(hidden) if want_h else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_tokens):
            h, t = hidden[start : start + chunk_tokens], targets[start : start + chunk_tokens]
            logits = h @ weight.T  # (c, V) in the weight's dtype
            total += logits_ce_(logits, t, divisor, want_grad=want_h or want_w)
            if not (want_h or want_w):
                continue
            dlogits = logits  # overwritten in place: (softmax - onehot) / divisor
            if want_h:
                grad_hidden[start : start + chunk_tokens] = dlogits @ weight
            if want_w:
                _accumulate_fp32(grad_weight, dlogits.T, h)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total / divisor

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        grad_h = grad_hidden * grad_output.to(grad_hidden.dtype) if grad_hidden is not None else None
        grad_w = (grad_weight * grad_output).to(ctx.weight_dtype) if grad_weight is not None else None
        return grad_h, grad_w, None, None, None


_FP32_OUT_GEMM = {"ok": True}  # cleared if this torch build has no CUDA GEMM with an fp32 output


def _accumulate_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b. On CUDA with bf16/fp16 operands the GEMM accumulates straight into `acc`
    (cuBLAS with an fp32 C matrix), instead of writing a (V, H) product in the operands' dtype and adding
    it: for a 128k x 4096 head that is about 6 GB less memory traffic per chunk."""
    if acc.is_cuda and a.dtype != acc.dtype and _FP32_OUT_GEMM["ok"]:
        try:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            return
        except (RuntimeError, NotImplementedError, TypeError):
            _FP32_OUT_GEMM["ok"] = False
    acc.add_(a @ b)


def _chunk_tokens(vocab_size: int) -> int:
    return max(1, CHUNK_ELEMENTS // vocab_size)


def causal_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                   num_items_in_batch: int | torch.Tensor | None = None,
                   reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of the LM head `weight` (vocab, hidden) over `hidden` (batch, seq, hidden).

    `labels` (batch, seq) are aligned with the inputs, as HF takes them. `reduction="sum"` returns the
    summed token losses (the eval stage adds them up over batches).
    """
    targets = labels[:, 1:]
    scored = targets != IGNORE_INDEX
    hidden, targets = hidden[:, :-1][scored], targets[scored]  # (N, H), (N,): scored positions only
    if reduction == "sum":
        divisor = 1.0
    elif num_items_in_batch is not None:
        divisor = float(num_items_in_batch)
    else:
        divisor = float(max(1, targets.numel()))
    return _LinearCrossEntropy.apply(hidden, weight, targets, divisor, _chunk_tokens(weight.shape[0]))
