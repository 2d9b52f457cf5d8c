"""The sweep as it runs on a real cluster: a worker node that shares no disk with the driver, cloud
storage (S3 on loopback), ``ray job submit``'s runtime env, and nodes that advertise a GPU they lack."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
mlflow = pytest.importorskip("mlflow")

from sweep import launch  # noqa: E402
from sweep.config import load_sweep, sweep_id  # noqa: E402
from sweep.plan import make_plan  # noqa: E402
from tests.conftest import SHARED, write_sweep_yaml, write_tiny_assets  # noqa: E402
from tests.private_cluster import job_server_available, private_disk_cluster, unavailable  # noqa: E402

#: AlphaEdit's probe files as JSON lines (../shared/data/glue_eval), a path every node sees, as the data
GLUE = SHARED / "data" / "glue_eval"


from pyarrow import fs  # noqa: E402  (Ray Tune's dependency)

pytestmark = pytest.mark.integration  # clusters of Ray processes, a moto S3 server, job submission


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tok_bos):
    return write_tiny_assets(tmp_path_factory.mktemp("cluster"), tok_bos)


def sweep_yaml(d: Path, out: Path, name: str, grid: dict, **extra) -> Path:
    """The tiny-Llama sweep with its storage, stores and MLflow database under ``out`` (the driver's
    disk); the model, data and corpus at ``d`` on every node (the project's files, synced)."""
    return write_sweep_yaml(d, name, grid, out=out, **extra)


def trial_results(uri: str, parent: str, tmp: Path) -> list[tuple[object, dict]]:
    """(run, its trial.json) of every child run of ``parent``."""
    c = mlflow.tracking.MlflowClient(uri)
    exp = c.get_experiment_by_name("test")
    out = []
    for r in c.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'"):
        d = tmp / r.info.run_id
        d.mkdir(parents=True)
        out.append((r, json.loads(Path(c.download_artifacts(r.info.run_id, "trial.json", str(d))).read_text())))
    return out


@pytest.mark.skipif(unavailable() is not None, reason=unavailable() or "")
def test_a_worker_that_shares_no_disk_runs_every_trial_and_a_second_sweep_computes_nothing_shared(
    assets, tmp_path, monkeypatch
):
    """The layout of cluster.yaml: a head with no CPUs (the driver joins it) and a worker whose view of
    the sweep's folder is an empty private tmpfs. Every trial runs on the worker and reaches MLflow whole
    (through Ray, not the worker's disk); a second sweep that needs the same statistics, values, scores
    and perplexity reads them all from the driver's stores; --resume runs nothing again."""
    out = tmp_path / "out"  # storage, stores and MLflow: the driver's disk, invisible to the worker
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    with private_disk_cluster(out, tmp_path / "logs", dashboard=job_server_available()) as cluster:
        try:
            grid = {"algorithm": ["memit", "emmet"], "layers": [[1]], "batch_size": [2, 4], "mode": ["batch"]}
            probes = {"probes": ["sst2"], "probe_items": 2, "probe_data": str(GLUE)}  # on every node, as the data
            cfg = load_sweep(str(sweep_yaml(assets, out, "nodisk", grid, scoring=probes)))
            args = launch.parser().parse_args(["--config", "x", "--address", cluster.address, "--quiet"])
            first = launch.run(cfg, make_plan(cfg), args)
            assert first["errors"] == 0 and first["trials"] == 4, cluster.logs()
            w = first["work"]
            assert (w["stats_layers_computed"], w["values_optimised"], w["scores_computed"], w["ppl_computed"]) == (
                1,
                4,
                4,
                1,
            )
            assert (w["probes_computed"], w["probes_read"]) == (1, 0)  # the unedited model's probes: one task
            head = {n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) == 0}
            runs = trial_results(first["tracking_uri"], first["parent_run_id"], tmp_path)
            assert len(runs) == 4 and all(r.info.status == "FINISHED" for r, _ in runs)
            assert all(res["node"] not in head for _, res in runs), "trials must run on the worker, not the head"
            assert all(len(res["per_record"]) == 4 and res["metrics"]["final"] for _, res in runs)
            assert all(r.data.metrics["work.stats_reused"] == 1 for r, _ in runs)
            assert all(res["work"]["scores_reused"] == 4 for _, res in runs)
            assert all(
                "probe_sst2_f1" in res["metrics"]["pre"] and "probe_sst2_f1" in res["metrics"]["final"]
                for _, res in runs
            )

            # Another sweep on the same cluster needing the same shared work: every unit is read.
            grid2 = {"algorithm": ["memit"], "layers": [[1]], "batch_size": [1], "mode": ["batch"]}
            cfg2 = load_sweep(str(sweep_yaml(assets, out, "nodisk2", grid2, scoring=probes)))
            second = launch.run(cfg2, make_plan(cfg2), args)
            w2 = second["work"]
            assert second["errors"] == 0 and second["trials"] == 1
            computed = (w2["stats_layers_computed"], w2["values_optimised"], w2["scores_computed"], w2["ppl_computed"])
            assert computed == (0, 0, 0, 0)
            assert (w2["stats_layers_read"], w2["values_read"], w2["scores_read"], w2["ppl_read"]) == (1, 4, 4, 1)
            assert (w2["probes_computed"], w2["probes_read"]) == (0, 1)

            # --resume of the first: every trial is in MLflow, nothing runs, no new run is logged.
            again = launch.run(cfg, make_plan(cfg), launch.parser().parse_args([*_argv(cluster), "--resume"]))
            assert again["work"]["trials_run"] == 0 and again["parent_run_id"] == first["parent_run_id"]
            assert len(trial_results(first["tracking_uri"], first["parent_run_id"], tmp_path / "r")) == 4
        finally:
            ray.shutdown()
        if cluster.dashboard is None:
            pytest.skip("ray job submit: Ray's job server needs ray[default]")
        # The documented submission: HF_TOKEN in the job's runtime env (and in the submitting shell, so
        # the launcher would forward it too): the job's driver starts and the sweep finishes.
        grid3 = {"algorithm": ["emmet"], "layers": [[1]], "batch_size": [1], "mode": ["batch"]}
        path3 = sweep_yaml(assets, out, "nodisk3", grid3)
        job = subprocess.run(
            [
                "ray", "job", "submit", "--address", cluster.dashboard,
                "--runtime-env-json", json.dumps({"env_vars": {"HF_TOKEN": "hf_test_token"}}),
                "--", sys.executable, "-m", "sweep.launch", "--config", str(path3), "--quiet",
            ],
            env={**os.environ, "HF_TOKEN": "hf_test_token", "RAY_AUTH_MODE": "disabled"},
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert job.returncode == 0 and "Failed to merge" not in job.stdout + job.stderr, job.stdout[-3000:]
        cfg3 = load_sweep(str(path3))
        summary = json.loads((out / "ray" / f"nodisk3-{sweep_id(cfg3)}-summary.json").read_text())
        assert summary["errors"] == 0 and summary["trials"] == 1
        assert summary["work"]["stats_layers_computed"] == 0 and summary["work"]["scores_computed"] == 0


def _argv(cluster) -> list[str]:
    return ["--config", "x", "--address", cluster.address, "--quiet"]


@pytest.mark.skipif(unavailable() is not None, reason=unavailable() or "")
def test_shared_work_computed_on_a_worker_is_owned_by_the_head_and_survives_the_worker(assets, tmp_path, monkeypatch):
    """fulfil_ray on the private-disk cluster: every task runs on the worker (the head has no CPU), yet
    afterwards the worker's object store holds none of the units (the driver fetched each result, wrote
    it, put its own copy and dropped the task's), every handle lives on the head, and with the worker
    node gone every handle still resolves, to what the driver's stores hold."""
    import numpy as np
    from ray._private.internal_api import node_stats
    from ray.experimental import get_object_locations

    from editors.stats import StatsStore
    from sweep.shared import tasks
    from sweep.shared.fulfil import fulfil_ray

    out = tmp_path / "out"
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    # The tiny model's results are under Ray's 100 KB limit for returning a value inline to the caller;
    # a real model's are not. With no inline limit every result goes through the object store of the
    # node that computed it, as a Llama-3-8B C of 822 MB does.
    monkeypatch.setenv("RAY_max_direct_call_object_size", "0")
    with private_disk_cluster(out, tmp_path / "logs") as cluster:
        try:
            launch.init_ray(launch.parser().parse_args(_argv(cluster)))
            grid = {"algorithm": ["memit"], "layers": [[1, 2]], "batch_size": [4], "mode": ["batch"]}
            cfg = load_sweep(str(sweep_yaml(assets, out, "owned", grid)))
            plan = make_plan(cfg)
            refs, work = fulfil_ray(plan.shared, cfg, tasks)
            assert (work.stats_passes, work.stats_shards, work.stats_layers_computed) == (1, 2, 2), cluster.logs()
            assert (work.values_optimised, work.scores_computed, work.ppl_computed) == (4, 4, 1)
            alive = [n for n in ray.nodes() if n["Alive"]]
            (head,) = [n for n in alive if n["Resources"].get("CPU", 0) == 0]
            (node,) = [n for n in alive if n is not head]
            (tr,) = refs.values()
            handles = [*tr.stats.values(), *(h for _, h in tr.values), *(h for _, h in tr.scores)]
            assert len(handles) == 2 + 1 + 1
            locations = get_object_locations(handles)
            assert [loc["node_ids"] for loc in locations.values()] == [[head["NodeID"]]] * len(handles)

            def on_worker() -> int:  # objects the worker's store holds as their primary copy
                stats = node_stats(node["NodeManagerAddress"], node["NodeManagerPort"]).store_stats
                return stats.num_object_store_primary_copies

            deadline = time.time() + 20  # the tasks' objects are freed asynchronously
            while on_worker() and time.time() < deadline:
                time.sleep(0.5)
            assert on_worker() == 0, "the worker node's object store still holds results it computed"

            cluster.stop_worker()
            deadline = time.time() + 60
            while any(n["Alive"] for n in ray.nodes() if n["NodeID"] == node["NodeID"]) and time.time() < deadline:
                time.sleep(1)
            got = ray.get(handles, timeout=60)  # nothing to reconstruct: no node could run it
            store = StatsStore(cfg.base["stats"]["store"])
            (p,) = plan.shared.passes
            for layer, arr in zip(tr.stats, got):
                assert np.array_equal(arr, store.get(p.keys[layer]).mom2.numpy())
            assert got[2].shape == (4, 32) and len(got[3]) == 4
        finally:
            ray.shutdown()


def _n_finished(db: Path) -> int:
    """Finished trial runs in an MLflow SQLite file, read directly (a poll of milliseconds)."""
    import sqlite3

    if not db.exists():
        return 0
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)) as con:
            q = (
                "SELECT COUNT(*) FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
                "WHERE t.key = 'sweep.role' AND t.value = 'trial' AND r.status = 'FINISHED'"
            )
            return con.execute(q).fetchone()[0]
    except sqlite3.OperationalError:  # the tables are not there yet
        return 0


