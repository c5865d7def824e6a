"""The least a training step of a Llama shape can take on this GPU doing the same math: its GEMMs and its
attention alone, with nothing else (no casts, norms, activations, loss, optimizer or host work).

Per decoder layer, the forward GEMMs (Q/K/V, attention output, gate and up, down), causal attention, then
in reverse order attention's backward and each GEMM's data and weight gradients; the LM head's three GEMMs
likewise. On a GPU that runs FP8 (sm_89 and later) the GEMMs are FP8 through `torch._scaled_mm`: E4M3
weights and activations, E5M2 gradients, bf16 out, fast accumulation, every operand already cast and laid
out as cuBLAS wants it (the casts are the step's work, not this one's); `--gemms bf16` runs them in bf16.
Attention is bf16 through `scaled_dot_product_attention` with cuDNN's kernels (`--attention`), its K/V heads
shared by query heads as in the model (GQA) where the kernels take that, else repeated to the query heads
once before the timed steps (the same FLOPs, more bytes). Elsewhere (CPU) the GEMMs run in fp32.

Timed: three rows, the GEMMs alone, attention alone, both, each the median of `--steps` after `--warmup`,
with NVML's SM clock and board power over its timed steps (`bench.common.GpuSampler`). Where the GPU is
at its power limit a step's time is the energy it needs: what the whole step takes beyond the "both" row
is the price of everything else, and a goal below that row cannot be met with this math on this GPU.

    python bench/step_floor.py --shape llama3.1-8b --layers 32 --batch 2 --seq 4096
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
ATTENTION = ("cudnn", "flash", "efficient", "math")


@dataclass(frozen=True)
class Gemm:
    """One linear layer of the step: `tokens` rows through a weight of `out_features` x `in_features`."""
    out_features: int
    in_features: int


def linear_layers(config) -> list[Gemm]:
    """A decoder layer's linear layers, as the model runs them (Q/K/V as one, gate and up as one)."""
    h, heads, kv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    d = h // heads
    return [Gemm((heads + 2 * kv) * d, h),  # Q/K/V
            Gemm(h, heads * d),  # attention output
            Gemm(2 * config.intermediate_size, h),  # gate and up
            Gemm(h, config.intermediate_size)]  # down


def gemm_flops(gemms: list[Gemm], tokens: int) -> float:
    """Forward, data-gradient and weight-gradient GEMMs: 3 x 2 x tokens x out x in each."""
    return sum(6 * tokens * g.out_features * g.in_features for g in gemms)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama3.1-8b", choices=sorted(common.SHAPES))
    p.add_argument("--layers", type=int, help="decoder layers (default: the shape's)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--gemms", choices=("fp8", "bf16"), default="fp8", help="the GEMMs' inputs on a GPU")
    p.add_argument("--attention", choices=ATTENTION, default="cudnn", help="SDPA's kernels on a GPU")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.batch < 1 or args.seq < 16 or args.seq % 16:
        p.error("--steps and --batch must be >= 1, --warmup >= 0, --seq a multiple of 16")
    return args


def operand_bytes(config, batch: int, seq: int, gemm_itemsize: int, attention_itemsize: int) -> int:
    """What the floor holds before its first step: every linear layer's operands with their transposes
    (weight, input, output gradient; the head's too) and attention's Q, K, V and output gradient."""
    tokens = batch * seq
    gemms = linear_layers(config) * config.num_hidden_layers + [Gemm(config.vocab_size, config.hidden_size)]
    linear = sum(2 * (g.out_features * g.in_features + tokens * (g.in_features + g.out_features)) for g in gemms)
    d = config.hidden_size // config.num_attention_heads
    attention = batch * seq * d * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)
    return linear * gemm_itemsize + attention * attention_itemsize


def check_fits(need: int, free: int, layers: int, device: str) -> None:
    """Stop with one line, before anything is allocated, when the operands alone cannot fit."""
    if need > free:
        raise SystemExit(f"step_floor: the operands of {layers} layers need {need / 2**30:.1f} GiB and {device} has "
                         f"{free / 2**30:.1f} GiB free; pass fewer --layers (each holds its own)")


