"""bench/run.py's bookkeeping (no timing here): the record conversion, the metric diff and the table."""

from __future__ import annotations

import json

import pytest

from bench import run
from sweep.evals.data import load_counterfact, parse_records, select

pytestmark = pytest.mark.skipif(not run.FACTS.exists(), reason="needs ../shared/data/counterfact")


def test_rome_records_round_trip_through_our_parser(tmp_path, monkeypatch):
    monkeypatch.setattr(run, "OUT", tmp_path)
    path = run.rome_records(5)
    raw = json.loads(path.read_text())
    assert {"requested_rewrite", "paraphrase_prompts", "neighborhood_prompts"} <= set(raw[0])
    assert "{}" in raw[0]["requested_rewrite"]["prompt"]
    back = parse_records(raw)
    want = select(load_counterfact(str(run.FACTS)), n=5)
    for a, b in zip(back, want):
        assert (a.case_id, a.prompt, a.subject, a.target_new, a.target_true) == (
            b.case_id,
            b.prompt,
            b.subject,
            b.target_new,
            b.target_true,
        )
        assert a.paraphrase_prompts == b.paraphrase_prompts and a.neighborhood_prompts == b.neighborhood_prompts


def side(per_record, timings, peak=1000.0):
    metrics = {m: 100 * sum(r[m] for r in per_record) / len(per_record) for m in ("es", "ps", "ns")}
    return {
        "per_record": per_record,
        "metrics": metrics,
        "timings": timings,
        "n_edits": len(per_record),
        "peak_rss_mb": peak,
    }


def test_compare_and_table_by_hand():
    ours = side(
        [{"case_id": 1, "es": 1.0, "ps": 0.5, "ns": 1.0}, {"case_id": 2, "es": 1.0, "ps": 1.0, "ns": 0.0}],
        {"keys": 0.2, "values": 4.0, "solve": 0.2, "score": 1.0},
    )
    ref = side(
        [{"case_id": 1, "es": 1.0, "ps": 0.0, "ns": 1.0}, {"case_id": 2, "es": 0.0, "ps": 1.0, "ns": 0.0}],
        {"keys": 1.0, "values": 16.0, "solve": 1.0, "score": 4.0},
        peak=2000.0,
    )
    d = run.compare(ours, ref)
    assert d["es"] == {"mean_pp": 50.0, "records_differing": 1, "records": 2}  # (0 + 100) / 2
    assert d["ps"]["mean_pp"] == 25.0 and d["ns"]["records_differing"] == 0
    results = {
        "date": "2026-01-01",
        "steps": 10,
        "layer": 2,
        "machine": {"cpu": "x", "cores": 2, "threads": 2, "torch": "t", "transformers": "v"},
        "configs": {"memit-2": {"ours": ours, "reference": ref, "diff": d}},
    }
    table = run.fmt_table(results)
    row = next(line for line in table.splitlines() if line.startswith("| memit-2"))
    # per edit: ours (0.2 + 4 + 0.2) / 2 = 2.2, reference 18 / 2 = 9: ratio 9 / 2.2 = 4.1; scoring 4 / 1 = 4.0
    assert "2.20 / 9.00" in row and "**4.1x**" in row and "4.0x" in row and "1000 / 2000" in row
    with pytest.raises(ValueError, match="not a fraction"):
        run.fraction(50.0)


def test_stats_table_by_hand_and_its_own_markers(tmp_path, monkeypatch):
    results = {
        "date": "2026-01-01",
        "layer": 2,
        "machine": {"cpu": "x", "cores": 2, "threads": 2, "torch": "t", "transformers": "v"},
        "stats": {
            "ours": {
                "one": {"tokens": 8192, "tokens_per_s": 5000.0},
                "all": {"layers": 30, "seconds": 20.0},
                "peak_rss_mb": 1500.0,
            },
            "reference": {"one": {"tokens_per_s": 2500.0}, "all_seconds": 400.0, "all_note": "n", "peak_rss_mb": 900.0},
        },
    }
    table = run.fmt_stats(results)
    assert "| layer 2 alone, tokens/s | 5000 | 2500 | **2.0x** |" in table
    assert "**20.0x**" in table and "| peak RSS MB | 1500 | 900 | |" in table
    monkeypatch.setattr(run, "RESULTS", tmp_path / "RESULTS.md")
    body = f"intro\n{run.BEGIN}\nedits\n{run.END}\nmid\n{run.STATS_BEGIN}\nold\n{run.STATS_END}\nend\n"
    run.RESULTS.write_text(body)
    run.write_results(table, run.STATS_BEGIN, run.STATS_END)  # --stats-only: the edit tables stay
    text = run.RESULTS.read_text()
    assert f"{run.BEGIN}\nedits\n{run.END}\nmid\n" in text and "old" not in text and "**2.0x**" in text
    assert text.endswith(f"{run.STATS_END}\nend\n")


def test_gpu_check_runs_in_tiny_mode(tmp_path):
    """bench/gpu.sh's script on a tiny model on the CPU, so that it cannot rot between GPU sessions."""
    from bench import gpu

    out = tmp_path / "gpu.json"
    assert gpu.main(["--tiny", "--device", "cpu", "--no-tests", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    for part in ("stats_one_layer", "stats_all_layers", "values", "scoring"):
        assert res[part]["seconds"] > 0, part
    assert res["stats_one_layer"]["tokens_per_s"] > 0
    assert res["stats_all_layers"]["passes"][0]["layers"] == [0, 3]
    assert {"memit", "emmet", "alphaedit", "rlsedit_step", "sphere_projection", "ultraedit_b100"} <= set(res["solves"])
    assert res["values"]["s_per_edit"] > 0 and res["per_edit"]["alphaedit_s"] > res["values"]["s_per_edit"]
    assert gpu.main(["--device", "cpu", "--out", str(tmp_path / "x.json")]) == 2  # full size needs CUDA
