"""``python -m sweep.report`` on a synthetic sweep in a temporary sqlite MLflow store."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from sweep.report import ReportError, find_sweep, main, markdown_table

ALGS = ("memit", "emmet")
BEST_LAYER = {"memit": 2, "emmet": 3}
PNG = b"\x89PNG\r\n\x1a\n"
EXPECTED = (
    "runs.csv",
    "layer_search.csv",
    "layer_search.md",
    "fig_layer_search.png",
    "batch.csv",
    "batch.md",
    "fig_batch.png",
    "sequential.csv",
    "sequential.md",
    "fig_sequential.png",
    "timings.csv",
    "timings.md",
    "fig_timings.png",
    "curves.csv",
    "fig_curves.png",
    "hparam_emmet_lambda.csv",
    "hparam_emmet_lambda.md",
    "fig_hparam_emmet_lambda.png",
    "report.md",
)


def _scores(es: float, ps: float, ns: float) -> dict[str, float]:
    s = 3 / (1 / es + 1 / ps + 1 / ns)
    return {"es": es, "ps": ps, "ns": ns, "s": s, "em": es / 10, "pm": ps / 10, "nm": ns / 10}


def _layer_scores(alg: str, layer: int) -> dict[str, float]:
    """Planted layer-search scores: the best layer of each algorithm has the highest S."""
    bonus = 20.0 if layer == BEST_LAYER[alg] else 0.0
    return _scores(70 + bonus + layer, 60 + bonus, 80 - layer)


def _batch_scores(alg: str, bs: int, lam: float) -> dict[str, float]:
    """Planted batch-mode scores, falling with the batch size."""
    drop = bs * (2 if alg == "memit" else 1) * lam
    return _scores(99 - drop, 90 - drop, 85 - drop / 2)


def _log_trial(client: Any, exp: str, parent: str, key: str, params: dict[str, Any], metrics: dict[str, Any]) -> str:
    from mlflow.entities import Metric, Param

    run = client.create_run(exp, tags={"mlflow.parentRunId": parent, "sweep.role": "trial", "trial.key": key})
    rid = run.info.run_id
    ms = []
    for k, v in metrics.items():
        if isinstance(v, list):  # a curve: [(step, value), ...]
            ms += [Metric(k, float(val), 0, step) for step, val in v]
        else:
            ms.append(Metric(k, float(v), 0, 0))
    client.log_batch(rid, metrics=ms, params=[Param(k, str(v)) for k, v in params.items()])
    client.set_terminated(rid)
    return rid


def _params(alg: str, layer: int, bs: int, mode: str, lam: float = 0.1) -> dict[str, Any]:
    p = {
        "algorithm": alg,
        "layers": f"[{layer}]",
        "layer": layer,
        "batch_size": bs,
        "mode": mode,
        "n_edits": 8,
        "model": "smollm2",
        "hparams": "smollm2-135m",
        "hp.layers": f"[{layer}]",
        "hp.mom2_update_weight": 15000,
    }
    if alg == "emmet":
        p["hp.emmet_lambda"] = lam
    return p


def _stage_metrics(at_edit: dict[str, float], final: dict[str, float] | None = None) -> dict[str, float]:
    m = {f"at_edit.{k}": v for k, v in at_edit.items()}
    m.update({f"final.{k}": v for k, v in (final or at_edit).items()})
    m.update({f"pre.{k}": 1.0 for k in at_edit})
    m.update({"pre.ppl": 20.0, "final.ppl": 21.5})
    m.update({f"time.{s}": 0.5 for s in ("load", "statistics", "keys", "values", "solve", "score")})
    m.update({"time.total": 4.0, "memory.cpu_rss_peak_mb": 900.0, "update_norm.mean": at_edit["es"] / 100})
    return m


def mlflow_store(tmp_path_factory: pytest.TempPathFactory, name: str) -> tuple[Path, str, Any, str]:
    """A fresh SQLite MLflow store in a temporary folder: (folder, URI, client, experiment id)."""
    from mlflow.tracking import MlflowClient

    tmp = tmp_path_factory.mktemp(name)
    uri = f"sqlite:///{tmp}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    return tmp, uri, client, client.create_experiment("model-editing")


@pytest.fixture(scope="module")
def sweep_store(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A store with sweep 'demo' (18 trials), an older 'demo' sweep and an 'other' sweep (one trial each)."""
    tmp, uri, client, exp = mlflow_store(tmp_path_factory, "mlflow")

    def parent(name: str, start: int) -> str:
        run = client.create_run(exp, start_time=start, tags={"sweep.name": name, "sweep.id": f"{name}-{start}"})
        client.set_tag(run.info.run_id, "sweep.role", "parent")
        return run.info.run_id

    old = parent("demo", 1_000)
    other = parent("other", 3_000)
    demo = parent("demo", 2_000)
    stray = [
        _log_trial(client, exp, old, "old", _params("memit", 1, 1, "batch"), _stage_metrics(_scores(1, 1, 1))),
        _log_trial(client, exp, other, "oth", _params("memit", 1, 1, "batch"), _stage_metrics(_scores(1, 1, 1))),
    ]
    ids = []
    for alg in ALGS:
        for layer in (1, 2, 3):
            m = _stage_metrics(_layer_scores(alg, layer))
            ids.append(_log_trial(client, exp, demo, f"{alg}-L{layer}", _params(alg, layer, 1, "batch"), m))
        for bs in (2, 4, 8):
            m = _stage_metrics(_batch_scores(alg, bs, 1.0))
            ids.append(_log_trial(client, exp, demo, f"{alg}-B{bs}", _params(alg, 1, bs, "batch"), m))
        for bs in (2, 4):
            at, fin = _scores(95, 85, 80 - bs), _scores(60 - bs, 50, 70)
            m = _stage_metrics(at, fin)
            m["curve.at_edit_s"] = [(step, 90 - step) for step in range(bs, 9, bs)]
            m["curve.update_norm"] = [(step, 0.1 * step) for step in range(bs, 9, bs)]
            ids.append(_log_trial(client, exp, demo, f"{alg}-S{bs}", _params(alg, 1, bs, "sequential-batch"), m))
    for bs in (4, 8):  # a second λ for EMMET: its own line in the batch figure
        m = _stage_metrics(_batch_scores("emmet", bs, 0.5))
        ids.append(_log_trial(client, exp, demo, f"emmet-B{bs}-lam", _params("emmet", 1, bs, "batch", 1.0), m))
    return {"uri": uri, "demo": demo, "ids": ids, "stray": stray, "tmp": tmp}


