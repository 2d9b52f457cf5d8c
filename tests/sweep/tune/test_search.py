"""Tune as a search: distributions, Optuna, ASHA, held-out facts, repeats, shared work on demand."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest
import yaml

ray = pytest.importorskip("ray")
mlflow = pytest.importorskip("mlflow")
pytest.importorskip("optuna")

from editors.config import ConfigError, to_dict  # noqa: E402
from sweep import launch  # noqa: E402
from sweep.cells import Cells, cell_id, planned_of  # noqa: E402
from sweep.config import load_sweep  # noqa: E402
from sweep.plan import make_plan  # noqa: E402
from sweep.stages import load_records  # noqa: E402
from sweep.tune.search import Best, PlannedTrial, best_of, pareto, per_method  # noqa: E402
from tests.conftest import write_sweep_yaml, write_tiny_assets  # noqa: E402


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tok_bos):
    return write_tiny_assets(tmp_path_factory.mktemp("search"), tok_bos)


@pytest.fixture()
def local_ray():
    yield
    ray.shutdown()


def launch_args(argv):
    return launch.parser().parse_args(["--config", "unused.yaml", *argv])


def search_yaml(d: Path, name: str, grid: dict, **extra) -> Path:
    return write_sweep_yaml(d, name, grid, **extra)


# ----------------------------------------------------------------------------------------------------
# Cells, repeats and held-out facts


def test_repeats_move_seeds_and_order_and_share_their_cell(assets):
    path = search_yaml(assets, "rep", {"layers": [[1]], "mode": ["sequential-batch"], "batch_size": [1]}, repeats=3)
    cells = Cells(load_sweep(str(path)))
    trials = cells.grid_trials()
    assert len(trials) == 3 and len({t.key for t in trials}) == 3
    assert len({t.cell for t in trials}) == 1  # one configuration, three repeats
    seeds = [(t.config.seed, t.config.dataset.order_seed, t.config.hp["template_seed"]) for t in trials]
    assert seeds == [(0, 0, 0), (1, 1, 1), (2, 2, 2)]
    orders = [[r.case_id for r in load_records(t.config)] for t in trials]
    assert all(sorted(o) == [0, 1, 2, 3] for o in orders) and len({tuple(o) for o in orders}) > 1
    assert cell_id({"seed": 4, "hp": {"template_seed": 1, "v_lr": 1}}) == cell_id({"seed": 0, "hp": {"v_lr": 1}})
    assert cell_id({"hp": {"v_lr": 1}}) != cell_id({"hp": {"v_lr": 2}})


def test_a_search_plan_costs_every_trial_it_will_run(assets):
    """The dry run's trial time of a search counts num_samples per cell at its stand-ins' mean, and the
    held-out runs (scaled to the held-out facts, times repeats), not the stand-ins themselves."""
    from sweep.plan import format_plan

    grid = {"layers": {"choice": [[0], [1]]}, "batch_size": [1], "mode": ["sequential-batch"]}
    grid["hp.mom2_update_weight"] = {"loguniform": [100, 1e5]}
    search = {"algorithm": "random", "metric": "final.s", "num_samples": 5, "dev_facts": 1}
    cfg = load_sweep(str(search_yaml(assets, "cost", grid, search=search, repeats=2)))
    plan = make_plan(cfg)
    assert len(plan.planned) == 2  # one cell, at each layer option
    mean = sum(e["time_s"] for e in plan.estimates) / 2
    seconds, n = plan.trial_seconds(cfg)
    assert n == 5 + 2 and seconds == pytest.approx(mean * (5 + 3 / 1 * 2))  # 1 dev fact, 3 held out
    assert "7 trials" in format_plan(cfg, plan)


def test_a_configuration_suggested_twice_is_two_trials(assets):
    """A choice-only space gives the same configuration again: each suggestion keeps a key of its own (its
    run, its result), the cell and the config's content shared."""
    search = {"algorithm": "random", "metric": "final.s", "num_samples": 3}
    path = search_yaml(assets, "twice", {"layers": {"choice": [[1]]}, "batch_size": [2]}, search=search)
    cells = Cells(load_sweep(str(path)))
    a, b = (cells.trial(0, "search", 0, {"layers": [1]}, i) for i in (0, 1))
    assert a.config == b.config and a.cell == b.cell and a.key != b.key


