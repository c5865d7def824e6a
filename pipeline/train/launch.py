"""The train stage: Ray Train's TorchTrainer runs the TE-style Llama on `train.workers` workers.

Each worker builds the model, wraps it for DDP or FSDP2 (`pipeline.train.parallel`), resumes from the newest
committed checkpoint, and runs `Steps`: optimizer steps with the host one step ahead of the device.
A micro-batch is a pure function of (seed, epoch, rank, world, offset), so a resume needs only the
data position. Ray hears from the workers only at checkpoints, which rank 0 writes and commits.
Faults (SIGTERM, non-finite steps, restarts) are `pipeline.train.faults`'s. What this stage decides, in
full: docs/architecture.md ("The train stage").
"""

from __future__ import annotations

import logging
import math
import random
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs
import pyarrow.parquet as pq
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch.profiler import record_function as phase  # a step's phases, as named ranges in profiles
import te_model
from pipeline.train import checkpoint as ckpt
from pipeline.train import commit
from pipeline.train import faults, optim, parallel, permanent
from pipeline import storage
from pipeline import progress as progress_lines
from pipeline.config import Config, TrainConfig, require_max_steps
from pipeline.stages.data import PreparedData
from pipeline.job.resolved import ResolvedJob, absolute_path, resolve_job, storage_options
from pipeline.errors import PermanentError, PipelineError

log = logging.getLogger(__name__)

FAIL_AT_STEP_ENV = faults.FAIL_AT_STEP_ENV
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# Dense (no sparsity) bf16 tensor-core peak per GPU, by a substring of torch.cuda.get_device_name().
BF16_DENSE_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
COLUMNS = ("input_ids", "labels", "position_ids")


@dataclass
class TrainResult:
    """What a finished training run left behind."""

    checkpoint_uri: str  # the final checkpoint (layout: pipeline.train.checkpoint)
    steps: int  # optimizer steps done, across resumes
    final_loss: float
    metrics: list[dict[str, float]]  # every logged step, oldest first, across resumes
    ray_result_path: str  # uri of Ray's run folder, {run.output_uri}/ray/{run.name}
    resumed_from_step: int  # step the last attempt started from; 0 = from the base checkpoint


@dataclass
class Progress:
    """Where training stands on one rank."""

    step: int = 0
    tokens_seen: int = 0  # all ranks, padding included
    epoch: int = 0  # position of the next micro-batch this rank reads
    offset: int = 0
    resumed_from_step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    nonfinite_steps: int = 0  # steps skipped or rolled back for a NaN/Inf loss or gradient
    checkpoint_step: int = 0  # step of the newest checkpoint this attempt reported or resumed from


