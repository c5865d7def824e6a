"""bench/job_8b.py, the 8B run's script, on CPU with a tiny model: every phase end to end through the real
job (moto S3 and mlflow servers of its own, a Ray cluster of its own, a real SIGKILL of the training worker),
so the GPU run does not fail on a typo; and the storage plan's arithmetic at the real 8B shape."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from bench import job_8b

REPO = Path(__file__).resolve().parents[2]


def test_plan_counts_the_llama_3_1_8b_parameters_and_sizes_a_checkpoint_at_8_bytes_each(tmp_path):
    shape = job_8b.SHAPES["8b"]
    assert job_8b.param_count(shape) == 8_030_261_248  # Meta's Llama-3.1-8B
    places = job_8b.Places(tmp_path / "work", tmp_path / "out")
    sizes = {what: size for what, _, size in job_8b.plan(shape, places)}
    weights = 2 * 8_030_261_248
    assert sizes["base pulled into run.cache_dir"] == weights
    assert sizes["checkpoints: 2 kept + 1 being written"] == 3 * 4 * weights  # written in place: no staging copy
    ok, rows = job_8b.fits(shape, places)
    assert sum(needed for _, needed, _ in rows) == sum(sizes.values())
    assert ok == all(needed <= free for _, needed, free in rows)


def test_stage_times_are_read_from_the_driver_lines_even_behind_a_worker_line(tmp_path):
    places = job_8b.Places(tmp_path / "work", tmp_path / "out")
    places.work.mkdir(parents=True)
    places.log.write_text(
        "[data] 12 train rows (9s)\n"
        "\x1b[36m(_export_task pid=1)\x1b[0m [export] uploaded 0.6 MB in 0:00 (72.9 MB/s)\n"
        "[train] 8 steps, final loss 6.2296 -> /out/checkpoint_000008 (46s)\n"
        "\x1b[36m(_export_task pid=1)\x1b[0m 2026/12/07 INFO waiting[export] /out/exports, registered v1 (1s)\n")
    assert job_8b.stage_times(places) == {"data": 9.0, "train": 46.0, "export": 1.0}


def test_a_driver_counts_as_running_from_the_moment_it_is_started_until_it_exits(tmp_path):
    # Right after a start, /proc/PID/cmdline can still read empty: a watcher that took that for a dead driver
    # ended the job phase at once, and the servers were stopped under a driver still starting.
    places = job_8b.Places(tmp_path / "work", tmp_path / "out")
    places.work.mkdir(parents=True)
    for _ in range(20):
        pid = job_8b.start_driver(places, [sys.executable, "-c", "import time; time.sleep(60)", "finetune"], dict(os.environ))
        assert job_8b.driver_state(places) == (pid, False)
        os.kill(pid, 9)
        job_8b.SPAWNED[pid].wait()
        assert job_8b.driver_state(places) == (None, False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_tiny_run_goes_through_every_phase_kills_the_worker_once_and_resumes(tmp_path):
    ports = [_free_port(), _free_port()]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # As in the suite's own clusters (tests/fixtures/ray_cluster.py): no node-drain watcher actor.
    env["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "0"
    command = [sys.executable, "bench/job_8b.py", "--shape", "tiny", "--workdir", str(tmp_path / "w"),
               "--s3-port", str(ports[0]), "--mlflow-port", str(ports[1]), "--budget-s", "600"]
    try:
        base = subprocess.run([*command, "--phase", "base"], cwd=REPO, env=env, capture_output=True, text=True, check=False)
        assert base.returncode == 0, base.stdout[-3000:] + base.stderr[-3000:]
        job = subprocess.run([*command, "--phase", "job"], cwd=REPO, env=env, capture_output=True, text=True, check=False)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "job finished" in job.stdout
        assert not (tmp_path / "w" / "base").exists()  # deleted once published
        report = subprocess.run([*command, "--phase", "report"], cwd=REPO, env=env, capture_output=True, text=True, check=False)
    finally:
        subprocess.run([*command, "--phase", "stop"], cwd=REPO, env=env, check=True)
    assert report.returncode == 0, report.stdout[-3000:] + report.stderr[-3000:]
    table = {line.split("|")[1].strip(): line.split("|")[2].strip()
             for line in report.stdout.splitlines() if line.startswith("| ") and line.count("|") == 3}
    for stage in ("data", "train", "eval", "export"):
        assert table[f"stage {stage}"].endswith(" s")
    # Checkpoints upload in the background: the kill lands after the step-2 commit, at most at step 4
    # (whose save waits for step 2's held upload); a new worker resumes from step 2's checkpoint.
    (kill,) = [k for k in table if k.startswith("SIGKILL after step")]
    assert 2 <= int(kill.split()[3]) <= 4, kill
    assert table[kill].endswith("(step 3)"), table[kill]
    assert [k for k in table if k.startswith("checkpoint step 8")]
    assert float(table["steady tokens/s (median after warm-up)"].replace(",", "")) > 0  # read from the worker's lines
    assert table["load registered model (mlflow) + forward"].endswith(" s")
    assert "publish base" in " ".join(table)
