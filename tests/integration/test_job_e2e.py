"""The whole job against real parts on loopback: local Ray, moto S3 over HTTP, a real MLflow server.

One tiny job runs every stage (base checkpoint and data in S3, checkpoints and export back to S3,
tracking to the MLflow server). Then the same job is run again with more steps, which resumes training
from its latest checkpoint. The MLflow record, the bucket's contents and the export are checked.
A separate test submits the job with `ray job submit` to a `ray start --head` cluster (`ray_head`).
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
import torch
from mlflow import MlflowClient
from transformers import AutoModelForCausalLM

from jobs import finetune
from pipeline import storage
from pipeline.stages.evaluate import load_trained_model
from pipeline.demo import make_tiny_checkpoint

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _keys(bucket, prefix, endpoint):
    s3 = boto3.client("s3", endpoint_url=endpoint)
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


@pytest.fixture(scope="module")
def job(tmp_path_factory, s3_server, mlflow_server, ray_cluster):
    """Inputs in S3 and the job's --set overrides; the job has run once, 6 steps, all stages."""
    bucket = "e2e-job"
    s3_server.create_bucket(bucket)
    options = storage.StorageOptions(endpoint_url=s3_server.endpoint_url)
    base = make_tiny_checkpoint(tmp_path_factory.mktemp("base"))
    storage.publish(base, f"s3://{bucket}/base/tiny-llama", options)
    storage.write_bytes(f"s3://{bucket}/data/text.jsonl", (REPO / "data/tiny_text.jsonl").read_bytes(), options)
    overrides = [
        "run.name=e2e", "run.experiment=e2e", f"run.output_uri=s3://{bucket}/runs",
        f"run.cache_dir={tmp_path_factory.mktemp('node')}",
        f"storage.endpoint_url={s3_server.endpoint_url}",
        f"model.base_uri=s3://{bucket}/base/tiny-llama", "model.backend=torch", "model.dtype=fp32",
        f"data.train_files=[s3://{bucket}/data/text.jsonl]", "data.seq_len=64", "data.max_documents=120",
        "train.workers=2", "train.max_steps=6", "train.checkpoint_every=2", "train.keep_checkpoints=2",
        "train.warmup_steps=1", "eval.max_batches=2", "eval.num_samples=2", "eval.max_new_tokens=8",
        "export.registered_model_name=e2e-tiny", f"tracking.uri={mlflow_server.uri}",
    ]
    args = [a for o in overrides for a in ("--set", o)]
    assert finetune.main(args) == 0
    return {"bucket": bucket, "args": args, "endpoint": s3_server.endpoint_url, "options": options,
            "client": MlflowClient(mlflow_server.uri), "base": base}


def _stage_runs(client, parent):
    runs = client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    return sorted(runs, key=lambda r: r.info.start_time)


def _parent(client):
    experiment = client.get_experiment_by_name("e2e")
    (parent,) = client.search_runs([experiment.experiment_id], filter_string="tags.`pipeline.role` = 'parent'")
    return parent


def test_mlflow_record(job):
    client = job["client"]
    parent = _parent(client)
    assert parent.data.params["train.lr"] and parent.data.params["run.seed"] == "0"
    assert parent.data.tags["code.commit"] not in ("", "unknown")
    stages = _stage_runs(client, parent)
    assert [r.data.tags["pipeline.stage"] for r in stages][:4] == ["data", "train", "eval", "export"]
    assert all(r.info.status == "FINISHED" for r in stages)
    train_run = stages[1]
    losses = client.get_metric_history(train_run.info.run_id, "loss")
    assert sorted(m.step for m in losses) == list(range(1, 7))  # one value per step: rank 0 only
    for name in ("lr", "grad_norm", "tokens_per_s"):
        assert client.get_metric_history(train_run.info.run_id, name), name
    metrics = stages[2].data.metrics
    assert metrics["finetuned/val_loss"] < metrics["base/val_loss"]
    versions = client.search_model_versions("name='e2e-tiny'")
    assert versions and versions[0].run_id == stages[3].info.run_id