# ---------------------------------------------------------------------------------------------------
# driver side
# ---------------------------------------------------------------------------------------------------
def train(job: ResolvedJob | Config, prepared: PreparedData, *, run_id: str | None = None,
          tracking_uri: str | None = None, code_version: dict | None = None) -> TrainResult:
    """Fine-tune `model.base_uri` on `prepared.train_uri` with Ray Train; a run with checkpoints resumes.

    Needs a running Ray (`ray.init` or a cluster address). `job`: the job resolved at its start (a plain
    Config is resolved here); training runs with `job.train_config`. `run_id`/`tracking_uri`: the MLflow
    run that receives per-step metrics from rank 0; None logs nothing to MLflow.
    """
    require_max_steps(job if isinstance(job, Config) else job.config)  # before anything starts
    job = resolve_job(job) if isinstance(job, Config) else job
    cfg, options = job.train_config, job.storage
    ray_uri = job.folders.ray_uri
    storage_path, storage_fs = _ray_storage(ray_uri, options)
    run_uri, attempt = storage.join(ray_uri, cfg.run.name), permanent.new_attempt()
    permanent.clear(run_uri, options)  # an earlier attempt's reason to stop does not stop this one
    loop_config = {"job": job, "train_uri": absolute_path(prepared.train_uri), "ray_uri": ray_uri,
                   "run_id": run_id, "tracking_uri": tracking_uri, "code_version": code_version,
                   "run_started_ms": _run_started_ms(run_id, tracking_uri), "attempt": attempt,
                   "hooks": faults.Hooks.from_env().to_dict()}
    trainer = ray.train.torch.TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.train.workers, use_gpu=cfg.train.use_gpu),
        run_config=ray.train.RunConfig(
            name=cfg.run.name, storage_path=storage_path, storage_filesystem=storage_fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
        ),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as exc:
        reason = permanent.read(run_uri, attempt, options)
        if reason:  # Ray ran out of restarts (or had none) before a restarted group could read the record
            raise PermanentError(f"training run {cfg.run.name!r} stopped on {reason}") from exc
        raise PipelineError(f"training run {cfg.run.name!r} failed ({_failure_summary(exc)}); run it again with "
                            "the same run.name and run.output_uri to resume from its latest checkpoint") from exc
    reason = (result.return_value or {}).get("permanent")
    if reason:
        raise PermanentError(f"training run {cfg.run.name!r} stopped on {reason}")
    stopped = (result.return_value or {}).get("stopped")
    if stopped:
        raise PipelineError(f"training run {cfg.run.name!r} stopped: {stopped}; lower train.lr or check the data, "
                            "or set train.on_nonfinite=skip or rollback")
    return train_result(cfg, ray_uri, options)


def train_result(cfg: Config, ray_uri: str, options: storage.StorageOptions) -> TrainResult:
    """What training reached: the newest committed checkpoint in storage, not the one Ray registered.

    A driver killed mid-run leaves workers that may commit later checkpoints Ray never registers. The
    next run's workers resume from the newest of them (`checkpoint_commit.resume_checkpoint`). So the
    result must be that one too, or eval and export would use older weights than the step reported."""
    checkpoint_uri = commit.newest_committed_uri(storage.join(ray_uri, cfg.run.name), options)
    if checkpoint_uri is None:
        raise PipelineError(f"training run {cfg.run.name!r} finished without a committed checkpoint under "
                            f"{storage.join(ray_uri, cfg.run.name)}")
    state_uri = storage.join(checkpoint_uri, ckpt.TRAINER_STATE_FILE)
    state = ckpt.parse_trainer_state(storage.read_bytes(state_uri, options), state_uri)
    metrics = state["metrics"]
    return TrainResult(checkpoint_uri=checkpoint_uri, steps=state["step"],
                       final_loss=metrics[-1]["loss"] if metrics else math.nan, metrics=metrics,
                       ray_result_path=storage.join(ray_uri, cfg.run.name),
                       resumed_from_step=state["resumed_from_step"])


def _run_started_ms(run_id: str | None, tracking_uri: str | None) -> int | None:
    """Steps of a resumed history logged after this is when they went to this same MLflow run."""
    if run_id is None:
        return None
    from pipeline import tracking  # imports mlflow: the driver only

    return tracking.run_start_ms(run_id, tracking_uri=tracking_uri)


def _ray_storage(ray_uri: str, options: storage.StorageOptions) -> tuple[str, pyarrow.fs.FileSystem | None]:
    """Ray's (storage_path, storage_filesystem): a plain path locally, s3fs wrapped for pyarrow for S3."""
    fs, path = storage.filesystem(ray_uri, options)
    if "file" in fs.protocol:
        return path, None
    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))  # path without the s3:// scheme


def _failure_summary(exc: Exception) -> str:
    failures = getattr(exc, "worker_failures", None) or {}
    error, where = (failures[min(failures)], f"rank {min(failures)}: ") if failures else (exc, "")
    lines = [line for line in str(error).splitlines() if line.strip()]
    return where + (lines[-1].strip()[:300] if lines else type(error).__name__)


