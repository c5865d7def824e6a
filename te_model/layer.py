"""The Llama decoder layer, TE-shaped, and its pure-PyTorch backend.

`TorchLlamaDecoderLayer` runs where Transformer Engine cannot (no CUDA, no TE wheel). It has the
parameters of `te.pytorch.TransformerLayer`, under the same names and shapes, and the math of HF's
`LlamaDecoderLayer`. Because the names match, one weight table (`weights.py`) serves both backends,
and a checkpoint trained on either loads into the other. `DecoderCall` is what both backends share.
`is_first_microbatch`, passed to the model's forward, reaches every layer through HF's keyword
arguments: TE casts FP8 weights once per optimizer step and reuses them across micro-batches.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .segments import AttentionPlan, MaskError, plan_attention


class KVCacheUnsupportedError(RuntimeError):
    """Incremental decoding with a KV cache is not implemented on the patched model."""


KV_CACHE_MESSAGE = (
    "the TE-patched Llama does not support a KV cache (generation): export it with "
    "te_model.save_hf_checkpoint and generate with the plain HF model"
)


def _standalone_plan(hidden_states, attention_mask, position_ids) -> AttentionPlan:
    """Plan for a layer called outside `SegmentedLlamaModel` (tests, custom models)."""
    if attention_mask is not None and attention_mask.dim() != 2:
        raise MaskError(
            "a TE-style decoder layer got HF's 4-D attention mask: build the model with "
            "te_model.build_model / from_hf_checkpoint, or pass attention_plan"
        )
    batch, seqlen = hidden_states.shape[:2]
    return plan_attention(batch, seqlen, position_ids, attention_mask, device=hidden_states.device)


class DecoderCall:
    """HF decoder-layer call contract, shared by both backends. Subclasses implement `_block`.

    It holds the call signature transformers 5.x uses for decoder layers, the refusal of a KV cache, the
    attention plan, and activation checkpointing. `model.activation_checkpointing_enable()` (before
    transformers 5.24, `gradient_checkpointing_enable()`) switches that on: HF sets `gradient_checkpointing`
    on every module that has the attribute. `recompute_mlp` (set by
    `model.mlp_recompute_enable()`) recomputes only the MLP in backward: of the MLP, only its input is kept.
    """

    gradient_checkpointing = False
    recompute_mlp = False
    recast_fp8_weights = False  # the TE layer's switch (`layer_te`); this backend keeps no FP8 weights

    def forward(
        self,
        hidden_states,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        use_cache=False,
        cache_position=None,
        position_embeddings=None,
        attention_plan: AttentionPlan | None = None,
        is_first_microbatch: bool | None = None,
        cache=None,
        **kwargs,
    ) -> torch.Tensor:
        """`is_first_microbatch`: None casts FP8 weights at every call; True casts and keeps them, False reuses
        the kept ones (the weights must not have changed since: later micro-batches of one optimizer step)."""
        if isinstance(hidden_states, tuple):  # older HF versions passed (hidden_states,)
            hidden_states = hidden_states[0]
        if past_key_values is not None or cache is not None:  # the cache's name before and from transformers 5.24
            raise KVCacheUnsupportedError(KV_CACHE_MESSAGE)
        if attention_plan is None:
            attention_plan = _standalone_plan(hidden_states, attention_mask, position_ids)
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return self._checkpoint(self._block, hidden_states, attention_plan, position_embeddings,
                                    is_first_microbatch)
        return self._block(hidden_states, attention_plan, position_embeddings, is_first_microbatch)

    @staticmethod
    def _checkpoint(fn, *args):
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)


# ---------------------------------------------------------------------------------------------------
# The torch backend: modules named like TE's LayerNormLinear / LayerNormMLP / Linear


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's LlamaRMSNorm: normalise in fp32, cast back, then scale."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class LayerNormQKV(nn.Module):
    """RMSNorm followed by separate Q, K, V projections (TE's LayerNormLinear, unfused QKV)."""

    def __init__(self, hidden: int, q_out: int, kv_out: int):
        super().__init__()
        self.layer_norm_weight = nn.Parameter(torch.ones(hidden))
        self.query_weight = nn.Parameter(torch.empty(q_out, hidden))
        self.key_weight = nn.Parameter(torch.empty(kv_out, hidden))
        self.value_weight = nn.Parameter(torch.empty(kv_out, hidden))


class Projection(nn.Module):
    """Attention output projection (TE's Linear, no bias)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))


class SelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.layernorm_qkv = LayerNormQKV(hidden, heads * head_dim, kv_heads * head_dim)
        self.proj = Projection(heads * head_dim, hidden)

    def forward(self, x, plan: AttentionPlan, cos, sin, eps: float) -> torch.Tensor:
        qkv = self.layernorm_qkv
        h = rms_norm(x, qkv.layer_norm_weight, eps)
        b, s, _ = h.shape
        q = F.linear(h, qkv.query_weight).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = F.linear(h, qkv.key_weight).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = F.linear(h, qkv.value_weight).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, S, D)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        groups = self.heads // self.kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        if plan.one_segment_per_row:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=plan.block_causal_mask())
        out = out.transpose(1, 2).reshape(b, s, self.heads * self.head_dim)  # (B, S, H*D)
        return F.linear(out, self.proj.weight)


class LayerNormMLP(nn.Module):
    """RMSNorm + SwiGLU MLP; fc1 holds [gate; up] stacked, as TE's swiglu expects."""

    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.layer_norm_weight = nn.Parameter(torch.ones(hidden))
        self.fc1_weight = nn.Parameter(torch.empty(2 * ffn, hidden))
        self.fc2_weight = nn.Parameter(torch.empty(hidden, ffn))

    def forward(self, x, eps: float) -> torch.Tensor:
        h = rms_norm(x, self.layer_norm_weight, eps)
        gate, up = F.linear(h, self.fc1_weight).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.fc2_weight)


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class TorchLlamaDecoderLayer(DecoderCall, nn.Module):
    """Pure-PyTorch Llama decoder layer with Transformer Engine's parameter names."""

    def __init__(self, config, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx
        self.eps = config.rms_norm_eps
        self.self_attention = SelfAttention(
            config.hidden_size, config.num_attention_heads, config.num_key_value_heads, head_dim(config)
        )
        self.layernorm_mlp = LayerNormMLP(config.hidden_size, config.intermediate_size)
        self.reset_parameters(config.initializer_range)

    def reset_parameters(self, std: float = 0.02) -> None:
        for name, param in self.named_parameters():
            if name.endswith("layer_norm_weight"):
                nn.init.ones_(param)
            else:
                nn.init.normal_(param, mean=0.0, std=std)

    def _block(self, x, plan: AttentionPlan, position_embeddings, is_first_microbatch=None) -> torch.Tensor:
        # is_first_microbatch: TE's FP8 weight caching; these bf16/fp32 weights have no cast to keep
        if position_embeddings is None:
            raise ValueError("TorchLlamaDecoderLayer needs HF's position_embeddings (cos, sin)")
        cos, sin = position_embeddings
        x = x + self.self_attention(x, plan, cos, sin, self.eps)
        if self.recompute_mlp and self.training and torch.is_grad_enabled():
            return x + self._checkpoint(self.layernorm_mlp, x, self.eps)
        return x + self.layernorm_mlp(x, self.eps)
