"""The training loop on one worker: optimizer steps from where it resumed to `train.max_steps`.

`fit` reads top-down: take a step, apply `train.on_nonfinite` to a non-finite one, hold the metrics,
checkpoint, stop after a SIGTERM. `Steps.next` is one step: forward and backward over the
micro-batches, clip, the cross-rank agreement, the update, the outcome. The host runs one step ahead of
the device there. Tests inject faults through a `FaultInjector` the loop calls at named points.
Building the model and resuming it: `pipeline.train.worker`. What this decides: docs/architecture.md.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import TYPE_CHECKING

import ray.train
import torch
import torch.distributed as dist
from torch.profiler import (
    record_function as phase,  # a step's phases, as named ranges in profiles
)

import te_model
from pipeline import progress as progress_lines
from pipeline import storage
from pipeline.config import TrainConfig
from pipeline.train import agreement, commit, exactly_once, optim, overlap, parallel, sigterm
from pipeline.train import checkpoint as ckpt
from pipeline.train.batches import RankShard
from pipeline.train.faults import NO_FAULTS, FaultInjector

if TYPE_CHECKING:
    from pipeline.train.worker import WorkerSpec

log = logging.getLogger(__name__)

# Dense (no sparsity) bf16 tensor-core peak per GPU, by a substring of torch.cuda.get_device_name().
BF16_DENSE_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


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


@dataclass(frozen=True)
class Placement:
    """Where one worker trains."""

    rank: int
    """This worker's rank; rank 0 writes the checkpoints and logs the metrics."""
    world: int
    """Workers in the group."""
    device: torch.device
    """This worker's device: its GPU, or the CPU."""


@dataclass
class TrainState:
    """What one worker trains, the loop's whole working set (`pipeline.train.worker.build` makes it)."""

    train: TrainConfig
    """The run's `train` section."""
    place: Placement
    model: torch.nn.Module
    """The unwrapped module: its parameter names are the checkpoint's."""
    wrapped: torch.nn.Module
    """What the passes run: `model` wrapped for DDP or FSDP2 when torch.distributed is up, else `model`."""
    optimizer: optim.AdamW
    scheduler: torch.optim.lr_scheduler.LambdaLR
    shard: RankShard
    """This rank's micro-batches."""
    graphs: te_model.graphs.DecoderGraphs | None = None
    """The decoder layers' CUDA graphs (`train.cuda_graphs`), captured by the first pass."""
    overlap: overlap.UpdateOverlap | None = None
    """The update beside the next forward (`train.overlap_update`), where it applies."""

    def update(self) -> None:
        """`optimizer.step()`: on the overlap's side stream where there is one."""
        (self.overlap.step if self.overlap is not None else self.optimizer.step)()

    def join_update(self) -> None:
        """Whatever is queued from now on runs after the last update (a no-op without the overlap)."""
        if self.overlap is not None:
            self.overlap.join()


# ---------------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------------
def fit(state: TrainState, progress: Progress, spec: WorkerSpec, metrics: exactly_once.CommittedMetrics,
        checkpointer: commit.Checkpointer) -> str | None:
    """Optimizer steps from `progress` to `train.max_steps`, with checkpoints; advances `progress`.

    Returns why a non-finite step stopped the run (the same on every rank), else None. After a SIGTERM
    on any rank, every rank checkpoints that step and then raises.
    """
    train, rank, faults = state.train, state.place.rank, spec.faults
    steps = Steps(state, faults)
    shown = progress_lines.step_progress(rank, train.max_steps, train.log_every, train.progress_every_s,
                                         first_step=progress.step)
    prepared = False
    while progress.step < train.max_steps:
        step_metrics, agreed = steps.next(progress)
        if step_metrics is None:  # non-finite on some rank: no rank updated
            stopped = on_nonfinite(state, progress, agreed, spec, metrics)
            if stopped:
                return stopped
            steps.restart_clock()
            continue
        step, last = progress.step, progress.step == train.max_steps
        faults.step_finished(rank, step)
        if not prepared:  # once, now that the optimizer has its state
            checkpointer.prepare()
            prepared = True

        save = last or bool(agreed.sigterm_ranks) or (train.checkpoint_every > 0 and step % train.checkpoint_every == 0)
        if save or step % train.log_every == 0:
            progress.history.append(step_metrics)
            metrics.hold(step_metrics)  # logged once a committed checkpoint covers it
        if save:  # written and uploaded in the background; a preemption's checkpoint is waited for
            checkpointer.save(progress, step_metrics, wait=bool(agreed.sigterm_ranks))
            metrics.checkpoint_reported()
            steps.restart_clock()
        shown.update(step_metrics)  # the same numbers MLflow gets, the checkpoint's stall included

        if agreed.sigterm_ranks and not last:
            if state.place.world > 1:
                # Rank 0's save returns once the checkpoint is committed. A rank that raised sooner would
                # have Ray stop the group mid-upload, and the preemption checkpoint lost.
                dist.barrier()
            raise sigterm.preempted_error(agreed.sigterm_ranks, step)
        faults.after_step(rank, step)
    return None


