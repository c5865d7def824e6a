"""The clipping norm alone: torch's `get_total_norm` against `pipeline.train.grad_norm.total_norm` at several
program sizes, over bf16 gradients of a model shape's parameter sizes (the HF model's, on the meta device).

Each way is checked against the float64 norm first, then timed: the median of `--reps` calls back to back
(`common.kernel_median_ms`).
Reported: ms per call and the gradients' bytes over that time.

    python bench/grad_norm.py --shape llama3.1-8b
    python bench/grad_norm.py --shape llama3.2-1b --layers 16 --programs 8192x1x8,4096x8x8
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import LlamaForCausalLM  # noqa: E402

from bench import common  # noqa: E402
from pipeline.train import grad_norm  # noqa: E402

PROGRAMS = f"8192x1x8,{grad_norm.BLOCK}x{grad_norm.ITERS}x{grad_norm.WARPS},2048x8x8,4096x16x8,8192x8x16"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama3.2-1b", choices=sorted(common.SHAPES))
    p.add_argument("--layers", type=int, help="decoder layers (default: the shape's)")
    p.add_argument("--programs", default=PROGRAMS,
                   help="comma-separated BLOCKxITERSxWARPS of the kernel's programs (the default's first: the "
                        "kernel with one block a program)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    raw = args.programs
    try:
        args.programs = [tuple(int(x) for x in item.split("x")) for item in raw.split(",")]
        if any(len(t) != 3 for t in args.programs):
            raise ValueError
    except ValueError:
        p.error(f"--programs {raw!r}: expected BLOCKxITERSxWARPS[,...], e.g. 4096x8x8")
    return args


def gradient_shapes(shape: str, layers: int | None) -> list[torch.Size]:
    with torch.device("meta"):
        model = LlamaForCausalLM(common.llama_config(shape, layers))
    return [p.shape for p in model.parameters()]


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type != "cuda":
        raise SystemExit("bench/grad_norm.py times GPU kernels: run it on a CUDA device")
    gen = torch.Generator(device=device).manual_seed(0)
    grads = [torch.randn(s, generator=gen, device=device, dtype=torch.bfloat16)
             for s in gradient_shapes(args.shape, args.layers)]
    if not grad_norm.usable(grads):
        raise SystemExit("pipeline.train.grad_norm cannot run here (no Triton?)")
    exact = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))
    ways = {"torch get_total_norm": functools.partial(torch.nn.utils.get_total_norm, grads)}
    for block, iters, warps in args.programs:
        ways[f"kernel {block}x{iters}x{warps}"] = functools.partial(grad_norm.total_norm, grads, block=block,
                                                                    iters=iters, warps=warps)
    nbytes = sum(g.numel() * g.element_size() for g in grads)
    rows = []
    for way, fn in ways.items():
        error = abs(float(fn()) - exact) / exact
        tolerance = 2**-8 if way.startswith("torch") else 1e-5  # torch rounds each tensor's norm to bf16
        if error > tolerance:
            raise SystemExit(f"{way}: norm off by {error:.2e} relative to the float64 norm")
        ms = common.kernel_median_ms(fn, args.reps)
        rows.append({"way": way, "ms": ms, "tb_per_s": nbytes / ms / 1e9, "relative_error": error})
    print(f"{torch.cuda.get_device_name(device)}, {args.shape} ({args.layers or 'all'} layers): {len(grads)} bf16 "
          f"gradients, {nbytes / 1e9:.2f} GB; median of {args.reps}")
    print(f"{'way':24s} {'ms':>8s} {'TB/s':>6s} {'vs torch':>8s} {'rel. error':>10s}")
    for row in rows:
        print(f"{row['way']:24s} {row['ms']:8.3f} {row['tb_per_s']:6.2f} {rows[0]['ms'] / row['ms']:7.2f}x "
              f"{row['relative_error']:10.1e}")
    result = {"environment": common.environment(device), "shape": args.shape, "layers": args.layers,
              "gradient_bytes": nbytes, "rows": rows}
    common.write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
