"""One Ray Train worker: build the model, optimizer and data, resume, run the loop, finish.

`train_loop_per_worker` is what Ray runs on each worker, with the `WorkerSpec` the driver made
(`pipeline.train.launch`). Everything a worker trains with is built by `build`, which a bare process
can call too (bench/). The steps themselves are `pipeline.train.loop`'s. A worker that fails on an error
no restart can fix records it first, so a restarted group stops at once (`pipeline.train.permanent`).
"""

from __future__ import annotations

import logging
import random
import sys
from dataclasses import asdict, dataclass

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

import te_model
from pipeline import storage
from pipeline.config import Config, require_max_steps
from pipeline.job.resolved import fp8_head_on, storage_options
from pipeline.train import (
    agreement,
    exactly_once,
    loop,
    optim,
    overlap,
    parallel,
    permanent,
    sigterm,
)
from pipeline.train.batches import RankShard, read_rows
from pipeline.train.faults import NO_FAULTS, FaultInjector

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# The Ray Train module that logs each report; loaded on a worker before the loop runs
RAY_REPORT_MODULE = "ray.train.v2._internal.execution.context"


def train_loop_per_worker(spec: WorkerSpec) -> dict:
    """One Ray Train worker: build the model, resume from the newest committed checkpoint, train to
    `train.max_steps`.

    Returns {"stopped": reason} when a non-finite step stopped the run (on every rank alike). Returns
    {"permanent": reason} at once, on every rank, when an earlier try of this attempt failed on an error
    no restart can fix; such an error is recorded before it is raised. Otherwise {"checkpoints": [...]}:
    the step, training stall, upload time and size of each checkpoint of this attempt.
    """
    _quiet_ray_reports()
    context = ray.train.get_context()
    place = loop.Placement(context.get_world_rank(), context.get_world_size(), ray.train.torch.get_device())
    reason = permanent.agreed_reason(spec.run_uri, spec.attempt, place.rank, spec.options, place.device)
    if reason:
        spec.faults.permanent_seen(place.rank)
        return {"permanent": reason}
    try:
        stopped, checkpoints = _train(spec, place)
    except Exception as exc:
        if permanent.is_permanent(exc):
            permanent.write(spec.run_uri, spec.attempt, place.rank, exc, spec.options)
        raise
    return {"stopped": stopped} if stopped else {"checkpoints": checkpoints}


def _quiet_ray_reports() -> None:
    """Ray Train logs each report at INFO, every metric of it, from every rank, through a logger named by
    its source file; the progress lines already say it once. Nothing to do if Ray moved it."""
    module = sys.modules.get(RAY_REPORT_MODULE)
    if module is not None:
        logging.getLogger(module.__file__).setLevel(logging.WARNING)


def _train(spec: WorkerSpec, place: loop.Placement) -> tuple[str | None, list[dict]]:
    """Why a non-finite step stopped the run (or None), and the times of this attempt's checkpoints."""
    state = build(spec.config, spec.train_uri, place.rank, place.world, place.device, spec.options)
    progress = loop.restore(state, spec)  # last: restores the RNG states training goes on with
    progress.nonfinite_steps = agreement.nonfinite_count(progress.history)
    metrics = exactly_once.CommittedMetrics(_metric_logger(place.rank, spec.run_id, spec.tracking_uri))
    metrics.resend(progress.history, since_ms=spec.run_started_ms)
    spec.faults.worker_started(place.rank, progress.step)
    sigterm.watch()
    checkpoints = loop.checkpointer(state, spec)
    try:
        stopped = loop.fit(state, progress, spec, metrics, checkpoints)
        times = checkpoints.finish()  # the last checkpoint committed before the result is
    except BaseException:
        checkpoints.close()  # the state in flight is sound: let its commit finish
        raise
    finally:
        sigterm.unwatch()
        metrics.close(timeout=30.0)
    return stopped, [asdict(t) for t in times]


