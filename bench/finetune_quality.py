"""Fine-tuning quality on real text: does a bf16 fine-tune get where fp32 master weights get?

At fine-tuning learning rates most AdamW updates are below half a bf16 step, so a model whose
parameters are its only copy loses them (`train.master_weights`). This pretrains a byte-level Llama on
one local corpus, fine-tunes it on another, and compares HF's fp32-master training with ours under
each option, in bf16 and FP8. `--vocab` swaps the bytes for a byte-level BPE and a Llama-sized head,
where the FP8 head's rounding reaches 128k logits a token. Needs CUDA and TE; `--smoke` checks it end
to end on CPU. Corpora and variants: `main`; results: docs/performance.md.

    python bench/finetune_quality.py
    python bench/finetune_quality.py --vocab 128256 --variants hf_fp32_master,fp8_delayed_bf16_kahan,fp8_delayed_bf16_kahan_fp8head
    python bench/finetune_quality.py --smoke --device cpu
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import sysconfig
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import te_model  # noqa: E402
from te_model.fp8_head import ALIGN as FP8_ALIGN  # noqa: E402
from bench import common  # noqa: E402
from pipeline.train import optim  # noqa: E402
from pipeline.config import TrainConfig  # noqa: E402
from transformers import LlamaConfig  # noqa: E402

DEFAULT_MASTER = TrainConfig().master_weights
BYTES = 256  # the vocabulary without --vocab
SHAPES = {  # hidden, intermediate, layers, heads, kv heads (base, small: every matrix takes FP8 moments)
    "base": (1024, 2816, 12, 16, 4),
    "small": (256, 768, 4, 4, 2),  # a CPU-sized base
    "smoke": (64, 128, 2, 4, 2),
}


def variants() -> dict[str, tuple[str, str | None, str, bool, bool]]:
    """name: (model kind, FP8 recipe, master_weights option, FP8 head, FP8 moments)."""
    table = {"hf_fp32_master": ("hf", None, "fp32", False, False)}
    table |= {f"ours_bf16_{m}": ("ours", None, m, False, False) for m in optim.MASTER_WEIGHTS}
    table |= {f"fp8_delayed_{m}": ("ours", "delayed", m, False, False) for m in optim.MASTER_WEIGHTS}
    table[f"fp8_current_{DEFAULT_MASTER}"] = ("ours", "current", DEFAULT_MASTER, False, False)
    for master in dict.fromkeys((DEFAULT_MASTER, "bf16_kahan8")):
        table[f"fp8_delayed_{master}_fp8head"] = ("ours", "delayed", master, True, False)
    # the gradients' FP8 GEMMs with fast accumulation (`te_model.fp8.make_recipe`'s `fast_accumulation`)
    table[f"fp8_delayed_{DEFAULT_MASTER}_fp8head_fastacc"] = ("ours", "delayed", DEFAULT_MASTER, True, False)
    # ... and the FP8 head's logits and weight-gradient GEMMs too (`fp8_head_fast_accumulation`)
    table[f"fp8_delayed_{DEFAULT_MASTER}_fp8head_fastacc_headfast"] = ("ours", "delayed", DEFAULT_MASTER, True, False)
    for master in dict.fromkeys((DEFAULT_MASTER, "bf16_kahan8")):  # the default, and the leanest that keeps updates
        table[f"ours_bf16_{master}_moments_fp8"] = ("ours", None, master, False, True)
        table[f"fp8_delayed_{master}_fp8head_moments_fp8"] = ("ours", "delayed", master, True, True)
    # the numerics of the leanest row (casting the FP8 weights again in backward changes no value)
    table["fp8_delayed_bf16_kahan8_fp8head_moments_fp8_fastacc"] = ("ours", "delayed", "bf16_kahan8", True, True)
    return table


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny model, few steps, torch backend, no FP8")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--pretrain-steps", type=int, help="base pretraining steps (default 900; smoke 20)")
    p.add_argument("--pretrain-lr", type=float, default=1e-3)
    p.add_argument("--finetune-steps", type=int, help="steps per fine-tune (default 300; smoke 6)")
    p.add_argument("--lrs", default="1e-5,2e-5", help="fine-tuning learning rates, comma-separated")
    p.add_argument("--variants", help=f"comma-separated of {', '.join(variants())} (default: all; smoke: no FP8)")
    p.add_argument("--seq", type=int, help="tokens per row (default 1024; smoke 64)")
    p.add_argument("--batch", type=int, help="rows per step (default 32 pretraining, 16 fine-tuning; smoke 4)")
    p.add_argument("--max-mb", type=float, help="MB read from each corpus (default 64; smoke 1)")
    p.add_argument("--eval-rows", type=int, help="held-out rows scored (default 64; smoke 4)")
    p.add_argument("--vocab", type=int, default=BYTES,
                   help="model vocabulary: 256 = bytes (default); more = a byte-level BPE learnt on corpus A with at "
                        "most this many tokens, the rest of the head never a target (Llama 3: 128256)")
    p.add_argument("--shape", choices=[s for s in SHAPES if s != "smoke"], default="base",
                   help="the model: base (136M with bytes; the GPU's) or small (a CPU-sized one)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.vocab < BYTES or (args.vocab > BYTES and args.vocab % FP8_ALIGN):
        p.error(f"--vocab {args.vocab}: must be 256 (bytes) or a larger multiple of {FP8_ALIGN} (the FP8 head's GEMMs "
                "need it)")
    smoke = args.smoke
    for name, full, tiny in (("pretrain_steps", 900, 20), ("finetune_steps", 300, 6), ("seq", 1024, 64),
                             ("batch", None, 4), ("max_mb", 64.0, 1.0), ("eval_rows", 64, 4)):
        if getattr(args, name) is None:
            setattr(args, name, tiny if smoke else full)
    if args.variants is None:
        args.variants = ",".join(n for n, v in variants().items() if not (smoke and v[1]))
    unknown = sorted(set(args.variants.split(",")) - set(variants()))
    if unknown:
        p.error(f"--variants: unknown {', '.join(unknown)}")
    return args


# ---------------------------------------------------------------------------------------------------
# corpora
# ---------------------------------------------------------------------------------------------------
def corpus_files(which: str) -> list[Path]:
    """A: the standard library's .py sources (no site-packages); B: C headers of Python and /usr/include."""
    if which == "A":
        root = Path(sysconfig.get_paths()["stdlib"])
        return sorted(f for f in root.rglob("*.py") if "site-packages" not in f.parts)
    roots = [Path(sysconfig.get_paths()["include"]), Path("/usr/include")]
    return sorted({f for root in roots if root.is_dir() for f in root.rglob("*.h") if f.is_file()})


