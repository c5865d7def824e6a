"""Relative output locations of a job running in Ray's temporary working directory go somewhere lasting.
The real `ray job submit` case runs in tests/integration/test_job_e2e.py (test_ray_job_submit_to_a_head_node)."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import load_config
from pipeline.job.locations import BASE_DIR_ENV, RAY_JOB_ENV, lasting_locations


def test_outside_a_ray_job_nothing_moves(tmp_path):
    cfg = load_config(None)
    assert lasting_locations(cfg, environ={}, cwd=tmp_path) == (cfg, [])
    ray_dir = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    ray_dir.mkdir(parents=True)
    assert lasting_locations(cfg, environ={}, cwd=ray_dir) == (cfg, [])  # no job env: not a submitted job
    assert lasting_locations(cfg, environ={RAY_JOB_ENV: "{}"}, cwd=tmp_path) == (cfg, [])  # own working dir


def test_in_rays_working_dir_relative_outputs_go_under_the_base(tmp_path):
    ray_dir = tmp_path / "session" / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    ray_dir.mkdir(parents=True)
    base = tmp_path / "lasting"
    env = {RAY_JOB_ENV: "{}", BASE_DIR_ENV: str(base)}
    cfg = load_config(None, ["tracking.uri=sqlite:///.cache/mlflow.db"])
    moved, notes = lasting_locations(cfg, environ=env, cwd=ray_dir)
    assert moved.run.output_uri == str(base / ".cache/runs") and moved.run.cache_dir == str(base / ".cache/node")
    assert moved.tracking.uri == f"sqlite:///{base}/.cache/mlflow.db"
    assert notes[0] == f"run.output_uri: .cache/runs -> {base}/.cache/runs" and len(notes) == 3
    assert moved.data.train_files == cfg.data.train_files and moved.model.base_uri == cfg.model.base_uri  # inputs

    absolute = load_config(None, [f"run.output_uri={tmp_path}/out", "run.cache_dir=/var/cache/node",
                                  "tracking.uri=http://mlflow:5000"])
    assert lasting_locations(absolute, environ=env, cwd=ray_dir) == (absolute, [])
    home = lasting_locations(cfg, environ={RAY_JOB_ENV: "{}"}, cwd=ray_dir)[0]
    assert home.run.output_uri == str(Path.home() / "finetune" / ".cache/runs")
