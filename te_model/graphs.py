"""CUDA graphs for the decoder layers: each layer's forward and backward replayed, not launched kernel by kernel.

At short sequences a decoder layer's kernels finish faster than Python can launch them through Transformer
Engine's modules, so the GPU waits on the host. `capture_decoder_graphs` records every layer's forward and
backward once, with TE's `make_graphed_callables` (which keeps FP8 scaling state right across replays),
for one batch layout: token count, `cu_seqlens` length and `max_seqlen`. A replay copies the batch's
hidden states, segment offsets and RoPE table into the recorded buffers and launches one graph per layer
and direction.

Packed rows differ in their segment count from batch to batch. A plan whose layout fits under the captured
one is widened to it (`DecoderGraphs.fit`): empty segments appended, `max_seqlen` raised to the row's
length, neither of which changes any output. A batch with more segments than captured runs eagerly, and
is counted (`DecoderGraphs.eager_batches`).

With gradient accumulation under FP8 the graphs can also keep each layer's FP8 weights across the micro-batches
of an optimizer step (`cache_fp8_weights`): the replay the caller marks `is_first_microbatch=True` casts
them, later replays skip the casts on the device (TE's `cache_quantized_params`: a flag tensor the captured
cast kernels read). The weights must not change between those replays, as within one optimizer step.

Memory: the captured activations stay allocated between steps. The weight gradients are written into
static buffers of the graphs; without gradient accumulation they are the parameters' `.grad` (each replay
overwrites them, after the optimizer has read them), with it every backward copies them out, so each
micro-batch's gradients add up. Sizes: docs/performance.md ("CUDA graphs").
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass

import torch

from .rope import angles_table
from .segments import AttentionPlan, bucket_max_seqlen

log = logging.getLogger(__name__)

SEGMENT_HEADROOM = 2  # captured segment count over the first batch's: packed batches vary around it


class GraphsUnsupportedError(RuntimeError):
    """The model or its training setup cannot run its decoder layers as CUDA graphs."""


@dataclass(frozen=True)
class GraphLayout:
    """What a captured graph was recorded for: flattened tokens, `cu_seqlens` entries, `max_seqlen`."""

    tokens: int
    offsets: int
    max_seqlen: int


class _LayerCall(torch.nn.Module):
    """One TE layer's THD call with `max_seqlen` fixed: the callable TE records (tensors in, tensor out)."""

    def __init__(self, layer, max_seqlen: int, cache_fp8_weights: bool = False) -> None:
        super().__init__()
        self.layer = layer
        self.max_seqlen = max_seqlen
        self.cache_fp8_weights = cache_fp8_weights  # its replays take `is_first_microbatch`

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, rope_angles: torch.Tensor) -> torch.Tensor:
        import transformer_engine.pytorch as te

        with self.layer.rope(rope_angles, cu_seqlens):
            return te.TransformerLayer.forward(self.layer, x, rotary_pos_emb=rope_angles, cu_seqlens_q=cu_seqlens,
                                               cu_seqlens_kv=cu_seqlens, max_seqlen_q=self.max_seqlen,
                                               max_seqlen_kv=self.max_seqlen)


class DecoderGraphs:
    """The layout a model's layers were captured for (each layer holds its own graphed call)."""

    def __init__(self, layout: GraphLayout, cache_fp8_weights: bool = False) -> None:
        self.layout = layout
        self.cache_fp8_weights = cache_fp8_weights  # FP8 weights cast once per optimizer step
        self.weight_cast_flag: torch.Tensor | None = None  # with them: TE's flag the captured casts read
        self.eager_batches = 0  # batches whose layout did not fit: they ran without the graphs

    def fit(self, plan: AttentionPlan, tokens: int) -> AttentionPlan | None:
        """`plan` widened to the captured layout (with `graphed` set), or None when it cannot be: another
        token count, or more segments than captured."""
        layout = self.layout
        offsets = plan.cu_seqlens.numel()
        if tokens != layout.tokens or offsets > layout.offsets or plan.max_seqlen > layout.max_seqlen:
            self.eager_batches += 1
            if self.eager_batches == 1:  # once: the run's speed is then partly not the graphs'
                log.warning("a batch of %d tokens in %d segments does not fit the CUDA graphs' layout (%d tokens, "
                            "up to %d segments): it runs without them, as will any other such batch",
                            tokens, offsets - 1, layout.tokens, layout.offsets - 1)
            return None
        return dataclasses.replace(widen(plan, layout.offsets, layout.max_seqlen), graphed=True)


def widen(plan: AttentionPlan, offsets: int, max_seqlen: int) -> AttentionPlan:
    """The same segments with `cu_seqlens` padded by empty segments to `offsets` entries and `max_seqlen`
    raised: neither changes which token attends to which. Runs on the plan's device without a host sync."""
    cu = plan.cu_seqlens
    if cu.numel() < offsets:
        cu = torch.cat([cu, cu[-1:].expand(offsets - cu.numel())])
    return dataclasses.replace(plan, cu_seqlens=cu, max_seqlen=max_seqlen, rope_angles=None)


