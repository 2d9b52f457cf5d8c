"""``python -m sweep.report`` on a sweep over two datasets with generated (WILD) scores and capability probes:
per-dataset subfolders, the protocols and probes sections, and the stale-layout clean-up."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from sweep.report import main
from sweep.report.probes import probes_figure, probes_table
from sweep.report.protocols import drop_col, protocols_figure, protocols_table, rank_col, ranking_sentence, value_col
from sweep.report.runs import trials_frame
from sweep.report.schema import CHANCE, chance, probe_parts
from tests.sweep.report.test_report import PNG, _log_trial

DATASETS = ("counterfact", "zsre")
METHODS = ("memit", "emmet")
#: final S teacher-forced and generated: on CounterFact memit leads teacher-forced but emmet generated
FINAL_S = {
    ("counterfact", "memit"): (80.0, 30.0),
    ("counterfact", "emmet"): (70.0, 40.0),
    ("zsre", "memit"): (60.0, 20.0),
    ("zsre", "emmet"): (50.0, 10.0),
}
#: sst2 F1 at 0 (pre), 4 (a probe point) and 8 edits (the last batch: the final model's probes)
SST2 = {"memit": (55.0, 52.0, 49.0), "emmet": (56.0, 54.0, 53.0)}


def _final(ds: str, alg: str) -> dict[str, float]:
    """Planted final scores: ES/PS/NS around S, the generated ones 10-20 points lower."""
    s, gen_s = FINAL_S[(ds, alg)]
    out = {"es": s + 10, "ps": s - 5, "ns": s + 2, "s": s}
    out.update({"gen_es": gen_s + 20, "gen_ps": gen_s - 3, "gen_ns": gen_s + 1, "gen_s": gen_s})
    return out


def _metrics(ds: str, alg: str) -> dict[str, Any]:
    fin = _final(ds, alg)
    m: dict[str, Any] = {f"final.{k}": v for k, v in fin.items()}
    m.update({f"at_edit.{k}": v + 1 for k, v in fin.items()})
    m.update({"pre.es": 1.0, "pre.ps": 2.0, "pre.ns": 90.0, "pre.s": 2.5, "pre.ppl": 20.0, "final.ppl": 24.0})
    pre, mid, last = SST2[alg]
    m.update({"pre.probe_sst2_f1": pre, "final.probe_sst2_f1": last, "pre.probe_sst2_acc": 50.0})
    m.update({"final.probe_sst2_acc": 48.0, "pre.probe_mmlu_acc": 30.0, "final.probe_mmlu_acc": 27.0})
    m.update({"pre.probe_seconds": 3.0, "final.probe_seconds": 3.0})  # the probes' time: not a probe score
    m["curve.probe_sst2_f1"] = [(4, mid), (8, last)]
    m["curve.probe_sst2_acc"] = [(4, 49.0), (8, 48.0)]
    m["curve.probe_mmlu_acc"] = [(4, 28.0), (8, 27.0)]
    m["curve.probe_seconds"] = [(4, 3.0), (8, 3.0)]
    m["curve.at_edit_s"] = [(4, fin["s"] + 5), (8, fin["s"] + 1)]
    m["curve.at_edit_gen_s"] = [(4, fin["gen_s"] + 5), (8, fin["gen_s"] + 1)]
    m["curve.batch_gen_es"] = [(4, 70.0), (8, 60.0)]
    m["curve.health_ppl"] = [(4, 22.0), (8, 24.0)]
    return m


def _params(ds: str, alg: str) -> dict[str, Any]:
    return {
        "algorithm": alg,
        "layers": "[1]",
        "layer": 1,
        "batch_size": 4,
        "mode": "sequential-batch",
        "n_edits": 8,
        "model": "smollm2",
        "hparams": "smollm2-135m",
        "dataset.name": ds,
        "dataset.target": "answers",
        "scoring.generated": True,
        "scoring.gen_context": "bare",
        "scoring.probes": "sst2,mmlu",
    }


@pytest.fixture(scope="module")
def multi(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A store with sweep 'multi' (2 datasets x 2 methods, and a FAILED QAEdit trial), sweep 'zsre-only'
    (the ZsRE trials again), sweep 'single' (one CounterFact trial without the new params), and the report
    of 'multi'."""
    from mlflow.tracking import MlflowClient

    tmp = tmp_path_factory.mktemp("mlflow_multi")
    uri = f"sqlite:///{tmp}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("model-editing")
    parents = {}
    for name, start in (("multi", 1_000), ("single", 2_000), ("zsre-only", 3_000)):
        run = client.create_run(exp, start_time=start, tags={"sweep.name": name, "sweep.role": "parent"})
        parents[name] = run.info.run_id
    ids = {}
    for ds in DATASETS:
        for alg in METHODS:
            ids[(ds, alg)] = _log_trial(
                client, exp, parents["multi"], f"{ds}-{alg}", _params(ds, alg), _metrics(ds, alg)
            )
    failed = _log_trial(client, exp, parents["multi"], "qaedit-memit", _params("qaedit", "memit"), {})
    client.set_terminated(failed, "FAILED")
    for alg in METHODS:
        _log_trial(client, exp, parents["zsre-only"], f"z-{alg}", _params("zsre", alg), _metrics("zsre", alg))
    legacy = {k: v for k, v in _params("counterfact", "memit").items() if not k.startswith(("dataset.", "scoring."))}
    _log_trial(client, exp, parents["single"], "one", legacy, {"final.es": 90.0, "at_edit.es": 91.0})
    out = tmp / "report"
    paths = main(["--tracking-uri", uri, "--sweep", "multi", "--out", str(out), "--quiet"])
    trials = trials_frame(client.search_runs([exp], f"tags.mlflow.parentRunId = '{parents['multi']}'"))
    trials = trials[trials["status"] == "FINISHED"]
    return {"uri": uri, "out": out, "paths": paths, "ids": ids, "tmp": tmp, "trials": trials, "failed": failed}


