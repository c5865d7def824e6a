"""Tiny Llama configs of every family the project supports, and helpers to save them as HF checkpoints.

Sizes are small enough for CPU but the features are real: GQA, each rope type, tied embeddings. The
initializer range is large so attention is peaked and positions matter; with HF's default 0.02 a
random model attends almost uniformly and a wrong RoPE would hide inside the tolerance.
"""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

BASE = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=176,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    initializer_range=0.15,
)

LLAMA3_SCALING = dict(
    rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
    original_max_position_embeddings=64,
)

# name -> (config overrides, the same config with the feature switched off)
VARIANTS = {
    "llama2": (dict(num_key_value_heads=4, rope_parameters={"rope_type": "default", "rope_theta": 1e4}),
               dict(num_key_value_heads=4, rope_parameters={"rope_type": "default", "rope_theta": 5e5})),
    "llama3": (dict(num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 5e5}),
               dict(num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 1e4})),
    "llama3.1": (dict(num_key_value_heads=2, rope_parameters={**LLAMA3_SCALING, "rope_theta": 5e5}),
                 dict(num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 5e5})),
    "llama3.2": (dict(num_key_value_heads=2, tie_word_embeddings=True,
                      rope_parameters={**LLAMA3_SCALING, "rope_theta": 5e5}),
                 dict(num_key_value_heads=2, tie_word_embeddings=False,
                      rope_parameters={**LLAMA3_SCALING, "rope_theta": 5e5})),
    "codellama": (dict(num_key_value_heads=4, rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
                  dict(num_key_value_heads=4, rope_parameters={"rope_type": "default", "rope_theta": 1e4})),
}


def llama_config(name: str, feature_on: bool = True, **extra) -> LlamaConfig:
    overrides = VARIANTS[name][0 if feature_on else 1]
    return LlamaConfig(**{**BASE, **overrides, **extra})


def hf_model(config: LlamaConfig, seed: int = 0, dtype=torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # not .to(dtype): that would also round RoPE's fp32 inv_freq
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(saved)
    if not config.tie_word_embeddings:  # a distinct head, so an untied load would be visibly wrong
        torch.nn.init.normal_(model.lm_head.weight, std=config.initializer_range)
    return model.eval()


def copy_weights(src: LlamaForCausalLM, dst: LlamaForCausalLM) -> None:
    """Same weights in a second HF model (e.g. the feature-off control), shapes permitting."""
    with torch.no_grad():
        dst_params = dict(dst.named_parameters())
        for name, param in src.named_parameters():
            if name in dst_params:
                dst_params[name].copy_(param)
