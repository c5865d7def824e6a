"""HF checkpoint → TE-style model → HF checkpoint: strict loading, bit-exact export, bounded memory."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, MistralConfig

import te_model
from te_model.weights import CheckpointError
from tests.support.llama_variants import hf_model, llama_config


def read_checkpoint(path):
    tensors = {}
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


@pytest.fixture
def hf_dir(tmp_path):
    path = tmp_path / "hf"
    hf_model(llama_config("llama3")).save_pretrained(path, max_shard_size="100KB")
    return path


@pytest.mark.parametrize("variant", ["llama3", "llama3.2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_bit_exact(tmp_path, variant, dtype):
    src = tmp_path / "src"
    hf = hf_model(llama_config(variant), dtype=dtype)
    hf.save_pretrained(src, max_shard_size="100KB")
    model = te_model.from_hf_checkpoint(src, backend="torch", dtype=dtype)
    out = te_model.save_hf_checkpoint(model, tmp_path / "out", max_shard_size="150KB")

    before, after = read_checkpoint(src), read_checkpoint(out)
    assert sorted(before) == sorted(after)
    for key, tensor in before.items():
        assert after[key].dtype == tensor.dtype and torch.equal(after[key], tensor), key
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(after)
    assert not any("_extra_state" in k for k in after)

    loaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True, dtype=dtype)
    assert info["missing_keys"] == set() or not info["missing_keys"]
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    ids = torch.randint(0, hf.config.vocab_size, (2, 40))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(ids).logits, hf(ids).logits)


def test_single_file_checkpoint_loads(tmp_path):
    hf = hf_model(llama_config("llama2"))
    hf.save_pretrained(tmp_path)  # small: one model.safetensors, no index
    assert not (tmp_path / "model.safetensors.index.json").exists()
    model = te_model.from_hf_checkpoint(tmp_path, backend="torch", dtype=torch.float32)
    ids = torch.randint(0, 320, (1, 24))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf(ids).logits, rtol=1e-5, atol=1e-5)


def test_not_llama(tmp_path):
    MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"config.json: model_type is 'mistral'"):
        te_model.from_hf_checkpoint(tmp_path, backend="torch")


def test_missing_shard(hf_dir):
    shard = sorted(hf_dir.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"lists shard {shard.name}, which is missing"):
        te_model.from_hf_checkpoint(hf_dir, backend="torch")


def test_shape_mismatch(hf_dir):
    config = json.loads((hf_dir / "config.json").read_text())
    config["intermediate_size"] = 192
    (hf_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"mlp\.(gate|up|down)_proj\.weight' has shape"):
        te_model.from_hf_checkpoint(hf_dir, backend="torch")


def _edit_shard(hf_dir, key, edit):
    """Rewrite the shard holding `key` with `edit(tensors)` applied."""
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    shard = hf_dir / index["weight_map"][key]
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})


def test_missing_tensor(hf_dir):
    key = "model.layers.1.mlp.up_proj.weight"
    _edit_shard(hf_dir, key, lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match=r"missing tensors model\.layers\.1\.mlp\.up_proj\.weight"):
        te_model.from_hf_checkpoint(hf_dir, backend="torch")


def test_extra_tensor(hf_dir):
    key = "model.norm.weight"
    _edit_shard(hf_dir, key, lambda t: t.update({"model.layers.0.self_attn.q_norm.weight": t[key].clone()}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.q_norm"):
        te_model.from_hf_checkpoint(hf_dir, backend="torch")


def test_unsupported_rope(tmp_path):
    cfg = llama_config("llama3", rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0})
    cfg.save_pretrained(tmp_path)
    with pytest.raises(te_model.UnsupportedRopeError, match="rope_type='yarn' is not supported"):
        te_model.from_hf_checkpoint(tmp_path, backend="torch")


def test_save_never_overwrites(tmp_path):
    model = te_model.build_model(llama_config("llama3"), backend="torch", dtype=torch.float32)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError):
        te_model.save_hf_checkpoint(model, out)
    assert (out / "keep.txt").read_text() == "precious"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no half-written sibling left behind


RSS_SCRIPT = textwrap.dedent(
    """
    import resource, sys, torch, te_model
    def peak_mb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    torch.ones(1)  # settle allocator
    base = peak_mb()
    model = te_model.from_hf_checkpoint(sys.argv[1], backend="torch", dtype=torch.float32)
    size = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    print(base, peak_mb(), size)
    """
)


def test_loading_memory_is_model_plus_one_shard(tmp_path):
    """Peak RSS while loading stays near model + one shard (a full state dict would double it)."""
    config = llama_config("llama3", hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
                          num_attention_heads=8, num_key_value_heads=4, vocab_size=8000)
    model = hf_model(config)
    model.save_pretrained(tmp_path, max_shard_size="20MB")
    shard_mb = max(p.stat().st_size for p in tmp_path.glob("*.safetensors")) / 2**20
    del model
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(tmp_path)],
                         capture_output=True, text=True, check=True)
    base, peak, model_mb = map(float, out.stdout.split())
    growth = peak - base
    assert model_mb > 100  # large enough that a second copy could not hide in the slack
    assert growth < model_mb + 2 * shard_mb + 40, (
        f"loading grew RSS by {growth:.0f} MiB for a {model_mb:.0f} MiB model, {shard_mb:.0f} MiB shards"
    )
