"""Causal-LM cross-entropy straight from the last hidden states, without a (batch, seq, vocab) logits tensor.

Why it exists: with Llama 3's 128,256-token vocabulary the logits are the largest activation of the
model. HF's `LlamaForCausalLM` computes them in bf16 for every position, casts them to fp32 for the loss,
and cross-entropy's backward makes one more fp32 tensor of the same size: about 8 GiB each for 8 x 2048
tokens. Here only the positions that are scored (label not -100) are projected, a chunk of tokens at a
time, and each chunk's gradients are computed as soon as its logits are:

    logits = h @ W.T              (c, V) in the weight's dtype, upcast to fp32 for log-softmax
    loss  += logsumexp(logits) - logits[target]
    dlogits = softmax(logits) - onehot(target), scaled by 1 / tokens
    dh = dlogits @ W ;  dW += dlogits.T @ h

The forward pass does the backward's two matmuls, so there is no recomputation and no extra FLOPs; the
backward pass only scales the stored gradients by the incoming gradient. Peak memory is one chunk's
logits (`CHUNK_ELEMENTS`) plus the gradients, whatever the batch. The semantics are HF's
`ForCausalLMLoss`: position t predicts label t+1, -100 is ignored, and the loss is the mean over scored
tokens (or the sum divided by `num_items_in_batch` when given, as HF's Trainer does under gradient
accumulation).
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
# Logit elements per chunk: 2**28 fp32 values is 1 GiB, e.g. 2,093 tokens of a 128,256-token vocabulary.
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
            logits = (h @ weight.T).float()  # (c, V)
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if not (want_h or want_w):
                continue
            probs = logits.sub_(lse[:, None]).exp_()  # softmax, in the logits' buffer
            probs[torch.arange(len(t), device=t.device), t] -= 1.0
            dlogits = probs.div_(divisor).to(weight.dtype)
            if want_h:
                grad_hidden[start : start + chunk_tokens] = dlogits @ weight
            if want_w:
                grad_weight.add_(dlogits.T @ h)  # accumulated in fp32 over chunks
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total / divisor

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        grad_h = grad_hidden * grad_output.to(grad_hidden.dtype) if grad_hidden is not None else None
        grad_w = (grad_weight * grad_output).to(ctx.weight_dtype) if grad_weight is not None else None
        return grad_h, grad_w, None, None, None


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