# ---------------------------------------------------------------------------------------------------
# one step
# ---------------------------------------------------------------------------------------------------
@dataclass
class Passes:
    """A step's forward and backward passes, queued on the device."""

    loss: torch.Tensor  # this rank's mean loss over the step's micro-batches
    tokens: int  # this rank's
    position: tuple[int, int]  # the data position after the step's micro-batches


class Steps:
    """Optimizer steps with the host one step ahead of the device.

    The host reads a step's outcome (loss, gradient norm, non-finite ranks, SIGTERM ranks) only once it
    has queued the next step's forward and backward passes. Where the device is the bound, it then never
    starts a step empty, waiting for the host to launch the forward pass. (Where the host is the bound,
    as with small micro-batches of a small model, there is no lead to carry over.)

    The update needs no decision from the host: the fused AdamW skips it on the device when the flags
    say some value was non-finite (`found_inf`, as under a GradScaler). Counting the step and the LR
    schedule happen with the outcome, before the queued step's update is launched, so that update uses
    the right learning rate. The host waits on the device once per step, for the flags alone
    (`agreement.HostFlags`), not for the work queued after them.

    After a non-finite step the queued passes are dropped (their gradients zeroed, their micro-batches
    read again by the next step), whatever `train.on_nonfinite` says. A rollback or a stop needs that;
    after a skip they are redone anyway, for one path through all three policies.
    """

    def __init__(self, state: TrainState, faults: FaultInjector = NO_FAULTS, *, ahead: bool = True) -> None:
        """`ahead=False` reads each step's outcome before queuing anything of the next: only for measuring
        what running ahead is worth (bench/parallel_profile.py)."""
        self.state, self.faults, self.ahead = state, faults, ahead
        self.queued: Passes | None = None
        self.last_done = time.perf_counter()
        # On a CPU the queued passes run when queued, inside the step before: their seconds are carried
        # over to their own step, or the first step would count two steps' passes and the last none.
        self.passes_run_when_queued = state.place.device.type == "cpu"
        self.carried_s = 0.0
        self.flops_per_token = flops_per_token(state.model, state.shard.seq_len)
        self.peak_flops = peak_flops(state.place.device)

    def next(self, progress: Progress) -> tuple[dict[str, float] | None, agreement.StepAgreement]:
        """Take the next optimizer step to its outcome; advances `progress`. Metrics are None when the loss
        or gradient norm was non-finite on some rank: then no rank updated and only the data position
        moved."""
        state, world = self.state, self.state.place.world
        # 1. forward and backward (queued during the step before, when running ahead)
        passes = self.queued or forward_backward(state, (progress.epoch, progress.offset), progress.step + 1,
                                                 self.faults)
        self.queued = None
        # 2. clip, agree across ranks, update: all queued on the device
        flags, lr = clip_agree_update(state, passes.loss)
        # 3. the next step's passes, queued before this step's outcome is read
        queued_s = 0.0
        if self.ahead and progress.step + 1 < state.train.max_steps:
            started = time.perf_counter()
            self.queued = forward_backward(state, passes.position, progress.step + 2, self.faults)
            if self.passes_run_when_queued:
                queued_s = time.perf_counter() - started
        state.join_update()  # what comes after this step (a checkpoint, a rollback) sees the update
        # 4. the outcome: the host's one wait on the device
        agreed = agreement.read_agreement(flags, world)
        progress.epoch, progress.offset = passes.position
        now = time.perf_counter()
        elapsed = now - self.last_done - queued_s + self.carried_s
        self.last_done, self.carried_s = now, queued_s
        if agreed.nonfinite:
            self.drop_queued()
            return None, agreed
        # 5. count the step
        state.scheduler.step()
        progress.step += 1
        progress.tokens_seen += passes.tokens * world
        return self._metrics(progress, agreed, lr, passes.tokens * world, elapsed), agreed

    def restart_clock(self) -> None:
        """Time the next step from now: a checkpoint or a rollback between steps is not step time."""
        self.last_done = time.perf_counter()

    def drop_queued(self) -> None:
        """Forget the queued passes: gradients zeroed; their micro-batches are read again."""
        if self.queued is not None:
            self.queued, self.carried_s = None, 0.0
            self.state.optimizer.zero_grad(set_to_none=True)

    def _metrics(self, progress: Progress, agreed: agreement.StepAgreement, lr: float, tokens: int,
                 elapsed: float) -> dict[str, float]:
        """The step's metrics; `tokens` over all ranks."""
        place = self.state.place
        mfu = self.flops_per_token * tokens / elapsed / (self.peak_flops * place.world) if self.peak_flops else 0.0
        memory = torch.cuda.max_memory_allocated(place.device) / 2**30 if place.device.type == "cuda" else 0.0
        return {"step": progress.step, "loss": agreed.loss, "lr": lr, "grad_norm": agreed.grad_norm,
                "tokens_per_s": tokens / elapsed, "mfu": mfu, "gpu_mem_gb": memory,
                "nonfinite_steps": progress.nonfinite_steps, exactly_once.TIME_KEY: int(time.time() * 1000)}