def test_no_held_out_fact_reaches_the_search(assets):
    grid = {"layers": [[1]], "batch_size": [2], "hp.mom2_update_weight": {"loguniform": [100, 1e5]}}
    search = {"algorithm": "random", "metric": "final.s", "num_samples": 2, "dev_facts": 0.5}
    path = search_yaml(assets, "split", grid, search=search, repeats=2)
    cells = Cells(load_sweep(str(path)))
    dev = cells.trial(0, "search", 0, {"hp.mom2_update_weight": 300.0})
    held = [cells.trial(0, "heldout", r, {"hp.mom2_update_weight": 300.0}) for r in range(2)]
    dev_ids = {r.case_id for r in load_records(dev.config)}
    held_ids = [{r.case_id for r in load_records(h.config)} for h in held]
    assert dev_ids == {0, 1} and held_ids == [{2, 3}, {2, 3}]
    assert held[0].cell == held[1].cell != dev.cell


def test_each_variant_searches_its_own_grid(assets):
    """A variant's ``grid`` adds its own keys to the sweep's: AlphaEdit samples L2 where MEMIT samples λ, both
    the shared layers; the searcher of each cell suggests its own keys only, and its trials carry them."""
    from sweep.tune.search import CellSearch

    variants = {
        "memit": {"algorithm": "memit", "grid": {"hp.mom2_update_weight": {"loguniform": [100, 1e5]}}},
        "alphaedit": {"algorithm": "alphaedit", "grid": {"hp.L2": {"loguniform": [0.1, 100]}, "batch_size": [1, 2]}},
    }
    search = {"algorithm": "optuna", "metric": "final.s", "num_samples": 3}
    grid = {"layers": {"choice": [[0], [1]]}, "batch_size": [2]}
    path = search_yaml(assets, "own", grid, search=search, variants=variants)
    cfg = load_sweep(str(path))
    cells = Cells(cfg)
    assert sorted((c.variant, str(c.point), sorted(c.spaces)) for c in cells.cells) == [
        ("alphaedit", "{'batch_size': 1}", ["hp.L2", "layers"]),
        ("alphaedit", "{'batch_size': 2}", ["hp.L2", "layers"]),
        ("memit", "{'batch_size': 2}", ["hp.mom2_update_weight", "layers"]),
    ]
    searcher = CellSearch(cfg, cells)
    got = [planned_of(searcher.suggest(f"t{i}")) for i in range(9)]
    assert searcher.suggest("t9") == searcher.FINISHED  # 3 cells x 3 samples
    for t in got:
        hp = t.config.hp
        assert set(t.sampled) == set(cells.cells[t.cell_index].spaces)
        assert t.layers in ([0], [1]) and t.layers == t.sampled["layers"]
        if t.method == "memit":
            assert hp["mom2_update_weight"] == t.sampled["hp.mom2_update_weight"] and "L2" not in hp
        else:
            assert 0.1 <= hp["L2"] <= 100 and "mom2_update_weight" not in hp
    assert sorted(t.cell_index for t in got) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert len(make_plan(cfg).planned) == 3 * 2  # stand-ins: each cell at both layers, its other spaces' middle


# ----------------------------------------------------------------------------------------------------
# Bad search, scheduler or distribution: one error naming the field, exit 2, before any model


