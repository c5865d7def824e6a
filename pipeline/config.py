"""One typed configuration for every stage, loaded from a YAML preset plus dotted command-line overrides.

Every job and every Ray worker must agree on the same settings, and a typo must fail before a cluster
spins up. So the config is a tree of dataclasses, one per section, checked on construction. Wrong
types, out-of-range values and unknown keys raise `PipelineError` naming the dotted key (`train.lr`),
with the closest valid key for typos. Each field is documented by the comment above it, which
`--list-keys` prints. How presets, defaults and overrides combine: `load_config`.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional

import yaml

from pipeline.errors import PipelineError
from pipeline.storage.uris import check_storage_uri, split_uri

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PRESET_DIR = PROJECT_ROOT / "configs"
# The job's stages, in pipeline order (`pipeline.job.driver` runs them).
STAGES = ("data", "train", "eval", "export")
# Random-weight bases the job builds itself (`pipeline.demo`) the first time a config names one that is not
# there: the demo's, and `configs/gpu-small-fp8.yaml`'s 380M model.
DEMO_STORE = ".cache/demo-store"
BUILT_BASES = ("tiny-llama", "gpu-small-llama")
DEMO_PRESET = PRESET_DIR / "tiny-cpu.yaml"
# What a config other than the demo must set: a real job never trains some default model, and never
# registers its result under a name it did not choose (null there means: do not register).
REQUIRED_KEYS = ("model.base_uri", "data.train_files", "train.max_steps", "export.registered_model_name")
LOCAL_TRACKING_URI = "sqlite:///.cache/mlflow.db"
# train.warmup_steps when unset: this percentage of train.max_steps, rounded up.
WARMUP_PERCENT = 3
# te_model.fp8.PER_TENSOR_RECIPES, named here so the config imports no torch: the FP8 recipes that can run
# attention in FP8 and accumulate the gradients' GEMMs fast.
PER_TENSOR_RECIPES = ("delayed", "current")

# Names other trainers use for our keys; difflib alone cannot see that `learning_rate` means `lr`.
_ALIASES = {
    "learning_rate": "lr",
    "gradient_accumulation_steps": "grad_accum_steps",
    "per_device_train_batch_size": "micro_batch_size",
    "batch_size": "micro_batch_size",
    "num_workers": "workers",
    "max_seq_length": "seq_len",
    "seq_length": "seq_len",
    "max_length": "seq_len",
    "fp8_recipe": "fp8",
    "gradient_checkpointing": "activation_checkpointing",
    "torch_dtype": "dtype",
}
_MODEL_VERSION_URI = re.compile(r"^models:/[^/@]+/\d+$")
_SHARD_SIZE = re.compile(r"^\d+(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)$")
# A name that becomes one folder or object-key segment (`run.name`) or a registry key: no separator, no
# `..`, nothing hidden, nothing that needs quoting in an MLflow filter.
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9 ._+-]{0,99}$")


class _Section:
    """Shared construction checks: every field is type-checked, then `_validate` checks ranges."""

    section: ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            key = f"{self.section}.{f.name}"
            setattr(self, f.name, _coerce(key, getattr(self, f.name), hints[f.name]))
        self._validate()

    def _validate(self) -> None:
        """Range and cross-field rules of the section; raise via `_require`."""

    def _require(self, ok: bool, name: str, rule: str) -> None:
        if not ok:
            value = getattr(self, name)
            raise PipelineError(f"{self.section}.{name} {rule} (got {value!r})")

    def _require_name(self, name: str, used_for: str) -> None:
        """A name used as one path segment or key: never a path, so nothing is written outside the job's folders."""
        value = getattr(self, name)
        if value is None or (_NAME.match(value) and ".." not in value and value == value.strip()):
            return
        if "/" in value or "\\" in value:
            why = "must be a name, not a path (no / or \\)"
        elif ".." in value:
            why = "must not contain '..'"
        else:
            why = "must be 1-100 letters, digits, spaces or . _ + -, starting with a letter, digit or _"
        raise PipelineError(f"{self.section}.{name} {why}; it is {used_for} (got {value!r})")

    def _require_storage_uri(self, name: str) -> None:
        """A storage uri: s3://bucket/..., file://... or a local path, never with credentials in it."""
        values = getattr(self, name)
        for i, uri in enumerate(values if isinstance(values, list) else [values]):
            key = f"{self.section}.{name}" + (f"[{i}]" if isinstance(values, list) else "")
            check_storage_uri(key, uri)