def test_exporting_the_same_checkpoint_again_registers_nothing_new(job, capsys):
    """Before any test trains the job further: its export is of the newest checkpoint."""
    client, args = job["client"], [*job["args"], "--stages", "export"]
    versions = client.search_model_versions("name='e2e-tiny'")
    (version,) = [v.version for v in versions]
    assert finetune.main(args) == 0
    out = capsys.readouterr().out
    assert f"already registered e2e-tiny v{version} (exported from the same checkpoint by an earlier run)" in out
    assert len(client.search_model_versions("name='e2e-tiny'")) == 1
    exports = [r for r in _stage_runs(client, _parent(client)) if r.data.tags["pipeline.stage"] == "export"]
    assert len(exports) == 2 and exports[-1].data.tags["export.reused"] == "true"
    assert exports[-1].data.tags["export.registered_version"] == version
    # other export settings are exported anew, which the different export already there refuses
    assert finetune.main([*args, "--set", "export.max_shard_size=100KB"]) == 1
    assert "a different export already exists at" in capsys.readouterr().err
    assert len(client.search_model_versions("name='e2e-tiny'")) == 1


def test_bucket_holds_checkpoints_and_export(job):
    keys = _keys(job["bucket"], "runs/", job["endpoint"])
    checkpoint_manifests = [k for k in keys if k.startswith("runs/ray/") and k.endswith("/manifest.json")]
    assert checkpoint_manifests, keys
    assert {"runs/exports/e2e/manifest.json", "runs/exports/e2e/config.json"} <= set(keys)
    assert any(k.startswith("runs/exports/e2e/model") and k.endswith(".safetensors") for k in keys)


