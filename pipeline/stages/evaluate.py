"""Evaluation: held-out loss and perplexity of the base and the fine-tuned model, and generated samples.

A fine-tune is judged against the model it started from, on documents it never trained on, and by
reading what it writes. Both models are scored on the same packed validation rows, by the code that
trained, in the same dtype and without FP8: the numbers compare weights, not kernels. Samples come
from the exported HF checkpoint, which is what users will load. `load_trained_model` is the one
reader of the train stage's checkpoints; export uses it too. `evaluate` has the rules.
"""

from __future__ import annotations

import io
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import te_model
from te_model.loss import causal_lm_loss
from pipeline import progress, storage
from pipeline.train.checkpoint import MODEL_FILE as CHECKPOINT_WEIGHTS, load_model_weights
from pipeline.config import Config
from pipeline.stages.data import IGNORE_INDEX, format_instruction_prompt
from pipeline.errors import PipelineError
from pipeline.job.resolved import storage_options
from te_model.weights import load_config

log = logging.getLogger(__name__)

ROW_COLUMNS = ("input_ids", "labels", "position_ids")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
PROMPT_FORMATS = ("text", "instruction", "chat")  # the values of data.format


def model_dtype(cfg: Config) -> torch.dtype:
    """The torch dtype of `model.dtype`."""
    return DTYPES[cfg.model.dtype]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def local_base(uri: str | Path, cfg: Config, options: storage.StorageOptions | None = None) -> Path:
    """A local directory holding the base model at `uri`: a folder on this machine as it is, anything
    else pulled (verified, once per node) into `run.cache_dir`."""
    local = storage.writable_local_path(str(uri))
    if local is None:
        return storage.pull_checkpoint(str(uri), cfg.run.cache_dir, options)
    if not local.is_dir():
        raise PipelineError(f"checkpoint directory not found: {uri}")
    return local


def trained_weights(uri: str | Path, cfg: Config, options: storage.StorageOptions | None = None) -> Path:
    """A local directory holding a training checkpoint's weights (not its optimizer state), verified
    against its manifest once per node: where it is on this machine, else pulled (`storage.checkpoint_dir`)."""
    return storage.checkpoint_dir(str(uri), cfg.run.cache_dir, options, only=[CHECKPOINT_WEIGHTS])


# ---------------------------------------------------------------------------------------------------
# loading a trained checkpoint


def load_trained_model(
    checkpoint_dir: str | Path,
    base_dir: str | Path,
    backend: str = "auto",
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device | None = None,
):
    """The TE-style model of the base checkpoint's config holding the training stage's weights.

    Strict: every parameter must be in `model.safetensors`, every tensor there must be a parameter, with
    the same shape; anything else is a PipelineError naming the tensors. Tensors are copied one at a time.
    """
    weights = Path(checkpoint_dir) / CHECKPOINT_WEIGHTS
    if not weights.is_file():
        raise PipelineError(f"{checkpoint_dir}: no {CHECKPOINT_WEIGHTS} (not a training checkpoint?)")
    model = te_model.build_model(load_config(base_dir), backend=backend, dtype=dtype, device=device)
    load_model_weights(model, weights)
    return model.eval()


# ---------------------------------------------------------------------------------------------------
# validation loss


def _read_rows(val_uri: str, options: storage.StorageOptions | None) -> pq.ParquetFile:
    data = storage.read_bytes(val_uri, options)
    try:
        rows = pq.ParquetFile(io.BytesIO(data))
    except Exception as exc:  # pyarrow raises its own ArrowInvalid for a corrupt file
        raise PipelineError(f"{val_uri}: not a parquet file ({type(exc).__name__}: {exc})") from None
    missing = [c for c in ROW_COLUMNS if c not in rows.schema_arrow.names]
    if missing:
        raise PipelineError(f"{val_uri}: missing column(s) {', '.join(missing)} "
                            f"(columns: {', '.join(rows.schema_arrow.names)})")
    return rows


