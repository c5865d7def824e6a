"""Where a data-parallel step's time goes: 1 worker against 2 DDP and 2 FSDP2 workers, bare processes.

The scaling test measures tokens/s through Ray Train. This runs the same pipeline step in plain
processes joined by one `torch.distributed` group, so what it shows is the step itself, not Ray. Each
layout trains the same global batch; printed: step time, scaling, and compute against NCCL kernel time.
Layouts and method: docs/performance.md ("What each bench measures").

    python bench/parallel_profile.py --shape llama-380m --seq 1024 --global-batch 32 --fp8 delayed
    python bench/parallel_profile.py --shape tiny --device cpu --dtype fp32 --seq 64 --global-batch 4
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import socket
import statistics
import sys
import tempfile
from argparse import Namespace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import te_model  # noqa: E402
from bench import common, ray_overhead, trace_gaps  # noqa: E402
from bench.trace_gaps import gpu_work  # noqa: E402
from pipeline.train import loop  # noqa: E402
from pipeline.train import worker as train_worker  # noqa: E402

# name: (processes, each process's rows as a share of the global batch, train settings)
LAYOUTS = {"1": (1, 1, {"parallelism": "ddp"}), "1-half": (1, 2, {"parallelism": "ddp"}),
           "ddp": (2, 2, {"parallelism": "ddp"}), "fsdp": (2, 2, {"parallelism": "fsdp"}),
           "fsdp-keep": (2, 2, {"parallelism": "fsdp", "fsdp_reshard_after_forward": False})}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="llama-380m", choices=sorted(common.SHAPES))
    p.add_argument("--layers", type=int)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--global-batch", type=int, default=32, help="rows per optimizer step, all processes")
    p.add_argument("--layouts", default=",".join(LAYOUTS))
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--steps", type=int, default=10, help="timed steps after the profiled ones")
    p.add_argument("--fp8", default="none", choices=("none", *te_model.RECIPES))
    p.add_argument("--backend", default="auto", choices=("auto", "te", "torch"),
                   help="decoder layers: auto = TE where it can run; torch = the pure-PyTorch layer (SDPA "
                        "attention), to tell TE's per-call host cost from the rest (no FP8)")
    p.add_argument("--host-breakdown", metavar="OP",
                   help="also record Python calls (with_stack) and print where host time goes inside operators "
                        "whose name contains OP, e.g. FusedAttnFunc (the tracer itself adds host time)")
    p.add_argument("--no-ahead", action="store_true",
                   help="read each step's outcome before queuing the next step (pipeline.train.loop.Steps(ahead=False)): "
                        "the step as it ran before the host went one step ahead, for an A/B on one machine")
    p.add_argument("--trace-dir", help="also keep rank 0's profile of each layout here (gzipped Chrome trace)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bf16", choices=sorted(common.DTYPES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train", action="append", default=[], metavar="KEY=VALUE",
                   help="a train setting of every layout's job, e.g. fp8_head=true (repeatable)")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    try:
        args.train = dict(_setting(item) for item in args.train)
    except ValueError as exc:
        p.error(f"--train: {exc}")
    args.layouts = [name for name in args.layouts.split(",") if name]
    unknown = [name for name in args.layouts if name not in LAYOUTS]
    if unknown:
        p.error(f"--layouts: unknown {', '.join(unknown)}; choose from {', '.join(LAYOUTS)}")
    if args.global_batch % 2:
        p.error("--global-batch must be even (two processes split it)")
    return args


def _setting(item: str) -> tuple[str, object]:
    """`key=value` with the value read as YAML (true, 2, 0.5, a word)."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ValueError(f"{item!r} is not KEY=VALUE")
    return key, yaml.safe_load(value)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


STEP_RANGE = trace_gaps.STEP_RANGE


def profile_summary(prof, steps: int) -> dict:
    """Kernel milliseconds per step (compute kernels, NCCL kernels; sums over streams, so they may overlap
    each other and the step), and the top operators by GPU and by CPU time, from one profile."""
    kernels = gpu_work(prof.events())
    nccl = sum(e.time_range.elapsed_us() for e in kernels if "nccl" in e.name.lower())
    total = sum(e.time_range.elapsed_us() for e in kernels)
    events = prof.key_averages()
    return {"kernel_ms_per_step": total / 1e3 / steps, "nccl_ms_per_step": nccl / 1e3 / steps,
            "compute_ms_per_step": (total - nccl) / 1e3 / steps,
            "top_gpu": events.table(sort_by="self_device_time_total", row_limit=12, max_name_column_width=60),
            "top_cpu": events.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60)}