def read_corpus(which: str, max_bytes: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(train bytes, held-out bytes, a description): every 20th file is held out; files are read in a
    fixed order up to `max_bytes`."""
    files, parts, held, size = corpus_files(which), [], [], 0
    for index, path in enumerate(files):
        try:
            data = path.read_bytes()
        except OSError:
            continue
        (held if index % 20 == 19 else parts).append(data)
        size += len(data)
        if size >= max_bytes:
            break
    if not parts or not held:
        raise SystemExit(f"corpus {which}: too few readable files ({len(files)} found)")
    as_tensor = lambda chunks: torch.frombuffer(bytearray(b"\n\n".join(chunks)), dtype=torch.uint8).long()
    described = f"corpus {which}: {len(parts) + len(held)} files of {len(files)}, {size / 1e6:.1f} MB"
    return as_tensor(parts), as_tensor(held), described


def bpe_ids(vocab: int, *streams: torch.Tensor) -> tuple[list[torch.Tensor], int]:
    """Each byte stream as the ids of a byte-level BPE (Llama 3's kind of tokenizer) learnt on the first
    stream with at most `vocab` tokens; and how many tokens it learnt (a small corpus learns fewer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    def pieces(stream: torch.Tensor, size: int = 1 << 20) -> list[str]:
        text = bytes(stream.to(torch.uint8).numpy()).decode("utf-8", errors="replace")
        return [text[i:i + size] for i in range(0, len(text), size)]

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(pieces(streams[0]), trainer=trainer)
    encoded = [[i for e in tokenizer.encode_batch(pieces(s)) for i in e.ids] for s in streams]
    return [torch.tensor(ids, dtype=torch.long) for ids in encoded], tokenizer.get_vocab_size()


def windows(tokens: torch.Tensor, count: int, batch: int, seq: int, seed: int) -> list[torch.Tensor]:
    """`count` batches of `batch` random windows of `seq` tokens, the same for every variant."""
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(tokens) - seq, (count, batch), generator=gen)
    return [tokens[s[:, None] + torch.arange(seq)] for s in starts]


# ---------------------------------------------------------------------------------------------------
# models and steps
# ---------------------------------------------------------------------------------------------------
def llama_config(shape: str, vocab: int = BYTES) -> LlamaConfig:
    hidden, intermediate, layers, heads, kv_heads = SHAPES[shape]
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       tie_word_embeddings=False, max_position_embeddings=4096, rms_norm_eps=1e-5,
                       use_cache=False, attn_implementation="sdpa",
                       rope_parameters={"rope_type": "default", "rope_theta": 1e4})


def build(kind: str, config, state: dict, device, backend: str, fp8_head: bool = False,
          head_fast: bool = False) -> torch.nn.Module:
    """HF with fp32 parameters (autocast does the bf16), or ours with bf16 parameters; the base weights."""
    if kind == "hf":
        model = common.build_hf(config, torch.float32, device)
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    else:
        model = te_model.build_model(config, backend=backend, dtype=torch.bfloat16, device=device)
        common.load_hf_state(model, state)
        model.fp8_head = fp8_head
        model.fp8_head_fast_accumulation = head_fast
    return model.train()


def loss_of(kind: str, model, ids: torch.Tensor, device, recipe: str | None = None, fast: bool = False) -> torch.Tensor:
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=kind == "hf"), \
            te_model.fp8_autocast(recipe, fast_accumulation=fast):
        return model(**common.step_inputs(kind, ids, device)).loss


