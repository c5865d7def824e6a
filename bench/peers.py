"""What a user could pick instead of our model, each set up as its users run it, for bench/train_step.py.

- `hf_liger`: HF's LlamaForCausalLM with Liger's kernels (RMSNorm, SwiGLU, RoPE, fused linear
  cross-entropy), applied to the built model as HF Trainer's `use_liger_kernel=True` applies them.
- `hf_torchao_fp8`: HF's model with torchao's float8 training (tensorwise scaling), every linear layer
  but the LM head converted (as torchtitan does), and each decoder layer under `torch.compile`.
- `accelerate_te_fp8`: HF's model through `Accelerator(mixed_precision="fp8")` with the Transformer
  Engine backend: every nn.Linear (the head too) becomes a `te.Linear`, the forward runs under bf16
  autocast and TE's autocast with TE's default DelayedScaling.
- `te_llama_swap`: TE's te_llama tutorial: HF's decoder layer swapped for a plain TE TransformerLayer
  (`bench/te_llama_swap.py`), HF's loss on the logits, TE's autocast with its default DelayedScaling.

Every peer starts from the bench's reference weights and is updated by torch's fused AdamW. Liger and
the swap patch transformers' Llama module; the patch lasts as long as the peer (`Peer.close` restores
it), so the variants after it run stock code. A peer that cannot run here is skipped with the reason.
"""

from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import LlamaForCausalLM
from transformers.models.llama import modeling_llama

from bench import common
from te_model.backend import te_unavailable_reason

PEERS = {  # name: (the packages it imports, whether it needs FP8 tensor cores)
    "hf_liger": (("liger_kernel",), False),
    "hf_torchao_fp8": (("torchao",), True),
    "accelerate_te_fp8": (("accelerate", "transformer_engine"), True),
    "te_llama_swap": (("transformer_engine",), True),
}
FP8_CAPABILITY = (8, 9)  # Ada and later: the first GPUs with FP8 tensor cores
REQUIREMENTS = "bench/gpu/peer-requirements.txt"
LIGER_PATCHES = ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP")  # what Liger sets in modeling_llama


@dataclass
class Peer:
    """A peer ready to train: what the bench's step calls, and how to undo its patches."""

    model: torch.nn.Module
    """In train mode, holding the reference weights; `model(input_ids=, labels=).loss` is the step's loss."""
    optimizer: torch.optim.Optimizer
    """torch's fused AdamW over the model's parameters (wrapped by Accelerate for `accelerate_te_fp8`)."""
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    """The context the forward pass runs in (TE's FP8 autocast for the swap; a no-op for the others)."""
    restore: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    """Undoes the peer's patches of transformers when closed."""

    def close(self) -> None:
        self.restore.close()


def skip_reason(name: str, device_type: str, capability: tuple[int, int] | None,
                installed: Callable[[str], bool]) -> str | None:
    """Why peer `name` cannot run on this device and install, or None when it can."""
    packages, fp8 = PEERS[name]
    if device_type != "cuda":
        return f"{name} runs on CUDA only (device is {device_type})"
    missing = [p for p in packages if not installed(p)]
    if missing:
        return f"{', '.join(missing)} not installed (see {REQUIREMENTS})"
    if fp8 and capability is not None and tuple(capability) < FP8_CAPABILITY:
        return f"FP8 needs compute capability 8.9+, this GPU has {capability[0]}.{capability[1]}"
    return None


def unavailable_reason(name: str, device: torch.device) -> str | None:
    """`skip_reason` for this machine; TE's own import check for the peers built on TE."""
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    reason = skip_reason(name, device.type, capability, lambda p: importlib.util.find_spec(p) is not None)
    if reason is None and "transformer_engine" in PEERS[name][0]:
        reason = te_unavailable_reason()
    return reason


def build(name: str, config, state: dict, dtype: torch.dtype, device: torch.device, lr: float) -> Peer:
    """Peer `name` on `device`, from the reference weights; its patches are undone if building fails."""
    peer = Peer(model=None, optimizer=None)
    try:
        BUILDERS[name](peer, config, state, dtype, device, lr)
    except BaseException:
        peer.close()
        raise
    peer.model.train()
    return peer


