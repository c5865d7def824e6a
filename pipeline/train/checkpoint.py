"""Resumable training checkpoints in safetensors and JSON only, so loading one never unpickles.

A checkpoint is one directory, written whole by rank 0 from every rank's state, so one manifest
vouches for every file. Optimizer state is keyed by parameter name, so a mismatch fails naming the
tensor instead of loading moments into the wrong parameter. Tensors move one at a time through host
memory, both ways. TE's FP8 `_extra_state` is not saved, because TE pickles it. The directory's
layout and the reasons: docs/architecture.md ("Checkpoints").
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from pipeline.train import parallel
from pipeline.errors import PermanentError, PipelineError
from pipeline.storage.manifest import write_manifest

FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
OPTIMIZER_GROUPS_FILE = "optimizer.json"
SCHEDULER_FILE = "scheduler.json"
TRAINER_STATE_FILE = "trainer_state.json"
RNG_FILE = "rng.safetensors"
RANK_STATE_FILE = "state.json"


def rank_dir(rank: int) -> str:
    """Folder of a rank's own files inside a checkpoint."""
    return f"rank-{rank}"


def _json_bytes(value: Any) -> bytes:
    return (json.dumps(value, indent=2) + "\n").encode()


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise PipelineError(f"checkpoint file missing: {path}")
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise PipelineError(f"{path}: invalid JSON ({exc})") from None


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise PipelineError(f"checkpoint file missing: {path}")
    try:
        return load_file(path, device="cpu")
    except SafetensorError as exc:
        raise PipelineError(f"{path}: unreadable safetensors ({exc})") from None


# ---------------------------------------------------------------------------------------------------
# per-rank state: RNG and data position
# ---------------------------------------------------------------------------------------------------
def rank_files(data_position: dict[str, int]) -> dict[str, bytes]:
    """This rank's RNG states and data position, as the bytes of the files rank 0 will write for it."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{index}"] = state
    version, internal, gauss_next = random.getstate()
    state = {"python_random": [version, list(internal), gauss_next], "data": data_position}
    return {RNG_FILE: save(tensors), RANK_STATE_FILE: _json_bytes(state)}


def gather_bytes(blob: bytes) -> list[bytes]:
    """Every rank's `blob`, in rank order (a collective: all ranks call it). Bytes, never pickles."""
    if not (dist.is_available() and dist.is_initialized()):
        return [blob]
    # NCCL moves CUDA tensors only; gloo moves CPU tensors.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    size = torch.tensor([len(blob)], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    longest = max(int(s) for s in sizes)
    padded = torch.zeros(longest, dtype=torch.uint8)
    padded[: len(blob)] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    padded = padded.to(device)
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return [part[: int(s)].cpu().numpy().tobytes() for part, s in zip(parts, sizes)]


def gather_rank_files(files: dict[str, bytes]) -> list[dict[str, bytes]]:
    """`rank_files` of every rank, in rank order (a collective: all ranks call it)."""
    gathered = {name: gather_bytes(files[name]) for name in sorted(files)}
    world = len(next(iter(gathered.values())))
    return [{name: blobs[rank] for name, blobs in gathered.items()} for rank in range(world)]


def restore_rank_state(local_dir: Path, rank: int) -> dict[str, int]:
    """Restore this rank's RNG states from a checkpoint; returns its data position {epoch, offset}."""
    folder = local_dir / rank_dir(rank)
    tensors = _load_tensors(folder / RNG_FILE)
    state = _read_json(folder / RANK_STATE_FILE)
    torch.set_rng_state(tensors["torch_cpu"])
    cuda_states = [tensors[f"cuda.{i}"] for i in range(len(tensors)) if f"cuda.{i}" in tensors]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    version, internal, gauss_next = state["python_random"]
    random.setstate((version, tuple(internal), gauss_next))
    return {"epoch": int(state["data"]["epoch"]), "offset": int(state["data"]["offset"])}


