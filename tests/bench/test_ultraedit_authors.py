"""bench/ultraedit_authors.py, bench/reference/{patch,run}_ultraedit.py, the pure parts: patch anchors, the
authors' tuples and sub-batch order, the metric replica, the table and the RESULTS.md section. Needs neither
the authors' code nor its venv (one test reads the pinned commit from a local mirror when there is one)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from bench import ultraedit_authors as ua
from tests.bench.reference_code import fake_tree, load

ROOT = Path(__file__).resolve().parents[2]


patch = load("patch_ultraedit")
runner = load("run_ultraedit")


def test_patch_applies_once_and_is_idempotent(tmp_path):
    root = fake_tree(tmp_path, patch.PATCHES)
    assert patch.apply(root) == len(patch.PATCHES)
    base = (root / "editor" / "base.py").read_text()
    assert "except ImportError:" in base and "LlamaTokenizerFast" in base
    assert (root / patch.MARKER).is_file()
    assert patch.apply(root) == 0  # marker: left alone
    assert (root / "editor" / "base.py").read_text() == base


@pytest.mark.parametrize("mutate", ["missing", "doubled"])
def test_patch_refuses_changed_anchors_and_writes_nothing(tmp_path, mutate):
    root = fake_tree(tmp_path, patch.PATCHES)
    f = root / "editor" / "ultraedit.py"
    before_base = (root / "editor" / "base.py").read_text()
    f.write_text(f.read_text().replace("import wandb\n", "" if mutate == "missing" else "import wandb\nimport wandb\n"))
    with pytest.raises(SystemExit, match=r"editor/ultraedit\.py"):
        patch.apply(root)
    assert (root / "editor" / "base.py").read_text() == before_base
    assert not (root / patch.MARKER).exists()


def test_patched_wandb_stub_imports_without_wandb():
    ns: dict = {}
    exec(patch.WANDB_NEW.replace("import wandb", "import wandb_not_installed_here as wandb"), ns)
    assert ns["wandb"].log({"ES": 1.0}) is None


def test_patch_anchors_match_the_pinned_commit(tmp_path):
    mirrors = [m for m in ua.MIRRORS if m.exists()]
    if not mirrors:
        pytest.skip("no local clone of XiaojieGu/UltraEdit")
    texts = {}
    for rel in dict.fromkeys(p[0] for p in patch.PATCHES):
        proc = subprocess.run(
            ["git", "--git-dir", str(mirrors[0]), "show", f"{ua.COMMIT}:{rel}"], capture_output=True, text=True
        )
        if proc.returncode != 0:
            pytest.skip(f"commit {ua.COMMIT[:7]} not in {mirrors[0]}")
        texts[rel] = proc.stdout
    patched = patch.check(texts)
    assert all(patched[rel] != texts[rel] for rel in texts)


def test_tok_tuple_is_the_authors_layout():
    t = runner.tok_tuple([5, 6, 7], [8, 9])
    assert t["input_ids"] == [5, 6, 7, 8]  # the last answer token is not fed
    assert t["attention_mask"] == [1, 1, 1, 1]
    assert t["labels"] == [-100, -100, 8, 9]  # pre-shifted: label i is the target of position i
    with pytest.raises(ValueError):
        runner.tok_tuple([], [1])


def test_turn_order_longest_first_and_stable():
    assert runner.turn_order([3, 5, 3, 7, 5]) == [3, 1, 4, 0, 2]
    assert runner.sub_batches([3, 1, 4, 0, 2], 2) == [[3, 1], [4, 0], [2]]


def test_plan_sorts_each_key_per_turn():
    def item(e, q, u):
        return {k: {"input_ids": [0] * n} for k, n in zip(runner.KEYS, (e, q, u))}

    enc = [item(1, 4, 2), item(3, 1, 2), item(2, 2, 9), item(5, 3, 1)]
    p = runner.plan(enc, n_edits=2, sub=1)
    assert p["edit"] == [[[1], [0]], [[3], [2]]]
    assert p["equiv"] == [[[0], [1]], [[3], [2]]]
    assert p["unrel"] == [[[0], [1]], [[2], [3]]]  # ties keep their order


def test_pad_and_succ_ratios_replica():
    tuples = [runner.tok_tuple([1, 2], [3, 4, 5]), runner.tok_tuple([1], [6])]
    t = runner.pad(tuples)
    assert t["input_ids"].tolist() == [[1, 2, 3, 4], [1, 0, 0, 0]]
    assert t["labels"].tolist() == [[-100, 3, 4, 5], [6, -100, -100, -100]]
    logits = torch.zeros(2, 4, 10)
    for pos, tok in ((1, 3), (2, 0), (3, 5)):  # row 0: right, wrong, right
        logits[0, pos, tok] = 1.0
    logits[1, 0, 6] = 1.0
    assert runner.succ_ratios(logits, t["labels"]) == pytest.approx([2 / 3, 1.0])


def fake_results() -> dict:
    modules = [f"model.layers.{i}.mlp.down_proj" for i in (17, 18)]
    turn = {
        "turn": 0,
        "stats": {
            "n": {"ours": 40.0, "theirs": 40.0},
            "max_abs_diff_mean": 1e-7,
            "max_abs_diff_std": 2e-6,
            "rel_mean": 1e-8,
            "rel_std": 3e-7,
        },
        "modules": {
            m: {
                "delta_norm": {"ours": 0.5, "theirs": 0.5},
                "delta_fro_rel": 1e-6,
                "delta_vs_exact": {"ours": 1e-7, "theirs": 2e-5},
                "keys_rel": 0.0,
                "grads_rel": 1e-7,
            }
            for m in modules
        },
    }
    per = [{"record": i, **{lab: {"ours": 1.0, "theirs": 1.0 if i else 0.5} for _, lab in ua.KEYS}} for i in range(2)]
    metrics = {
        lab: {"ours": 100.0, "theirs": 75.0, "ours_pre": 10.0, "theirs_pre": 10.0, "differing": [0]}
        for _, lab in ua.KEYS
    }
    return {
        "date": "2026-12-07",
        "spec": {"n_records": 2, "n_edits": 2, "sub_batch": 1, "layers": [17, 18], "lr": 1e-4},
        "machine": {
            "cpu": "x86_64",
            "cores": 2,
            "threads": 2,
            "load": 3.0,
            "torch": "2.13.0+cpu",
            "transformers_ours": "5.24.0",
            "transformers_theirs": "4.46.3",
        },
        "summary": {
            "seconds_per_edit": {
                "ours": {"total": 1.0, "keys": 0.8, "solve": 0.01},
                "theirs": {"total": 2.0, "keys": 1.6, "solve": 0.3},
            },
            "metrics": metrics,
            "turns": [turn],
            "per_record": per,
        },
        "answers": ["1998", "Lecanorales"],
        "notes": ["A note."],
    }


def test_fmt_table():
    text = ua.fmt_table(fake_results())
    assert "Machine: x86_64, 2 cores, 2 torch threads per side" in text
    assert "| seconds per edit | 1.000 | 2.000 | **2.0×** |" in text
    assert "| ES after / before editing | 100.0 / 10.0 | 75.0 / 10.0 | |" in text
    assert "| records differing (ES / GS / LS) | 1 / 1 / 1 of 2 | | |" in text
    assert "| 1 | L17 | 0.5000 | 0.5000 | 1e-06 | 1e-07 / 2e-05 | 0 | 1e-07 |" in text
    assert "| 1 | 40 / 40 | 1e-07 | 2e-06 | 1e-08 / 3e-07 |" in text
    assert "equal, record for record" in text
    assert "| 0 | 1998 | **1.00 / 0.50** | **1.00 / 0.50** | **1.00 / 0.50** |" in text
    assert "| 1 | Lecanorales | 1.00 / 1.00 |" in text
    assert text.rstrip().endswith("A note.")


def test_write_results_appends_then_replaces(tmp_path, monkeypatch):
    res = tmp_path / "RESULTS.md"
    res.write_text("# Benchmarks\n\n<!-- bench:authors:begin -->\nX\n<!-- bench:authors:end -->\n")
    monkeypatch.setattr(ua, "RESULTS", res)
    ua.write_results("first\n")
    text = res.read_text()
    assert text.endswith(f"{ua.BEGIN}\nfirst\n{ua.END}\n") and "<!-- bench:authors:begin -->\nX\n" in text
    ua.write_results("second\n")
    assert res.read_text() == text.replace("first", "second")