BAD = [
    ({"search": {"algorithm": "hyperopt"}}, {}, "search.algorithm"),
    ({"scheduler": {"name": "pbt"}}, {}, "scheduler.name"),
    ({}, {"hp.mom2_update_weight": {"uniform": [5, 1]}}, "grid.hp.mom2_update_weight.uniform: lo must be < hi"),
    ({}, {"hp.mom2_update_weight": {"loguniform": [0, 10]}}, "log-uniform bound must be > 0"),
    ({}, {"hp.mom2_update_weight": {"normal": [0, 10]}}, "grid.hp.mom2_update_weight: expected"),
    ({"search": {"algorithm": "optuna", "metric": "final.zz"}}, None, "search.metric: 'final.zz' is not a metric"),
    ({"search": {"algorithm": "optuna", "metric": "final.s", "mode": "up"}}, None, "search.mode"),
    ({"search": {"algorithm": "grid"}}, None, "search.algorithm: grid cannot sample"),
    (
        {"search": {"algorithm": "optuna", "metric": ["final.es", "final.ns"]}, "scheduler": {"name": "asha"}},
        None,
        "scheduler: asha stops trials on one metric",
    ),
    (
        {"search": {"algorithm": "optuna", "metric": "final.s"}, "scheduler": {"name": "asha"}},
        None,
        "batch mode",
    ),
    (
        {"search": {"algorithm": "optuna", "metric": "final.s"}, "scheduler": {"name": "asha", "metric": "final.s"}},
        {"mode": ["sequential-batch"], "batch_size": [1]},
        "scheduler.metric",
    ),
    ({"search": {"algorithm": "optuna", "metric": "final.s", "dev_facts": 4}}, None, "search.dev_facts"),
    ({"search": {"algorithm": "optuna", "metric": "final.s"}, "repeats": 2}, None, "repeats: a search repeats"),
    (
        {"scheduler": {"name": "asha"}, "repeats": 2},
        {"hp.mom2_update_weight": [1e3], "mode": ["sequential-batch"]},
        "scheduler: asha would stop a grid cell's repeats",
    ),
    (
        {"variants": {"a": {"algorithm": "alphaedit", "grid": {"hp.L2": {"loguniform": [-1, 10]}}}}},
        None,
        "variants.a.grid.hp.L2.loguniform: a log-uniform bound must be > 0",
    ),
    (
        {
            "search": {"algorithm": "optuna", "metric": "final.s"},
            "variants": {"m": {"algorithm": "memit"}, "a": {"algorithm": "alphaedit", "grid": {"hp.L2": [1.0]}}},
        },
        {"hp.mom2_update_weight": [1e3]},
        "hp.L2=1.0 has none; give a key a distribution",
    ),
]


@pytest.mark.parametrize("extra, grid, field", BAD)
def test_a_bad_search_names_its_field_before_any_model(assets, capsys, monkeypatch, extra, grid, field):
    import sweep.shared.tasks

    monkeypatch.setattr(sweep.shared.tasks, "_cached_model", lambda *a, **k: pytest.fail("a model was loaded"))
    base_grid = {"layers": [[1]], "batch_size": [2], "hp.mom2_update_weight": {"loguniform": [100, 1e5]}}
    path = search_yaml(assets, "bad", {**base_grid, **(grid or {})}, **extra)
    assert launch.main(["--config", str(path), "--local"]) == 2
    err = capsys.readouterr().err
    assert field in err, err


def test_a_trial_is_resolved_once_and_reaches_its_worker_as_planned(assets, monkeypatch):
    """Planning resolves each trial's hyperparameters once; what Tune carries to the worker (the pickled
    config) is that planned trial, so the worker resolves nothing again: with the resolver broken after
    planning, the unpickled trial still gives its hyperparameters, method and needs, equal to the plan's."""
    import pickle

    import sweep.config
    from sweep.tune.search import CellSearch

    grid = {"layers": {"choice": [[0], [1]]}, "hp.mom2_update_weight": {"loguniform": [100, 1e5]}, "batch_size": [2]}
    cfg = load_sweep(
        str(search_yaml(assets, "once", grid, search={"algorithm": "random", "metric": "final.s", "num_samples": 2}))
    )
    cells = Cells(cfg)
    config = CellSearch(cfg, cells).suggest("t0")
    planned = planned_of(config)
    calls = []
    real = sweep.config._resolve_hparams
    monkeypatch.setattr(sweep.config, "_resolve_hparams", lambda c: calls.append(c) or real(c))
    shipped = planned_of(pickle.loads(pickle.dumps(config)))  # Tune's config, as a worker receives it
    assert shipped == planned and shipped.config.edit_hparams == planned.config.edit_hparams
    assert shipped.config.method_name == "memit" and shipped.config.needs_stats
    assert list(shipped.config.edit_hparams.layers) == shipped.layers == shipped.sampled["layers"]
    assert shipped.config.edit_hparams.mom2_update_weight == shipped.sampled["hp.mom2_update_weight"]
    assert calls == []  # nothing was resolved after planning
    fresh = sweep.config.parse_config(to_dict(shipped.config))  # a config parsed anew resolves, once
    assert fresh.edit_hparams == shipped.config.edit_hparams and fresh.edit_hparams is fresh.edit_hparams
    assert len(calls) == 1


