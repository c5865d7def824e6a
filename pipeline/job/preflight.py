"""Checks of a job's inputs that run before the job writes anything, so a bad input leaves no trace.

A bad base checkpoint found inside a Ray worker arrives after an MLflow run, a state file and a
cluster exist, wrapped in Ray's error. These checks read only what is cheap: bucket heads, listings,
config.json, the manifest and each safetensors header (a few KB, never the tensors). Each failure is
one `PipelineError` line naming the key, file or tensor and the fix. The driver runs them, then data
preparation, and only then opens the job.
"""

from __future__ import annotations

import json
import math
import os
import struct
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import botocore.exceptions
import torch

from pipeline import storage
from pipeline.config import Config, TrainConfig
from pipeline.errors import PipelineError
from pipeline.job.resolved import ResolvedJob, fp8_head_on
from pipeline.job.state import load_state
from pipeline.progress import megabytes
from pipeline.storage.manifest import MANIFEST_NAME, parse_manifest
from pipeline.storage.redact import error_line, redact_text

INDEX_NAME = "model.safetensors.index.json"
# Suffixes of pickled weights: named when they are all a checkpoint offers, never read.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
_MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit on the JSON header
# config.json keys the model is built from: (key, type, required).
_CONFIG_VALUES = (("hidden_size", int, True), ("intermediate_size", int, True), ("num_hidden_layers", int, True),
                  ("num_attention_heads", int, True), ("num_key_value_heads", int, False), ("vocab_size", int, True),
                  ("head_dim", int, False), ("max_position_embeddings", int, False), ("rms_norm_eps", float, False),
                  ("rope_theta", float, False), ("tie_word_embeddings", bool, False))
# Weights are trained in floating point: an integer tensor would be cast silently and train nonsense.
_FLOAT_DTYPES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}


def check_inputs(job: ResolvedJob, stages: list[str]) -> None:
    """Every cheap check for running `stages` of `job`; raises one PipelineError line."""
    cfg, options = job.config, job.storage
    check_local_folders(cfg)
    check_buckets(cfg, options)
    check_stages(cfg, stages, job.folders.state_uri, options)
    check_tracking(job.tracking.uri)
    if cfg.train.use_gpu:
        check_gpus_reachable()
    if {"data", "train", "eval", "export"} & set(stages):
        check_base_checkpoint(cfg.model.base_uri, options, cfg.train if "train" in stages else None)


# ---------------------------------------------------------------------------------------------------
# storage and cluster


def _storage_uris(cfg: Config) -> list[tuple[str, str]]:
    uris = [("run.output_uri", cfg.run.output_uri), ("model.base_uri", cfg.model.base_uri)]
    for key in ("train_files", "validation_files"):
        uris += [(f"data.{key}[{i}]", uri) for i, uri in enumerate(getattr(cfg.data, key) or [])]
    return uris


def check_buckets(cfg: Config, options: storage.StorageOptions) -> None:
    """The bucket of each s3 uri exists and the environment's credentials may use it.

    The job never creates a bucket.
    """
    seen = set()
    for key, uri in _storage_uris(cfg):
        if not uri.startswith("s3://"):
            continue
        bucket = uri[len("s3://"):].split("/", 1)[0]
        if bucket not in seen:
            seen.add(bucket)
            _head_bucket(key, bucket, options)


