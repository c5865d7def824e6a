"""Training-step speed of the decoder stack: HF's Llama vs the TE layers in bf16 and each FP8 recipe.

A 4-layer model with Llama 3 8B's layer shape (hidden 4096, 32 heads / 8 KV heads, FFN 14336) and a
small vocabulary, so the decoder layers dominate. One forward + backward over 2 x 4096 tokens, no
optimizer; each variant warms up, then the median of timed steps (CUDA events) is reported, with peak
memory. Baseline and candidates run in the same process on the same GPU. Needs CUDA and TE.

    python bench/layer_speed.py
"""

import statistics
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import te_model  # noqa: E402

BATCH, SEQ, WARMUP, STEPS = 2, 4096, 3, 10
CONFIG = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=4, num_attention_heads=32,
              num_key_value_heads=8, vocab_size=1024, max_position_embeddings=8192,
              rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})


def hf_model():
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            return LlamaForCausalLM(LlamaConfig(**CONFIG))  # SDPA attention, HF's default
    finally:
        torch.set_default_dtype(torch.float32)


def te_style(backend):
    return te_model.build_model(LlamaConfig(**CONFIG), backend=backend, dtype=torch.bfloat16, device="cuda")


def time_steps(model, recipe=None) -> tuple[float, float]:
    """(median ms per forward+backward, peak GiB)."""
    ids = torch.randint(0, CONFIG["vocab_size"], (BATCH, SEQ), device="cuda")
    model.train()
    times = []
    torch.cuda.reset_peak_memory_stats()
    for i in range(WARMUP + STEPS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        with te_model.fp8_autocast(recipe):
            loss = model(ids, labels=ids).loss
        loss.backward()
        end.record()
        torch.cuda.synchronize()
        model.zero_grad(set_to_none=True)
        if i >= WARMUP:
            times.append(start.elapsed_time(end))
    return statistics.median(times), torch.cuda.max_memory_allocated() / 2**30


def main() -> None:
    # Import TE before any CUDA work: on a host whose system cuDNN differs from torch's bundled one,
    # loading TE after torch has loaded cuDNN fails with an undefined-symbol error.
    te_model.resolve_backend("te")
    variants = [("HF LlamaDecoderLayer, bf16 (baseline)", hf_model, None),
                ("torch backend, bf16", lambda: te_style("torch"), None),
                ("TE backend, bf16", lambda: te_style("te"), None),
                ("TE backend, FP8 delayed", lambda: te_style("te"), "delayed"),
                ("TE backend, FP8 current", lambda: te_style("te"), "current"),
                ("TE backend, FP8 block", lambda: te_style("te"), "block")]
    rows = []
    for name, build, recipe in variants:
        torch.manual_seed(0)
        model = build()
        ms, mem = time_steps(model, recipe)
        rows.append((name, ms, mem))
        del model
        torch.cuda.empty_cache()
    base = rows[0][1]
    tokens = BATCH * SEQ
    print(f"{torch.cuda.get_device_name()}, 4 layers of Llama-3-8B shape, {BATCH}x{SEQ} tokens, fwd+bwd, "
          f"median of {STEPS}")
    print(f"{'variant':40s} {'ms/step':>8s} {'tokens/s':>10s} {'vs HF':>7s} {'peak GiB':>9s}")
    for name, ms, mem in rows:
        print(f"{name:40s} {ms:8.1f} {tokens / ms * 1000:10.0f} {base / ms:6.2f}x {mem:9.1f}")


if __name__ == "__main__":
    main()