# ---------------------------------------------------------------------------------------------------
# model, optimizer, schedule, data
# ---------------------------------------------------------------------------------------------------
def make_optimizer(model: torch.nn.Module, train: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on 2-D weights (matmuls, embeddings) only, not on norms.

    `pipeline.train.optim.AdamW`: torch's fused AdamW, with the update one Triton kernel per parameter on a GPU
    (torch's own fused kernel on CPU). Both take `found_inf`, which lets a non-finite step skip its update
    on the device without the host looking (`Steps`). With data parallelism each replica runs the whole
    update every step, so its cost does not shrink as workers are added. FSDP2's sharded parameters
    (DTensors) are updated shard by shard. `train.master_weights` says how bf16 parameters keep small
    updates: a Kahan compensation buffer by default, or an fp32 master copy. The optimizer holds either,
    per parameter or per local shard.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": train.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return optim.AdamW([g for g in groups if g["params"]], lr=train.lr, betas=(0.9, 0.95),
                       master_weights=train.master_weights)


def lr_multiplier(step: int, train: TrainConfig) -> float:
    """Factor on `train.lr` for optimizer step `step` (0-based): linear warmup, then cosine decay."""
    if step < train.warmup_steps:
        return (step + 1) / train.warmup_steps
    progress = min(1.0, (step - train.warmup_steps) / max(1, train.max_steps - train.warmup_steps))
    return train.min_lr_ratio + (1 - train.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    # A plain function (not a partial): LambdaLR then saves no state for it, and its state stays JSON.
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, train))


def read_rows(uri: str, options: storage.StorageOptions) -> pa.Table:
    """The packed-row columns of a prepared parquet file."""
    fs, path = storage.filesystem(uri, options)
    try:
        return pq.read_table(path, filesystem=fs, columns=list(COLUMNS))
    except (OSError, pa.ArrowInvalid, KeyError) as exc:
        raise PipelineError(f"cannot read training rows {uri}: {type(exc).__name__}: {exc}") from None


def _as_matrix(column: pa.ChunkedArray, name: str) -> np.ndarray:
    lists = column.combine_chunks()
    lengths = np.diff(lists.offsets.to_numpy())
    if len(lengths) and lengths.min() != lengths.max():
        raise PermanentError(f"training rows: column {name} mixes row lengths {lengths.min()} and {lengths.max()}")
    return lists.flatten().to_numpy().reshape(len(lists), -1).astype(np.int64)


class RankShard:
    """This rank's micro-batches by position (epoch, offset): rows[rank::world] of each epoch's permutation."""

    def __init__(self, table: pa.Table, seed: int, rank: int, world: int, micro_batch_size: int) -> None:
        self.table, self.seed, self.rank, self.world = table, seed, rank, world
        self.micro_batch_size = micro_batch_size
        self.batches_per_epoch = table.num_rows // world // micro_batch_size
        if not self.batches_per_epoch:
            raise PermanentError(f"the train split has {table.num_rows} rows, fewer than train.workers x "
                                 f"train.micro_batch_size = {world * micro_batch_size}")
        self.seq_len = len(table.column("input_ids")[0])
        self._epoch, self._rows = -1, np.empty(0, dtype=np.int64)

    def _my_rows(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            order = np.random.default_rng((self.seed + epoch) % 2**64).permutation(self.table.num_rows)
            self._epoch, self._rows = epoch, order[self.rank :: self.world]
        return self._rows

    def batch(self, epoch: int, offset: int) -> dict[str, torch.Tensor]:
        start = offset * self.micro_batch_size
        rows = self.table.take(self._my_rows(epoch)[start : start + self.micro_batch_size])
        return {name: torch.from_numpy(_as_matrix(rows.column(name), name)) for name in COLUMNS}

    def next_position(self, epoch: int, offset: int) -> tuple[int, int]:
        return (epoch, offset + 1) if offset + 1 < self.batches_per_epoch else (epoch + 1, 0)


def flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """Training FLOPs per token: 6 per matmul weight plus attention, 12 * layers * hidden * seq_len
    (PaLM, appendix B; it counts full causal rows, an upper bound for packed documents)."""
    embedding = model.get_input_embeddings().weight
    tied = embedding is model.get_output_embeddings().weight
    matmul_weights = sum(p.numel() for p in model.parameters()) - (0 if tied else embedding.numel())
    return 6 * matmul_weights + 12 * model.config.num_hidden_layers * model.config.hidden_size * seq_len


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_DENSE_PEAK_FLOPS.items() if key in name), None)


