"""The real fine-tuning job (jobs/finetune.py) at the Llama-3.1-8B shape on one GPU host, in bounded phases.

Why it exists: unit tests run the job on tiny models; what only shows at 8B (16 GB pulls, 60 GB
checkpoints, the resume after a killed worker, the export's copies) needs the real job, the real S3 and
MLflow servers and real sizes. Each phase fits in one shell command, prints its numbers as it goes, and
can be run again: `job` picks a running or interrupted job up where it is (the job itself resumes).

    python bench/job_8b.py --phase base                 # base checkpoint (random weights) and text data
    python bench/job_8b.py --phase job --budget-s 500   # servers, publish, job; again until it says done
    python bench/job_8b.py --phase report               # load the registered model back; the table
    python bench/job_8b.py --shape tiny --phase all     # the same on CPU with a tiny model (the test)

Where things live (sizes and free space are printed by `plan`): docs/scale.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jobs.finetune import worker_pythonpath  # noqa: E402 - the checkout first, then the caller's entries
PRESET = REPO / "configs" / "llama3.1-8b-fp8-1gpu.yaml"
BUCKET = "job8b"
RUN_NAME = "job-8b"
MODEL_NAME = "job-8b"
GIB = 1024**3
CHECKPOINT_DIR = re.compile(r"^checkpoint_(\d+)-")


@dataclass(frozen=True)
class Shape:
    """What differs between the GPU run and its CPU rehearsal."""

    name: str
    """bench.common shape of the base model."""
    layers: int | None
    """Decoder layers (None: the shape's own)."""
    device: str
    """Where the base is initialised."""
    dtype: str
    """Base checkpoint dtype."""
    vocab: int
    """Tokenizer vocabulary trained on the data (ids fit the model's vocabulary)."""
    corpus_bytes: int
    """Bytes of standard-library sources used as training text."""
    base_shard: str
    """save_pretrained shard size of the base: small objects, since moto reads a whole object per GET."""
    overrides: tuple[str, ...]
    """--set overrides on top of the preset."""
    hooks: tuple[tuple[str, str], ...] = ()
    """Test hooks (pipeline.train.faults) for the job's environment."""


SHAPES = {
    "8b": Shape("llama3.1-8b", None, "cuda", "bf16", 8192, 20_000_000, "1GB", ()),
    "tiny": Shape("tiny", None, "cpu", "fp32", 512, 400_000, "200KB", (
        "train.use_gpu=false", "train.fp8=none", "model.dtype=fp32", "model.backend=torch",
        "data.seq_len=128", "data.num_proc=1", "data.val_fraction=0.1", "train.max_steps=8",
        "train.checkpoint_every=2", "train.log_every=1", "train.activation_checkpointing=false",
        "eval.max_batches=2", "eval.num_samples=1", "eval.max_new_tokens=8", "export.max_shard_size=1MB"),
        # tiny steps take milliseconds: the worker waits after its first commit, so the kill lands mid-run
        (("PIPELINE_PAUSE_UPLOAD", "after_commit:2"),)),
}



def say(text: str) -> None:
    print(f"[job_8b {time.strftime('%H:%M:%S')}] {text}", flush=True)


# ---------------------------------------------------------------------------------------------------
# locations and sizes


@dataclass(frozen=True)
class Places:
    """Every folder the run uses; `out` is run.output_uri (and the checkpoint staging TMPDIR)."""

    work: Path
    out: Path

    @property
    def base(self) -> Path: return self.work / "base"
    @property
    def data(self) -> Path: return self.work / "data"
    @property
    def cache(self) -> Path: return self.work / "cache"
    @property
    def s3(self) -> Path: return self.work / "s3"
    @property
    def mlflow(self) -> Path: return self.work / "mlflow"
    @property
    def workers(self) -> Path: return self.work / "workers"
    @property
    def events(self) -> Path: return self.work / "events.jsonl"
    @property
    def log(self) -> Path: return self.work / "driver.log"


def param_count(shape: Shape) -> int:
    from bench.common import llama_config

    c = llama_config(shape.name, shape.layers)
    kv = c.hidden_size // c.num_attention_heads * c.num_key_value_heads
    layer = 2 * c.hidden_size * c.hidden_size + 2 * c.hidden_size * kv + 3 * c.hidden_size * c.intermediate_size
    embeddings = c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
    return c.num_hidden_layers * (layer + 2 * c.hidden_size) + embeddings + c.hidden_size


def plan(shape: Shape, places: Places, keep: int = 2) -> list[tuple[str, Path, int]]:
    """(what, where, bytes at its peak): a checkpoint is weights + 2 moments + compensation, 8 bytes a
    parameter in bf16; Ray keeps `keep` and writes the next before deleting the oldest. The output is a
    local folder here, so each checkpoint is written in place, with no staging copy."""
    weights = param_count(shape) * (2 if shape.dtype == "bf16" else 4)
    ckpt = 4 * weights
    return [("base built, deleted after publishing", places.base, weights),
            ("base in S3 (moto spools objects to its TMPDIR)", places.s3, weights),
            ("base pulled into run.cache_dir", places.cache, weights),
            ("eval/export: trained weights converted (the checkpoints are read in place)", places.cache, weights),
            ("MLflow artifacts of the export", places.mlflow, weights),
            (f"checkpoints: {keep} kept + 1 being written", places.out, (keep + 1) * ckpt),
            ("export under run.output_uri", places.out, weights)]


def fits(shape: Shape, places: Places) -> tuple[bool, list[tuple[Path, int, int]]]:
    """Whether every filesystem has the room the plan needs there: (fits, [(folder, needed, free)])."""
    needs: dict[int, list] = {}
    for _, where, size in plan(shape, places):
        existing = next(p for p in (where, *where.parents) if p.exists())  # creates nothing (base is deleted)
        needs.setdefault(os.stat(existing).st_dev, [existing, 0])[1] += size
    rows = [(where, size, shutil.disk_usage(where).free) for where, size in needs.values()]
    return all(size <= free for _, size, free in rows), rows


def print_plan(shape: Shape, places: Places) -> bool:
    """The storage each folder needs at its peak against what its filesystem has free; True if it fits."""
    say(f"{param_count(shape) / 1e9:.2f}B parameters")
    for what, where, size in plan(shape, places):
        say(f"  {size / GIB:8.2f} GiB  {what}  ({where})")
    ok, rows = fits(shape, places)
    for where, size, free in rows:
        say(f"  filesystem of {where}: needs {size / GIB:.1f} GiB, {free / GIB:.1f} GiB free"
            f"{'' if size <= free else '  << DOES NOT FIT'}")
    if not ok:
        layers = [n for n in range(1, llama_layers(shape)) if fits(Shape(**{**shape.__dict__, "layers": n}), places)[0]]
        say(f"the most decoder layers that fit these folders: {max(layers) if layers else 'none'} (--layers)")
    return ok


def llama_layers(shape: Shape) -> int:
    from bench.common import llama_config

    return llama_config(shape.name, shape.layers).num_hidden_layers


# ---------------------------------------------------------------------------------------------------
# phase base: base checkpoint (random weights) and text data


def write_data(shape: Shape, places: Places) -> Path:
    """The standard library's .py sources as text documents, up to `corpus_bytes`."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out, total = places.data / "train.jsonl", 0
    places.data.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        for path in sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts):
            text = path.read_text(errors="replace")
            f.write(json.dumps({"text": text}) + "\n")
            total += len(text)
            if total >= shape.corpus_bytes:
                break
    return out


def make_base(shape: Shape, places: Places) -> None:
    import torch
    from transformers import LlamaForCausalLM

    from bench.common import llama_config
    from pipeline.demo import END_OF_TURN, make_tokenizer

    started = time.time()
    data = write_data(shape, places)
    say(f"data: {data.stat().st_size / 1e6:.1f} MB of text in {data} ({time.time() - started:.0f}s)")
    shutil.rmtree(places.base, ignore_errors=True)
    started = time.time()
    tokenizer = make_tokenizer(places.base, [str(data)], vocab_size=shape.vocab)
    say(f"tokenizer: {len(tokenizer)} ids ({time.time() - started:.0f}s)")
    config = llama_config(shape.name, shape.layers)
    assert len(tokenizer) <= config.vocab_size, "tokenizer ids must fit the model's vocabulary"
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    started = time.time()
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16 if shape.dtype == "bf16" else torch.float32)
    with torch.device(shape.device):  # initialised where it is fast: an 8B on the CPU takes minutes
        model = LlamaForCausalLM(config)
    torch.set_default_dtype(default)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(END_OF_TURN)]
    model.save_pretrained(str(places.base), max_shard_size=shape.base_shard)
    del model
    size = sum(p.stat().st_size for p in places.base.glob("*.safetensors"))
    say(f"base: {size / GIB:.2f} GiB in {len(list(places.base.glob('*.safetensors')))} shards "
        f"({time.time() - started:.0f}s)")


# ---------------------------------------------------------------------------------------------------
# servers: moto S3 and mlflow, each its own process (setsid), on fixed ports so a restart keeps the uris


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _wait_http(url: str, timeout_s: float) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            opener.open(url, timeout=2).read()
            return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"job_8b: {url} did not answer within {timeout_s:.0f}s")


def start_servers(places: Places, s3_port: int, mlflow_port: int) -> tuple[str, str]:
    s3, tracking = f"http://127.0.0.1:{s3_port}", f"http://127.0.0.1:{mlflow_port}"
    if not _listening(s3_port):
        places.s3.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "TMPDIR": str(places.s3)}  # moto spools every object over 5 MB here
        pid = spawn([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(s3_port)], env,
                    places.work / "s3.log")
        (places.work / "s3.pid").write_text(str(pid))
    if not _listening(mlflow_port):
        places.mlflow.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        pid = spawn([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
               f"sqlite:///{places.mlflow / 'mlflow.db'}", "--artifacts-destination", str(places.mlflow / "artifacts"),
               "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1"], env, places.work / "mlflow.log")
        (places.work / "mlflow.pid").write_text(str(pid))
    _wait_http(s3, 60)
    _wait_http(f"{tracking}/health", 120)
    return s3, tracking


SPAWNED: dict[int, subprocess.Popen] = {}  # the processes this command started, by pid: whether and how they ended


def spawn(command: list[str], env: dict, log: Path) -> int:
    """A process in its own session (it outlives this command if the host lets it); returns its pid."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                                start_new_session=True)
    SPAWNED[proc.pid] = proc
    return proc.pid


def servers_gone(places: Places) -> list[str]:
    """The servers this command started that have exited since, with their exit codes (-N: signal N)."""
    gone = []
    for name in ("s3", "mlflow"):
        pid_file = places.work / f"{name}.pid"
        proc = SPAWNED.get(int(pid_file.read_text())) if pid_file.exists() else None
        if proc is not None and proc.poll() is not None:
            gone.append(f"{name} server (pid {proc.pid}) exited with {proc.returncode}")
    return gone


def stop_servers(places: Places) -> None:
    """End the servers this script started (each is its own process group), by their recorded pids."""
    for name in ("s3", "mlflow"):
        pid_file = places.work / f"{name}.pid"
        if pid_file.exists():
            try:
                os.killpg(int(pid_file.read_text()), signal.SIGTERM)
            except ProcessLookupError:
                pass
            pid_file.unlink()
            say(f"{name} server stopped")


def aws_env(endpoint: str) -> dict[str, str]:
    return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint, "NO_PROXY": "127.0.0.1,localhost"}


