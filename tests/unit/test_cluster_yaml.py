"""cluster.yaml is a valid Ray cluster launcher config (Ray's own schema and defaults) with what jobs need."""

import re
from pathlib import Path

import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[2]
RAW = yaml.safe_load((REPO / "cluster.yaml").read_text())
HOPPER = ("p5.", "p5e.", "p5en.")  # H100 / H200 instances: FP8 tensor cores


def test_cluster_yaml_passes_rays_validation():
    validate_config(prepare_config(RAW))


def test_a_cpu_head_and_hopper_gpu_workers_with_bounds():
    types = RAW["available_node_types"]
    head = types[RAW["head_node_type"]]["node_config"]["InstanceType"]
    assert not head.startswith(("p", "g")), f"the head {head} should be a CPU instance"
    workers = {name: t for name, t in types.items() if name != RAW["head_node_type"]}
    assert workers and all(t["node_config"]["InstanceType"].startswith(HOPPER) for t in workers.values())
    assert all(0 <= t["min_workers"] <= t["max_workers"] <= RAW["max_workers"] for t in workers.values())


def test_nodes_install_the_lock_files_and_gpu_nodes_transformer_engine():
    assert any("requirements/gpu.txt" in c and "pip install" in c for c in RAW["worker_setup_commands"])
    assert not any("gpu.txt" in c for c in RAW["head_setup_commands"])  # TE needs CUDA to build
    assert any("requirements/cpu.txt" in c for c in RAW["head_setup_commands"])
    gpu_lock = (REPO / "requirements" / "gpu.txt").read_text()
    assert "transformer-engine==" in gpu_lock and "\ntorch==" not in gpu_lock  # the image's torch stays


def test_environment_for_s3_mlflow_and_ray_holds_no_secret():
    env = "\n".join(RAW["setup_commands"])
    for name in ("AWS_DEFAULT_REGION", "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_TOKEN", "RAY_AUTH_TOKEN"):
        assert f"export {name}=" in env, name
    literal = re.findall(r"export (\w*(?:TOKEN|SECRET|PASSWORD|KEY)\w*)=(?!\"\$\()", env)
    assert not literal, f"{literal} set to a literal: read it from a secret store instead"
