"""What a job leaves behind, captured so a test can prove that a failed job left nothing.

A snapshot holds every object of a bucket (key, etag, last-modified), every file of a local output
folder (relative path and sha256) and the whole MLflow record (experiments, runs with their status,
params, tags and metric keys, registered models with their versions). Two snapshots compare equal
only if nothing was added, removed, overwritten or half-written in between.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import boto3
from mlflow import MlflowClient
from mlflow.entities import ViewType


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