# ---------------------------------------------------------------------------------------------------
# worker side
# ---------------------------------------------------------------------------------------------------
@dataclass
class _Worker:
    """Everything one training worker holds."""

    cfg: Config
    options: storage.StorageOptions
    rank: int
    world: int
    device: torch.device
    model: torch.nn.Module  # the unwrapped module: its parameter names are the checkpoint's
    ddp_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    shard: RankShard
    flops_per_token: float
    peak_flops: float | None


def build_worker(cfg: Config, train_uri: str, rank: int = 0, world: int = 1,
                 device: torch.device | None = None, options: storage.StorageOptions | None = None) -> _Worker:
    """Everything rank `rank` of `world` trains with: model (wrapped when torch.distributed is up), optimizer,
    schedule and its shard of the rows. Ray Train workers get theirs from `_build_worker`, with the job's
    storage options; a bare process (bench/ray_overhead.py) calls this directly."""
    require_max_steps(cfg)
    options = options or storage_options(cfg)
    torch.manual_seed(cfg.run.seed)
    random.seed(cfg.run.seed)
    device = device or torch.device("cpu")
    base = storage.pull_checkpoint(cfg.model.base_uri, cfg.run.cache_dir, options)  # once per node
    model = te_model.from_hf_checkpoint(base, backend=cfg.model.backend, dtype=DTYPES[cfg.model.dtype],
                                        device=device)
    if cfg.train.activation_checkpointing:
        model.gradient_checkpointing_enable()
    model.fp8_head = cfg.train.fp8_head
    model.train()
    wrapped = model
    if dist.is_initialized():
        wrapped = parallel.wrap(model, cfg.train.parallelism,
                                reshard_after_forward=cfg.train.fsdp_reshard_after_forward)
    optimizer = make_optimizer(model, cfg.train)
    shard = RankShard(read_rows(train_uri, options), cfg.run.seed, rank, world, cfg.train.micro_batch_size)
    if cfg.train.fp8 != "none":
        te_model.check_fp8_tokens(cfg.train.micro_batch_size * shard.seq_len, where="a micro-batch")
    return _Worker(cfg, options, rank, world, device, model, wrapped, optimizer,
                   make_scheduler(optimizer, cfg.train), shard, flops_per_token(model, shard.seq_len),
                   peak_flops(device))


def _build_worker(cfg: Config, train_uri: str, options: storage.StorageOptions) -> _Worker:
    context = ray.train.get_context()
    return build_worker(cfg, train_uri, context.get_world_rank(), context.get_world_size(),
                        ray.train.torch.get_device(), options)


