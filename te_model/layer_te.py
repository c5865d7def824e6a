"""`TELlamaDecoderLayer`: HF's Llama decoder layer as a Transformer Engine `TransformerLayer`.

Importing this module imports Transformer Engine; `te_model` does so only when the TE backend is
chosen. The LlamaConfig → TransformerLayer mapping follows HF's layer exactly, so HF checkpoints map
tensor by tensor. Attention runs in TE's THD layout, the one layout in which plain, padded and packed
rows are the same call to TE's fused attention.
"""

import contextlib

import torch
import transformer_engine.pytorch as te
from transformer_engine.pytorch.module.base import TransformerEngineBaseModule

from . import residual, residual_te, rope_te, swiglu_te
from .layer import DecoderCall, head_dim
from .norm_te import LlamaTERMSNorm
from .segments import AttentionPlan


def llama_layer_args(config, layer_idx: int) -> dict:
    """`te.pytorch.TransformerLayer` arguments for a Llama decoder layer of an HF config: RMSNorm, SwiGLU,
    grouped-query attention, no bias or dropout, unfused Q/K/V (their names map one to one to HF's)."""
    return dict(
        hidden_size=config.hidden_size,
        ffn_hidden_size=config.intermediate_size,
        num_attention_heads=config.num_attention_heads,
        num_gqa_groups=config.num_key_value_heads,
        kv_channels=head_dim(config),
        layernorm_epsilon=config.rms_norm_eps,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias=False,
        normalization="RMSNorm",
        activation="swiglu",
        fuse_qkv_params=False,
        layer_number=layer_idx + 1,
        params_dtype=torch.get_default_dtype(),
        device=torch.get_default_device(),
    )


