"""The decoder layer of Transformer Engine's te_llama tutorial, for the `te_llama_swap` peer of the bench.

The tutorial swaps HF's `LlamaDecoderLayer` for a plain `te.pytorch.TransformerLayer`: RMSNorm,
SwiGLU, GQA, unfused Q/K/V, no biases, batch-major (BSHD) causal attention, RoPE through TE's fused
kernel. Nothing of te_model runs in it: no THD packing, no logits-free loss, no FP8 head.
Two departures from the tutorial, both so that it computes what HF computes: the rotation angles come
from HF's rotary module for the config (Llama 3's theta and scaling; the tutorial uses a base of 10000),
and the angle table covers the batch's length, not the config's 131072 positions, in every layer.
Importing this module imports Transformer Engine.
"""

import torch
import transformer_engine.pytorch as te
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from te_model.layer_te import llama_layer_args
from te_model.rope import angles_table


class SwapDecoderLayer(te.TransformerLayer):
    """`te.pytorch.TransformerLayer` with HF's decoder-layer constructor and call signature."""

    def __init__(self, config, layer_idx: int = 0):
        super().__init__(**llama_layer_args(config, layer_idx), attn_input_format="bshd",
                         self_attn_mask_type="causal")
        self.register_buffer("inv_freq", LlamaRotaryEmbedding(config).inv_freq.float(), persistent=False)
        self._angles = None  # (length, table): recomputed only when the sequence length changes

    def forward(self, hidden_states, *args, **kwargs) -> torch.Tensor:
        """HF's mask, positions and cos/sin are not used: plain rows, causal mask, angles from `inv_freq`."""
        if isinstance(hidden_states, tuple):  # older transformers passed (hidden_states,)
            hidden_states = hidden_states[0]
        length = hidden_states.shape[1]
        if self._angles is None or self._angles[0] != length or self._angles[1].device != hidden_states.device:
            self._angles = (length, angles_table(self.inv_freq, length))
        return super().forward(hidden_states, rotary_pos_emb=self._angles[1])