def _resume(w: _Worker, ray_uri: str, checkpoint: ray.train.Checkpoint | None = None) -> Progress:
    """Progress restored from `checkpoint` (a committed one Ray reported: a rollback), else from the newest
    committed, verified checkpoint of this run; or a fresh start."""
    if checkpoint is not None:
        uri = storage.join(ray_uri, w.cfg.run.name, PurePosixPath(checkpoint.path).name)
        local = storage.pull_checkpoint(uri, w.cfg.run.cache_dir, w.options)  # verified against its manifest
    else:
        found = commit.resume_checkpoint(storage.join(ray_uri, w.cfg.run.name), w.cfg.run.cache_dir, w.options,
                                         rank=w.rank, ray_has_one=ray.train.get_checkpoint() is not None)
        if found is None:
            return Progress()
        uri, local = found  # a damaged newer checkpoint was skipped with a warning naming it
    state, position = ckpt.load_checkpoint(local, module=w.model, optimizer=w.optimizer, scheduler=w.scheduler,
                                           rank=w.rank, world_size=w.world,
                                           micro_batch_size=w.cfg.train.micro_batch_size)
    if position["offset"] >= w.shard.batches_per_epoch:  # another worker count cuts epochs differently
        position = {"epoch": position["epoch"] + 1, "offset": 0}
    log.info("rank %d resumes run %s at step %d from %s", w.rank, w.cfg.run.name, state["step"], uri)
    return Progress(step=state["step"], tokens_seen=state["tokens_seen"], resumed_from_step=state["step"],
                    history=state["metrics"], checkpoint_step=state["step"], **position)


def _device_batch(w: _Worker, position: tuple[int, int]) -> dict[str, Any]:
    """The micro-batch at `position` as model inputs on the device, with its attention plan and the
    positions its loss scores found from the host's rows (`te_model.prepare_batch`): neither this nor the
    model's forward and backward waits for the device."""
    return te_model.prepare_batch(w.shard.batch(*position), w.device)


@dataclass
class _Passes:
    """A step's forward and backward passes, queued on the device."""

    loss: torch.Tensor  # this rank's mean loss over the step's micro-batches
    tokens: int  # this rank's
    position: tuple[int, int]  # the data position after the step's micro-batches


