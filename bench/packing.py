"""Padding-free packed rows against padded rows: useful (non-pad) tokens per second on skewed lengths.

The same documents go through two full training passes: packed into rows as the pipeline packs them
(THD attention), and padded, one document a row (BSHD with a padding mask). Everything else is held
equal, so the ratio is what packing buys. Without CUDA or TE the padded side is the torch backend
with a padding mask, labelled so. Method and length mix: docs/performance.md ("What each bench measures").

    python bench/packing.py --shape llama3.2-1b --seq 4096 --batch 2 --out results/packing.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import te_model  # noqa: E402
from bench import common  # noqa: E402
from pipeline.stages.data import IGNORE_INDEX, pack_documents  # noqa: E402
from te_model.rope import angles_table  # noqa: E402

LENGTH_MIX = ((0.70, 1 / 64, 1 / 16), (0.25, 1 / 16, 1 / 4), (0.05, 1 / 4, 1.0))  # share, min, max (x seq)
PAD_ID = 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="llama3.2-1b", choices=sorted(common.SHAPES))
    p.add_argument("--layers", type=int, help="decoder layers (default: the model's)")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--batch", type=int, default=2, help="packed rows per step; the padded token budget too")
    p.add_argument("--steps", type=int, default=20, help="documents for about this many packed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps of each mode first")
    p.add_argument("--fp8", default="none", choices=("none", *te_model.RECIPES), help="FP8 recipe, both modes")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bf16", choices=sorted(common.DTYPES))
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.seq % 64:
        p.error(f"--seq {args.seq} must be a multiple of 64 (the shortest documents are seq/64 tokens)")
    return args


# ---------------------------------------------------------------------------------------------------
# documents and batches


def document_lengths(count: int, seq: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shares = np.array([share for share, _, _ in LENGTH_MIX])
    bucket = rng.choice(len(LENGTH_MIX), size=count, p=shares / shares.sum())
    low = np.array([int(lo * seq) for _, lo, _ in LENGTH_MIX])[bucket]
    high = np.array([int(hi * seq) for _, _, hi in LENGTH_MIX])[bucket]
    return rng.integers(low, high + 1)


def make_documents(args, vocab: int) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) per document; the first token has no label, as in the pipeline's data."""
    mean = sum(share * (lo + hi) / 2 for share, lo, hi in LENGTH_MIX) * args.seq
    count = max(args.batch, int(args.steps * args.batch * args.seq / mean))
    rng = np.random.default_rng(args.seed + 1)
    docs = []
    for length in document_lengths(count, args.seq, args.seed):
        ids = rng.integers(PAD_ID + 1, vocab, size=int(length)).tolist()
        docs.append((ids, [IGNORE_INDEX] + ids[1:]))
    return docs


def packed_batches(docs, args) -> list[dict]:
    columns = pack_documents(docs, args.seq, PAD_ID, args.seed)
    tensors = {k: torch.tensor(v, dtype=torch.long) for k, v in columns.items()}
    rows = len(columns["input_ids"])
    return [{k: t[i:i + args.batch] for k, t in tensors.items()} for i in range(0, rows, args.batch)]


