"""What every bench script shares: the model shapes, one set of starting weights, timing and reporting.

Shapes are LlamaConfigs with the real dimensions (`SHAPES`); `tiny` is for CPU smoke runs. Every
variant starts from one seeded HF `LlamaForCausalLM`'s weights, loaded into ours through te_model's
key table. A step is timed with CUDA events on a GPU (no host sync in the timed loop), with the wall
clock on CPU; scripts report the median. Transformer Engine is imported before any other CUDA work,
since on some hosts loading it after torch's own cuDNN fails with an undefined symbol.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import threading
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import te_model
from te_model.backend import te_unavailable_reason
from te_model.model import _default_dtype as default_dtype  # the one dtype-scoping helper
from te_model.weights import fc1_part, hf_to_te_key, te_to_hf_keys

DATASHEET_BF16_FLOPS = 989e12  # H100 SXM dense bf16 tensor-core peak
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 32.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
LLAMA31_ROPE = {**LLAMA3_ROPE, "factor": 8.0}
SHAPES = {
    "llama3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                        num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True,
                        max_position_embeddings=131072, rope_parameters=LLAMA3_ROPE),
    "llama3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False,
                        max_position_embeddings=131072, rope_parameters=LLAMA31_ROPE),
    # the model of tests/gpu/test_scaling.py: Llama 3 layers at 380M parameters, a 512-token vocabulary
    "llama-380m": dict(vocab_size=512, hidden_size=2048, intermediate_size=5632, num_hidden_layers=8,
                       num_attention_heads=16, num_key_value_heads=8, tie_word_embeddings=False,
                       max_position_embeddings=131072, rope_parameters={"rope_type": "default", "rope_theta": 5e5}),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                 max_position_embeddings=131072, rope_parameters=LLAMA31_ROPE),
}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def llama_config(shape: str, layers: int | None = None) -> LlamaConfig:
    """The LlamaConfig of a named shape; `layers` overrides the depth (embedding and lm_head stay real)."""
    if shape not in SHAPES:
        raise SystemExit(f"--shape {shape!r} is unknown; choose from {', '.join(SHAPES)}")
    kwargs = dict(SHAPES[shape], rms_norm_eps=1e-5, use_cache=False, attn_implementation="sdpa")
    if layers:
        kwargs["num_hidden_layers"] = layers
    return LlamaConfig(**kwargs)


def setup_device(name: str) -> torch.device:
    """The torch device for `--device`; on CUDA, TE (if installed) is imported before anything else."""
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is visible")
        te_unavailable_reason()  # imports TE first, when it can be imported at all
    return device


def ours_backend(device: torch.device) -> tuple[str, str | None]:
    """('te' or 'torch', why TE is not used or None) for our model on `device`."""
    reason = te_unavailable_reason() if device.type == "cuda" else f"device is {device.type}"
    return ("torch", reason) if reason else ("te", None)



def build_hf(config: LlamaConfig, dtype: torch.dtype, device: torch.device) -> LlamaForCausalLM:
    """Stock HF LlamaForCausalLM (SDPA attention), parameters in `dtype` on `device`."""
    with torch.device(device), default_dtype(dtype):
        return LlamaForCausalLM(config)


def reference_state(config: LlamaConfig, dtype: torch.dtype, device: torch.device, seed: int) -> dict:
    """The starting weights of every variant: a seeded HF model's state dict, on the host."""
    torch.manual_seed(seed)
    model = build_hf(config, dtype, device)
    state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    del model
    free_memory()
    return state


@torch.no_grad()
def load_hf_state(model: torch.nn.Module, state: dict) -> None:
    """Copy an HF Llama state dict into our model through te_model's key table; every parameter is filled."""
    params = dict(model.named_parameters())
    filled = set()
    for key, tensor in state.items():
        if key == "lm_head.weight" and model.config.tie_word_embeddings:
            continue  # tied: the embedding matrix is the head
        target_key = hf_to_te_key(key)
        if target_key is None:
            continue  # buffers such as rotary inv_freq: computed from the config by both models
        target = fc1_part(params[target_key[0]], target_key[1])
        if target.shape != tensor.shape:
            raise ValueError(f"weight {key}: shape {tuple(tensor.shape)}, our model has {tuple(target.shape)}")
        target.copy_(tensor)
        filled.add(target_key)
    # fc1 holds two HF tensors (gate, up): each half counts on its own
    unfilled = sorted(hf for name in params for hf, _ in te_to_hf_keys(name) if hf_to_te_key(hf) not in filled)
    if unfilled:
        raise ValueError(f"reference weights left {len(unfilled)} tensors unset, e.g. {unfilled[0]}")


def step_inputs(model_kind: str, ids: torch.Tensor, device: torch.device, *, planned_on_device: bool = False) -> dict:
    """One step's model inputs from token ids (B, S) on the host, the ids being their own labels.

    HF's model and the peers (`bench.peers`, kind "peer") take the tokens on the device. Ours takes them as the pipeline's training step hands them
    over (`te_model.prepare_batch`: the attention plan and the loss's scored positions found on the host).
    With `planned_on_device` it gets position ids on the device instead. It then plans on the device (two
    host syncs) and selects the loss's positions there (one more): what a caller gets who hands it
    device tensors only.
    """
    if model_kind in ("hf", "peer"):
        ids = te_model.to_device(ids, device)
        return {"input_ids": ids, "labels": ids}
    if planned_on_device:
        ids = te_model.to_device(ids, device)
        positions = torch.arange(ids.shape[1], device=device).expand_as(ids)
        return {"input_ids": ids, "labels": ids, "position_ids": positions}
    return te_model.prepare_batch({"input_ids": ids, "labels": ids}, device)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def graph_pool_unallocated_gib(device: torch.device) -> float:
    """GiB that CUDA graphs' private memory pools hold on `device` beyond their allocated tensors. The
    tensors a captured graph keeps inside it (its activations) count as freed once captured, and a replay
    allocates nothing: no statistic of allocated memory counts them, this does. The pools' tensors still
    referenced (the graphs' inputs, outputs and gradient buffers) are allocated, and counted there."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return sum(seg["total_size"] - seg["allocated_size"] for seg in torch.cuda.memory_snapshot(include_traces=False)
               if seg["device"] == index and tuple(seg["segment_pool_id"]) != (0, 0)) / 2**30


class StepTimer:
    """Times steps with CUDA events (read after the loop, so no host sync per step) or the wall clock."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def step_ms(self) -> list[float]:
        """Milliseconds between consecutive marks."""
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:])]