class Operands:
    """One linear layer's operands, cast and laid out before the timed steps: the weight and its transpose,
    the input and its transpose, the output's gradient and its transpose."""

    def __init__(self, gemm: Gemm, tokens: int, dtypes: tuple[torch.dtype, torch.dtype], device: torch.device,
                 generator: torch.Generator):
        forward, backward = dtypes

        def made(rows: int, cols: int, dtype: torch.dtype, std: float) -> tuple[torch.Tensor, torch.Tensor]:
            x = (torch.randn(rows, cols, device=device, generator=generator) * std).to(dtype)
            return x, x.t().contiguous()

        self.w, self.wt = made(gemm.out_features, gemm.in_features, forward, 0.02)
        self.x, self.xt = made(tokens, gemm.in_features, forward, 1.0)
        self.dy, self.dyt = made(tokens, gemm.out_features, backward, 1e-3)


class Floor:
    """The step's GEMMs and attention over `config`'s layers and head."""

    def __init__(self, config, batch: int, seq: int, gemms: str, attention: str, device: torch.device):
        self.device = device
        self.fp8 = device.type == "cuda" and gemms == "fp8"
        if self.fp8 and torch.cuda.get_device_capability(device) < (8, 9):
            raise SystemExit(f"--gemms fp8 needs compute capability 8.9 or later; {torch.cuda.get_device_name(device)} "
                             "has less (use --gemms bf16)")
        dtypes = ((E4M3, E5M2) if self.fp8 else (torch.bfloat16,) * 2) if device.type == "cuda" else (torch.float32,) * 2
        self.gemms_label = "FP8 (E4M3 x E4M3, E5M2 x E4M3)" if self.fp8 else str(dtypes[0]).replace("torch.", "")
        self.attention_label = attention if device.type == "cuda" else "math"
        self.backend = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                        "math": "MATH"}[self.attention_label]
        tokens = batch * seq
        attn_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        if device.type == "cuda":
            check_fits(operand_bytes(config, batch, seq, dtypes[0].itemsize, attn_dtype.itemsize),
                       torch.cuda.mem_get_info(device)[0], config.num_hidden_layers, torch.cuda.get_device_name(device))
        generator = torch.Generator(device=device).manual_seed(0)
        self.layer_gemms = linear_layers(config)
        self.head = Gemm(config.vocab_size, config.hidden_size)
        self.layers = [[Operands(g, tokens, dtypes, device, generator) for g in self.layer_gemms]
                       for _ in range(config.num_hidden_layers)]
        self.head_operands = Operands(self.head, tokens, dtypes, device, generator)
        heads, kv, d = config.num_attention_heads, config.num_key_value_heads, config.hidden_size // config.num_attention_heads

        def made(count: int) -> torch.Tensor:
            return torch.randn(batch, count, seq, d, device=device, dtype=attn_dtype, generator=generator)

        self.qkv, self.gqa = [made(heads), made(kv), made(kv)], kv < heads
        self.grad_out = made(heads)
        if self.gqa:
            try:
                self.sdpa()
                self.attention_label += ", GQA"
            except RuntimeError:  # these kernels take no GQA: as many K/V heads as queries, the same FLOPs
                self.qkv[1:] = [t.repeat_interleave(heads // kv, dim=1) for t in self.qkv[1:]]
                self.gqa = False
                self.attention_label += ", K/V repeated to the query heads"
        self.flops = {"gemms": gemm_flops(self.layer_gemms, tokens) * config.num_hidden_layers
                      + gemm_flops([self.head], tokens),
                      "attention": common.attention_flops(config.num_hidden_layers, batch, seq, config.hidden_size)}
        self.flops["both"] = self.flops["gemms"] + self.flops["attention"]
        self.one = torch.ones((), device=device)

    def mm(self, a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
        """a @ b_t.T, where `b_t` is row-major (cuBLAS's column-major B)."""
        if self.fp8:
            return torch._scaled_mm(a, b_t.t(), self.one, self.one, out_dtype=torch.bfloat16, use_fast_accum=True)
        return a @ b_t.t()

    def forward_gemms(self, ops: Operands) -> None:
        self.mm(ops.x, ops.w)  # y = x W^T

    def backward_gemms(self, ops: Operands) -> None:
        self.mm(ops.dy, ops.wt)  # dx = dy W
        self.mm(ops.dyt, ops.xt)  # dW = dy^T x

    def sdpa(self) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Causal attention's output and its inputs, whose gradients backward takes."""
        with sdpa_kernel(getattr(SDPBackend, self.backend)):
            q, k, v = (t.detach().requires_grad_() for t in self.qkv)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.gqa), (q, k, v)

    def step(self, gemms: bool, attention: bool) -> None:
        """One step's forward then backward: per layer, GEMMs around attention; the head after the last."""
        saved = []
        for ops in self.layers:
            if gemms:
                self.forward_gemms(ops[0])
            if attention:
                saved.append(self.sdpa())
            if gemms:
                for o in ops[1:]:
                    self.forward_gemms(o)
        if gemms:
            self.forward_gemms(self.head_operands)
            self.backward_gemms(self.head_operands)
        for ops in reversed(self.layers):
            if gemms:
                for o in reversed(ops[1:]):
                    self.backward_gemms(o)
            if attention:
                out, inputs = saved.pop()
                torch.autograd.grad(out, inputs, self.grad_out)
            if gemms:
                self.backward_gemms(ops[0])


def measure(floor: Floor, gemms: bool, attention: bool, args) -> dict:
    """Median ms of `floor.step`, with the GPU's clock and power over the timed steps."""
    for _ in range(args.warmup):
        floor.step(gemms, attention)
    timer, sampler = common.StepTimer(floor.device), common.GpuSampler(floor.device)
    sampler.start()
    try:
        timer.mark()
        for _ in range(args.steps):
            floor.step(gemms, attention)
            timer.mark()
        ms = statistics.median(timer.step_ms())
    finally:
        sampler.stop()
    row = {"ms": ms}
    gpu = sampler.summary(ms)
    if gpu:
        row["gpu"] = gpu
    return row


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = common.setup_device(args.device)
    config = common.llama_config(args.shape, args.layers)
    floor = Floor(config, args.batch, args.seq, args.gemms, args.attention, device)
    rows = {}
    for name, gemms, attention in (("gemms", True, False), ("attention", False, True), ("both", True, True)):
        print(f"[step_floor] {name} ...", file=sys.stderr, flush=True)
        rows[name] = measure(floor, gemms, attention, args)
        rows[name]["tflops"] = floor.flops[name] / rows[name]["ms"] / 1e9
        common.free_memory()
    env = common.environment(device)
    print(f"{env['device']}, {args.shape} ({config.num_hidden_layers} layers), {args.batch}x{args.seq} tokens; "
          f"GEMMs {floor.gemms_label}, attention SDPA {floor.attention_label}; median of {args.steps}")
    print(f"{'work':12s} {'ms/step':>8s} {'TFLOP/s':>8s} {'SM MHz':>7s} {'watts':>6s} {'J/step':>7s}")
    for name, row in rows.items():
        g = row.get("gpu") or {}
        print(f"{name:12s} {row['ms']:8.1f} {row['tflops']:8.1f} {common.fmt(g.get('sm_clock_mhz'), '.0f'):>7s} "
              f"{common.fmt(g.get('power_w'), '.0f'):>6s} {common.fmt(g.get('joules_per_step'), '.1f'):>7s}")
    result = dict(environment=env, run=dict(shape=args.shape, layers=config.num_hidden_layers, batch=args.batch,
                                            seq=args.seq, gemms=floor.gemms_label, attention=floor.attention_label,
                                            steps=args.steps, warmup=args.warmup, flops=floor.flops), rows=rows)
    common.write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
