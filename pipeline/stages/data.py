"""Data preparation: raw documents in, packed token rows (parquet) out, cached by content hash.

Training wants fixed-length rows of `input_ids`, `labels` and `position_ids`, so that no compute is
wasted on padding and no document attends to another (te_model's packed-row convention). This stage
turns text, instruction or chat records into such rows once. It stores them under
`{run.output_uri}/data/{hash}/`, so every later run with the same inputs reuses them. Reading the
inputs and turning records into documents is `pipeline.stages.sources`; the rules are on `prepare`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import random
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from pipeline import progress, storage
from pipeline.config import Config, DataConfig, built_base, load_config
from pipeline.errors import PipelineError
from pipeline.job.resolved import storage_options
from pipeline.storage.manifest import MANIFEST_NAME
from pipeline.stages.sources import (  # noqa: F401 - the prompt and its formatter are re-exported
    INSTRUCTION_PROMPT,
    INSTRUCTION_PROMPT_WITH_INPUT,
    Source,
    documents,
    format_instruction_prompt,
    read_source,
)

log = logging.getLogger(__name__)

# Bump whenever tokenization or packing output changes, so older caches stop matching.
FORMAT_VERSION = 1
IGNORE_INDEX = -100
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json")
# Settings that do not change the prepared rows: leaving them out lets e.g. num_proc change and still hit.
_NOT_HASHED = ("train_files", "validation_files", "num_proc")


@dataclass(frozen=True)
class PreparedData:
    """Where the packed rows are and what went into them."""

    uri: str  # folder holding train.parquet, val.parquet (if any), stats.json
    train_uri: str
    val_uri: str | None  # None when no document was held out
    stats: dict[str, Any]

    @property
    def cache_hit(self) -> bool:
        return bool(self.stats.get("cache_hit"))


def load_tokenizer(tokenizer_dir: str, data: DataConfig) -> PreTrainedTokenizerBase:
    """The tokenizer in a local folder, with `data.chat_template` applied when configured."""
    for name in TOKENIZER_FILES:  # transformers' own JSON errors do not say which file
        path = Path(tokenizer_dir) / name
        if name.endswith(".json") and path.is_file():
            _json_file(path.read_bytes(), str(path), "the tokenizer files at model.base_uri are damaged: "
                                                     "publish the checkpoint again")
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PipelineError(f"cannot load tokenizer from {tokenizer_dir}: {reason}; model.base_uri must hold "
                            "the checkpoint's tokenizer files") from None
    if data.chat_template:
        tokenizer.chat_template = data.chat_template
    return tokenizer


def _json_file(data: bytes, where: str, fix: str) -> Any:
    try:
        return json.loads(data)
    except ValueError as exc:
        raise PipelineError(f"{where}: invalid JSON ({exc}); {fix}") from None


def pad_token(tokenizer: PreTrainedTokenizerBase) -> tuple[int, str]:
    """(pad id, "pad_token" | "eos_token"): the tokenizer's pad, else its EOS (Llama 3 has no pad)."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id, "pad_token"
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id, "eos_token"
    raise PipelineError("tokenizer has neither a pad nor an eos token: cannot pad packed rows")


def _tokenizer_blobs(tokenizer_dir: str) -> dict[str, bytes]:
    paths = [Path(tokenizer_dir) / name for name in TOKENIZER_FILES]
    found = {path.name: path.read_bytes() for path in paths if path.is_file()}
    if not found:
        raise PipelineError(f"no tokenizer files (tokenizer.json, tokenizer_config.json) in {tokenizer_dir}; "
                            "put the tokenizer beside the weights at model.base_uri")
    return found


def data_hash(cfg: Config, sources: dict[str, list[Source]], tokenizer_blobs: dict[str, bytes]) -> str:
    """Content hash of everything that determines the prepared rows (see module docstring)."""
    settings = {k: v for k, v in dataclasses.asdict(cfg.data).items() if k not in _NOT_HASHED}
    digest = hashlib.sha256(json.dumps({"format_version": FORMAT_VERSION, "seed": cfg.run.seed, **settings},
                                       sort_keys=True).encode())
    for role, role_sources in sources.items():
        for source in role_sources:
            for name, blob in source.blobs.items():
                digest.update(f"\0{role}\0{source.kind}\0{name}\0".encode() + hashlib.sha256(blob).digest())
    for name, blob in sorted(tokenizer_blobs.items()):
        digest.update(f"\0tokenizer\0{name}\0".encode() + hashlib.sha256(blob).digest())
    return digest.hexdigest()