class GpuSampler:
    """The GPU's SM clock (MHz) and board power (W), read through NVML every `every_s` on a thread from
    `start` to `stop`. An H200 training at full rate sits at its power limit and lowers its clock:
    a step's time then follows the energy it needs, which these readings show. A no-op off CUDA or
    without NVML (`nvidia-ml-py`)."""

    def __init__(self, device: torch.device, every_s: float = 0.05):
        self.device, self.every_s = device, every_s
        self.clocks: list[float] = []
        self.watts: list[float] = []
        self._stop = threading.Event()
        self._thread = None

    def _read(self) -> None:
        self.clocks.append(float(torch.cuda.clock_rate(self.device)))
        self.watts.append(torch.cuda.power_draw(self.device) / 1e3)  # NVML gives milliwatts

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self._read()

    def start(self) -> None:
        if self.device.type == "cuda":
            try:
                self._read()
            except (ModuleNotFoundError, RuntimeError):  # no NVML here: nothing is sampled
                return
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def summary(self, step_ms: float | None = None) -> dict | None:
        """Median SM MHz and watts over the samples, and their count; with `step_ms`, also the energy of a
        step (the median watts times it). None when nothing was sampled."""
        if not self.clocks:
            return None
        summary = {"sm_clock_mhz": statistics.median(self.clocks), "power_w": statistics.median(self.watts),
                   "samples": len(self.clocks)}
        if step_ms is not None:
            summary["joules_per_step"] = summary["power_w"] * step_ms / 1e3
        return summary


def attention_flops(layers: int, batch: int, seq: int, hidden: int) -> float:
    """Causal attention's FLOPs in a training step (forward and backward): 6 x layers x batch x seq^2 x hidden,
    the count every bench adds to its GEMMs'."""
    return 6 * layers * batch * seq**2 * hidden


def launches(p: argparse.ArgumentParser, flag: str, text: str, multiple: int) -> list[tuple[int, int]]:
    """`flag`'s ELEMENTSxWARPS[,...] as (elements, warps) pairs; elements a power of two and a multiple of
    `multiple`, warps a power of two."""
    try:
        pairs = [tuple(int(x) for x in item.split("x")) for item in text.split(",")]
    except ValueError:
        p.error(f"{flag} {text!r}: expected ELEMENTSxWARPS[,...], e.g. 1024x4")
    for pair in pairs:
        if len(pair) != 2 or min(pair) < 1 or pair[0] % multiple or pair[0] & (pair[0] - 1) or pair[1] & (pair[1] - 1):
            p.error(f"{flag} {'x'.join(map(str, pair))}: elements must be a power of two and a multiple of "
                    f"{multiple}, warps a power of two")
    return pairs


def matmul_peak_flops(device: torch.device, size: int, reps: int = 10) -> float:
    """Measured bf16 matmul FLOP/s: the median of `reps` (size x size) @ (size x size) products."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(2):
        a @ b
    return 2 * size**3 / (kernel_median_ms(lambda: a @ b, reps, device) / 1e3)


def kernel_median_ms(fn, reps: int, device: torch.device = torch.device("cuda")) -> float:
    """The median time of `fn()` over `reps` calls back to back after one warm-up call (`StepTimer`)."""
    fn()
    timer = StepTimer(device)
    timer.mark()
    for _ in range(reps):
        fn()
        timer.mark()
    return statistics.median(timer.step_ms())


def write_json(path: str | None, result: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2, default=str) + "\n")


def run_bench(argv, parse_args, measure, print_table) -> dict:
    """A bench script's main: parse `argv`, measure, write the result as JSON where `--out` says, print its
    table; the result."""
    args = parse_args(argv)
    result = measure(args)
    write_json(args.out, result)
    print_table(result)
    return result


def fmt(value, spec: str) -> str:
    """A table cell: the number formatted, or '-' when missing."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec)


def environment(device: torch.device) -> dict:
    """Versions and hardware, for the record."""
    import transformers

    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "transformers": transformers.__version__,
            "cuda": torch.version.cuda, "te_available": te_unavailable_reason() is None}
    if info["te_available"]:
        import transformer_engine
        from transformer_engine.pytorch.utils import get_cudnn_version  # the cuDNN TE itself runs on

        info["transformer_engine"] = transformer_engine.__version__
        info["cudnn_for_te"] = ".".join(map(str, get_cudnn_version()))
    info["host_cpu"] = host_cpu()
    info["time"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    return info


def host_cpu() -> str:
    """The host's CPU model and logical core count: eager TE steps at short shapes go at the host's pace,
    so runs on different hosts are compared knowing their CPUs."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:  # not Linux
        pass
    return f"{model}, {os.cpu_count()} logical cores"


