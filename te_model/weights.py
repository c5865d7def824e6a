"""HF Llama checkpoints in and out of the TE-style model, through one key table.

Loading goes shard by shard straight into the model's parameters (peak host memory: the model plus one
shard), and is strict: every checkpoint tensor must land somewhere, every parameter must be filled, and
shapes must match. Saving walks the same table backwards, splitting fc1 into gate/up, and writes standard
sharded safetensors that `AutoModelForCausalLM.from_pretrained` loads with no missing or unexpected keys.
TE's `_extra_state` (FP8 scaling history) is training state, not weights: it is never exported.
"""

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig

from .model import build_model, check_llama_config

# HF name inside `model.layers.{i}.`  →  TE-style name inside the same layer
LAYER_KEYS = {
    "input_layernorm.weight": "self_attention.layernorm_qkv.layer_norm_weight",
    "self_attn.q_proj.weight": "self_attention.layernorm_qkv.query_weight",
    "self_attn.k_proj.weight": "self_attention.layernorm_qkv.key_weight",
    "self_attn.v_proj.weight": "self_attention.layernorm_qkv.value_weight",
    "self_attn.o_proj.weight": "self_attention.proj.weight",
    "post_attention_layernorm.weight": "layernorm_mlp.layer_norm_weight",
    "mlp.gate_proj.weight": "layernorm_mlp.fc1_weight",
    "mlp.up_proj.weight": "layernorm_mlp.fc1_weight",
    "mlp.down_proj.weight": "layernorm_mlp.fc2_weight",
}
# fc1 = [gate; up]: which half of fc1 each HF tensor is
FC1_PART = {"mlp.gate_proj.weight": 0, "mlp.up_proj.weight": 1}
TOP_LEVEL_KEYS = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


class CheckpointError(ValueError):
    """A checkpoint that does not match the model: names the file, tensor and what is wrong."""


def hf_to_te_key(hf_key: str) -> tuple[str, int | None] | None:
    """(TE-style parameter name, fc1 half or None) for an HF key; None if the key is not Llama's."""
    if hf_key in TOP_LEVEL_KEYS:
        return hf_key, None
    match = _LAYER.match(hf_key)
    if not match or match[2] not in LAYER_KEYS:
        return None
    return f"model.layers.{match[1]}.{LAYER_KEYS[match[2]]}", FC1_PART.get(match[2])


def te_to_hf_keys(te_key: str) -> list[tuple[str, int | None]]:
    """The HF keys (with fc1 half) a TE-style parameter holds."""
    if te_key in TOP_LEVEL_KEYS:
        return [(te_key, None)]
    match = _LAYER.match(te_key)
    if not match:
        raise KeyError(f"no HF name for parameter {te_key!r}")
    prefix = f"model.layers.{match[1]}."
    found = [(prefix + hf, FC1_PART.get(hf)) for hf, te in LAYER_KEYS.items() if te == match[2]]
    if not found:
        raise KeyError(f"no HF name for parameter {te_key!r}")
    return found


def fc1_part(fc1: torch.Tensor, part: int | None) -> torch.Tensor:
    """The gate (0) or up (1) half of a stacked fc1 weight, as a view; the whole tensor for None."""
    return fc1 if part is None else fc1.chunk(2, dim=0)[part]


# ---------------------------------------------------------------------------------------------------
# loading


