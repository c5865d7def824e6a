"""A world with a job's history in it, and snapshots that prove a failed job changed nothing there.

The `world` fixture is storage and tracking as a job sees them: a bucket on the test S3 server holding a
tiny base checkpoint and data, and an earlier job's traces (its state file and an export, in the bucket
and in a local output folder; its MLflow parent run and registered model version).

A snapshot holds every object of a bucket (key, etag, last-modified), every file of a local output
folder (relative path and sha256) and the whole MLflow record (experiments, runs with their status,
params, tags and metric keys, registered models with their versions). Two snapshots compare equal
only if nothing was added, removed, overwritten or half-written in between.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest
from mlflow import MlflowClient
from mlflow.entities import ViewType

from pipeline import storage
from pipeline.tiny import make_tiny_checkpoint

__all__ = ["world"]
REPO = Path(__file__).resolve().parents[1]


def bucket_objects(endpoint_url: str, bucket: str) -> dict[str, tuple[str, str]]:
    """key -> (etag, last-modified) of every object in `bucket`."""
    s3 = boto3.client("s3", endpoint_url=endpoint_url)
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return {o["Key"]: (o["ETag"], o["LastModified"].isoformat()) for p in pages for o in p.get("Contents", [])}


def folder_files(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file below `root` (hidden temp files included)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def mlflow_record(tracking_uri: str) -> dict:
    """Experiments, runs and registered models of a tracking server, as plain comparable values."""
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    experiments = client.search_experiments(view_type=ViewType.ALL)
    runs = client.search_runs([e.experiment_id for e in experiments], run_view_type=ViewType.ALL,
                              max_results=1000) if experiments else []
    models = client.search_registered_models()
    return {
        "experiments": sorted((e.experiment_id, e.name, e.lifecycle_stage, e.last_update_time) for e in experiments),
        "runs": sorted((r.info.run_id, r.info.status, r.info.end_time, r.info.lifecycle_stage,
                        tuple(sorted(r.data.params.items())), tuple(sorted(r.data.tags.items())),
                        tuple(sorted(r.data.metrics))) for r in runs),
        "models": sorted((m.name, tuple(sorted((v.version, v.source, v.run_id) for v in m.latest_versions or [])))
                         for m in models),
    }


@dataclass(frozen=True)
class Snapshot:
    objects: dict
    files: dict
    mlflow: dict

    @classmethod
    def take(cls, endpoint_url: str, bucket: str, folder: Path, tracking_uri: str) -> "Snapshot":
        return cls(bucket_objects(endpoint_url, bucket), folder_files(folder), mlflow_record(tracking_uri))

    def changes(self, later: "Snapshot") -> list[str]:
        """What differs between this snapshot and a later one, one line per difference."""
        found = []
        for what, before, after in (("object", self.objects, later.objects), ("file", self.files, later.files)):
            for key in sorted(set(before) | set(after)):
                if before.get(key) != after.get(key):
                    state = "added" if key not in before else "removed" if key not in after else "changed"
                    found.append(f"{what} {key} {state}")
        for part in ("experiments", "runs", "models"):
            if self.mlflow[part] != later.mlflow[part]:
                found.append(f"MLflow {part} changed: {self.mlflow[part]} -> {later.mlflow[part]}")
        return found


@dataclass
class World:
    """The storage and tracking a job of these tests sees, and the earlier job's traces in them."""

    run: str  # run name, experiment and registered model name of the job
    bucket: str
    endpoint: str
    tracking_uri: str
    base_dir: Path  # the tiny base checkpoint, also published at base_uri
    base_uri: str
    data_uri: str
    out: Path  # a local output folder holding an earlier job's state
    cache: Path
    options: storage.StorageOptions

    def settings(self) -> list[str]:
        """--set arguments of a good job; a case adds the one bad setting (later --set wins)."""
        sets = [f"run.name={self.run}", f"run.experiment={self.run}", f"run.output_uri=s3://{self.bucket}/runs",
                f"run.cache_dir={self.cache}", f"storage.endpoint_url={self.endpoint}",
                f"model.base_uri={self.base_uri}", "model.backend=torch", f"data.train_files=[{self.data_uri}]",
                "data.seq_len=64", "train.max_steps=2", "train.warmup_steps=1",
                f"export.registered_model_name={self.run}", f"tracking.uri={self.tracking_uri}"]
        return [arg for s in sets for arg in ("--set", s)]

    def snapshot(self) -> Snapshot:
        return Snapshot.take(self.endpoint, self.bucket, self.out, self.tracking_uri)


def _earlier_job(world: World) -> None:
    """A finished job's parent run, model version, state file and export: all must survive untouched."""
    client = MlflowClient(tracking_uri=world.tracking_uri, registry_uri=world.tracking_uri)
    experiment = client.create_experiment(world.run)
    parent = client.create_run(experiment, run_name=world.run, tags={"pipeline.role": "parent"}).info.run_id
    client.set_terminated(parent, "FINISHED")
    client.create_registered_model(world.run)
    export = f"s3://{world.bucket}/runs/exports/{world.run}"
    client.create_model_version(world.run, export, run_id=parent)
    state = json.dumps({"parent_run_id": parent, "export": {"uri": export, "version": "1"}}).encode()
    for root in (f"s3://{world.bucket}/runs", str(world.out)):
        storage.write_bytes(storage.join(root, "jobs", world.run, "state.json"), state, world.options)
        storage.write_bytes(storage.join(root, "exports", world.run, "config.json"), b'{"model_type": "llama"}',
                            world.options)


@pytest.fixture(scope="module")
def world(tmp_path_factory, s3_server, mlflow_server) -> World:
    """Per test module: a bucket with a base checkpoint and data, and an earlier job's traces."""
    tmp = tmp_path_factory.mktemp("world")
    run = f"job-{uuid.uuid4().hex[:8]}"
    bucket = s3_server.create_bucket(run)
    options = storage.StorageOptions(endpoint_url=s3_server.endpoint_url)
    base_dir = make_tiny_checkpoint(tmp / "base")
    base_uri = f"s3://{bucket}/base/tiny-llama"
    storage.publish(base_dir, base_uri, options)
    data_uri = f"s3://{bucket}/data/text.jsonl"
    storage.write_bytes(data_uri, (REPO / "data/tiny_text.jsonl").read_bytes(), options)
    world = World(run, bucket, s3_server.endpoint_url, mlflow_server.uri, base_dir, base_uri, data_uri,
                  tmp / "out", tmp / "node", options)
    _earlier_job(world)
    return world