def padded_batches(docs, args) -> list[dict]:
    """Documents in order, each its own row, padded to the batch's longest (x16), within the token budget."""
    budget, batches, current = args.batch * args.seq, [], []
    for doc in docs:
        width = -(-max(len(d[0]) for d in current + [doc]) // 16) * 16
        if current and (len(current) + 1) * width > budget:
            batches.append(_pad_rows(current))
            current = []
        current.append(doc)
    return batches + [_pad_rows(current)]


def _pad_rows(docs) -> dict:
    width = -(-max(len(ids) for ids, _ in docs) // 16) * 16
    batch = {"input_ids": torch.full((len(docs), width), PAD_ID, dtype=torch.long),
             "labels": torch.full((len(docs), width), IGNORE_INDEX, dtype=torch.long),
             "attention_mask": torch.zeros(len(docs), width, dtype=torch.long)}
    for row, (ids, labels) in enumerate(docs):
        batch["input_ids"][row, :len(ids)] = torch.tensor(ids)
        batch["labels"][row, :len(ids)] = torch.tensor(labels)
        batch["attention_mask"][row, :len(ids)] = 1
    return batch


def useful_tokens(batch: dict) -> int:
    """Document tokens in a batch: documents never use PAD_ID, padding is nothing else."""
    return int((batch["input_ids"] != PAD_ID).sum())


# ---------------------------------------------------------------------------------------------------
# models


def layout_layer_class(layout: str = "bshd", mask: str = "padding_causal"):
    """Our TE decoder layer's constructor with the attention layout (`bshd`, `sbhd`) and mask switched.

    `TELlamaDecoderLayer.__init__` passes every argument of `te.TransformerLayer` by keyword. This class
    sits between the two in the MRO and changes only the layout and mask. So everything else (norm,
    SwiGLU, GQA, unfused Q/K/V, no bias, no dropout) is built exactly as in our model. Its forward takes
    the hidden states in that layout, TE's angle table and, for padding masks, TE's (B, 1, 1, S) bool
    mask (True = masked out).
    """
    import transformer_engine.pytorch as te

    class Layout(te.TransformerLayer):
        def __init__(self, **kwargs):
            super().__init__(**{**kwargs, "attn_input_format": layout, "self_attn_mask_type": mask})

    class LayoutLayer(te_model.TELlamaDecoderLayer, Layout):
        def forward(self, x, angles, padding=None):
            return te.TransformerLayer.forward(self, x, attention_mask=padding, rotary_pos_emb=angles)

    return LayoutLayer


def build_mode(mode: str, config, state, dtype, device, backend: str):
    """Our model with the reference weights; for padded on TE, its layers swapped for BSHD twins."""
    model = te_model.build_model(config, backend=backend, dtype=dtype, device=device)
    common.load_hf_state(model, state)
    if mode == "padded" and backend == "te":
        layer_cls = layout_layer_class("bshd", "padding_causal")
        with torch.device(device), common.default_dtype(dtype):
            for i, layer in enumerate(model.model.layers):
                twin = layer_cls(config, i)
                twin.load_state_dict(layer.state_dict(), strict=True)
                model.model.layers[i] = twin
    return model.train()


def padded_bshd_loss(model, batch: dict) -> torch.Tensor:
    """Our model's embedding, BSHD layers, final norm, lm_head and loss over padded rows."""
    ids = batch["input_ids"]
    padding = (batch["attention_mask"] == 0)[:, None, None, :]
    angles = angles_table(model.model.rotary_emb.inv_freq, ids.shape[1])
    h = model.model.embed_tokens(ids)
    for layer in model.model.layers:
        h = layer(h, angles, padding)
    logits = model.lm_head(model.model.norm(h))
    return model.loss_function(logits=logits, labels=batch["labels"], vocab_size=model.config.vocab_size)


def step_loss(model, mode: str, backend: str, batch: dict) -> torch.Tensor:
    if mode == "padded" and backend == "te":
        return padded_bshd_loss(model, batch)
    return model(**batch).loss  # packed: position ids → THD segments; torch backend: SDPA padding mask


def run_mode(mode: str, batches: list[dict], args, config, state, device, backend: str) -> dict:
    """Warm up on the first batches, then time one full pass over all of them."""
    recipe = None if args.fp8 == "none" else args.fp8
    common.reset_peak(device)
    model = build_mode(mode, config, state, common.DTYPES[args.dtype], device, backend)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, fused=True)
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    timer, losses = common.StepTimer(device), []
    for i, batch in enumerate(batches[:args.warmup] + batches):
        if i == args.warmup:
            timer.mark()
        with te_model.fp8_autocast(recipe):
            loss = step_loss(model, mode, backend, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        if i >= args.warmup:
            timer.mark()
    step_ms = timer.step_ms()
    useful = sum(useful_tokens(b) for b in batches)
    slots = sum(b["input_ids"].numel() for b in batches)
    seconds = sum(step_ms) / 1e3
    del model, optimizer
    return {"steps": len(batches), "useful_tokens": useful, "slot_tokens": slots,
            "padding_fraction": 1 - useful / slots, "time_s": seconds, "useful_tokens_per_s": useful / seconds,
            "step_ms_median": statistics.median(step_ms), "peak_mem_gib": common.peak_gib(device),
            "loss_first": float(losses[0]), "loss_last": float(losses[-1])}


# ---------------------------------------------------------------------------------------------------
# report


def mode_label(mode: str, backend: str) -> str:
    if mode == "packed":
        return "packed rows, THD + cu_seqlens" if backend == "te" else "packed rows, torch backend (no TE)"
    return "padded rows, TE BSHD padding_causal" if backend == "te" else "padded rows, torch backend SDPA mask"


def measure(args, device) -> dict:
    backend, reason = common.ours_backend(device)
    if args.fp8 != "none" and backend != "te":
        raise SystemExit(f"--fp8 {args.fp8} needs Transformer Engine on CUDA: {reason}")
    config = common.llama_config(args.shape, args.layers)
    docs = make_documents(args, config.vocab_size)
    state = common.reference_state(config, common.DTYPES[args.dtype], device, args.seed)
    modes = []
    for mode, batches in (("packed", packed_batches(docs, args)), ("padded", padded_batches(docs, args))):
        row = {"mode": mode, "label": mode_label(mode, backend)}
        row.update(run_mode(mode, batches, args, config, state, device, backend))
        common.free_memory()
        modes.append(row)
    lengths = [len(ids) for ids, _ in docs]
    run = {"shape": args.shape, "layers": config.num_hidden_layers, "seq": args.seq, "batch": args.batch,
           "token_budget": args.batch * args.seq, "fp8": args.fp8, "dtype": args.dtype, "backend": backend,
           "backend_reason": reason, "documents": len(docs), "document_tokens": sum(lengths),
           "length_median": statistics.median(lengths), "length_max": max(lengths)}
    ratio = modes[0]["useful_tokens_per_s"] / modes[1]["useful_tokens_per_s"]
    return {"environment": common.environment(device), "run": run, "modes": modes, "packed_over_padded": ratio}


def print_table(result: dict) -> None:
    run = result["run"]
    print(f"\n{result['environment']['device']}, {run['shape']} ({run['layers']} layers), seq {run['seq']}, "
          f"{run['documents']} documents (median {run['length_median']:.0f} tokens), token budget "
          f"{run['token_budget']} a step, fp8 {run['fp8']}")
    print(f"{'mode':40s} {'steps':>5s} {'pad %':>6s} {'useful tok/s':>12s} {'ms/step':>8s} {'GiB':>6s}")
    for m in result["modes"]:
        print(f"{m['label']:40s} {m['steps']:5d} {m['padding_fraction']:6.1%} {m['useful_tokens_per_s']:12.0f} "
              f"{m['step_ms_median']:8.1f} {common.fmt(m['peak_mem_gib'], '6.1f')}")
    print(f"packed / padded useful tokens/s: {result['packed_over_padded']:.2f}x")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = common.setup_device(args.device)
    result = measure(args, device)
    common.write_json(args.out, result)
    print_table(result)
    return result


if __name__ == "__main__":
    main()