class Steps:
    """Optimizer steps with the host one step ahead of the device.

    The host reads a step's outcome (`faults.read_agreement`: loss, gradient norm, non-finite ranks,
    SIGTERM ranks) only once it has queued the next step's forward and backward passes. Where the device
    is the bound, it then never starts a step empty, waiting for the host to launch the forward pass:
    the host launches it while the device still runs the previous backward and update. (Where the host
    is the bound, as with small micro-batches of a small model, there is no lead to carry over.)

    The update needs no decision from the host. The fused AdamW skips it on the device when the flags say
    some loss or gradient norm was non-finite (`found_inf`, as under a GradScaler). Counting the step,
    the LR schedule, checkpoints, SIGTERM and `train.on_nonfinite` happen with the outcome. That is
    before the queued step's update is launched, so the update uses the right learning rate.

    The attention plan and the scored tokens are found on the host (`_device_batch`). So the host waits
    on the device once per step: for the flags, copied to pinned memory as soon as they are made
    (`faults.HostFlags`). It waits for the step up to its flags, not for the work queued after them. It
    queues the next update while the device still runs this step's update and the next step's passes.

    After a non-finite step the queued passes are dropped (their gradients zeroed, their micro-batches
    read again by the next step), whatever `train.on_nonfinite` says. A rollback or a stop needs that;
    after a skip the passes would still be valid, and are redone anyway, for one path through all three
    policies (non-finite steps are rare).
    """

    def __init__(self, w: _Worker, hooks: faults.Hooks = faults.Hooks(), *, ahead: bool = True) -> None:
        """`ahead=False` reads each step's outcome before queuing anything of the next (what the step did
        before `Steps`): only for measuring what running ahead is worth (bench/parallel_profile.py)."""
        self.w, self.hooks, self.ahead = w, hooks, ahead
        self.queued: _Passes | None = None
        self.last_done = time.perf_counter()

    def next(self, progress: Progress) -> tuple[dict[str, float] | None, faults.StepAgreement]:
        """Take the next optimizer step to its outcome; advances `progress`. Metrics are None when the loss
        or gradient norm was non-finite on some rank: then no rank updated and only the data position
        moved."""
        w = self.w
        passes = self.queued or self._passes((progress.epoch, progress.offset), progress.step + 1)
        self.queued = None
        flags, lr = self._update(passes)
        if self.ahead and progress.step + 1 < w.cfg.train.max_steps:  # a next step is due: queue its passes first
            self.queued = self._passes(passes.position, progress.step + 2)
        agreed = faults.read_agreement(flags, w.world)
        progress.epoch, progress.offset = passes.position
        now = time.perf_counter()
        elapsed, self.last_done = now - self.last_done, now
        if agreed.nonfinite:
            self.drop_queued()
            return None, agreed
        w.scheduler.step()
        global_tokens = passes.tokens * w.world
        progress.step += 1
        progress.tokens_seen += global_tokens
        mfu = w.flops_per_token * global_tokens / elapsed / (w.peak_flops * w.world) if w.peak_flops else 0.0
        memory = torch.cuda.max_memory_allocated(w.device) / 2**30 if w.device.type == "cuda" else 0.0
        return {"step": progress.step, "loss": agreed.loss, "lr": lr, "grad_norm": agreed.grad_norm,
                "tokens_per_s": global_tokens / elapsed, "mfu": mfu, "gpu_mem_gb": memory,
                "nonfinite_steps": progress.nonfinite_steps, faults.TIME_KEY: int(time.time() * 1000)}, agreed

    def restart_clock(self) -> None:
        """Time the next step from now: a checkpoint or a rollback between steps is not step time."""
        self.last_done = time.perf_counter()

    def drop_queued(self) -> None:
        """Forget the queued passes: gradients zeroed; their micro-batches are read again."""
        if self.queued is not None:
            self.queued = None
            self.w.optimizer.zero_grad(set_to_none=True)

    def _passes(self, position: tuple[int, int], step: int) -> _Passes:
        """Forward and backward over `grad_accum_steps` micro-batches from `position`. `step` is the number
        the step gets if the one before it is finite (the test hooks key on it)."""
        w, train, accum = self.w, self.w.cfg.train, self.w.cfg.train.grad_accum_steps
        recipe = None if train.fp8 == "none" else train.fp8
        group = dist.group.WORLD if dist.is_initialized() else None
        loss_sum, tokens = None, 0
        for micro in range(accum):
            with phase("train.batch"):
                batch = _device_batch(w, position)
            position = w.shard.next_position(*position)
            tokens += batch["input_ids"].numel()
            with parallel.gradient_sync(w.ddp_model, enabled=micro == accum - 1):
                with phase("train.forward"), te_model.fp8_autocast(
                        recipe, amax_history_len=train.fp8_amax_history_len, fp8_attention=train.fp8_attention,
                        group=group):
                    loss = self.hooks.poisoned(w.ddp_model(**batch).loss, w.rank, step)
                with phase("train.backward"):
                    (loss / accum).backward()  # outside the FP8 autocast: TE runs the matching backward itself
            loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
        return _Passes(loss_sum / accum, tokens, position)

    def _update(self, passes: _Passes) -> tuple[faults.HostFlags, float]:
        """Clip, agree and step the optimizer, all queued on the device: (the agreement flags on their way
        to the host, still unread; the learning rate the update used)."""
        w = self.w
        with phase("train.clip"):
            grad_norm = parallel.full_tensor(
                torch.nn.utils.clip_grad_norm_(w.model.parameters(), w.cfg.train.max_grad_norm or math.inf))
        with phase("train.agree"):
            flags = faults.agreement_flags(passes.loss, grad_norm, w.rank, w.world)
            on_host = faults.HostFlags(flags)  # copied before the update is queued: reading waits for no more
        lr = w.scheduler.get_last_lr()[0]
        with phase("train.optimizer"):
            w.optimizer.found_inf = faults.found_nonfinite(flags, w.world)  # skips the update on the device
            try:
                w.optimizer.step()
            finally:
                del w.optimizer.found_inf
            w.optimizer.zero_grad(set_to_none=True)
        return on_host, lr


