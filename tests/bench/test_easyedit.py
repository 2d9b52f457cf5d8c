"""bench/easyedit.py and bench/reference/{patch,run}_easyedit.py, the pure parts: patch anchors, the hparams
mapping, the requests handed to EasyEdit's driver, compiling a method from source, and the table. Needs
neither EasyEdit nor its venv (one test reads the pinned commit from a local clone when there is one)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from bench import easyedit as ee
from tests.bench.reference_code import fake_tree, load

ROOT = Path(__file__).resolve().parents[2]


patch = load("patch_easyedit")
runner = load("run_easyedit")

OURS_HP = {
    "v_num_grad_steps": 10,
    "v_lr": 0.5,
    "v_loss_layer": None,
    "v_weight_decay": 1e-3,
    "clamp_norm_factor": 4.0,
    "kl_factor": 0.0625,
    "mom2_dtype": "float32",
    "mom2_update_weight": 1000.0,
    "add_prev_edits": False,
    "update_norm_lambda": 0.0,
    "nullspace_threshold": 2e-2,
    "L2": 10.0,
    "beta_hse": 0.0,
    "nas": False,
    "rect_keep": None,
    "prune_base": None,
}


def test_the_source_is_pinned_and_every_patched_file_is_extracted():
    assert len(patch.COMMIT) == 40 and int(patch.COMMIT, 16) >= 0
    for rel, *_ in patch.PATCHES:
        assert any(rel == p or rel.startswith(p + "/") for p in patch.PATHS), rel
    assert set(patch.KEPT_MODELS) <= set(patch.UPSTREAM_MODELS)
    assert sum(old == patch.EARLY_STOP_OLD for _, old, _, _ in patch.PATCHES) == 2


def test_patches_apply_to_a_tree_and_only_once(tmp_path):
    root = fake_tree(tmp_path, patch.PATCHES, "\n")
    assert patch.patch_tree(patch.SOURCE, root) == len(patch.PATCHES)
    models = (root / "easyeditor/models/__init__.py").read_text()
    assert "from .memit import *" in models and "from .peft" not in models and "from .ft import" not in models
    assert (root / patch.MARKER).is_file()
    with pytest.raises(patch.PatchError):  # the anchors are gone: a second pass must not silently succeed
        patch.patch_tree(patch.SOURCE, root)


def test_find_mirror_order(tmp_path, monkeypatch):
    bare = tmp_path / "bare.git"
    (bare / "objects").mkdir(parents=True)
    assert patch.find_mirror(str(bare)) == bare
    monkeypatch.setenv("EASYEDIT_MIRROR", str(bare))
    assert patch.find_mirror(None) == bare
    with pytest.raises(SystemExit, match="no git clone"):
        patch.find_mirror(str(tmp_path / "absent"))


def test_patch_anchors_match_the_pinned_commit():
    mirror = Path(os.environ.get("EASYEDIT_MIRROR") or patch.DEFAULT_MIRROR)
    if not mirror.exists():
        pytest.skip("no local clone of zjunlp/EasyEdit")
    texts = {}
    for rel in dict.fromkeys(p[0] for p in patch.PATCHES):
        proc = subprocess.run(
            ["git", "--git-dir", str(mirror), "show", f"{patch.COMMIT}:{rel}"], capture_output=True, text=True
        )
        if proc.returncode != 0:
            pytest.skip(f"commit {patch.COMMIT[:7]} not in {mirror}")
        texts[rel] = proc.stdout
    patched = patch.check(texts)
    assert all(patched[rel] != texts[rel] for rel in texts)


def test_hparams_mapping_field_by_field():
    memit = ee.easyedit_hparams("memit", OURS_HP)
    assert memit == {
        "v_num_grad_steps": 10,
        "v_lr": 0.5,
        "v_weight_decay": 1e-3,
        "clamp_norm_factor": 4.0,
        "kl_factor": 0.0625,
        "mom2_dtype": "float32",
        "mom2_update_weight": 1000.0,
    }  # v_loss_layer None: the runner's last block
    alpha = ee.easyedit_hparams("alphaedit", {**OURS_HP, "v_loss_layer": 29})
    assert alpha["L2"] == 10.0 and alpha["nullspace_threshold"] == 2e-2 and alpha["v_loss_layer"] == 29
    assert "mom2_update_weight" not in alpha  # AlphaEdit's solve has no λ (EasyEdit's field is unused)


@pytest.mark.parametrize(
    ("algorithm", "key", "value"),
    [("memit", "add_prev_edits", True), ("memit", "update_norm_lambda", 1.0), ("alphaedit", "beta_hse", 0.5)],
)
def test_settings_easyedit_lacks_are_refused(algorithm, key, value):
    with pytest.raises(ValueError, match=key):
        ee.easyedit_hparams(algorithm, {**OURS_HP, key: value})


def test_requests_are_easyedit_style():
    rec = {
        "requested_rewrite": {
            "prompt": "{} is a citizen of",
            "subject": "Danielle Darrieux",
            "target_new": {"str": "English"},
            "target_true": {"str": "French"},
        }
    }
    got = runner.ee_requests([rec])
    assert got == {
        "prompts": ["Danielle Darrieux is a citizen of"],
        "target_new": ["English"],
        "ground_truth": ["French"],
        "subject": ["Danielle Darrieux"],
    }


def test_a_method_is_compiled_alone_from_source(tmp_path):
    src = tmp_path / "m.py"
    src.write_text(
        "import not_installed_anywhere\n\n"
        "def top(x):\n    return x + 1\n\n"
        "class Editor:\n    def run(self, x):\n        return plus_two(x) * self.k\n"
    )
    ra = load("run_authors")
    ns = {"plus_two": lambda x: x + 2}
    run = ra.function_from_source(src, "Editor.run", ns)
    assert run(type("S", (), {"k": 3})(), 1) == 9
    assert ra.function_from_source(src, "top", {})(1) == 2
    with pytest.raises(SystemExit):
        ra.function_from_source(src, "Editor.absent", {})


def test_timed_adds_wall_time():
    totals = {"k": 0.0}
    f = load("run_authors").timed(lambda x: x * 2, totals, "k")  # both runners' timer
    assert f(3) == 6 and totals["k"] >= 0.0


def _side(scores, norms, edit=4.0, keys=0.5, values=3.0):
    per = [
        {"case_id": i, "at_edit": dict(zip(ee.METRICS, s)), "final": dict(zip(ee.METRICS, s))}
        for i, s in enumerate(scores)
    ]
    batches = [
        {"n": 1, "edit": edit, "keys": keys, "values": values, "solve": edit - keys - values, "update_norm": x}
        for x in norms
    ]
    return {"per_record": per, "batches": batches}


def test_table_rows_and_a_method_that_did_not_run():
    ours = _side([(1.0, 0.5, 1.0)] * 2, [1.0, 2.0], edit=1.0, keys=0.1, values=0.8)
    theirs = _side([(1.0, 0.5, 1.0)] * 2, [1.0, 2.0], edit=3.0, keys=0.5, values=2.4)
    results = {
        "date": "2026-01-01",
        "n": 2,
        "batch": 1,
        "layer": 2,
        "steps": 10,
        "machine": {"cpu": "x86_64", "cores": 2, "threads": 1, "torch": "2", "transformers": "5", "load": 1.0},
        "methods": {
            "memit": {"ours": ours, "easyedit": theirs, "diff": ee.compare(ours, theirs), "source": "z/E @ 1"},
            "alphaedit": {"error": "RuntimeError: boom\nthe reason"},
        },
    }
    text = ee.fmt_table(results)
    row = next(line for line in text.splitlines() if line.startswith("| memit"))
    assert "| 1.00 | 3.00 | **3.0x** | 0.100 / 0.800 / 0.100 ; 0.500 / 2.400 / 0.100 |" in row
    assert "0/0/0 of 2" in row and "1 / 1, 2 / 2" in row and "100 / 50 / 100 | 100 / 50 / 100 |" in row
    assert "not run: the reason" in next(line for line in text.splitlines() if line.startswith("| alphaedit"))
    assert "1 torch thread per side" in text and "`python -m bench.easyedit`" in text


def test_results_md_has_the_section_markers():
    text = (ROOT / "bench" / "RESULTS.md").read_text()
    assert text.count(ee.BEGIN) == 1 and text.count(ee.END) == 1 and text.index(ee.BEGIN) < text.index(ee.END)
