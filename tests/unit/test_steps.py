"""`pipeline.train.loop.Steps` in one process (no Ray): the host reads a step's outcome only after the next
step's passes are queued, and a non-finite step changes no weight, no optimizer state and no schedule,
through the fused AdamW's `found_inf` alone, before its queued passes are dropped and redone. On a GPU,
reading a step's flags waits for nothing queued after them."""

from __future__ import annotations

import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import te_model
from pipeline import demo
from pipeline.config import Config
from pipeline.stages.data import prepare
from pipeline.train import agreement, faults, loop, worker

SHIPPED_TEXT = str(Path(__file__).resolve().parents[2] / "data" / "tiny_text.jsonl")


@pytest.fixture(scope="module")
def worker_for(tmp_path_factory):
    root = tmp_path_factory.mktemp("steps")
    base = demo.make_tiny_checkpoint(root / "base")

    def cfg(max_steps: int, **train) -> Config:
        return Config.from_dict({
            "run": {"name": "steps", "seed": 0, "output_uri": str(root / "runs"), "cache_dir": str(root / "cache")},
            "model": {"base_uri": str(base), "backend": "torch", "dtype": "fp32"},
            "data": {"train_files": [SHIPPED_TEXT], "seq_len": 64, "max_documents": 80, "val_fraction": 0.1},
            "train": {"workers": 1, "use_gpu": False, "micro_batch_size": 2, "grad_accum_steps": 2, "lr": 3e-3,
                      "warmup_steps": 2, "max_steps": max_steps, **train},
        })

    prepared = prepare(cfg(4), str(base))
    return lambda max_steps, **train: worker.build(cfg(max_steps, **train), prepared.train_uri)


@pytest.mark.parametrize("ahead", [True, False])
def test_a_steps_outcome_is_read_only_after_the_next_steps_passes_are_queued(worker_for, monkeypatch, ahead):
    """`ahead=False`, the step as it was before (kept to measure the difference), reads every outcome first."""
    w = worker_for(3)
    steps, progress = loop.Steps(w, ahead=ahead), loop.Progress()
    seen = []
    read = agreement.read_agreement

    def spy(flags, world):
        seen.append((progress.step, steps.queued is not None))
        return read(flags, world)

    monkeypatch.setattr(agreement, "read_agreement", spy)
    metrics = [steps.next(progress)[0] for _ in range(3)]
    # steps 1 and 2 are read with the next step's passes queued; the last step queues nothing
    assert seen == ([(0, True), (1, True), (2, False)] if ahead else [(0, False), (1, False), (2, False)])
    assert [m["step"] for m in metrics] == [1, 2, 3] and steps.queued is None
    assert all(m["grad_norm"] > 0 and m["loss"] > 0 for m in metrics)
    assert (progress.epoch, progress.offset) == _position_after(w, 3 * 2)


def test_a_nonfinite_step_updates_nothing_and_its_queued_passes_are_redone(worker_for, monkeypatch):
    monkeypatch.setattr(faults, "_poisoned", False)
    w = worker_for(4)
    steps, progress = loop.Steps(w, faults.Hooks(poison_rank=0, poison_step=2)), loop.Progress()
    first, _ = steps.next(progress)
    assert first["step"] == 1
    weights = {name: p.detach().clone() for name, p in w.model.named_parameters()}
    adam_steps = {float(state["step"]) for state in w.optimizer.state.values()}
    lr = w.scheduler.get_last_lr()

    skipped, agreed = steps.next(progress)  # step 2's passes were queued (and poisoned) during step 1
    assert skipped is None and agreed.nonfinite_loss_ranks == (0,) and agreed.nonfinite
    assert all(torch.equal(p, weights[name]) for name, p in w.model.named_parameters())
    assert {float(state["step"]) for state in w.optimizer.state.values()} == adam_steps == {1.0}
    assert w.scheduler.get_last_lr() == lr and progress.step == 1
    assert steps.queued is None and all(p.grad is None for p in w.model.parameters())
    assert (progress.epoch, progress.offset) == _position_after(w, 2 * 2)  # the bad step's batches are spent

    redone, _ = steps.next(progress)  # step 2 again, on the next micro-batches, with finite values
    assert redone["step"] == 2 and redone["loss"] == redone["loss"]
    assert not all(torch.equal(p, weights[name]) for name, p in w.model.named_parameters())
    assert (progress.epoch, progress.offset) == _position_after(w, 3 * 2)


