"""Resumable training checkpoints in safetensors and JSON only, so loading one never unpickles.

A checkpoint is one directory, written whole by rank 0 and uploaded (through Ray Train's report) to
`{run.output_uri}/ray/{run.name}/checkpoint_{step:06d}-{id}/`:

    model.safetensors          parameters by TE-style name (the unwrapped module's `named_parameters`),
                               in the training dtype
    optimizer.safetensors      AdamW state by parameter name: `{name}.exp_avg`, `{name}.exp_avg_sq`, `{name}.step`,
                               and `{name}.master` (fp32), `{name}.compensation` or `{name}.compensation_codes`
                               (int8) per `train.master_weights`;
                               with `train.moments_fp8`, a matrix's moments as `{name}.exp_avg_fp8`,
                               `{name}.exp_avg_sq_root_fp8` (E4M3) and their `..._scale` (fp32) instead
    optimizer.json             param_groups: hyper-parameters and the parameter NAMES of each group
    scheduler.json             the LR scheduler's state_dict
    trainer_state.json         step, tokens seen, world size, resolved config, code version, logged metrics
    rank-{r}/rng.safetensors   rank r's torch CPU RNG state (uint8) and CUDA RNG states, if any
    rank-{r}/state.json        rank r's python `random` state and data position {epoch, offset}
    manifest.json              size and sha256 of every file above (pipeline.storage.manifest)
    COMMITTED                  in storage only, written last by the upload: the sha256 of manifest.json
                               (pipeline.train.commit; a folder without it is never loaded)

What this module decides:
- One writer. Every rank's RNG and data state travels to rank 0 as opaque bytes (already encoded as
  safetensors/JSON) over torch.distributed, and rank 0 writes the directory. So the manifest vouches
  for every file, and a resume pulls the checkpoint like any other: verified, once per node
  (`storage.pull_checkpoint`). Files hold whole tensors, so any worker count can resume them.
- Two halves, so training need not wait for the disk: `snapshot` copies the state into host buffers
  (a collective, in the training loop), and `write_snapshot` writes the directory from them (on a
  background thread, `commit.Checkpointer`). A replicated (DDP) tensor is copied from rank
  0's own replica; a sharded (FSDP2) one is gathered one tensor at a time, and only rank 0 keeps a
  copy. Rank 0's buffers (pinned on a GPU host) are allocated once and reused by every checkpoint.
- Optimizer state is keyed by parameter name, not by position, so a checkpoint fails loudly (naming the
  tensor) instead of silently loading moments into the wrong parameter.
- TE's `_extra_state` (FP8 scaling metadata) is not saved: TE pickles it. FP8 delayed-scaling amax
  history therefore restarts empty on resume and refills within `train.fp8_amax_history_len` steps.
- Parameters and AdamW moments are in the training dtype (FP8 moments in theirs). An fp32 master copy or a Kahan
  compensation (`train.master_weights`, `pipeline.train.optim`) is optimizer state, saved and restored in its own
  dtype, so
  a resume continues bit for bit; the model file (and so the HF export) holds the bf16 weights, which
  are the master rounded to nearest.
- A resume reads the optimizer file tensor by tensor onto the devices: one tensor in host memory.
"""

from __future__ import annotations

import hashlib
import json
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from pipeline.train import parallel
from pipeline.errors import PermanentError, PipelineError
from pipeline.storage.manifest import FileEntry, write_manifest

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
                      torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
                      torch.float8_e4m3fn: "F8_E4M3"}


def save_streamed(entries: list[tuple[str, torch.Tensor]], path: Path) -> FileEntry:
    """Write `entries` as one safetensors file, one tensor at a time; returns its size and sha256.

    The header is known from the shapes alone, so it is written first and each tensor's bytes follow,
    hashed while a second thread writes them (both release the GIL): the manifest needs no second read.
    Entries are host tensors (a `Snapshot`'s); a sharded one would be gathered here (a collective).
    """
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, tensor in entries:
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned, as safetensors' own writer does
    head = len(head).to_bytes(8, "little") + head
    digest = hashlib.sha256(head)
    with open(path, "wb") as f, ThreadPoolExecutor(1) as writer:
        f.write(head)
        for _, tensor in entries:
            whole = parallel.full_tensor(tensor).to("cpu").contiguous()
            data = whole.reshape(-1).view(torch.uint8).numpy().data
            written = writer.submit(f.write, data)
            digest.update(data)
            written.result()
            del whole, data
    return FileEntry(len(head) + offset, digest.hexdigest())


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
@dataclass
class Snapshot:
    """A checkpoint's state in rank 0's host memory: what `write_snapshot` turns into the directory."""

    model: list[tuple[str, torch.Tensor]]
    """(parameter name, host tensor), in the order `model_entries` gives."""

    optimizer: list[tuple[str, torch.Tensor]]
    """(`{param name}.{field}`, host tensor), as `optimizer_entries` gives."""

    files: dict[str, bytes] = field(default_factory=dict)
    """The small files by relative path (optimizer groups, scheduler, rank files); trainer_state added last."""

    copied: Any = None
    """A CUDA event marking the device-to-host copies done; None when they were synchronous (CPU)."""

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for _, t in self.model + self.optimizer)