def _chat_pieces(tokenizer: PreTrainedTokenizerBase, messages: list[dict],
                 where: str) -> list[tuple[str, bool]]:
    """The rendered conversation as consecutive (text, trained) pieces; assistant turns are trained."""
    def render(msgs: list[dict], generation_prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(
                msgs, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as exc:  # jinja raises its own types, including template-defined errors
            raise PipelineError(f"{where}: chat template failed ({type(exc).__name__}: {exc}); fix the record "
                                "or data.chat_template") from None

    full, pieces, cursor = render(messages, False), [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start, end = render(messages[:i], True), render(messages[: i + 1], False)
        if not (full.startswith(end) and end.startswith(start) and len(start) >= cursor):
            raise PipelineError(f"{where}: chat template does not render message {i} as an extension of the "
                                "conversation before it, so assistant tokens cannot be located")
        pieces += [(full[cursor:len(start)], False), (full[len(start):len(end)], True)]
        cursor = len(end)
    return [(text, trained) for text, trained in pieces + [(full[cursor:], False)] if text]


def _pieces(doc: dict[str, str], fmt: str, tokenizer: PreTrainedTokenizerBase) -> list[tuple[str, bool]]:
    if fmt == "text":
        return [(doc["text"], True)] if doc["text"].strip() else []
    if fmt == "instruction":
        return [(doc["prompt"], False), (doc["response"], True)] if doc["response"].strip() else []
    return _chat_pieces(tokenizer, json.loads(doc["messages"]), doc["where"])


def _tokenize_batch(batch: dict[str, list], *, tokenizer: PreTrainedTokenizerBase,
                    data: DataConfig) -> dict[str, list]:
    """Tokens, labels and truncation flag per document (`datasets.map`, batched)."""
    out: dict[str, list] = {"input_ids": [], "labels": [], "truncated": []}
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    for row in range(len(next(iter(batch.values())))):
        doc = {key: values[row] for key, values in batch.items()}
        ids, labels = [], []
        for text, trained in _pieces(doc, data.format, tokenizer):
            piece = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += piece
            labels += piece if trained else [IGNORE_INDEX] * len(piece)
        if ids and data.add_bos and ids[0] != bos:
            ids, labels = [bos] + ids, [IGNORE_INDEX] + labels
        if ids and data.add_eos and ids[-1] != eos:
            ids, labels = ids + [eos], labels + [eos]
        if ids:
            labels[0] = IGNORE_INDEX  # nothing in this document predicts its first token
        out["truncated"].append(len(ids) > data.seq_len)
        out["input_ids"].append(ids[: data.seq_len])
        out["labels"].append(labels[: data.seq_len])
    return out


def _check_tokenizer(tokenizer: PreTrainedTokenizerBase, data: DataConfig) -> None:
    if data.add_bos and tokenizer.bos_token_id is None:
        raise PipelineError("data.add_bos is true but the tokenizer has no bos token; set data.add_bos=false")
    if data.add_eos and tokenizer.eos_token_id is None:
        raise PipelineError("data.add_eos is true but the tokenizer has no eos token; set data.add_eos=false")
    if data.format == "chat" and not tokenizer.chat_template:
        raise PipelineError(
            "data.format is chat but the tokenizer has no chat template; set data.chat_template")


@contextlib.contextmanager
def _no_progress_bars():
    """A job's stderr carries its errors only; the data stage reports its counts in one summary line."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _worker_processes(data: DataConfig, documents: int) -> int | None:
    """`data.num_proc` for `datasets.map`, or None (this process) for one document or one process.

    Also None in a process connected to Ray: `datasets` forks its workers, and a fork of a process whose
    Ray client threads are running left that client hung on its next call to the cluster. The job
    prepares data before it connects to Ray, so this only applies where a process does both in the
    other order (the test suite, notebooks). The rows do not depend on `num_proc`.
    """
    if data.num_proc <= 1 or documents <= 1:
        return None
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        log.info("tokenizing in this process, not %d forked ones: it is connected to Ray", data.num_proc)
        return None
    return data.num_proc


def tokenize_documents(docs: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase, data: DataConfig,
                       split: str) -> tuple[list[tuple[list[int], list[int]]], dict[str, int]]:
    """(input_ids, labels) of the kept documents, and counts of truncated and dropped ones."""
    if not docs:
        return [], {"truncated": 0, "dropped_empty": 0, "dropped_untrained": 0}
    import datasets  # not at module level: training workers import this module and never tokenize

    dataset = datasets.Dataset.from_list(docs)
    with _no_progress_bars():
        tokenized = dataset.map(
            _tokenize_batch, batched=True, batch_size=256, remove_columns=dataset.column_names,
            fn_kwargs={"tokenizer": tokenizer, "data": data}, desc=f"tokenize {split}",
            num_proc=_worker_processes(data, len(docs)))
    columns = tokenized.data.to_pydict()
    kept, counts = [], {"truncated": sum(columns["truncated"]), "dropped_empty": 0, "dropped_untrained": 0}
    for ids, labels in zip(columns["input_ids"], columns["labels"]):
        if not ids:
            counts["dropped_empty"] += 1
        elif all(label == IGNORE_INDEX for label in labels):
            counts["dropped_untrained"] += 1
        else:
            kept.append((ids, labels))
    return kept, counts


def pack_documents(docs: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int,
                   seed: int) -> dict[str, list]:
    """Best-fit-decreasing packing into rows of exactly `seq_len`; columns input_ids/labels/position_ids."""
    rows: list[list[int]] = []
    rows_with_space: list[list[int]] = [[] for _ in range(seq_len + 1)]  # free tokens -> row indices
    row_count_by_space = np.zeros(seq_len + 1, dtype=np.int64)
    for index in sorted(range(len(docs)), key=lambda i: -len(docs[i][0])):
        length = len(docs[index][0])
        fitting = np.flatnonzero(row_count_by_space[length:])
        if fitting.size:
            space = length + int(fitting[0])
            row = rows_with_space[space].pop()
            row_count_by_space[space] -= 1
        else:
            space, row = seq_len, len(rows)
            rows.append([])
        rows[row].append(index)
        rows_with_space[space - length].append(row)
        row_count_by_space[space - length] += 1
    random.Random(seed).shuffle(rows)
    return _row_columns(rows, docs, seq_len, pad_id)


def _row_columns(rows: list[list[int]], docs: list, seq_len: int, pad_id: int) -> dict[str, list]:
    columns: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": []}
    for row in rows:
        ids = [t for i in row for t in docs[i][0]]
        labels = [t for i in row for t in docs[i][1]]
        positions = [p for i in row for p in range(len(docs[i][0]))]
        pad = seq_len - len(ids)
        columns["input_ids"].append(ids + [pad_id] * pad)
        columns["labels"].append(labels + [IGNORE_INDEX] * pad)
        columns["position_ids"].append(positions + list(range(pad)))  # padding is its own segment
    return columns


def _split_stats(docs: list, columns: dict[str, list], seq_len: int) -> dict[str, Any]:
    tokens = sum(len(ids) for ids, _ in docs)
    slots = len(columns["input_ids"]) * seq_len
    return {"documents": len(docs), "rows": len(columns["input_ids"]), "tokens": tokens,
            "trained_tokens": sum(sum(1 for t in labels if t != IGNORE_INDEX) for _, labels in docs),
            "padding_waste": round(1 - tokens / slots, 6) if slots else 0.0}


def write_parquet(columns: dict[str, list], path: Path) -> None:
    arrays = {name: pa.array(values, type=pa.list_(pa.int32())) for name, values in columns.items()}
    pq.write_table(pa.table(arrays), path)


def prepare(cfg: Config, tokenizer_dir: str, min_train_rows: int = 1,
            options: storage.StorageOptions | None = None) -> PreparedData:
    """Tokenize, pack and store the configured data under `{run.output_uri}/data/{hash}`, or reuse it.

    Fewer than `min_train_rows` packed training rows (training needs a micro-batch per worker) is an
    error raised before anything is stored.

    The rules, all recorded in stats.json:
    - Special tokens are added by these rules only, never by the tokenizer's post-processor. BOS goes
      before every document when `data.add_bos`, EOS after it when `data.add_eos`; neither is doubled
      when the text or chat template already has it.
    - Pad id: the tokenizer's pad token, or its EOS id if it has none (Llama 3). Pad positions are never
      trained, so reusing EOS is safe; `pad_token_source` says which was used.
    - Labels are aligned with input_ids (the model shifts them). -100 marks untrained tokens:
      instruction prompts, non-assistant chat text, padding, and the first token of every document,
      which nothing in its own document can predict.
    - A document longer than `data.seq_len` is truncated (its EOS is lost with the tail) and counted; a
      document is never split across rows. When every training document would be truncated, the
      settings are wrong, and preparation stops naming `data.seq_len`. Empty documents and documents
      left with no trained token are dropped and counted.
    - Packing is best-fit decreasing. Position ids restart at 0 for every document and for the trailing
      pad segment, so a position id of 0 marks each segment start. Rows are then shuffled with
      `run.seed`.
    - Chat: each assistant turn is found by rendering the conversation prefix with the generation
      prompt. Pieces are tokenized separately, exactly as a prompt and its reply are at inference time.
    - Cache key: sha256 over every input file's bytes, the tokenizer files' bytes, the data settings
      that change the output, `run.seed` and FORMAT_VERSION. File names and `data.num_proc` are not
      part of it.
    """
    options = options or storage_options(cfg)  # a job passes its own (`ResolvedJob.storage`)
    tokenizer_dir = _local_tokenizer_dir(tokenizer_dir, cfg, options)
    sources = read_inputs(cfg.data, options)
    read = sum(len(blob) for split in sources.values() for source in split for blob in source.blobs.values())
    progress.echo("data", f"read {sum(map(len, sources.values()))} input(s), {progress.megabytes(read)}")
    digest = data_hash(cfg, sources, _tokenizer_blobs(tokenizer_dir))
    folder = storage.join(cfg.run.output_uri, "data", digest[:16])
    stats = _cached_stats(folder, options)
    if stats is not None:
        progress.echo("data", f"same inputs and settings as {folder}: reusing it")
    else:
        tokenizer = load_tokenizer(tokenizer_dir, cfg.data)
        _check_tokenizer(tokenizer, cfg.data)
        with tempfile.TemporaryDirectory(prefix="prepared-data-") as local:
            stats = _build(cfg, tokenizer, _splits(cfg, sources), Path(local))
            _check_rows(stats, min_train_rows)
            stats["data_hash"] = digest
            (Path(local) / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
            storage.publish(local, folder, options)  # manifest last: its presence marks a complete folder
        stats["cache_hit"] = False
    _check_rows(stats, min_train_rows)
    val_uri = storage.join(folder, "val.parquet") if stats["validation"]["rows"] else None
    return PreparedData(folder, storage.join(folder, "train.parquet"), val_uri, stats)


def read_inputs(data: DataConfig, options: storage.StorageOptions) -> dict[str, list[Source]]:
    """Every train and validation input read into memory; a failure names its config key."""
    sources: dict[str, list[Source]] = {}
    for role, key in (("train", "train_files"), ("validation", "validation_files")):
        sources[role] = []
        for i, uri in enumerate(getattr(data, key) or []):
            try:
                sources[role].append(read_source(uri, options))
            except PipelineError as exc:
                raise PipelineError(f"data.{key}[{i}]: {exc}") from None
    return sources


def _check_rows(stats: dict[str, Any], min_train_rows: int) -> None:
    rows = stats["train"]["rows"]
    if rows < min_train_rows:
        raise PipelineError(
            f"the train split packs into {rows} rows, fewer than train.workers x train.micro_batch_size = "
            f"{min_train_rows}; add training data, or lower train.workers or train.micro_batch_size")


def _cached_stats(folder: str, options: storage.StorageOptions) -> dict[str, Any] | None:
    if not storage.exists(storage.join(folder, MANIFEST_NAME), options):
        return None
    where = storage.join(folder, "stats.json")
    stats = _json_file(storage.read_bytes(where, options), where,
                       f"the prepared data is damaged: delete {folder} and it is prepared again")
    return {**stats, "cache_hit": True}


def _splits(cfg: Config, sources: dict[str, list[Source]]) -> dict[str, list[dict[str, str]]]:
    """Validation documents come from validation_files, else `val_fraction` of the training documents
    (at least one when > 0) is held out, chosen by `run.seed`; both keep file order."""
    docs = documents(sources["train"], cfg.data)
    if cfg.data.validation_files:
        return {"train": docs, "validation": documents(sources["validation"], cfg.data)}
    n_val = round(len(docs) * cfg.data.val_fraction)
    if cfg.data.val_fraction > 0 and len(docs) >= 2:
        n_val = min(max(n_val, 1), len(docs) - 1)
    held_out = set(random.Random(cfg.run.seed).sample(range(len(docs)), n_val))
    return {"train": [d for i, d in enumerate(docs) if i not in held_out],
            "validation": [d for i, d in enumerate(docs) if i in held_out]}


def _build(cfg: Config, tokenizer: PreTrainedTokenizerBase, splits: dict[str, list],
           local: Path) -> dict[str, Any]:
    """Tokenize and pack each split into `local`/{train,val}.parquet; returns the stats."""
    data, (pad_id, pad_source) = cfg.data, pad_token(tokenizer)
    stats: dict[str, Any] = {
        "format_version": FORMAT_VERSION, "format": data.format, "seq_len": data.seq_len,
        "bos_token_id": tokenizer.bos_token_id if data.add_bos else None,
        "eos_token_id": tokenizer.eos_token_id if data.add_eos else None,
        "pad_token_id": pad_id, "pad_token_source": pad_source,
        "documents": sum(len(d) for d in splits.values()),
        "truncated": 0, "dropped_empty": 0, "dropped_untrained": 0,
    }
    for split, docs in splits.items():
        kept, counts = tokenize_documents(docs, tokenizer, data, split)
        if split == "train" and docs and counts["truncated"] == len(docs):
            raise PipelineError(f"every one of the {len(docs)} training documents ({', '.join(data.train_files)}) "
                                f"is longer than data.seq_len={data.seq_len} tokens; raise data.seq_len "
                                "or split the documents")
        for key, count in counts.items():
            stats[key] += count
        columns = pack_documents(kept, data.seq_len, pad_id, cfg.run.seed)
        stats[split] = _split_stats(kept, columns, data.seq_len)
        progress.echo("data", f"{split}: {len(docs):,} documents -> {stats[split]['tokens']:,} tokens in "
                              f"{stats[split]['rows']:,} rows of {data.seq_len}")
        if kept:
            write_parquet(columns, local / ("train.parquet" if split == "train" else "val.parquet"))
    if not stats["train"]["rows"]:
        raise PipelineError(f"no training document left after tokenization ({', '.join(data.train_files)}): "
                            "each was empty or had nothing to train on; check data.format against the records")
    stats["dropped"] = stats["dropped_empty"] + stats["dropped_untrained"]
    return stats


def _local_tokenizer_dir(uri: str, cfg: Config, options: storage.StorageOptions) -> str:
    """A local folder with the tokenizer at `uri`; remote tokenizer files are fetched into run.cache_dir."""
    fs, path = storage.filesystem(uri, options)
    if "file" in fs.protocol:
        return path
    target = Path(cfg.run.cache_dir) / "tokenizers" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    for name in storage.list_files(uri, options):
        if name in TOKENIZER_FILES or name == "config.json":
            storage.download_file(storage.join(uri, name), target / name, options)
    return str(target)


def main(argv: list[str] | None = None) -> int:
    """`python -m pipeline.stages.data [--config PRESET] [--tokenizer URI] [section.key=value ...]`."""
    parser = argparse.ArgumentParser(description="Prepare packed training data and print its stats.")
    parser.add_argument("--config", help="YAML preset (file or name in configs/); default: the tiny demo")
    parser.add_argument("--tokenizer", help="tokenizer folder or uri; default: model.base_uri")
    parser.add_argument("overrides", nargs="*", help="dotted overrides such as data.seq_len=256")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        tokenizer_uri = args.tokenizer or cfg.model.base_uri
        built = built_base(tokenizer_uri)
        if built:
            from pipeline.demo import ensure_built_base
            ensure_built_base(Path(tokenizer_uri).parent, built)
        with contextlib.redirect_stdout(sys.stderr):  # progress lines: stdout is the stats JSON alone
            prepared = prepare(cfg, tokenizer_uri)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"uri": prepared.uri, **prepared.stats}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