def _position_after(w, micro_batches: int) -> tuple[int, int]:
    position = (0, 0)
    for _ in range(micro_batches):
        position = w.shard.next_position(*position)
    return position


def test_running_ahead_changes_no_number(worker_for):
    """Queuing the next step's passes early reorders nothing the math depends on: same losses, same
    gradient norms, same weights as reading each step before queuing the next."""
    runs = []
    for ahead in (True, False):
        w = worker_for(3)
        steps, progress = loop.Steps(w, ahead=ahead), loop.Progress()
        metrics = [steps.next(progress)[0] for _ in range(3)]
        runs.append(([(m["loss"], m["grad_norm"], m["lr"]) for m in metrics],
                     {name: p.detach().clone() for name, p in w.model.named_parameters()}))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(runs[0][1][name], runs[1][1][name]) for name in runs[0][1])


@pytest.mark.parametrize("ahead", [True, False])
def test_each_step_is_timed_with_its_own_passes_on_a_cpu(worker_for, monkeypatch, ahead):
    """On a CPU the queued passes run when queued, inside the step before: a step's tokens/s still covers its
    own passes and update, the first and last steps' too (a clock that moves only in them: 10 s a step's
    passes, 1 s its update)."""
    w = worker_for(3)
    clock = [0.0]
    monkeypatch.setattr(loop.time, "perf_counter", lambda: clock[0])
    passes, update = loop.forward_backward, loop.clip_agree_update

    def timed(seconds, fn):
        def run(*args, **kwargs):
            clock[0] += seconds
            return fn(*args, **kwargs)
        return run

    monkeypatch.setattr(loop, "forward_backward", timed(10.0, passes))
    monkeypatch.setattr(loop, "clip_agree_update", timed(1.0, update))
    steps, progress = loop.Steps(w, ahead=ahead), loop.Progress()
    seconds = []
    for _ in range(3):
        seen = progress.tokens_seen
        metrics, _ = steps.next(progress)
        seconds.append((progress.tokens_seen - seen) / metrics["tokens_per_s"])
    assert seconds == pytest.approx([11.0, 11.0, 11.0]) and clock[0] == 33.0