def _finished_trials(uri: str) -> list:
    c = mlflow.tracking.MlflowClient(uri)
    exp = c.get_experiment_by_name("test")
    if exp is None:
        return []
    runs = c.search_runs([exp.experiment_id], filter_string="tags.`sweep.role` = 'trial'")
    return [r for r in runs if r.info.status == "FINISHED"]


@pytest.mark.skipif(unavailable() is not None, reason=unavailable() or "")
def test_a_driver_killed_mid_sweep_resumes_onto_a_new_tracking_server_with_every_trial_once(
    assets, tmp_path, monkeypatch
):
    """On the private-disk cluster: a driver (its own process, as ``ray job submit`` or a shell runs it)
    SIGKILLed once a trial is in MLflow; the cluster then moves to a new tracking server (the
    environment's MLFLOW_TRACKING_URI) and ``--resume`` runs the rest there: every trial in the new
    server exactly once, finished, and nothing more written to the old one."""
    out = tmp_path / "out"
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    old, new = f"sqlite:///{out / 'old.db'}", f"sqlite:///{out / 'new.db'}"
    with private_disk_cluster(out, tmp_path / "logs", worker_cpus=1) as cluster:
        grid = {"algorithm": ["memit", "emmet"], "layers": [[1]], "batch_size": [1, 2], "mode": ["batch"]}
        # each trial's edited perplexity over 40 texts: seconds per trial, so the driver dies between trials
        ppl = {"ppl_texts": 40, "ppl_max_len": 128}
        mlf = {"tracking_uri": None, "experiment": "test"}
        path = sweep_yaml(assets, out, "killed", grid, scoring=ppl, mlflow=mlf)
        log = (tmp_path / "driver.log").open("w")
        driver = subprocess.Popen(
            [sys.executable, "-m", "sweep.launch", "--config", str(path), "--address", cluster.address, "--quiet"],
            env={**os.environ, "MLFLOW_TRACKING_URI": old},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            deadline = time.time() + 300
            while not _n_finished(out / "old.db"):
                assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
                assert time.time() < deadline, "no trial finished within 300 s"
                time.sleep(0.05)
        finally:
            os.killpg(driver.pid, 9)
            driver.wait(30)
            log.close()
        before = {r.data.tags["trial.key"] for r in _finished_trials(old)}
        assert 1 <= len(before) < 4, "the driver must die mid-sweep"

        monkeypatch.setenv("MLFLOW_TRACKING_URI", new)
        cfg = load_sweep(str(path))
        try:
            again = launch.run(cfg, make_plan(cfg), launch.parser().parse_args([*_argv(cluster), "--resume"]))
        finally:
            ray.shutdown()
        assert again["errors"] == 0 and again["tracking_uri"] == new, cluster.logs()
        moved = _finished_trials(new)
        assert len(moved) == 4 and len({r.data.tags["trial.key"] for r in moved}) == 4
        assert sorted(r.data.params["algorithm"] for r in moved) == ["emmet", "emmet", "memit", "memit"]
        assert {r.data.tags["trial.key"] for r in _finished_trials(old)} == before  # the old server untouched


# ----------------------------------------------------------------------------------------------------
# Cloud storage: S3 on loopback (moto in server mode) through pyarrow, as Tune reads a URI


@pytest.fixture()
def s3(tmp_path, monkeypatch):
    """A moto S3 server on loopback with one bucket; the AWS_* variables point pyarrow at it."""
    pytest.importorskip("moto")
    from tests.private_cluster import free_port

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    try:
        from pyarrow import fs

        deadline = time.time() + 30
        while True:
            try:
                s3fs = fs.S3FileSystem(
                    endpoint_override=f"127.0.0.1:{port}", scheme="http", region="us-east-1", allow_bucket_creation=True
                )
                s3fs.create_dir("sweeps")
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.5)
        yield s3fs
    finally:
        proc.terminate()
        proc.wait(10)


