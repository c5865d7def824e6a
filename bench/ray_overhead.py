"""What Ray Train costs per step: the pipeline's training step in a bare process and inside the real job.

Both sides run `pipeline.train.loop.Steps` on the same checkpoint and packed rows: one in a worker built in
this process, no Ray; one through `pipeline.train.launch.train`, a one-worker `TorchTrainer`. The ratio is
Ray's median step over the bare one. Method: docs/performance.md ("What each bench measures").

    python bench/ray_overhead.py --shape llama3.2-1b --seq 2048 --batch 4 --fp8 delayed --out ray.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import uuid
from argparse import Namespace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import te_model  # noqa: E402
from bench import common  # noqa: E402
from bench.packing import make_documents  # noqa: E402
from pipeline.train import launch, loop, worker  # noqa: E402
from pipeline.config import Config  # noqa: E402
from pipeline.stages.data import PreparedData, write_parquet, pack_documents  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="llama3.2-1b", choices=sorted(common.SHAPES))
    p.add_argument("--layers", type=int, help="decoder layers (default: the model's)")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=4, help="rows per step (train.micro_batch_size)")
    p.add_argument("--steps", type=int, default=20, help="timed steps on each side")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--fp8", default="none", choices=("none", *te_model.RECIPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bf16", choices=sorted(common.DTYPES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", help="folder for the checkpoint, rows and Ray's run (default: a temp dir)")
    p.add_argument("--out", help="write the results as JSON here")
    return p.parse_args(argv)


def job_config(args, workdir: Path, base_dir: Path, backend: str, use_gpu: bool) -> Config:
    """A one-worker job over the bench's checkpoint and rows: a metric row every step, one checkpoint."""
    return Config.from_dict(job_dict(args, workdir, base_dir, backend, use_gpu))


def job_dict(args, workdir: Path, base_dir: Path, backend: str, use_gpu: bool) -> dict:
    return {
        "run": {"name": f"ray-overhead-{uuid.uuid4().hex[:8]}", "seed": args.seed,
                "output_uri": str(workdir / "runs"), "cache_dir": str(workdir / "node-cache")},
        "model": {"base_uri": str(base_dir), "backend": backend, "dtype": args.dtype},
        "data": {"seq_len": args.seq},
        "train": {"workers": 1, "use_gpu": use_gpu, "micro_batch_size": args.batch, "grad_accum_steps": 1,
                  "lr": 1e-5, "warmup_steps": 1, "max_steps": args.warmup + args.steps, "checkpoint_every": 0,
                  "keep_checkpoints": 2, "log_every": 1, "fp8": args.fp8},
    }


def write_inputs(args, workdir: Path, device) -> tuple[Path, PreparedData]:
    """A random HF checkpoint of the shape, and packed rows of the skewed document mix as parquet."""
    config = common.llama_config(args.shape, args.layers)
    torch.manual_seed(args.seed)
    model = common.build_hf(config, common.DTYPES[args.dtype], device)
    base_dir = workdir / "base"
    model.save_pretrained(base_dir)
    del model
    common.free_memory()
    rows_needed = (args.warmup + args.steps) * args.batch
    docs = make_documents(Namespace(seq=args.seq, batch=args.batch, steps=rows_needed // args.batch + 1,
                                    seed=args.seed), config.vocab_size)
    columns = pack_documents(docs, args.seq, pad_id=0, seed=args.seed)
    data_dir = workdir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    write_parquet(columns, data_dir / "train.parquet")
    return base_dir, PreparedData(str(data_dir), str(data_dir / "train.parquet"), None, {})


def bare_metrics(cfg: Config, train_uri: str, device: torch.device) -> list[dict]:
    state = worker.build(cfg, train_uri, device=device)  # what a Ray worker builds, minus Ray
    progress, steps = loop.Progress(), loop.Steps(state)
    metrics = [steps.next(progress)[0] for _ in range(cfg.train.max_steps)]
    del state
    common.free_memory()
    return metrics


def ensure_ray(use_gpu: bool) -> bool:
    """A local Ray for the job unless one is up already (True: started here); workers import this checkout."""
    import ray

    if ray.is_initialized():
        return False
    python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    ray.init(include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": python_path}},
             num_gpus=1 if use_gpu else 0)
    return True


def step_times_ms(metrics: list[dict], tokens: int, warmup: int) -> list[float]:
    """Per-step milliseconds from the steps' tokens_per_s, warm-up steps left out."""
    timed = [m for m in metrics if m["step"] > warmup]
    return [tokens / m["tokens_per_s"] * 1e3 for m in timed]


def summary(times: list[float], metrics: list[dict]) -> dict:
    return {"step_ms_median": statistics.median(times), "step_ms_mean": statistics.fmean(times),
            "step_ms_min": min(times), "steps_timed": len(times),
            "loss_first": metrics[0]["loss"], "loss_last": metrics[-1]["loss"],
            "mfu_last": metrics[-1]["mfu"], "gpu_mem_gb_last": metrics[-1]["gpu_mem_gb"]}


def measure(args, device, workdir: Path) -> dict:
    backend, reason = common.ours_backend(device)
    use_gpu = device.type == "cuda"
    base_dir, prepared = write_inputs(args, workdir, device)
    cfg = job_config(args, workdir, base_dir, backend, use_gpu)
    tokens = args.batch * args.seq
    bare = bare_metrics(cfg, prepared.train_uri, device)
    started = ensure_ray(use_gpu)
    try:
        job = launch.train(cfg, prepared)
    finally:
        if started:
            import ray

            ray.shutdown()
    sides = {"bare": bare, "ray": job.metrics}
    if len(job.metrics) != cfg.train.max_steps:
        raise RuntimeError(f"the Ray job logged {len(job.metrics)} steps, expected {cfg.train.max_steps}")
    result = {name: summary(step_times_ms(m, tokens, args.warmup), m) for name, m in sides.items()}
    result["ray_over_bare"] = result["ray"]["step_ms_median"] / result["bare"]["step_ms_median"]
    layers = common.llama_config(args.shape, args.layers).num_hidden_layers
    run = {"shape": args.shape, "layers": layers, "seq": args.seq, "batch": args.batch,
           "fp8": args.fp8, "dtype": args.dtype, "backend": backend, "backend_reason": reason,
           "steps": args.steps, "warmup": args.warmup, "run_name": cfg.run.name}
    return {"environment": common.environment(device), "run": run, **result}


def print_table(result: dict) -> None:
    run = result["run"]
    print(f"\n{result['environment']['device']}, {run['shape']} ({run['layers']} layers), {run['batch']}x{run['seq']}"
          f" tokens, fp8 {run['fp8']}, backend {run['backend']}: pipeline Steps, median of {run['steps']}")
    print(f"{'side':32s} {'ms/step median':>14s} {'mean':>8s} {'min':>8s}")
    for side, name in (("bare", "bare process"), ("ray", "Ray TorchTrainer, 1 worker")):
        r = result[side]
        print(f"{name:32s} {r['step_ms_median']:14.1f} {r['step_ms_mean']:8.1f} {r['step_ms_min']:8.1f}")
    print(f"Ray / bare median step time: {result['ray_over_bare']:.3f} (goal: <= 1.05)")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = common.setup_device(args.device)
    if args.workdir:
        result = measure(args, device, Path(args.workdir).resolve())
    else:
        with tempfile.TemporaryDirectory(prefix="ray-overhead-") as workdir:
            result = measure(args, device, Path(workdir))
    common.write_json(args.out, result)
    print_table(result)
    return result


if __name__ == "__main__":
    main()