def _after_nonfinite(w: _Worker, progress: Progress, agreed: faults.StepAgreement, ray_uri: str,
                     metrics: faults.CommittedMetrics) -> tuple[Progress, str | None]:
    """`train.on_nonfinite` applied: the progress to go on with, or why the run stops."""
    train = w.cfg.train
    progress.nonfinite_steps += 1
    what = agreed.describe(progress.step + 1)
    if train.on_nonfinite == "stop":
        return progress, f"{what} (train.on_nonfinite=stop)"
    if progress.nonfinite_steps > train.max_nonfinite_steps:
        return progress, f"{what}, {progress.nonfinite_steps} non-finite steps in this run " \
                         f"(train.max_nonfinite_steps={train.max_nonfinite_steps})"
    if train.on_nonfinite == "rollback":
        checkpoint = faults.latest_committed_checkpoint(progress.checkpoint_step)
        if checkpoint is None:
            return progress, f"{what}, and no checkpoint yet to roll back to (train.on_nonfinite=rollback)"
        progress = _rolled_back(w, progress, ray_uri, checkpoint)
        metrics.discard_held()
    if w.rank == 0:
        log.warning("%s: %s, going on from step %d (non-finite steps so far: %d)", what,
                    "skipped" if train.on_nonfinite == "skip" else "rolled back", progress.step + 1,
                    progress.nonfinite_steps)
    return progress, None


def _rolled_back(w: _Worker, progress: Progress, ray_uri: str, checkpoint: ray.train.Checkpoint) -> Progress:
    """Weights, optimizer, schedule and step from `checkpoint`; the data goes on after the bad step, so
    the micro-batches since that checkpoint are not replayed."""
    restored = _resume(w, ray_uri, checkpoint)
    restored.epoch, restored.offset = progress.epoch, progress.offset
    restored.resumed_from_step, restored.nonfinite_steps = progress.resumed_from_step, progress.nonfinite_steps
    return restored


def _report_checkpoint(w: _Worker, progress: Progress, metrics: dict[str, float],
                       loop_config: dict[str, Any]) -> None:
    """ray.train.report on every rank (a collective), with the checkpoint rank 0 writes for all."""
    ranks = ckpt.gather_rank_files(ckpt.rank_files({"epoch": progress.epoch, "offset": progress.offset}))
    if w.rank != 0:
        ckpt.join_gather(w.model, w.optimizer)
        ray.train.report(metrics, checkpoint=None)
        return
    state = {"step": progress.step, "tokens_seen": progress.tokens_seen,
             "resumed_from_step": progress.resumed_from_step, "train_uri": loop_config["train_uri"],
             "config": w.cfg.to_dict(), "code_version": loop_config["code_version"], "metrics": progress.history}
    with tempfile.TemporaryDirectory(prefix="train-checkpoint-") as local:
        ckpt.write_checkpoint(local, module=w.model, optimizer=w.optimizer, scheduler=w.scheduler,
                              trainer_state=state, ranks=ranks)
        # Our upload, not Ray's copy: files, manifest, then the COMMITTED marker (pipeline.train.commit).
        hooks = faults.Hooks(**loop_config["hooks"])
        upload = commit.ray_upload_fn(storage.join(loop_config["ray_uri"], w.cfg.run.name), w.options,
                                      pause=lambda phase: hooks.pause_upload(phase, progress.step))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(local),
                         checkpoint_dir_name=f"checkpoint_{progress.step:06d}-{uuid.uuid4().hex[:8]}",
                         checkpoint_upload_fn=upload)


