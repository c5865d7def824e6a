"""Progress lines: when rank 0 prints a training line and what it says (a simulated clock), and the
one-line writer that Ray Train's patched `print` would otherwise double."""

from __future__ import annotations

import builtins
import sys

from pipeline.progress import NullProgress, StepProgress, duration, echo, step_progress, write_line


def metrics(step: int) -> dict[str, float]:
    return {"step": step, "loss": 2.5 - 0.01 * step, "lr": 2e-5, "grad_norm": 0.5, "tokens_per_s": 41200.0,
            "mfu": 0.382, "gpu_mem_gb": 10.0, "nonfinite_steps": 0}


def test_a_line_every_log_every_steps_at_the_last_step_and_after_a_quiet_interval():
    now, lines = [0.0], []
    progress = StepProgress(10, every_steps=4, every_s=30.0, print_line=lines.append, clock=lambda: now[0])
    printed = []
    for step, seconds in [(1, 2), (2, 2), (3, 2), (4, 2), (5, 40), (6, 2), (7, 2), (8, 2), (9, 2), (10, 2)]:
        now[0] += seconds
        if progress.update(metrics(step)):
            printed.append(step)
    assert printed == [4, 5, 8, 10]  # 5: the 40 s step passed every_s since the line at step 4
    assert lines[0] == ("step 4/10 loss 2.4600 lr 2e-05 grad_norm 0.5 tokens/s 41,200 mfu 38.2% "
                        "elapsed 0:08 eta 0:12")  # 2 s a step so far, 6 steps left
    assert lines[-1].startswith("step 10/10 ") and lines[-1].endswith("eta 0:00")


def test_a_resumed_run_estimates_from_its_own_steps():
    now, lines = [100.0], []
    progress = StepProgress(100, every_steps=10, every_s=600.0, first_step=50, print_line=lines.append,
                            clock=lambda: now[0])
    now[0] += 30.0
    assert progress.update(metrics(60))  # 10 steps in 30 s, 40 left
    assert lines == ["step 60/100 loss 1.9000 lr 2e-05 grad_norm 0.5 tokens/s 41,200 mfu 38.2% "
                     "elapsed 0:30 eta 2:00"]


def test_other_ranks_print_nothing_and_durations_read_as_clock_times():
    assert isinstance(step_progress(1, 10, 1, 60.0), NullProgress)
    assert not step_progress(1, 10, 1, 60.0).update(metrics(1))
    assert isinstance(step_progress(0, 10, 1, 60.0), StepProgress)
    assert (duration(59.6), duration(61), duration(3725)) == ("1:00", "1:01", "1:02:05")


def test_lines_bypass_a_patched_print(capsys, monkeypatch):
    # Ray Train replaces print in its workers with one that also logs the text: each line would show twice.
    calls = []
    monkeypatch.setattr(builtins, "print", lambda *a, **k: calls.append(a))
    echo("train", "step 1/2")
    assert calls == [] and capsys.readouterr().out == "[train] step 1/2\n"


def test_a_line_and_its_newline_go_out_in_one_write(monkeypatch):
    # On a driver Ray's log thread prints workers' lines to the same stdout, between any two writes.
    writes = []

    class Stream:
        def write(self, text):
            writes.append(text)

        def flush(self):
            writes.append("<flush>")

    monkeypatch.setattr(sys, "stdout", Stream())
    write_line("[export] /out/exports, registered v1 (1s)")
    echo("train", "step 1/2")
    assert writes == ["[export] /out/exports, registered v1 (1s)\n", "<flush>", "[train] step 1/2\n", "<flush>"]


def test_mfu_reads_n_a_where_the_devices_peak_is_unknown():
    from pipeline.progress import step_line

    line = step_line({**metrics(3), "mfu": 0.0}, 10, elapsed_s=6.0, eta_s=14.0)
    assert " mfu n/a " in line and "%" not in line


def test_no_progress_bars_turns_transformers_bars_off_inside_the_block_only(capsys):
    from transformers.utils import logging as hf_logging

    from pipeline.progress import no_progress_bars

    assert hf_logging.is_progress_bar_enabled()
    with no_progress_bars():
        assert not hf_logging.is_progress_bar_enabled()
        for _ in hf_logging.tqdm(range(3), desc="Writing model shards"):
            pass
    assert "Writing model shards" not in capsys.readouterr().err
    assert hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a caller that turned them off keeps them off
    try:
        with no_progress_bars():
            pass
        assert not hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.enable_progress_bar()