def test_the_update_clips_the_gradients_as_torchs_clip_grad_norm_does(worker_for):
    """`train.max_grad_norm`: the step hands the clipping factor to the update (`grad_factor`) instead of
    scaling the gradients itself; the weights come out as after torch's `clip_grad_norm_`, the same norms
    are reported, and the clipping bites at this bound (without it the weights differ)."""
    runs = {}
    for how in ("folded", "torch", "unclipped"):
        w = worker_for(2, max_grad_norm=0.0 if how == "unclipped" else 0.05)
        if how == "torch":
            update = w.update

            def clip_then_update(w=w, update=update):
                assert w.optimizer.grad_factor is not None
                w.optimizer.grad_factor = None
                torch.nn.utils.clip_grad_norm_(w.model.parameters(), 0.05)
                update()

            w.update = clip_then_update
        steps, progress = loop.Steps(w), loop.Progress()
        metrics = [steps.next(progress)[0] for _ in range(2)]
        runs[how] = ([m["grad_norm"] for m in metrics], [p.detach().clone() for p in w.model.parameters()])
    assert runs["folded"][0] == runs["torch"][0] and min(runs["folded"][0]) > 0.5  # 10x the bound and more
    assert all(torch.equal(a, b) for a, b in zip(runs["folded"][1], runs["torch"][1]))
    assert not all(torch.equal(a, b) for a, b in zip(runs["folded"][1], runs["unclipped"][1]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_flags_are_read_without_waiting_for_the_work_queued_after_them():
    flags = torch.arange(4, dtype=torch.float32, device="cuda")
    on_host = agreement.HostFlags(flags)
    a = torch.randn(8192, 8192, device="cuda")
    for _ in range(20):  # about half a second of fp32 matmuls queued after the flags
        a = a @ a / 8192
    assert on_host.tolist() == [0.0, 1.0, 2.0, 3.0]
    assert not torch.cuda.current_stream().query()  # the read did not wait for the matmuls
    torch.cuda.synchronize()


@pytest.mark.parametrize("key, flag", [("recompute_mlp", "recompute_mlp"),
                                       ("activation_checkpointing", "gradient_checkpointing")])
def test_recompute_reaches_every_layer_without_a_deprecation_and_trains_the_same(worker_for, key, flag):
    """`train.recompute_mlp`, and `train.activation_checkpointing` through HF's switch under its current name
    (transformers 5.24 renamed it and warns on the old one): every layer told, the same losses."""
    metrics = {}
    for on in (False, True):
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            w = worker_for(2, **{key: on})
        assert all(getattr(layer, flag) is on for layer in w.model.model.layers)
        steps, progress = loop.Steps(w), loop.Progress()
        metrics[on] = [steps.next(progress)[0] for _ in range(2)]
    for name in ("loss", "grad_norm"):
        assert [m[name] for m in metrics[True]] == pytest.approx([m[name] for m in metrics[False]], rel=1e-6), name


def test_recast_fp8_weights_reaches_every_layer(worker_for):
    for on in (False, True):
        w = worker_for(2, fp8="delayed", use_gpu=True, recast_fp8_weights=on)
        assert [layer.recast_fp8_weights for layer in w.model.model.layers] == [on] * len(w.model.model.layers)


def test_fp8_weights_from_update_need_the_te_backend(worker_for):
    with pytest.raises(te_model.BackendUnavailableError, match="FP8 weights written by the update need the te "
                                                               "backend; this model's decoder layers are the torch"):
        worker_for(2, fp8="delayed", use_gpu=True, fp8_weights_from_update=True)
    assert worker_for(2, fp8="delayed", use_gpu=True).optimizer.fp8_weights is None


class _RecordedFP8Weights:
    """`optim.FP8Weights` that covers no parameter and counts `drop`."""

    def __init__(self) -> None:
        self.drops = 0

    def covers(self, p):
        return False

    def target(self, p):
        return None

    def written(self, p):
        pass

    def drop(self):
        self.drops += 1


def test_with_fp8_weights_from_the_update_every_forward_reuses_them_and_a_restore_drops_them(worker_for, monkeypatch):
    """The loop's part in `train.fp8_weights_from_update`: every micro-batch's forward is told to reuse the FP8
    weights (`is_first_microbatch=False`), and weights loaded from a checkpoint make the copies stale."""
    w = worker_for(2)
    w.optimizer.fp8_weights = recorded = _RecordedFP8Weights()
    marks = []
    w.model.register_forward_pre_hook(lambda m, args, kwargs: marks.append(kwargs.get("is_first_microbatch", "unset")),
                                      with_kwargs=True)
    steps, progress = loop.Steps(w), loop.Progress()
    assert [steps.next(progress)[0]["step"] for _ in range(2)] == [1, 2]
    assert marks == [False] * 4  # two steps of two micro-batches
    monkeypatch.setattr(loop.storage, "checkpoint_dir", lambda *args: "unused")
    monkeypatch.setattr(loop.ckpt, "load_checkpoint", lambda *args, **kwargs: (
        {"step": 1, "tokens_seen": 0, "metrics": []}, {"epoch": 0, "offset": 0}))
    spec = SimpleNamespace(config=SimpleNamespace(run=SimpleNamespace(cache_dir="unused", name="steps")),
                           run_uri="file:///unused", options=None)
    assert loop.restore(w, spec, SimpleNamespace(path="/unused/checkpoint_000001")).step == 1
    assert recorded.drops == 1


@pytest.mark.parametrize("train, step_marks", [
    ({"fp8": "delayed"}, [True, False]),  # two micro-batches a step: cast on the first, kept for the second
    ({"fp8": "delayed", "recast_fp8_weights": True}, ["unset"] * 2),  # no FP8 weights kept: cast at every call
    ({"fp8": "delayed", "grad_accum_steps": 1}, ["unset"]),  # nothing to keep them for
    ({"fp8": "delayed", "parallelism": "fsdp"}, ["unset"] * 2),  # TE casts sharded weights at every call
    ({}, ["unset"] * 2),  # bf16: no FP8 weights
])
def test_under_fp8_with_accumulation_each_step_casts_its_fp8_weights_on_the_first_micro_batch(
        worker_for, monkeypatch, train, step_marks):
    """The eager loop's side of TE's first-micro-batch cache (what TE does with the marks is TE's own: the GPU
    tests train with it, tests/gpu/test_graphs.py)."""
    import contextlib

    w = worker_for(2, use_gpu=True, **train)  # the model on the torch backend all the same
    marks = []
    w.model.register_forward_pre_hook(lambda m, args, kwargs: marks.append(kwargs.get("is_first_microbatch", "unset")),
                                      with_kwargs=True)
    # FP8 on this CPU model: the marks are the loop's; the autocast (TE's) is left out
    monkeypatch.setattr(loop.te_model, "fp8_autocast", lambda *args, **kwargs: contextlib.nullcontext())
    steps, progress = loop.Steps(w), loop.Progress()
    steps.next(progress)
    steps.next(progress)
    assert len(marks) >= 2 * len(step_marks) and marks == step_marks * (len(marks) // len(step_marks))


def test_the_fp8_head_comes_with_fp8_training_unless_turned_off(worker_for):
    assert worker_for(2).model.fp8_head is False  # no FP8 layers, no FP8 head
    assert worker_for(2, fp8="delayed", use_gpu=True).model.fp8_head is True  # the default (null) with FP8
    assert worker_for(2, fp8="delayed", use_gpu=True, fp8_head=False).model.fp8_head is False


def test_cuda_graphs_on_the_torch_backend_are_refused_when_the_worker_builds(worker_for):
    from te_model import GraphsUnsupportedError

    from pipeline.train.permanent import is_permanent

    with pytest.raises(GraphsUnsupportedError, match="CUDA graphs need the TE backend") as caught:
        worker_for(2, cuda_graphs=True, use_gpu=True)  # the model is built on the torch backend all the same
    assert is_permanent(caught.value)  # no restart retries it


def test_the_first_pass_captures_the_graphs_once_with_the_runs_recipe_and_accumulation(worker_for, monkeypatch):
    """The loop's side of `train.cuda_graphs` (the capture itself needs a GPU: tests/gpu/test_graphs.py)."""
    import dataclasses

    import te_model
    from te_model.graphs import DecoderGraphs, GraphLayout

    calls = []

    def capture(model, batch, *, recipe, group, accumulate, cache_fp8_weights):
        calls.append((model, batch["input_ids"].shape, recipe, accumulate, cache_fp8_weights))
        return DecoderGraphs(GraphLayout(tokens=batch["input_ids"].numel(), offsets=3, max_seqlen=64))

    monkeypatch.setattr(te_model, "capture_decoder_graphs", capture)
    w = worker_for(3, use_gpu=True)  # built without the graphs: the torch backend could not hold them
    w.train = dataclasses.replace(w.train, cuda_graphs=True)
    steps, progress = loop.Steps(w), loop.Progress()
    for _ in range(3):
        steps.next(progress)
    assert len(calls) == 1 and w.graphs is not None
    model, shape, recipe, accumulate, cache = calls[0]
    assert model is w.model and shape == (2, 64) and recipe is None and accumulate is True  # 2 micro-batches a step
    assert cache is False  # no FP8 weights to keep in bf16


def test_graphs_that_keep_fp8_weights_are_told_which_micro_batch_starts_a_step(worker_for, monkeypatch):
    """With `cache_fp8_weights` graphs the loop marks a step's first micro-batch `is_first_microbatch=True` and
    the others False, so the FP8 weights are cast once per optimizer step (the replay: tests/gpu/test_te.py)."""
    import dataclasses

    import te_model
    from te_model.graphs import DecoderGraphs, GraphLayout

    monkeypatch.setattr(te_model, "capture_decoder_graphs", lambda model, batch, **_: DecoderGraphs(
        GraphLayout(tokens=batch["input_ids"].numel(), offsets=3, max_seqlen=64), cache_fp8_weights=True))
    w = worker_for(3, use_gpu=True)
    w.train = dataclasses.replace(w.train, cuda_graphs=True)
    marks, forward = [], w.wrapped.forward

    def marked(*args, **kwargs):
        marks.append(kwargs.get("is_first_microbatch"))
        return forward(*args, **kwargs)

    monkeypatch.setattr(w.wrapped, "forward", marked)
    steps, progress = loop.Steps(w), loop.Progress()
    for _ in range(2):
        steps.next(progress)
    assert len(marks) >= 4 and marks == [True, False] * (len(marks) // 2)  # 2 micro-batches a step (and the
    # passes of the step after, queued before the last outcome is read)


def test_fp8_moments_train_through_the_steps_and_a_nonfinite_step_keeps_them(tmp_path, monkeypatch):
    """`train.moments_fp8` through the pipeline's own step (a model whose matrices are whole 256-element
    blocks): the matrices keep FP8 codes and scales, the vectors their own moments; a poisoned step changes
    neither codes nor scales (the kernel's `found_inf`), and the next step trains on."""
    from pipeline.train.optim import FP8_STATE

    monkeypatch.setattr(faults, "_poisoned", False)
    base = demo.make_tiny_checkpoint(tmp_path / "base", layers=1, hidden=256, intermediate=512)
    cfg = Config.from_dict({
        "run": {"name": "fp8-moments", "seed": 0, "output_uri": str(tmp_path / "runs"),
                "cache_dir": str(tmp_path / "cache")},
        "model": {"base_uri": str(base), "backend": "torch", "dtype": "bf16"},
        "data": {"train_files": [SHIPPED_TEXT], "seq_len": 64, "max_documents": 40, "val_fraction": 0.1},
        "train": {"workers": 1, "use_gpu": False, "micro_batch_size": 2, "grad_accum_steps": 1, "lr": 1e-3,
                  "warmup_steps": 1, "max_steps": 4, "moments_fp8": True},
    })
    w = worker.build(cfg, prepare(cfg, str(base)).train_uri)
    steps, progress = loop.Steps(w, faults.Hooks(poison_rank=0, poison_step=2)), loop.Progress()
    steps.next(progress)
    codes = {key for pair in FP8_STATE.values() for key in pair}
    matrices = [p for p in w.model.parameters() if p.dim() == 2]
    assert matrices and all(codes <= set(w.optimizer.state[p]) for p in matrices)
    assert all({"exp_avg", "exp_avg_sq"} <= set(w.optimizer.state[p]) for p in w.model.parameters() if p.dim() == 1)
    before = {(id(p), k): v.float().clone() for p in matrices for k, v in w.optimizer.state[p].items()}
    skipped, agreed = steps.next(progress)
    assert skipped is None and agreed.nonfinite
    assert all(torch.equal(w.optimizer.state[p][k].float(), before[(id(p), k)])
               for p in matrices for k in w.optimizer.state[p])
    redone, _ = steps.next(progress)
    assert redone["step"] == 2 and redone["loss"] == redone["loss"]
    assert not all(torch.equal(w.optimizer.state[p][k].float(), before[(id(p), k)])
                   for p in matrices for k in codes)
