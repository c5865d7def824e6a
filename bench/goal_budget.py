"""What each speed goal leaves for the work beyond the floor, from two runs of one shape on one GPU start:
`bench/step_floor.py` (the step's GEMMs and attention alone) and `bench/train_step.py` (HF, the peers and
ours, whole steps).

For HF, the fastest peer and ours: the step, its energy, and how much of each lies beyond the floor. For
each goal (ours against HF, against the fastest peer, model TFLOP/s): the step it asks for, that step's
energy at the power ours ran at, and what that leaves beyond the floor against what ours spends there now.
Where the GPU runs at its power limit the step's energy sets its time, so "left beyond the floor, J" is
the budget for everything but the GEMMs and attention (optimizer, casts, transposes, norms, activations,
loss, embedding). Energy columns read "-" where the runs had no power readings (the CPU).

    python bench/goal_budget.py --floor results/floor-fp8.json --steps results/peers-8b.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common, train_step  # noqa: E402

DEFAULT_OURS = "fp8_delayed_fp8head_fastacc"  # the pipeline's default FP8 step
SAME_RUN = ("shape", "layers", "batch", "seq")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--floor", required=True, help="a bench/step_floor.py JSON (--out)")
    p.add_argument("--steps", required=True, help="a bench/train_step.py JSON (--out) of the same shape")
    p.add_argument("--ours", default=DEFAULT_OURS, help="the train_step variant the goals are for")
    p.add_argument("--vs-hf", type=float, default=2.0, help="goal: ours at least this many times HF's speed")
    p.add_argument("--vs-peer", type=float, default=1.35, help="goal: ... the fastest peer's speed")
    p.add_argument("--tflops", type=float, default=900.0, help="goal: model TFLOP/s")
    return p.parse_args(argv)


def _read(path: str, what: str, keys: tuple[str, ...]) -> dict:
    """The JSON at `path`, which must hold `keys` (else one line naming the file and the key)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"goal_budget: --{what} {path}: cannot read it as JSON ({exc})") from None
    missing = [k for k in keys if not isinstance(data, dict) or k not in data]
    if missing:
        script = "step_floor.py" if what == "floor" else "train_step.py"
        raise SystemExit(f"goal_budget: --{what} {path}: no {missing[0]!r} key; is it bench/{script}'s --out?")
    return data


def _joules(row: dict) -> float | None:
    return (row.get("gpu") or {}).get("joules_per_step")


def budget(floor: dict, steps: dict, ours: str, vs_hf: float, vs_peer: float, tflops: float) -> dict:
    """The account as a dict: the floor, the three rows and each goal's step, energy and what it leaves."""
    for key in SAME_RUN:
        if floor["run"].get(key) != steps["run"].get(key):
            raise SystemExit(f"goal_budget: the runs differ in {key}: {floor['run'].get(key)} (floor) against "
                             f"{steps['run'].get(key)} (steps); both must be of one shape")
    timed = {r["variant"]: r for r in steps["variants"] if "step_ms" in r}
    if ours not in timed:
        raise SystemExit(f"goal_budget: variant {ours!r} has no timed step in {steps['run']['shape']}'s steps "
                         f"(timed: {', '.join(timed) or 'none'})")
    both = floor["rows"]["both"]
    floor_ms, floor_j = both["ms"], _joules(both)
    mine = timed[ours]
    watts = (mine.get("gpu") or {}).get("power_w")

    def row(r: dict) -> dict:
        j = _joules(r)
        return dict(label=r["label"], ms=r["step_ms"], joules=j, beyond_ms=r["step_ms"] - floor_ms,
                    beyond_joules=None if j is None or floor_j is None else j - floor_j)

    rows = {"hf": row(timed["hf"]) if "hf" in timed else None}
    peer = train_step.fastest_peer(steps["variants"])
    rows["peer"] = row(peer) if peer else None
    rows["ours"] = row(mine)
    goals = []

    def goal(name: str, ms: float) -> None:
        joules = ms * watts / 1e3 if watts else None
        goals.append(dict(goal=name, ms=ms, joules=joules, left_ms=ms - floor_ms,
                          left_joules=None if joules is None or floor_j is None else joules - floor_j))

    if rows["hf"]:
        goal(f">= {vs_hf}x HF bf16", rows["hf"]["ms"] / vs_hf)
    if rows["peer"]:
        goal(f">= {vs_peer}x the fastest peer", rows["peer"]["ms"] / vs_peer)
    flops = steps["run"]["model_flops_per_step"]
    goal(f">= {tflops:g} model TFLOP/s", flops / (tflops * 1e12) * 1e3)
    return dict(floor=dict(ms=floor_ms, joules=floor_j, gemms=floor["run"]["gemms"]), rows=rows, goals=goals,
                ours_watts=watts)


def print_budget(account: dict, run: dict) -> None:
    f, mine = account["floor"], account["rows"]["ours"]
    print(f"{run['shape']} ({run['layers']} layers), {run['batch']}x{run['seq']} tokens; the floor (GEMMs "
          f"{f['gemms']} and attention alone): {f['ms']:.1f} ms, {common.fmt(f['joules'], '.1f')} J")
    print(f"{'step':56s} {'ms':>7s} {'J':>7s} {'beyond the floor: ms':>21s} {'J':>7s}")
    for key, what in (("hf", "HF"), ("peer", "the fastest peer"), ("ours", "ours")):
        r = account["rows"][key]
        if r:
            name = f"{what}: {r['label']}"[:56]
            print(f"{name:56s} {r['ms']:7.1f} {common.fmt(r['joules'], '.1f'):>7s} {r['beyond_ms']:21.1f} "
                  f"{common.fmt(r['beyond_joules'], '.1f'):>7s}")
    watts = common.fmt(account["ours_watts"], ".0f")
    print(f"\n{'goal':32s} {'step ms':>8s} {'J at ' + watts + ' W':>11s} {'left beyond the floor: ms':>26s} "
          f"{'J':>7s} {'ours there: J':>14s}")
    for g in account["goals"]:
        print(f"{g['goal']:32s} {g['ms']:8.1f} {common.fmt(g['joules'], '.1f'):>11s} {g['left_ms']:26.1f} "
              f"{common.fmt(g['left_joules'], '.1f'):>7s} {common.fmt(mine['beyond_joules'], '.1f'):>14s}")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    floor, steps = _read(args.floor, "floor", ("run", "rows")), _read(args.steps, "steps", ("run", "variants"))
    account = budget(floor, steps, args.ours, args.vs_hf, args.vs_peer, args.tflops)
    print_budget(account, steps["run"])
    return account


if __name__ == "__main__":
    main()
