"""HF's LlamaForCausalLM with Transformer Engine decoder layers, and a pure-PyTorch twin.

Importing this package never imports Transformer Engine: `TELlamaDecoderLayer` is resolved on first
access, and `backend="auto"` only tries TE when a CUDA device is present. Both backends share parameter
names, so checkpoints move between them. Usage: docs/architecture.md ("Using te_model on its own").
"""

from .backend import BACKENDS, BackendUnavailableError, resolve_backend
from .fp8 import RECIPES, FP8UnsupportedError, check_fp8_tokens, fp8_autocast, pad_to_multiple
from .layer import KVCacheUnsupportedError, TorchLlamaDecoderLayer
from .model import SegmentedLlamaModel, build_model, prepare_batch, replace_decoder
from .rope import UnsupportedRopeError
from .graphs import GraphsUnsupportedError, capture_decoder_graphs
from .loss import ScoredTokens, scored_tokens
from .segments import AttentionPlan, MaskError, plan_attention, to_device
from .weights import CheckpointError, from_hf_checkpoint, hf_to_te_key, save_hf_checkpoint, te_to_hf_keys

__all__ = [
    "BACKENDS", "RECIPES", "AttentionPlan", "BackendUnavailableError", "CheckpointError",
    "FP8UnsupportedError", "GraphsUnsupportedError", "KVCacheUnsupportedError", "MaskError",
    "SaveHFCheckpointCallback", "SegmentedLlamaModel",
    "TELlamaDecoderLayer", "TorchLlamaDecoderLayer", "UnsupportedRopeError", "build_model",
    "capture_decoder_graphs", "check_fp8_tokens", "fp8_autocast", "from_hf_checkpoint", "hf_to_te_key",
    "pad_to_multiple",
    "plan_attention", "prepare_batch", "replace_decoder", "resolve_backend", "save_hf_checkpoint", "ScoredTokens", "scored_tokens",
    "te_to_hf_keys", "to_device",
]


def __getattr__(name):
    if name == "TELlamaDecoderLayer":
        from .layer_te import TELlamaDecoderLayer

        return TELlamaDecoderLayer
    if name == "SaveHFCheckpointCallback":  # transformers' Trainer stack pulls in accelerate (and TE)
        from .hf_trainer import SaveHFCheckpointCallback

        return SaveHFCheckpointCallback
    raise AttributeError(f"module 'te_model' has no attribute {name!r}")
