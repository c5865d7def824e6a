"""The job resolved once: `ResolvedJob` made at job start, read by every stage, its state file typed.

A real job (data stage, local files, a local SQLite MLflow store) counts how often storage options are
built; the source tree is checked for any other place that builds them. The state file keeps the JSON
layout that earlier versions wrote.
"""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path

import pytest

from pipeline import storage
from pipeline.config import load_config
from pipeline.demo import make_tiny_checkpoint
from pipeline.errors import PipelineError
from pipeline.job.resolved import Fp8Decision, ResolvedJob, fp8_head_on, resolve_job
from pipeline.job.state import ExportRecord, JobState, load_state

REPO = Path(__file__).resolve().parents[2]
RESOLVER = REPO / "pipeline/job/resolved.py"
CODE_VERSION = {"commit": "abc123", "dirty": False, "source": "git"}


def _from_config_calls(path: Path) -> list[int]:
    """Lines of `path` that call `<...>StorageOptions.from_config(...)`."""
    tree = ast.parse(path.read_text(), str(path))
    return [node.lineno for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "from_config"
            and ast.unparse(node.func.value).endswith("StorageOptions")]


def test_only_the_resolver_builds_storage_options(tmp_path):
    sources = [p for folder in ("pipeline", "jobs", "bench") for p in (REPO / folder).rglob("*.py")]
    callers = {str(p.relative_to(REPO)): lines for p in sources if (lines := _from_config_calls(p))}
    assert callers == {"pipeline/job/resolved.py": _from_config_calls(RESOLVER)} and callers[str(RESOLVER.relative_to(REPO))]
    stray = tmp_path / "stage.py"  # the check finds a call where one is added
    stray.write_text("from pipeline import storage\noptions = storage.StorageOptions.from_config(cfg.storage)\n")
    assert _from_config_calls(stray) == [2]


def test_resolving_makes_local_paths_absolute_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["run.output_uri=out", "run.cache_dir=node", "model.base_uri=models/base",
                             "tracking.uri=sqlite:///track/mlflow.db", "storage.max_attempts=2"])
    job = resolve_job(cfg)
    assert (job.config.run.output_uri, job.config.run.cache_dir) == (str(tmp_path / "out"), str(tmp_path / "node"))
    assert job.config.model.base_uri == str(tmp_path / "models/base")
    assert job.given is cfg and cfg.run.output_uri == "out"  # params and identity keep what was written
    assert job.folders.state_uri == str(tmp_path / "out/jobs" / cfg.run.name / "state.json")
    assert job.folders.ray_uri == str(tmp_path / "out/ray") and job.folders.moved == ()
    assert job.tracking.uri == f"sqlite:///{tmp_path}/track/mlflow.db" and job.tracking.experiment == cfg.tracking.experiment
    assert job.storage == storage.StorageOptions(max_attempts=2)
    assert job.fp8 == Fp8Decision("none", False, "none", False) and job.train_config is job.config
    assert list(tmp_path.iterdir()) == []  # the tracking folder is made when the job opens
    with pytest.raises(dataclasses.FrozenInstanceError):
        job.storage = storage.StorageOptions()  # type: ignore[misc]


def test_the_fp8_decision_is_what_training_runs_with():
    cfg = load_config(None, ["train.fp8=delayed", "train.fp8_fallback=true", "train.fp8_attention=true"])
    job = resolve_job(cfg)
    assert job.train_config.train.fp8 == "delayed"  # as requested until a worker is asked
    fallback = dataclasses.replace(job.fp8, recipe="none", attention=False, fallback="no CUDA", checked=True)
    settled = job.with_fp8(fallback)
    assert (settled.train_config.train.fp8, settled.train_config.train.fp8_attention) == ("none", False)
    assert settled.config is job.config and settled.config.train.fp8 == "delayed"  # what was asked stays
    assert settled.fp8.requested == "delayed" and settled.fp8.fallback == "no CUDA"


