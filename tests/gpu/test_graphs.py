"""The pipeline's own step on a GPU with its step-level options. `train.cuda_graphs`: the worker captures its
decoder layers at the first pass and trains as it does without them, with and without gradient accumulation,
over packed rows whose segment counts differ from batch to batch. `train.overlap_update`: the update beside
the next step's forward trains to the same bits as the update in line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline import demo
from pipeline.config import Config
from pipeline.stages.data import prepare
from pipeline.train import loop, worker
from te_model.backend import te_unavailable_reason

SHIPPED_TEXT = str(Path(__file__).resolve().parents[2] / "data" / "tiny_text.jsonl")
STEPS = 4
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(te_unavailable_reason() is not None, reason=f"TE backend: {te_unavailable_reason()}"),
]


@pytest.fixture(scope="module")
def worker_for(tmp_path_factory):
    root = tmp_path_factory.mktemp("graphs")
    base = demo.make_tiny_checkpoint(root / "base", hidden=256, heads=4, kv_heads=2, intermediate=512)

    def cfg(**train) -> Config:
        return Config.from_dict({
            "run": {"name": "graphs", "seed": 0, "output_uri": str(root / "runs"), "cache_dir": str(root / "cache")},
            "model": {"base_uri": str(base), "backend": "te", "dtype": "bf16"},
            "data": {"train_files": [SHIPPED_TEXT], "seq_len": 128, "max_documents": 200, "val_fraction": 0.1},
            "train": {"workers": 1, "use_gpu": True, "micro_batch_size": 4, "lr": 1e-4, "warmup_steps": 1,
                      "max_steps": STEPS, "fp8": "delayed", **train},
        })

    prepared = prepare(cfg(), str(base))
    return lambda **train: worker.build(cfg(**train), prepared.train_uri, device=torch.device("cuda"))


@pytest.mark.parametrize("accum", [1, 2])
def test_cuda_graphs_train_the_pipelines_steps_as_the_eager_layers_do(worker_for, accum):
    metrics, graphs = {}, None
    for on in (False, True):
        state = worker_for(cuda_graphs=on, grad_accum_steps=accum)
        steps, progress = loop.Steps(state), loop.Progress()
        metrics[on] = [steps.next(progress)[0] for _ in range(STEPS)]
        graphs = state.graphs if on else None
    assert graphs is not None and graphs.eager_batches < STEPS * accum  # some passes replayed the graphs
    print(f"\ncuda_graphs, {accum} micro-batch(es) a step: losses {[m['loss'] for m in metrics[True]]}, eager "
          f"{[m['loss'] for m in metrics[False]]}; layout {graphs.layout}, {graphs.eager_batches} pass(es) eager")
    # with 2 micro-batches the bf16 gradient norm is held to a unit of its last place (2**-7 relative)
    for key, rel in (("loss", 1e-3), ("grad_norm", 1e-3 if accum == 1 else 1e-2)):
        assert [m[key] for m in metrics[True]] == pytest.approx([m[key] for m in metrics[False]], rel=rel), key


def test_eager_steps_with_accumulation_cast_their_fp8_weights_once_a_step(worker_for):
    """Under FP8 with 2 micro-batches a step, the eager loop has TE keep the first micro-batch's FP8 weights for
    the second (`loop.keeps_fp8_weights`): every TE linear module then holds them, and training follows the
    run that casts them at every call (`train.recast_fp8_weights`, which keeps none), whose second micro-batch
    casts under the scale the first one updated."""
    from te_model.fp8_weights import cached_weights

    metrics, kept = {}, {}
    for recast in (False, True):
        state = worker_for(grad_accum_steps=2, recast_fp8_weights=recast)
        steps, progress = loop.Steps(state), loop.Progress()
        metrics[recast] = [steps.next(progress)[0] for _ in range(STEPS)]
        kept[recast] = [set(m._fp8_workspaces) == set(cached_weights(m))
                        for m in state.model.model.layers.modules() if cached_weights(m)]
    print(f"\neager, 2 micro-batches a step, FP8 weights kept: losses {[m['loss'] for m in metrics[False]]}; "
          f"cast at every call: {[m['loss'] for m in metrics[True]]}")
    assert len(kept[False]) == 3 * len(state.model.model.layers)  # QKV, the projection, the MLP
    assert all(kept[False]) and not any(kept[True])
    for key, rel in (("loss", 1e-3), ("grad_norm", 1e-2)):
        assert [m[key] for m in metrics[False]] == pytest.approx([m[key] for m in metrics[True]], rel=rel), key


def _trained(state, steps: int, update_delay_cycles: int = 0) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """Metrics of `steps` pipeline steps, and the parameters after them. `update_delay_cycles`: each update
    starts that many GPU cycles late on its stream, so a forward that did not wait for it would read the
    weights of the step before."""
    if update_delay_cycles:
        step = state.optimizer.step

        def late_step(*args, **kwargs):
            torch.cuda._sleep(update_delay_cycles)  # on the stream the update is queued on
            return step(*args, **kwargs)

        state.optimizer.step = late_step
    runner, progress = loop.Steps(state), loop.Progress()
    metrics = [runner.next(progress)[0] for _ in range(steps)]
    torch.cuda.synchronize()
    return metrics, {k: v.detach().clone() for k, v in state.model.named_parameters()}


@pytest.mark.parametrize("graphs", [False, True])
def test_the_overlapped_update_trains_to_the_same_bits(worker_for, graphs):
    """Deterministic kernels (TE picks its attention backend by torch's flag when a layer is built), so two runs
    in line agree bit for bit; the overlapped run must too, with each update held back on its stream by about
    50 ms. A forward reading a weight before its update, or the update reading a gradient whose memory the next
    pass had taken, would change the losses and the weights."""
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        runs = {}
        for name, on in (("in line", False), ("in line again", False), ("overlapped", True)):
            state = worker_for(overlap_update=on, cuda_graphs=graphs, lr=1e-3)
            assert (state.overlap is not None) == on
            runs[name] = _trained(state, STEPS, update_delay_cycles=100_000_000 if on else 0)
    finally:
        torch.use_deterministic_algorithms(was)
    losses = {name: [m["loss"] for m in metrics] for name, (metrics, _) in runs.items()}
    print(f"\noverlap_update, cuda_graphs={graphs}: losses {losses}")
    (ref_metrics, ref_weights), (again_metrics, again_weights) = runs["in line"], runs["in line again"]
    assert [m["loss"] for m in again_metrics] == losses["in line"], "runs in line differ"
    assert all(torch.equal(ref_weights[k], again_weights[k]) for k in ref_weights), "runs in line differ"
    metrics, weights = runs["overlapped"]
    for key in ("loss", "grad_norm"):
        assert [m[key] for m in metrics] == [m[key] for m in ref_metrics], key
    assert all(torch.equal(weights[k], ref_weights[k]) for k in ref_weights)
    assert losses["overlapped"][-1] < losses["overlapped"][0]  # it trained
