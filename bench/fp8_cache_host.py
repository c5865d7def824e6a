"""Host time of our model's FP8 forward and backward with TE's cached FP8 weights, against casting them.

TE keeps a layer's FP8 weight across calls when the forward is given `is_first_microbatch` (True casts
and keeps, False reuses): the pipeline's steps with gradient accumulation under FP8 and
`train.fp8_weights_from_update` run that way. Each mode runs the same forward and backward of the whole
model (embedding, decoder, head, loss; no optimizer) at a short-row shape, where the host sets the pace:

- `cast`: `is_first_microbatch=None`, every call casts its weights (a step without accumulation);
- `cached`: the first step casts and keeps them (`is_first_microbatch=True`), every later one reuses them
  (`False`), as a step's micro-batches after the first do.

Printed per mode: median host ms per forward and per backward call (the GPU is idle before each step, so
a call that waits on the GPU shows here), median wall ms per step (synchronised), and with `--cprofile`
the functions that took the most host time in five more steps profiled apart (per step, per function).

    python bench/fp8_cache_host.py --shape llama3.1-8b --layers 4 --batch 8 --seq 256 --out results/fp8_cache_host.json
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import te_model  # noqa: E402
from bench import common  # noqa: E402

MODES = ("cast", "cached")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="llama3.1-8b", choices=sorted(common.SHAPES))
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--steps", type=int, default=20, help="timed steps per mode, after --warmup")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--cprofile", type=int, default=0, metavar="N",
                   help="also profile the host in Python and print each mode's N costliest functions")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    args.modes = [m for m in args.modes.split(",") if m]
    unknown = set(args.modes) - set(MODES)
    if unknown:
        p.error(f"--modes: unknown {', '.join(sorted(unknown))}; choose from {', '.join(MODES)}")
    return args


def run_mode(mode: str, model, batches: list[dict], warmup: int, profile: int) -> dict:
    model.model.apply(lambda m: getattr(m, "_fp8_workspaces", {}).clear())

    def step(i: int, inputs: dict) -> tuple[float, float, float]:
        if mode != "cast":
            inputs = dict(inputs, is_first_microbatch=i == 0)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with te_model.fp8_autocast("delayed"):
            loss = model(**inputs).loss
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        torch.cuda.synchronize()
        model.zero_grad(set_to_none=True)
        return t0, t1, t2, time.perf_counter()

    times = [step(i, inputs) for i, inputs in enumerate(batches)][warmup:]
    result = {"mode": mode, "steps": len(times),
              "fwd_ms": statistics.median((t1 - t0) * 1e3 for t0, t1, _, _ in times),
              "bwd_ms": statistics.median((t2 - t1) * 1e3 for _, t1, t2, _ in times),
              "wall_ms": statistics.median((t3 - t0) * 1e3 for t0, _, _, t3 in times)}
    if profile:  # a few more steps under cProfile, which slows the host: apart from the timed ones
        profiled = batches[warmup:warmup + 5]
        profiler = cProfile.Profile()
        profiler.enable()
        for inputs in profiled:
            step(1, inputs)
        profiler.disable()
        rows = sorted(pstats.Stats(profiler).stats.items(), key=lambda kv: kv[1][2], reverse=True)[:profile]
        result["top"] = [{"function": f"{Path(f).name}:{line}({name})", "calls": calls // len(profiled),
                          "own_ms": own * 1e3 / len(profiled), "cum_ms": cum * 1e3 / len(profiled)}
                         for (f, line, name), (_, calls, own, cum, _) in rows]  # by own time
    return result


def measure(args) -> dict:
    device = common.setup_device("cuda" if torch.cuda.is_available() else "cpu")
    backend, reason = common.ours_backend(device)
    if backend != "te":
        raise SystemExit(f"fp8_cache_host: needs Transformer Engine on CUDA ({reason})")
    config = common.llama_config(args.shape, args.layers)
    torch.manual_seed(args.seed)
    model = te_model.build_model(config, backend="te", device=device).train()
    gen = torch.Generator().manual_seed(args.seed)
    batches = [common.step_inputs("ours", torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=gen),
                                  device) for _ in range(args.warmup + args.steps)]
    modes = []
    for mode in args.modes:
        print(f"[fp8_cache_host] {mode} ...", file=sys.stderr, flush=True)
        modes.append(run_mode(mode, model, batches, args.warmup, args.cprofile))
    run = {"shape": args.shape, "layers": config.num_hidden_layers, "batch": args.batch, "seq": args.seq,
           "steps": args.steps, "warmup": args.warmup}
    return {"environment": common.environment(device), "run": run, "modes": modes}


def print_table(result: dict) -> None:
    run = result["run"]
    print(f"\n{result['environment']['device']}, {run['shape']} ({run['layers']} layers), {run['batch']} x "
          f"{run['seq']} tokens, FP8 delayed, forward + backward, median of {run['steps']}")
    for m in result["modes"]:
        for row in m.get("top", ()):
            print(f"  {m['mode']:15s} {row['own_ms']:7.2f} own {row['cum_ms']:7.2f} cum ms {row['calls']:6d} calls  "
                  f"{row['function']}")
    print(f"{'mode':15s} {'host fwd ms':>11s} {'host bwd ms':>11s} {'wall ms':>8s}")
    for m in result["modes"]:
        print(f"{m['mode']:15s} {m['fwd_ms']:11.2f} {m['bwd_ms']:11.2f} {m['wall_ms']:8.2f}")


def main(argv=None) -> dict:
    return common.run_bench(argv, parse_args, measure, print_table)


if __name__ == "__main__":
    main()