def test_the_scheduler_compares_a_search_trial_with_its_cell_and_a_grid_trial_with_its_method():
    from types import SimpleNamespace

    from sweep.tune.search import PerCell

    made: list[list[str]] = []

    class Recorder:
        def __init__(self) -> None:
            self.seen: list[str] = []
            made.append(self.seen)

        def on_trial_add(self, controller, trial):
            self.seen.append(trial.trial_id)

    sched = PerCell(Recorder, "at_edit.s", "max")
    points = [
        ("s0", {"phase": "search", "cell": 0, "method": "memit"}),
        ("s1", {"phase": "search", "cell": 1, "method": "memit"}),  # memit at another grid point
        ("s2", {"phase": "search", "cell": 0, "method": "memit"}),
        ("g0", {"phase": "grid", "cell": 0, "method": "memit"}),
        ("g1", {"phase": "grid", "cell": 1, "method": "memit"}),  # another batch size of memit
        ("g2", {"phase": "grid", "cell": 2, "method": "emmet"}),
    ]
    for tid, point in points:
        planned = SimpleNamespace(phase=point["phase"], cell_index=point["cell"], method=point["method"])
        sched.on_trial_add(None, SimpleNamespace(trial_id=tid, config={"point": {"trial": planned}}))
    assert sorted(made) == [["g0", "g1"], ["g2"], ["s0", "s2"], ["s1"]]


def test_pareto_and_best_follow_the_modes():
    pts = [(1.0, 5.0), (2.0, 4.0), (0.5, 6.0), (1.5, 3.0), (2.0, 6.0)]
    assert pareto(pts, ["max", "max"]) == [4]
    assert sorted(pareto(pts[:4], ["max", "max"])) == [0, 1, 2]
    assert sorted(pareto(pts[:4], ["max", "min"])) == [1, 3]


def test_best_of_leaves_out_trials_without_the_metric(assets):
    grid = {"layers": [[1]], "batch_size": [2], "hp.mom2_update_weight": {"loguniform": [100, 1e5]}}
    path = search_yaml(assets, "best", grid, search={"algorithm": "random", "metric": "final.s", "mode": "min"})
    cfg = load_sweep(str(path))
    cells = Cells(cfg)
    ts: list[PlannedTrial] = [
        cells.trial(0, "search", 0, {"hp.mom2_update_weight": v}, i) for i, v in enumerate([1e2, 1e3, 1e4])
    ]
    got = best_of(cfg, [(ts[0], {"final.s": 50.0}), (ts[1], {"final.s": 20.0}), (ts[2], {"at_edit.s": 1.0})])
    assert [b.sampled for b in got[0]] == [{"hp.mom2_update_weight": 1e3}]
    assert isinstance(got[0][0], Best)


def test_a_method_with_several_cells_is_named_by_its_best_cell(assets):
    """Grid axes give a method several cells, each with its best; the method's best (search.json, the
    summary) is the best of them, its Pareto set the front of all their points."""
    grid = {"layers": [[0], [1]], "batch_size": [2], "hp.mom2_update_weight": {"loguniform": [100, 1e5]}}
    path = search_yaml(assets, "cells", grid, search={"algorithm": "random", "metric": "final.s", "mode": "max"})
    cfg = load_sweep(str(path))
    cells = Cells(cfg)
    t0, t1 = (
        cells.trial(0, "search", 0, {"hp.mom2_update_weight": 1e2}),
        cells.trial(1, "search", 0, {"hp.mom2_update_weight": 1e3}),
    )
    best = best_of(cfg, [(t0, {"final.s": 40.0}), (t1, {"final.s": 60.0})])
    assert sorted(best) == [0, 1]
    assert [b.key for b in per_method(cfg, best)["memit"]] == [t1.key]
    two = load_sweep(str(path), ["search.metric=[final.es,final.ns]"])
    got = best_of(two, [(t0, {"final.es": 90.0, "final.ns": 50.0}), (t1, {"final.es": 80.0, "final.ns": 40.0})])
    assert [b.key for b in per_method(two, got)["memit"]] == [t0.key]  # t0 dominates t1


# ----------------------------------------------------------------------------------------------------
# End to end on local Ray


def _per_record_ids(c, run_id: str) -> set[int]:
    text = Path(c.download_artifacts(run_id, "per_record.csv")).read_text()
    return {int(r["case_id"]) for r in csv.DictReader(io.StringIO(text))}


