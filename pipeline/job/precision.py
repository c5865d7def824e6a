"""FP8 requested but unable to run: stop before training starts, or, only when asked, train without it.

FP8 that silently does not happen gives a run that looks like an FP8 run and is not one: no GPU, no
Transformer Engine, a GPU without FP8, or the pure-PyTorch layers. Finding out inside Ray Train costs a
cluster start and ends in a worker traceback. So one Ray task with a training worker's resources asks
first, where training will run (`probe_workers`); on an autoscaling cluster it waits for a GPU node
just as Ray Train would. `fp8_decision` decides what happens then; the job holds the decision
(`ResolvedJob.fp8`) and trains with it.
"""

from __future__ import annotations

import dataclasses
import logging

from pipeline import tracking
from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.job.resolved import Fp8Decision

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


def fp8_attention_unavailable_reason(recipe: str) -> str | None:
    """Why `recipe` cannot also run the attention in FP8 in this process (FP8 itself can); None when it can."""
    from te_model import FP8UnsupportedError
    from te_model.fp8 import make_recipe

    try:
        make_recipe(recipe, fp8_attention=True)
    except FP8UnsupportedError as exc:
        return str(exc)
    return None


def _worker_reasons(recipe: str, backend: str, fp8_attention: bool) -> tuple[str | None, str | None]:
    reason = fp8_unavailable_reason(recipe, backend)
    attention = fp8_attention_unavailable_reason(recipe) if fp8_attention and reason is None else None
    return reason, attention


def probe_workers(cfg: Config) -> tuple[str | None, str | None]:
    """As a training worker sees them (a Ray task with a worker's resources): `fp8_unavailable_reason`, and
    with `train.fp8_attention` why the attention cannot run in FP8 there (None where it can)."""
    import ray

    task = ray.remote(num_cpus=1, num_gpus=1 if cfg.train.use_gpu else 0)(_worker_reasons)
    reason, attention = ray.get(task.remote(cfg.train.fp8, cfg.model.backend, cfg.train.fp8_attention))
    if reason is not None and not cfg.train.use_gpu:
        reason = f"{reason} (train.use_gpu=false)"
    return reason, attention


def fp8_decision(cfg: Config, reason: str | None, attention_reason: str | None = None) -> Fp8Decision:
    """What training runs with, given why FP8 (`reason`) or its attention cannot run on the workers.

    By default an FP8 request that cannot run is a one-line PipelineError naming `train.fp8`, the reason
    and the two ways out. With `train.fp8_fallback: true`, training runs with `train.fp8: none`, after a
    warning; the decision's `fallback` is the reason, for the `fp8.fallback` tag.

    When FP8 can run but `train.fp8_attention` cannot (it needs Blackwell and cuDNN 9.23+), the same
    choice holds for the attention alone. The error names `train.fp8_attention`; the fallback keeps FP8
    in the linear layers and runs attention in bf16 (tag `fp8.fallback=fp8_attention: ...`).
    """
    recipe, train = cfg.train.fp8, cfg.train
    asked = Fp8Decision.as_requested(train, checked=recipe != "none")
    if recipe == "none" or (reason is None and attention_reason is None):
        return asked
    if reason is None:
        if not train.fp8_fallback:
            raise PipelineError(f"train.fp8_attention=true cannot run on the training workers: {attention_reason}; "
                                "set train.fp8_attention=false, or train.fp8_fallback=true to train with bf16 "
                                "attention")
        log.warning("FP8 FALLBACK: train.fp8_attention=true cannot run (%s); training with FP8 %s layers and bf16 "
                    "attention because train.fp8_fallback=true", attention_reason, recipe)
        return dataclasses.replace(asked, attention=False, fallback=f"fp8_attention: {attention_reason}")
    if not train.fp8_fallback:
        raise PipelineError(f"train.fp8={recipe} cannot run on the training workers: {reason}; set "
                            "train.fp8=none, or train.fp8_fallback=true to train without FP8")
    log.warning("FP8 FALLBACK: train.fp8=%s cannot run (%s); training in %s without FP8 because "
                "train.fp8_fallback=true", recipe, reason, cfg.model.dtype)
    return dataclasses.replace(asked, recipe="none", attention=False, fallback=reason)


def decide_fp8(cfg: Config) -> Fp8Decision:
    """FP8 checked on a training worker (`probe_workers`), then `fp8_decision`; no probe when not asked for."""
    if cfg.train.fp8 == "none":
        return Fp8Decision.as_requested(cfg.train)
    reason, attention_reason = probe_workers(cfg)
    return fp8_decision(cfg, reason, attention_reason)


def tag_fallback(decision: Fp8Decision, run_ids: list[str], tracking_uri: str | None) -> None:
    """The `fp8.fallback` tag on `run_ids` when training runs with less FP8 than asked."""
    if decision.fallback is not None:
        for run_id in run_ids:
            tracking.set_tags(run_id, {FALLBACK_TAG: decision.fallback}, tracking_uri=tracking_uri)


def apply_fp8_policy(cfg: Config, reason: str | None, run_ids: list[str], tracking_uri: str | None,
                     attention_reason: str | None = None) -> Config:
    """`cfg` as training runs it (`fp8_decision`), with a fallback tagged on `run_ids`."""
    decision = fp8_decision(cfg, reason, attention_reason)
    tag_fallback(decision, run_ids, tracking_uri)
    return decision.apply(cfg)


def settle_fp8(cfg: Config, run_ids: list[str], tracking_uri: str | None) -> Config:
    """`cfg` as training runs it: `decide_fp8`, with a fallback tagged on `run_ids`."""
    decision = decide_fp8(cfg)
    tag_fallback(decision, run_ids, tracking_uri)
    return decision.apply(cfg)