def keeps_fp8_weights(train: TrainConfig) -> bool:
    """Whether a step casts its FP8 weights on its first micro-batch only and keeps them for the others (TE's
    `is_first_microbatch`), eagerly and in CUDA graphs: under FP8 with gradient accumulation, unless
    `train.recast_fp8_weights` keeps none. Not under fsdp, whose sharded layers TE casts at every call."""
    return (train.fp8 != "none" and train.grad_accum_steps > 1 and not train.recast_fp8_weights
            and train.parallelism == "ddp")


def caches_fp8_weights(state: TrainState) -> bool:
    """`keeps_fp8_weights` for this worker: its graphs' choice once they are captured."""
    return state.graphs.cache_fp8_weights if state.graphs is not None else keeps_fp8_weights(state.train)


def forward_backward(state: TrainState, position: tuple[int, int], step: int, faults: FaultInjector) -> Passes:
    """Forward and backward over `grad_accum_steps` micro-batches from `position`. `step` is the number the
    step gets if the one before it is finite (the test faults key on it)."""
    train, accum, rank = state.train, state.train.grad_accum_steps, state.place.rank
    recipe = None if train.fp8 == "none" else train.fp8
    group = dist.group.WORLD if dist.is_initialized() else None
    loss_sum, tokens = None, 0
    for micro in range(accum):
        with phase("train.batch"):
            batch = state.shard.device_batch(position, state.place.device)
        position = state.shard.next_position(*position)
        tokens += batch["input_ids"].numel()
        if train.cuda_graphs:
            capture_graphs(state, batch, group)
        if caches_fp8_weights(state):  # FP8 weights cast once a step, on its first micro-batch
            batch["is_first_microbatch"] = micro == 0
        if state.optimizer.fp8_weights is not None:  # the update wrote them (`train.fp8_weights_from_update`)
            batch["is_first_microbatch"] = False
        with parallel.gradient_sync(state.wrapped, enabled=micro == accum - 1):
            with phase("train.forward"), te_model.fp8_autocast(
                    recipe, amax_history_len=train.fp8_amax_history_len, fp8_attention=train.fp8_attention,
                    fast_accumulation=train.fast_accumulation, group=group):
                loss = state.wrapped(**batch).loss
            loss = faults.loss(loss, rank, step)
            with phase("train.backward"):
                (loss / accum).backward()  # outside the FP8 autocast: TE runs the matching backward itself
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
    return Passes(loss_sum / accum, tokens, position)


def capture_graphs(state: TrainState, batch: dict, group) -> None:
    """`train.cuda_graphs`: the decoder layers captured for the first batch's layout, outside the FP8 autocast
    (as TE's capture wants). They cast the FP8 weights on a step's first micro-batch only where
    `keeps_fp8_weights` says so."""
    train = state.train
    if state.graphs is None:
        recipe = None if train.fp8 == "none" else te_model.fp8.make_recipe(
            train.fp8, amax_history_len=train.fp8_amax_history_len, fast_accumulation=train.fast_accumulation)
        state.graphs = te_model.capture_decoder_graphs(state.model, batch, recipe=recipe, group=group,
                                                       accumulate=train.grad_accum_steps > 1,
                                                       cache_fp8_weights=keeps_fp8_weights(train))
        layout = state.graphs.layout
        log.info("decoder layers captured as CUDA graphs: %d tokens, up to %d segments, max_seqlen %d",
                 layout.tokens, layout.offsets - 1, layout.max_seqlen)


def clip_agree_update(state: TrainState, loss: torch.Tensor) -> tuple[agreement.HostFlags, float]:
    """Clip, agree and step the optimizer, all queued on the device: (the agreement flags on their way to
    the host, still unread; the learning rate the update used)."""
    place, optimizer = state.place, state.optimizer
    with phase("train.clip"):  # the norm; the update's kernel applies the clipping as it reads the gradients
        grad_norm = optim.clip_in_update(optimizer, state.model.parameters(), state.train.max_grad_norm,
                                         parallel.full_tensor)
    with phase("train.agree"):
        flags = agreement.agreement_flags(loss, grad_norm, place.rank, place.world)
        on_host = agreement.HostFlags(flags)  # copied before the update is queued: reading waits for no more
    lr = state.scheduler.get_last_lr()[0]
    with phase("train.optimizer"):
        optimizer.found_inf = agreement.found_nonfinite(flags, place.world)  # skips the update on the device
        try:
            state.update()
        finally:
            del optimizer.found_inf, optimizer.grad_factor
        optimizer.zero_grad(set_to_none=True)
    return on_host, lr