def _batch_tensors(batch, val_uri: str, first_row: int, device) -> list[torch.Tensor]:
    """(input_ids, labels, position_ids) as (B, S) int64 tensors; ragged rows are an error."""
    tensors = []
    for name in ROW_COLUMNS:
        rows = batch.column(name).to_pylist()
        lengths = {len(r) for r in rows}
        if len(lengths) != 1:
            raise PipelineError(f"{val_uri}: rows {first_row}..{first_row + len(rows) - 1} of column "
                                f"{name!r} have different lengths {sorted(lengths)}; packed rows must not")
        tensors.append(torch.tensor(rows, dtype=torch.long, device=device))
    if len({tuple(t.shape) for t in tensors}) != 1:
        raise PipelineError(f"{val_uri}: rows from {first_row}: input_ids, labels and position_ids differ in length")
    return tensors


def _loss_sum(model, input_ids, labels, position_ids) -> tuple[float, int]:
    """Summed cross-entropy over the trained tokens of one batch of packed rows, and their count."""
    hidden = model.model(input_ids=input_ids, position_ids=position_ids).last_hidden_state
    total = causal_lm_loss(hidden, model.lm_head.weight, labels, reduction="sum")  # chunked, no logits
    return float(total), int((labels[:, 1:] != IGNORE_INDEX).sum())


def _scored_batches(rows: pq.ParquetFile, cfg: Config, val_uri: str, device) -> Iterator[list[torch.Tensor]]:
    """The first `eval.max_batches` batches of `eval.batch_size` rows (all of them for None)."""
    first_row = 0
    for index, batch in enumerate(rows.iter_batches(batch_size=cfg.eval.batch_size, columns=list(ROW_COLUMNS))):
        if cfg.eval.max_batches is not None and index >= cfg.eval.max_batches:
            return
        yield _batch_tensors(batch, val_uri, first_row, device)
        first_row += batch.num_rows


@torch.no_grad()
def evaluate_model(model, val_uri: str, cfg: Config, options: storage.StorageOptions | None = None) -> dict:
    """{"val_loss", "perplexity", "tokens"} of a causal LM on the packed rows at `val_uri`."""
    rows = _read_rows(val_uri, options)
    was_training = model.training
    model.eval()
    loss_sum, tokens = 0.0, 0
    try:
        for batch in _scored_batches(rows, cfg, val_uri, next(model.parameters()).device):
            batch_sum, batch_tokens = _loss_sum(model, *batch)
            loss_sum, tokens = loss_sum + batch_sum, tokens + batch_tokens
    finally:
        model.train(was_training)
    if tokens == 0:
        raise PipelineError(f"{val_uri}: no trained token (label != {IGNORE_INDEX}) in the scored rows")
    loss = loss_sum / tokens
    return {"val_loss": loss, "perplexity": math.exp(loss), "tokens": tokens}


