"""``python -m sweep.report`` on a study's sweeps in a temporary sqlite MLflow store: a search (Optuna-style
trials on dev facts, two stopped by ASHA, the best configurations re-run on held-out facts three times),
a multi-objective search without ``search.json`` (the Pareto set found from the trials), a grid with
repeats, and an older sweep without any of the study's params (its report has no study sections)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from matplotlib.figure import Figure

from sweep.report import main
from sweep.report.repeats import comparable_pairs
from sweep.report.schema import SearchSpec
from sweep.report.search import (
    _param_axis,
    layer_list,
    matches,
    pareto_rows,
    running_best,
    search_groups,
    search_points,
    search_table,
)
from sweep.report.significance import mean_ci, sign_test
from tests.sweep.report.test_report import PNG, _log_trial, mlflow_store

LAMBDAS = (100.0, 300.0, 1000.0, 3000.0, 10000.0, 30000.0, 100000.0, 50.0)
LAYERS = (1, 2, 2, 2, 3, 1, 2, 3)
#: the search trials ASHA stopped (by search.index): at-edit metrics only
ASHA = {5, 6}
#: held-out final S per repeat of each method's best configuration
HELD_S = {"memit": (70.0, 71.0, 72.0), "alphaedit": (20.0, 24.0, 22.0)}
FACTS = 10
STUDY_FILES = ("search.csv", "search.md", "search_trials.csv", "repeats.csv", "repeats.md", "fig_repeats.png")


def _dev_s(method: str, lam: float, layer: int) -> float:
    """Planted dev S: a peak at λ = 1000, layer 2 (alphaedit 10 points lower)."""
    return 93.0 - 10.0 * abs(math.log10(lam) - 3.0) - 5.0 * abs(layer - 2) - (10.0 if method == "alphaedit" else 0.0)


def _base(method: str, n_edits: int, **extra: Any) -> dict[str, Any]:
    return {
        "algorithm": method,
        "method": method,
        "batch_size": 2,
        "mode": "sequential-batch",
        "n_edits": n_edits,
        "model": "smollm2",
        "hparams": "smollm2-135m",
        **extra,
    }


def _per_record(es: list[float], ps: list[float], ns: list[float]) -> str:
    """A per_record.csv as the tracking writes it (×100; pre/at-edit columns beside the final ones)."""
    rows = pd.DataFrame(
        {
            "case_id": range(len(es)),
            "subject": [f"s{i}" for i in range(len(es))],
            "pre_es": 0.0,
            "at_edit_es": es,
            "final_es": es,
            "final_ps": ps,
            "final_ns": ns,
        }
    )
    return rows.to_csv(index=False)


def _parent(client: Any, exp: str, name: str, start: int, params: dict[str, str] | None = None) -> str:
    run = client.create_run(exp, start_time=start, tags={"sweep.name": name, "sweep.role": "parent"})
    for k, v in (params or {}).items():
        client.log_param(run.info.run_id, k, v)
    return run.info.run_id


def _searched(client: Any, exp: str) -> dict[str, Any]:
    """Sweep 'searched': 8 search trials per method (dev facts), then each best configuration 3 times on
    held-out facts, with per-fact scores where memit wins ES on 9 facts of 10, the same every repeat."""
    parent = _parent(client, exp, "searched", 1_000, {"search.algorithm": "optuna"})
    client.log_param(parent, "search.metric", "final.s")
    client.log_param(parent, "search.mode", "max")
    ids: dict[str, Any] = {"search": {}, "heldout": {}}
    best: dict[str, Any] = {}
    for method in ("memit", "alphaedit"):
        for i, (lam, layer) in enumerate(zip(LAMBDAS, LAYERS)):
            s = _dev_s(method, lam, layer)
            params = _base(method, 20, layers=f"[{layer}]", layer=layer, **{"hp.mom2_update_weight": lam})
            # search.index numbers the suggestions of the whole sweep: memit's 0-7, alphaedit's 8-15
            index = i + (8 if method == "alphaedit" else 0)
            params.update({"phase": "search", "repeat": 0, "cell": f"{method}-s{i}", "search.index": index})
            metrics: dict[str, Any] = {"at_edit.s": s + 1, "at_edit.es": 99.0, "curve.at_edit_s": [(2, s + 2)]}
            if i in ASHA:
                metrics["stopped_at"] = 4
            else:
                metrics.update({"final.s": s, "final.es": 95.0, "final.ps": 80.0, "final.ns": 70.0})
            rid = _log_trial(client, exp, parent, f"{method}-s{i}", params, metrics)
            if i in ASHA:
                client.set_tag(rid, "stop.reason", "asha")
            ids["search"][(method, i)] = rid
        done = [i for i in range(len(LAMBDAS)) if i not in ASHA]
        top = max(done, key=lambda i: _dev_s(method, LAMBDAS[i], LAYERS[i]))
        best[method] = {
            "run_id": ids["search"][(method, top)],
            "values": {"final.s": _dev_s(method, LAMBDAS[top], LAYERS[top])},
            "config": {"hp.mom2_update_weight": LAMBDAS[top], "layers": [LAYERS[top]]},
        }
        win = method == "memit"
        for r, s in enumerate(HELD_S[method]):
            lam, layer = LAMBDAS[top], LAYERS[top]
            params = _base(method, FACTS, layers=f"[{layer}]", layer=layer, **{"hp.mom2_update_weight": lam})
            params.update({"phase": "heldout", "repeat": r, "cell": f"{method}-best", "hp.template_seed": r})
            metrics = {"final.s": s, "final.es": s + 5, "final.ps": s - 5, "final.ns": 90.0, "at_edit.s": s}
            rid = _log_trial(client, exp, parent, f"{method}-h{r}", params, metrics)
            es = [100.0 if win else 0.0] * (FACTS - 1) + [0.0 if win else 100.0]
            client.log_text(rid, _per_record(es, [50.0] * FACTS, [90.0] * FACTS), "per_record.csv")
            ids["heldout"][(method, r)] = rid
    client.log_dict(parent, {"metric": ["final.s"], "mode": ["max"], "best": best, "pareto": {}}, "search.json")
    return {"parent": parent, "ids": ids, "best": best}


def _pareto(client: Any, exp: str) -> dict[str, Any]:
    """Sweep 'pareto': memit searched over λ for final.s (max) and final.ppl (min), no search.json."""
    parent = _parent(client, exp, "pareto", 2_000, {"search.metric": "final.s,final.ppl", "search.mode": "max,min"})
    # (λ, S, ppl): 0 and 2 trade off, 1 is dominated by 0, 3 equals 2's S at a worse ppl
    points = [(100.0, 90.0, 30.0), (300.0, 85.0, 31.0), (1000.0, 80.0, 20.0), (3000.0, 80.0, 25.0)]
    ids = []
    for i, (lam, s, ppl) in enumerate(points):
        params = _base("memit", 20, layers="[2]", layer=2, **{"hp.mom2_update_weight": lam})
        params.update({"phase": "search", "repeat": 0, "cell": f"p{i}", "search.index": i})
        ids.append(_log_trial(client, exp, parent, f"p{i}", params, {"final.s": s, "final.ppl": ppl}))
    return {"parent": parent, "ids": ids}


def _grid(client: Any, exp: str) -> dict[str, Any]:
    """Sweep 'repeated': a grid of memit and emmet, 3 repeats each, and rome once; memit wins ES on 6
    facts of 10 and loses 4 (within noise)."""
    parent = _parent(client, exp, "repeated", 3_000)
    finals = {"memit": (80.0, 82.0, 84.0), "emmet": (60.0, 61.0, 62.0), "rome": (50.0,)}
    ids = {}
    for method, values in finals.items():
        for r, s in enumerate(values):
            params = _base(method, FACTS, layers="[2]", layer=2, phase="grid", repeat=r, cell=f"{method}-cell")
            metrics = {"final.s": s, "final.es": s, "final.ps": s, "final.ns": s, "at_edit.s": s}
            rid = _log_trial(client, exp, parent, f"{method}-{r}", params, metrics)
            es = {"memit": [100.0] * 6 + [0.0] * 4, "emmet": [0.0] * 6 + [100.0] * 4, "rome": [50.0] * FACTS}[method]
            client.log_text(rid, _per_record(es, [60.0] * FACTS, [80.0] * FACTS), "per_record.csv")
            ids[(method, r)] = rid
    return {"parent": parent, "ids": ids}


def _old(client: Any, exp: str) -> str:
    """Sweep 'old': two batch-mode trials logged before searches and repeats (no phase, repeat, cell)."""
    parent = _parent(client, exp, "old", 4_000)
    for method, s in (("memit", 80.0), ("emmet", 70.0)):
        params = _base(method, 8, layers="[1]", layer=1, mode="batch")
        _log_trial(client, exp, parent, method, params, {"at_edit.s": s, "final.s": s, "at_edit.es": s})
    return parent


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The store with the four sweeps, and the reports of each in its own folder."""
    tmp, uri, client, exp = mlflow_store(tmp_path_factory, "mlflow_study")
    out = {"uri": uri, "tmp": tmp}
    out["searched"] = _searched(client, exp)
    out["pareto"] = _pareto(client, exp)
    out["repeated"] = _grid(client, exp)
    out["old"] = _old(client, exp)
    for name in ("searched", "pareto", "repeated", "old"):
        folder = tmp / name
        paths = main(["--tracking-uri", uri, "--sweep", name, "--out", str(folder), "--quiet"])
        out[f"{name}.out"], out[f"{name}.paths"] = folder, paths
    return out


