"""FP8 requested but unable to run: stop before training starts, or, only when asked, train without it
loudly.

Why it exists: FP8 that silently does not happen (no GPU, Transformer Engine missing, a GPU without FP8
tensor cores, or the pure-PyTorch layers, which have no FP8 path) gives a run that looks like an FP8 run
and is not one. Finding out inside Ray Train costs a cluster start and ends in a worker traceback.

What this module decides:
- The question is asked where training runs: one Ray task with a training worker's resources (a GPU
  when `train.use_gpu`) reports why the recipe cannot run there, before Ray Train starts. On a cluster
  whose GPU nodes autoscale from zero, it waits for a GPU node just as Ray Train would.
- By default an inactive FP8 request is a one-line PipelineError naming `train.fp8`, the reason and the
  two ways out. With `train.fp8_fallback: true` the job logs a warning, trains with `train.fp8: none` in
  `model.dtype` (bf16/fp32), and tags its MLflow runs `fp8.fallback=<reason>` so the run record says so.
"""

from __future__ import annotations

import dataclasses
import logging

from pipeline import tracking
from pipeline.config import Config
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

FALLBACK_TAG = "fp8.fallback"


def fp8_unavailable_reason(recipe: str, backend: str) -> str | None:
    """Why FP8 `recipe` cannot run in this process with the `backend` layers; None when it can."""
    from te_model import FP8UnsupportedError, resolve_backend
    from te_model.backend import te_unavailable_reason
    from te_model.fp8 import make_recipe

    if backend == "torch":
        return "model.backend=torch has no FP8 layers (use te or auto)"
    reason = te_unavailable_reason()
    if reason is None and resolve_backend(backend) == "te":
        try:
            make_recipe(recipe)
        except FP8UnsupportedError as exc:
            reason = str(exc)
    return reason


def probe_workers(cfg: Config) -> str | None:
    """`fp8_unavailable_reason` as a training worker sees it: a Ray task with a worker's resources."""
    import ray

    task = ray.remote(num_cpus=1, num_gpus=1 if cfg.train.use_gpu else 0)(fp8_unavailable_reason)
    reason = ray.get(task.remote(cfg.train.fp8, cfg.model.backend))
    return reason if reason is None or cfg.train.use_gpu else f"{reason} (train.use_gpu=false)"


def apply_fp8_policy(cfg: Config, reason: str | None, run_ids: list[str], tracking_uri: str | None) -> Config:
    """`cfg` when FP8 can run or was not asked for; else a PipelineError, or with train.fp8_fallback a copy
    of `cfg` without FP8, after a warning and the `fp8.fallback` tag on `run_ids`."""
    recipe = cfg.train.fp8
    if recipe == "none" or reason is None:
        return cfg
    if not cfg.train.fp8_fallback:
        raise PipelineError(f"train.fp8={recipe} cannot run on the training workers: {reason}; set "
                            "train.fp8=none, or train.fp8_fallback=true to train without FP8")
    log.warning("FP8 FALLBACK: train.fp8=%s cannot run (%s); training in %s without FP8 because "
                "train.fp8_fallback=true", recipe, reason, cfg.model.dtype)
    for run_id in run_ids:
        tracking.set_tags(run_id, {FALLBACK_TAG: reason}, tracking_uri=tracking_uri)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, fp8="none"))


def settle_fp8(cfg: Config, run_ids: list[str], tracking_uri: str | None) -> Config:
    """The config training runs with: FP8 checked on a worker, then `apply_fp8_policy`."""
    if cfg.train.fp8 == "none":
        return cfg
    return apply_fp8_policy(cfg, probe_workers(cfg), run_ids, tracking_uri)
