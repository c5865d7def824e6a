"""The LM head's three GEMMs in FP8: `torch._scaled_mm` with per-tensor scales.

With a 128k vocabulary the head is a large share of a step's FLOPs. Unlike the decoder layers, it stays
bf16 under TE's autocast. This runs its GEMMs on the FP8 tensor cores, as TE's HYBRID recipes do
inside the layers (`FP8HeadGemms` has the details). Its rounding reaches the logits directly, with no
later layer to average it out; fine-tuned at a 128k vocabulary it reaches the bf16 head's held-out loss
(`bench/finetune_quality.py --vocab`). The model's `fp8_head` switches it on; the pipeline does so for
FP8 training wherever the head's sizes fit (`train.fp8_head`). `bench/train_step.py` measures both heads.
"""

from __future__ import annotations

import torch

from .fp8_kernels import scaled_cast, transpose

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
GRAD_SHIFT = 2.0**15  # |softmax - onehot| <= 1, times 2**15 stays under E5M2's max of 57344
ALIGN = 16


def quantize(t: torch.Tensor, dtype=E4M3) -> tuple[torch.Tensor, torch.Tensor]:
    """(t / scale as `dtype`, scale): current scaling, the tensor's amax mapped to the format's max."""
    amax = torch.linalg.vector_norm(t, float("inf"), dtype=torch.float32)  # no |t| copy of the tensor
    scale = (amax / torch.finfo(dtype).max).clamp(min=1e-12)
    return scaled_cast(t.contiguous(), scale, dtype), scale


def unfit_reason(hidden_size: int, vocab_size: int) -> str | None:
    """Why a head of these sizes cannot run its GEMMs in FP8 (`_scaled_mm` needs multiples of 16); None if it can."""
    for name, size in (("hidden size", hidden_size), ("vocabulary", vocab_size)):
        if size % ALIGN:
            return f"the {name} ({size}) must be divisible by {ALIGN}"
    return None


def _padded_rows(t: torch.Tensor) -> torch.Tensor:
    extra = -t.shape[0] % ALIGN
    return torch.nn.functional.pad(t, (0, 0, 0, extra)) if extra else t


class FP8HeadGemms:
    """The FP8 counterpart of `te_model.loss.HeadGemms`, for one forward pass of the loss.

    - forward          logits = h @ W.T       h, W in E4M3, each scaled by its own amax
    - input gradient   dh = dlogits @ W       dlogits in E5M2
    - weight gradient  dW = dlogits.T @ h     accumulated in fp32 over chunks (one chunk: bf16)

    `softmax - onehot` is bounded by 1 in magnitude, so the gradient's scale is fixed. The loss kernel
    writes `(softmax - onehot) * 2**15` straight into an E5M2 buffer (`grad_divisor`; a power of two, so
    exact). That stays within E5M2's range with no amax pass, no bf16 gradient and no separate cast. The
    GEMMs undo `divisor * 2**15`. Logits come out in bf16, and the loss itself runs in fp32 as on the
    bf16 path. `_scaled_mm` needs every GEMM dimension divisible by 16, so a chunk's rows are
    zero-padded to 16; padding rows carry no gradient.

    The GEMMs promote their partial sums to fp32 every few blocks, as TE's gradient GEMMs do by default.
    `fast_accumulation` runs two of them with Hopper's fast accumulation instead: the logits (a reduction
    over the hidden size, like TE's forward GEMMs) and the weight gradient (over a chunk's tokens, like
    TE's weight-gradient GEMMs under `train.fp8_fast_accumulation`). The input gradient's reduction runs
    over the whole vocabulary, 128k terms for Llama 3, and keeps the promotion.
    """

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, divisor: float, fast_accumulation: bool = False):
        reason = unfit_reason(weight.shape[1], weight.shape[0])
        if reason:
            raise ValueError(f"fp8 head: {reason}")
        self.dtype = weight.dtype
        self.wq, self.w_scale = quantize(weight)  # (V, H) row-major: W.T as the column-major operand
        self.wq_t = None  # (H, V), made on first use by grad_hidden
        self.hidden = hidden
        self.grad_divisor = 1.0 / GRAD_SHIFT  # what the loss divides (softmax - onehot) by: x 2**15
        # made on the device (a fill): a tensor copied from a host float would wait for the GPU to catch up
        self.grad_scale = torch.full((), 1.0 / (divisor * GRAD_SHIFT), dtype=torch.float32, device=weight.device)
        self.hq = self.h_scale = None
        self.fast_accumulation = fast_accumulation

    def logits(self, start: int, stop: int) -> torch.Tensor:
        self.hq, self.h_scale = quantize(_padded_rows(self.hidden[start:stop]))  # (c', H), c' = c rounded up
        return torch._scaled_mm(self.hq, self.wq.t(), scale_a=self.h_scale, scale_b=self.w_scale,
                                out_dtype=self.dtype, use_fast_accum=self.fast_accumulation)

    @staticmethod
    def grad_buffer(logits: torch.Tensor, rows: int) -> torch.Tensor:
        """Where the loss writes this chunk's gradient: E5M2, the GEMMs' padding rows (past `rows`) zero."""
        dq = torch.empty(logits.shape, dtype=E5M2, device=logits.device)
        dq[rows:] = 0  # padding rows carry no gradient
        return dq

    def grad_hidden(self, dq: torch.Tensor) -> torch.Tensor:
        if self.wq_t is None:
            self.wq_t = transpose(self.wq)
        return torch._scaled_mm(dq, self.wq_t.t(), scale_a=self.grad_scale, scale_b=self.w_scale,
                                out_dtype=self.dtype, use_fast_accum=False)

    def grad_weight(self, dq, start: int, stop: int, acc: torch.Tensor | None, final: bool) -> torch.Tensor:
        product = torch._scaled_mm(transpose(dq), transpose(self.hq).t(), scale_a=self.grad_scale,
                                   scale_b=self.h_scale, out_dtype=self.dtype if final else torch.float32,
                                   use_fast_accum=self.fast_accumulation)
        if acc is None:
            return product
        return acc.add_(product)