@pytest.fixture(scope="module")
def report(sweep_store: dict[str, Any]) -> tuple[dict[str, Path], Path, str]:
    """One run of the CLI (rendering figures is the slow part): its paths, folder and printed summary."""
    out = sweep_store["tmp"] / "report"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        paths = main(["--tracking-uri", sweep_store["uri"], "--sweep", "demo", "--out", str(out), "--quiet"])
    return paths, out, printed.getvalue()


def test_every_file_written(report: tuple[dict[str, Path], Path, str]) -> None:
    paths, out, _ = report
    assert set(EXPECTED) <= set(paths)
    for name in EXPECTED:
        f = out / name
        assert paths[name] == f and f.is_file() and f.stat().st_size > 0, name
        if name.endswith(".png"):
            assert f.read_bytes()[:8] == PNG, name
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temporary files left behind"
    # one dataset (runs without dataset.name are CounterFact's): one folder, no generated scores or probes
    assert not [p for p in out.iterdir() if p.is_dir()] and all("/" not in name for name in paths)
    assert not [p for p in out.iterdir() if p.name.startswith(("protocols", "probes", "fig_protocols", "fig_probes"))]
    assert set(pd.read_csv(out / "runs.csv")["dataset.name"]) == {"counterfact"}
    assert "- dataset: CounterFact (`counterfact`)" in (out / "report.md").read_text()


def test_runs_only_this_sweep(report: tuple[dict[str, Path], Path, str], sweep_store: dict[str, Any]) -> None:
    runs = pd.read_csv(report[1] / "runs.csv")
    assert sorted(runs["run_id"]) == sorted(sweep_store["ids"])
    assert not set(runs["run_id"]) & set(sweep_store["stray"])
    assert {"algorithm", "layer", "batch_size", "hp.emmet_lambda", "at_edit.s", "final.ppl", "time.total"} <= set(
        runs.columns
    )


def test_layer_search(report: tuple[dict[str, Path], Path, str]) -> None:
    table = pd.read_csv(report[1] / "layer_search.csv")
    assert len(table) == 6 and set(table["batch_size"]) == {1}
    for alg in ALGS:
        sub = table[table["method"] == alg].set_index("layer")
        assert sorted(sub.index) == [1, 2, 3]
        assert sub["at_edit.s"].idxmax() == BEST_LAYER[alg]
        for layer in (1, 2, 3):
            want = _layer_scores(alg, layer)
            for m in ("s", "es", "ps", "ns"):
                assert sub.loc[layer, f"at_edit.{m}"] == pytest.approx(want[m])
    assert "pre.ppl" in table.columns and "final.ppl" in table.columns
    md = (report[1] / "layer_search.md").read_text()
    assert md.startswith("| method | series |") and md.count("\n") == 8


def test_batch_values(report: tuple[dict[str, Path], Path, str]) -> None:
    table = pd.read_csv(report[1] / "batch.csv")
    memit = table[table["series"] == "memit"].set_index("batch_size")
    assert sorted(memit.index) == [1, 2, 4, 8]  # layer 1 only: layers 2 and 3 were one-off layer-search trials
    for bs in (2, 4, 8):
        want = _batch_scores("memit", bs, 1.0)
        for m in ("es", "ps", "ns", "s"):
            assert memit.loc[bs, f"at_edit.{m}"] == pytest.approx(want[m])
    lam = table[table["series"] == "emmet, hp.emmet_lambda=1"].set_index("batch_size")
    assert sorted(lam.index) == [4, 8]
    assert lam.loc[8, "at_edit.es"] == pytest.approx(_batch_scores("emmet", 8, 0.5)["es"])
    assert set(table["series"]) == {"memit", "emmet, hp.emmet_lambda=0.1", "emmet, hp.emmet_lambda=1"}