def checkpoint_shards(path: Path) -> list[Path]:
    """The safetensors files of an HF checkpoint directory, from its index when it is sharded."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = [path / name for name in sorted(set(weight_map.values()))]
    elif (path / "model.safetensors").exists():
        shards = [path / "model.safetensors"]
    else:
        raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")
    for shard in shards:
        if not shard.exists():
            raise CheckpointError(f"{index}: lists shard {shard.name}, which is missing")
    return shards


def load_config(path: str | os.PathLike):
    path = Path(path)
    if not (path / "config.json").exists():
        raise CheckpointError(f"{path}: no config.json")
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    check_llama_config(config, where=str(path / "config.json"))
    return config


@torch.no_grad()
def load_hf_weights(model, path: str | os.PathLike) -> None:
    """Copy an HF checkpoint's tensors into a TE-style model, one shard in memory at a time."""
    params = dict(model.named_parameters())
    tied = bool(model.config.tie_word_embeddings)
    filled: set[tuple[str, int | None]] = set()
    for shard in checkpoint_shards(Path(path)):
        with safe_open(shard, framework="pt") as f:
            for key in f.keys():
                if tied and key == "lm_head.weight":
                    continue  # the LM head is the embedding matrix
                target_key = hf_to_te_key(key)
                if target_key is None or target_key[0] not in params:
                    raise CheckpointError(f"{shard.name}: unexpected tensor {key!r}")
                target = fc1_part(params[target_key[0]], target_key[1])
                tensor = f.get_tensor(key)
                if tuple(tensor.shape) != tuple(target.shape):
                    raise CheckpointError(
                        f"{shard.name}: tensor {key!r} has shape {tuple(tensor.shape)}, "
                        f"the model expects {tuple(target.shape)}"
                    )
                target.copy_(tensor)
                filled.add(target_key)
    expected = {(hf, part) for te in params for hf, part in te_to_hf_keys(te)}
    missing = sorted(hf for hf, _ in expected if hf_to_te_key(hf) not in filled)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(f"{path}: missing tensors {', '.join(missing[:3])}{more}")


def from_hf_checkpoint(
    path: str | os.PathLike,
    *,
    backend: str = "auto",
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device | None = None,
):
    """A `LlamaForCausalLM` with TE-style layers holding the weights of an HF checkpoint directory."""
    config = load_config(path)
    model = build_model(config, backend=backend, dtype=dtype, device=device)
    load_hf_weights(model, path)
    return model


# ---------------------------------------------------------------------------------------------------
# saving


def parse_size(size: int | str) -> int:
    """Bytes in '500MB', '2GB', '100KB' or an int."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)?\s*", size, flags=re.I)
    if not match:
        raise ValueError(f"max_shard_size {size!r} is not a size like '2GB' or '500MB'")
    unit = (match[2] or "B").upper().replace("I", "")
    return int(float(match[1]) * {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9}[unit])


def hf_tensors(model):
    """(HF key, tensor view) for every weight of a TE-style model; the tied LM head is left out."""
    for name, param in model.named_parameters():
        for hf_key, part in te_to_hf_keys(name):
            yield hf_key, fc1_part(param.detach(), part)


def _plan_shards(model, limit: int) -> list[list[str]]:
    shards, size = [[]], 0
    for key, tensor in hf_tensors(model):
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


def _write_shards(model, out: Path, shards: list[list[str]]) -> None:
    tensors = dict(hf_tensors(model))
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)
    ]
    weight_map, total = {}, 0
    for name, keys in zip(names, shards):
        # copy=True: the gate and up halves of fc1 must not share storage in the file
        shard = {k: tensors[k].to("cpu", copy=True).contiguous() for k in keys}
        save_file(shard, out / name, metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in shard.values())
        weight_map.update(dict.fromkeys(keys, name))
        del shard
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def save_hf_checkpoint(model, out_dir: str | os.PathLike, max_shard_size: int | str = "5GB") -> Path:
    """Write the model as a standard HF Llama checkpoint (config + sharded safetensors + index).

    The directory appears whole or not at all: it is written next to `out_dir` and renamed into place,
    and an existing non-empty `out_dir` is never overwritten.
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; refusing to overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _write_shards(model, tmp, _plan_shards(model, parse_size(max_shard_size)))
        config = model.config.__class__.from_dict(model.config.to_dict())
        config.use_cache = True  # the export is a plain HF model: generation may cache again
        config.architectures = ["LlamaForCausalLM"]
        config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