# ---------------------------------------------------------------------------------------------------
# model and optimizer
# ---------------------------------------------------------------------------------------------------
def model_entries(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(TE-style name, parameter) for every parameter, in the order checkpoints write them; no buffers and
    no `_extra_state`. Sharded (FSDP) parameters are DTensors: writing gathers them one at a time."""
    return [(name, p.detach()) for name, p in module.named_parameters()]


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:5])
    return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "")


@torch.no_grad()
def load_model_weights(module: torch.nn.Module, path: str | Path) -> None:
    """Copy a `model.safetensors` into `module`, one tensor in memory at a time.

    Strict: every parameter present with its shape and nothing else, or a PipelineError naming the
    tensors. Used to resume training and to load a trained checkpoint for eval and export.
    """
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"checkpoint file missing: {path}")
    params = dict(module.named_parameters())  # a tied LM head is the embedding, listed once
    with safe_open(path, framework="pt") as f:
        keys = set(f.keys())
        missing, unexpected = sorted(set(params) - keys), sorted(keys - set(params))
        problems = ([f"missing tensors {_names(missing)}"] if missing else []) + (
            [f"unexpected tensors {_names(unexpected)} (each is not a model parameter)"] if unexpected else [])
        if problems:
            raise PermanentError(f"{path} does not match the model: {'; '.join(problems)}")
        for name, param in params.items():
            tensor = f.get_tensor(name)
            if tuple(tensor.shape) != tuple(param.shape):
                raise PermanentError(f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                                     f"the model expects {tuple(param.shape)}")
            param.copy_(parallel.shard_like(tensor, param))


def _ordered_names(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the optimizer's own index order (the order of `state_dict()["state"]`)."""
    names = {id(p): name for name, p in module.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def optimizer_entries(module: torch.nn.Module,
                      optimizer: torch.optim.Optimizer) -> tuple[list[tuple[str, torch.Tensor]], list]:
    """(`{param name}.{field}` and tensor for every piece of AdamW state, param_groups with parameter names).
    Sharded moments are DTensors, gathered when written, like `model_entries`."""
    names = _ordered_names(module, optimizer)
    state = optimizer.state_dict()
    entries = [(f"{names[index]}.{field}", value.detach() if torch.is_tensor(value) else torch.tensor(value))
               for index, fields in state["state"].items() for field, value in fields.items()]
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[i] for i in g["params"]]}
              for g in state["param_groups"]]
    return entries, groups


SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
                      torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}


def save_streamed(entries: list[tuple[str, torch.Tensor]], path: Path | None) -> None:
    """Write `entries` as one safetensors file, one whole tensor in host memory at a time.

    The header is known from the shapes alone (a DTensor's shape is the whole tensor's), so it is
    written first. Each tensor's bytes follow as soon as it is gathered. So rank 0 needs one tensor's
    worth of host memory, not the model's and its optimizer's. Every worker calls this with the same
    entries, because gathering a sharded tensor is a collective; workers that write nothing pass
    `path=None` and only take part in the gathers.
    """
    if path is None:
        for _, tensor in entries:
            if parallel.is_sharded(tensor):
                parallel.full_tensor(tensor)
        return
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, tensor in entries:
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned, as safetensors' own writer does
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head)
        for _, tensor in entries:
            whole = parallel.full_tensor(tensor).to("cpu").contiguous()
            f.write(whole.reshape(-1).view(torch.uint8).numpy().data)
            del whole


def load_optimizer_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer, path: Path,
                         groups: list[dict]) -> None:
    """Load name-keyed optimizer state from `path`; the saved groups must hold the model's parameters in order.

    One tensor is in host memory at a time. Each is read, moved to its parameter's device (this worker's
    shard of it, for a sharded parameter) and dropped. So resuming an 8B run needs about one embedding's
    worth of host memory per process, not the whole optimizer file.
    """
    where = str(path)
    names = _ordered_names(module, optimizer)
    saved = [name for group in groups for name in group["params"]]
    if saved != names:
        odd = sorted(set(saved) ^ set(names)) or ["the parameter order"]
        raise PermanentError(f"{where}: optimizer groups do not match the model's parameters ({odd[0]!r} differs)")
    index = {name: i for i, name in enumerate(names)}
    params = dict(module.named_parameters())
    state: dict[int, dict[str, torch.Tensor]] = {}
    if not path.is_file():
        raise PipelineError(f"checkpoint file missing: {path}")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            for key in sorted(f.keys()):  # the same order on every worker: sharding moments is a collective
                name, _, field = key.rpartition(".")
                if name not in index:
                    raise PermanentError(f"{where}: optimizer state {key!r} names no model parameter")
                tensor, param = f.get_tensor(key), params[name]
                if tensor.dim():  # moments; the 0-d step stays where the optimizer wants it
                    tensor = (parallel.shard_like(tensor, param, keep_dtype=True) if parallel.is_sharded(param)
                              else tensor.to(param.device))
                state.setdefault(index[name], {})[field] = tensor
    except SafetensorError as exc:
        raise PipelineError(f"{path}: unreadable safetensors ({exc})") from None
    param_groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [index[n] for n in g["params"]]}
                    for g in groups]
    optimizer.load_state_dict({"state": dict(sorted(state.items())), "param_groups": param_groups})