def test_sequential_and_timings(report: tuple[dict[str, Path], Path, str]) -> None:
    seq = pd.read_csv(report[1] / "sequential.csv").set_index(["method", "batch_size"])
    assert len(seq) == 4
    assert seq.loc[("memit", 4), "at_edit.ns"] == pytest.approx(76.0)
    assert seq.loc[("memit", 4), "final.es"] == pytest.approx(56.0)
    timings = pd.read_csv(report[1] / "timings.csv")
    assert len(timings) == 18 and timings["time.other"].tolist() == pytest.approx([1.0] * 18)
    curves = pd.read_csv(report[1] / "curves.csv")
    s2 = curves[(curves["key"] == "curve.at_edit_s") & (curves["batch_size"] == 2) & (curves["algorithm"] == "emmet")]
    assert list(s2["step"]) == [2, 4, 6, 8] and list(s2["value"]) == [88, 86, 84, 82]


def test_hparam_sweep(report: tuple[dict[str, Path], Path, str]) -> None:
    """EMMET's μ at B 4 and 8 (two values each) is a sweep; the one-off μ = 0.1 settings (layer search,
    B 2, sequential) and the constant λ are not."""
    paths, out, _ = report
    assert not [p for p in paths if "mom2_update_weight" in p]
    table = pd.read_csv(out / "hparam_emmet_lambda.csv")
    assert set(table["series"]) == {"emmet, batch_size=4", "emmet, batch_size=8"}
    assert sorted(table["hp.emmet_lambda"].unique()) == [0.1, 1.0] and set(table["n_trials"]) == {1}
    for bs in (4, 8):
        for lam, shrink in ((0.1, 1.0), (1.0, 0.5)):
            row = table[(table["batch_size"] == bs) & (table["hp.emmet_lambda"] == lam)].iloc[0]
            want = _batch_scores("emmet", bs, shrink)
            for m in ("es", "ps", "ns", "s"):
                assert row[f"at_edit.{m}"] == pytest.approx(want[m])
    assert "final.es" not in table.columns  # batch mode: at edit only
    assert table["update_norm.mean"].tolist() == pytest.approx((table["at_edit.es"] / 100).tolist())
    assert "![hparam_emmet_lambda](fig_hparam_emmet_lambda.png)" in (out / "report.md").read_text()


def test_stale_hparam_files_removed(sweep_store: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "r"
    out.mkdir()
    (out / "hparam_old_knob.csv").write_text("x\n")
    (out / "fig_hparam_old_knob.png").write_bytes(PNG)
    (out / "batch.csv").write_text("x\n")  # a fixed section's file from an earlier report
    main(["--tracking-uri", sweep_store["uri"], "--sweep", "other", "--out", str(out), "--quiet"])
    assert not list(out.glob("*hparam_*")) and (out / "runs.csv").is_file()
    # one trial at one layer and one batch size: neither a layer search nor a batch-size line
    assert not (out / "layer_search.csv").exists() and not (out / "batch.csv").exists()


def test_cli_prints_best_layers(report: tuple[dict[str, Path], Path, str]) -> None:
    assert f"report: {report[1]}" in report[2]
    for alg, layer in BEST_LAYER.items():
        assert f"best layer {alg}: layer {layer} " in report[2]


def test_find_sweep(sweep_store: dict[str, Any]) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=sweep_store["uri"])
    latest = find_sweep(client, "model-editing", "demo", None)  # the later of the two 'demo' parents
    assert latest.parent_run_id == sweep_store["demo"] and latest.sweep_id == "demo-2000"
    by_id = find_sweep(client, "ignored", None, sweep_store["demo"])
    assert by_id == latest


def test_unknown_sweep(sweep_store: dict[str, Any]) -> None:
    with pytest.raises(ReportError, match="no sweep 'nope'"):
        main(["--tracking-uri", sweep_store["uri"], "--sweep", "nope", "--out", str(sweep_store["tmp"] / "x")])
    with pytest.raises(ReportError, match="no MLflow store"):
        main(["--tracking-uri", f"sqlite:///{sweep_store['tmp']}/absent.db", "--sweep", "demo"])


def test_markdown_table() -> None:
    df = pd.DataFrame({"a": ["x|y", None], "b": [1.23456, float("nan")], "n": [1, 2]})
    assert markdown_table(df) == "| a | b | n |\n|:---|---:|---:|\n| x\\|y | 1.23 | 1 |\n|  |  | 2 |\n"