# ----------------------------------------------------------------------------------------------------
# The search


def test_search_best_table(study: dict[str, Any]) -> None:
    out = study["searched.out"]
    table = pd.read_csv(out / "search.csv").set_index("method")
    assert list(table.index) == ["memit", "alphaedit"]  # the report's method order
    for method in ("memit", "alphaedit"):
        row = table.loc[method]
        assert row["point"] == "best" and row["trials"] == 8 and row["stopped (asha)"] == 2
        assert row["run_id"] == study["searched"]["best"][method]["run_id"]
        assert row["search.index"] == (2 if method == "memit" else 10)  # λ = 1000 at layer 2
        assert row["found at"] == 3  # the method's third trial
        assert row["hp.mom2_update_weight"] == 1000.0 and row["layers"] == "[2]"
        assert row["final.s"] == pytest.approx(_dev_s(method, 1000.0, 2))
        held = mean_ci(HELD_S[method])
        assert row["heldout n"] == 3
        assert row["heldout final.s"] == pytest.approx(held.mean)
        assert row["heldout final.s ±"] == pytest.approx(held.half_width)
    text = (out / "search.md").read_text()
    assert (
        "- memit: best final.s 93.00 (max final.s; trial 3 of 8, 2 stopped early) at hp.mom2_update_weight=1000, "
        "layers [2]; held out: final.s 71.00 ± 2.48 (n=3)." in text
    )
    report = (out / "report.md").read_text()
    assert "## Search (optuna, max final.s; dev facts)" in report
    assert "![search](fig_search_memit.png)" in report and "![search](fig_search_alphaedit.png)" in report


