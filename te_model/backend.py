"""Choosing between Transformer Engine and the pure-PyTorch layer.

`auto` means TE when it imports and a CUDA device is present, else torch: the same code runs on a CPU
laptop, in CI and on H100 nodes. Asking for `te` explicitly where it cannot run is an error that says why,
never a silent fallback. Nothing here imports TE unless it is asked about.
"""

import functools

import torch

BACKENDS = ("auto", "te", "torch")


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run on this machine."""


@functools.cache
def te_unavailable_reason() -> str | None:
    """None when Transformer Engine can run here, else a one-line reason."""
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as exc:  # ImportError, or TE's own check of the CUDA/cuDNN stack
        return f"transformer_engine.pytorch does not import ({type(exc).__name__}: {exc})"
    return None


def resolve_backend(backend: str = "auto") -> str:
    """'te' or 'torch' for a requested backend name."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    reason = te_unavailable_reason() if backend != "torch" else None
    if backend == "te" and reason:
        raise BackendUnavailableError(f"backend 'te' requested but {reason}")
    if backend == "auto":
        return "torch" if reason else "te"
    return backend


def decoder_layer_class(backend: str):
    """The decoder layer class for a resolved backend; imports TE only for 'te'."""
    if resolve_backend(backend) == "te":
        from .layer_te import TELlamaDecoderLayer

        return TELlamaDecoderLayer
    from .layer import TorchLlamaDecoderLayer

    return TorchLlamaDecoderLayer