def test_a_fallback_without_fp8_drops_an_fp8_head_and_fast_accumulation_asked_for():
    cfg = load_config(None, ["train.fp8=delayed", "train.fp8_fallback=true", "train.fp8_head=true",
                             "train.fp8_fast_accumulation=true"])
    job = resolve_job(cfg)
    assert (job.train_config.train.fp8_head, job.train_config.train.fp8_fast_accumulation) == (True, True)
    settled = job.with_fp8(dataclasses.replace(job.fp8, recipe="none", fallback="no CUDA", checked=True))
    train = settled.train_config.train
    assert (train.fp8, train.fp8_head, train.fp8_fast_accumulation, train.fast_accumulation) == (
        "none", None, None, False)
    assert settled.config.train.fp8_head is True and settled.config.train.fp8_fast_accumulation  # asked stays


@pytest.mark.parametrize("key", ["recast_fp8_weights", "fp8_weights_from_update"])
def test_a_fallback_without_fp8_drops_the_fp8_weight_options_asked_for(key):
    cfg = load_config(None, ["train.fp8=delayed", "train.fp8_fallback=true", f"train.{key}=true"])
    job = resolve_job(cfg)
    settled = job.with_fp8(dataclasses.replace(job.fp8, recipe="none", fallback="no CUDA", checked=True))
    assert getattr(settled.train_config.train, key) is False and settled.train_config.train.fp8 == "none"
    assert getattr(settled.config.train, key) is True  # asked stays


def test_a_head_the_fp8_gemms_cannot_take_stays_bf16_unless_asked_for(caplog):
    from pipeline.config import TrainConfig
    from pipeline.train.permanent import is_permanent

    left = TrainConfig(fp8="delayed", use_gpu=True)
    with caplog.at_level("INFO", logger="pipeline.job.resolved"):
        assert fp8_head_on(left, 64, 32001) is False  # the run's tags and each worker ask: nothing logged
        assert caplog.text == ""
        assert fp8_head_on(left, 64, 32001, say_why=True) is False  # Llama 2's vocabulary plus a pad token
    assert caplog.text.count("the LM head stays bf16 (train.fp8_head left null): the vocabulary (32001) must be "
                             "divisible by 16") == 1  # job start says it, once
    with pytest.raises(Exception) as caught:
        fp8_head_on(TrainConfig(fp8="delayed", use_gpu=True, fp8_head=True), 64, 32001)
    assert str(caught.value) == ("train.fp8_head=true cannot run on this model: the vocabulary (32001) must be "
                                 "divisible by 16; set it to null (FP8 where the head fits) or false")
    assert is_permanent(caught.value)  # no restart retries it
    assert fp8_head_on(left, 64, 32000) is True
    assert fp8_head_on(left, 60, 32000) is False  # the hidden size counts too


def test_the_lm_head_tag_says_what_the_head_trains_in(tmp_path):
    from pipeline.tracking.run_tags import model_tags

    fits, odd = make_tiny_checkpoint(tmp_path / "fits"), make_tiny_checkpoint(tmp_path / "odd", vocab_size=500)
    tag = lambda base, *sets: model_tags(load_config(None, [f"model.base_uri={base}", *sets]),
                                         storage.StorageOptions())["lm_head"]
    fp8 = ("train.fp8=delayed", "train.use_gpu=true", "model.dtype=bf16")
    assert tag(fits, *fp8) == "fp8"
    assert tag(odd, *fp8) == "bf16"
    assert tag(fits, *fp8, "train.fp8_head=false") == "bf16"
    assert tag(fits, "model.dtype=fp32") == "fp32"


def test_the_accumulation_tag_says_how_the_fp8_gradient_gemms_accumulate(tmp_path):
    from pipeline.tracking.run_tags import comparison_tags

    base = make_tiny_checkpoint(tmp_path / "base")
    tags = lambda *sets, train=None: comparison_tags(load_config(None, [f"model.base_uri={base}", *sets]),
                                                     storage.StorageOptions(), train)
    fp8 = ("train.fp8=delayed", "train.use_gpu=true", "model.dtype=bf16")
    assert tags(*fp8)["fp8_gradient_accumulation"] == "fast"
    assert tags(*fp8, "train.fp8_fast_accumulation=false")["fp8_gradient_accumulation"] == "split"
    assert tags("train.use_gpu=true", "train.fp8=block")["fp8_gradient_accumulation"] == "split"
    assert "fp8_gradient_accumulation" not in tags()
    fell_back = load_config(None, ["train.fp8=none"]).train  # what a fallback trains with
    assert "fp8_gradient_accumulation" not in tags(*fp8, "train.fp8_fallback=true", train=fell_back)