def test_search_history_and_figures(study: dict[str, Any]) -> None:
    out, paths = study["searched.out"], study["searched.paths"]
    hist = pd.read_csv(out / "search_trials.csv")
    memit = hist[hist["method"] == "memit"].set_index("search.index")
    assert list(memit.index) == list(range(8))
    assert set(memit.index[memit["stop.reason"] == "asha"]) == ASHA
    assert memit.loc[sorted(ASHA), "final.s"].isna().all() and (memit.loc[sorted(ASHA), "stopped_at"] == 4).all()
    expected = running_best(
        pd.Series(
            [
                _dev_s("memit", lam, ly) if i not in ASHA else math.nan
                for i, (lam, ly) in enumerate(zip(LAMBDAS, LAYERS))
            ]
        ),
        "max",
    )
    assert memit["best final.s"].tolist() == pytest.approx(expected.tolist())
    assert memit["best final.s"].iloc[-1] == pytest.approx(93.0)
    assert {"hp.mom2_update_weight", "layers"} <= set(hist.columns)
    for method in ("memit", "alphaedit"):
        f = out / f"fig_search_{method}.png"
        assert paths[f.name] == f and f.read_bytes()[:8] == PNG


def test_search_trials_stay_out_of_the_paper_sections(study: dict[str, Any]) -> None:
    """The search's dev trials are the search section's; the sequential table holds the held-out runs only."""
    seq = pd.read_csv(study["searched.out"] / "sequential.csv")
    assert sorted(seq["method"]) == ["alphaedit", "memit"] and set(seq["n_trials"]) == {3}  # one n_edits: no column
    assert "n_edits" not in seq.columns and "hp.mom2_update_weight" not in seq.columns
    # the seeds the repeats move are not a swept setting: no series, no hparam section of their own
    assert "hp.template_seed" not in seq.columns and not list(study["searched.out"].glob("hparam_*"))
    runs = pd.read_csv(study["searched.out"] / "runs.csv")
    assert len(runs) == 2 * (8 + 3) and {"phase", "repeat", "cell", "search.index", "stop.reason"} <= set(runs.columns)


