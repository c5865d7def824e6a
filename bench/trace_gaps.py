"""When the GPU sits idle inside a training step, and what the host was doing meanwhile.

Reads a Chrome trace from `torch.profiler` in which each step is a host range named `window` and its
phases are ranges named `train.*` (`pipeline.train.loop` marks them). Each step's time splits into compute,
NCCL only and idle; an idle gap the host caused (it launched the next kernel late) goes to what the
host was doing. Blocking synchronizes are counted by phase and operator. `host_breakdown` says where
host time goes inside named operators. Method: docs/performance.md ("What each bench measures").
"""

from __future__ import annotations

import bisect
import json
import tempfile
from collections import defaultdict
from pathlib import Path

GPU_WORK = ("kernel", "gpu_memcpy", "gpu_memset")
HOST_KINDS = ("cpu_op", "user_annotation", "python_function", "cuda_runtime", "cuda_driver")
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
QUEUED = "(queued: waits on another stream)"
STEP_RANGE = "bench.step"  # the host range around each profiled step that `analyse` reads


def chrome_trace(prof, path: Path | None = None) -> dict:
    """The Chrome trace of a finished `torch.profiler.profile`, read back as JSON; the file is kept at `path`
    when one is given, else written to a temporary directory and removed."""
    if path is not None:
        prof.export_chrome_trace(str(path))
        return json.loads(Path(path).read_text())
    with tempfile.TemporaryDirectory() as tmp:
        return chrome_trace(prof, Path(tmp) / "trace.json")


def _end(e: dict) -> float:
    return e["ts"] + e["dur"]


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def _clip(intervals, lo: float, hi: float) -> list[tuple[float, float]]:
    return [(max(a, lo), min(b, hi)) for a, b in intervals if b > lo and a < hi]


def _length(intervals) -> float:
    return sum(b - a for a, b in intervals)


def gpu_work(events) -> list:
    """A torch profile's GPU events that are work (kernels, copies, fills), not the GPU-side ranges of user
    annotations: DDP's `DistributedDataParallel.forward` range spans the whole forward pass."""
    import torch

    return [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA
            and not getattr(e, "is_user_annotation", False)]


def busy_us(intervals) -> float:
    """How long at least one of the (start, end) intervals runs: overlaps counted once."""
    return _length(_union(intervals))