def test_dataset_folders_and_links(multi: dict[str, Any]) -> None:
    out, paths = multi["out"], multi["paths"]
    for ds in DATASETS:
        for name in ("runs.csv", "report.md", "sequential.csv", "fig_sequential.png", "curves.csv"):
            assert (out / ds / name).is_file() and paths[f"{ds}/{name}"] == out / ds / name, (ds, name)
        runs = pd.read_csv(out / ds / "runs.csv")
        assert sorted(runs["run_id"]) == sorted(multi["ids"][(ds, a)] for a in METHODS)
        seq = pd.read_csv(out / ds / "sequential.csv").set_index("method")
        for alg in METHODS:  # each dataset's numbers only
            assert seq.loc[alg, "final.s"] == pytest.approx(FINAL_S[(ds, alg)][0])
        assert not (out / ds / "protocols.csv").exists()  # the cross-dataset sections live at the top
    top = (out / "report.md").read_text()
    assert "[CounterFact](counterfact/report.md)" in top and "[ZsRE](zsre/report.md)" in top
    assert "![protocols](fig_protocols.png)" in top and "![probes](fig_probes.png)" in top
    for name in ("runs.csv", "protocols.csv", "protocols.md", "fig_protocols.png", "probes.csv", "fig_probes.png"):
        assert paths[name] == out / name and (out / name).stat().st_size > 0, name
    assert (out / "fig_probes.png").read_bytes()[:8] == PNG and (out / "fig_protocols.png").read_bytes()[:8] == PNG
    assert not (out / "sequential.csv").exists() and not (out / "curves.csv").exists()
    assert sorted(pd.read_csv(out / "runs.csv")["dataset.name"]) == ["counterfact"] * 2 + ["qaedit"] + ["zsre"] * 2
    # a dataset whose trials all failed: its runs and a report without sections
    assert sorted(p.name for p in (out / "qaedit").iterdir()) == ["report.md", "runs.csv"]
    assert list(pd.read_csv(out / "qaedit" / "runs.csv")["status"]) == ["FAILED"]
    assert "[QAEdit](qaedit/report.md): 1 trials" in top


def test_labels_per_dataset(multi: dict[str, Any]) -> None:
    zsre = (multi["out"] / "zsre" / "report.md").read_text()
    cf = (multi["out"] / "counterfact" / "report.md").read_text()
    assert zsre.startswith("# Sweep multi: ZsRE") and cf.startswith("# Sweep multi: CounterFact")
    assert "| es | ZsRE efficacy (token acc.) | teacher-forced |" in zsre
    assert "| gen_es | ES generated (WILD) | generated (WILD) |" in zsre
    assert "| es | ES (efficacy) | teacher-forced |" in cf and "ZsRE" not in cf


