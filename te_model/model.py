"""Building HF's `LlamaForCausalLM` with TE-style decoder layers.

`replace_decoder` swaps, inside a `with` block, the classes transformers' Llama module instantiates by
name: the decoder layer (for the chosen backend's), `LlamaModel` (for `SegmentedLlamaModel`, which plans
attention once per forward) and, on the TE backend, the final norm's `LlamaRMSNorm` (for one on TE's
kernels, with the same parameter). Everything else (embeddings, LM head, Trainer integration) is HF's own.
`build_model` makes a `TELlamaForCausalLM`, whose training forward pass computes the loss without logits
(`te_model.loss`).
"""

import contextlib
import dataclasses

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.llama import modeling_llama

from .backend import BackendUnavailableError, decoder_layer_class, resolve_backend
from .fp8 import check_fp8_tokens, fp8_active
from .layer import KV_CACHE_MESSAGE, DecoderCall, KVCacheUnsupportedError, TorchLlamaDecoderLayer
from .loss import causal_lm_loss, scored_tokens
from .rope import angles_table, rope_type
from .segments import MaskError, plan_attention, to_device


_MASK_IN_PLAN = torch.empty(0, 0, 0, 0, dtype=torch.bool)  # HF passes a 4-D mask through; the layers ignore it


class SegmentedLlamaModel(modeling_llama.LlamaModel):
    """HF's LlamaModel, planning attention once per forward for its TE-style layers.

    It hands the plan (and TE's RoPE angles) to every layer. It declares the new layers to HF's output
    recorder, so `output_hidden_states=True` returns every layer's output.
    """

    _can_record_outputs = {"hidden_states": DecoderCall}

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        use_cache=None,
        attention_plan=None,
        cache=None,
        **kwargs,
    ):
        """`attention_plan`: the batch's plan made beforehand (`prepare_batch`, or `plan_attention` on the
        host's position ids, then `.to(device)`). It saves the two host syncs of planning on the device.
        None plans here (on the host when neither position ids nor a mask are given)."""
        # A cache asked for (newer transformers' generate passes use_cache=True and no cache yet) or handed
        # in (`cache` from transformers 5.24, `past_key_values` before) is refused; use_cache=None/False, the
        # patched config's default, runs without one.
        if past_key_values is not None or cache is not None or use_cache:
            raise KVCacheUnsupportedError(KV_CACHE_MESSAGE)
        tokens = input_ids if input_ids is not None else inputs_embeds
        batch, seqlen = tokens.shape[:2]
        if attention_plan is None and position_ids is None and attention_mask is None:
            # plain rows: the shape is the whole plan, made on the host and copied without a host sync
            plan = plan_attention(batch, seqlen).to(tokens.device)
        elif attention_plan is None:
            plan = plan_attention(batch, seqlen, position_ids, attention_mask, device=tokens.device)
        elif attention_mask is not None:
            raise MaskError("attention_plan and attention_mask both given: the plan holds the padding")
        elif attention_plan.shape != (batch, seqlen):
            raise MaskError(f"attention_plan is for a batch of shape {attention_plan.shape}, "
                            f"the inputs have shape {(batch, seqlen)}")
        else:
            plan = attention_plan
        graphs = self.__dict__.get("decoder_graphs")  # te_model.graphs.capture_decoder_graphs
        if graphs is not None and self.training and torch.is_grad_enabled():
            plan = graphs.fit(plan, batch * seqlen) or plan
        if getattr(self.layers[0], "wants_rope_angles", False):  # the TE backend
            if fp8_active():
                check_fp8_tokens(batch * seqlen, where=f"batch of shape {(batch, seqlen)}")
            angles = angles_table(self.rotary_emb.inv_freq, plan.max_seqlen)
            plan = dataclasses.replace(plan, rope_angles=angles)
        # The padding now lives in the plan. HF would still build a 4-D mask from packed position ids (a
        # host sync and a (B, 1, S, S) tensor for nothing); a 4-D mask handed in is taken as prepared.
        return super().forward(
            input_ids=input_ids,
            attention_mask=_MASK_IN_PLAN,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=False,
            attention_plan=plan,
            **kwargs,
        )


def prepare_batch(batch: dict[str, torch.Tensor], device: torch.device) -> dict:
    """Model inputs on `device` from a batch on the host (`input_ids`, and any of `labels`, `position_ids`,
    `attention_mask`), with its attention plan and the positions its loss scores found on the host.

    Every copy starts from pinned memory, so neither this nor the forward and backward passes it feeds
    waits for the device: planning or selecting on the device needs host syncs, and so does a copy from
    pageable memory. The padding mask becomes part of the plan and is not passed on.
    """
    plan = plan_attention(*batch["input_ids"].shape, batch.get("position_ids"), batch.get("attention_mask"))
    out = {k: to_device(v, device) for k, v in batch.items() if k != "attention_mask"}
    out["attention_plan"] = plan.to(device)
    if "labels" in batch:
        out["scored_tokens"] = scored_tokens(batch["labels"]).to(device)
    return out