def test_an_optuna_search_with_asha_held_out_facts_and_repeats(assets, local_ray):
    """λ searched with Optuna's TPE on 2 dev facts, ASHA on the per-batch reports, the best λ run on the 2
    held-out facts twice; the statistics computed once, on demand, by the first trial that needs them."""
    grid = {
        "layers": [[1]],
        "mode": ["sequential-batch"],
        "batch_size": [1],
        "hp.mom2_update_weight": {"loguniform": [100, 1e5]},
        # the tiny random model's scores move with the facts, not with λ: which fact comes first gives
        # ASHA scores to compare at its rung (and a choice of lists, searched by index)
        "dataset.case_ids": {"choice": [[0, 1, 2, 3], [1, 0, 2, 3]]},
    }
    search = {"algorithm": "optuna", "metric": "final.s", "mode": "max", "num_samples": 5, "seed": 3, "dev_facts": 2}
    sch = {"name": "asha", "metric": "at_edit.s", "grace_edits": 1, "reduction_factor": 4}
    path = search_yaml(assets, "opt", grid, search=search, scheduler=sch, repeats=2)
    data = yaml.safe_load(path.read_text())
    data["resources"]["max_concurrent"] = 1  # a fixed order: ASHA's first trial at a rung is never stopped
    path.write_text(yaml.safe_dump(data))
    cfg = load_sweep(str(path))
    summary = launch.run(cfg, make_plan(cfg), launch_args(["--local", "--num-cpus", "2"]))
    assert summary["errors"] == 0
    c = mlflow.tracking.MlflowClient(cfg.mlflow.tracking_uri)
    exp = c.get_experiment_by_name("test")
    runs = c.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{summary['parent_run_id']}'")
    search_runs = [r for r in runs if r.data.params["phase"] == "search"]
    held = [r for r in runs if r.data.params["phase"] == "heldout"]
    assert len(search_runs) == 5 and all(r.info.status == "FINISHED" for r in runs)
    assert sorted(int(r.data.params["search.index"]) for r in search_runs) == list(range(5))
    stopped = [r for r in search_runs if r.data.tags.get("stop.reason") == "asha"]
    assert stopped, "ASHA stopped no trial"
    for r in stopped:  # a stopped trial is a result: why, when, and what it measured until then
        assert r.data.metrics["stopped_at"] == 1 and "at_edit.s" in r.data.metrics and "final.s" not in r.data.metrics
        assert [h.step for h in c.get_metric_history(r.info.run_id, "curve.at_edit_s")] == [1]
    # nothing of the held-out facts reached the search, and the held-out runs are the best λ, twice
    assert all(_per_record_ids(c, r.info.run_id) == {0, 1} for r in search_runs if r not in stopped)
    assert len({r.data.params["hp.mom2_update_weight"] for r in search_runs}) == 5  # five λ sampled
    assert len(held) == 2 and all(_per_record_ids(c, r.info.run_id) == {2, 3} for r in held)
    assert {r.data.params["repeat"] for r in held} == {"0", "1"} and len({r.data.params["cell"] for r in held}) == 1
    assert all("final.s" in r.data.metrics and "stop.reason" not in r.data.tags for r in held)  # never stopped
    best = summary["best"]["best"]["memit"]
    assert {r.data.params["hp.mom2_update_weight"] for r in held} == {str(best["config"]["hp.mom2_update_weight"])}
    finished = [r for r in search_runs if r not in stopped]
    assert best["values"]["final.s"] == pytest.approx(max(r.data.metrics["final.s"] for r in finished), abs=1e-3)
    parent = c.get_run(summary["parent_run_id"])
    assert parent.data.params["search.algorithm"] == "optuna" and parent.data.params["search.metric"] == "final.s"
    # the shared work was computed once, on demand, whatever the number of trials that asked
    work = summary["work"]
    assert work["stats_layers_computed"] == 1 and work["scores_computed"] == 4 and work["ppl_computed"] == 1
    # --resume restores both phases from Tune's storage: nothing runs again, no run is added, the same best
    again = launch.run(cfg, make_plan(cfg), launch_args(["--local", "--num-cpus", "2", "--resume"]))
    assert again["errors"] == 0 and again["parent_run_id"] == summary["parent_run_id"]
    assert again["best"]["best"]["memit"]["config"] == best["config"]
    after = c.search_runs(
        [exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{summary['parent_run_id']}'"
    )
    assert sorted(r.info.run_id for r in after) == sorted(r.info.run_id for r in runs)


def test_a_bad_sampled_combination_fails_before_any_trial(assets):
    grid = {"layers": [[1]], "hp.v_lr": {"uniform": [-1.0, 1.0]}}
    path = search_yaml(assets, "neg", grid, search={"algorithm": "random", "metric": "final.s"})
    with pytest.raises(ConfigError, match=r"hp\.v_lr"):
        make_plan(load_sweep(str(path)))
