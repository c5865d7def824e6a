"""A profiled step's GPU time by kind of kernel: GEMMs (FP8 apart), attention, optimizer, loss, embedding...

Kernels are sorted into kinds by their names, first match wins. On a GPU the kernels' own times are
summed. On a CPU (the benches' CI path) the operators' self times stand in for kernels, so a CPU run
gives the same tables, with torch's operator names. `busy_ms` is the time at least one kernel ran
(overlaps counted once): a step's wall time less it is when the GPU sat idle.
"""

from __future__ import annotations

from collections import defaultdict

from bench.trace_gaps import busy_us, gpu_work

# (kind, substrings of the lower-cased kernel name); the step-level kinds come before the layer's, so an
# optimizer's or the loss's elementwise kernels are not counted as "cast/transpose/amax" or "other"
KINDS = (
    ("optimizer", ("adam",)),
    ("attention", ("fmha", "flash", "sdpa", "attn", "cudnn")),
    ("loss", ("ce_rows", "linearcrossentropy", "cross_entropy", "log_softmax", "nll_loss", "logsumexp")),
    ("embedding", ("embedding", "indexselect", "index_select", "radixsort", "krn_partial", "compute_grad_weight",
                   "sum_and_scatter")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "matmul", "aten::mm", "addmm", "bmm")),
    ("rope", ("rope", "rotary")),
    ("norm", ("norm",)),
    ("swiglu", ("swiglu", "glu", "silu", "gated")),
    ("cast/transpose/amax", ("cast", "transpose", "quantize", "amax", "scale", "fp8")),
)
LAYER_KINDS = ("attention", "gemm", "rope", "norm", "swiglu", "cast/transpose/amax")
# in a GEMM kernel's name, the marks of FP8 operands: CUTLASS's "e4m3"/"e5m2", cuBLAS's nvjet kernels'
# "q" (E4M3) and "r" (E5M2) operand letters ("nvjet_sm90_qrtst_...": an E4M3 by E5M2 gradient GEMM)
FP8_GEMM = ("e4m3", "e5m2", "_qq", "_qr", "_rq")


def kind_of(name: str) -> str:
    low = name.lower()
    kind = next((kind for kind, keys in KINDS if any(k in low for k in keys)), "other")
    if kind == "gemm" and any(mark in low for mark in FP8_GEMM):
        return "gemm fp8"
    return kind


def work(prof) -> list[tuple[str, float, float]]:
    """(name, start us, ms) of the profile's GPU kernels, copies and fills; on a CPU-only profile, of its
    operators, each with its self time (time in its children is theirs)."""
    events = prof.events()
    gpu = [(e.name, e.time_range.start, e.time_range.elapsed_us() / 1e3) for e in gpu_work(events)]
    return gpu or [(e.name, e.time_range.start, e.self_cpu_time_total / 1e3) for e in events
                   if not getattr(e, "is_user_annotation", False) and e.self_cpu_time_total > 0]


def breakdown(prof, steps: int, top: int = 12) -> dict:
    """Per profiled step: ms by kind, busy ms, the largest kernels (name, ms, calls) and the other kind's."""
    by_kind, kernels, calls = defaultdict(float), defaultdict(float), defaultdict(int)
    found = work(prof)
    for name, _, ms in found:
        by_kind[kind_of(name)] += ms / steps
        kernels[name[:90]] += ms / steps
        calls[name[:90]] += 1
    largest = sorted(kernels.items(), key=lambda kv: -kv[1])
    busy_ms = busy_us([(start, start + ms * 1e3) for _, start, ms in found]) / 1e3
    return {"kernel_ms": dict(by_kind), "busy_ms": busy_ms / steps,
            "kernels_top": [(name, ms, calls[name] // steps) for name, ms in largest[:top]],
            "other_top": [(name, ms) for name, ms in largest if kind_of(name) == "other"][:6]}
