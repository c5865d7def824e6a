"""Cron parsing and the schedule loop, driven by a simulated clock (no waiting, no Ray)."""

from datetime import datetime, timedelta, timezone

import pytest

from pipeline.errors import PipelineError
from pipeline.ops.cron import Cron, parse_interval, run_schedule

T0 = datetime(2025, 1, 30, 22, 47, 13, tzinfo=timezone.utc)  # a Thursday


class SimClock:
    """now() and sleep() of a clock that only moves when slept on (or when a tick takes time)."""

    def __init__(self, start: datetime):
        self.t, self.slept = start, []

    def now(self) -> datetime:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.t += timedelta(seconds=seconds)


def _at(*args):
    return datetime(*args, tzinfo=timezone.utc)


@pytest.mark.parametrize("expr, expected", [
    ("0 3 * * *", _at(2025, 1, 31, 3, 0)),              # next 03:00
    ("*/15 * * * *", _at(2025, 1, 30, 23, 0)),          # steps from 0: 22:45 has passed
    ("48-55/3 22 * * *", _at(2025, 1, 30, 22, 48)),      # a stepped range, later this hour
    ("0 0 1 * *", _at(2025, 2, 1, 0, 0)),               # month rollover
    ("30 6 * * 1-5", _at(2025, 1, 31, 6, 30)),          # weekdays: Friday
    ("30 6 * * 0,6", _at(2025, 2, 1, 6, 30)),           # weekend: Saturday
    ("0 12 * * 7", _at(2025, 2, 2, 12, 0)),             # 7 is Sunday too
    ("0 0 29 2 *", _at(2028, 2, 29, 0, 0)),             # next leap day
    ("0 0 13 * 5", _at(2025, 1, 31, 0, 0)),             # day-of-month OR day-of-week (Friday 31st)
    ("5,10 1,2 * 3 *", _at(2025, 3, 1, 1, 5)),          # lists, another month
])
def test_cron_next_after(expr, expected):
    assert Cron.parse(expr).next_after(T0) == expected


def _march_2025_days(expr: str) -> list[int]:
    """The days of March 2025 (the 1st a Saturday; Mondays 3, 10, 17, 24, 31) on which `expr` fires."""
    cron, t, days = Cron.parse(expr), _at(2025, 2, 28, 23, 59), []
    while (t := cron.next_after(t)) < _at(2025, 4, 1, 0, 0):
        days.append(t.day)
    return days


ODD_DAYS = list(range(1, 32, 2))


@pytest.mark.parametrize("expr, days", [
    ("0 0 */2 * 1", [3, 17, 31]),                        # starts with '*': odd days AND Mondays
    ("0 0 1-31/2 * 1", sorted({*ODD_DAYS, 10, 24})),     # the same days spelled without '*': OR
    ("0 0 *,10 * 2", [4, 11, 18, 25]),                   # '*' first: AND with Tuesdays
    ("0 0 10,* * 2", list(range(1, 32))),                # the same set, '*' not first: OR, every day
    ("0 0 1 * */3", [1]),                                # day-of-week starts with '*': the 1st if Sun/Wed/Sat
    ("0 0 1,15 * 1", [1, 3, 10, 15, 17, 24, 31]),         # both restricted: OR
    ("0 0 * * 1", [3, 10, 17, 24, 31]),                  # one field a plain star: the other decides
])
def test_day_of_month_and_day_of_week_follow_vixies_star_rule(expr, days):
    assert _march_2025_days(expr) == days


def test_cron_next_after_is_strictly_later():
    cron = Cron.parse("0 3 * * *")
    first = cron.next_after(T0)
    assert cron.next_after(first) == first + timedelta(days=1)


@pytest.mark.parametrize("expr, message", [
    ("0 3 * *", "needs 5 fields"),
    ("60 * * * *", "outside 0-59"),
    ("* * * * mon", "'mon' is not"),
    ("*/0 * * * *", "step < 1"),
    ("5-2 * * * *", "outside"),
    ("0 0 31 2 *", "matches no date"),
])
def test_cron_errors_name_the_field(expr, message):
    with pytest.raises(PipelineError, match=message):
        Cron.parse(expr).next_after(T0)


def test_parse_interval():
    assert [parse_interval(t) for t in ("90s", "30m", "6h", "1d", "45")] == [90, 1800, 21600, 86400, 45]
    with pytest.raises(PipelineError, match="--every '0h'"):
        parse_interval("0h")
    with pytest.raises(PipelineError, match="--every 'daily'"):
        parse_interval("daily")


def test_cron_schedule_ticks_at_each_match_on_the_simulated_clock():
    clock, ticks = SimClock(T0), []
    run_schedule(lambda: ticks.append(clock.now()), cron=Cron.parse("0 3 * * *"),
                 now=clock.now, sleep=clock.sleep, max_ticks=3)
    assert ticks == [_at(2025, 1, 31, 3, 0), _at(2025, 2, 1, 3, 0), _at(2025, 2, 2, 3, 0)]


def test_interval_schedule_counts_from_each_tick_start():
    clock, ticks = SimClock(T0), []

    def slow_tick():  # a tick that takes 2 h must not push the 6 h schedule back
        ticks.append(clock.now())
        clock.t += timedelta(hours=2)

    run_schedule(slow_tick, every_s=6 * 3600, now=clock.now, sleep=clock.sleep, max_ticks=3)
    assert ticks == [T0, T0 + timedelta(hours=6), T0 + timedelta(hours=12)]
    assert clock.slept == [4 * 3600, 4 * 3600]


def test_a_schedule_needs_exactly_one_kind():
    with pytest.raises(PipelineError, match="exactly one"):
        run_schedule(lambda: None, max_ticks=1)


def test_retrain_cli_refuses_a_bad_schedule_in_one_line(capsys, tmp_path):
    from jobs import retrain

    assert retrain.main(["--cron", "0 3 * *"]) == 1
    assert capsys.readouterr().err.strip().startswith("retrain: error: cron '0 3 * *': needs 5 fields")
    outside = tmp_path / "my.yaml"
    outside.write_text("run: {name: x}\nmodel: {base_uri: s3://b/base}\ndata: {train_files: [s3://b/t.jsonl]}\n"
                       "train: {max_steps: 100}\nexport: {registered_model_name: x}\n")
    assert retrain.main(["--config", str(outside)]) == 1
    assert "put the preset inside it" in capsys.readouterr().err


@pytest.mark.parametrize("schedule", [[], ["--every", "1h"]])
def test_retrain_cli_stopped_by_ctrl_c_says_what_goes_on_in_one_line(schedule, capsys, monkeypatch):
    """Ctrl-C in a tick's wait for its job, alone or in a loop: the job runs on, the next tick waits for it."""
    from jobs import retrain

    class Waiting:
        def tick(self):
            raise KeyboardInterrupt  # as Ctrl-C arrives while the tick polls Ray for its job

    monkeypatch.setattr(retrain, "make_retrainer", lambda args: Waiting())
    assert retrain.main(schedule) == 130
    assert capsys.readouterr().err.strip().splitlines() == [retrain.STOPPED]
