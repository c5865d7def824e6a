"""cluster.yaml is a valid Ray cluster launcher config (Ray's own schema and defaults)."""

from pathlib import Path

import yaml
from ray.autoscaler._private.util import prepare_config, validate_config


def test_cluster_yaml_passes_rays_validation():
    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "cluster.yaml").read_text())
    validate_config(prepare_config(raw))
    gpu = raw["available_node_types"]["gpu_worker"]["node_config"]["InstanceType"]
    assert gpu.startswith("p5"), "GPU workers must be H100 (FP8) instances"