def test_pareto_found_from_the_trials(study: dict[str, Any]) -> None:
    out = study["pareto.out"]
    table = pd.read_csv(out / "search.csv")
    ids = study["pareto"]["ids"]
    assert list(table["point"]) == ["pareto 1", "pareto 2"]
    assert list(table["run_id"]) == [ids[0], ids[2]]
    assert list(table["final.ppl"]) == [30.0, 20.0] and "heldout n" not in table.columns
    assert (out / "fig_search_memit.png").is_file()
    assert "## Search (a search, max final.s, min final.ppl; dev facts)" in (out / "report.md").read_text()


# ----------------------------------------------------------------------------------------------------
# Repeats and paired comparisons


def test_repeats_of_the_heldout_runs(study: dict[str, Any]) -> None:
    out = study["searched.out"]
    table = pd.read_csv(out / "repeats.csv").set_index("method")
    assert list(table.index) == ["memit", "alphaedit"] and set(table["repeats"]) == {3}
    for method, values in HELD_S.items():
        ci = mean_ci(values)
        row = table.loc[method]
        assert row["final.s mean"] == pytest.approx(ci.mean)
        assert (row["final.s low"], row["final.s high"]) == pytest.approx((ci.low, ci.high))
        assert row["final.ns mean"] == 90.0 and row["final.ns low"] == 90.0
    md = (out / "repeats.md").read_text()
    assert "| memit | 3 | 71.00 ± 2.48 |" in md  # the setting, the repeats, S
    assert "alphaedit | 3 | 22.00 ± 4.97 |" in md  # s = 2: 4.303 · 2 / √3
    assert "Repeats: mean ± 95% CI per cell (held-out facts)" in (out / "report.md").read_text()


def test_paired_heldout_beyond_noise(study: dict[str, Any]) -> None:
    out = study["searched.out"]
    table = pd.read_csv(out / "paired.csv").set_index("metric")
    assert set(table["A"]) == {"memit"} and set(table["B"]) == {"alphaedit"}
    assert list(table.index) == ["final ES", "final PS", "final NS", "final S"]
    es = table.loc["final ES"]
    assert es["repeats"] == 3 and es["facts"] == FACTS
    assert es["A - B"] == pytest.approx(80.0) and es["ci low"] > 0
    assert (es["wins"], es["losses"], es["ties"]) == (9, 0 + 1, 0) and es["p sign"] == pytest.approx(sign_test(9, 1))
    assert bool(es["beyond noise"])
    # S = hmean of the means: memit (90, 50, 90) -> 71.05, alphaedit (10, 50, 90) -> 22.88
    s_a, s_b = 3 / (1 / 90 + 1 / 50 + 1 / 90), 3 / (1 / 10 + 1 / 50 + 1 / 90)
    assert table.loc["final S", "A - B"] == pytest.approx(s_a - s_b)
    assert table.loc["final PS", "A - B"] == 0.0 and not bool(table.loc["final PS", "beyond noise"])
    assert es["in words"].startswith(
        "memit > alphaedit on final ES beyond noise (+80.00 points, paired bootstrap 95% CI ["
    )
    assert es["in words"].endswith("sign test 9 wins, 1 loss, 0 ties, p=0.0215; 10 facts, 30 paired scores)")
    report = (out / "report.md").read_text()
    assert "> memit > alphaedit on final ES beyond noise" in report
    assert "> memit vs alphaedit on final PS" not in report  # the report quotes S and ES; paired.md has all
    assert "memit vs alphaedit on final PS: within noise (+0.00 points" in (out / "paired.md").read_text()