class TELlamaForCausalLM(LlamaForCausalLM):
    """HF's LlamaForCausalLM; training with labels skips the (batch, seq, vocab) logits.

    With `fused_loss` on (the default), a forward pass in training mode, with gradients enabled and
    `labels` given, returns the loss of `te_model.loss.causal_lm_loss` and `logits=None`: the same value
    as HF's loss, without the logits' memory. Evaluation mode, `torch.no_grad`, generation and calls
    without labels run HF's forward unchanged. Set `model.fused_loss = False` to get logits in training.
    """

    fused_loss = True
    fp8_head = False  # the fused loss's head GEMMs in FP8 (te_model.fp8_head); the pipeline sets it
    fp8_head_fast_accumulation = False  # two of those GEMMs with fast accumulation (FP8HeadGemms)

    def mlp_recompute_enable(self, on: bool = True) -> None:
        """Recompute each decoder layer's MLP in backward instead of keeping its activations (and, under FP8,
        its FP8 weights) from forward: the largest part of what a Llama layer keeps, for one more FC1 GEMM a
        layer. Attention and its projections keep theirs. `activation_checkpointing_enable()` recomputes whole
        layers instead."""
        for layer in self.model.layers:
            layer.recompute_mlp = on

    def fp8_weight_recast_enable(self, on: bool = True) -> None:
        """Under FP8, cast each decoder layer's weights to FP8 again in backward instead of keeping the
        forward's FP8 copies until then (`TELlamaDecoderLayer.recast_fp8_weights`): 2 bytes a decoder
        parameter less held at the peak of a step, for one more cast of each weight. Nothing to do on the
        torch backend, which keeps no FP8 weights."""
        for layer in self.model.layers:
            layer.recast_fp8_weights = on

    def fp8_weights_from_update(self):
        """The decoder's FP8 weights, for the optimizer's update to write (`te_model.fp8_weights`; set it as
        `pipeline.train.optim.AdamW.fp8_weights`): train with `is_first_microbatch=False` in every forward, under
        delayed scaling. Needs the TE backend, whose layers keep FP8 weights."""
        if any(isinstance(layer, TorchLlamaDecoderLayer) for layer in self.model.layers):
            raise BackendUnavailableError("FP8 weights written by the update need the te backend; this model's "
                                          "decoder layers are the torch backend's, which keep no FP8 weights")
        from .fp8_weights import FP8WeightsFromUpdate

        return FP8WeightsFromUpdate(self.model.layers)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, cache=None, **kwargs):
        scored = kwargs.pop("scored_tokens", None)  # te_model.loss.ScoredTokens, found beforehand
        if past_key_values is not None or cache is not None:  # under either name; HF's own would warn of the old
            raise KVCacheUnsupportedError(KV_CACHE_MESSAGE)
        if labels is None or not (self.fused_loss and self.training and torch.is_grad_enabled()):
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
                                   logits_to_keep=logits_to_keep, **kwargs)
        num_items = kwargs.pop("num_items_in_batch", None)  # HF Trainer's count under gradient accumulation
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        loss = causal_lm_loss(outputs.last_hidden_state, self.lm_head.weight, labels, num_items_in_batch=num_items,
                              fp8_head=self.fp8_head, fp8_head_fast_accumulation=self.fp8_head_fast_accumulation,
                              scored=scored)
        return CausalLMOutputWithPast(loss=loss, logits=None, hidden_states=outputs.hidden_states,
                                      attentions=outputs.attentions)


@contextlib.contextmanager
def replace_decoder(backend: str = "auto"):
    """Within the block, `LlamaForCausalLM(config)` builds TE-style layers of `backend` (and, on the TE
    backend, its final norm on TE's kernels).

    The originals are restored on exit, also when the body raises.
    """
    layer_cls = decoder_layer_class(backend)
    saved = modeling_llama.LlamaDecoderLayer, modeling_llama.LlamaModel, modeling_llama.LlamaRMSNorm
    modeling_llama.LlamaDecoderLayer = layer_cls
    modeling_llama.LlamaModel = SegmentedLlamaModel
    modeling_llama.LlamaRMSNorm = getattr(layer_cls, "final_norm_class", saved[2])
    try:
        yield layer_cls
    finally:
        modeling_llama.LlamaDecoderLayer, modeling_llama.LlamaModel, modeling_llama.LlamaRMSNorm = saved


def check_llama_config(config, where: str = "config") -> None:
    """Refuse configs the layers cannot reproduce, naming what is wrong."""
    model_type = getattr(config, "model_type", None)
    if model_type != "llama":
        raise ValueError(f"{where}: model_type is {model_type!r}, only 'llama' checkpoints are supported")
    rope_type(config)
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ValueError(f"{where}: attention_bias/mlp_bias are set; the TE-style layers have no biases")


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


def build_model(
    config: LlamaConfig,
    *,
    backend: str = "auto",
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device | None = None,
) -> TELlamaForCausalLM:
    """A randomly initialised `TELlamaForCausalLM` with TE-style layers (weights: `weights.py`)."""
    check_llama_config(config)
    backend = resolve_backend(backend)
    if backend == "te":
        if dtype == torch.float32:
            raise ValueError("backend 'te' needs dtype bfloat16 or float16, not float32")
        device = torch.device(device or "cuda")
        if device.type != "cuda":
            raise ValueError(f"backend 'te' needs a CUDA device, got {device}")
    config.use_cache = False
    with replace_decoder(backend), torch.device(device or "cpu"), _default_dtype(dtype):
        model = TELlamaForCausalLM(config)
    model.te_backend = backend
    return model