def graph_layout(plan: AttentionPlan, tokens: int, row_length: int) -> GraphLayout:
    """The layout to capture for a first batch: its tokens; its offsets, or for packed rows room for
    `SEGMENT_HEADROOM` times its segments (a power of two, as plans pad to); `max_seqlen` the whole row."""
    offsets = plan.cu_seqlens.numel()
    if not plan.one_segment_per_row:
        segments = (offsets - 1) * SEGMENT_HEADROOM
        offsets = (1 << (segments - 1).bit_length()) + 1
    return GraphLayout(tokens=tokens, offsets=offsets, max_seqlen=bucket_max_seqlen(row_length, row_length))


@contextlib.contextmanager
def _weight_cast_flag(cache: bool):
    """TE's layers, while captured, read one process-wide flag tensor that skips their FP8 weight casts if it
    exists, whether or not their capture asked for caching (one with `cache_quantized_params` makes it). A
    capture without caching hides it, so that its casts read no flag it never sets. Yields TE's state."""
    from transformer_engine.pytorch.quantization import FP8GlobalStateManager

    state = FP8GlobalStateManager.quantization_state
    before = state.skip_fp8_weight_update_tensor
    if not cache:
        state.skip_fp8_weight_update_tensor = None
    try:
        yield state
    finally:
        if not cache:
            state.skip_fp8_weight_update_tensor = before


def check_graphable(model) -> None:
    """Refuse what the graphs cannot record, naming it."""
    layers = model.model.layers
    if not getattr(layers[0], "wants_rope_angles", False):
        raise GraphsUnsupportedError("CUDA graphs need the TE backend on a CUDA device "
                                     f"(this model's layers are {type(layers[0]).__name__})")
    if any(layer.gradient_checkpointing or layer.recompute_mlp for layer in layers):
        raise GraphsUnsupportedError("CUDA graphs cannot record recomputation in backward: turn off "
                                     "activation checkpointing and recompute_mlp")


def capture_decoder_graphs(model, inputs: dict, *, recipe=None, group=None, accumulate: bool = True,
                           cache_fp8_weights: bool = False, warmup: int = 3) -> DecoderGraphs:
    """Record every decoder layer of `model` for the layout of `inputs` (`prepare_batch`'s output: its
    `attention_plan` and `input_ids`), and switch the model to replay them in training.

    `recipe`: the TE recipe object the training autocast uses (`te_model.fp8.make_recipe`), None for bf16;
    `group`: the amax reduction group. `accumulate=False` promises one backward pass per optimizer step,
    with the gradients read and `.grad` set to None (`zero_grad()`'s default) before the next: the weight
    gradients then stay in the graphs' buffers, with no copy. With gradient accumulation, or gradients
    zeroed in place, leave it True. `cache_fp8_weights` (with a recipe): replays cast the FP8 weights only when
    the model is called with `is_first_microbatch=True` (or without it), and reuse that cast when it is called
    with False: for the later micro-batches of one optimizer step; layers that cast their FP8 weights again in
    backward (`recast_fp8_weights`) keep none, and cast them at every replay. Call outside any autocast, before the first
    training step: the capture runs `warmup` forward and backward passes on random inputs and restores FP8
    scaling state after.
    """
    check_graphable(model)
    if cache_fp8_weights and recipe is None:
        raise GraphsUnsupportedError("cache_fp8_weights keeps FP8 weights: it needs an FP8 recipe")
    cache_fp8_weights = cache_fp8_weights and not any(layer.recast_fp8_weights for layer in model.model.layers)
    import transformer_engine.pytorch as te

    ids, plan = inputs["input_ids"], inputs["attention_plan"]
    batch, seqlen = ids.shape
    layout = graph_layout(plan, batch * seqlen, seqlen)
    static = widen(plan, layout.offsets, layout.max_seqlen)
    decoder = model.model
    angles = angles_table(decoder.rotary_emb.inv_freq, layout.max_seqlen)
    hidden = decoder.config.hidden_size
    dtype = decoder.embed_tokens.weight.dtype
    calls = [_LayerCall(layer, layout.max_seqlen, cache_fp8_weights) for layer in decoder.layers]
    samples = tuple(
        (torch.randn(layout.tokens, hidden, device=ids.device, dtype=dtype, requires_grad=True),
         static.cu_seqlens, angles)
        for _ in calls)
    was_training = model.training
    model.train()
    with _weight_cast_flag(cache_fp8_weights) as te_state:
        te.make_graphed_callables(tuple(calls), samples, num_warmup_iters=warmup, enabled=recipe is not None,
                                  recipe=recipe, amax_reduction_group=group, clone_param_grads_on_return=accumulate,
                                  cache_quantized_params=cache_fp8_weights)
    model.train(was_training)
    graphs = DecoderGraphs(layout, cache_fp8_weights)
    if cache_fp8_weights:  # the flag the captured casts read lives as long as the graphs
        graphs.weight_cast_flag = te_state.skip_fp8_weight_update_tensor
    for layer, call in zip(decoder.layers, calls):
        layer.__dict__["graphed_call"] = call  # not a submodule: the layer's state dict stays its own
    decoder.__dict__["decoder_graphs"] = graphs
    return graphs