@dataclass(frozen=True)
class WorkerSpec:
    """What the driver hands every worker: the run's inputs, resolved where `train` was called."""

    config: Config
    """The run's config, local paths made absolute: workers run in a directory of their own."""
    options: storage.StorageOptions
    """How to reach the run's storage."""
    train_uri: str
    """The prepared training rows (parquet)."""
    run_uri: str
    """Ray's folder of this run, {run.output_uri}/ray/{run.name}: its checkpoints and records."""
    attempt: str
    """This call of `train`: a record of an error no restart can fix counts within one attempt only."""
    code_version: dict | None = None
    """Written into every checkpoint's trainer state."""
    run_id: str | None = None
    """The MLflow run that gets rank 0's per-step metrics; None logs none."""
    tracking_uri: str | None = None
    run_started_ms: int | None = None
    """When that MLflow run started: a resumed history's steps since then are sent again."""
    faults: FaultInjector = NO_FAULTS
    """Fault injection for the tests (`pipeline.train.faults.Hooks`); the default does nothing."""


def build(cfg: Config, train_uri: str, rank: int = 0, world: int = 1, device: torch.device | None = None,
          options: storage.StorageOptions | None = None) -> loop.TrainState:
    """Everything rank `rank` of `world` trains with: model (wrapped when torch.distributed is up), optimizer,
    schedule and its shard of the rows."""
    require_max_steps(cfg)
    options = options or storage_options(cfg)  # a bare process (bench/) has no job's options
    torch.manual_seed(cfg.run.seed)
    random.seed(cfg.run.seed)
    device = device or torch.device("cpu")
    base = storage.pull_checkpoint(cfg.model.base_uri, cfg.run.cache_dir, options)  # once per node
    model = te_model.from_hf_checkpoint(base, backend=cfg.model.backend, dtype=DTYPES[cfg.model.dtype],
                                        device=device)
    if cfg.train.activation_checkpointing:  # the name from transformers 5.24 on; the one before is deprecated
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    model.mlp_recompute_enable(cfg.train.recompute_mlp)
    model.fp8_weight_recast_enable(cfg.train.recast_fp8_weights)
    if cfg.train.cuda_graphs:  # captured by the first pass (loop.capture_graphs); refused here if it cannot be
        te_model.graphs.check_graphable(model)
    model.fp8_head = fp8_head_on(cfg.train, model.config.hidden_size, model.config.vocab_size)
    model.train()
    wrapped = model
    if dist.is_initialized():
        wrapped = parallel.wrap(model, cfg.train.parallelism,
                                reshard_after_forward=cfg.train.fsdp_reshard_after_forward)
    optimizer = optim.make_optimizer(model, cfg.train)
    if cfg.train.fp8_weights_from_update and cfg.train.fp8 == "delayed":  # (fp8 is "none" after a fallback)
        optimizer.fp8_weights = model.fp8_weights_from_update()
    shard = RankShard(read_rows(train_uri, options), cfg.run.seed, rank, world, cfg.train.micro_batch_size)
    if cfg.train.fp8 != "none":
        te_model.check_fp8_tokens(cfg.train.micro_batch_size * shard.seq_len, where="a micro-batch")
    # FSDP2 gathers each layer's weights before its forward on streams of its own: the update stays in line there
    sharded = dist.is_initialized() and cfg.train.parallelism == "fsdp"
    overlapped = None
    if cfg.train.overlap_update and device.type == "cuda" and not sharded:
        overlapped = overlap.UpdateOverlap(model, optimizer, device)
    return loop.TrainState(train=cfg.train, place=loop.Placement(rank, world, device), model=model, wrapped=wrapped,
                           optimizer=optimizer, scheduler=optim.make_scheduler(optimizer, cfg.train), shard=shard,
                           overlap=overlapped)


def _metric_logger(rank: int, run_id: str | None, tracking_uri: str | None):
    """MLflow's non-blocking per-step logger on rank 0 of a tracked run; a no-op logger elsewhere."""
    from pipeline.tracking.metrics import (
        metric_logger,  # imports mlflow: only where it is used
    )

    return metric_logger(rank, run_id, tracking_uri)
