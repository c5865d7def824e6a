"""Host time of Transformer Engine's THD attention per call, by rows per batch and segment layout.

This isolates the `te.DotProductAttention` call our layer makes, fed the attention plans our model
makes from rows packed as the pipeline packs them. Plans are built before the timed loop, so it has no
host sync of its own. Printed per case: median and 90th-percentile host ms per forward and backward
call, the calls over 1 ms, and how many brought a new (segment count, max_seqlen) pair.
Cases and method: docs/performance.md ("What each bench measures").

    python bench/attention_host.py --shape llama-380m --seq 1024 --rows 16,32 --out results/attention_host.json
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from argparse import Namespace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common, packing  # noqa: E402
from pipeline.stages.data import pack_documents  # noqa: E402
from te_model.segments import AttentionPlan, plan_attention  # noqa: E402

KINDS = ("packed", "fixed", "plain", "padcount")
MAX_SEQLEN = ("plan", "row")
SLOW_MS = 1.0


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="llama-380m", choices=sorted(common.SHAPES))
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--rows", default="16,32", help="rows per batch, comma-separated")
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--max-seqlen", default=",".join(MAX_SEQLEN))
    p.add_argument("--pad-segments", type=int, default=1024, help="segment count of the padcount case")
    p.add_argument("--calls", type=int, default=40, help="timed calls per case, after --warmup")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    args.rows = [int(r) for r in args.rows.split(",") if r]
    args.kinds = [k for k in args.kinds.split(",") if k]
    args.max_seqlen = [m for m in args.max_seqlen.split(",") if m]
    for name, given, allowed in (("--kinds", args.kinds, KINDS), ("--max-seqlen", args.max_seqlen, MAX_SEQLEN)):
        unknown = set(given) - set(allowed)
        if unknown:
            p.error(f"{name}: unknown {', '.join(sorted(unknown))}; choose from {', '.join(allowed)}")
    return args


def case_plans(kind: str, max_seqlen: str, rows: int, seq: int, count: int, seed: int, device,
               pad_segments: int = 1024) -> list[AttentionPlan]:
    """`count` attention plans for one case, built (and synchronised) before anything is timed."""
    if kind == "plain":
        plans = [plan_attention(rows, seq, device=device)] * count
    else:
        docs = packing.make_documents(Namespace(seq=seq, batch=rows, steps=count + 2, seed=seed), vocab=512)
        positions = torch.tensor(pack_documents(docs, seq, packing.PAD_ID, seed)["position_ids"])
        batches = [positions[i:i + rows] for i in range(0, len(positions) - rows + 1, rows)]
        if len(batches) < count:
            raise SystemExit(f"attention_host: the document mix packed into {len(batches)} batches, {count} needed")
        if kind == "fixed":
            batches = [batches[0]] * count
        plans = [plan_attention(rows, seq, position_ids=b.to(device)) for b in batches[:count]]
        if kind == "padcount":
            plans = [_pad_count(p, pad_segments) for p in plans]
    if max_seqlen == "row":
        plans = [dataclasses.replace(p, max_seqlen=seq) for p in plans]
    return plans


def _pad_count(plan: AttentionPlan, segments: int) -> AttentionPlan:
    have = len(plan.cu_seqlens) - 1
    if have > segments:
        raise SystemExit(f"attention_host: a batch has {have} segments, more than --pad-segments {segments}")
    cu = torch.cat([plan.cu_seqlens, plan.cu_seqlens[-1:].expand(segments - have)])
    return dataclasses.replace(plan, cu_seqlens=cu)


def plan_key(plan: AttentionPlan) -> tuple[int, int]:
    return len(plan.cu_seqlens) - 1, plan.max_seqlen


def run_case(attention, plans: list[AttentionPlan], rows: int, seq: int, config, warmup: int, device) -> dict:
    heads, groups = config.num_attention_heads, config.num_key_value_heads
    head_dim = config.hidden_size // heads
    tokens = rows * seq

    def leaf(h):
        return torch.randn(tokens, h, head_dim, dtype=torch.bfloat16, device=device, requires_grad=True)

    q, k, v = leaf(heads), leaf(groups), leaf(groups)
    grad = torch.randn(tokens, heads * head_dim, dtype=torch.bfloat16, device=device)
    seen, fwd_ms, bwd_ms, slow, slow_new = set(), [], [], 0, 0
    for i, plan in enumerate(plans):
        new = plan_key(plan) not in seen
        seen.add(plan_key(plan))
        t0 = time.perf_counter()
        out = attention(q, k, v, cu_seqlens_q=plan.cu_seqlens, cu_seqlens_kv=plan.cu_seqlens,
                        max_seqlen_q=plan.max_seqlen, max_seqlen_kv=plan.max_seqlen)
        t1 = time.perf_counter()
        out.backward(grad.view_as(out))
        t2 = time.perf_counter()
        if i % 8 == 7:
            torch.cuda.synchronize(device)  # keep the launch queue short; outside the timed calls
        if i < warmup:
            continue
        fwd_ms.append((t1 - t0) * 1e3)
        bwd_ms.append((t2 - t1) * 1e3)
        call_slow = (t1 - t0) * 1e3 > SLOW_MS or (t2 - t1) * 1e3 > SLOW_MS
        slow += call_slow
        slow_new += call_slow and new
    torch.cuda.synchronize(device)
    segments = sorted({plan_key(p)[0] for p in plans})
    return {"fwd_ms_median": statistics.median(fwd_ms), "fwd_ms_p90": _p90(fwd_ms),
            "bwd_ms_median": statistics.median(bwd_ms), "bwd_ms_p90": _p90(bwd_ms),
            "fwd_ms": fwd_ms, "bwd_ms": bwd_ms, "calls": len(fwd_ms), "slow_calls": slow,
            "slow_calls_new_key": slow_new, "distinct_keys": len(seen), "segments": segments,
            "max_seqlens": sorted({p.max_seqlen for p in plans})}


def _p90(values: list[float]) -> float:
    return sorted(values)[min(len(values) - 1, int(0.9 * len(values)))]


def measure(args) -> dict:
    device = common.setup_device("cuda" if torch.cuda.is_available() else "cpu")
    backend, reason = common.ours_backend(device)
    if backend != "te":
        raise SystemExit(f"attention_host: needs Transformer Engine on CUDA ({reason})")
    import transformer_engine.pytorch as te

    config = common.llama_config(args.shape)
    heads = config.num_attention_heads
    attention = te.DotProductAttention(heads, config.hidden_size // heads, num_gqa_groups=config.num_key_value_heads,
                                       attention_dropout=0.0, qkv_format="thd", attn_mask_type="padding_causal")
    cases = []
    for rows in args.rows:
        for kind in args.kinds:
            for max_seqlen in (["plan"] if kind == "plain" else args.max_seqlen):
                plans = case_plans(kind, max_seqlen, rows, args.seq, args.warmup + args.calls, args.seed, device,
                                   args.pad_segments)
                print(f"[attention_host] {rows} rows, {kind}, max_seqlen {max_seqlen} ...", file=sys.stderr, flush=True)
                row = run_case(attention, plans, rows, args.seq, config, args.warmup, device)
                cases.append({"rows": rows, "kind": kind, "max_seqlen": max_seqlen, **row})
    run = {"shape": args.shape, "seq": args.seq, "calls": args.calls, "warmup": args.warmup, "seed": args.seed}
    return {"environment": common.environment(device), "run": run, "cases": cases}


def print_table(result: dict) -> None:
    run = result["run"]
    print(f"\n{result['environment']['device']}, {run['shape']} attention, rows x {run['seq']} tokens, "
          f"{run['calls']} timed calls a case: host ms per TE attention call")
    print(f"{'rows':>4s} {'kind':8s} {'max_seqlen':10s} {'fwd med':>7s} {'fwd p90':>7s} {'bwd med':>7s} "
          f"{'bwd p90':>7s} {'>1ms':>5s} {'new':>4s} {'keys':>4s}  segments")
    for c in result["cases"]:
        print(f"{c['rows']:4d} {c['kind']:8s} {c['max_seqlen']:10s} {c['fwd_ms_median']:7.2f} {c['fwd_ms_p90']:7.2f} "
              f"{c['bwd_ms_median']:7.2f} {c['bwd_ms_p90']:7.2f} {c['slow_calls']:5d} {c['slow_calls_new_key']:4d} "
              f"{c['distinct_keys']:4d}  {','.join(map(str, c['segments']))}")


def main(argv=None) -> dict:
    return common.run_bench(argv, parse_args, measure, print_table)


if __name__ == "__main__":
    main()
