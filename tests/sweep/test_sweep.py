"""The sweep on local Ray with a tiny random Llama: sharing, MLflow, resume, dry runs, failures, nodes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

ray = pytest.importorskip("ray")
mlflow = pytest.importorskip("mlflow")

from sweep import launch  # noqa: E402
from sweep.cells import expand  # noqa: E402
from sweep.config import load_sweep  # noqa: E402
from sweep.plan import make_plan  # noqa: E402
from tests.conftest import ROOT, write_sweep_yaml, write_tiny_assets  # noqa: E402

CONFIGS = sorted((ROOT / "sweep" / "configs").glob("*.yaml"))


pytestmark = pytest.mark.integration  # every test here starts Ray or MLflow, or checks their errors


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tok_bos):
    return write_tiny_assets(tmp_path_factory.mktemp("sweep"), tok_bos)


def sweep_yaml(d: Path, name: str, grid: dict, **extra) -> Path:
    return write_sweep_yaml(d, name, grid, **extra)


def children(d: Path, name: str, parent: str):
    c = mlflow.tracking.MlflowClient(f"sqlite:///{d / name / 'mlflow.db'}")
    exp = c.get_experiment_by_name("test")
    runs = c.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    parents = c.search_runs([exp.experiment_id], filter_string="tags.`sweep.role` = 'parent'")
    return runs, parents, c


@pytest.fixture()
def local_ray():
    yield
    ray.shutdown()


def test_sweep_shares_work_tracks_in_mlflow_and_resumes(assets, local_ray, monkeypatch, capsys):
    grid = {"algorithm": ["memit", "emmet"], "layers": [[1], [2]], "batch_size": [2, 4], "mode": ["batch"]}
    path = sweep_yaml(assets, "grid8", grid)
    args = ["--config", str(path), "--local", "--num-cpus", "2"]
    cfg = load_sweep(str(path))
    plan = make_plan(cfg)
    summary = launch.run(cfg, plan, launch_args(args))
    assert summary["errors"] == 0 and summary["trials"] == 8
    work = summary["work"]
    # statistics once per (model, layer, corpus settings): both layers in one pass; values once per (layer, fact)
    assert work["stats_passes"] == 1 and work["stats_layers_computed"] == 2
    assert work["values_optimised"] == 2 * 4  # two value layers x four facts, shared by MEMIT and EMMET
    assert work["scores_computed"] == 4  # the unedited model scored once per fact for all 8 trials
    # Tune's experiment state keeps no packed result of a trial MLflow has: a few KB per trial
    from ray import tune

    from sweep.result import REPORT_KEY

    state = tune.ExperimentAnalysis(f"{launch.storage_path(cfg)}/{cfg.name}-{launch.sweep_id(cfg)}").trials
    assert len(state) == 8 and all(t.last_result and REPORT_KEY not in t.last_result for t in state)
    runs, parents, c = children(assets, "grid8", summary["parent_run_id"])
    assert len(parents) == 1 and len(runs) == 8
    seen = set()
    for r in runs:
        p, m = r.data.params, r.data.metrics
        assert r.info.status == "FINISHED"
        assert {"algorithm", "layers", "layer", "batch_size", "mode", "n_edits", "model", "hp.v_lr"} <= set(p)
        assert {"pre.es", "at_edit.s", "final.ns", "time.values", "memory.cpu_rss_peak_mb", "pre.ppl"} <= set(m)
        assert m["work.stats_computed"] == 0 and m["work.stats_reused"] == 1
        assert m["work.values_optimised"] == 0 and m["work.values_reused"] == 4
        assert m["work.scores_computed"] == 0 and m["work.scores_reused"] == 4
        assert m[f"stats.tokens.L{p['layer']}"] == 3000  # the tokens in C, from the pre-pass's statistics
        hist = c.get_metric_history(r.info.run_id, "curve.at_edit_s")
        assert sorted(h.step for h in hist) == ([2, 4] if p["batch_size"] == "2" else [4])
        arts = {a.path for a in c.list_artifacts(r.info.run_id)}
        assert {"config.yaml", "per_record.csv", "trial.json"} <= arts
        seen.add((p["algorithm"], p["layers"], p["batch_size"]))
    assert len(seen) == 8
    ray.shutdown()

    # A second launch with --resume runs nothing new and logs no new run.
    again = launch.run(cfg, make_plan(cfg), launch_args([*args, "--resume"]))
    assert again["work"]["trials_run"] == 0 and again["work"]["stats_layers_computed"] == 0
    assert again["parent_run_id"] == summary["parent_run_id"]
    runs2, parents2, _ = children(assets, "grid8", summary["parent_run_id"])
    assert len(runs2) == 8 and len(parents2) == 1


def launch_args(argv):
    """The launcher's own command line (``--config`` is read by ``main`` only)."""
    return launch.parser().parse_args(["--config", "unused.yaml", *argv])