def _head_bucket(key: str, bucket: str, options: storage.StorageOptions) -> None:
    fs, _ = storage.filesystem(f"s3://{bucket}", options)
    endpoint = options.endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or "AWS"
    try:
        fs.call_s3("head_bucket", Bucket=bucket)
    except FileNotFoundError:
        raise PipelineError(f"{key}: bucket '{bucket}' does not exist at {endpoint}; create it, "
                            f"or fix {key} (and storage.endpoint_url)") from None
    except PermissionError:
        raise PipelineError(f"{key}: access to bucket '{bucket}' at {endpoint} denied for the credentials in "
                            "this environment; check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or the AWS "
                            "profile or role) and the bucket's policy") from None
    except (OSError, botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
        raise PipelineError(f"{key}: cannot reach bucket '{bucket}' at {endpoint} ({error_line(exc)}); "
                            "check storage.endpoint_url and the network") from None


# What a stage reads from the job's state when the stage that writes it is not run with it.
_STAGE_NEEDS = {"train": ("data", "data"), "eval": ("checkpoint_uri", "train"), "export": ("checkpoint_uri", "train")}


def check_stages(cfg: Config, stages: list[str], state_uri: str, options: storage.StorageOptions) -> None:
    """At least one stage, and what each needs is made by an earlier stage of this run or of the job."""
    if not stages:
        raise PipelineError("--stages names no stage; give some of data,train,eval,export")
    state = None
    for stage in stages:
        key, maker = _STAGE_NEEDS.get(stage, (None, None))
        if key is None or maker in stages:
            continue
        if state is None:
            state = load_state(state_uri, options)
        if getattr(state, key) is None:
            raise PipelineError(f"--stages {','.join(stages)}: stage {stage!r} needs the {maker} stage's output, "
                                f"and job {cfg.run.name!r} has none ({state_uri}); add {maker} to --stages")


def check_local_folders(cfg: Config) -> None:
    """run.cache_dir (and a local run.output_uri) is a folder this process can write, or can be made one."""
    folders = [("run.cache_dir", cfg.run.cache_dir)]
    if "://" not in cfg.run.output_uri or cfg.run.output_uri.startswith("file://"):
        folders.append(("run.output_uri", cfg.run.output_uri.removeprefix("file://")))
    for key, folder in folders:
        path = Path(folder).expanduser().absolute()
        existing = next(p for p in (path, *path.parents) if p.exists())
        if not existing.is_dir():
            raise PipelineError(f"{key}: {existing} is a file, not a folder; point {key} at a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise PipelineError(f"{key}: {existing} is not writable by this user; point {key} at a folder "
                                "it may write")


TRACKING_TIMEOUT_S = 5.0


def check_tracking(uri: str) -> None:
    """An MLflow server answers within seconds (a local store needs no check): found before Ray starts."""
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        return
    url = f"{uri.rstrip('/')}/health"
    try:
        with urllib.request.urlopen(url, timeout=TRACKING_TIMEOUT_S):
            return
    except urllib.error.HTTPError:
        return  # it answered: whatever the status, the server is there (credentials are MLflow's to check)
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise PipelineError(f"tracking.uri: no MLflow server answers at {redact_text(uri)} within "
                            f"{TRACKING_TIMEOUT_S:.0f} s ({type(reason).__name__}: {reason}); start it, or fix "
                            "tracking.uri") from None


def check_gpus_reachable() -> None:
    """GPU workers on a local Ray cluster need a GPU on this machine, or Ray would wait forever."""
    import ray

    if os.environ.get("RAY_ADDRESS") or torch.cuda.is_available():
        return
    if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= 1:
        return
    raise PipelineError("train.use_gpu=true, but this machine has no CUDA GPU and RAY_ADDRESS names no "
                        "cluster; submit the job to a GPU cluster, or set train.use_gpu=false and train.fp8=none")


# ---------------------------------------------------------------------------------------------------
# the base checkpoint


@dataclass
class _Checkpoint:
    uri: str
    options: storage.StorageOptions
    files: dict[str, int]  # name -> size in storage

    def where(self, name: str) -> str:
        return storage.join(self.uri, name)

    def read_json(self, name: str) -> dict:
        data = storage.read_bytes(self.where(name), self.options)
        try:
            value = json.loads(data)
        except ValueError as exc:
            raise PipelineError(f"{self.where(name)}: invalid JSON ({exc}); publish the checkpoint again") from None
        if not isinstance(value, dict):
            raise PipelineError(f"{self.where(name)}: expected a JSON object; publish the checkpoint again")
        return value


def check_base_checkpoint(uri: str, options: storage.StorageOptions, train: TrainConfig | None = None) -> str:
    """Check the HF checkpoint at `uri` without reading its tensors; returns a one-line summary.

    - config.json must be a Llama config the layers support. It is read as plain JSON into
      `LlamaConfig`, so an `auto_map` naming custom code is ignored and never imported.
    - Weights must be safetensors: a folder holding only pickles (`pytorch_model.bin`) is refused, since
      unpickling runs code.
    - Every shard the index names must exist and be as long as its header says (a cut upload). Every
      tensor the index names must be in its shard, with the shape config.json implies.
    - With `train` (the job trains): a head that `train.fp8_head: true` asks to run in FP8 must fit FP8 GEMMs.
    - With a manifest, every file it lists must have the listed size. File contents (sha256) are checked
      where shards are downloaded (`storage.pull_checkpoint`): here would read every byte twice.
    """
    try:
        files = storage.list_files(uri, options)
    except PipelineError as exc:
        raise PipelineError(f"model.base_uri: {exc}; publish the base checkpoint there first "
                            "(jobs/publish.py) or fix model.base_uri") from None
    ckpt = _Checkpoint(uri, options, files)
    config = _llama_config(ckpt)
    if train is not None:
        try:
            fp8_head_on(train, config.hidden_size, config.vocab_size, say_why=True)
        except PipelineError as exc:
            raise PipelineError(f"{ckpt.where('config.json')}: {exc}") from None
    _check_tokenizer_ids(ckpt, config.vocab_size)
    shards = _shards(ckpt)
    has_manifest = MANIFEST_NAME in files
    if has_manifest:
        _check_manifest_sizes(ckpt)
    headers = {name: _safetensors_header(ckpt, name) for name in shards}
    _check_index_tensors(ckpt, headers)
    _check_tensors(ckpt, headers, config)
    size = sum(files[n] for n in shards)
    shown = f"{size / 2**30:.2f} GiB" if size >= 2**30 else megabytes(size)  # the demo's is 0.6 MB, not 0.00 GiB
    return f"llama, {len(shards)} shard(s), {shown}, {'manifest' if has_manifest else 'no manifest'}"


def _llama_config(ckpt: _Checkpoint):
    """config.json as a LlamaConfig, from plain JSON: no `auto_map`, no code from the checkpoint."""
    from transformers import LlamaConfig

    from te_model.model import check_llama_config

    if "config.json" not in ckpt.files:
        raise PipelineError(f"{ckpt.uri}: no config.json; model.base_uri must be a Hugging Face checkpoint folder")
    raw = ckpt.read_json("config.json")
    where = ckpt.where("config.json")
    if raw.get("model_type") != "llama":
        raise PipelineError(f"{where}: model_type is {raw.get('model_type')!r}; only Llama checkpoints "
                            "are supported: point model.base_uri at one")
    _check_config_values(raw, where)
    try:
        config = LlamaConfig.from_dict({k: v for k, v in raw.items() if k != "auto_map"})
        check_llama_config(config, where=where)
    except (ValueError, TypeError, KeyError) as exc:
        raise PipelineError(f"{where}: {error_line(exc).split(': ', 1)[-1]}") from None
    return config


def _check_config_values(raw: dict, where: str) -> None:
    """The numbers the model is built from have the right type and fit together, named by key."""
    for key, kind, required in _CONFIG_VALUES:
        value = raw.get(key)
        if value is None and not required:
            continue
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        fits = isinstance(value, int) and not isinstance(value, bool) and value >= 1 if kind is int \
            else is_number and value > 0 if kind is float else isinstance(value, bool)
        if not fits:
            wanted = {int: "an integer >= 1", float: "a number > 0", bool: "true or false"}[kind]
            raise PipelineError(f"{where}: {key} must be {wanted}, got {value!r}; the checkpoint's config.json "
                                "is damaged or not a Llama config")
    hidden, heads = raw["hidden_size"], raw["num_attention_heads"]
    kv_heads = raw.get("num_key_value_heads") or heads
    if hidden % heads:
        raise PipelineError(f"{where}: num_attention_heads {heads} does not divide hidden_size {hidden}; "
                            "the checkpoint's config.json is damaged")
    if heads % kv_heads:
        raise PipelineError(f"{where}: num_key_value_heads {kv_heads} does not divide num_attention_heads "
                            f"{heads}; the checkpoint's config.json is damaged")


def _check_tokenizer_ids(ckpt: _Checkpoint, vocab_size: int) -> None:
    """Every id tokenizer.json can produce indexes the embedding: a larger one fails inside training."""
    if "tokenizer.json" not in ckpt.files:
        return
    tokenizer = ckpt.read_json("tokenizer.json")
    vocab = (tokenizer.get("model") or {}).get("vocab") or {}
    ids = {int(i): str(t) for t, i in vocab.items()} if isinstance(vocab, dict) else \
        {i: str(entry[0]) if isinstance(entry, list) else str(entry) for i, entry in enumerate(vocab)}
    ids.update({int(t["id"]): str(t.get("content")) for t in tokenizer.get("added_tokens") or []})
    largest = max(ids, default=-1)
    if largest >= vocab_size:
        raise PipelineError(f"{ckpt.where('tokenizer.json')}: token id {largest} ({ids[largest]!r}) is outside "
                            f"config.json's vocab_size {vocab_size}; the tokenizer and the model do not match")


def _shards(ckpt: _Checkpoint) -> list[str]:
    """The safetensors files holding the weights: from the index, else model.safetensors."""
    if INDEX_NAME in ckpt.files:
        weight_map = ckpt.read_json(INDEX_NAME).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise PipelineError(f"{ckpt.where(INDEX_NAME)}: no weight_map; publish the checkpoint again")
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            if shard not in ckpt.files:
                raise PipelineError(f"{ckpt.where(INDEX_NAME)}: names shard {shard}, which is missing from "
                                    f"{ckpt.uri}; upload it, or publish the checkpoint again")
        return shards
    if "model.safetensors" in ckpt.files:
        return ["model.safetensors"]
    pickles = sorted(n for n in ckpt.files if n.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise PipelineError(f"{ckpt.where(pickles[0])}: pickled weights are never loaded (unpickling runs "
                            "code); convert the checkpoint to safetensors (save_pretrained with "
                            "safe_serialization=True) and publish it again")
    raise PipelineError(f"{ckpt.uri}: no model.safetensors or {INDEX_NAME}; model.base_uri must hold "
                        "the weights as safetensors")


def _check_manifest_sizes(ckpt: _Checkpoint) -> None:
    """Each file the manifest lists has the listed size (a cut or replaced upload does not)."""
    data = storage.read_bytes(ckpt.where(MANIFEST_NAME), ckpt.options)
    for name, entry in sorted(parse_manifest(data, ckpt.where(MANIFEST_NAME)).items()):
        if not storage.is_checkpoint_file(name):
            continue
        if name not in ckpt.files:
            raise PipelineError(f"{ckpt.where(name)} is listed in {MANIFEST_NAME} but missing; "
                                "publish the checkpoint again")
        if ckpt.files[name] != entry.size:
            raise PipelineError(f"{ckpt.where(name)}: {ckpt.files[name]} bytes in storage, {MANIFEST_NAME} says "
                                f"{entry.size}; the file changed after it was published: publish it again")


def _safetensors_header(ckpt: _Checkpoint, name: str) -> dict[str, dict]:
    """The tensor table of a safetensors file, from two ranged reads; checks the file's length."""
    where, size = ckpt.where(name), ckpt.files[name]
    fs, path = storage.filesystem(where, ckpt.options)
    try:  # two ranged reads; fs.open would read ahead a whole block of the shard
        head = fs.cat_file(path, start=0, end=8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < length <= min(_MAX_HEADER_BYTES, size - 8):
            raise ValueError(f"header length {length} does not fit a {size}-byte file")
        header = json.loads(fs.cat_file(path, start=8, end=8 + length))
        tensors = {k: v for k, v in header.items() if k != "__metadata__"}
        end = max((int(t["data_offsets"][1]) for t in tensors.values()), default=0)
    except (ValueError, KeyError, TypeError, IndexError, struct.error) as exc:
        raise PipelineError(f"{where}: not a readable safetensors file ({exc}); publish it again") from None
    except (OSError, botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
        raise PipelineError(f"cannot read {where}: {error_line(exc)}") from None
    if 8 + length + end != size:
        raise PipelineError(f"{where}: {size} bytes, but its header describes {8 + length + end}; "
                            "the upload was cut short: publish the checkpoint again")
    return tensors


def _check_index_tensors(ckpt: _Checkpoint, headers: dict[str, dict]) -> None:
    if INDEX_NAME not in ckpt.files:
        return
    for tensor, shard in sorted(ckpt.read_json(INDEX_NAME)["weight_map"].items()):
        if tensor not in headers[shard]:
            raise PipelineError(f"{ckpt.where(INDEX_NAME)}: names tensor {tensor!r} in {shard}, which does not "
                                "hold it; publish the checkpoint again")


def _check_tensors(ckpt: _Checkpoint, headers: dict[str, dict], config) -> None:
    """Every tensor of the model is present once, with the shape config.json implies."""
    expected = _expected_shapes(config)
    found = {}
    for shard, tensors in headers.items():
        for name, info in tensors.items():
            if name not in expected:
                raise PipelineError(f"{ckpt.where(shard)}: tensor {name!r} is not a parameter of the Llama "
                                    "that config.json describes; the weights and config.json do not match")
            shape = tuple(info.get("shape", ()))
            _check_dtype_and_span(ckpt.where(shard), name, info, shape)
            if shape != expected[name]:
                raise PipelineError(f"{ckpt.where(shard)}: tensor {name!r} has shape {shape}, config.json implies "
                                    f"{expected[name]}; the weights and config.json come from different models")
            found[name] = shard
    optional = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = sorted(set(expected) - set(found) - optional)
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise PipelineError(f"{ckpt.uri}: tensor {missing[0]!r}{more} in no shard; the checkpoint is "
                            "incomplete: publish it again")


def _check_dtype_and_span(where: str, name: str, info: dict, shape: tuple[int, ...]) -> None:
    """A floating dtype, and a byte span that holds exactly shape x itemsize bytes."""
    dtype = info.get("dtype")
    if dtype not in _FLOAT_DTYPES:
        raise PipelineError(f"{where}: tensor {name!r} has dtype {dtype}; weights must be floating point "
                            f"({', '.join(_FLOAT_DTYPES)}): convert the checkpoint and publish it again")
    start, end = info["data_offsets"]
    expected = math.prod(shape) * _FLOAT_DTYPES[dtype]
    if end - start != expected:
        raise PipelineError(f"{where}: tensor {name!r} spans {end - start} bytes, but {dtype} of shape {shape} "
                            f"needs {expected}; the file's header is damaged: publish the checkpoint again")


def _expected_shapes(config) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of HF's Llama for `config`, built on the meta device (no memory, no init)."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}
