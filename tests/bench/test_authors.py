"""bench/authors.py and bench/reference/patch_authors.py, the pure parts: anchor counting, the hparams mapping,
the per-record comparison and the table (neither the venv nor the authors' code is needed)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from bench import authors

ROOT = Path(__file__).resolve().parents[2]


def _patcher():
    path = ROOT / "bench" / "reference" / "patch_authors.py"
    spec = importlib.util.spec_from_file_location("patch_authors", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["patch_authors"] = mod
    spec.loader.exec_module(mod)
    return mod


pa = _patcher()


def test_patches_apply_in_order_with_counts():
    texts = {"a.py": 'x.to("cuda")\ny.to("cuda")\n', "b.py": "keep\n"}
    out = pa.apply_to_texts(texts, [("a.py", '.to("cuda")', '.to("cpu")', 2), ("b.py", "keep", "kept", 1)])
    assert out == {"a.py": 'x.to("cpu")\ny.to("cpu")\n', "b.py": "kept\n"}
    assert texts["a.py"].count("cuda") == 2  # the input is left alone


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        (("a.py", '.to("cuda")', '.to("cpu")', 1), "expected 1 occurrence"),
        (("a.py", "absent", "x", 1), "found 0"),
        (("c.py", "x", "y", 1), "file missing"),
    ],
)
def test_a_miscounted_or_missing_anchor_stops(patch, message):
    with pytest.raises(pa.PatchError, match=message):
        pa.apply_to_texts({"a.py": 'x.to("cuda")\ny.to("cuda")\n'}, [patch])


def test_a_later_patch_counts_on_the_text_the_earlier_ones_left():
    # after the first patch no "cuda" is left: a second CUDA patch of the same file must fail
    patches = [("a.py", "cuda", "cpu", 1), ("a.py", "cuda", "cpu", 1)]
    with pytest.raises(pa.PatchError):
        pa.apply_to_texts({"a.py": "cuda"}, patches)


def test_every_source_is_pinned_and_patches_its_early_stop():
    for name, src in pa.SOURCES.items():
        assert len(src.commit) == 40 and int(src.commit, 16) >= 0, name
        assert any(old == pa.EARLY_STOP_OLD for _, old, _, _ in src.patches), name
        assert all(count >= 1 for *_, count in src.patches), name


def test_hparams_mapping_field_by_field():
    hp = {
        "v_num_grad_steps": 10,
        "v_lr": 0.5,
        "v_loss_layer": None,
        "v_weight_decay": 1e-3,
        "clamp_norm_factor": 4.0,
        "kl_factor": 0.0625,
        "mom2_dtype": "float32",
        "mom2_update_weight": 1000.0,
        "add_prev_edits": True,
        "update_norm_lambda": 1.33,
        "mpes_hits": 2,
    }
    got = authors.authors_hparams("encore", hp)
    assert got["prob_cutoff"] == -2 and got["update_norm_lambda"] == 1.33 and "v_loss_layer" not in got
    assert authors.authors_hparams("encore", {**hp, "mpes_hits": 0})["prob_cutoff"] == 0


def _side(scores, norms, edit=10.0, values=8.0):
    per = [
        {"case_id": i, "at_edit": dict(zip(authors.METRICS, s)), "final": dict(zip(authors.METRICS, s))}
        for i, s in enumerate(scores)
    ]
    batches = [{"n": 1, "edit": edit, "values": values, "update_norm": x} for x in norms]
    return {"per_record": per, "batches": batches}


def test_compare_counts_records_and_relative_norms():
    ours = _side([(1.0, 0.5, 1.0), (1.0, 1.0, 0.0)], [2.0, 3.0])
    theirs = _side([(1.0, 0.5, 1.0), (0.0, 1.0, 0.5)], [2.0, 2.0])
    d = authors.compare(ours, theirs)
    assert d["records"] == 2
    assert d["at_edit"] == {"es": [1], "ps": [], "ns": [1]}
    assert d["norm_rel_max"] == pytest.approx(0.5)


def test_table_rows_and_a_method_that_did_not_run():
    ours = _side([(1.0, 1.0, 1.0)] * 2, [1.0, 1.0], edit=2.0, values=1.5)
    theirs = _side([(1.0, 1.0, 1.0)] * 2, [1.0, 1.0], edit=8.0, values=7.0)
    results = {
        "date": "2026-01-01",
        "n": 2,
        "batch": 1,
        "layer": 2,
        "steps": 10,
        "machine": {"cpu": "x86_64", "cores": 2, "threads": 2, "torch": "2", "transformers": "5"},
        "methods": {
            "alphaedit": {"ours": ours, "authors": theirs, "diff": authors.compare(ours, theirs), "source": "o/r"},
            "rlsedit": {"error": "RuntimeError: boom\nthe reason"},
        },
    }
    text = authors.fmt_table(results)
    row = next(line for line in text.splitlines() if line.startswith("| alphaedit"))
    assert "| 2.00 | 8.00 | **4.0x** | 1.500 ; 7.000 |" in row and "0/0/0 of 2" in row
    assert "not run: the reason" in next(line for line in text.splitlines() if line.startswith("| rlsedit"))
    assert "Machine: x86_64, 2 cores" in text


def test_merge_results_of_single_method_runs():
    head = {"date": "d", "n": 4, "batch": 2, "layer": 2, "steps": 2, "machine": {"cpu": "x"}}
    a = {**head, "methods": {"alphaedit": {"error": "x"}}}
    b = {**head, "machine": {"cpu": "x", "authors_transformers": "4.46.3"}, "methods": {"sphere": {"error": "y"}}}
    merged = authors.merge_results([a, b])
    assert list(merged["methods"]) == ["alphaedit", "sphere"]
    assert merged["machine"]["authors_transformers"] == "4.46.3"
    with pytest.raises(SystemExit):
        authors.merge_results([a, {**b, "steps": 10}])