def test_killed_trial_is_retried_and_reported_once(assets, local_ray, monkeypatch, tmp_path):
    from sweep.tune.trainable import CHAOS_ENV

    marker = tmp_path / "killed"
    monkeypatch.setenv(CHAOS_ENV, str(marker))
    grid = {"algorithm": ["memit"], "layers": [[1]], "batch_size": [2, 4], "mode": ["batch"]}
    path = sweep_yaml(assets, "chaos", grid)
    cfg = load_sweep(str(path))
    summary = launch.run(cfg, make_plan(cfg), launch_args(["--local", "--num-cpus", "2"]))
    assert marker.exists(), "a worker process should have been killed mid-trial"
    assert summary["errors"] == 0
    runs, _, _ = children(assets, "chaos", summary["parent_run_id"])
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    assert len({r.data.tags["trial.key"] for r in runs}) == 2


def test_two_node_cluster_reads_shared_statistics(assets, tmp_path):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    try:
        grid = {"algorithm": ["memit", "emmet"], "layers": [[1]], "batch_size": [2, 4], "mode": ["batch"]}
        path = sweep_yaml(assets, "twonode", grid)
        cfg = load_sweep(str(path))
        summary = launch.run(cfg, make_plan(cfg), launch_args(["--address", cluster.address]))
        assert summary["errors"] == 0
        runs, _, c = children(assets, "twonode", summary["parent_run_id"])
        results = [
            json.loads(
                c.download_artifacts(r.info.run_id, "trial.json", str(tmp_path))
                and Path(tmp_path, "trial.json").read_text()
            )
            for r in runs
        ]
        used = {res["node"] for res in results}
        assert used == {n.node_id for n in nodes}, "trials should run on both worker nodes"
        assert all(res["work"]["stats_reused"] == 1 and res["work"]["stats_computed"] == 0 for res in results)
        assert all(res["stats_zero_copy"] for res in results)  # read-only views of each node's object store
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_dry_runs(path, capsys):
    assert launch.main(["--config", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "trials" in out and "statistics" in out


def test_a_dry_run_plans_without_a_missing_dataset_but_refuses_more_edits_than_it_holds(assets, capsys):
    """A dataset file not at hand (planned on a laptop for a cluster's disk) is counted by position; a
    file at hand with fewer records than ``n_edits`` is the launch's error, so the dry run reports it."""
    held = len(json.loads((assets / "cf.json").read_text()))
    path = sweep_yaml(assets, "toomany", {"n_edits": [held + 1], "batch_size": [1]})
    assert launch.main(["--config", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "n_edits" in err and f"only {held} records" in err
    cfg = yaml.safe_load(path.read_text())
    cfg["base"]["dataset"]["source"] = str(assets / "elsewhere.json")
    path.write_text(yaml.safe_dump(cfg))
    assert launch.main(["--config", str(path), "--dry-run"]) == 0
    assert "1 trials" in capsys.readouterr().out


def test_bad_sweep_config_names_the_field(assets, capsys):
    path = sweep_yaml(assets, "bad", {"algorithm": ["memit", "mend"], "batch_size": [2]})
    assert launch.main(["--config", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "algorithm" in err and "mend" in err
    cfg = load_sweep(str(sweep_yaml(assets, "ok", {"batch_size": [2, 4]})))
    assert len(expand(cfg)) == 2


def test_variants_and_a_collapsed_trial_do_not_stop_the_sweep(assets, local_ray):
    """Named variants become the trials' methods; the collapse guard stops one trial (collapsed_at in
    MLflow, the reason as a tag) and the sweep finishes the other with its forgetting and health curves."""
    path = sweep_yaml(
        assets,
        "lifelong",
        {},
        variants={
            "memit": {"algorithm": "memit"},
            "memit-guarded": {"algorithm": "memit", "guard": {"min_batch_es": 100}, "hp": {"v_num_grad_steps": 1}},
        },
    )
    text = yaml.safe_load(path.read_text())
    text["base"].update(layers=[1], batch_size=2, mode="sequential-batch")
    text["base"]["scoring"].update(retention_every=1, health_every=1)
    path.write_text(yaml.safe_dump(text))
    cfg = load_sweep(str(path))
    summary = launch.run(cfg, make_plan(cfg), launch_args(["--local", "--num-cpus", "2"]))
    assert summary["errors"] == 0 and summary["trials"] == 2
    runs, _, c = children(assets, "lifelong", summary["parent_run_id"])
    by = {r.data.params["method"]: r for r in runs}
    assert set(by) == {"memit", "memit-guarded"} and all(r.info.status == "FINISHED" for r in runs)
    guarded, free = by["memit-guarded"], by["memit"]
    assert guarded.data.metrics["collapsed_at"] == 2 and "min_batch_es" in guarded.data.tags["collapse.reason"]
    assert "collapsed_at" not in free.data.metrics
    steps = lambda r, k: sorted(m.step for m in c.get_metric_history(r.info.run_id, k))  # noqa: E731
    assert steps(free, "curve.forget_all_es") == [2, 4] and steps(free, "curve.health_cond") == [2, 4]
    assert steps(free, "curve.forget_c1_es") == [4] and steps(free, "curve.health_he") == [2, 4]  # cohorts, energy
    assert steps(guarded, "curve.forget_all_es") == [2]


def test_an_unreachable_tracking_server_is_reported_at_launch_before_any_work(assets, capsys):
    import time

    path = sweep_yaml(assets, "down", {"algorithm": ["memit"], "layers": [[1]], "batch_size": [2]})
    t = time.perf_counter()
    rc = launch.main(["--config", str(path), "--local", "mlflow.tracking_uri=http://127.0.0.1:9"])
    assert rc == 2 and time.perf_counter() - t < 30
    err = capsys.readouterr().err
    assert "http://127.0.0.1:9" in err and "mlflow.tracking_uri" in err
    assert not (assets / "down" / "stats").exists() and not (assets / "down" / "scores").exists()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(store: Path, port: int):
    import subprocess
    import sys
    import time
    import urllib.request

    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{store / 'mlflow.db'}",
            "--default-artifact-root",
            str(store / "art"),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(120):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("mlflow server did not start")


def _stop_server_then_log(*args, **kwargs):
    """Stands in for tracking.log_trial (module-level so Tune can pickle its callback): the first trial
    to be logged finds the server stopped."""
    import os
    import signal

    from sweep.tune import tracking

    marker = Path(os.environ["TEST_MLFLOW_MARKER"])
    if not marker.exists():
        os.kill(int(os.environ["TEST_MLFLOW_PID"]), signal.SIGTERM)
        import time

        time.sleep(3)
        marker.write_text("stopped")
    return tracking.__dict__["_real_log_trial"](*args, **kwargs)


def test_a_server_that_goes_away_mid_sweep_loses_no_result(assets, local_ray, tmp_path, monkeypatch):
    """A real ``mlflow server`` on loopback, stopped while the trials run: they finish, their results
    stay in Tune's storage, and ``--resume`` after a restart logs every one of them, once."""
    from sweep.tune import tracking

    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    server = _start_server(tmp_path, port)
    path = sweep_yaml(assets, "flaky", {"algorithm": ["memit", "emmet"], "layers": [[1]], "batch_size": [2]})
    text = yaml.safe_load(path.read_text())
    text["mlflow"]["tracking_uri"] = uri
    path.write_text(yaml.safe_dump(text))
    cfg = load_sweep(str(path))
    marker = tmp_path / "server-stopped"
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # each call to the stopped server fails at once
    monkeypatch.setenv("TEST_MLFLOW_PID", str(server.pid))
    monkeypatch.setenv("TEST_MLFLOW_MARKER", str(marker))
    monkeypatch.setattr(tracking, "_real_log_trial", tracking.log_trial, raising=False)
    monkeypatch.setattr(tracking, "log_trial", _stop_server_then_log)
    summary = launch.run(cfg, make_plan(cfg), launch_args(["--local", "--num-cpus", "2"]))
    server.wait(30)
    assert marker.exists() and summary["errors"] == 0
    monkeypatch.undo()
    ray.shutdown()
    server = _start_server(tmp_path, port)
    try:
        again = launch.run(cfg, make_plan(cfg), launch_args(["--local", "--num-cpus", "2", "--resume"]))
        c = mlflow.tracking.MlflowClient(uri)
        exp = c.get_experiment_by_name("test")
        runs = c.search_runs(
            [exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{again['parent_run_id']}'"
        )
        assert sorted(r.data.params["algorithm"] for r in runs) == ["emmet", "memit"]
        assert all(r.info.status == "FINISHED" for r in runs)
    finally:
        server.terminate()
        server.wait(30)


def test_trial_runs_are_live_from_the_start_and_close_with_real_times(assets, local_ray, monkeypatch):
    """The child run exists (RUNNING, with its params and colour) before the trial's result is logged,
    its curve points arrive as the batches finish, and it closes FINISHED with the trial's own span."""
    from sweep.tune import tracking

    seen = {}
    real = tracking.log_trial

    def spy(c, exp_id, parent, sid, result, run_id=None, streamed=0, extra=None):
        run = c.get_run(run_id)
        hist = c.get_metric_history(run_id, "curve.at_edit_s")
        seen.update(status=run.info.status, params=dict(run.data.params), tags=dict(run.data.tags))
        seen.update(steps=sorted(m.step for m in hist), streamed=streamed)
        return real(c, exp_id, parent, sid, result, run_id, streamed, extra)

    monkeypatch.setattr(tracking, "log_trial", spy)
    path = sweep_yaml(assets, "live", {"algorithm": ["memit"], "layers": [[1]], "batch_size": [2]})
    cfg = load_sweep(str(path))
    summary = launch.run(cfg, make_plan(cfg), launch_args(["--local", "--num-cpus", "2"]))
    assert summary["errors"] == 0
    assert seen["status"] == "RUNNING" and seen["params"]["method"] == "memit" and seen["params"]["layer"] == "1"
    assert seen["tags"]["mlflow.runColor"].startswith("#")
    assert seen["steps"] == [2, 4] and seen["streamed"] == 2  # both batches streamed before the end
    runs, _, c = children(assets, "live", summary["parent_run_id"])
    (run,) = runs
    assert run.info.status == "FINISHED" and run.info.end_time - run.info.start_time > 1000  # the trial's span
    assert sorted(m.step for m in c.get_metric_history(run.info.run_id, "curve.at_edit_s")) == [2, 4]  # no repeats
    assert "memit" in run.data.tags["mlflow.note.content"]
    csv_text = c.download_artifacts(run.info.run_id, "per_record.csv")
    header = open(csv_text).readline().strip().split(",")
    assert header[:5] == ["case_id", "subject", "prompt", "target_new", "target_true"]
    assert header.index("pre_es") < header.index("at_edit_es") < header.index("final_es")


def test_a_resume_onto_a_new_tracking_server_logs_there_and_runs_what_it_lacks(assets, local_ray, monkeypatch):
    """The tracking target from the environment (a cluster's MLFLOW_TRACKING_URI), moved between a sweep and
    its --resume (a new cluster, a new server): the resumed sweep logs to the new target through this
    launch's callback, runs exactly the trials it has no finished run of, each once, and writes nothing
    more to the old one (Tuner.restore would have restored the old callback and run nothing)."""
    path = sweep_yaml(assets, "moved", {"algorithm": ["memit", "emmet"], "layers": [[1]], "batch_size": [2]})
    text = yaml.safe_load(path.read_text())
    text["mlflow"]["tracking_uri"] = None
    path.write_text(yaml.safe_dump(text))
    cfg = load_sweep(str(path))
    old, new = (f"sqlite:///{assets / 'moved' / name}" for name in ("old.db", "new.db"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", old)
    first = launch.run(cfg, make_plan(cfg), launch_args(["--local", "--num-cpus", "2"]))
    assert first["errors"] == 0
    ray.shutdown()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", new)
    again = launch.run(cfg, make_plan(cfg), launch_args(["--local", "--num-cpus", "2", "--resume"]))
    assert again["errors"] == 0 and again["tracking_uri"] == new

    def trial_runs(uri):
        c = mlflow.tracking.MlflowClient(uri)
        exp = c.get_experiment_by_name("test")
        return c.search_runs([exp.experiment_id], filter_string="tags.`sweep.role` = 'trial'")

    moved, kept = trial_runs(new), trial_runs(old)
    assert sorted(r.data.params["algorithm"] for r in moved) == ["emmet", "memit"]
    assert all(r.info.status == "FINISHED" for r in moved)
    assert len(kept) == 2 and all(r.info.status == "FINISHED" for r in kept)  # nothing more on the old server