class TELlamaDecoderLayer(DecoderCall, te.TransformerLayer):
    """Drop-in replacement for `LlamaDecoderLayer` built on `te.pytorch.TransformerLayer`.

    The mapping: RMSNorm with HF's eps, SwiGLU with fc1 = [gate; up], no biases, GQA through
    `num_gqa_groups`, unfused Q/K/V weights, dropout off.

    Attention: the (B, S) batch is flattened to B*S tokens, and `cu_seqlens` marks the segments of the
    `AttentionPlan`. BSHD could express packed documents only through a dense (S, S) "arbitrary" mask,
    which falls back to unfused attention. RoPE comes from the model's HF rotary module as an angle table
    (`rope.angles_table`); TE's fused RoPE indexes it by the position within each segment.
    """

    wants_rope_angles = True  # SegmentedLlamaModel adds TE's angle table to the plan
    final_norm_class = LlamaTERMSNorm  # the model's final norm, which `replace_decoder` swaps in beside the layers

    def __init__(self, config, layer_idx: int = 0):
        std = config.initializer_range
        super().__init__(
            **llama_layer_args(config, layer_idx),
            attn_input_format="thd",
            self_attn_mask_type="padding_causal",
            init_method=lambda w: torch.nn.init.normal_(w, mean=0.0, std=std),
            output_layer_init_method=lambda w: torch.nn.init.normal_(w, mean=0.0, std=std),
        )
        self.layer_idx = layer_idx
        self.head_dim = head_dim(config)
        if swiglu_te.install():  # the MLP's backward: the SwiGLU gradient and its FP8 cast in one kernel
            self.layernorm_mlp.__class__ = swiglu_te.LlamaLayerNormMLP
        self.fuse_residual_grad = residual_te.install()
        self.fused_rope = rope_te.install()

    @property
    def fuse_residual_grad(self) -> bool:
        """Each residual connection's gradient is added by the RMSNorm backward of the branch it skips
        (`te_model.residual`), not by autograd in a kernel of its own. On by default; the benchmarks turn it
        off to measure autograd's add."""
        return self.__dict__["_fuse_residual_grad"]

    @fuse_residual_grad.setter
    def fuse_residual_grad(self, on: bool) -> None:
        if on and not residual_te.install():
            raise RuntimeError("this Transformer Engine's norm backward cannot take the residual gradient "
                               "(te_model.residual_te.install)")
        self.__dict__["_fuse_residual_grad"] = bool(on)

    @property
    def fused_rope(self) -> bool:
        """Attention's Q/K/V split and RoPE in one kernel each way (`te_model.rope_kernels`), not TE's split,
        two RoPE kernels and, in backward, a concatenation of the three gradients. On by default where TE's
        attention calls the two as `te_model.rope_te` expects; the benchmarks turn it off to measure TE's."""
        return self.__dict__["_fused_rope"]

    @fused_rope.setter
    def fused_rope(self, on: bool) -> None:
        if on and not rope_te.install():
            raise RuntimeError("this Transformer Engine's attention cannot take the fused RoPE "
                               "(te_model.rope_te.install)")
        self.__dict__["_fused_rope"] = bool(on)

    def rope(self, angles: torch.Tensor, cu_seqlens: torch.Tensor):
        """The context TE's forward runs in: the fused split and RoPE with these, where they are on."""
        return rope_te.fused(angles, cu_seqlens) if self.fused_rope else contextlib.nullcontext()

    def _bias_dropout_add(self, hidden_state, bias, residual_input, drop_path=None):
        # TE's residual connection (its only caller is TransformerLayer.forward): our layers have no bias,
        # dropout or drop path, so it is the plain sum, whose gradient the norm backward can add
        if self.fuse_residual_grad and drop_path is None and (bias is None or bias.numel() == 0) \
                and (self.hidden_dropout == 0 or not self.training):
            return residual.add(residual_input, hidden_state)
        return super()._bias_dropout_add(hidden_state, bias, residual_input, drop_path)

    @property
    def one_pass_dswiglu(self) -> bool:
        """Under delayed scaling, the MLP's backward computes the SwiGLU gradient and casts it to FP8 in one
        kernel (`te_model.swiglu_kernels`), not in bf16 first and then cast by TE. The same gradient, rounded
        once instead of twice. On by default; the benchmarks turn it off to measure TE's own path."""
        return getattr(self.layernorm_mlp, "one_pass_dswiglu", False)

    @one_pass_dswiglu.setter
    def one_pass_dswiglu(self, on: bool) -> None:
        if on and not isinstance(self.layernorm_mlp, swiglu_te.LlamaLayerNormMLP):
            raise RuntimeError("this Transformer Engine's LayerNormMLP cannot take the one-kernel SwiGLU "
                               "backward (te_model.swiglu_te.install)")
        if isinstance(self.layernorm_mlp, swiglu_te.LlamaLayerNormMLP):
            self.layernorm_mlp.one_pass_dswiglu = bool(on)

    @property
    def recompute_mlp(self) -> bool:
        """TE's selective activation checkpointing of `LayerNormMLP` (its `checkpoint` argument, which
        `TransformerLayer` does not pass on): forward keeps only the MLP's input, and backward recomputes the
        norm, FC1 and SwiGLU, with the FP8 weights cast again, under the forward's FP8 scaling state."""
        return self.layernorm_mlp.checkpoint

    @recompute_mlp.setter
    def recompute_mlp(self, on: bool) -> None:
        if on and not hasattr(self.layernorm_mlp, "checkpoint"):  # a TE without it would ignore the setting
            raise RuntimeError("this Transformer Engine's LayerNormMLP has no selective recompute "
                               "(`checkpoint`): recompute_mlp needs TE 2.20 or later")
        self.layernorm_mlp.checkpoint = bool(on)

    @property
    def recast_fp8_weights(self) -> bool:
        """Under FP8, each linear layer's backward casts its weight to FP8 again instead of keeping the
        forward's FP8 copy (row-wise and transposed, 2 bytes a parameter) until then: TE's own path for
        weights sharded by FSDP2, whose forward keeps no FP8 weight. Less memory held from forward to
        backward, for one more cast of each weight a step."""
        return all(m.__dict__.get("_is_fsdp2") is True for m in self._te_modules())

    @recast_fp8_weights.setter
    def recast_fp8_weights(self, on: bool) -> None:
        modules = self._te_modules()
        if on and not all(isinstance(getattr(type(m), "is_fsdp2", None), property) for m in modules):
            raise RuntimeError("this Transformer Engine cannot cast FP8 weights again in backward "
                               "(no is_fsdp2 path): recast_fp8_weights needs TE 2.20 or later")
        for m in modules:
            if on:
                m._is_fsdp2 = True  # read by TE's forward (keep no FP8 weight) and backward (cast it again)
            else:
                m.__dict__.pop("_is_fsdp2", None)  # TE finds out again whether FSDP2 shards the module

    def _te_modules(self) -> list:
        return [m for m in self.modules() if isinstance(m, TransformerEngineBaseModule)]

    def _block(self, x, plan: AttentionPlan, position_embeddings, is_first_microbatch=None) -> torch.Tensor:
        if x.dtype == torch.float32:
            raise TypeError("the TE backend runs in bf16 or fp16 (TE's THD attention has no fp32 kernel)")
        if plan.rope_angles is None:
            raise ValueError("TELlamaDecoderLayer needs the plan's rope angles: build it with te_model")
        b, s, h = x.shape
        call = self.__dict__.get("graphed_call")  # te_model.graphs: this layer's captured forward and backward
        if call is not None and plan.graphed and self.training and torch.is_grad_enabled() \
                and (call.cache_fp8_weights or is_first_microbatch is None):
            # graphs that keep FP8 weights cast them on a first (or unmarked) micro-batch, reuse them on the others
            marks = {"is_first_microbatch": is_first_microbatch is not False} if call.cache_fp8_weights else {}
            return call(x.reshape(b * s, h), plan.cu_seqlens, plan.rope_angles, **marks).view(b, s, h)
        with self.rope(plan.rope_angles, plan.cu_seqlens):
            out = te.TransformerLayer.forward(
                self,
                x.reshape(b * s, h),
                rotary_pos_emb=plan.rope_angles,
                cu_seqlens_q=plan.cu_seqlens,
                cu_seqlens_kv=plan.cu_seqlens,
                max_seqlen_q=plan.max_seqlen,
                max_seqlen_kv=plan.max_seqlen,
                is_first_microbatch=is_first_microbatch,
            )
        return out.view(b, s, h)

    @staticmethod
    def _checkpoint(fn, *args):
        # TE's checkpoint keeps FP8 scaling state consistent when the forward is recomputed.
        return te.checkpoint(fn, *args, use_reentrant=False)