def test_grid_repeats_and_pairs(study: dict[str, Any]) -> None:
    out = study["repeated.out"]
    table = pd.read_csv(out / "repeats.csv").set_index("method")
    assert list(table.index) == ["rome", "memit", "emmet"]
    assert table.loc["memit", "final.s mean"] == pytest.approx(82.0)
    assert table.loc["memit", "final.s high"] - 82.0 == pytest.approx(mean_ci([80, 82, 84]).half_width)
    assert table.loc["rome", "runs"] == 1 and pd.isna(table.loc["rome", "final.s low"])
    md = (out / "repeats.md").read_text()
    assert "| rome | 1 | 50.00 |" in md
    report = (out / "report.md").read_text()
    assert "Repeats: mean ± 95% CI per cell (grid)" in report and "1 cell(s) have one repeat" in report
    pairs = pd.read_csv(out / "paired.csv")
    es = pairs[pairs["metric"] == "final ES"].set_index(["A", "B"])
    assert set(es.index) == {("rome", "memit"), ("rome", "emmet"), ("memit", "emmet")}
    me = es.loc[("memit", "emmet")]
    assert (me["repeats"], me["wins"], me["losses"]) == (3, 6, 4)
    assert me["A - B"] == pytest.approx(20.0) and not bool(me["beyond noise"])
    assert me["in words"].startswith("memit vs emmet on final ES: within noise (+20.00 points")
    assert es.loc[("rome", "memit"), "repeats"] == 1  # rome ran once: the pair merges the one repeat both have
    assert not (out / "search.csv").exists()


# ----------------------------------------------------------------------------------------------------
# An older sweep, and the stale files of a study's report


def test_old_sweep_has_no_study_sections(study: dict[str, Any]) -> None:
    out, paths = study["old.out"], study["old.paths"]
    assert not [p for p in paths if p.startswith(("search", "fig_search", "repeats", "fig_repeats", "paired"))]
    assert not list(out.glob("fig_search_*")) and (out / "report.md").is_file()
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 2 and not {"phase", "repeat", "cell", "search.index", "stop.reason"} & set(runs.columns)


