"""The whole performance matrix in one call: every bench script, spread over the visible GPUs, then one report.

Each job is one bench script run as its own process (so one job's memory or a crash cannot touch another)
pinned to one GPU with CUDA_VISIBLE_DEVICES. Jobs go longest-first to whichever GPU frees up first; a job
that outlives its share of `--budget-s` is stopped, and what its script had written to JSON by then still
counts (train_step writes after every variant). At the end the tables of every job are printed, then the
performance goals with the measured value next to each.

The `peers-*` jobs put HF, the peers a user could pick instead (`bench/peers.py`) and ours side by side in
one process, one shape each, at the real depths; each fills most of a 10-minute call on one H200, so they
run only when named:

    python bench/matrix.py --out results/            # all jobs but the peers
    python bench/matrix.py --only peers-8b-4096 --budget-s 560 --out results/
    python bench/matrix.py --only ts-8b-4096,layers-8b --budget-s 540 --out results/
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# name: (script, arguments, rough seconds on one H100/H200, for ordering and the budget check)
JOBS = {
    "ts-8b-4096": ("train_step", ["--shape", "llama3.1-8b", "--seq", "4096"], 200),
    # half the real model's 32 layers: the decoder's share of the step nearer the real model's
    "ts-8b-4096-l16": ("train_step", ["--shape", "llama3.1-8b", "--layers", "16", "--seq", "4096", "--variants",
                                      "hf,hf_compile,fp8_delayed,fp8_delayed_fp8head,fp8_delayed_attn,"
                                      "fp8_delayed_attn_fp8head"], 280),
    # the batch of the layer-level reference (8 x 2048); still within the HF baseline's 80 GB
    "ts-1b-2048-b8": ("train_step", ["--shape", "llama3.2-1b", "--seq", "2048", "--batch", "8", "--variants",
                                     "hf,hf_compile,ours_bf16,fp8_delayed,fp8_delayed_fp8head,fp8_delayed_attn"],
                      170),
    "ts-1b-2048": ("train_step", ["--shape", "llama3.2-1b", "--seq", "2048"], 180),
    "ts-8b-2048": ("train_step", ["--shape", "llama3.1-8b", "--seq", "2048"], 180),
    "ts-1b-4096": ("train_step", ["--shape", "llama3.2-1b", "--seq", "4096"], 160),
    "ray-1b": ("ray_overhead", ["--shape", "llama3.2-1b", "--seq", "2048", "--batch", "4", "--fp8", "delayed"], 150),
    "packing-1b": ("packing", ["--shape", "llama3.2-1b", "--seq", "4096", "--batch", "2", "--fp8", "delayed"], 90),
    "layers-8b": ("layer_speed", ["--shape", "llama3.1-8b", "--layers", "4", "--batch", "2", "--seq", "4096"], 70),
    "layers-1b": ("layer_speed", ["--shape", "llama3.2-1b", "--layers", "4", "--batch", "8", "--seq", "2048"], 60),
}
# HF bf16, the four peers, then ours with the default master weights; fewer timed steps where steps are long
# bench/peers.py's peers, named here because this launcher imports no torch
PEERS = ("hf_liger", "hf_torchao_fp8", "accelerate_te_fp8", "te_llama_swap")
# `_fastacc`: the gradients' FP8 GEMMs fast-accumulated, as the pipeline runs them (`train.fp8_fast_accumulation`)
OURS = ["ours_bf16", "fp8_delayed", "fp8_delayed_fp8head", "fp8_delayed_fp8head_fastacc", "fp8_delayed_fp8head_inline",
        "fp8_delayed_recompute_mlp", "fp8_delayed_fp8head_recompute_mlp"]
# At short steps the host launches TE's kernels barely as fast as the GPU runs them: CUDA graphs there
GRAPHS = ["ours_bf16_graphs", "fp8_delayed_graphs", "fp8_delayed_fp8head_graphs", "fp8_delayed_fp8head_fastacc_graphs",
          "fp8_delayed_fp8head_inline_graphs"]
# Also with the three ways to hold less for about 1% more time: against the leanest peer's memory
LEAN = ["fp8_delayed_fp8head_bwdcast_moments_fp8_kahan8", "fp8_delayed_fp8head_bwdcast_moments_fp8_fastacc_kahan8"]


def peer_variants(ours: list[str]) -> list[str]:
    return ["--variants", ",".join(["hf", *PEERS, *ours]), "--master-weights", "bf16_kahan"]


def job_variants(name: str) -> list[str]:
    job_args = PEER_JOBS[name][1]
    return job_args[job_args.index("--variants") + 1].split(",")


PEER_JOBS = {
    "peers-8b-4096": ("train_step", ["--shape", "llama3.1-8b", "--layers", "32", "--batch", "2", "--seq", "4096",
                                     "--steps", "8", "--warmup", "3", *peer_variants(OURS + LEAN)], 480),
    "peers-1b-2048": ("train_step", ["--shape", "llama3.2-1b", "--layers", "16", "--batch", "4", "--seq", "2048",
                                     "--steps", "15", "--warmup", "3", *peer_variants(OURS + GRAPHS + LEAN)], 360),
    "peers-8b-256": ("train_step", ["--shape", "llama3.1-8b", "--layers", "32", "--batch", "8", "--seq", "256",
                                    "--steps", "15", "--warmup", "3", *peer_variants(OURS + GRAPHS)], 420),
}
# What each peers job must show: ours over HF bf16 and over the fastest peer, model TFLOP/s, our FP8 over
# our bf16; and, for each of ours, peak memory at or under the leanest peer's.
PEER_GOALS = {
    "peers-8b-4096": {"vs_hf": 2.0, "vs_peer": 1.35, "tflops": 900},
    "peers-1b-2048": {"vs_hf": 2.0, "vs_peer": 1.0},
    "peers-8b-256": {"vs_hf": 1.5, "vs_peer": 1.0, "fp8_vs_bf16": 1.2},
}
OURS_AGAINST_PEERS = (("fp8_delayed", "FP8 delayed"), ("fp8_delayed_fp8head", "FP8 delayed + FP8 head"),
                      ("fp8_delayed_recompute_mlp", "FP8 delayed, MLP recomputed"),
                      ("fp8_delayed_fp8head_recompute_mlp", "FP8 delayed + FP8 head, MLP recomputed"),
                      ("fp8_delayed_fp8head_fastacc", "FP8 delayed + FP8 head, fast accumulation"),
                      ("fp8_delayed_fp8head_bwdcast_moments_fp8_kahan8",
                       "FP8 delayed + FP8 head, FP8 weights cast again in backward, FP8 moments, 1-byte Kahan"),
                      ("fp8_delayed_fp8head_bwdcast_moments_fp8_fastacc_kahan8",
                       "the same, fast accumulation"),
                      ("fp8_delayed_graphs", "FP8 delayed, CUDA graphs"),
                      ("fp8_delayed_fp8head_graphs", "FP8 delayed + FP8 head, CUDA graphs"),
                      ("fp8_delayed_fp8head_fastacc_graphs", "FP8 delayed + FP8 head, fast accumulation, CUDA graphs"))
DEFAULT_JOBS = list(JOBS)  # the peers run only when named
JOBS.update(PEER_JOBS)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", help=f"comma-separated job names (default all but the peers': {', '.join(DEFAULT_JOBS)}; "
                                  f"also {', '.join(PEER_JOBS)})")
    p.add_argument("--gpus", type=int, help="GPUs to spread over (default: all visible)")
    p.add_argument("--budget-s", type=float, default=560, help="wall-clock seconds for all jobs together")
    p.add_argument("--extra", action="append", default=[], metavar="JOB=ARGS",
                   help="more arguments for one job, e.g. 'ts-8b-4096=--steps 30' (repeatable)")
    p.add_argument("--out", required=True, help="folder for each job's JSON and log")
    args = p.parse_args(argv)
    args.only = [j for j in (args.only or ",".join(DEFAULT_JOBS)).split(",") if j]
    unknown = [j for j in args.only if j not in JOBS]
    if unknown:
        p.error(f"--only: unknown job {', '.join(unknown)}; choose from {', '.join(JOBS)}")
    extra = {}
    for item in args.extra:
        job, _, more = item.partition("=")
        if job not in JOBS:
            p.error(f"--extra {item!r}: unknown job {job!r}")
        extra[job] = more.split()
    args.extra = extra
    return args


MIN_START_S = 30.0  # a job starts only with this much of the budget left


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def run_lane(gpu: int, queue: list[str], args, deadline: float, status: dict, lock: threading.Lock) -> None:
    out = Path(args.out)
    while True:
        with lock:
            if not queue:
                return
            name = queue.pop(0)
        script, job_args, estimate = JOBS[name]
        left = deadline - time.monotonic()
        if left < MIN_START_S:
            status[name] = "not started: budget spent"
            continue
        cmd = [sys.executable, str(REPO / "bench" / f"{script}.py"), *job_args, *args.extra.get(name, []),
               "--out", str(out / f"{name}.json")]
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(gpu), "PYTHONUNBUFFERED": "1"}
        started = time.monotonic()
        with open(out / f"{name}.log", "w") as log:
            log.write(" ".join(cmd) + "\n")
            log.flush()
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
            try:
                code = proc.wait(timeout=left)
                status[name] = f"exit {code}"
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                status[name] = "stopped: budget spent"
        status[name] += f" after {time.monotonic() - started:.0f}s on GPU {gpu}"
        print(f"[matrix] {name}: {status[name]}", flush=True)


def run_jobs(args) -> dict:
    Path(args.out).mkdir(parents=True, exist_ok=True)
    queue = sorted(args.only, key=lambda j: -JOBS[j][2])
    lanes = max(1, args.gpus or gpu_count())
    deadline, status, lock = time.monotonic() + args.budget_s, {}, threading.Lock()
    threads = [threading.Thread(target=run_lane, args=(g, queue, args, deadline, status, lock)) for g in range(lanes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return status


# ---------------------------------------------------------------------------------------------------
# report


def load(out: Path, name: str) -> dict | None:
    path = out / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def rows_by_variant(result: dict | None) -> dict:
    return {r["variant"]: r for r in (result or {}).get("variants", []) if "step_ms" in r}


def goal_lines(out: Path) -> list[str]:
    """Each performance goal, the measured value and whether it is met (MISS also when not measured)."""
    lines = []

    def check(text: str, value, ok) -> None:
        shown = "not measured" if value is None else value
        lines.append(f"{'MET ' if value is not None and ok else 'MISS'} {text}: {shown}")

    for name, speedup_goal, tflops_goal in (
            ("ts-8b-4096", 1.7, 750), ("ts-8b-4096-l16", 1.7, 750), ("ts-8b-2048", 1.7, 750),
            ("ts-1b-2048", 1.6, None), ("ts-1b-2048-b8", 1.6, None), ("ts-1b-4096", 1.6, None)):
        rows = rows_by_variant(load(out, name))
        hf, compiled = rows.get("hf"), rows.get("hf_compile")
        for variant, what in (("fp8_delayed", "FP8 delayed"), ("fp8_delayed_fp8head", "FP8 delayed + FP8 head"),
                              ("fp8_delayed_attn", "FP8 delayed + FP8 attention"),
                              ("fp8_delayed_attn_fp8head", "FP8 delayed + FP8 attention + FP8 head")):
            fp8 = rows.get(variant)
            if fp8 is None and variant != "fp8_delayed":
                continue  # an opt-in variant this job did not run
            speedup = fp8 and hf and round(hf["step_ms"] / fp8["step_ms"], 3)
            check(f"{name}: {what} tokens/s over HF bf16 >= {speedup_goal}", speedup,
                  speedup and speedup >= speedup_goal)
            if tflops_goal:
                tflops = fp8 and round(fp8["model_tflops"], 1)
                check(f"{name}: {what} model TFLOP/s >= {tflops_goal}", tflops, tflops and tflops >= tflops_goal)
                over = fp8 and compiled and round(compiled["step_ms"] / fp8["step_ms"], 3)
                check(f"{name}: {what} ahead of HF + torch.compile (ratio > 1)", over, over and over > 1)
            mem = fp8 and hf and (round(fp8["peak_mem_gib"], 1), round(hf["peak_mem_gib"], 1))
            check(f"{name}: {what} peak GiB <= HF bf16 peak GiB (fp8, hf)", mem, mem and mem[0] <= mem[1])
    for name, goal in PEER_GOALS.items():
        rows = rows_by_variant(load(out, name))
        leanest = min((r["peak_mem_gib"] for v, r in rows.items() if v in PEERS), default=None)
        for variant, what in OURS_AGAINST_PEERS:
            if variant not in job_variants(name):
                continue
            row = rows.get(variant, {})
            value = row.get("speedup_vs_hf") and round(row["speedup_vs_hf"], 3)
            check(f"{name}: {what} over HF bf16 >= {goal['vs_hf']}", value, value and value >= goal["vs_hf"])
            value = row.get("speedup_vs_fastest_peer") and round(row["speedup_vs_fastest_peer"], 3)
            check(f"{name}: {what} over the fastest peer >= {goal['vs_peer']}", value,
                  value and value >= goal["vs_peer"])
            if goal.get("tflops"):
                value = row.get("model_tflops") and round(row["model_tflops"], 1)
                check(f"{name}: {what} model TFLOP/s >= {goal['tflops']}", value, value and value >= goal["tflops"])
            mem = (round(row["peak_mem_gib"], 1), round(leanest, 1)) if row and leanest else None
            check(f"{name}: {what} peak GiB <= the leanest peer's (ours, peer)", mem, mem and mem[0] <= mem[1])
        if goal.get("fp8_vs_bf16"):
            for suffix, what in (("", ""), ("_graphs", ", both with CUDA graphs")):
                fp8, bf16 = rows.get("fp8_delayed" + suffix), rows.get("ours_bf16" + suffix)
                value = fp8 and bf16 and round(bf16["step_ms"] / fp8["step_ms"], 3)
                check(f"{name}: FP8 delayed over our bf16{what} >= {goal['fp8_vs_bf16']}", value,
                      value and value >= goal["fp8_vs_bf16"])
    for variant, what in (("te_fp8_delayed", "FP8 delayed"), ("te_fp8_delayed_attn", "FP8 delayed + FP8 attention")):
        layers = rows_by_variant(load(out, "layers-8b")).get(variant)
        value = layers and round(layers["layer_tflops"], 1)
        check(f"layers-8b: {what} layer TFLOP/s >= 850", value, value and value >= 850)
    packing = load(out, "packing-1b")
    value = packing and round(packing["packed_over_padded"], 3)
    check("packing-1b: packed THD over padded BSHD useful tokens/s >= 1.5", value, value and value >= 1.5)
    ray = load(out, "ray-1b")
    value = ray and round(ray["ray_over_bare"], 3)
    check("ray-1b: Ray step time over bare step time <= 1.05", value, value and value <= 1.05)
    return lines


def goal_job(line: str) -> str:
    """The job a `goal_lines` line is about: "MET  peers-1b-2048: ..." -> "peers-1b-2048"."""
    return line[5:].split(":", 1)[0]


def report(args, status: dict) -> None:
    from bench import layer_speed, packing, ray_overhead, train_step  # each prints its own table

    out = Path(args.out)
    printers = {"train_step": train_step.print_table, "packing": packing.print_table,
                "ray_overhead": ray_overhead.print_table, "layer_speed": layer_speed.print_table}
    for name in args.only:
        result = load(out, name)
        if result is None:
            print(f"\n{name}: no results ({status.get(name, 'not run')}); log: {out / (name + '.log')}")
            continue
        try:
            printers[JOBS[name][0]](result)
        except (KeyError, TypeError) as exc:  # a job stopped half-way leaves a partial JSON
            print(f"\n{name}: partial results ({status.get(name)}): {exc!r}")
    lines = goal_lines(out)
    ran = [line for line in lines if goal_job(line) in args.only]
    print(f"\nGoals of the jobs run ({len(lines) - len(ran)} goals of other jobs not shown)")
    for line in ran:
        print(line)
    print("\nJobs: " + "; ".join(f"{k} {v}" for k, v in status.items()))


def main(argv=None) -> None:
    args = parse_args(argv)
    status = run_jobs(args)
    report(args, status)


if __name__ == "__main__":
    main()