def worker(rank: int, world: int, cfg_dict: dict, train_uri: str, port: int, args: Namespace, out: str,
           tokens: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = args.device == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        common.setup_device("cuda")  # Transformer Engine before other CUDA work
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    try:
        from pipeline.config import Config

        state = train_worker.build(Config.from_dict(cfg_dict), train_uri, rank, world, device)
        progress, steps = loop.Progress(), loop.Steps(state, ahead=not args.no_ahead)
        for _ in range(args.warmup):
            steps.next(progress)
        # timed straight after the warm-up, before the profile: running ahead, the step queued while the
        # profile's trace is exported would run meanwhile, and the first timed steps would look short
        steps.restart_clock()
        metrics = [steps.next(progress)[0] for _ in range(args.steps)]
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        with torch.profiler.profile(activities=activities, with_stack=bool(args.host_breakdown)) as prof:
            for _ in range(args.profile_steps):
                with torch.profiler.record_function(STEP_RANGE):
                    steps.next(progress)
        breakdown = gaps = None
        if rank == 0:
            trace_path = Path(out).with_suffix(".trace.json")
            trace = trace_gaps.chrome_trace(prof, trace_path)
            if args.host_breakdown:
                breakdown = trace_gaps.host_breakdown(trace, args.host_breakdown)
            if cuda:
                gaps = trace_gaps.analyse(trace, STEP_RANGE)
            if args.trace_dir:
                keep = Path(args.trace_dir) / f"{Path(out).stem}.trace.json.gz"
                keep.parent.mkdir(parents=True, exist_ok=True)
                keep.write_bytes(gzip.compress(trace_path.read_bytes()))
        steps.drop_queued()
        if rank == 0:
            step_ms = [tokens / m["tokens_per_s"] * 1e3 for m in metrics]
            result = {"step_ms": statistics.median(step_ms), "step_ms_mean": statistics.mean(step_ms),
                      "step_ms_all": step_ms,
                      "losses": [m["loss"] for m in metrics], "gpu_mem_gb": metrics[-1]["gpu_mem_gb"],
                      **profile_summary(prof, args.profile_steps)}
            if breakdown is not None:
                result["host_breakdown"] = breakdown
            if gaps is not None:
                result["gaps"] = gaps
            Path(out).write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def job_config(args, workdir: Path, base_dir: Path, backend: str, world: int, rows: int, settings: dict) -> dict:
    """The bench job's config as a dict: this layout's workers, micro-batch and train settings."""
    # one step more than are run: the last timed step then queues a next one, as every step before it does
    # (the final step of a run has none to queue, and its clock would hold only its update)
    steps = Namespace(seed=args.seed, dtype=args.dtype, seq=args.seq, batch=rows,
                      warmup=args.warmup + args.profile_steps, steps=args.steps + 1, fp8=args.fp8)
    cfg = ray_overhead.job_dict(steps, workdir, base_dir, backend, args.device == "cuda")
    cfg["train"].update(workers=world, **settings, **args.train)
    return cfg


def measure(args, workdir: Path) -> dict:
    device = common.setup_device(args.device)
    backend, reason = common.ours_backend(device)
    if args.backend == "te" and backend != "te":
        raise SystemExit(f"--backend te: Transformer Engine cannot run here ({reason})")
    if args.backend == "torch":
        if args.fp8 != "none":
            raise SystemExit("--backend torch runs without FP8: add --fp8 none")
        backend, reason = "torch", "asked for with --backend torch"
    inputs = Namespace(shape=args.shape, layers=args.layers, dtype=args.dtype, seed=args.seed, seq=args.seq,
                       batch=args.global_batch, warmup=args.warmup + args.profile_steps, steps=args.steps + 1)
    base_dir, prepared = ray_overhead.write_inputs(inputs, workdir, torch.device("cpu"))
    layouts = {}
    for name in args.layouts:
        world, share, settings = LAYOUTS[name]
        if args.device == "cuda" and torch.cuda.device_count() < world:
            layouts[name] = {"skipped": f"needs {world} GPUs, {torch.cuda.device_count()} visible"}
            continue
        rows = args.global_batch // share
        cfg = job_config(args, workdir, base_dir, backend, world, rows, settings)
        out = workdir / f"{name}.json"
        print(f"[parallel_profile] {name}: {world} process(es) x {rows} rows, {settings} ...", file=sys.stderr,
              flush=True)
        tokens = world * rows * args.seq
        mp.spawn(worker, args=(world, cfg, prepared.train_uri, free_port(), args, str(out), tokens), nprocs=world,
                 join=True)
        row = json.loads(out.read_text())
        layouts[name] = {**row, "tokens_per_step": tokens, "tokens_per_s": tokens / row["step_ms"] * 1e3}
    for name, row in layouts.items():
        if "step_ms" in row:
            world = LAYOUTS[name][0]
            row["scaling_efficiency"] = _efficiency(row, layouts.get("1"), world)
            row["same_micro_efficiency"] = _efficiency(row, layouts.get("1-half"), world) if world == 2 else None
    run = {"shape": args.shape, "seq": args.seq, "global_batch": args.global_batch, "fp8": args.fp8,
           "backend": backend, "backend_reason": reason, "warmup": args.warmup,
           "profile_steps": args.profile_steps, "steps": args.steps, "host_breakdown": args.host_breakdown,
           "ahead": not args.no_ahead, "train": args.train}
    return {"environment": common.environment(device), "run": run, "layouts": layouts}


def _efficiency(row: dict, single: dict | None, world: int) -> float | None:
    """Tokens/s of `row` over `world` single processes of the `single` layout."""
    if not single or "tokens_per_s" not in single:
        return None
    return row["tokens_per_s"] / (world * single["tokens_per_s"])


def print_table(result: dict) -> None:
    run = result["run"]
    for name, row in result["layouts"].items():
        if "top_gpu" in row:
            print(f"\n--- {name}: top operators by GPU time ({run['profile_steps']} steps, rank 0)\n{row['top_gpu']}")
            print(f"--- {name}: top operators by CPU time\n{row['top_cpu']}")
        if "gaps" in row:
            print(trace_gaps.format_report(name, row["gaps"]))
        if "host_breakdown" in row:
            steps = run["profile_steps"]
            print(f"--- {name}: host time inside {run['host_breakdown']}, self, per profiled step (rank 0)")
            for item in row["host_breakdown"]:
                per_step = item["self_us"] / 1e3 / steps
                print(f"{per_step:8.2f} ms {item['calls'] // steps:6d} calls  {item['name'][:110]}")
    print(f"\n{result['environment']['device']}, {run['shape']}, global batch {run['global_batch']}x{run['seq']}, "
          f"fp8 {run['fp8']}, backend {run['backend']}: pipeline Steps in bare processes"
          f"{'' if run.get('ahead', True) else ', each step read before the next is queued'}")
    print(f"{'layout':10s} {'ms/step':>8s} {'mean':>6s} {'tokens/s':>10s} {'scaling':>8s} {'same micro':>10s} {'kernel ms':>9s} "
          f"{'compute':>8s} {'NCCL':>6s} {'no comp':>7s} {'GiB':>6s}")
    for name, row in result["layouts"].items():
        if "step_ms" not in row:
            print(f"{name:10s} {row.get('skipped')}")
            continue
        gaps = row.get("gaps", {}).get("per_step_ms")
        idle = gaps["step"] - gaps["compute"] if gaps else None
        efficiency = common.fmt(row["scaling_efficiency"], ".3f")
        same_micro = common.fmt(row["same_micro_efficiency"], ".3f")
        print(f"{name:10s} {row['step_ms']:8.1f} {common.fmt(row.get('step_ms_mean'), '6.1f')} {row['tokens_per_s']:10.0f} {efficiency:>8s} {same_micro:>10s} "
              f"{row['kernel_ms_per_step']:9.1f} {row['compute_ms_per_step']:8.1f} {row['nccl_ms_per_step']:6.1f} "
              f"{common.fmt(idle, '.1f'):>7s} {row['gpu_mem_gb']:6.1f}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="parallel-profile-") as workdir:
        result = measure(args, Path(workdir))
    common.write_json(args.out, result)
    print_table(result)
    return result


if __name__ == "__main__":
    main()