# ---------------------------------------------------------------------------------------------------
# phase job: publish, run the job in the background, watch it, kill its worker once


def record(places: Places, kind: str, **fields) -> None:
    with open(places.events, "a") as f:
        f.write(json.dumps({"t": time.time(), "kind": kind, **fields}) + "\n")


def events(places: Places, kind: str | None = None) -> list[dict]:
    if not places.events.exists():
        return []
    rows = [json.loads(line) for line in places.events.read_text().splitlines() if line.strip()]
    return [r for r in rows if kind is None or r["kind"] == kind]


def publish_inputs(places: Places, s3: str, keep_base: bool) -> None:
    """The base (with jobs/publish.py) and the data into S3, once; the local base is deleted after."""
    from pipeline import storage

    options = storage.StorageOptions(endpoint_url=s3)
    import boto3

    client = boto3.client("s3", endpoint_url=s3)
    if BUCKET not in [b["Name"] for b in client.list_buckets().get("Buckets", [])]:
        client.create_bucket(Bucket=BUCKET)
    if not storage.exists(f"s3://{BUCKET}/data/train.jsonl", options):
        storage.write_bytes(f"s3://{BUCKET}/data/train.jsonl", (places.data / "train.jsonl").read_bytes(), options)
    if storage.exists(f"s3://{BUCKET}/base/manifest.json", options):
        return
    source = places.base if (places.base / "config.json").exists() else _cached_base(places)
    started = time.time()
    subprocess.run([sys.executable, "jobs/publish.py", str(source), f"s3://{BUCKET}/base", "--endpoint-url", s3],
                   cwd=REPO, check=True, env={**os.environ, "PYTHONPATH": worker_pythonpath()})
    size = sum(p.stat().st_size for p in source.glob("*.safetensors"))
    record(places, "publish", seconds=time.time() - started, bytes=size)
    say(f"published the base from {source}: {size / GIB:.2f} GiB in {time.time() - started:.0f}s")
    if source == places.base and not keep_base:
        shutil.rmtree(places.base)  # its copy in S3 (and later run.cache_dir) is what the job reads