@contextlib.contextmanager
def kept(module, names: tuple[str, ...]):
    """Within the block, `module`'s attributes `names` may be replaced; on exit they are put back."""
    saved = {n: getattr(module, n) for n in names}
    try:
        yield
    finally:
        for n, value in saved.items():
            setattr(module, n, value)


def swapped_llama(config, state: dict, dtype: torch.dtype, device: torch.device, layer_cls) -> LlamaForCausalLM:
    """HF's LlamaForCausalLM built with `layer_cls` as its decoder layer, holding the reference weights.

    The layer names its parameters as TE's TransformerLayer does (unfused Q/K/V, fc1 = [gate; up]), so
    te_model's HF→TE key table fills them; everything else (embedding, norm, head, loss) is HF's.
    """
    with kept(modeling_llama, ("LlamaDecoderLayer",)), torch.device(device), common.default_dtype(dtype):
        modeling_llama.LlamaDecoderLayer = layer_cls
        model = LlamaForCausalLM(config)
    common.load_hf_state(model, state)
    return model


def _hf(config, state: dict, dtype, device) -> LlamaForCausalLM:
    model = common.build_hf(config, dtype, device)
    model.load_state_dict(state, strict=True)
    return model


def _adamw(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=lr, fused=True)


def _liger(peer: Peer, config, state, dtype, device, lr) -> None:
    from liger_kernel.transformers import apply_liger_kernel_to_llama

    peer.model = _hf(config, state, dtype, device)
    # Liger sets its RoPE, norm and MLP in modeling_llama for every model; HF's attention looks its RoPE up
    # there at each call, so the patch must stay for this peer's run, and no longer.
    peer.restore.enter_context(kept(modeling_llama, LIGER_PATCHES))
    apply_liger_kernel_to_llama(model=peer.model)  # defaults: RoPE, RMSNorm, SwiGLU, fused linear CE
    peer.optimizer = _adamw(peer.model, lr)


def _torchao_fp8(peer: Peer, config, state, dtype, device, lr) -> None:
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    peer.model = _hf(config, state, dtype, device)
    convert_to_float8_training(peer.model, config=Float8LinearConfig.from_recipe_name("tensorwise"),
                               module_filter_fn=lambda module, fqn: fqn != "lm_head")
    for layer in peer.model.model.layers:
        layer.compile()  # in place: the parameters keep their names and the optimizer sees them
    peer.optimizer = _adamw(peer.model, lr)


def _accelerate_te_fp8(peer: Peer, config, state, dtype, device, lr) -> None:
    from accelerate import Accelerator
    from accelerate.utils import TERecipeKwargs

    model = _hf(config, state, dtype, device)
    # The handler picks TE: with torchao installed too, Accelerate would otherwise choose torchao.
    accelerator = Accelerator(mixed_precision="fp8", kwargs_handlers=[TERecipeKwargs()])
    peer.model, peer.optimizer = accelerator.prepare(model, _adamw(model, lr))


def _te_llama_swap(peer: Peer, config, state, dtype, device, lr) -> None:
    import transformer_engine.pytorch as te
    from transformer_engine.common.recipe import DelayedScaling

    from bench.te_llama_swap import SwapDecoderLayer

    peer.model = swapped_llama(config, state, dtype, device, SwapDecoderLayer)
    peer.optimizer = _adamw(peer.model, lr)
    recipe = DelayedScaling()  # TE's defaults, what the tutorial's Accelerate FP8 handler hands TE
    peer.autocast = lambda: te.autocast(enabled=True, recipe=recipe)


BUILDERS = {"hf_liger": _liger, "hf_torchao_fp8": _torchao_fp8, "accelerate_te_fp8": _accelerate_te_fp8,
            "te_llama_swap": _te_llama_swap}
LABELS = {
    "hf_liger": "HF + Liger kernels",
    "hf_torchao_fp8": "HF + torchao FP8 tensorwise, compiled layers",
    "accelerate_te_fp8": "HF + Accelerate TE FP8 (te.Linear)",
    "te_llama_swap": "HF + TE TransformerLayer swap, FP8",
}
