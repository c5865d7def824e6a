"""The FP8 transposes of a training step, timed on their own: the FP8 head's (its weight, the loss's E5M2
gradient) and the one-kernel SwiGLU gradient's, at a model shape's sizes.

Hopper's FP8 GEMMs take both operands K-major, so the step copies these tensors into their transposed
layout. Each is timed with `te_model.fp8_kernels.transpose_tiles` at several program sizes (`--tiles`,
TILExWARPS), with Transformer Engine's `fp8_transpose` where TE imports, and with torch's
`.t().contiguous()`. Reported: the median ms and the bytes moved (read and written) over that time.

    python bench/fp8_transpose.py --shape llama3.2-1b --tokens 8192
    python bench/fp8_transpose.py --shape llama3.1-8b --tiles 64x4,128x8
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402
from te_model import fp8_kernels  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama3.2-1b", choices=sorted(common.SHAPES))
    p.add_argument("--tokens", type=int, default=8192, help="tokens a step (rows of the gradients)")
    p.add_argument("--tiles", default=f"{fp8_kernels.TILE}x4,128x4,128x8",
                   help="comma-separated TILExWARPS of the Triton transpose's programs")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    try:
        args.tiles = [tuple(int(x) for x in item.split("x")) for item in args.tiles.split(",")]
    except ValueError:
        p.error(f"--tiles {args.tiles!r}: expected TILExWARPS[,...], e.g. 64x4")
    return args


def tensors(shape: str, tokens: int) -> dict[str, tuple[int, int]]:
    """(rows, cols) of each transposed tensor of a step at this shape."""
    c = common.llama_config(shape)
    return {"swiglu gradient": (tokens, 2 * c.intermediate_size), "head weight": (c.vocab_size, c.hidden_size),
            "head loss gradient": (tokens, c.vocab_size)}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type != "cuda":
        raise SystemExit("bench/fp8_transpose.py times GPU kernels: run it on a CUDA device")
    ways = {f"triton {tile}x{warps}": functools.partial(fp8_kernels.transpose_tiles, tile=tile, warps=warps)
            for tile, warps in args.tiles}
    te = fp8_kernels.te_transpose()
    if te is not None:
        ways["TE fp8_transpose"] = te
    ways["torch .t().contiguous()"] = lambda t: t.t().contiguous()
    rows = []
    for name, (r, c) in tensors(args.shape, args.tokens).items():
        x = torch.randint(0, 255, (r, c), dtype=torch.uint8, device=device)
        want = x.t().contiguous()
        for way, fn in ways.items():
            if not torch.equal(fn(x), want):
                raise SystemExit(f"{way} transposed the {name} wrongly")
            ms = common.kernel_median_ms(functools.partial(fn, x), args.reps)
            rows.append({"tensor": name, "shape": [r, c], "way": way, "ms": ms, "tb_per_s": 2 * x.numel() / ms / 1e9})
        del x, want
    print(f"{torch.cuda.get_device_name(device)}, {args.shape}, {args.tokens} tokens; median of {args.reps}")
    print(f"{'tensor':20s} {'shape':>16s} {'way':26s} {'ms':>8s} {'TB/s':>6s}")
    for row in rows:
        print(f"{row['tensor']:20s} {'x'.join(map(str, row['shape'])):>16s} {row['way']:26s} {row['ms']:8.3f} "
              f"{row['tb_per_s']:6.2f}")
    result = {"environment": common.environment(device), "shape": args.shape, "tokens": args.tokens, "rows": rows}
    common.write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