@dataclass
class RunConfig(_Section):
    section: ClassVar[str] = "run"
    # Run name in MLflow and the folder name of this run's checkpoints and exports; unset = the config
    # file's name (my-sft for my-sft.yaml; `load_config` sets it).
    name: Optional[str] = None
    # MLflow experiment the run belongs to (the default of tracking.experiment); unset = run.name.
    experiment: Optional[str] = None
    # Seed for weight-free randomness: data split, row order, dropout, sampling.
    seed: int = 0
    # Root uri (local folder, file://, s3://) for checkpoints, exports and the prepared-data cache.
    output_uri: str = ".cache/runs"
    # Node-local folder where pulled checkpoints are cached; must be a local path.
    cache_dir: str = ".cache/node"

    def _validate(self) -> None:
        self._require(self.name is None or bool(self.name.strip()), "name", "must not be empty")
        if self.name is not None:
            self._require_name("name", "the name of the job's folders under run.output_uri and run.cache_dir")
        if self.experiment is None:
            self.experiment = self.name
        self._require("://" not in self.cache_dir, "cache_dir", "must be a local path")
        self._require_storage_uri("output_uri")


@dataclass
class StorageConfig(_Section):
    section: ClassVar[str] = "storage"
    # S3-compatible endpoint (MinIO, moto, Ceph); None = AWS. Credentials come from the environment only.
    endpoint_url: Optional[str] = None
    # Object-store region; None = the client's default.
    region: Optional[str] = None
    # Tries per S3 request (5xx, throttling, timeouts are retried with exponential backoff) before failing.
    max_attempts: int = 5
    # Seconds to connect to the object store before a try fails.
    connect_timeout_s: float = 10.0
    # Seconds without a byte from the object store before a try fails (so a stalled request is retried).
    read_timeout_s: float = 60.0

    def _validate(self) -> None:
        self._require(self.max_attempts >= 1, "max_attempts", "must be >= 1")
        for name in ("connect_timeout_s", "read_timeout_s"):
            self._require(getattr(self, name) > 0, name, "must be > 0")
        if self.endpoint_url is not None:
            parts = split_uri("storage.endpoint_url", self.endpoint_url)
            self._require(parts.scheme in ("http", "https") and bool(parts.hostname), "endpoint_url",
                          "must look like http://host:port")


@dataclass
class ModelConfig(_Section):
    section: ClassVar[str] = "model"
    # Uri of the Hugging Face checkpoint folder (config.json, safetensors shards, tokenizer files): s3://,
    # a local folder, or a Hub repo hf://org/name[@revision] (pipeline.storage.hub). Required in every config but the demo.
    base_uri: Optional[str] = None
    # Layer implementation: te = Transformer Engine, torch = plain PyTorch, auto = te when usable.
    backend: Literal["auto", "te", "torch"] = "auto"
    # Master weight and compute dtype outside FP8 regions. bf16, the dtype Llama models are trained in;
    # fp32 doubles weight, gradient and optimizer memory: use it for CPU runs (CPUs have slow bf16 matmuls).
    dtype: Literal["bf16", "fp32"] = "bf16"

    def _validate(self) -> None:
        if self.base_uri is not None:
            self._require_storage_uri("base_uri")


@dataclass
class DataConfig(_Section):
    section: ClassVar[str] = "data"
    # Training inputs: jsonl/json/parquet/csv files or `datasets` save_to_disk folders, local, s3:// or in
    # a Hub dataset repo (hf://datasets/org/name[@revision]/path). Required in every config but the demo.
    train_files: list[str] = field(default_factory=list)
    # Held-out inputs; when set, val_fraction is ignored and no training document is held out.
    validation_files: Optional[list[str]] = None
    # Record layout: text = raw `text_field`; instruction = instruction/input/output; chat = messages.
    format: Literal["text", "instruction", "chat"] = "text"
    # Column holding the document in text format.
    text_field: str = "text"
    # Tokens per packed row; a document longer than this is truncated. 2048 is within every Llama 2/3/3.x
    # context and keeps activation memory modest; raise it (4096, 8192) for long documents.
    seq_len: int = 2048
    # Share of documents held out for validation when validation_files is not set.
    val_fraction: float = 0.1
    # Processes used to tokenize.
    num_proc: int = 1
    # Jinja chat template used instead of the tokenizer's (for base tokenizers that lack one).
    chat_template: Optional[str] = None
    # Prepend the tokenizer's BOS token to every document (never doubled if the text already has it).
    add_bos: bool = True
    # Append the tokenizer's EOS token to every document that is not truncated.
    add_eos: bool = True
    # Use only the first this many documents of the training files (and of validation_files); None = all.
    max_documents: Optional[int] = None

    def _validate(self) -> None:
        self._require_storage_uri("train_files")
        if self.validation_files:
            self._require_storage_uri("validation_files")
        multiple_of_16 = self.seq_len >= 16 and self.seq_len % 16 == 0
        self._require(multiple_of_16, "seq_len", "must be >= 16 and a multiple of 16")
        self._require(0.0 <= self.val_fraction < 1.0, "val_fraction", "must be in [0, 1)")
        self._require(self.num_proc >= 1, "num_proc", "must be >= 1")
        self._require(bool(self.text_field), "text_field", "must not be empty")
        self._require(self.max_documents is None or self.max_documents >= 1, "max_documents", "must be >= 1")