def test_curves_read_gen_and_probe_keys(multi: dict[str, Any]) -> None:
    curves = pd.read_csv(multi["out"] / "zsre" / "curves.csv")
    keys = set(curves["key"])
    assert {"curve.at_edit_gen_s", "curve.batch_gen_es", "curve.probe_sst2_f1", "curve.probe_mmlu_acc"} <= keys
    assert "curve.probe_seconds" not in keys
    assert set(curves["run_id"]) == {multi["ids"][("zsre", a)] for a in METHODS}
    gen = curves[(curves["key"] == "curve.at_edit_gen_s") & (curves["method"] == "emmet")]
    assert list(gen["step"]) == [4, 8] and list(gen["value"]) == [15.0, 11.0]


def test_protocols_values(multi: dict[str, Any]) -> None:
    table = pd.read_csv(multi["out"] / "protocols.csv")
    assert len(table) == 4 and list(table["dataset"]) == ["counterfact"] * 2 + ["zsre"] * 2
    for ds, alg in FINAL_S:
        row = table[(table["dataset"] == ds) & (table["method"] == alg)].iloc[0]
        want = _final(ds, alg)
        for m in ("es", "ps", "ns", "s"):
            assert row[value_col(m, "teacher_forced")] == pytest.approx(want[m])
            assert row[value_col(m, "generated")] == pytest.approx(want[f"gen_{m}"])
            assert row[drop_col(m)] == pytest.approx(want[m] - want[f"gen_{m}"])
        assert row[rank_col("s", "teacher_forced")] == (1 if alg == "memit" else 2)
    cf = table[table["dataset"] == "counterfact"].set_index("method")
    assert cf.loc["emmet", rank_col("s", "generated")] == 1 and cf.loc["memit", rank_col("s", "generated")] == 2
    assert value_col("s", "teacher_forced") == "S teacher-forced"
    assert value_col("s", "generated") == "S generated (WILD)"


def test_protocols_ranking_in_words(multi: dict[str, Any]) -> None:
    md = (multi["out"] / "protocols.md").read_text()
    assert (
        "CounterFact: the ranking of methods by S changes between the protocols: teacher-forced memit > emmet, "
        "generated (WILD) emmet > memit (memit and emmet swap places)." in md
    )
    assert "ZsRE: the ranking of methods by S is the same under both protocols (memit > emmet)." in md
    assert "ES = ZsRE efficacy (token acc.) vs ES generated (WILD)" in md
    top = (multi["out"] / "report.md").read_text()
    assert "> CounterFact: the ranking of methods by S changes" in top


def test_ranking_sentence_ties_and_three_methods() -> None:
    sub = pd.DataFrame(
        {
            "dataset": ["zsre"] * 3,
            "series": ["a", "b", "c"],
            value_col("s", "teacher_forced"): [90.0, 80.0, 80.0],
            value_col("s", "generated"): [10.0, 30.0, 20.0],
        }
    )
    text = ranking_sentence(sub, "s")
    assert "teacher-forced a > b = c, generated (WILD) b > c > a" in text
    assert "(a and b swap places; a and c swap places)" in text  # b = c teacher-forced: a tie is no swap
    same = sub.assign(**{value_col("s", "generated"): [30.0, 20.0, 20.0]})
    want = "ZsRE: the ranking of methods by S is the same under both protocols (a > b = c)."
    assert ranking_sentence(same, "s") == want


def test_protocols_figure_one_panel_per_dataset(multi: dict[str, Any]) -> None:
    table = protocols_table(multi["trials"])
    assert table is not None
    fig = protocols_figure(table)
    titles = [ax.get_title() for ax in fig.axes]
    assert len(titles) == 2 and titles[0].startswith("CounterFact") and titles[1].startswith("ZsRE")
    heights = [round(p.get_height(), 6) for p in fig.axes[0].patches]
    assert heights == [80.0, 70.0, 30.0, 40.0]  # memit and emmet teacher-forced, then generated


def test_probes_table_in_edit_order(multi: dict[str, Any]) -> None:
    table = pd.read_csv(multi["out"] / "probes.csv")
    assert "seconds" not in set(table["task"]) and set(table["task"]) == {"sst2", "mmlu"}
    for ds in DATASETS:
        for alg in METHODS:
            d = table[(table["dataset"] == ds) & (table["method"] == alg)]
            f1 = d[(d["task"] == "sst2") & (d["metric"] == "f1")]
            assert list(f1["point"]) == ["pre", "curve", "final"]  # the last point (8 edits) once, as final
            assert list(f1["edits"]) == [0, 4, 8] and list(f1["value"]) == list(SST2[alg])
            mmlu = d[d["task"] == "mmlu"]
            assert list(mmlu["edits"]) == [0, 4, 8] and list(mmlu["value"]) == [30.0, 28.0, 27.0]
    md = (multi["out"] / "probes.md").read_text()
    assert "sst2 f1 50, mmlu acc 25" in md and "| 0: 55.0, 4: 52.0, 8: 49.0 |" in md