def test_s3_storage_reaches_tune_unchanged_and_resumes(assets, tmp_path, s3, monkeypatch):
    """``storage: s3://...`` is handed to Tune as is (not turned into a local folder ``s3:``): the
    experiment and the summary land in the bucket, and --resume finds the sweep there."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    grid = {"algorithm": ["memit"], "layers": [[1]], "batch_size": [2, 4], "mode": ["batch"]}
    path = sweep_yaml(assets, out, "ons3", grid, storage="s3://sweeps/ray")
    cfg = load_sweep(str(path))
    assert cfg.storage == "s3://sweeps/ray" and launch.storage_path(cfg) == "s3://sweeps/ray"
    try:
        rc = launch.main(["--config", str(path), "--local", "--num-cpus", "2", "--quiet"])
    finally:
        ray.shutdown()
    assert rc == 0
    assert not any(p.name.startswith("s3:") for p in tmp_path.rglob("*")), "a local folder named s3: was made"
    name = f"ons3-{sweep_id(cfg)}"
    listing = {i.path for i in s3.get_file_info(fs.FileSelector("sweeps/ray", recursive=True))}
    assert f"sweeps/ray/{name}-summary.json" in listing
    assert any(p.startswith(f"sweeps/ray/{name}/experiment_state") for p in listing), sorted(listing)[:20]
    with s3.open_input_stream(f"sweeps/ray/{name}-summary.json") as f:
        summary = json.loads(f.read())
    assert summary["errors"] == 0 and summary["trials"] == 2
    runs = trial_results(summary["tracking_uri"], summary["parent_run_id"], tmp_path)
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r, _ in runs)
    try:
        again = launch.run(cfg, make_plan(cfg), launch.parser().parse_args(["--config", "x", "--local", "--resume"]))
    finally:
        ray.shutdown()
    assert again["work"]["trials_run"] == 0 and again["parent_run_id"] == summary["parent_run_id"]


def test_stores_and_the_model_mirror_on_s3_serve_a_second_cluster(assets, tmp_path, s3, monkeypatch):
    """One cluster computes the statistics, values, scores and perplexity into ``s3://`` stores and fills
    the model mirror from the Hub once; a second cluster (an empty cache on its nodes, its own tracking
    and storage) computes none of them, and its workers load the weights from the mirror, never the Hub."""
    from sweep.shared import mirror

    commit = "0123456789abcdef0123456789abcdef01234567"
    downloads: list[str] = []

    def hub(repo: str, rev: str, dest: Path, patterns: list[str]) -> None:
        downloads.append(f"{repo}@{rev}")
        shutil.copytree(assets / "model", dest)

    monkeypatch.setattr(mirror, "_hub_download", hub)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the workers could not reach the Hub if they tried
    monkeypatch.chdir(tmp_path)
    on_s3 = [
        "base.model.source=org/tiny",
        f"base.model.revision={commit}",
        "base.model.mirror=s3://sweeps/models",
        "base.stats.store=s3://sweeps/stats",
        "values_store=s3://sweeps/values",
        "scores_store=s3://sweeps/scores",
    ]
    grid = {"algorithm": ["memit"], "layers": [[1]], "batch_size": [2, 4], "mode": ["batch"]}
    args = launch.parser().parse_args(["--config", "x", "--local", "--num-cpus", "2", "--quiet"])
    works = []
    for cluster in ("one", "two"):
        monkeypatch.setenv(mirror.CACHE_ENV, str(tmp_path / cluster / "cache"))  # the nodes' own disks
        cfg = load_sweep(str(sweep_yaml(assets, tmp_path / cluster, "s3stores", grid)), on_s3)
        try:
            summary = launch.run(cfg, make_plan(cfg), args)
        finally:
            ray.shutdown()
        assert summary["errors"] == 0 and summary["trials"] == 2
        works.append(summary["work"])
    first, second = works
    assert (first["stats_layers_computed"], first["values_optimised"], first["scores_computed"]) == (1, 4, 4)
    assert (second["stats_layers_computed"], second["values_optimised"], second["scores_computed"]) == (0, 0, 0)
    assert (second["stats_layers_read"], second["values_read"], second["scores_read"], second["ppl_read"]) == (
        1,
        4,
        4,
        1,
    )
    assert downloads == [f"org/tiny@{commit}"]  # once per model and commit, by the first driver
    listing = {i.path for i in s3.get_file_info(fs.FileSelector("sweeps", recursive=True))}
    assert f"sweeps/models/org--tiny/{commit}/MANIFEST.json" in listing
    assert any(p.startswith("sweeps/stats/") and p.endswith(".safetensors") for p in listing)
    copy = tmp_path / "two" / "cache" / "models" / "org--tiny" / commit
    assert (copy / "MANIFEST.json").is_file()  # the second cluster's nodes read the mirror


# ----------------------------------------------------------------------------------------------------
# ray job submit, and nodes without their GPU


def test_a_submitted_jobs_env_vars_are_not_set_twice(monkeypatch):
    """``ray job submit --runtime-env-json '{"env_vars": {"HF_TOKEN": ...}}'``: the job server hands the
    driver its config in RAY_JOB_CONFIG_JSON_ENV_VAR; Ray refuses to merge a ray.init runtime env that
    sets the same variable. The launcher leaves the job's variables to the job."""
    job = {"runtime_env": {"env_vars": {"HF_TOKEN": "hf_from_the_job"}}, "metadata": {}}
    monkeypatch.setenv(launch.JOB_CONFIG_ENV, json.dumps(job))
    monkeypatch.setenv("HF_TOKEN", "hf_from_the_job")
    monkeypatch.setenv("HF_HOME", "/tmp/hf-home")
    env = launch.runtime_env()["env_vars"]
    assert "HF_TOKEN" not in env and env["HF_HOME"] == "/tmp/hf-home" and env["RAY_CHDIR_TO_TRIAL_DIR"] == "0"
    naive = {"env_vars": {**env, "HF_TOKEN": "hf_from_the_job"}}
    with pytest.raises(ValueError, match="Failed to merge the Job's runtime env"):
        ray.init(address="local", num_cpus=1, include_dashboard=False, runtime_env=naive)
    ray.shutdown()
    try:
        args = launch.parser().parse_args(["--config", "x", "--local", "--num-cpus", "1"])
        launch.init_ray(args)

        @ray.remote
        def seen() -> tuple[str | None, str | None]:
            return os.environ.get("HF_TOKEN"), os.environ.get("HF_HOME")

        assert ray.get(seen.remote()) == ("hf_from_the_job", "/tmp/hf-home")  # the job's value reaches workers
    finally:
        ray.shutdown()