def test_export_reproduces_the_trained_model(job, tmp_path):
    state = json.loads(storage.read_bytes(f"s3://{job['bucket']}/runs/jobs/e2e/state.json", job["options"]))
    exported_dir = storage.pull_checkpoint(state["export"]["uri"], tmp_path, job["options"])
    exported, info = AutoModelForCausalLM.from_pretrained(exported_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    checkpoint = storage.pull_checkpoint(state["checkpoint_uri"], tmp_path, job["options"])
    trained = load_trained_model(checkpoint, job["base"], backend="torch", dtype=torch.float32, device="cpu")
    ids = torch.randint(0, exported.config.vocab_size, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(exported.eval()(ids).logits, trained.eval()(ids).logits, rtol=1e-5, atol=1e-5)


def test_rerun_resumes_training_from_the_latest_checkpoint(job):
    args = [*job["args"], "--set", "train.max_steps=8", "--stages", "train"]
    assert finetune.main(args) == 0
    client = job["client"]
    train_runs = [r for r in _stage_runs(client, _parent(client)) if r.data.tags["pipeline.stage"] == "train"]
    assert len(train_runs) == 2
    resumed = client.get_metric_history(train_runs[-1].info.run_id, "loss")
    assert sorted(m.step for m in resumed) == [7, 8]


def test_bad_config_fails_with_one_line(tmp_path):
    done = subprocess.run([sys.executable, "jobs/finetune.py", "--set", "train.learning_rate=1"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        "finetune: error: unknown key 'train.learning_rate' (did you mean 'train.lr'?)")
    assert "Traceback" not in done.stderr


def test_ray_job_submit_to_a_head_node(tmp_path, ray_head):
    """`ray job submit --working-dir .` against a `ray start --head` cluster runs the demo job: its
    progress lines show in the followed log, once each, and its relative output locations land under
    $FINETUNE_BASE_DIR instead of Ray's temporary copy of the working dir."""
    base = tmp_path / "lasting"
    overrides = ["run.name=submitted", "train.workers=1", "train.max_steps=2", "train.warmup_steps=1",
                 "run.output_uri=job-out", "run.cache_dir=job-node", "tracking.uri=sqlite:///job-mlflow.db",
                 "eval.max_batches=1", "eval.num_samples=1", "eval.max_new_tokens=4"]
    runtime_env = json.dumps({"env_vars": {"FINETUNE_BASE_DIR": str(base)}})
    submit = [str(Path(sys.executable).with_name("ray")), "job", "submit", f"--address={ray_head.address}",
              "--working-dir", ".", "--runtime-env-json", runtime_env, "--", "python", "jobs/finetune.py",
              *[a for o in overrides for a in ("--set", o)]]
    done = subprocess.run(submit, cwd=REPO, env=ray_head.env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in (done.stdout + done.stderr).lower()
    assert "[export]" in done.stdout
    assert (base / "job-out" / "exports" / "submitted" / "manifest.json").exists()
    assert (base / "job-out" / "exports" / "submitted" / "MLmodel").exists()
    assert (base / "job-mlflow.db").is_file() and (base / "job-node").is_dir()
    assert f"[job] run.output_uri: job-out -> {base}/job-out" in done.stdout
    for step in (1, 2):
        lines = [line for line in done.stdout.splitlines() if f"[train] step {step}/2 loss " in line]
        assert len(lines) == 1, lines  # printed once, not also through Ray Train's print patch
        assert " tokens/s " in lines[0] and " eta " in lines[0]
    assert "[train] checkpoint of step 2 committed" in done.stdout
    assert "Reporting training result" not in done.stdout + done.stderr  # Ray Train's copy of each report
    assert "[data] train: " in done.stdout and "[eval] finetuned: loss " in done.stdout


def test_dry_run_checks_everything_and_names_what_is_missing(job, capsys):
    assert finetune.main([*job["args"], "--dry-run"]) == 0
    ok = capsys.readouterr().out
    base = "ok   base checkpoint s3://e2e-job/base/tiny-llama: llama"
    (base_line,) = [line for line in ok.splitlines() if line.startswith(base)]
    assert base_line.endswith(" MB, manifest"), base_line  # a sub-GiB checkpoint in MB, not "0.00 GiB"
    (data_line,) = [line for line in ok.splitlines() if line.startswith("ok   data ")]
    assert re.search(r": \d+ records, each a valid text record \(\d+\.\d MB\)$", data_line), data_line
    missing = f"s3://{job['bucket']}/data/missing.jsonl"
    assert finetune.main([*job["args"], "--set", f"data.train_files=[{missing}]", "--dry-run"]) == 1
    assert f"FAIL data {missing}: input not found: {missing}" in capsys.readouterr().out


def test_dry_run_of_the_gpu_preset_leaves_its_base_to_the_job(tmp_path, monkeypatch, capsys):
    """`configs/gpu-small-fp8.yaml` names a base the job builds on its first run: the dry run says so (and
    builds nothing) instead of asking for a checkpoint to be published there."""
    monkeypatch.chdir(tmp_path)
    given = [f"data.train_files=[{REPO / 'data/tiny_text.jsonl'}]", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]
    args = ["--config", "gpu-small-fp8", "--dry-run", *[a for o in given for a in ("--set", o)]]
    assert finetune.main(args) == 0, capsys.readouterr()
    base = tmp_path / ".cache/demo-store/gpu-small-llama"
    out = capsys.readouterr().out
    assert f"ok   base checkpoint {base}: a random-weight base, built on first run" in out
    assert f"ok   output {tmp_path}/.cache/runs: created on first run ({tmp_path} is writable)" in out
    assert f"ok   tracking: local store {tmp_path}/mlflow.db, created on first run ({tmp_path} is writable)" in out
    assert list(tmp_path.iterdir()) == []  # a dry run writes nothing: no base, output folder or MLflow store
    assert finetune.main([*args, "--set", "model.base_uri=.cache/demo-store/other"]) == 1
    assert "FAIL base checkpoint" in capsys.readouterr().out
    monkeypatch.setattr("os.access", lambda path, mode: False)  # tests run as root, who may write anywhere
    assert finetune.main(args) == 1
    assert f"FAIL output {tmp_path}/.cache/runs: cannot create {tmp_path}/.cache/runs: {tmp_path} is not writable" \
        in capsys.readouterr().out


def test_compare_shows_the_job_with_its_tags_and_real_loss_history(job, tmp_path):
    from pipeline.tracking.compare import format_table, load_jobs, plot_losses

    client = job["client"]
    (record,) = load_jobs(client.tracking_uri, ["e2e"], experiment="e2e")
    train_runs = [r for r in _stage_runs(client, _parent(client)) if r.data.tags["pipeline.stage"] == "train"]
    newest_losses = client.get_metric_history(train_runs[-1].info.run_id, "loss")
    last = max(newest_losses, key=lambda m: m.step)
    assert record.curve[-1] == (last.step, last.value) and record.metrics["final_loss"] == last.value
    assert [s for s, _ in record.curve] == list(range(1, last.step + 1))  # resumed runs joined by step
    assert record.metrics["tokens_per_s"] > 0 and "finetuned/val_loss" in record.metrics
    tags = record.tags
    assert (tags["precision"], tags["hardware"], tags["model_name"]) == ("fp32", "cpu x2", "tiny-llama")
    assert tags["lm_head"] == "fp32"
    assert len(tags["data_fingerprint"]) == 64 and tags["code.commit"] not in ("", "unknown")
    train_tags = train_runs[-1].data.tags  # the loss lives here: the UI filters these runs by the same tags
    assert (train_tags["precision"], train_tags["hardware"]) == ("fp32", "cpu x2")
    assert format_table([record]).splitlines()[0].split()[:2] == ["job", "final_loss"]
    plot_losses([record], tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 1000
