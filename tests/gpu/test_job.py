"""The whole job on a GPU: Transformer Engine backend, FP8 delayed scaling, a small real-shaped model.

Same real parts as the CPU end-to-end test (local Ray, moto S3 over HTTP, a real MLflow server), with
the `gpu-small-fp8` preset: 8 layers, hidden 2048, GQA 16/8. Skipped without CUDA and TE. Run with
`python -m pytest tests/gpu/test_job.py -m gpu -s`; the summary it prints is recorded in
docs/gpu-validation.md.
"""

import json
from pathlib import Path

import boto3
import pytest
from mlflow import MlflowClient

from jobs import finetune
from pipeline import storage
from pipeline.config import load_config
from pipeline.demo import BUILT_SHAPES, make_tiny_checkpoint
from te_model.backend import te_unavailable_reason

REPO = Path(__file__).resolve().parents[2]
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(te_unavailable_reason() is not None, reason=f"TE backend: {te_unavailable_reason()}"),
]


BUCKET = "gpu-job"


@pytest.fixture(scope="module")
def gpu_small_base(tmp_path_factory, s3_server) -> str:
    """A random-weight 380M Llama published to the test's bucket, for every job test here."""
    s3_server.create_bucket(BUCKET)
    shape = {**BUILT_SHAPES["gpu-small-llama"], "max_shard_size": "500MB"}  # the preset's model, in 4 shards
    base = make_tiny_checkpoint(tmp_path_factory.mktemp("base"), **shape)
    uri = f"s3://{BUCKET}/base/gpu-small"
    storage.publish(base, uri, storage.StorageOptions(endpoint_url=s3_server.endpoint_url))
    return uri


def run_gpu_small_job(tmp_path_factory, s3_server, mlflow_server, base_uri: str, run_name: str = "gpu-small-fp8",
                      overrides: tuple[str, ...] = ()):
    """Run the `gpu-small-fp8` preset as `run_name` (with `overrides`) through the job: (MLflow client, parent
    run, the stage runs by stage name)."""
    given = [
        f"run.name={run_name}", f"run.output_uri=s3://{BUCKET}/runs",
        f"run.cache_dir={tmp_path_factory.mktemp('node')}", f"storage.endpoint_url={s3_server.endpoint_url}",
        f"model.base_uri={base_uri}",
        f"tracking.uri={mlflow_server.uri}", "train.log_every=1", *overrides,
    ]
    args = ["--config", "configs/gpu-small-fp8.yaml", *[a for o in given for a in ("--set", o)]]
    assert finetune.main(args) == 0
    client = MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name("gpu-small-fp8")
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if r.info.run_name == run_name and not r.data.tags.get("pipeline.stage"))
    stages = {r.data.tags.get("pipeline.stage"): r for r in runs
              if r.data.tags.get("pipeline.stage") and r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(stages) == {"data", "train", "eval", "export"}
    assert all(r.info.status == "FINISHED" for r in stages.values())
    return client, parent, stages


def test_fp8_job_on_gpu(tmp_path_factory, s3_server, mlflow_server, ray_cluster, gpu_small_base):
    client, _, stages = run_gpu_small_job(tmp_path_factory, s3_server, mlflow_server, gpu_small_base)
    assert stages["train"].data.tags["lm_head"] == "fp8"  # the default with FP8 on a head that fits
    assert stages["train"].data.tags["fp8_gradient_accumulation"] == "fast"  # the default under delayed scaling
    train_id = stages["train"].info.run_id
    losses = [m.value for m in sorted(client.get_metric_history(train_id, "loss"), key=lambda m: m.step)]
    tokens_per_s = [m.value for m in client.get_metric_history(train_id, "tokens_per_s")]
    mfu = [m.value for m in client.get_metric_history(train_id, "mfu")]
    mem = max(m.value for m in client.get_metric_history(train_id, "gpu_mem_gb"))
    evals = stages["eval"].data.metrics
    s3 = boto3.client("s3", endpoint_url=s3_server.endpoint_url)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="runs/").get("Contents", [])]
    exported = [k for k in keys if k.startswith("runs/exports/")]
    checkpoints = sorted({k.split("/")[3] for k in keys if k.startswith("runs/ray/gpu-small-fp8/checkpoint_")})
    versions = client.search_model_versions("name='gpu-small-fp8'")
    summary = {
        "steps": len(losses), "first_loss": losses[0], "final_loss_mean_last_10": sum(losses[-10:]) / 10,
        "tokens_per_s_median": sorted(tokens_per_s)[len(tokens_per_s) // 2],
        "mfu_median": sorted(mfu)[len(mfu) // 2], "gpu_mem_gb_max": mem, "eval": evals,
        "checkpoints_in_bucket": checkpoints, "export_files": sorted(exported),
        "registered_versions": [v.version for v in versions],
    }
    print("\n" + json.dumps(summary, indent=2))
    assert len(losses) == 200
    assert summary["final_loss_mean_last_10"] < losses[0] - 2.0
    assert evals["finetuned/val_loss"] < evals["base/val_loss"]
    assert checkpoints and "runs/exports/gpu-small-fp8/manifest.json" in exported
    assert versions


def test_fp8_job_with_the_80_gb_presets_memory_options(tmp_path_factory, s3_server, mlflow_server, ray_cluster,
                                                       gpu_small_base):
    """The train settings that hold `llama3.1-8b-fp8-h100` under 80 GB (FP8 moments, a 1-byte compensation,
    FP8 weights cast again in backward), through the whole job: it trains, evaluates better than the base
    and registers the model."""
    lean = load_config("llama3.1-8b-fp8-h100").train
    settings = {"train.moments_fp8": lean.moments_fp8, "train.master_weights": lean.master_weights,
                "train.recast_fp8_weights": lean.recast_fp8_weights, "train.recompute_mlp": lean.recompute_mlp}
    assert (settings["train.moments_fp8"], settings["train.recast_fp8_weights"]) == (True, True)
    overrides = [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in settings.items()]
    client, parent, stages = run_gpu_small_job(
        tmp_path_factory, s3_server, mlflow_server, gpu_small_base, "gpu-small-fp8-lean",
        (*overrides, "export.registered_model_name=gpu-small-fp8-lean", "train.max_steps=100",
         "train.checkpoint_every=50"))
    assert {k: parent.data.params[k] for k in settings} == {k: str(v) for k, v in settings.items()}
    assert stages["train"].data.tags["fp8_gradient_accumulation"] == "fast"
    history = client.get_metric_history(stages["train"].info.run_id, "loss")
    losses = [m.value for m in sorted(history, key=lambda m: m.step)]
    evals = stages["eval"].data.metrics
    print(f"\nlean options: {len(losses)} steps, loss {losses[0]:.3f} -> {sum(losses[-10:]) / 10:.3f} (last 10), "
          f"val loss {evals['base/val_loss']:.3f} -> {evals['finetuned/val_loss']:.3f}")
    assert len(losses) == 100 and sum(losses[-10:]) / 10 < losses[0] - 1.0
    assert evals["finetuned/val_loss"] < evals["base/val_loss"]
    assert client.search_model_versions("name='gpu-small-fp8-lean'")