def _minus(window: tuple[float, float], busy: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """`window` less the sorted, disjoint `busy` intervals."""
    gaps, cursor = [], window[0]
    for a, b in busy:
        if a > cursor:
            gaps.append((cursor, a))
        cursor = max(cursor, b)
    if cursor < window[1]:
        gaps.append((cursor, window[1]))
    return gaps


def _complete_events(trace: dict) -> list[dict]:
    return [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]


def _host_threads(events: list[dict]) -> dict[tuple, list[dict]]:
    """The host events (operators, ranges, Python calls, CUDA API calls) of each (process, thread)."""
    threads: dict = defaultdict(list)
    for e in events:
        if e.get("cat") in HOST_KINDS:
            threads[(e.get("pid"), e.get("tid"))].append(e)
    return threads


class _Timeline:
    """One host thread's outermost operators (cpu_op ranges not inside another cpu_op), in time order."""

    def __init__(self, events: list[dict]) -> None:
        outer: list[dict] = []
        for e in sorted((e for e in events if e["cat"] == "cpu_op"), key=lambda e: (e["ts"], -e["dur"])):
            if outer and e["ts"] < _end(outer[-1]):
                continue  # nested in the previous outermost operator
            outer.append(e)
        self.outer, self.starts = outer, [e["ts"] for e in outer]

    def split(self, lo: float, hi: float) -> dict[str, float]:
        """Time in [lo, hi) per outermost operator, the rest as "(python)"."""
        parts: dict[str, float] = defaultdict(float)
        i = max(0, bisect.bisect_right(self.starts, lo) - 1)
        covered = 0.0
        while i < len(self.outer) and self.outer[i]["ts"] < hi:
            e = self.outer[i]
            overlap = min(hi, _end(e)) - max(lo, e["ts"])
            if overlap > 0:
                parts[e["name"]] += overlap
                covered += overlap
            i += 1
        if hi - lo - covered > 0:
            parts["(python)"] += hi - lo - covered
        return parts

    def at(self, t: float) -> str:
        i = bisect.bisect_right(self.starts, t) - 1
        return self.outer[i]["name"] if i >= 0 and _end(self.outer[i]) > t else "(python)"


def analyse(trace: dict, window: str, phase_prefix: str = "train.", min_gap_us: float = 10.0) -> dict:
    """Per-step averages of compute, NCCL-only and idle GPU time, idle time by (phase, host activity), and
    blocking host calls by (phase, operator); all in ms per step. Gaps shorter than `min_gap_us` between
    kernels (the GPU's own scheduling) are counted apart, not attributed."""
    events = _complete_events(trace)
    marks = sorted((e for e in events if e.get("cat") == "user_annotation" and e["name"] == window),
                   key=lambda e: e["ts"])
    if not marks:
        raise ValueError(f"the trace has no host range named {window!r}")
    main = (marks[0].get("pid"), marks[0].get("tid"))
    windows = [(e["ts"], _end(e)) for e in marks]
    work = sorted((e for e in events if e.get("cat") in GPU_WORK), key=lambda e: e["ts"])
    compute_work = [e for e in work if "nccl" not in e["name"].lower()]
    compute_starts = [e["ts"] for e in compute_work]
    compute = _union([(e["ts"], _end(e)) for e in compute_work])
    nccl = _union([(e["ts"], _end(e)) for e in work if "nccl" in e["name"].lower()])
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    threads = _host_threads(events)
    timelines = {key: _Timeline(evs) for key, evs in threads.items()}
    phases = sorted((e["ts"], _end(e), e["name"]) for e in threads[main]
                    if e["cat"] == "user_annotation" and e["name"].startswith(phase_prefix))

    def phase_at(t: float) -> str:
        """The innermost phase in progress at t (the latest-starting one that covers it)."""
        covering = [p for p in phases if p[0] <= t < p[1]]
        return covering[-1][2] if covering else "-"

    idle_by: dict[tuple[str, str], float] = defaultdict(float)
    totals = dict.fromkeys(("step", "compute", "nccl_only", "idle", "starved", "queued", "short"), 0.0)
    for lo, hi in windows:
        busy = _clip(compute, lo, hi)
        totals["step"] += hi - lo
        totals["compute"] += _length(busy)
        for a, b in _minus((lo, hi), busy):
            only_nccl = _length(_clip(nccl, a, b))
            totals["nccl_only"] += only_nccl
            totals["idle"] += (b - a) - only_nccl
            if b - a < min_gap_us and a > lo and b < hi:
                totals["short"] += b - a
                continue
            i = bisect.bisect_left(compute_starts, b)
            nxt = compute_work[i] if b < hi and i < len(compute_work) else None
            launch = launches.get(nxt["args"].get("correlation")) if nxt is not None else None
            if launch is not None and launch["ts"] <= a:
                totals["queued"] += b - a
                where = timelines[(launch.get("pid"), launch.get("tid"))].at(launch["ts"])
                idle_by[(phase_at(a), f"{QUEUED} {where}")] += b - a
                continue
            # starved: the host launched the next kernel after the gap opened (or the step ended idle)
            totals["starved"] += b - a
            key = (launch.get("pid"), launch.get("tid")) if launch is not None else main
            cuts = sorted({a, b, *(t for p in phases for t in p[:2] if a < t < b)})
            for start, end in zip(cuts, cuts[1:]):  # the gap cut where phases begin or end
                for op, us in timelines[key].split(start, end).items():
                    idle_by[(phase_at(start), op)] += us
    syncs: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0, 0.0])
    for key, evs in threads.items():
        for e in evs:
            if e["cat"] == "cuda_runtime" and e["name"] in SYNC_CALLS and any(lo <= e["ts"] < hi for lo, hi in windows):
                row = syncs[(phase_at(e["ts"]), timelines[key].at(e["ts"]))]
                row[0] += 1
                row[1] += e["dur"]
    # GPU work past the last step's host range: the host had queued it and gone on (it ran ahead), so the
    # GPU, not the host, set the pace; the ranges then hold the host's time, not the GPU's
    totals["after"] = _length(_clip(compute, windows[-1][1], float("inf")))
    steps = len(windows)
    per_step = {k: v / 1e3 / steps for k, v in totals.items()}
    idle_rows = sorted(({"phase": p, "host": h, "ms": us / 1e3 / steps} for (p, h), us in idle_by.items()),
                       key=lambda r: -r["ms"])
    sync_rows = sorted(({"phase": p, "op": o, "calls": n / steps, "ms": us / 1e3 / steps}
                        for (p, o), (n, us) in syncs.items()), key=lambda r: -r["ms"])
    return {"steps": steps, "per_step_ms": per_step, "idle": idle_rows, "syncs": sync_rows, "min_gap_us": min_gap_us}