def test_probes_figure_chance_and_ppl(multi: dict[str, Any]) -> None:
    from sweep.report.probes import _ppl_lines

    curves = pd.read_csv(multi["out"] / "zsre" / "curves.csv")
    trials = multi["trials"][multi["trials"]["dataset.name"] == "zsre"]
    table = probes_table(trials, curves)
    ppl = _ppl_lines(trials, curves, list(table["run_id"].unique()))
    assert sorted(ppl.groupby("run_id")["step"].apply(list).tolist()) == [[0, 4, 8]] * 2  # pre.ppl at 0
    fig = probes_figure(table, ppl)
    assert [ax.get_title() for ax in fig.axes] == [
        "sst2 weighted F1 (generated)",
        "mmlu accuracy (generated)",
        "held-out perplexity",
    ]
    for ax, level in zip(fig.axes, (50.0, 25.0)):
        chance_lines = [ln for ln in ax.get_lines() if ln.get_label() == "chance"]
        assert len(chance_lines) == 1 and list(chance_lines[0].get_ydata()) == [level, level]
        assert chance_lines[0].get_linestyle() == "--"
    assert not [ln for ln in fig.axes[2].get_lines() if ln.get_label() == "chance"]


def test_chance_table() -> None:
    assert chance("sst2", "f1") == 50.0 and chance("rte", "lik_acc") == 50.0 and chance("cola", "mcc") == 0.0
    assert chance("mmlu", "acc") == 25.0 and chance("mmlu", "f1") == 25.0 and chance("sst2", "invalid") is None
    assert probe_parts("final.probe_sentiment_analysis_lik_f1") == ("sentiment_analysis", "lik_f1")
    assert all(0.0 <= v <= 50.0 for v in CHANCE.values())


def test_layout_switches_remove_stale(multi: dict[str, Any]) -> None:
    """A one-dataset report into the folder of a two-dataset one removes the subfolders and the top-level
    cross-dataset files; a legacy run (no dataset.name) is CounterFact's."""
    out: Path = multi["tmp"] / "switch"
    main(["--tracking-uri", multi["uri"], "--sweep", "multi", "--out", str(out), "--quiet"])
    assert (out / "zsre" / "report.md").is_file()
    (out / "zsre" / "notes.txt").write_text("mine\n")  # not a report file: kept, and its folder with it
    paths = main(["--tracking-uri", multi["uri"], "--sweep", "single", "--out", str(out), "--quiet"])
    assert not (out / "counterfact").exists() and (out / "zsre" / "notes.txt").is_file()
    assert sorted(p.name for p in (out / "zsre").iterdir()) == ["notes.txt"]
    assert not (out / "protocols.csv").exists() and not (out / "probes.csv").exists()
    assert all("/" not in name for name in paths)
    runs = pd.read_csv(out / "runs.csv")
    assert list(runs["dataset.name"]) == ["counterfact"]
    assert "- dataset: CounterFact (`counterfact`)" in (out / "report.md").read_text()


def test_one_dataset_with_protocols_and_probes(multi: dict[str, Any]) -> None:
    """A sweep over ZsRE alone keeps the one-folder layout, with the protocols and probes sections in it."""
    out: Path = multi["tmp"] / "zsre_only"
    paths = main(["--tracking-uri", multi["uri"], "--sweep", "zsre-only", "--out", str(out), "--quiet"])
    assert not [p for p in out.iterdir() if p.is_dir()] and all("/" not in name for name in paths)
    for name in ("runs.csv", "sequential.csv", "curves.csv", "protocols.csv", "fig_protocols.png", "probes.csv"):
        assert (out / name).is_file(), name
    report = (out / "report.md").read_text()
    assert report.startswith("# Sweep zsre-only: ZsRE") and "| s | ZsRE score | teacher-forced |" in report
    assert "> ZsRE: the ranking of methods by S is the same under both protocols (memit > emmet)." in report
    assert set(pd.read_csv(out / "protocols.csv")["dataset"]) == {"zsre"}
