"""One optimizer update over every parameter of a model, timed on its own: the pipeline's AdamW for each
master-weight option, with bf16 moments and with FP8 moments (`train.moments_fp8`), beside torch's fused
AdamW on bf16 parameters (what HF and the peers run). The parameters have the model's names and shapes
(our model built on the meta device) and random values, as do their gradients; no clipping.

Reported per update: the median time, the bytes the update must move over that time (parameters,
gradients and optimizer state read and written; FP8 moments' scales, 1/32 of a byte an element, not
counted), the time against torch's fused AdamW, and the SM clock and board power over the timed updates
(medians of NVML's readings every 50 ms; `--steps` sets how many updates they span). `--launch` and
`--fp8-launch` time the update with bf16 and with FP8 moments at other program sizes (elements x warps)
than the pipeline's, to tune them.

    python bench/update_kernel.py                                   # Llama-3.1-8B, bf16_kahan
    python bench/update_kernel.py --master-weights bf16,bf16_kahan,fp32
    python bench/update_kernel.py --launch 4096x8,8192x8,2048x4 --fp8-launch 4096x8,2048x8,1024x4
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import te_model  # noqa: E402
from bench import common  # noqa: E402
from pipeline.train import optim  # noqa: E402

# bytes an element of a bf16 parameter moves in one update: parameter, gradient, optimizer state
PARAM_BYTES = {"bf16": 2 + 2 + 2, "bf16_sr": 2 + 2 + 2, "bf16_kahan": 2 + 2 + 2 + 2 + 2, "bf16_kahan8": 2 + 2 + 2 + 1 + 1,
               "fp32": 2 + 2 + 4 + 4}
MOMENT_BYTES = {"bf16": 2 * (2 + 2), "fp8": 2 * (1 + 1)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama3.1-8b", choices=sorted(common.SHAPES))
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--master-weights", default="bf16_kahan",
                   help=f"comma-separated, from {', '.join(optim.MASTER_WEIGHTS)}")
    p.add_argument("--launch", default=f"{optim.BLOCK}x{optim.WARPS}",
                   help="comma-separated ELEMENTSxWARPS per program for the update with bf16 moments")
    p.add_argument("--fp8-launch", default=f"{optim.FP8_BLOCK}x{optim.FP8_WARPS}",
                   help="comma-separated ELEMENTSxWARPS per program for FP8 moments' update")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2, help="untimed updates first (the first makes the state)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    args.master_weights = args.master_weights.split(",")
    for mode in args.master_weights:
        if mode not in optim.MASTER_WEIGHTS:
            p.error(f"--master-weights: {mode!r} is not one of {', '.join(optim.MASTER_WEIGHTS)}")
    args.launch = common.launches(p, "--launch", args.launch, 1)
    args.fp8_launch = common.launches(p, "--fp8-launch", args.fp8_launch, optim.QBLOCK)
    return args


def parameters(config, device: torch.device) -> list[torch.nn.Parameter]:
    """Our model's parameters at `config`'s shapes in bf16 on `device`, random, each with a random gradient."""
    meta = te_model.build_model(config, backend="torch", dtype=torch.bfloat16, device=torch.device("meta"))
    generator = torch.Generator(device=device).manual_seed(0)
    params = []
    for _, p in meta.named_parameters():
        param = torch.nn.Parameter(torch.empty(p.shape, dtype=torch.bfloat16, device=device))
        param.data.normal_(0.0, 0.02, generator=generator)
        param.grad = torch.empty_like(param).normal_(0.0, 1e-3, generator=generator)
        params.append(param)
    return params


def time_updates(optimizer: torch.optim.Optimizer, args, device: torch.device) -> float:
    """Median ms of one `optimizer.step()`, after `args.warmup` untimed ones."""
    for _ in range(args.warmup):
        optimizer.step()
    timer = common.StepTimer(device)
    timer.mark()
    for _ in range(args.steps):
        optimizer.step()
        timer.mark()
    return statistics.median(timer.step_ms())


def variants(args) -> list[dict]:
    """What to time: torch's fused AdamW, then ours for each master-weight option, bf16 then FP8 moments."""
    rows = [dict(name="torch fused AdamW", optimizer="torch", bytes=PARAM_BYTES["bf16"] + MOMENT_BYTES["bf16"])]
    for mode in args.master_weights:
        for moments, shown, launch_list in (("bf16", "bf16", args.launch), ("fp8", "FP8", args.fp8_launch)):
            for block, warps in launch_list:
                rows.append(dict(name=f"ours {mode}, {shown} moments ({block}x{warps})", optimizer="ours",
                                 master_weights=mode, moments_fp8=moments == "fp8", launch=(block, warps),
                                 bytes=PARAM_BYTES[mode] + MOMENT_BYTES[moments]))
    return rows


def measure(row: dict, params: list[torch.nn.Parameter], args, device: torch.device) -> None:
    """Times `row`'s update over `params` and adds ms and GB/s to it."""
    if row["optimizer"] == "torch":
        optimizer = torch.optim.AdamW(params, lr=2e-5, fused=True)
    else:
        optimizer = optim.AdamW(params, lr=2e-5, master_weights=row["master_weights"], moments_fp8=row["moments_fp8"])
    names = ("FP8_BLOCK", "FP8_WARPS") if row.get("moments_fp8") else ("BLOCK", "WARPS")
    pipeline_launch = tuple(getattr(optim, name) for name in names)
    for name, value in zip(names, row.get("launch", pipeline_launch)):
        setattr(optim, name, value)
    sampler = common.GpuSampler(device)
    sampler.start()
    try:
        row["ms"] = time_updates(optimizer, args, device)
    finally:
        sampler.stop()
        for name, value in zip(names, pipeline_launch):
            setattr(optim, name, value)
    row["gb_per_s"] = row["bytes"] * sum(p.numel() for p in params) / row["ms"] / 1e6
    row.update(sampler.summary() or {})
    del optimizer
    common.free_memory()


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = common.setup_device(args.device)
    config = common.llama_config(args.shape, args.layers)
    params = parameters(config, device)
    elements = sum(p.numel() for p in params)
    rows = variants(args)
    for row in rows:
        print(f"[update_kernel] {row['name']} ...", file=sys.stderr, flush=True)
        measure(row, params, args, device)
    base = rows[0]["ms"]
    for row in rows:
        row["vs_torch"] = base / row["ms"]
    env = common.environment(device)
    print(f"{env['device']}, {args.shape} ({config.num_hidden_layers} layers), {len(params)} parameters, "
          f"{elements / 1e9:.2f}B elements, bf16; median of {args.steps} updates")
    print(f"{'update':48s} {'ms':>8s} {'bytes/el':>9s} {'GB/s':>7s} {'vs torch':>9s} {'SM MHz':>7s} {'watts':>6s}")
    for row in rows:
        print(f"{row['name']:48s} {row['ms']:8.2f} {row['bytes']:9d} {row['gb_per_s']:7.0f} {row['vs_torch']:8.2f}x "
              f"{common.fmt(row.get('sm_clock_mhz'), '.0f'):>7s} {common.fmt(row.get('power_w'), '.0f'):>6s}")
    result = dict(environment=env, run=dict(shape=args.shape, layers=config.num_hidden_layers, elements=elements,
                                            steps=args.steps, warmup=args.warmup), variants=rows)
    common.write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