def test_a_node_that_advertises_a_gpu_torch_cannot_see_fails_at_once(assets, tmp_path, capsys):
    """Ray's fake GPU stands in for a node started without the NVIDIA runtime: the first task fails with
    one line naming the node and the fix, instead of running the model on the CPU."""
    out = tmp_path / "out"
    grid = {"algorithm": ["memit"], "layers": [[1]], "batch_size": [4], "mode": ["batch"]}
    path = sweep_yaml(assets, out, "nogpu", grid, resources={"cpu": 1, "gpu": 1, "gpu_memory_gb": 24})
    t0 = time.perf_counter()
    try:
        rc = launch.main(["--config", str(path), "--local", "--num-cpus", "2", "--num-gpus", "1", "--quiet"])
    finally:
        ray.shutdown()
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(err) == 1, err  # one line, no traceback
    assert "sees no CUDA device" in err[0] and "node " in err[0] and "resources.gpu: 0" in err[0]
    assert time.perf_counter() - t0 < 120


def test_planning_never_sizes_passes_from_the_drivers_card(assets, tmp_path, capsys):
    """GPU trials without resources.gpu_memory_gb: a dry run refuses with the field named (it asks no
    cluster); it does not read this machine's GPU."""
    grid = {"algorithm": ["memit"], "layers": [[1]], "batch_size": [4], "mode": ["batch"]}
    path = sweep_yaml(assets, tmp_path / "out", "budget", grid, resources={"cpu": 1, "gpu": 1})
    assert launch.main(["--config", str(path), "--dry-run"]) == 2
    assert capsys.readouterr().err.startswith("error: resources.gpu_memory_gb:")
    assert launch.main(["--config", str(path), "--dry-run", "resources.gpu_memory_gb=48"]) == 0


