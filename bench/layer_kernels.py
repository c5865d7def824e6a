"""Where the decoder stack's GPU time goes, by kind of kernel, with TE's attention in each layout.

Our TE decoder layers at a Llama shape, forward and backward of the stack alone, from the same weights
and input, with attention in THD (our layout), BSHD and SBHD, and FP8 attention where Hopper trains it.
Per layout: step time, TFLOP/s, the output difference from THD, and kernel time by kind. Needs CUDA
and TE. Method: docs/performance.md ("What each bench measures").

    python bench/layer_kernels.py --fp8 delayed --out kernels.json
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import te_model  # noqa: E402
from bench import common, kernel_kinds, layer_speed, packing  # noqa: E402
from te_model.rope import angles_table  # noqa: E402

LAYOUTS = ("thd", "bshd", "sbhd", "bshd-fp8attn", "sbhd-fp8attn")
FP8_ATTENTION = "-fp8attn"
COLUMNS = kernel_kinds.LAYER_KINDS + ("other",)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = layer_speed.stack_parser(__doc__)
    p.add_argument("--fp8", default="delayed", help="FP8 recipe, or none for bf16")
    p.add_argument("--layouts", help=f"comma-separated, of {', '.join(LAYOUTS)} (default: all the recipe can run)")
    args = p.parse_args(argv)
    bf16 = args.fp8 == "none"
    if args.layouts is None:
        args.layouts = [layout for layout in LAYOUTS if not (bf16 and layout.endswith(FP8_ATTENTION))]
    else:
        args.layouts = layer_speed.chosen(p, "--layouts", args.layouts, LAYOUTS)
        if bf16 and any(layout.endswith(FP8_ATTENTION) for layout in args.layouts):
            p.error(f"--layouts: the {FP8_ATTENTION} layouts need an FP8 recipe (--fp8)")
    return args


class Stack:
    """The decoder layers of our TE model in one attention layout, called on (B, S, H) hidden states."""

    def __init__(self, model, layout: str, config, device):
        self.fp8_attention = layout.endswith(FP8_ATTENTION)
        layout = layout.removesuffix(FP8_ATTENTION)
        self.layout, self.layers = layout, list(model.model.layers)
        self.inv_freq = model.model.rotary_emb.inv_freq
        if layout != "thd":
            twin = packing.layout_layer_class(layout, "causal")
            with torch.device(device), common.default_dtype(torch.bfloat16):
                self.layers = [twin(config, i) for i in range(len(self.layers))]
            for mine, theirs in zip(self.layers, model.model.layers):
                # weights only: TE's FP8 scaling state is pickled extra state, which TE (rightly) refuses to
                # load; each stack keeps its own, fed the same steps
                weights = {k: v for k, v in theirs.state_dict().items() if not k.endswith("_extra_state")}
                missing, unexpected = mine.load_state_dict(weights, strict=False)
                assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
        self.params = [p for layer in self.layers for p in layer.parameters()]

    def __call__(self, x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
        if self.layout == "thd":  # our layer's own call, with the plan of plain rows (one segment each)
            plan = te_model.plan_attention(*x.shape[:2]).to(x.device)  # made on the host, as in training
            plan = dataclasses.replace(plan, rope_angles=angles_table(self.inv_freq, plan.max_seqlen))
            for layer in self.layers:
                x = layer(x, attention_plan=plan)
            return x
        if self.layout == "sbhd":
            x = x.transpose(0, 1).contiguous()
        for layer in self.layers:
            x = layer(x, angles)
        return x.transpose(0, 1) if self.layout == "sbhd" else x


def step(stack: Stack, x: torch.Tensor, grad: torch.Tensor, angles: torch.Tensor, recipe) -> torch.Tensor:
    with te_model.fp8_autocast(recipe, fp8_attention=stack.fp8_attention, attention_layout=stack.layout):
        out = stack(x, angles)
    out.backward(grad)
    for p in stack.params:
        p.grad = None
    return out


def measure(stack: Stack, x, grad, angles, recipe, args, device) -> dict:
    timer = common.StepTimer(device)
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            timer.mark()
        out = step(stack, x, grad, angles, recipe)
        if i >= args.warmup:
            timer.mark()
    ms = statistics.median(timer.step_ms())
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step(stack, x, grad, angles, recipe)
        torch.cuda.synchronize()
    found = kernel_kinds.breakdown(prof, steps=1)
    by_kind = found["kernel_ms"]
    by_kind["gemm"] = by_kind.get("gemm", 0.0) + by_kind.pop("gemm fp8", 0.0)  # bf16 and FP8 GEMMs, one column
    attention = {name for name, _, _ in kernel_kinds.work(prof) if kernel_kinds.kind_of(name) == "attention"}
    return {"step_ms": ms, "kernel_ms": by_kind, "output": out.detach().float(),
            "other_top": found["other_top"], "kernels_top": found["kernels_top"],
            "attention_kernels": sorted(attention)}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = common.setup_device("cuda")  # imports TE before any other CUDA work
    recipe = None if args.fp8 == "none" else args.fp8
    config = common.llama_config(args.shape, args.layers)
    config.vocab_size, config.tie_word_embeddings = layer_speed.VOCAB, False
    state = common.reference_state(config, torch.bfloat16, device, seed=0)
    model = layer_speed.build("te", config, state, device)
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (args.batch, args.seq, config.hidden_size)
    x = torch.randn(shape, generator=gen, device=device, dtype=torch.bfloat16).requires_grad_()
    grad = torch.randn(shape, generator=gen, device=device, dtype=torch.bfloat16) * 1e-2
    angles = angles_table(model.model.rotary_emb.inv_freq, args.seq)
    flops = layer_speed.layer_flops(config, args.batch, args.seq)
    rows, reference = [], None
    for layout in args.layouts:
        common.reset_peak(device)
        r = measure(Stack(model, layout, config, device), x, grad, angles, recipe, args, device)
        out = r.pop("output")
        reference = out if reference is None else reference
        rows.append({"layout": layout, **r, "tflops": flops / r["step_ms"] / 1e9,
                     "max_abs_diff_vs_first": float((out - reference).abs().max()),
                     "peak_mem_gib": common.peak_gib(device)})
        x.grad = None
        common.free_memory()
    result = {"environment": common.environment(device),
              "run": {k: getattr(args, k) for k in ("shape", "layers", "batch", "seq", "steps", "warmup", "fp8")},
              "layouts": rows}
    common.write_json(args.out, result)
    print_table(result)
    return result


def print_table(result: dict) -> None:
    run = result["run"]
    kinds = COLUMNS
    print(f"\n{result['environment']['device']}, {run['layers']} layers of {run['shape']} shape, "
          f"{run['batch']}x{run['seq']} tokens, stack fwd+bwd, fp8 {run['fp8']}, median of {run['steps']}; "
          "kernel ms of one profiled step")
    print(f"{'layout':12s} {'ms/step':>8s} {'TFLOP/s':>8s} {'max diff':>9s} " + " ".join(f"{k[:10]:>10s}" for k in kinds))
    for r in result["layouts"]:
        print(f"{r['layout']:12s} {r['step_ms']:8.2f} {r['tflops']:8.1f} {r['max_abs_diff_vs_first']:9.2e} "
              + " ".join(f"{r['kernel_ms'].get(k, 0.0):10.2f}" for k in kinds))
    for r in result["layouts"]:
        print(f"{r['layout']} other: " + "; ".join(f"{name} {ms:.2f}" for name, ms in r["other_top"]))
    for r in result["layouts"]:
        print(f"{r['layout']} largest kernels (ms, calls):")
        for name, ms, calls in r["kernels_top"]:
            print(f"  {ms:7.2f} {calls:4d}  {name}")


if __name__ == "__main__":
    main()