# ---------------------------------------------------------------------------------------------------
# the whole directory
# ---------------------------------------------------------------------------------------------------
def join_gather(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """What a worker that writes nothing does while rank 0 runs `write_checkpoint`: take part in gathering
    sharded tensors, in the same order (nothing at all when nothing is sharded)."""
    save_streamed(model_entries(module), None)
    save_streamed(optimizer_entries(module, optimizer)[0], None)


def write_checkpoint(out_dir: str | Path, *, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     scheduler: torch.optim.lr_scheduler.LRScheduler, trainer_state: dict[str, Any],
                     ranks: list[dict[str, bytes]]) -> Path:
    """Write a complete checkpoint into `out_dir` (rank 0 only, while the other ranks `join_gather`),
    manifest last; returns the dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_streamed(model_entries(module), out / MODEL_FILE)
    entries, groups = optimizer_entries(module, optimizer)
    save_streamed(entries, out / OPTIMIZER_FILE)
    (out / OPTIMIZER_GROUPS_FILE).write_bytes(_json_bytes(groups))
    (out / SCHEDULER_FILE).write_bytes(_json_bytes(scheduler.state_dict()))
    for rank, files in enumerate(ranks):
        (out / rank_dir(rank)).mkdir(exist_ok=True)
        for name, blob in files.items():
            (out / rank_dir(rank) / name).write_bytes(blob)
    state = {"format": FORMAT_VERSION, **trainer_state, "world_size": len(ranks)}
    (out / TRAINER_STATE_FILE).write_bytes(_json_bytes(state))
    write_manifest(out)
    return out


def parse_trainer_state(data: bytes, where: str) -> dict[str, Any]:
    """Decode trainer_state.json read from `where`, checked for a format this code reads."""
    try:
        state = json.loads(data)
    except ValueError as exc:
        raise PipelineError(f"{where}: invalid JSON ({exc})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        found = state.get("format") if isinstance(state, dict) else None
        raise PermanentError(f"{where}: checkpoint format {found!r}, expected {FORMAT_VERSION}")
    return state


def read_trainer_state(local_dir: str | Path) -> dict[str, Any]:
    """trainer_state.json of a local checkpoint directory."""
    path = Path(local_dir) / TRAINER_STATE_FILE
    if not path.is_file():
        raise PipelineError(f"checkpoint file missing: {path}")
    return parse_trainer_state(path.read_bytes(), str(path))


def load_checkpoint(local_dir: str | Path, *, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, rank: int, world_size: int,
                    micro_batch_size: int | None = None) -> tuple[dict[str, Any], dict[str, int]]:
    """Load a checkpoint into model, optimizer, scheduler and this rank's RNGs.

    Returns (trainer_state, this rank's data position). Call it after everything that consumes random
    numbers has been built, so the restored RNG states are the ones training continues with. A checkpoint
    written by a different number of workers resumes too when `micro_batch_size` is given: see
    `regrid_position`.
    """
    local = Path(local_dir)
    state = read_trainer_state(local)
    if state["world_size"] != world_size and micro_batch_size is None:
        raise PermanentError(f"{local}: checkpoint was written by {state['world_size']} workers, this run has "
                             f"{world_size} (set train.workers={state['world_size']} to resume it)")
    load_model_weights(module, local / MODEL_FILE)
    groups = _read_json(local / OPTIMIZER_GROUPS_FILE)
    load_optimizer_state(module, optimizer, local / OPTIMIZER_FILE, groups)
    scheduler.load_state_dict(_read_json(local / SCHEDULER_FILE))
    if state["world_size"] == world_size:
        return state, restore_rank_state(local, rank)
    # Another worker count: RNG streams of the old ranks carry over where they exist (Llama has no
    # dropout, so they only matter to sampling), and the data position is re-cut for the new grid.
    position = restore_rank_state(local, min(rank, state["world_size"] - 1))
    return state, regrid_position(position, state, world_size, micro_batch_size, where=str(local))


def regrid_position(position: dict[str, int], state: dict[str, Any], world_size: int, micro_batch_size: int,
                    where: str) -> dict[str, int]:
    """A data position {epoch, offset} saved by `state["world_size"]` workers, for `world_size` workers.

    Rank r reads rows[r::world] of each epoch's permutation. So after `offset` micro-batches per rank,
    the workers together have read exactly the first offset * micro_batch_size * world rows of the
    epoch. The new grid starts after the same prefix, which must be a whole number of new micro-batches.
    """
    saved_micro = int(state["config"]["train"]["micro_batch_size"])
    rows_read = position["offset"] * saved_micro * state["world_size"]
    per_step = micro_batch_size * world_size
    if rows_read % per_step:
        raise PermanentError(
            f"{where}: {state['world_size']} workers x micro-batch {saved_micro} read {rows_read} rows of epoch "
            f"{position['epoch']}, not a multiple of train.workers x train.micro_batch_size = {per_step}; "
            f"resume with a worker count that divides it")
    return {"epoch": position["epoch"], "offset": rows_read // per_step}