@dataclass
class TrainConfig(_Section):
    section: ClassVar[str] = "train"
    # Ray Train workers, one per GPU when use_gpu: set it to the number of GPUs the job should use.
    workers: int = 1
    # Give each worker one GPU; false trains on CPU (set model.dtype fp32 there).
    use_gpu: bool = True
    # Packed rows per worker per forward pass; 1 is the memory-safe choice for full fine-tunes of 3B-8B
    # models at data.seq_len 2048-4096; raise it for smaller models or shorter rows.
    micro_batch_size: int = 1
    # Micro-batches accumulated per optimizer step. Under FP8 the decoder's FP8 weights are then cast on a step's
    # first micro-batch and kept for the others (TE's first-micro-batch cache), unless recast_fp8_weights or fsdp.
    grad_accum_steps: int = 1
    # Packed rows per optimizer step over all workers; None = workers x micro_batch_size x grad_accum_steps.
    # When set, it pins the batch: it must split evenly into workers x micro_batch_size, and
    # grad_accum_steps becomes the quotient, so changing train.workers keeps the optimization the same.
    global_batch_size: Optional[int] = None
    # Peak AdamW learning rate.
    lr: float = 2e-5
    # Final learning rate of the cosine decay as a fraction of lr.
    min_lr_ratio: float = 0.1
    # AdamW decoupled weight decay.
    weight_decay: float = 0.01
    # Linear warmup optimizer steps; unset = 3% of train.max_steps, rounded up (the warmup ratio 0.03 of
    # common Llama fine-tuning recipes).
    warmup_steps: Optional[int] = None
    # Optimizer steps in the run (there are no epochs: steps x global batch rows = rows trained on).
    # Required in every config but the demo: no length fits every data set.
    max_steps: Optional[int] = None
    # Global gradient-norm clip; 0 disables clipping.
    max_grad_norm: float = 1.0
    # FP8 recipe for linear layers: none, delayed scaling, current scaling, block scaling, MXFP8.
    fp8: Literal["none", "delayed", "current", "block", "mxfp8"] = "none"
    # Amax history length of the delayed-scaling recipe.
    fp8_amax_history_len: int = 1024
    # The LM head's three GEMMs in FP8 too (te_model/fp8_head.py). null (default): whenever train.fp8 is on
    # and the head's hidden size and vocabulary are multiples of 16; else the head stays bf16. true: the same,
    # and a model whose head does not fit stops the job. false: the head stays bf16. Fine-tuned at a 128k
    # vocabulary it reaches the bf16 head's held-out loss, in faster steps at every Llama shape measured
    # (docs/performance.md).
    fp8_head: Optional[bool] = None
    # Run the attention itself in FP8 too (cuDNN's FP8 fused attention; delayed or current only; trains on
    # Blackwell with cuDNN 9.23+). Off: attention stays bf16 between the FP8 projections.
    fp8_attention: bool = False
    # The gradients' FP8 GEMMs (data and weight gradients of the decoder's layers) with Hopper's fast
    # accumulation, as the forward's run, instead of TE's default of promoting their partial sums to fp32
    # every few blocks. null (default): on with train.fp8 delayed or current, off with the block recipes
    # (which need the promotion). true: the same, and a block recipe stops the job. false: TE's default.
    # Fine-tuned, it reaches the held-out loss of TE's default in faster steps (docs/performance.md).
    fp8_fast_accumulation: Optional[bool] = None
    # How bf16 parameters keep updates smaller than their rounding step (pipeline/train/optim.py).
    # bf16_kahan: a bf16 compensation buffer, 2 more bytes a parameter; it fine-tunes to the held-out loss
    # of fp32 master weights (docs/performance.md). bf16_kahan8: the same compensation in one byte a
    # parameter (int8 steps of 1/256 of the weight's bf16 step). fp32: an fp32 master copy in the optimizer,
    # 4 more bytes, sharded under fsdp. bf16_sr: stochastic rounding, no memory, unbiased but noisy. bf16:
    # round to nearest; fine-tuning updates below half a bf16 step are lost. No effect when model.dtype is
    # fp32: the parameters are then their own master.
    master_weights: Literal["fp32", "bf16_kahan", "bf16_kahan8", "bf16_sr", "bf16"] = "bf16_kahan"
    # Keep AdamW's two moments of every weight matrix in FP8 (E4M3 with a scale per 256 elements, rounded
    # stochastically; pipeline/train/optim.py) instead of the parameter's dtype: 2 bytes a parameter less
    # optimizer state (16 GB at 8B) and less to move in each update. Off: the moments stay bf16.
    moments_fp8: bool = False
    # Recompute decoder-layer activations in backward to save memory.
    activation_checkpointing: bool = False
    # Recompute only each decoder layer's MLP in backward: the MLP keeps just its input (not FC1's output,
    # the SwiGLU output nor, under FP8, its FP8 weights), for one more FC1 GEMM a layer. Less memory saved
    # than activation_checkpointing, for much less time (docs/performance.md, "Memory").
    recompute_mlp: bool = False
    # Under FP8, cast each decoder weight to FP8 again in backward instead of keeping the forward's FP8
    # copies (row-wise and transposed, 2 bytes a parameter) until then: less memory at a step's peak, for
    # one more cast of each weight a step (docs/performance.md, "Memory"). With grad_accum_steps > 1 the FP8
    # weights are then cast on every micro-batch, not once a step.
    recast_fp8_weights: bool = False
    # Under FP8 delayed scaling, the optimizer's update writes each decoder weight's FP8 copy (the codes TE's
    # cast would make, under the same scale) as it writes the weight, and every forward uses that copy instead
    # of casting the bf16 weight (te_model/fp8_weights.py): one read of each decoder weight less a step, and no
    # cast at all under gradient accumulation (docs/performance.md, "FP8 weights written by the update").
    # One GPU or ddp; not with fsdp, cuda_graphs, recast_fp8_weights or recomputation.
    fp8_weights_from_update: bool = False
    # Replay each decoder layer's forward and backward as CUDA graphs (te_model/graphs.py), captured at the
    # first step: short steps, whose host cannot launch TE's kernels as fast as the GPU runs them, run at
    # the GPU's pace. With grad_accum_steps > 1 under FP8 they cast the FP8 weights once per optimizer step.
    # One GPU worker, TE backend; batches with more packed documents than the captured layout has room for
    # run without the graphs. docs/performance.md ("CUDA graphs").
    cuda_graphs: bool = False
    # Run each step's AdamW update on a second CUDA stream beside the next step's forward, each block of which
    # waits only for its own parameters' update (pipeline/train/overlap.py). Same values as the update in
    # line. GPU workers with ddp; under fsdp, and on CPU, the update runs in line.
    overlap_update: bool = True
    # Save a resumable checkpoint every this many optimizer steps; 0 = only at the end. 500 (HF Trainer's
    # save_steps): a full-model checkpoint with optimizer state is several times the model's size.
    checkpoint_every: int = 500
    # Newest checkpoints kept; older ones are deleted.
    keep_checkpoints: int = 2
    # Log training metrics (to MLflow, and as a progress line on the job's output) every this many
    # optimizer steps; progress_every_s keeps slow runs showing life in between.
    log_every: int = 10
    # A progress line at least this often (seconds) even between log_every steps, so slow steps show life.
    progress_every_s: float = 60.0
    # How workers share the model: ddp = a whole replica each; fsdp = FSDP2, parameters, gradients and
    # optimizer state sharded over the workers (models too big for one GPU). See pipeline/train/parallel.py.
    parallelism: Literal["ddp", "fsdp"] = "ddp"
    # fsdp only: free each decoder layer's gathered weights after its forward (true, least memory) or
    # keep them until its backward (false: one all-gather fewer per layer and step, whole weights held).
    fsdp_reshard_after_forward: bool = True
    # When FP8 is requested but cannot run (no GPU, no Transformer Engine, unsupported GPU): false = stop
    # at job start with the reason; true = warn, train without FP8, tag the MLflow run fp8.fallback.
    fp8_fallback: bool = False
    # Worker-group restarts Ray Train makes after a worker dies or fails, each from the latest
    # checkpoint; 0 = none, -1 = unlimited.
    max_failures: int = 3
    # A step whose loss or gradient norm is NaN/Inf on any rank: stop the run, skip the step (no
    # optimizer update), or roll back to the last checkpoint and go on with the data after that step.
    on_nonfinite: Literal["stop", "skip", "rollback"] = "stop"
    # Non-finite steps skipped or rolled back in one run before it stops anyway.
    max_nonfinite_steps: int = 10

    @property
    def fast_accumulation(self) -> bool:
        """Whether training runs the gradients' FP8 GEMMs with fast accumulation (`fp8_fast_accumulation`)."""
        return self.fp8 in PER_TENSOR_RECIPES and self.fp8_fast_accumulation is not False

    def _validate(self) -> None:
        for name in ("workers", "micro_batch_size", "grad_accum_steps", "log_every", "fp8_amax_history_len"):
            self._require(getattr(self, name) >= 1, name, "must be >= 1")
        if self.max_steps is not None:  # unset: `load_config` and `require_max_steps` say so
            self._require(self.max_steps >= 1, "max_steps", "must be >= 1")
            if self.warmup_steps is None:
                self.warmup_steps = -(-self.max_steps * WARMUP_PERCENT // 100)  # integer ceiling
            self._require(self.warmup_steps <= self.max_steps, "warmup_steps", "must be <= train.max_steps")
        self._require(not (self.recompute_mlp and self.activation_checkpointing), "recompute_mlp",
                      "has no use with train.activation_checkpointing=true, which recomputes whole layers")
        self._require(self.keep_checkpoints >= 2, "keep_checkpoints",
                      "must be >= 2 (a corrupt newest checkpoint falls back to the one before it)")
        for name in ("weight_decay", "max_grad_norm", "checkpoint_every"):
            self._require(getattr(self, name) >= 0, name, "must be >= 0")
        self._require(self.warmup_steps is None or self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        self._require(self.lr > 0, "lr", "must be > 0")
        self._require(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", "must be in [0, 1]")
        self._require(self.fp8 == "none" or self.use_gpu or self.fp8_fallback, "fp8",
                      "needs GPU workers: set train.use_gpu=true, or train.fp8=none (or "
                      "train.fp8_fallback=true) to train on CPU without FP8")
        self._require(not self.fp8_attention or self.fp8 in PER_TENSOR_RECIPES, "fp8_attention",
                      f"needs train.fp8 set to delayed or current, not {self.fp8!r}")
        self._require(not self.fp8_fast_accumulation or self.fp8 in PER_TENSOR_RECIPES, "fp8_fast_accumulation",
                      f"true needs train.fp8 set to delayed or current, not {self.fp8!r}; leave it null or set it false")
        self._require(not self.fp8_head or self.fp8 != "none", "fp8_head",
                      "true needs train.fp8 set to a recipe (the head runs in FP8 beside FP8 layers); "
                      "leave it null or set it false")
        self._require(not self.recast_fp8_weights or self.fp8 != "none", "recast_fp8_weights",
                      "true needs train.fp8 set to a recipe (without FP8 there are no FP8 weights to cast)")
        if self.fp8_weights_from_update:
            self._require(self.fp8 == "delayed", "fp8_weights_from_update",
                          f"needs train.fp8=delayed (the scale it casts with is delayed scaling's), not {self.fp8!r}")
            for other in ("cuda_graphs", "recast_fp8_weights", "activation_checkpointing", "recompute_mlp"):
                self._require(not getattr(self, other), "fp8_weights_from_update",
                              f"cannot be combined with train.{other}")
            self._require(self.parallelism == "ddp", "fp8_weights_from_update",
                          "needs train.parallelism=ddp (fsdp shards the weights it would write whole)")
        if self.cuda_graphs:
            self._require(self.use_gpu, "cuda_graphs", "needs GPU workers (train.use_gpu=true)")
            self._require(self.workers == 1, "cuda_graphs", "runs on one worker; set train.workers=1 or turn it off")
            for other in ("activation_checkpointing", "recompute_mlp", "fp8_attention"):
                self._require(not getattr(self, other), "cuda_graphs", f"cannot be combined with train.{other}")
        self._require(self.max_failures >= -1, "max_failures", "must be >= -1 (-1 = unlimited)")
        self._require(self.max_nonfinite_steps >= 0, "max_nonfinite_steps", "must be >= 0")
        self._require(self.progress_every_s > 0, "progress_every_s", "must be > 0")
        if self.global_batch_size is not None:
            self._derive_grad_accum()

    def _derive_grad_accum(self) -> None:
        per_pass = self.workers * self.micro_batch_size
        divisible = self.global_batch_size >= 1 and self.global_batch_size % per_pass == 0
        self._require(divisible, "global_batch_size", f"must be a multiple of train.workers x "
                      f"train.micro_batch_size = {self.workers} x {self.micro_batch_size} = {per_pass}; "
                      "change one of the three")
        steps = self.global_batch_size // per_pass
        self._require(self.grad_accum_steps in (1, steps), "grad_accum_steps",
                      f"contradicts train.global_batch_size (which needs {steps}); set only one of them")
        self.grad_accum_steps = steps


@dataclass
class EvalConfig(_Section):
    section: ClassVar[str] = "eval"
    # Packed validation rows per forward pass (no gradients or optimizer state, so more than
    # train.micro_batch_size fit; the logits of a 128k-token vocabulary bound it).
    batch_size: int = 2
    # Validation batches scored for loss/perplexity; None = the whole validation split. 50 batches of
    # 2 rows of 2048 tokens: about 200k tokens, a stable loss without scoring a large split in full.
    max_batches: Optional[int] = 50
    # How many of `prompts` get a generated completion logged.
    num_samples: int = 3
    # Greedy generation length per sample (128: a few sentences of an answer).
    max_new_tokens: int = 128
    # A registered model version to score on the same held-out rows as the fine-tuned model, as
    # models:/<name>/<version> (the retrain scheduler sets it to its champion, for a fair gate); its
    # results are logged as champion/val_loss and champion/perplexity. null = none.
    champion: Optional[str] = None
    # Prompts for generated samples, laid out as data.format trains them; none by default, since no
    # prompt suits every data set: give a few that show what the fine-tune should have learned.
    prompts: list[str] = field(default_factory=list)

    def _validate(self) -> None:
        self._require(self.batch_size >= 1, "batch_size", "must be >= 1")
        self._require(self.max_batches is None or self.max_batches >= 1, "max_batches", "must be >= 1")
        self._require(self.num_samples >= 0, "num_samples", "must be >= 0")
        self._require(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
        self._require(self.champion is None or bool(_MODEL_VERSION_URI.match(self.champion)), "champion",
                      "must look like models:/<registered model>/<version>")


@dataclass
class ExportConfig(_Section):
    section: ClassVar[str] = "export"
    # Largest safetensors shard of the exported checkpoint, e.g. "2GB", "200KB"; 5GB is what
    # `save_pretrained` and Meta's Llama repos on the Hub use.
    max_shard_size: str = "5GB"
    # MLflow registered-model name the export is registered under; null = do not register. Required
    # (a name or null) in every config but the demo.
    registered_model_name: Optional[str] = None

    def _validate(self) -> None:
        well_formed = bool(_SHARD_SIZE.match(self.max_shard_size))
        self._require(well_formed, "max_shard_size", "must look like 2GB or 200KB")
        self._require_name("registered_model_name", "a key of the MLflow model registry")


@dataclass
class TrackingConfig(_Section):
    section: ClassVar[str] = "tracking"
    # MLflow tracking uri: http(s):// server, sqlite:/// database or local folder; unset =
    # $MLFLOW_TRACKING_URI, else a SQLite database in .cache/ (under `ray job submit`: see pipeline.job.locations).
    uri: Optional[str] = None
    # MLflow experiment name; unset = $MLFLOW_EXPERIMENT_NAME, else run.experiment.
    experiment: Optional[str] = None

    def _validate(self) -> None:
        if self.uri is None:
            self.uri = os.environ.get("MLFLOW_TRACKING_URI") or LOCAL_TRACKING_URI
        scheme = split_uri("tracking.uri", self.uri).scheme
        self._require(scheme in ("http", "https", "sqlite", "file", ""), "uri",
                      "must be an http(s):// MLflow server, a sqlite:/// database or a local folder")


_SECTIONS: dict[str, type[_Section]] = {
    "run": RunConfig, "storage": StorageConfig, "model": ModelConfig, "data": DataConfig,
    "train": TrainConfig, "eval": EvalConfig, "export": ExportConfig, "tracking": TrackingConfig,
}


@dataclass
class Config:
    """The whole pipeline configuration; sections are checked on construction."""

    run: RunConfig = field(default_factory=RunConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        for name, cls in _SECTIONS.items():
            section = getattr(self, name)
            if not isinstance(section, cls):
                raise PipelineError(f"{name}: expected a {cls.__name__}, got {type(section).__name__}")
        if self.tracking.experiment is None:
            self.tracking.experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or self.run.experiment

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain nested dict (YAML/JSON-safe); `Config.from_dict(c.to_dict()) == c`."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Config":
        """Build from a nested dict; missing keys take defaults, unknown keys are errors."""
        if not isinstance(raw, dict):
            raise PipelineError(f"config must be a mapping of sections, got {type(raw).__name__}")
        sections = {}
        for name, values in raw.items():
            if name not in _SECTIONS:
                raise PipelineError(_unknown_key_message(str(name), list(_SECTIONS)))
            if values is None:
                values = {}
            if not isinstance(values, dict):
                raise PipelineError(f"{name}: expected a mapping of keys, got {type(values).__name__}")
            for key in values:
                _check_known_key(f"{name}.{key}")
            sections[name] = _SECTIONS[name](**values)
        return cls(**sections)

    def to_yaml(self) -> str:
        """The config as YAML text, loadable again with `load_config`."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def flat_params(self) -> dict[str, Any]:
        """Every setting keyed by its dotted name, e.g. {"train.lr": 3e-3}, for MLflow params."""
        sections = self.to_dict().items()
        return {f"{section}.{key}": value for section, values in sections for key, value in values.items()}


def field_docs(cls: type) -> dict[str, str]:
    """Each field's documentation: the comment lines right above it in the class body."""
    docs, comment = {}, []
    for line in inspect.getsource(cls).splitlines():
        text = line.strip()
        if text.startswith("#"):
            comment.append(text.lstrip("#").strip())
            continue
        match = re.match(r"^(\w+): [^=]+(=|$)", text)
        if match and match.group(1) in {f.name for f in dataclasses.fields(cls)}:
            docs[match.group(1)] = " ".join(comment)
        comment = []
    return docs


def describe_keys() -> str:
    """Every key a config may set: type, default and documentation (what `--list-keys` prints)."""
    lines = []
    for section, cls in _SECTIONS.items():
        hints, docs = typing.get_type_hints(cls), field_docs(cls)
        for f in dataclasses.fields(cls):
            value = f.default_factory() if f.default is dataclasses.MISSING else f.default
            default = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
            lines.append(f"{section}.{f.name}  ({_type_name(hints[f.name])}; default {default})")
            lines.append(f"    {docs.get(f.name) or '(undocumented)'}")
    return "\n".join(lines)


def valid_keys() -> list[str]:
    """All dotted keys a preset or override may set."""
    return [f"{name}.{f.name}" for name, cls in _SECTIONS.items() for f in dataclasses.fields(cls)]


def load_config(path: str | None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML preset at `path` (a file or a name in configs/; None = the demo), then
    `key=value` overrides. A config other than the demo must set `REQUIRED_KEYS`.

    - The tiny CPU demo is `configs/tiny-cpu.yaml`. It sets every value it needs, so its settings never
      reach another config.
    - Field defaults are for real full-parameter fine-tunes of Llama 2/3/3.x on GPUs (bf16, 2048-token
      rows, one GPU per worker). Where no value fits every job (the base model, the data, the registered
      model, the length of the run), a config must set the key, or the load fails in one line naming it.
      `run.name` left unset is the config file's name.
    - MLflow's own conventions hold where the config is silent. `tracking.uri` unset is
      $MLFLOW_TRACKING_URI, else a local SQLite store (`LOCAL_TRACKING_URI`). `tracking.experiment` unset
      is $MLFLOW_EXPERIMENT_NAME, else `run.experiment`, else `run.name`.
    - Override values are parsed with `yaml.safe_load`, so `train.lr=2e-5`, `train.use_gpu=true` and
      `data.train_files=[a.jsonl,b.jsonl]` mean what they look like. `key=` or `key=null` means None.
      Text that is not valid YAML (a Jinja template) is taken verbatim.
    - Float fields also accept strings such as "2e-5". PyYAML (YAML 1.1) reads exponent numbers without
      a dot as strings, which would otherwise make the most common learning-rate spelling an error.
    - Uris never carry credentials. The resolved config goes into MLflow params and into every
      checkpoint, so a `user:password@` in a storage or tracking uri is refused, without repeating it.
      Storage uris are s3://bucket/..., file://..., hf://... (Hub, read-only) or local paths.
    """
    file = DEMO_PRESET if path is None else _preset_file(path)
    raw = _read_preset(str(file))  # absent sections and keys take the defaults
    demo = file.resolve() == DEMO_PRESET.resolve()
    if file.resolve().parent == PRESET_DIR.resolve():  # before the overrides: only a shipped preset's own
        _find_shipped_inputs(raw)                      # inputs are the project's shipped files
    for override in overrides or []:
        key, value = _parse_override(override)
        section, name = key.split(".", 1)
        if not isinstance(raw.get(section), dict):
            raw[section] = {}
        raw[section][name] = value
    raw["run"] = raw.get("run") or {}
    if raw["run"].get("name") is None:
        raw["run"]["name"] = file.stem
    cfg = Config.from_dict(raw)  # unknown keys and bad values first: they are the likelier typo
    if not demo:
        for key in REQUIRED_KEYS:
            section, name = key.split(".")
            if name not in (raw.get(section) or {}):
                raise PipelineError(f"{key} is not set in {path}: {_REQUIRED_HINTS[key]}")
    require_max_steps(cfg)  # `max_steps: null` is set, but still no length
    if not cfg.data.train_files:
        raise PipelineError("data.train_files must list at least one uri (got [])")
    return cfg


def _find_shipped_inputs(raw: dict) -> None:
    """A shipped preset's data files are the project's own (`data/`), named relative to its root. Run from
    another folder, each that is not there is taken from the project's root instead, so the demo (and
    `gpu-small-fp8`) runs anywhere."""
    data = raw.get("data") or {}
    files = data.get("train_files")
    if isinstance(files, list):
        data["train_files"] = [str(PROJECT_ROOT / f) if isinstance(f, str) and "://" not in f
                               and not Path(f).is_absolute() and not Path(f).exists()
                               and (PROJECT_ROOT / f).exists() else f for f in files]


def built_base(base_uri: str) -> str | None:
    """The name of the base the job builds itself that `base_uri` (as a config gives it) names, else None."""
    store, _, name = base_uri.rstrip("/").rpartition("/")
    return name if store == DEMO_STORE and name in BUILT_BASES else None


def require_max_steps(cfg: Config) -> int:
    """`train.max_steps`, which a job that trains must have; a config built in code may leave it unset."""
    if cfg.train.max_steps is None:
        raise PipelineError(f"train.max_steps is not set: {_REQUIRED_HINTS['train.max_steps']}")
    return cfg.train.max_steps


_REQUIRED_HINTS = {
    "model.base_uri": "name the base checkpoint to fine-tune (s3://bucket/path, a local folder or hf://org/name@revision)",
    "data.train_files": "list the training data files (s3://..., local paths)",
    "train.max_steps": "give the optimizer steps of the run (steps x global batch rows = rows trained on)",
    "export.registered_model_name": "name the MLflow registered model for the result (or null: do not register)",
}


def _preset_file(path: str) -> Path:
    file = Path(path)
    if not file.exists() and (PRESET_DIR / f"{path}.yaml").exists():
        file = PRESET_DIR / f"{path}.yaml"
    return file


def _read_preset(path: str) -> dict[str, Any]:
    file = _preset_file(path)
    if not file.is_file():
        presets = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
        raise PipelineError(f"config file not found: {path}; give a YAML file or a preset name ({presets})")
    data = file.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise PipelineError(f"{file}: not UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
                            "re-encode the file as UTF-8") from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader that refuses duplicate keys
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{file}:{mark.line + 1}:{mark.column + 1}" if mark else str(file)
        raise PipelineError(f"invalid YAML at {where}: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise PipelineError(f"invalid YAML in {file}: {str(exc).splitlines()[0]}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise PipelineError(f"{file}: top level must be a mapping of sections, got {type(raw).__name__}")
    return raw


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice in one mapping is an error naming it and its line
    (PyYAML keeps the last value silently, so an edit further down could undo one above unseen)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise yaml.MarkedYAMLError(problem=f"key {key!r} given twice (first on line {seen[key]})",
                                           problem_mark=key_node.start_mark)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _parse_override(override: str) -> tuple[str, Any]:
    if "=" not in override:
        raise PipelineError(f"override {override!r} must look like section.key=value")
    key, text = override.split("=", 1)
    key = key.strip()
    _check_known_key(key)
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text  # not YAML (e.g. a Jinja template): the raw text, still type-checked as a string
    return key, value


def _check_known_key(key: str) -> None:
    keys = valid_keys()
    if key not in keys:
        raise PipelineError(_unknown_key_message(key, keys))


def _unknown_key_message(key: str, candidates: list[str]) -> str:
    section, _, leaf = key.rpartition(".")
    alias = _ALIASES.get(leaf)
    guess = f"{section}.{alias}" if alias and f"{section}.{alias}" in candidates else None
    if guess is None:
        matches = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
        guess = matches[0] if matches else None
    if guess:
        return f"unknown key '{key}' (did you mean '{guess}'?)"
    sections = sorted({c.partition(".")[0] for c in candidates}, key=list(_SECTIONS).index)
    if section and section not in sections:
        return f"unknown key '{key}': no section {section!r}; valid sections: {', '.join(sections)}"
    valid = [c.rpartition(".")[2] for c in candidates if c.rpartition(".")[0] == section]
    return f"unknown key '{key}'; valid {f'keys of {section!r}' if section else 'sections'}: {', '.join(valid)}"


def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is list:
        return f"list of {_type_name(args[0])}"
    return {int: "int", float: "float", str: "str", bool: "bool (true/false)"}.get(hint, str(hint))


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """`value` checked against `hint` (int→float and "2e-5"→float allowed); PipelineError naming `key`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        try:
            return _coerce(key, value, inner[0]) if len(inner) == 1 else _fail(key, value, hint)
        except PipelineError as exc:
            if str(exc).startswith(f"{key}: "):  # the value itself is wrong, not one of its list items
                _fail(key, value, hint)
            raise
    if origin is Literal:
        return value if value in args and isinstance(value, str) else _fail(key, value, hint)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            _fail(key, value, hint)
        return [_coerce(f"{key}[{i}]", item, args[0]) for i, item in enumerate(value)]
    if hint is float:
        return _as_float(key, value, hint)
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint in (str, bool) and isinstance(value, hint):
        return value
    return _fail(key, value, hint)


def _as_float(key: str, value: Any, hint: Any) -> float:
    number = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            pass
    return number if number is not None and math.isfinite(number) else _fail(key, value, hint)


def _fail(key: str, value: Any, hint: Any) -> Any:
    raise PipelineError(f"{key}: expected {_type_name(hint)}, got {type(value).__name__} {value!r}")
