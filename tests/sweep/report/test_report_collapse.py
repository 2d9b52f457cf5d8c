"""The collapse analytics: CP@60 by hand, the hyperspherical energy by hand, a trial's retention cohorts
and collapse points, and the report's collapse section on a store with two lifelong runs."""

from __future__ import annotations

import contextlib
import io
import math

import pandas as pd
import pytest
import torch

from editors.schedule import hyperspherical_energy
from sweep.evals.collapse import cohort_size, collapse_point, collapse_points
from sweep.report import main
from tests.sweep.report.test_report import _log_trial, _params, _scores, _stage_metrics, mlflow_store


def test_collapse_point_by_hand():
    pts = [(10, 90.0), (20, 70.0), (30, 50.0), (40, 20.0)]
    assert collapse_point(pts) == 30  # 50 < 0.6 · 90 = 54 first at 30 edits
    assert collapse_point(pts, start=80.0) == 40  # 50 is not < 48; 20 is
    assert collapse_point(pts, start=120.0) == 20  # 70 < 72
    assert collapse_point(pts, threshold=0.1) is None
    ppl = [(10, 50.0), (20, 80.0), (30, 90.0)]
    assert collapse_point(ppl, start=50.0, higher=False) == 30  # 90 > 50 / 0.6 = 83.3
    assert collapse_point([(5, float("nan"))]) is None
    curves = [
        {"edits": 2, "batch_es": 100.0, "health_ppl": 40.0, "probe_sst2_f1": 60.0},
        {"edits": 4, "batch_es": 50.0, "health_ppl": 45.0, "probe_sst2_f1": 30.0},
    ]
    cps = collapse_points(curves, {"ppl": 20.0, "probe_sst2_f1": 70.0})
    assert cps == {"batch_es": 4, "health_ppl": 2, "probe_sst2_f1": 4}  # 40 > 20 / 0.6 = 33.3 at once
    assert cohort_size(20, 100) == 200 and cohort_size(5, 100) == 100 and cohort_size(25, 4) == 12


def test_hyperspherical_energy_by_hand():
    """Rows e1, e2, −e1 (any norms): distances √2, 2, √2 between the three pairs, so the mean of
    1/distance over the 6 ordered pairs is (2/√2 + 1/2) / 3."""
    w = torch.tensor([[3.0, 0.0], [0.0, 0.5], [-2.0, 0.0]])
    assert hyperspherical_energy(w) == pytest.approx((2 / math.sqrt(2) + 0.5) / 3)
    spread = torch.eye(4)
    crowded = torch.tensor([[1.0, 0.1, 0, 0], [1.0, -0.1, 0, 0], [1.0, 0, 0.1, 0], [1.0, 0, 0, 0.1]])
    assert hyperspherical_energy(crowded) > hyperspherical_energy(spread)


@pytest.fixture(scope="module")
def collapse_report(tmp_path_factory):
    """Two sequential runs with retention cohorts and collapse points (memit collapses at 6 edits on
    batch_es; alphaedit never does), one batch run; the CLI's report."""
    tmp, uri, client, exp = mlflow_store(tmp_path_factory, "collapse")
    parent = client.create_run(exp, tags={"sweep.name": "life", "sweep.id": "life-1", "sweep.role": "parent"})
    pid = parent.info.run_id
    for alg, es in (("memit", [90.0, 80.0, 40.0, 30.0]), ("alphaedit", [90.0, 88.0, 85.0, 84.0])):
        m = _stage_metrics(_scores(90, 80, 70), _scores(es[-1], 50, 70))
        m["curve.batch_es"] = [(2 * (i + 1), v) for i, v in enumerate(es)]
        m["curve.forget_all_es"] = [(2 * (i + 1), v) for i, v in enumerate(es)]
        for j in range(4):  # cohort j is scored from its own batch on
            m[f"curve.forget_c{j}_es"] = [(2 * (i + 1), es[i] - 5 * (i - j)) for i in range(j, 4)]
        m["curve.health_he"] = [(2 * (i + 1), 1.0 + 0.1 * i) for i in range(4)]
        for task in ("rte", "sst2"):
            m[f"curve.probe_{task}_lik_acc"] = [(4, 60.0), (8, 30.0 if alg == "memit" else 58.0)]
        if alg == "memit":
            m["collapse.cp60.batch_es"] = 6
            m["collapse.cp60.probe_sst2_lik_acc"] = 4
            m["collapse.cp60.probe_rte_lik_acc"] = 8
        _log_trial(client, exp, pid, f"{alg}-seq", _params(alg, 1, 2, "sequential-batch"), m)
    _log_trial(client, exp, pid, "memit-b", _params("memit", 1, 2, "batch"), _stage_metrics(_scores(90, 80, 70)))
    out = tmp / "report"
    with contextlib.redirect_stdout(io.StringIO()):
        paths = main(["--tracking-uri", uri, "--sweep", "life", "--out", str(out), "--quiet"])
    return paths, out


def test_the_collapse_section_tables_cp60_and_draws_the_retention_matrix(collapse_report):
    paths, out = collapse_report
    table = pd.read_csv(out / "collapse.csv", dtype=str)
    by = table.set_index("method")
    assert len(table) == 2  # the sequential runs only
    assert by.loc["memit", "cp60.batch_es"] == "6" and by.loc["alphaedit", "cp60.batch_es"] == "none"
    assert by.loc["alphaedit", "cp60.forget_all_es"] == "none"  # measured, never fell
    assert by.loc["alphaedit", "cp60.health_he"] == "none"
    md = (out / "collapse.md").read_text()  # the headline measures and the first probe to fall
    assert "cp60.health_he" not in md and "cp60.batch_es" in md and "cp60.forget_all_es" in md
    rows = {line.split("|")[1].strip(): line for line in md.splitlines()[2:]}
    assert rows["memit"].rstrip(" |").endswith("4 (sst2)") and rows["alphaedit"].rstrip(" |").endswith("none")
    assert (out / "fig_retention.png").stat().st_size > 10_000 and "fig_retention.png" in {
        p.name for p in paths.values()
    }
    assert "Collapse points" in (out / "report.md").read_text()