@torch.no_grad()
def held_out_loss(kind: str, model, rows: list[torch.Tensor], device) -> float:
    """Mean loss over the held-out rows, in bf16 for every variant (no FP8), so the weights are compared."""
    model.eval()
    losses = [float(loss_of(kind, model, ids, device)) for ids in rows]
    model.train()
    return statistics.fmean(losses)


def schedule(optimizer, steps: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pretrain(args, config, device, train_a, held_a) -> dict:
    """The base: stock HF Llama in bf16 with fp32 master weights in our AdamW; its state dict on the host."""
    torch.manual_seed(args.seed)
    model = common.build_hf(config, torch.bfloat16, device).train()
    optimizer = optim.AdamW(model.parameters(), lr=args.pretrain_lr, betas=(0.9, 0.95), weight_decay=0.1,
                            master_weights="fp32")
    scheduler = schedule(optimizer, args.pretrain_steps, max(1, args.pretrain_steps // 20))
    batches = windows(train_a, args.pretrain_steps, args.batch or 32, args.seq, args.seed)
    held = windows(held_a, args.eval_rows // 8 or 1, 8, args.seq, args.seed + 1)
    every = max(1, args.pretrain_steps // 10)
    for step, ids in enumerate(batches, 1):
        model(**common.step_inputs("hf", ids, device)).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % every == 0 or step == args.pretrain_steps:
            print(f"  pretrain step {step:5d}: held-out loss on A {held_out_loss('hf', model, held, device):.4f}",
                  flush=True)
    state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    del model, optimizer
    common.free_memory()
    return state


def relative_movement(model, start: list[torch.Tensor]) -> float:
    moved = sum(float((p.detach().double() - s.double()).square().sum()) for p, s in zip(model.parameters(), start))
    size = sum(float(s.double().square().sum()) for s in start)
    return math.sqrt(moved / size)


def finetune(name: str, lr: float, args, config, state, device, backend, batches, held) -> dict:
    kind, recipe, master, fp8_head, moments_fp8 = variants()[name]
    model = build(kind, config, state, device, backend, fp8_head, "_headfast" in name)
    start = [p.detach().clone() for p in model.parameters()]
    if kind == "hf":
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0,
                                      fused=device.type == "cuda")
    else:
        optimizer = optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0, master_weights=master,
                                moments_fp8=moments_fp8)
    scheduler = schedule(optimizer, len(batches), max(1, len(batches) // 30))
    warm = min(5, len(batches) - 1)
    for step, ids in enumerate(batches):
        if step == warm:
            sync(device)
            started = time.perf_counter()
        loss_of(kind, model, ids, device, recipe, "_fastacc" in name).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    sync(device)
    step_ms = (time.perf_counter() - started) * 1e3 / (len(batches) - warm)
    row = {"variant": name, "lr": lr, "held_out_loss": held_out_loss(kind, model, held, device),
           "movement": relative_movement(model, start), "step_ms": step_ms}
    del model, optimizer, start
    common.free_memory()
    return row


def skip_reason(name: str, backend: str) -> str | None:
    recipe = variants()[name][1]
    if recipe is None:
        return None
    if backend != "te":
        return "FP8 needs Transformer Engine on a GPU"
    try:
        te_model.fp8.make_recipe(recipe, fast_accumulation="_fastacc" in name)
    except te_model.FP8UnsupportedError as exc:
        return str(exc)
    return None


def print_table(rows: list[dict], base_loss: float) -> None:
    print(f"\nheld-out loss on B of the base, before fine-tuning: {base_loss:.4f}")
    print(f"{'variant':34s} {'lr':>8s} {'held-out loss':>13s} {'vs ref %':>9s} {'movement':>10s} {'step ms':>8s}")
    reference = {r["lr"]: r["held_out_loss"] for r in rows if r["variant"] == "hf_fp32_master"}
    for r in rows:
        if "skipped" in r:
            print(f"{r['variant']:34s} {r['lr']:8.0e} skipped: {r['skipped']}")
            continue
        ref = reference.get(r["lr"])
        delta = f"{100 * (r['held_out_loss'] - ref) / ref:+9.2f}" if ref else f"{'-':>9s}"
        print(f"{r['variant']:34s} {r['lr']:8.0e} {r['held_out_loss']:13.4f} {delta} {r['movement']:10.2e} "
              f"{r['step_ms']:8.1f}")


def main(argv: list[str] | None = None) -> list[dict]:
    """Pretrain the base, fine-tune every variant from it, print the table; the rows.

    1. Base: a byte-level Llama pretrained on corpus A, the Python standard library's `.py` sources of
       this machine (without site-packages), bf16 with fp32 master weights, for a fixed step budget. The
       held-out curve's last points are printed, so one can see it flatten. With `--vocab`, a byte-level
       BPE learnt on A's training files tokenizes both corpora, and the model's head has `--vocab` rows.
    2. Fine-tunes on corpus B, another distribution: the C headers of Python's include folder and
       `/usr/include` (what is found is reported), at each `--lrs` for `--finetune-steps` steps.
    3. Variants, all from the same base weights, on the same batches. `hf_fp32_master`: stock HF
       `LlamaForCausalLM` with fp32 parameters under bf16 autocast and torch's AdamW, the reference (what
       HF Trainer does). Ours in bf16 with each `master_weights` option (`bf16` is the behaviour without
       master weights), and under FP8 delayed scaling with each. FP8 current scaling and FP8 delayed with
       the FP8 LM head, both with the default option. `_moments_fp8`: AdamW's moments kept in FP8
       (`train.moments_fp8`). `_fastacc`: the gradients' FP8 GEMMs with fast accumulation; `_headfast`: the
       FP8 head's logits and weight-gradient GEMMs too.

    Printed: variant, lr, held-out loss on B, its difference from the reference in percent, the weights'
    relative movement |w - w_base| / |w_base|, and the step time. Without TE the FP8 variants are
    skipped, with the reason.
    """
    args = parse_args(argv)
    device = common.setup_device(args.device)
    backend, why = common.ours_backend(device)
    clock = time.perf_counter()
    phase = lambda what: print(f"[{time.perf_counter() - clock:7.1f} s] {what}", flush=True)
    train_a, held_a, about_a = read_corpus("A", int(args.max_mb * 1e6))
    train_b, held_b, about_b = read_corpus("B", int(args.max_mb * 1e6))
    phase(f"{about_a}; {about_b}; our model: {backend} backend" + (f" ({why})" if why else ""))
    if args.vocab > BYTES:
        (train_a, held_a, train_b, held_b), learnt = bpe_ids(args.vocab, train_a, held_a, train_b, held_b)
        phase(f"byte-level BPE learnt on A: {learnt} tokens of a {args.vocab}-token head; "
              f"{len(train_a) / 1e6:.2f}M tokens of A, {len(train_b) / 1e6:.2f}M of B")
    config = llama_config("smoke" if args.smoke else args.shape, args.vocab)
    state = pretrain(args, config, device, train_a, held_a)
    params = sum(t.numel() for t in state.values())
    phase(f"pretrained the base ({params / 1e6:.0f}M parameters, {args.pretrain_steps} steps)")
    batches = windows(train_b, args.finetune_steps, args.batch or 16, args.seq, args.seed + 2)
    held = windows(held_b, args.eval_rows // 8 or 1, 8, args.seq, args.seed + 3)
    base = build("hf", config, state, device, backend)
    base_loss = held_out_loss("hf", base, held, device)
    del base
    rows = []
    for lr in (float(x) for x in args.lrs.split(",")):
        for name in args.variants.split(","):
            reason = skip_reason(name, backend)
            if reason:
                rows.append({"variant": name, "lr": lr, "skipped": reason})
                continue
            rows.append(finetune(name, lr, args, config, state, device, backend, batches, held))
            phase(f"fine-tuned {name} at lr {lr:g}: held-out loss {rows[-1]['held_out_loss']:.4f}")
    print_table(rows, base_loss)
    return rows


if __name__ == "__main__":
    main()
