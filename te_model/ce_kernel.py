"""Cross-entropy of a chunk of logits and its gradient, in one pass over memory where Triton can run.

The loss of a 128k-token vocabulary is dominated by memory traffic over the logits. The Triton kernel
reads each bf16 row twice and writes its gradient once, in place: no fp32 copy is made. The torch path
(CPU, or no Triton) does the same math with an fp32 copy of the chunk. `logits_ce_` picks one;
`TRITON_INTERPRET=1` runs the kernel on CPU tensors so the tests can check it against torch.
"""

from __future__ import annotations

import torch

from .triton_kernels import lazy_kernel, runs_on

BLOCK = 4096  # logits per program step: 16 per thread at 8 warps


def _build(triton, tl):
    @triton.jit
    def ce_rows(logits_ptr, stride, targets_ptr, loss_ptr, divisor, grad_ptr, grad_stride,
                VOCAB: tl.constexpr, WANT_GRAD: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        base = logits_ptr + row.to(tl.int64) * stride
        grad_base = grad_ptr + row.to(tl.int64) * grad_stride  # the logits row itself, or grad_out's
        cols = tl.arange(0, BLOCK)
        # Online log-sum-exp, one running (max, sum) per lane; a masked lane holds -1e30, whose exp is 0
        # against any real maximum (a row has at least one real logit).
        run_max = tl.full((BLOCK,), -1e30, tl.float32)
        run_sum = tl.zeros((BLOCK,), tl.float32)
        for start in range(0, VOCAB, BLOCK):
            x = tl.load(base + start + cols, mask=start + cols < VOCAB, other=-1e30).to(tl.float32)
            new_max = tl.maximum(run_max, x)
            run_sum = run_sum * tl.exp(run_max - new_max) + tl.exp(x - new_max)
            run_max = new_max
        row_max = tl.max(run_max, axis=0)
        lse = row_max + tl.log(tl.sum(run_sum * tl.exp(run_max - row_max), axis=0))
        target = tl.load(targets_ptr + row)
        tl.store(loss_ptr + row, lse - tl.load(base + target).to(tl.float32))
        if WANT_GRAD:
            for start in range(0, VOCAB, BLOCK):
                col = start + cols
                x = tl.load(base + col, mask=col < VOCAB, other=0.0).to(tl.float32)
                p = tl.exp(x - lse)
                p = tl.where(col == target, p - 1.0, p) / divisor
                tl.store(grad_base + col, p.to(grad_ptr.dtype.element_ty), mask=col < VOCAB)

    return ce_rows


_triton_kernel = lazy_kernel(_build)  # the kernel, compiled on first use, or None without Triton


def triton_available() -> bool:
    return _triton_kernel() is not None


def triton_usable(logits: torch.Tensor, grad_out: torch.Tensor | None = None) -> bool:
    """Whether `logits_ce_` takes the Triton path for these tensors."""
    on_device = runs_on(logits)
    rows_contiguous = all(t.stride(-1) == 1 for t in (logits, grad_out) if t is not None)
    return on_device and rows_contiguous and _triton_kernel() is not None


def logits_ce_(logits: torch.Tensor, targets: torch.Tensor, divisor: float, want_grad: bool,
               *, grad_out: torch.Tensor | None = None, use_triton: bool | None = None) -> torch.Tensor:
    """Summed cross-entropy of `logits` (N, V) against `targets` (N,), as an fp32 scalar tensor.

    Each row's loss is `logsumexp(row) - row[target]`, summed in fp32. With `want_grad`, the gradient of
    (that sum / `divisor`), `(softmax(row) - onehot(target)) / divisor`, overwrites `logits`. The logits
    keep their dtype (bf16 in training); the math runs in fp32, as HF's loss does after its `.float()`.
    `grad_out` (N, V), when given, takes the gradient instead, in its own dtype. The FP8 head passes an
    E5M2 tensor, so the gradient is cast once from fp32 and no bf16 copy is written.

    Triton: one program per row reads the row twice (an online log-sum-exp, then the gradient) and
    writes it once, 6 bytes per bf16 logit. torch: upcast, `logsumexp`, softmax in the fp32 buffer,
    cast back; several kernels and one fp32 copy of the chunk.
    """
    if grad_out is not None and grad_out.shape != logits.shape:
        raise ValueError(f"grad_out has shape {tuple(grad_out.shape)}, the logits {tuple(logits.shape)}")
    if use_triton is None:
        use_triton = triton_usable(logits, grad_out)
    grad_out = logits if grad_out is None else grad_out
    return (_triton_ce_ if use_triton else _torch_ce_)(logits, targets, divisor, want_grad, grad_out)


def _triton_ce_(logits, targets, divisor, want_grad, grad_out):
    rows, vocab = logits.shape
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows:
        _triton_kernel()[(rows,)](logits, logits.stride(0), targets, loss, float(divisor), grad_out,
                                  grad_out.stride(0), VOCAB=vocab, WANT_GRAD=want_grad, BLOCK=BLOCK,
                                  num_warps=8)
    return loss.sum()


def _torch_ce_(logits, targets, divisor, want_grad, grad_out):
    x = logits.float()  # the very tensor when logits are already fp32
    lse = torch.logsumexp(x, dim=-1)
    loss = (lse - x.gather(1, targets[:, None]).squeeze(1)).sum()
    if want_grad:
        probs = x.sub_(lse[:, None]).exp_()  # softmax, in the fp32 buffer
        probs[torch.arange(len(targets), device=targets.device), targets] -= 1.0
        probs.div_(divisor)
        if probs.data_ptr() != grad_out.data_ptr():
            grad_out.copy_(probs)
    return loss