# The layout that the state file had when it was a plain dict: every key, in the order it was written.
OLD_STATE = {
    "identity": {"run.seed": 0, "model.base_uri": "s3://b/base", "data.train_files": ["s3://b/t.jsonl"],
                 "data.format": "text", "data.seq_len": 64},
    "parent_run_id": "p1", "running": {},
    "data": {"uri": "s3://b/runs/data/ab", "train_uri": "s3://b/runs/data/ab/train.parquet", "val_uri": None,
             "stats": {"data_hash": "ab", "cache_hit": False}},
    "checkpoint_uri": "s3://b/runs/ray/e2e/checkpoint_000006-x", "eval": {"base/val_loss": 3.5},
    "export": {"uri": "s3://b/runs/exports/e2e", "version": "1"},
}


def test_the_state_file_reads_and_writes_the_layout_it_always_had(tmp_path):
    state = JobState.from_json(json.dumps(OLD_STATE), "state.json")
    assert state.data.train_uri.endswith("train.parquet") and state.export == ExportRecord("s3://b/runs/exports/e2e", "1")
    assert state.to_json() == json.dumps(OLD_STATE, indent=2).encode()
    partial = {"parent_run_id": "p1", "export": {"uri": "s3://b/x", "version": "1"}}  # fields never set are left out
    assert json.loads(JobState.from_json(json.dumps(partial), "s").to_json()) == partial
    recorded = {"export": {"uri": "s3://b/x", "version": None, "checkpoint_uri": "s3://b/c",
                           "settings": {"max_shard_size": "5GB", "registered_model_name": None}}}
    assert json.loads(JobState.from_json(json.dumps(recorded), "s").to_json()) == recorded  # what an export records
    assert load_state(str(tmp_path / "none.json"), storage.StorageOptions()) == JobState()
    with pytest.raises(PipelineError, match=r"^s3://b/state.json: unknown key 'checkpoint' in the job's state file"):
        JobState.from_json(json.dumps({**OLD_STATE, "checkpoint": "x"}), "s3://b/state.json")
    with pytest.raises(PipelineError, match=r"^f: 'export' in the job's state file must be a dict, not str"):
        JobState.from_json(json.dumps({"export": "s3://b/x"}), "f")
    with pytest.raises(PipelineError, match=r"^f: 'data' in the job's state file does not fit PreparedData"):
        JobState.from_json(json.dumps({"data": {"uri": "x"}}), "f")


def test_a_job_resolves_its_config_once(tmp_path, monkeypatch):
    """A real data-stage job: storage options are built once, and every stage sees the same `job`."""
    from pipeline.job import driver

    base = make_tiny_checkpoint(tmp_path / "base")
    cfg = load_config(None, [f"run.output_uri={tmp_path}/out", f"run.cache_dir={tmp_path}/node",
                             f"model.base_uri={base}", f"data.train_files=[{REPO}/data/tiny_text.jsonl]",
                             "data.seq_len=64", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"])
    built, real = [], storage.StorageOptions.from_config.__func__
    monkeypatch.setattr(storage.StorageOptions, "from_config",
                        classmethod(lambda cls, section: built.append(section) or real(cls, section)))
    seen: list[ResolvedJob] = []
    data_stage = driver.STAGE_FUNCTIONS["data"]
    monkeypatch.setitem(driver.STAGE_FUNCTIONS, "data", lambda ctx, run_id: seen.append(ctx.job) or data_stage(ctx, run_id))
    ctx = driver.run_job(cfg, ["data"], CODE_VERSION, echo=lambda line: None)
    assert len(built) == 1 and seen == [ctx.job]
    saved = load_state(ctx.job.folders.state_uri, ctx.job.storage)
    assert saved == ctx.state and saved.data.train_uri.startswith(str(tmp_path / "out/data"))
    assert saved.identity["model.base_uri"] == str(base) and saved.running == {}