# ---------------------------------------------------------------------------------------------------
# after a step: non-finite policy, checkpoints
# ---------------------------------------------------------------------------------------------------
def on_nonfinite(state: TrainState, progress: Progress, agreed: agreement.StepAgreement, spec: WorkerSpec,
                 metrics: exactly_once.CommittedMetrics) -> str | None:
    """`train.on_nonfinite` applied to a non-finite step: why the run stops, or None to go on. A rollback
    restores the weights, optimizer, schedule and step of the newest committed checkpoint; the data goes
    on after the bad step, so the micro-batches since that checkpoint are not replayed."""
    train = state.train
    progress.nonfinite_steps += 1
    what = agreed.describe(progress.step + 1)
    if train.on_nonfinite == "stop":
        return f"{what} (train.on_nonfinite=stop)"
    if progress.nonfinite_steps > train.max_nonfinite_steps:
        return f"{what}, {progress.nonfinite_steps} non-finite steps in this run " \
               f"(train.max_nonfinite_steps={train.max_nonfinite_steps})"
    if train.on_nonfinite == "rollback":
        checkpoint = exactly_once.latest_committed_checkpoint(progress.checkpoint_step)
        if checkpoint is None:
            return f"{what}, and no checkpoint yet to roll back to (train.on_nonfinite=rollback)"
        restored = restore(state, spec, checkpoint)
        progress.step, progress.tokens_seen = restored.step, restored.tokens_seen
        progress.history, progress.checkpoint_step = restored.history, restored.checkpoint_step
        metrics.discard_held()
    if state.place.rank == 0:
        log.warning("%s: %s, going on from step %d (non-finite steps so far: %d)", what,
                    "skipped" if train.on_nonfinite == "skip" else "rolled back", progress.step + 1,
                    progress.nonfinite_steps)
    return None


def checkpointer(state: TrainState, spec: WorkerSpec) -> commit.Checkpointer:
    """This worker's part in checkpoints: rank 0 writes and uploads them in the background."""
    run_state = {"train_uri": spec.train_uri, "config": spec.config.to_dict(), "code_version": spec.code_version}
    return commit.Checkpointer(rank=state.place.rank, world=state.place.world, run_uri=spec.run_uri,
                               options=spec.options, module=state.model, optimizer=state.optimizer,
                               scheduler=state.scheduler, run_state=run_state, pause=spec.faults.upload_phase)


def restore(state: TrainState, spec: WorkerSpec, checkpoint: ray.train.Checkpoint | None = None) -> Progress:
    """Progress restored from `checkpoint` (a committed one Ray reported: a rollback), else from the newest
    committed, verified checkpoint of this run; or a fresh start. Loads weights, optimizer, schedule and
    this rank's RNG states into `state`."""
    cfg, rank = spec.config, state.place.rank
    if checkpoint is not None:
        uri = storage.join(spec.run_uri, PurePosixPath(checkpoint.path).name)
        local = storage.checkpoint_dir(uri, cfg.run.cache_dir, spec.options)  # verified against its manifest
    else:
        found = commit.resume_checkpoint(spec.run_uri, cfg.run.cache_dir, spec.options, rank=rank,
                                         ray_has_one=ray.train.get_checkpoint() is not None)
        if found is None:
            return Progress()
        uri, local = found  # a damaged newer checkpoint was skipped with a warning naming it
    trainer_state, position = ckpt.load_checkpoint(local, module=state.model, optimizer=state.optimizer,
                                                   scheduler=state.scheduler, rank=rank, world_size=state.place.world,
                                                   micro_batch_size=state.train.micro_batch_size)
    if state.optimizer.fp8_weights is not None:  # FP8 copies of the weights before the load: cast again
        state.optimizer.fp8_weights.drop()
    if position["offset"] >= state.shard.batches_per_epoch:  # another worker count cuts epochs differently
        position = {"epoch": position["epoch"] + 1, "offset": 0}
    log.info("rank %d resumes run %s at step %d from %s", rank, cfg.run.name, trainer_state["step"], uri)
    return Progress(step=trainer_state["step"], tokens_seen=trainer_state["tokens_seen"],
                    resumed_from_step=trainer_state["step"], history=trainer_state["metrics"],
                    checkpoint_step=trainer_state["step"], **position)


# ---------------------------------------------------------------------------------------------------
# throughput
# ---------------------------------------------------------------------------------------------------
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
