"""What runs are compared by: tags on a job's runs, and the fingerprint of its training data.

Comparing FP8 against BF16, or one base model against another, starts with filtering runs in the
MLflow UI (`tags.precision = 'fp8-delayed'`). Params hold every setting, but the interesting facts
(model size, GPU, exact data, the head's precision where a default decides it) are not settings. So the
driver tags them: `precision`, `lm_head`, `model_size` and `model_params`, `hardware`, `data_fingerprint`.
`jobs/compare.py` shows them beside the results, and scheduled retraining keys on the data fingerprint. The
code version is `tracking.code_version_tags`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pipeline import storage
from pipeline.config import Config, TrainConfig
from pipeline.errors import PipelineError
from pipeline.job.resolved import fp8_head_on

PRECISION_TAG = "precision"
LM_HEAD_TAG = "lm_head"
FP8_ACCUMULATION_TAG = "fp8_gradient_accumulation"
FINGERPRINT_TAG = "data_fingerprint"
# data settings that do not change which rows are trained on
_NOT_FINGERPRINTED = {"train_files", "validation_files", "num_proc"}


def precision(cfg: Config) -> str:
    """`fp8-<recipe>` when an FP8 recipe is on, else the model dtype (`bf16`, `fp32`)."""
    return f"fp8-{cfg.train.fp8}" if cfg.train.fp8 != "none" else cfg.model.dtype


def llama_parameter_count(config: dict[str, Any]) -> int:
    """Parameters of a Llama model with this HF config.json content (embeddings, layers, norm, head)."""
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    attn = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
    if config.get("attention_bias"):
        attn += heads * head_dim + 2 * kv_heads * head_dim + hidden  # q, k, v and o biases
    mlp = 3 * hidden * inter + (2 * inter + hidden if config.get("mlp_bias") else 0)
    layers = config["num_hidden_layers"] * (attn + mlp + 2 * hidden)
    head = 0 if config.get("tie_word_embeddings") else vocab * hidden
    return vocab * hidden + layers + hidden + head


def human_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def model_tags(cfg: Config, options: storage.StorageOptions, train: TrainConfig | None = None) -> dict[str, str]:
    """`model_size` (e.g. `1.24B`) and the exact `model_params`, counted from the base's config.json, and
    `lm_head`: `fp8` where training runs the head's GEMMs in FP8 (`train`, default `cfg.train`), else the
    model's dtype.

    A Llama formula counts them; no weights are read.
    """
    base = cfg.model.base_uri.rstrip("/")
    tags = {"model_name": base.rsplit("/", 1)[-1], "model_base_uri": base}
    raw = json.loads(storage.read_bytes(storage.join(base, "config.json"), options))
    count = llama_parameter_count(raw)
    try:
        fp8_head = fp8_head_on(train or cfg.train, raw["hidden_size"], raw["vocab_size"])
    except PipelineError:  # asked for where it cannot run: a job that trains stops at start instead
        fp8_head = False
    head = "fp8" if fp8_head else cfg.model.dtype
    return {**tags, "model_params": str(count), "model_size": human_count(count), LM_HEAD_TAG: head}


def _file_identity(fs, path: str) -> str:
    if "file" in fs.protocol:
        digest = hashlib.sha256()
        with fs.open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()
    info = fs.info(path)
    etag = info.get("ETag") or info.get("etag") or info.get("md5Hash")
    if not etag:
        raise PipelineError(f"{path}: the store reports no ETag to fingerprint it by")
    return f"{etag}:{info.get('size')}"


def _input_identities(uri: str, options: storage.StorageOptions) -> list[tuple[str, str]]:
    """(path below `uri`, identity) of the file at `uri`, or of every file in the folder at `uri`."""
    fs, path = storage.filesystem(uri, options)
    if not fs.exists(path):
        raise PipelineError(f"data input {uri} not found: fix data.train_files / data.validation_files")
    files = sorted(fs.find(path)) if fs.isdir(path) else [path]
    return [(f[len(path):], _file_identity(fs, f)) for f in files]


def data_fingerprint(cfg: Config, options: storage.StorageOptions | None = None) -> str:
    """sha256 hex of the training data's identity; it changes exactly when the training data can.

    It covers the data settings that change the prepared rows, `run.seed`, and each input file's
    identity: the content hash of local files, the ETag of object-store files. So a scheduler tick does
    not download the data set.
    """
    options = options or storage.StorageOptions(cfg.storage.endpoint_url, cfg.storage.region)  # a job passes its own
    settings = {k: v for k, v in vars(cfg.data).items() if k not in _NOT_FINGERPRINTED}
    digest = hashlib.sha256(json.dumps({"seed": cfg.run.seed, **settings}, sort_keys=True, default=str).encode())
    for role, uris in (("train", cfg.data.train_files), ("validation", cfg.data.validation_files or [])):
        for uri in uris:
            for name, identity in _input_identities(uri, options):
                digest.update(f"\0{role}\0{uri}{name}\0{identity}".encode())
    return digest.hexdigest()


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0)


def hardware_tags(cfg: Config) -> dict[str, str]:
    """Where training runs: asks a one-GPU Ray task on a GPU node for its device name."""
    if not cfg.train.use_gpu:
        return {"hardware": f"cpu x{cfg.train.workers}", "gpu_name": "none", "gpu_count": "0"}
    import ray

    name = ray.get(ray.remote(num_gpus=1, num_cpus=0)(_gpu_name).remote())
    return {"hardware": f"{cfg.train.workers}x {name}", "gpu_name": name, "gpu_count": str(cfg.train.workers)}


def comparison_tags(cfg: Config, options: storage.StorageOptions, train: TrainConfig | None = None) -> dict[str, str]:
    """Precision, model and data tags for the job's parent run (hardware: `hardware_tags`). `train`: the
    settings training runs with, after the FP8 decision (default `cfg.train`). Under FP8, how the gradients'
    GEMMs accumulate: `fast` or TE's `split` default (`train.fp8_fast_accumulation`)."""
    tags = {PRECISION_TAG: precision(cfg), "fp8_recipe": cfg.train.fp8, "dtype": cfg.model.dtype}
    runs = train or cfg.train
    if runs.fp8 != "none":
        tags[FP8_ACCUMULATION_TAG] = "fast" if runs.fast_accumulation else "split"
    return {**tags, **model_tags(cfg, options, train), FINGERPRINT_TAG: data_fingerprint(cfg, options)}