class HostBuffers:
    """Rank 0's host copies of the state, by entry name, allocated once and reused by every checkpoint.

    Pinned when the source is on a GPU, so the copies run asynchronously, in stream order: queued after
    the step that made the state and before the next update, they need no wait on the host. Pinning
    tens of GB takes seconds, so `reserve` allocates them on a background thread while training runs.
    Reusing them means a checkpoint must not begin while the previous one is still being written from
    them (`commit.Checkpointer` waits for that)."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self._reserving: threading.Thread | None = None

    def reserve(self, entries: list[tuple[str, torch.Tensor]]) -> None:
        """Allocate buffers for `entries` (name, source tensor) in the background; `copy` waits for it."""
        wanted = [(name, tuple(t.shape), t.dtype, t.is_cuda) for name, t in entries]

        def allocate() -> None:
            for name, shape, dtype, pin in wanted:
                if name not in self.tensors:
                    self.tensors[name] = torch.empty(shape, dtype=dtype, pin_memory=pin)

        self._reserving = threading.Thread(target=allocate, name="checkpoint-buffers", daemon=True)
        self._reserving.start()

    def copy(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        if self._reserving is not None:
            self._reserving.join()
            self._reserving = None
        host = self.tensors.get(name)
        if host is None or host.shape != tensor.shape or host.dtype != tensor.dtype:
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=tensor.is_cuda)
            self.tensors[name] = host
        host.copy_(tensor, non_blocking=tensor.is_cuda)
        return host

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


_MODEL_PREFIX, _OPTIMIZER_PREFIX = "model.", "optimizer."


def reserve_buffers(module: torch.nn.Module, optimizer: torch.optim.Optimizer, buffers: HostBuffers) -> None:
    """Start allocating `buffers` for every entry a snapshot will copy (call once the optimizer has state)."""
    entries = [(_MODEL_PREFIX + name, t) for name, t in model_entries(module)]
    entries += [(_OPTIMIZER_PREFIX + name, t) for name, t in optimizer_entries(module, optimizer)[0]]
    buffers.reserve(entries)


def _copied(entries: list[tuple[str, torch.Tensor]], buffers: HostBuffers | None,
            prefix: str) -> list[tuple[str, torch.Tensor]]:
    """Each entry gathered when sharded (every rank takes part) and copied into `buffers` (rank 0 only)."""
    out = []
    for name, tensor in entries:
        whole = parallel.full_tensor(tensor)
        if buffers is not None:
            out.append((name, buffers.copy(prefix + name, whole)))
        del whole  # a gathered tensor lives on the device only until its copy is queued
    return out


def snapshot(*, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
             scheduler: torch.optim.lr_scheduler.LRScheduler, ranks: list[dict[str, bytes]],
             buffers: HostBuffers | None) -> Snapshot | None:
    """The state as it is now, in host memory on rank 0 (`buffers` given), None elsewhere.

    A collective when anything is sharded: every worker calls it, in the same order. The copies may
    still be running on the device when it returns (`Snapshot.copied`); nothing has to wait for them
    but the writer, because the device runs them before any later update of the state."""
    model = _copied(model_entries(module), buffers, _MODEL_PREFIX)
    entries, groups = optimizer_entries(module, optimizer)
    moments = _copied(entries, buffers, _OPTIMIZER_PREFIX)
    if buffers is None:
        return None
    files = {OPTIMIZER_GROUPS_FILE: _json_bytes(groups), SCHEDULER_FILE: _json_bytes(scheduler.state_dict())}
    for rank, rank_blobs in enumerate(ranks):
        files.update({f"{rank_dir(rank)}/{name}": blob for name, blob in rank_blobs.items()})
    copied = None
    if any(t.is_pinned() for _, t in model + moments):  # copied asynchronously from a GPU
        copied = torch.cuda.Event()
        copied.record()
    return Snapshot(model, moments, files, copied)


def with_trainer_state(snap: Snapshot, trainer_state: dict[str, Any], world_size: int) -> None:
    """Add trainer_state.json to `snap`: step, tokens, config, metrics, and the world size that wrote it."""
    snap.files[TRAINER_STATE_FILE] = _json_bytes({"format": FORMAT_VERSION, **trainer_state, "world_size": world_size})


def write_snapshot(out_dir: str | Path, snap: Snapshot) -> dict[str, FileEntry]:
    """Write a complete checkpoint directory from a snapshot, manifest last; returns the manifest's
    entries. Waits for the snapshot's device copies first. Safe on any thread: it touches host memory and
    files only. The model and optimizer files are written side by side, each hashed as it is written."""
    if snap.copied is not None:
        snap.copied.synchronize()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(2) as files:
        written = {name: files.submit(save_streamed, entries, out / name)
                   for name, entries in ((OPTIMIZER_FILE, snap.optimizer), (MODEL_FILE, snap.model))}
        for name, blob in snap.files.items():
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_bytes(blob)
        known = {name: future.result() for name, future in written.items()}
    return write_manifest(out, known)


def write_checkpoint(out_dir: str | Path, *, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     scheduler: torch.optim.lr_scheduler.LRScheduler, trainer_state: dict[str, Any],
                     ranks: list[dict[str, bytes]]) -> Path:
    """`snapshot` then `write_snapshot` in one go, for one process (tests, tools); returns the dir."""
    snap = snapshot(module=module, optimizer=optimizer, scheduler=scheduler, ranks=ranks, buffers=HostBuffers())
    with_trainer_state(snap, trainer_state, len(ranks))
    write_snapshot(out_dir, snap)
    return Path(out_dir)


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