def _cached_base(places: Places) -> Path:
    """The job's verified pull of the base: what a restarted S3 server (which lost its objects) is refilled from."""
    from pipeline import storage

    cached = storage.checkpoint_cache_dir(f"s3://{BUCKET}/base", places.cache)
    if not (cached / ".complete").exists():
        raise SystemExit(f"job_8b: no base to publish: run --phase base first ({places.base} is gone)")
    return cached


def job_command(shape: Shape, places: Places, s3: str) -> list[str]:
    sets = [f"run.name={RUN_NAME}", f"run.output_uri={places.out / 'runs'}", f"run.cache_dir={places.cache}",
            f"model.base_uri=s3://{BUCKET}/base", f"data.train_files=[s3://{BUCKET}/data/train.jsonl]",
            f"storage.endpoint_url={s3}", f"export.registered_model_name={MODEL_NAME}", *shape.overrides]
    return [sys.executable, "jobs/finetune.py", "--config", str(PRESET), *[a for s in sets for a in ("--set", s)]]


def job_env(shape: Shape, places: Places, s3: str, tracking: str) -> dict[str, str]:
    from pipeline.train.faults import STATE_DIR_ENV

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "AWS_PROFILE", "AWS_SESSION_TOKEN")}
    (places.out / "tmp").mkdir(parents=True, exist_ok=True)
    places.workers.mkdir(parents=True, exist_ok=True)
    # TMPDIR: where the training worker stages each checkpoint before its upload (as big as the checkpoint);
    # RAY_TMPDIR: Ray's session files and sockets, on a short path (unix sockets allow ~107 characters).
    return {**env, **aws_env(s3), "MLFLOW_TRACKING_URI": tracking, "TMPDIR": str(places.out / "tmp"),
            "RAY_TMPDIR": f"/tmp/ray-job8b-{os.getuid()}", STATE_DIR_ENV: str(places.workers),
            "PYTHONUNBUFFERED": "1", "PYTHONPATH": worker_pythonpath(), **dict(shape.hooks)}