def _metric_logger(rank: int, run_id: str | None, tracking_uri: str | None):
    """MLflow's non-blocking per-step logger on rank 0 of a tracked run; a no-op logger elsewhere."""
    from pipeline.tracking.metrics import metric_logger

    return metric_logger(rank, run_id, tracking_uri)


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, str] | None:
    """One Ray Train worker: build the model, resume if Ray has a checkpoint, train to `train.max_steps`.

    Returns {"stopped": reason} when a non-finite step stopped the run (on every rank alike). Returns
    {"permanent": reason} at once, on every rank, when an earlier try of this attempt failed on an error
    no restart can fix (`pipeline.train.permanent`); such an error is recorded before it is raised.
    """
    job: ResolvedJob = loop_config["job"]  # Ray hands the driver's object over as it is
    cfg, options = job.train_config, job.storage
    hooks = faults.Hooks(**loop_config["hooks"])
    rank = ray.train.get_context().get_world_rank()
    run_uri = storage.join(loop_config["ray_uri"], cfg.run.name)
    reason = permanent.agreed_reason(run_uri, loop_config["attempt"], rank, options, ray.train.torch.get_device())
    if reason:
        hooks.record(rank, "permanent_seen", 0)
        return {"permanent": reason}
    try:
        return _train_worker(cfg, hooks, loop_config)
    except Exception as exc:
        if permanent.is_permanent(exc):
            permanent.write(run_uri, loop_config["attempt"], rank, exc, options)
        raise


def _train_worker(cfg: Config, hooks: faults.Hooks, loop_config: dict[str, Any]) -> dict[str, str] | None:
    w = _build_worker(cfg, loop_config["train_uri"], loop_config["job"].storage)
    progress = _resume(w, loop_config["ray_uri"])  # last: restores the RNG states training goes on with
    progress.nonfinite_steps = faults.nonfinite_count(progress.history)
    metrics = faults.CommittedMetrics(_metric_logger(w.rank, loop_config["run_id"], loop_config["tracking_uri"]))
    metrics.resend(progress.history, since_ms=loop_config["run_started_ms"])
    hooks.record(w.rank, "start", progress.step)
    faults.watch_sigterm()
    try:
        return _train_steps(w, progress, metrics, hooks, loop_config)
    finally:
        faults.unwatch_sigterm()
        metrics.close(timeout=30.0)


def _train_steps(w: _Worker, progress: Progress, metrics: faults.CommittedMetrics, hooks: faults.Hooks,
                 loop_config: dict[str, Any]) -> dict[str, str] | None:
    train = w.cfg.train
    steps = Steps(w, hooks)
    shown = progress_lines.step_progress(w.rank, train.max_steps, train.log_every, train.progress_every_s,
                                         first_step=progress.step)
    while progress.step < train.max_steps:
        step_metrics, agreed = steps.next(progress)
        if step_metrics is None:
            progress, stopped = _after_nonfinite(w, progress, agreed, loop_config["ray_uri"], metrics)
            if stopped:
                return {"stopped": stopped}
            steps.restart_clock()
            continue
        step, last = progress.step, progress.step == train.max_steps
        hooks.record(w.rank, "step", step)  # finished; its checkpoint, if any, follows
        shown.update(step_metrics)  # the same numbers MLflow gets
        save = last or bool(agreed.sigterm_ranks) or (train.checkpoint_every > 0 and step % train.checkpoint_every == 0)
        if last or save or step % train.log_every == 0:
            progress.history.append(step_metrics)
            metrics.hold(step_metrics)
        if save:
            _report_checkpoint(w, progress, step_metrics, loop_config)
            progress.checkpoint_step = step
            metrics.checkpoint_reported()
            steps.restart_clock()
        if agreed.sigterm_ranks and not last:
            if w.world > 1:
                # Rank 0's report returns once the checkpoint is uploaded and committed. A rank that raised
                # sooner would have Ray stop the group mid-upload, and the preemption checkpoint lost.
                dist.barrier()
            raise faults.preempted_error(agreed, step)
        if w.rank == 0 and hooks.fail_at_step == step:
            raise RuntimeError(f"{FAIL_AT_STEP_ENV}={step}: failing on purpose after step {step}")
        if w.rank == 0 and hooks.bad_input_at_step == step:
            hooks.record(w.rank, "bad_input", step)
            raise PermanentError(f"{faults.BAD_INPUT_AT_STEP_ENV}={step}: bad input on purpose after step {step}")
    return None
