"""Rotary position embeddings, taken from the model's own HF rotary module.

HF computes the inverse frequencies for the config's rope type (theta, linear scaling, Llama 3.1's
scaling) once per model, in `LlamaModel.rotary_emb`. Both backends reuse that result, so Llama 3 and
3.1 come out exactly as HF has them. The torch backend takes the `(cos, sin)` HF passes every layer;
TE wants rotation angles, which `angles_table` makes from `inv_freq` once per forward. Rope types that
TE angles cannot express (yarn, longrope, dynamic) are refused at model build time (`rope_type`).
"""

import torch

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class UnsupportedRopeError(ValueError):
    """The config asks for a rope type the TE-style layers cannot reproduce."""


def rope_type(config) -> str:
    """The config's rope type, checked against what both backends reproduce exactly.

    Rope types whose cos/sin carry an attention scale (yarn, longrope), or that change with sequence
    length (dynamic), cannot be expressed as TE angles.
    """
    params = getattr(config, "rope_parameters", None) or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedRopeError(
            f"rope_parameters.rope_type={kind!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    return kind


def angles_table(inv_freq: torch.Tensor, length: int) -> torch.Tensor:
    """Rotation angles for positions 0..length-1 as TE expects them: [length, 1, 1, head_dim], fp32.

    Same layout as HF's `cat((freqs, freqs), -1)`: the non-interleaved (rotate-half) convention.
    """
    positions = torch.arange(length, device=inv_freq.device, dtype=torch.float32)
    freqs = positions[:, None] * inv_freq.float()[None, :]  # (length, head_dim / 2)
    return torch.cat((freqs, freqs), dim=-1)[:, None, None, :]