def format_report(name: str, result: dict, top: int = 12) -> str:
    s = result["per_step_ms"]
    lines = [f"--- {name}: GPU time per step (ms, mean of {result['steps']} profiled steps, rank 0)",
             f"step {s['step']:.1f} = compute {s['compute']:.1f} + NCCL only {s['nccl_only']:.1f} + idle "
             f"{s['idle']:.1f}; gaps: starved by the host {s['starved']:.1f}, queued behind another stream "
             f"{s['queued']:.1f}, under {result['min_gap_us']:g} us between kernels {s['short']:.1f} (gaps include "
             f"NCCL-only time)"]
    if s.get("after", 0) > 0:
        lines.append(f"the host ran ahead: the GPU computed {s['after']:.1f} ms a step more after the host's last "
                     f"step range ended, so the GPU set the pace and 'step' is the host's time")
    lines.append(f"{'idle ms':>8s}  phase             host activity during the gap")
    for row in result["idle"][:top]:
        lines.append(f"{row['ms']:8.2f}  {row['phase'][:16]:16s}  {row['host'][:90]}")
    lines.append(f"{'sync ms':>8s} {'calls':>6s}  phase             operator (blocking host calls)")
    for row in result["syncs"][:top]:
        lines.append(f"{row['ms']:8.2f} {row['calls']:6.1f}  {row['phase'][:16]:16s}  {row['op'][:90]}")
    return "\n".join(lines)


def host_breakdown(trace: dict, within: str, top: int = 15) -> list[dict]:
    """Self host time per Python function, C call or CUDA runtime call nested inside any operator whose
    name contains `within`, from a Chrome trace written by torch.profiler with `with_stack=True`.

    Events nest per thread by time; an event's self time is its duration less its direct children's. Only
    time inside the operator counts: a call that starts inside it and ends after it (the Python frame
    leaving a `record_function` block, say, when the thread is descheduled there) counts up to its end."""
    totals: dict = {}

    def close(frame):
        event, children, inside, _, span = frame
        if inside and within not in event["name"]:
            row = totals.setdefault(event["name"], {"name": event["name"], "calls": 0, "self_us": 0.0})
            row["calls"] += 1
            row["self_us"] += max(0.0, span - children)

    for events in _host_threads(_complete_events(trace)).values():
        events = sorted(events, key=lambda e: (e["ts"], -e["dur"]))
        stack: list = []  # [event, children's time, inside `within`, the operator's end, the time counted]
        for e in events:
            while stack and stack[-1][0]["ts"] + stack[-1][0]["dur"] <= e["ts"]:
                close(stack.pop())
            end = e["ts"] + e["dur"]
            if within in e["name"]:
                inside, limit = True, end
            elif stack and stack[-1][2]:
                inside, limit = True, stack[-1][3]
            else:
                inside, limit = False, float("inf")
            span = min(end, limit) - e["ts"]
            if stack:
                stack[-1][1] += span
            stack.append([e, 0.0, inside, limit, span])
        while stack:
            close(stack.pop())
    return sorted(totals.values(), key=lambda r: -r["self_us"])[:top]