def test_a_head_too_small_for_the_shared_work_is_refused_before_any_run(tmp_path):
    """The paper's batch sweep holds Llama-3-8B's statistics and values on the driver's node; a node with
    a 100 MB object store is refused with the sizes and the fix, before MLflow has a run or a pass starts."""
    from editors.config import ConfigError
    from tests.conftest import ROOT

    db = tmp_path / "mlflow.db"
    cfg = load_sweep(str(ROOT / "sweep" / "configs" / "paper-batch.yaml"), [f"mlflow.tracking_uri=sqlite:///{db}"])
    plan = make_plan(cfg, dry_run=True)
    need = plan.shared.head()
    assert need.stats_bytes == 14336**2 * 4 * len({la for p in plan.shared.passes for la in p.layers})
    ray.init(address="local", num_cpus=1, object_store_memory=100 * 1024**2, include_dashboard=False)
    try:
        with pytest.raises(ConfigError, match=r"^resources: the sweep's shared work is \d+\.\d GB") as e:
            launch.run(cfg, plan, launch.parser().parse_args(["--config", "x", "--quiet"]))
        assert f"--object-store-memory={int(need.object_store_bytes / launch.SPILL_SHARE) + 1}" in str(e.value)
        launch.check_head(
            make_plan(load_sweep(str(ROOT / "sweep" / "configs" / "demo.yaml")), dry_run=True).shared.head()
        )
    finally:
        ray.shutdown()
    runs = mlflow.tracking.MlflowClient(f"sqlite:///{db}").search_runs(
        [e.experiment_id for e in mlflow.tracking.MlflowClient(f"sqlite:///{db}").search_experiments()]
    )
    assert runs == []
