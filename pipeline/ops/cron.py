"""When scheduled work runs: a five-field cron expression or a fixed interval, on an injectable clock.

`jobs/retrain.py` keeps one process ticking on a schedule, and tests must drive that schedule through
days of simulated time without waiting. So the clock (`now`) and the wait (`sleep`) are parameters, and
cron matching is a small pure parser (`Cron`) instead of a dependency. Times are UTC, as in a
Kubernetes CronJob without a time zone; `now` must return an aware datetime.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from pipeline.errors import PipelineError

_FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day-of-month", 1, 31), ("month", 1, 12), ("day-of-week", 0, 7))
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def parse_interval(text: str, flag: str = "--every") -> float:
    """Seconds in '30m', '6h', '1d', '90s' or a plain number of seconds; errors name `flag`."""
    clean = text.strip().lower()
    try:
        seconds = float(clean[:-1]) * _UNITS[clean[-1]] if clean[-1:] in _UNITS else float(clean)
    except (ValueError, IndexError):
        seconds = 0.0
    if seconds <= 0:
        raise PipelineError(f"{flag} {text!r}: not a positive interval like 90s, 30m, 6h or 1d")
    return seconds


def _parse_field(text: str, name: str, low: int, high: int) -> frozenset[int]:
    values: set[int] = set()
    for part in text.split(","):
        span, _, step_text = part.partition("/")
        try:
            step = int(step_text) if step_text else 1
            if span == "*":
                start, end = low, high
            else:
                start_text, _, end_text = span.partition("-")
                start = int(start_text)
                end = int(end_text) if end_text else (high if step_text else start)
        except ValueError:
            raise PipelineError(f"cron {name} field {text!r}: {part!r} is not *, N, A-B or */N") from None
        if step < 1 or not low <= start <= end <= high:
            raise PipelineError(f"cron {name} field {text!r}: {part!r} is outside {low}-{high} or has step < 1")
        values.update(range(start, end + 1, step))
    return frozenset(values)


@dataclass(frozen=True)
class Cron:
    """A parsed five-field cron expression; `next_after(t)` is the first matching minute after t.

    Fields: minute hour day-of-month month day-of-week. Each is `*`, a number, a range `a-b`, a step
    `*/n` or `a-b/n`, or a comma list of those. Day-of-week 0 and 7 are Sunday. Names (`mon`, `jan`) and
    the `@daily`-style shortcuts are not supported.

    Day-of-month and day-of-week combine as in Vixie cron (and cronie). Its rule looks at each field's
    FIRST CHARACTER, not at the days it expands to. If either field starts with `*` (`*`, `*/2`, `*,10`),
    a day must match both; otherwise a day matches if either does. So `0 0 */2 * 1` runs on odd days that
    are Mondays, and `0 0 1-31/2 * 1` on odd days and on every Monday. `0 0 10,* * 2` (not starting with
    `*`) runs on every day.
    """

    expression: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday
    days_star: bool  # the day-of-month field starts with '*' (Vixie's DOM_STAR)
    weekdays_star: bool  # the day-of-week field starts with '*' (Vixie's DOW_STAR)

    @classmethod
    def parse(cls, expression: str) -> Cron:
        parts = expression.split()
        if len(parts) != 5:
            raise PipelineError(f"cron {expression!r}: needs 5 fields (minute hour day-of-month month "
                                f"day-of-week), got {len(parts)}; e.g. '0 3 * * *' for 03:00 UTC daily")
        fields = [_parse_field(p, name, lo, hi) for p, (name, lo, hi) in zip(parts, _FIELDS)]
        weekdays = frozenset(d % 7 for d in fields[4])
        return cls(expression, *fields[:4], weekdays, parts[2].startswith("*"), parts[4].startswith("*"))

    def _day_matches(self, t: datetime) -> bool:
        in_days, in_weekdays = t.day in self.days, (t.isoweekday() % 7) in self.weekdays
        if self.days_star or self.weekdays_star:
            return in_days and in_weekdays
        return in_days or in_weekdays

    def next_after(self, t: datetime) -> datetime:
        """The first minute strictly after `t` that the expression matches."""
        t = t.replace(second=0, microsecond=0) + timedelta(minutes=1)
        for _ in range(5 * 366 * 24):  # each pass moves to the next candidate hour at least
            if t.month not in self.months:
                t = (t.replace(day=1, hour=0, minute=0) + timedelta(days=32)).replace(day=1)
            elif not self._day_matches(t):
                t = t.replace(hour=0, minute=0) + timedelta(days=1)
            elif t.hour not in self.hours:
                t = t.replace(minute=0) + timedelta(hours=1)
            else:
                later = sorted(m for m in self.minutes if m >= t.minute)
                if later:
                    return t.replace(minute=later[0])
                t = t.replace(minute=0) + timedelta(hours=1)
        raise PipelineError(f"cron {self.expression!r}: matches no date in five years (e.g. 31 in February)")


def run_schedule(tick: Callable[[], object], *, cron: Cron | None = None, every_s: float | None = None,
                 now: Callable[[], datetime] = utc_now, sleep: Callable[[float], None] = time.sleep,
                 max_ticks: int | None = None) -> None:
    """Call `tick` on the schedule (exactly one of `cron`, `every_s`) until `max_ticks` ticks ran.

    An interval schedule ticks at once, then `every_s` seconds after each tick STARTED, so a slow tick
    does not push the whole schedule back. A cron schedule ticks at each matching minute after the start.
    """
    if (cron is None) == (every_s is None):
        raise PipelineError("a schedule needs exactly one of a cron expression and an interval")
    ticks = 0
    due = now() if every_s is not None else cron.next_after(now())
    while max_ticks is None or ticks < max_ticks:
        wait = (due - now()).total_seconds()
        if wait > 0:
            sleep(wait)
            continue  # a sleep may end early (a signal, a clock step): look at the clock again
        started = now()
        tick()
        ticks += 1
        due = started + timedelta(seconds=every_s) if every_s is not None else cron.next_after(started)