def start_driver(places: Places, command: list[str], env: dict[str, str]) -> int:
    """The job's driver in its own session, its output appended to the driver log; returns its pid."""
    pid = spawn(command, env, places.log)
    record(places, "driver_start", pid=pid)
    return pid


def driver_state(places: Places) -> tuple[int | None, bool]:
    """(pid of a live driver or None, whether the job finished)."""
    # searched, not matched at the start: a worker's partial line may precede it (see stage_times)
    done = places.log.exists() and any("done: job " in line for line in places.log.read_text().splitlines())
    starts = events(places, "driver_start")
    pid = starts[-1]["pid"] if starts else None
    if pid in SPAWNED:  # started by this command: ask the child itself (its cmdline reads empty until exec is done)
        alive = SPAWNED[pid].poll() is None
    else:  # started by an earlier command: that pid, if it is still that driver and not a reused number
        alive = pid is not None and Path(f"/proc/{pid}").exists() and "finetune" in _cmdline(pid)
    return (pid if alive else None), done


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class Sampler(threading.Thread):
    """Peak RSS of every process of this host by name, and the GPU's peak memory in use, twice a second."""

    def __init__(self, driver_pid: int | None) -> None:
        super().__init__(daemon=True)
        self.driver_pid, self.rss, self.gpu_mib, self.stop = driver_pid, {}, 0, threading.Event()

    def label(self, pid: int, cmd: str) -> str | None:
        """The process's name in the table; None for processes that are not the run's."""
        if pid == self.driver_pid:
            return "driver (jobs/finetune.py)"
        if pid == os.getpid():
            return "bench/job_8b.py"
        for needle, name in (("moto.server", "S3 server (moto)"), ("mlflow", "mlflow server"),
                             ("raylet", "raylet"), ("gcs_server", "ray gcs_server")):
            if needle in cmd:
                return name
        return cmd.split()[0].split(".")[0] if cmd.startswith("ray::") else None

    def run(self) -> None:
        smi, last_smi = shutil.which("nvidia-smi"), 0.0
        while not self.stop.wait(0.5):
            for proc in Path("/proc").glob("[0-9]*"):
                try:
                    rss_kib = int(next(l for l in (proc / "status").read_text().splitlines()
                                       if l.startswith("VmRSS")).split()[1])
                except (OSError, StopIteration, ValueError):
                    continue
                name = self.label(int(proc.name), _cmdline(int(proc.name)))
                if name is not None:
                    self.rss[name] = max(self.rss.get(name, 0), rss_kib * 1024)
            if smi and time.monotonic() - last_smi > 2:
                last_smi = time.monotonic()
                out = subprocess.run([smi, "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, check=False).stdout.split()
                self.gpu_mib = max([self.gpu_mib, *[int(x) for x in out if x.isdigit()]])


def watch(places: Places, budget_s: float, kill: bool) -> None:
    """Follow the driver's log and the worker's steps; time checkpoints, pulls and the resume; kill the
    training worker once, right after the first checkpoint commits."""
    from pipeline import storage

    starts = events(places, "driver_start")
    sampler = Sampler(starts[-1]["pid"] if starts else None)
    sampler.start()
    seen_steps = {(e["pid"], e["step"]) for e in events(places, "step")}
    seen_ckpt = {(e["name"], e["kind"]) for e in events(places) if e["kind"] in ("ckpt_dir", "committed")}
    base_cache = storage.checkpoint_cache_dir(f"s3://{BUCKET}/base", places.cache)
    pulls = {e["what"] for e in events(places, "pull")}
    pull_started = [e["t"] for e in events(places, "pull_start")]
    offset, deadline = 0, time.monotonic() + budget_s
    run_dir = places.out / "runs" / "ray" / RUN_NAME
    while True:
        alive = driver_state(places)[0] is not None
        if places.log.exists():
            with open(places.log) as f:
                f.seek(offset)
                for line in f.read().splitlines():
                    print(f"  | {line}", flush=True)
                offset = f.tell()
        for e in _worker_steps(places):
            if (e["pid"], e["step"]) not in seen_steps:
                seen_steps.add((e["pid"], e["step"]))
                record(places, "step", pid=e["pid"], step=e["step"])
        for folder in sorted(p for p in run_dir.glob("checkpoint_*") if CHECKPOINT_DIR.match(p.name)):
            for kind, present in (("ckpt_dir", True), ("committed", (folder / "COMMITTED").exists())):
                if present and (folder.name, kind) not in seen_ckpt:
                    seen_ckpt.add((folder.name, kind))
                    record(places, kind, name=folder.name, step=int(CHECKPOINT_DIR.match(folder.name).group(1)))
                    say(f"checkpoint {folder.name}: {'upload started' if kind == 'ckpt_dir' else 'committed'}")
        if not pull_started and base_cache.exists():
            pull_started = [e["t"] for e in events(places, "pull_start")] or [time.time()]
            record(places, "pull_start", what="base")
        if "base" not in pulls and (base_cache / ".complete").exists():
            pulls.add("base")
            record(places, "pull", what="base", seconds=time.time() - pull_started[0])
        if kill and not events(places, "kill") and events(places, "committed"):
            _kill_worker(places)
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    sampler.stop.set()
    sampler.join()
    record(places, "peaks", rss=sampler.rss, gpu_mib=sampler.gpu_mib)
    _, done = driver_state(places)
    for line in servers_gone(places):
        say(line)
    say(f"job {'finished' if done else ('still running' if alive else 'stopped before the end')}; "
        f"peak GPU memory in use {sampler.gpu_mib} MiB; peak RSS: "
        + ", ".join(f"{k} {v / GIB:.1f} GiB" for k, v in sorted(sampler.rss.items(), key=lambda kv: -kv[1])[:6]))


def _worker_steps(places: Places) -> list[dict]:
    path = places.workers / "rank-0.jsonl"
    rows = [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.exists() else []
    return [r for r in rows if r["event"] == "step"]


def _kill_worker(places: Places) -> None:
    """SIGKILL the real Ray training worker (rank 0's process, from its step records)."""
    steps = _worker_steps(places)
    if not steps:
        return
    last = steps[-1]
    try:
        os.kill(last["pid"], signal.SIGKILL)
    except ProcessLookupError:
        say(f"the training worker (pid {last['pid']}) was gone before the kill")
        return
    record(places, "kill", pid=last["pid"], step=last["step"])
    say(f"SIGKILL to the training worker (pid {last['pid']}) after step {last['step']}")


def run_job_phase(shape: Shape, places: Places, args) -> None:
    s3, tracking = start_servers(places, args.s3_port, args.mlflow_port)
    os.environ.update(aws_env(s3))  # this process and jobs/publish.py talk to the local S3 server
    publish_inputs(places, s3, args.keep_base)
    pid, done = driver_state(places)
    if done:
        say("the job already finished: run --phase report")
        return
    if pid is None:
        if not print_plan(shape, places) and not args.force:
            raise SystemExit("job_8b: the run does not fit the free space above (docs/scale.md); --force to try")
        pid = start_driver(places, job_command(shape, places, s3), job_env(shape, places, s3, tracking))
        say(f"job started (driver pid {pid}); log {places.log}")
    watch(places, args.budget_s, kill=not args.no_kill)


# ---------------------------------------------------------------------------------------------------
# phase report: the registered model loaded back with MLflow, and the table


def load_registered(places: Places, tracking: str) -> float:
    """Seconds to load the registered version with mlflow.transformers and run one forward pass."""
    import mlflow
    import torch

    mlflow.set_tracking_uri(tracking)
    version = max(int(v.version) for v in mlflow.MlflowClient().search_model_versions(f"name='{MODEL_NAME}'"))
    target = places.work / "loaded"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir()
    started = time.time()
    parts = mlflow.transformers.load_model(f"models:/{MODEL_NAME}/{version}", dst_path=str(target),
                                           return_type="components", torch_dtype=torch.bfloat16)
    ids = parts["tokenizer"]("def main():", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = parts["model"](ids).logits
    seconds = time.time() - started
    assert torch.isfinite(logits).all(), "the registered model's logits are not finite"
    say(f"registered model {MODEL_NAME} v{version} loaded with mlflow.transformers and ran: {seconds:.0f}s")
    shutil.rmtree(target, ignore_errors=True)
    return seconds


def stage_times(places: Places) -> dict[str, float]:
    times = {}
    for line in places.log.read_text().splitlines() if places.log.exists() else []:
        # The driver's stage line, its time last. Ray's log thread may have printed part of a worker's line
        # just before it, on the same line: search for the last stage mark, not only at the start.
        if m := re.search(r".*\[(data|train|eval|export)\] .* \((\d+)s\)$", line):
            times[m.group(1)] = times.get(m.group(1), 0) + float(m.group(2))
    return times


def tokens_per_s(places: Places) -> float | None:
    import statistics

    rates = [float(m.group(3).replace(",", "")) for line in places.log.read_text().splitlines()
             # Ray prefixes a worker's lines with its name and pid (and colours): search, not match
             if (m := re.search(r"\[train\] step (\d+)/(\d+) .* tokens/s ([\d,]+)", line))
             and int(m.group(1)) > min(10, int(m.group(2)) // 4)]
    return statistics.median(rates) if rates else None


def checkpoint_rows(places: Places) -> list[tuple[str, str]]:
    """Per checkpoint: written (step done -> upload starts) and uploaded (-> COMMITTED), from what the
    watcher saw every 0.5 s; the job's own checkpoint_stall_s/checkpoint_upload_s metrics when it logs them."""
    steps = {(e["step"]): e["t"] for e in events(places, "step")}
    started = {e["name"]: e for e in events(places, "ckpt_dir")}
    rows = []
    for e in events(places, "committed"):
        begin = started.get(e["name"])
        done = steps.get(e["step"])
        if begin and done:
            rows.append((f"checkpoint step {e['step']}: written / uploaded",
                         f"{begin['t'] - done:.1f} s / {e['t'] - begin['t']:.1f} s"))
    for line in places.log.read_text().splitlines() if places.log.exists() else []:
        if m := re.search(r"checkpoint of step (\d+) committed: (.*)$", line):
            rows.append((f"checkpoint step {m.group(1)} (the job's line)", m.group(2)))
    metrics = _final_metrics(places)
    for key in ("checkpoint_stall_s", "checkpoint_upload_s"):
        found = [m[key] for m in metrics if key in m]
        if found:
            rows.append((f"{key} (job metric, per checkpoint)", ", ".join(f"{v:.1f}" for v in found)))
    return rows


def _final_metrics(places: Places) -> list[dict]:
    committed = sorted((places.out / "runs" / "ray" / RUN_NAME).glob("checkpoint_*/COMMITTED"))
    if not committed:
        return []
    return json.loads((committed[-1].parent / "trainer_state.json").read_text()).get("metrics", [])


def report(places: Places, tracking: str | None) -> None:
    rows = [(f"stage {k}", f"{v:.0f} s") for k, v in stage_times(places).items()]
    rows += [(f"publish base ({e['bytes'] / GIB:.2f} GiB)", f"{e['seconds']:.1f} s") for e in events(places, "publish")]
    rows += [("base pull into run.cache_dir (seen)", f"{e['seconds']:.1f} s") for e in events(places, "pull")]
    rate = tokens_per_s(places)
    rows.append(("steady tokens/s (median after warm-up)", f"{rate:,.0f}" if rate else "n/a"))
    rows += checkpoint_rows(places)
    for kill in events(places, "kill"):
        after = [e for e in events(places, "step") if e["t"] > kill["t"] and e["pid"] != kill["pid"]]
        rows.append((f"SIGKILL after step {kill['step']} -> next step", f"{after[0]['t'] - kill['t']:.1f} s (step "
                     f"{after[0]['step']})" if after else "no step since"))
    gpu = [m["gpu_mem_gb"] for m in _final_metrics(places) if "gpu_mem_gb" in m]
    peaks = events(places, "peaks")
    rows.append(("peak GPU memory: allocated (job) / in use (nvidia-smi)",
                 f"{max(gpu) if gpu else 0:.1f} GiB / {max([p['gpu_mib'] for p in peaks] or [0]) / 1024:.1f} GiB"))
    rss: dict[str, int] = {}
    for p in peaks:
        for name, size in p["rss"].items():
            rss[name] = max(rss.get(name, 0), size)
    rows += [(f"peak RSS {name}", f"{size / GIB:.2f} GiB") for name, size in sorted(rss.items(), key=lambda kv: -kv[1])
             if size >= 0.1 * GIB]
    if tracking:
        rows.append(("load registered model (mlflow) + forward", f"{load_registered(places, tracking):.0f} s"))
    width = max(len(k) for k, _ in rows)
    print(f"\n| {'what'.ljust(width)} | value |\n|{'-' * (width + 2)}|-------|", flush=True)
    for k, v in rows:
        print(f"| {k.ljust(width)} | {v} |", flush=True)


# ---------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phase", choices=["plan", "base", "job", "report", "stop", "all"], required=True)
    p.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    p.add_argument("--layers", type=int, help="decoder layers (default: the shape's; the 8B has 32)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/job8b"), help="base, data, S3 and MLflow files, cache")
    p.add_argument("--out-dir", type=Path, help="run.output_uri (checkpoints, export) and the checkpoint "
                   "staging TMPDIR; default WORKDIR/out")
    p.add_argument("--budget-s", type=float, default=480, help="--phase job returns after this long")
    p.add_argument("--s3-port", type=int, default=5061)
    p.add_argument("--mlflow-port", type=int, default=5062)
    p.add_argument("--keep-base", action="store_true", help="keep the local base after publishing it")
    p.add_argument("--no-kill", action="store_true", help="do not SIGKILL the training worker")
    p.add_argument("--force", action="store_true", help="start the job even if the plan does not fit")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    base = SHAPES[args.shape]
    shape = Shape(**{**base.__dict__, "layers": args.layers or base.layers})
    places = Places(args.workdir.resolve(), (args.out_dir or args.workdir / "out").resolve())
    places.work.mkdir(parents=True, exist_ok=True)
    if args.phase == "plan":
        return 0 if print_plan(shape, places) else 1
    if args.phase == "stop":
        stop_servers(places)
        return 0
    if args.phase in ("base", "all"):
        print_plan(shape, places)
        make_base(shape, places)
    if args.phase in ("job", "all"):
        run_job_phase(shape, places, args)
        while args.phase == "all" and not driver_state(places)[1] and driver_state(places)[0] is not None:
            watch(places, args.budget_s, kill=not args.no_kill)
    if args.phase in ("report", "all"):
        _, done = driver_state(places)
        tracking = f"http://127.0.0.1:{args.mlflow_port}"
        if done:
            os.environ.update(aws_env(f"http://127.0.0.1:{args.s3_port}"))
            start_servers(places, args.s3_port, args.mlflow_port)
        report(places, tracking if done else None)
        if not done:
            say("the job has not finished: the table holds what it reached so far")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