def test_study_files_removed_when_stale(study: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "r"
    main(["--tracking-uri", study["uri"], "--sweep", "searched", "--out", str(out), "--quiet"])
    assert all((out / f).is_file() for f in (*STUDY_FILES, "paired.csv", "fig_search_memit.png"))
    main(["--tracking-uri", study["uri"], "--sweep", "old", "--out", str(out), "--quiet"])
    assert not [f for f in (*STUDY_FILES, "paired.csv", "paired.md") if (out / f).exists()]
    assert not list(out.glob("fig_search_*"))


# ----------------------------------------------------------------------------------------------------
# The pieces


def test_pareto_rows_and_running_best() -> None:
    df = pd.DataFrame({"a": [1.0, 2.0, 2.0, 0.5, math.nan], "b": [5.0, 5.0, 6.0, 1.0, 0.0]})
    # max a, min b: row 1 dominates row 2 (same a, lower b) and row 0 (higher a, same b); row 3 has the lowest b
    assert list(pareto_rows(df, ["a", "b"], ["max", "min"]).index) == [1, 3]
    assert list(pareto_rows(df, ["a", "b"], ["max", "max"]).index) == [2]
    assert running_best(pd.Series([3.0, math.nan, 5.0, 4.0]), "max").tolist() == [3.0, 3.0, 5.0, 5.0]
    assert running_best(pd.Series([3.0, math.nan, 5.0, 1.0]), "min").tolist() == [3.0, 3.0, 3.0, 1.0]


def test_config_matching() -> None:
    assert layer_list("[1, 2]") == (1, 2) and layer_list([3]) == (3,) and layer_list(None) is None
    trials = pd.DataFrame({"hp.mom2_update_weight": [1000.0, 300.0], "layers": ["[2]", "[2]"]})
    assert matches(trials, {"hp.mom2_update_weight": 1000, "layers": [2]}).tolist() == [True, False]
    assert matches(trials, {"hp.other": 1}).tolist() == [False, False]


def test_best_from_search_json_or_trials() -> None:
    sub = pd.DataFrame(
        {
            "run_id": ["a", "b", "c"],
            "final.s": [50.0, 70.0, math.nan],
            "hp.x": [1.0, 2.0, 3.0],
            "search.index": [0, 1, 2],
        }
    )
    points, source = search_points(sub, "memit", None, ["final.s"], ["max"])
    assert source == "trials" and [p["run_id"] for p in points] == ["b"] and points[0]["config"] == {"hp.x": 2.0}
    spec = SearchSpec("optuna", ("final.s",), ("max",), best={"memit": {"run_id": "a", "values": {}, "config": {}}})
    assert search_points(sub, "memit", spec, ["final.s"], ["max"])[0][0]["run_id"] == "a"
    assert search_points(sub, "memit", None, ["final.s"], ["min"])[0][0]["run_id"] == "a"


def test_search_groups_split_fixed_settings() -> None:
    sel = pd.DataFrame(
        {
            "method": ["memit"] * 4 + ["alphaedit"],
            "batch_size": [16, 64, 16, 64, 16],
            "search.index": [0, 1, 2, 3, 0],
            "run_id": list("abcde"),
        }
    )
    groups = [(name, method, list(sub["run_id"])) for name, method, sub in search_groups(sel)]
    assert groups == [
        ("memit, batch_size=16", "memit", ["a", "c"]),
        ("memit, batch_size=64", "memit", ["b", "d"]),
        ("alphaedit", "alphaedit", ["e"]),
    ]


def test_log_axis_for_more_than_two_decades() -> None:
    ax = Figure().subplots()
    _param_axis(ax, pd.DataFrame({"hp.x": [100.0, 1000.0, 50000.0]}), "hp.x")
    assert ax.get_xscale() == "log"
    ax = Figure().subplots()
    _param_axis(ax, pd.DataFrame({"hp.x": [100.0, 5000.0]}), "hp.x")  # 1.7 decades
    assert ax.get_xscale() == "linear"
    ax = Figure().subplots()
    x = _param_axis(ax, pd.DataFrame({"layers": ["[1, 2]", "[3]", "[1, 2]"]}), "layers")
    assert x.tolist() == [0.0, 1.0, 0.0]


def test_pairs_share_the_layer_in_a_grid_not_held_out() -> None:
    """Grid cells of memit and emmet pair at the same layer; held-out runs are each method's best
    configuration, so every memit cell pairs with every emmet cell."""
    rows = [
        {"method": m, "cell": f"{m}{ly}", "repeat": 0, "run_id": f"r-{m}{ly}", "layers": f"[{ly}]", "phase": "grid"}
        for m in ("memit", "emmet")
        for ly in (1, 2)
    ]
    grid = pd.DataFrame(rows)
    pairs = comparable_pairs(grid)
    assert [(a, b) for a, b, _ in pairs] == [("memit1", "emmet1"), ("memit2", "emmet2")]
    assert pairs[0][2] == [(0, "r-memit1", "r-emmet1")]
    assert len(comparable_pairs(grid.assign(phase="heldout"))) == 4


def test_search_json_point_without_run_id() -> None:
    """A best point logged before its run had an id is found by its trial key."""
    trials = pd.DataFrame(
        {
            "run_id": ["a", "b"],
            "trial.key": ["k1", "k2"],
            "status": "FINISHED",
            "method": "memit",
            "phase": "search",
            "search.index": [0, 1],
            "final.s": [50.0, 70.0],
            "hp.x": [1.0, 2.0],
        }
    )
    point = {"run_id": None, "trial_key": "k2", "values": {"final.s": 70.0}, "config": {"hp.x": 2.0}}
    spec = SearchSpec("optuna", ("final.s",), ("max",), best={"memit": point})
    table, notes, chosen = search_table(trials, trials, spec, ["final.s"], ["max"])
    assert chosen == {"memit": ["b"]} and table["run_id"].tolist() == ["b"] and table["search.index"].tolist() == [1]
    assert notes == ["memit: best final.s 70.00 (max final.s; trial 2 of 2) at hp.x=2."]
