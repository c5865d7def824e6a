"""Tiny but real Llama assets for the demo job and the tests: a BPE tokenizer and a sharded checkpoint.

No model hub is reachable from CI or a laptop, yet every stage must run end to end on real files. This
module builds them locally and deterministically from the text shipped in `data/`. The checkpoint is
a randomly initialised `LlamaForCausalLM` saved by `save_pretrained` as sharded safetensors, with the
tokenizer beside it: the folder layout of a Hugging Face Llama checkpoint.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from pipeline.config import PROJECT_ROOT
from pipeline.errors import PipelineError
from pipeline.progress import no_progress_bars
from pipeline.storage.manifest import write_manifest

SHIPPED_CORPUS = [str(PROJECT_ROOT / "data" / name)
                  for name in ("tiny_text.jsonl", "tiny_instruct.jsonl", "tiny_chat.jsonl")]
DEMO_MODEL_NAME = "tiny-llama"
# the shapes of the bases a config may name under `pipeline.config.DEMO_STORE` (`make_tiny_checkpoint`'s args)
BUILT_SHAPES = {
    DEMO_MODEL_NAME: {},
    "gpu-small-llama": dict(layers=8, hidden=2048, heads=16, kv_heads=8, intermediate=5632, max_shard_size="2GB"),
}
COMPLETE_MARKER = ".complete"
BOS, EOS, UNK = "<s>", "</s>", "<unk>"
HEADER_START, HEADER_END, END_OF_TURN = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"

# Llama 3's template, minus its date/tool preamble: BOS, then one header + content + <|eot_id|> per turn.
LLAMA3_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{{- message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
)


def corpus_texts(corpus_files: list[str]) -> list[str]:
    """The strings the model will see: `text`, formatted instruction prompts, chat message contents."""
    from pipeline.stages.data import format_instruction_prompt  # data imports config only; no cycle at import time

    texts = []
    for path in corpus_files:
        for line_no, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise PipelineError(f"{path}:{line_no}: invalid JSON ({exc.msg})") from None
            if record.get("text"):
                texts.append(record["text"])
            if record.get("instruction"):
                prompt = format_instruction_prompt(record["instruction"], record.get("input", ""))
                texts += [prompt, record["output"]]
            texts += [m["content"] for m in record.get("messages", [])]
    return texts


def make_tokenizer(out_dir: str | Path, corpus_files: list[str] | None = None,
                   vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `corpus_files` (default: shipped data); save it to `out_dir`.

    It is shaped like Llama 3's. Its post-processor adds BOS `<s>`; EOS is `</s>`. Chat turns use
    `<|start_header_id|>` / `<|end_header_id|>` / `<|eot_id|>`. It deliberately has NO pad token, so
    data preparation must choose one exactly as it must for real Llama 3 checkpoints.
    """
    specials = [UNK, BOS, EOS, HEADER_START, HEADER_END, END_OF_TURN]
    backend = Tokenizer(models.BPE(unk_token=UNK, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus_texts(corpus_files or SHIPPED_CORPUS), trainer=trainer)
    bos_id = backend.token_to_id(BOS)
    # Like Llama 3: plain `tokenizer(text)` prepends BOS; data prep opts out and adds it by its own rules.
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS, eos_token=EOS, unk_token=UNK,
        additional_special_tokens=[HEADER_START, HEADER_END, END_OF_TURN], model_max_length=2048,
        chat_template=LLAMA3_CHAT_TEMPLATE, clean_up_tokenization_spaces=False,
    )
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def make_tiny_checkpoint(
    out_dir: str | Path, *, layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
    intermediate: int = 128, rope_theta: float = 500000.0, tie_word_embeddings: bool = False,
    max_shard_size: str = "200KB", seed: int = 0, corpus_files: list[str] | None = None,
    vocab_size: int = 512,
) -> Path:
    """Save a randomly initialised Llama (sharded safetensors) and its tokenizer; same args, same bytes."""
    out = Path(out_dir)
    tokenizer = make_tokenizer(out, corpus_files, vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=2048,
        rope_theta=rope_theta, tie_word_embeddings=tie_word_embeddings, rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    # Chat replies end with <|eot_id|>, plain text with </s>: generation stops at either, as in Llama 3.
    end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, end_of_turn]
    model.generation_config.pad_token_id = None
    with no_progress_bars():
        model.save_pretrained(str(out), max_shard_size=max_shard_size)
    return out


def ensure_built_base(store_dir: str | Path, name: str = DEMO_MODEL_NAME) -> Path:
    """The base checkpoint `{store_dir}/{name}` of `BUILT_SHAPES`, built once (a complete marker skips
    rebuilds): the demo's tiny Llama by default."""
    target = Path(store_dir) / name
    if (target / COMPLETE_MARKER).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename, so a crash never leaves a half-written checkpoint behind.
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        make_tiny_checkpoint(staging, **BUILT_SHAPES[name])
        write_manifest(staging)
        (staging / COMPLETE_MARKER).write_text("ok\n")
        if target.exists() and not (target / COMPLETE_MARKER).exists():
            # staging is renamed only once marked, so an unmarked folder here is not ours: never delete it
            raise PipelineError(f"{target} exists but is not the base checkpoint this job builds there; "
                                "move it away")
        if not (target / COMPLETE_MARKER).exists():  # else a concurrent caller finished first: keep theirs
            staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def main(argv: list[str] | None = None) -> None:
    """`python -m pipeline.demo OUT_DIR [--layers N ...]`: build a random Llama checkpoint of any shape."""
    import argparse

    parser = argparse.ArgumentParser(description="Build a random Llama checkpoint with a tiny BPE tokenizer.")
    parser.add_argument("out_dir")
    shape = (("layers", 2), ("hidden", 64), ("heads", 4), ("kv-heads", 2), ("intermediate", 128), ("seed", 0))
    for name, default in shape:
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--max-shard-size", default="200KB")
    args = parser.parse_args(argv)
    out = make_tiny_checkpoint(args.out_dir, layers=args.layers, hidden=args.hidden, heads=args.heads,
                               kv_heads=args.kv_heads, intermediate=args.intermediate,
                               max_shard_size=args.max_shard_size, seed=args.seed)
    write_manifest(out)
    print(out)


if __name__ == "__main__":
    main()