def evaluate(
    cfg: Config,
    base_dir: str | Path,
    checkpoint_dir: str | Path,
    val_uri: str | None,
    *,
    options: storage.StorageOptions | None = None,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """{"base/val_loss", "base/perplexity", "finetuned/val_loss", "finetuned/perplexity"}.

    `base_dir`/`checkpoint_dir` may be local directories or uris (pulled into `run.cache_dir`). Without a
    held-out split (`val_uri` None) there is nothing to score: the reason is logged and {} returned.

    - Loss is scored by the TE-style model on the packed validation rows exactly as `pipeline.stages.data`
      wrote them. `position_ids` go in, so packed documents never attend to each other. Only tokens
      whose label is not -100 count.
    - The loss is the token-weighted mean over all scored tokens (not a mean of batch means), and
      perplexity is exp(loss).
    - Both models see the same rows: the first `eval.batch_size * eval.max_batches` rows of the split,
      already shuffled by data preparation. One model is in memory at a time.
    - The head and cross-entropy run on the scored positions only, a chunk of tokens at a time
      (`te_model.loss`), so a 128k-token vocabulary never needs whole (batch, seq, vocab) logits.
    """
    if val_uri is None:
        log.warning("eval: no validation split (data.val_fraction=0 and no data.validation_files): "
                    "skipping validation loss and perplexity")
        return {}
    options = options or storage_options(cfg)
    base_dir, checkpoint_dir = local_base(base_dir, cfg, options), trained_weights(checkpoint_dir, cfg, options)
    kwargs = {"backend": cfg.model.backend, "dtype": model_dtype(cfg), "device": device or default_device()}
    loaders = {"base": lambda: te_model.from_hf_checkpoint(base_dir, **kwargs),
               "finetuned": lambda: load_trained_model(checkpoint_dir, base_dir, **kwargs)}
    metrics: dict[str, float] = {}
    batches = "every" if cfg.eval.max_batches is None else f"up to {cfg.eval.max_batches}"
    for label, load in loaders.items():
        started = time.monotonic()
        progress.echo("eval", f"{label}: scoring {batches} batch(es) of {cfg.eval.batch_size} rows")
        scores = evaluate_model(load(), val_uri, cfg, options)  # the model is freed before the next loads
        progress.echo("eval", f"{label}: loss {scores['val_loss']:.4f}, perplexity {scores['perplexity']:.3f} "
                              f"over {scores['tokens']:,} tokens ({progress.duration(time.monotonic() - started)})")
        metrics[f"{label}/val_loss"], metrics[f"{label}/perplexity"] = scores["val_loss"], scores["perplexity"]
    return metrics


def score_champion(cfg: Config, champion_dir: str | Path, val_uri: str, options: storage.StorageOptions | None = None,
                   device: str | torch.device | None = None) -> dict[str, float]:
    """{"champion/val_loss", "champion/perplexity"}: the registered champion (an HF checkpoint folder)
    scored on the same rows, with the same code, as `evaluate` scores the fine-tuned model."""
    kwargs = {"backend": cfg.model.backend, "dtype": model_dtype(cfg), "device": device or default_device()}
    started = time.monotonic()
    progress.echo("eval", f"champion {cfg.eval.champion}: scoring the same rows")
    scores = evaluate_model(te_model.from_hf_checkpoint(champion_dir, **kwargs), val_uri, cfg, options)
    progress.echo("eval", f"champion: loss {scores['val_loss']:.4f}, perplexity {scores['perplexity']:.3f} "
                          f"over {scores['tokens']:,} tokens ({progress.duration(time.monotonic() - started)})")
    return {"champion/val_loss": scores["val_loss"], "champion/perplexity": scores["perplexity"]}


# ---------------------------------------------------------------------------------------------------
# samples from the exported checkpoint


def _prompt_ids(tokenizer, prompt: str, prompt_format: str, add_bos: bool) -> list[int]:
    """Token ids of a prompt laid out as in training: raw text, Alpaca prompt, or a chat user turn."""
    if prompt_format not in PROMPT_FORMATS:
        raise PipelineError(f"prompt_format must be one of {', '.join(PROMPT_FORMATS)}, got {prompt_format!r}")
    if prompt_format == "chat" and not tokenizer.chat_template:
        raise PipelineError("prompt_format is chat but the exported tokenizer has no chat template")
    if prompt_format == "chat":
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    elif prompt_format == "instruction":
        text = format_instruction_prompt(prompt)
    else:
        text = prompt
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    return [bos] + ids if add_bos and bos is not None and ids[:1] != [bos] else ids


@torch.no_grad()
def generate_samples(
    export_dir: str | Path,
    prompts: list[str],
    max_new_tokens: int,
    num_samples: int,
    *,
    prompt_format: str = "text",
    add_bos: bool = True,
    device: str | torch.device | None = None,
) -> list[dict[str, str]]:
    """Greedy completions of the first `num_samples` prompts by the exported HF checkpoint.

    `prompt_format` ("text", "instruction", "chat"; use `data.format`) lays each prompt out the way the
    model was trained; `prompt` in the result is the prompt as given, `completion` the new text only.
    """
    chosen = prompts[:num_samples]
    if not chosen:
        return []
    device = torch.device(device or default_device())
    tokenizer = AutoTokenizer.from_pretrained(str(export_dir), trust_remote_code=False)
    with progress.no_progress_bars():
        model = AutoModelForCausalLM.from_pretrained(str(export_dir), trust_remote_code=False).to(device).eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    samples = []
    for prompt in chosen:
        ids = torch.tensor([_prompt_ids(tokenizer, prompt, prompt_format, add_bos)], device=device)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=1,
                             max_new_tokens=max_new_tokens, pad_token_id=pad_id)
        completion = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        samples.append({"prompt": prompt, "completion": completion})
    return samples
