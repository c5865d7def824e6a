"""Training-step speed of the decoder stack: HF's Llama vs the TE layers in bf16 and each FP8 recipe.

A few Llama-shaped layers with a tiny vocabulary, so the layers dominate; forward and backward, no
optimizer. Baseline and candidates run in one process on one GPU from the same weights. Needs CUDA
and TE. Method and FLOP count: docs/performance.md ("What each bench measures").

    python bench/layer_speed.py --shape llama3.1-8b --layers 4 --batch 2 --seq 4096 --out layers.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import te_model  # noqa: E402
from bench import common, trace_gaps  # noqa: E402
from bench.trace_gaps import gpu_work  # noqa: E402

VOCAB = 1024
VARIANTS = {  # name: (model kind, FP8 recipe)
    "hf": ("hf", None), "torch_bf16": ("torch", None), "te_bf16": ("te", None),
    **{f"te_fp8_{r}": ("te", r) for r in ("delayed", "current", "block")},
    "te_fp8_delayed_attn": ("te", "delayed"),  # ... with the attention in FP8 too
    "te_fp8_delayed_device_plan": ("te", "delayed"),  # ... its plan and loss positions found on the GPU
}
LABELS = {"hf": "HF LlamaDecoderLayer, bf16 (baseline)", "torch_bf16": "torch backend, bf16",
          "te_bf16": "TE backend, bf16", "te_fp8_delayed": "TE backend, FP8 delayed",
          "te_fp8_current": "TE backend, FP8 current", "te_fp8_block": "TE backend, FP8 block",
          "te_fp8_delayed_attn": "TE backend, FP8 delayed + FP8 attention",
          "te_fp8_delayed_device_plan": "TE backend, FP8 delayed, planned on GPU"}


def stack_parser(doc: str) -> argparse.ArgumentParser:
    """The arguments every decoder-stack bench takes: shape, depth, tokens, steps, output."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--shape", default="llama3.1-8b", choices=sorted(common.SHAPES))
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", help="write the results as JSON here")
    return p


def chosen(p: argparse.ArgumentParser, flag: str, value: str, known) -> list[str]:
    """The comma-separated names of `value`, each one of `known`, else `flag`'s usage error."""
    names = [v for v in value.split(",") if v]
    unknown = set(names) - set(known)
    if unknown:
        p.error(f"{flag}: unknown {', '.join(sorted(unknown))}; choose from {', '.join(known)}")
    return names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = stack_parser(__doc__)
    p.add_argument("--variants", default=",".join(VARIANTS))
    args = p.parse_args(argv)
    args.variants = chosen(p, "--variants", args.variants, VARIANTS)
    return args


def layer_flops(config, batch: int, seq: int) -> float:
    """6 * (decoder layer parameters) * tokens + 6 * layers * batch * seq^2 * hidden."""
    h, kv = config.hidden_size, config.num_key_value_heads * config.hidden_size // config.num_attention_heads
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * config.intermediate_size + 2 * h
    layers = config.num_hidden_layers
    return 6 * per_layer * layers * batch * seq + common.attention_flops(layers, batch, seq, h)


def build(kind: str, config, state, device) -> torch.nn.Module:
    if kind == "hf":
        model = common.build_hf(config, torch.bfloat16, device)
        model.load_state_dict(state, strict=True)
    else:
        model = te_model.build_model(config, backend=kind, dtype=torch.bfloat16, device=device)
        common.load_hf_state(model, state)
    return model.train()


def time_steps(model, inputs, recipe, args, device, fp8_attention=False) -> tuple[list[float], float, float]:
    """(per-step milliseconds of forward+backward, peak GiB, GPU-busy milliseconds of one more step, profiled);
    `inputs()` makes a step's model inputs."""
    def step():
        with te_model.fp8_autocast(recipe, fp8_attention=fp8_attention):
            loss = model(**inputs()).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    timer = common.StepTimer(device)
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            timer.mark()
        step()
        if i >= args.warmup:
            timer.mark()
    peak = common.peak_gib(device)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize(device)
    spans = [(e.time_range.start, e.time_range.end) for e in gpu_work(prof.events())]
    return timer.step_ms(), peak, trace_gaps.busy_us(spans) / 1e3


def print_table(result: dict) -> None:
    run = result["run"]
    print(f"\n{result['environment']['device']}, {run['layers']} layers of {run['shape']} shape, "
          f"{run['batch']}x{run['seq']} tokens, fwd+bwd, median of {run['steps']}")
    print(f"{'variant':40s} {'ms/step':>8s} {'GPU busy':>8s} {'tokens/s':>10s} {'TFLOP/s':>8s} {'vs HF':>6s} "
          f"{'peak GiB':>9s}")
    for r in result["variants"]:
        if "step_ms" not in r:
            print(f"{r['label']:40s} skipped: {r['skipped']}")
            continue
        print(f"{r['label']:40s} {r['step_ms']:8.1f} {r['gpu_busy_ms']:8.1f} {r['tokens_per_s']:10.0f} {r['layer_tflops']:8.1f} "
              f"{common.fmt(r['speedup_vs_hf'], '5.2f')}x {r['peak_mem_gib']:9.1f}")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = common.setup_device("cuda")  # imports TE before any other CUDA work
    config = common.llama_config(args.shape, args.layers)
    config.vocab_size, config.tie_word_embeddings = VOCAB, False
    state = common.reference_state(config, torch.bfloat16, device, seed=0)
    ids = torch.randint(0, VOCAB, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    flops, tokens = layer_flops(config, args.batch, args.seq), args.batch * args.seq
    rows = []
    for name in args.variants:
        kind, recipe = VARIANTS[name]
        common.reset_peak(device)
        model = build(kind, config, state, device)
        try:
            def inputs():
                return common.step_inputs(kind, ids, device, planned_on_device=name.endswith("_device_plan"))

            times, peak, busy = time_steps(model, inputs, recipe, args, device, fp8_attention=name.endswith("_attn"))
        except te_model.FP8UnsupportedError as exc:  # the other variants still run
            rows.append({"variant": name, "label": LABELS[name], "skipped": str(exc)})
            continue
        finally:
            del model
            common.free_memory()
        ms = statistics.median(times)
        rows.append({"variant": name, "label": LABELS[name], "step_ms": ms, "step_ms_min": min(times),
                     "tokens_per_s": tokens / ms * 1e3, "layer_tflops": flops / ms / 1e9, "peak_mem_gib": peak,
                     "gpu_busy_ms": busy})
    base = next((r["step_ms"] for r in rows if r["variant"] == "hf" and "step_ms" in r), None)
    for r in rows:
        if "step_ms" in r:
            r["speedup_vs_hf"] = base / r["step_ms"] if base else None
    result = {"environment": common.environment(device),
              "run": {"shape": args.shape, "layers": args.layers, "batch": args.batch, "seq": args.seq,
                      "vocab": VOCAB, "steps": args.steps, "warmup": args.warmup, "layer_flops_per_step": flops},
              "variants": rows}
    common.write_json(args.out, result)
    print_table(result)
    return result


if __name__ == "__main__":
    main()
