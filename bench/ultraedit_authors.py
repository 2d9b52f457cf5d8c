"""UltraEdit side by side: the authors' code (XiaojieGu/UltraEdit @ 0beb222) and ours, on SmolLM2-135M.

    python -m bench.ultraedit_authors                   # both sides, then bench/out/ultraedit_authors.{json,md}
    python -m bench.ultraedit_authors --write-results   # ... and the tables in bench/RESULTS.md
    python -m bench.ultraedit_authors --build-only      # only extract/patch the authors' code and build its venv

Needs ``bash bench/reference/build.sh`` once (the SmolLM2 HF folder ``.ref/smollm2-hf``). Builds what is
missing of the authors' side itself: the code at the pinned commit extracted from a local git clone
(``ULTRAEDIT_MIRROR``, default ``.ref/ultraedit.git``) into ``.ref/ultraedit`` and patched by
``bench/reference/patch_ultraedit.py``; its venv ``.ref/venv-ultraedit`` from
``bench/reference/requirements-ultraedit.txt``. Nothing of it is committed (``.ref/`` is git-ignored).

Protocol, both sides (``bench/reference/run_ultraedit.py`` has the details): the first 20 ZsRE records of
``zsre_mend_eval_portability_gpt4.json`` (edit prompt ``src``, target ``answers[0]``, rephrase
``rephrase``, locality ``loc + "?"`` / ``loc_ans``), sequential editing in 2 turns of 10 edits, sub-batches
of 5 (2 forward/backward passes and 2 normaliser updates per turn), the MLP ``down_proj`` of layers
17-22, ``lr`` (default 1e-4; the authors' 1e-6 is for 8B models) and ridge 1, float32 on both sides (the
authors' default is bf16, ``half: True``). Each side runs in a fresh process, the authors' first. After
the last turn both sides score every record with the authors' metric (teacher-forced token accuracy of the
answer). Per turn: the running statistics, the captured keys and gradients and every module's ΔW are
compared across the sides.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
REF = ROOT / ".ref"
UE_DIR = REF / "ultraedit"
UE_VENV = REF / "venv-ultraedit"
UE_PY = UE_VENV / "bin" / "python"
MODEL_DIR = REF / "smollm2-hf"
RUNNER = ROOT / "bench" / "reference" / "run_ultraedit.py"
PATCHER = ROOT / "bench" / "reference" / "patch_ultraedit.py"
REQUIREMENTS = ROOT / "bench" / "reference" / "requirements-ultraedit.txt"
RECORDS = ROOT.parent / "shared" / "data" / "zsre" / "zsre_mend_eval_portability_gpt4.json"
OUT = ROOT / "bench" / "out"
RESULTS = ROOT / "bench" / "RESULTS.md"
BEGIN, END = "<!-- bench:ultraedit:begin -->", "<!-- bench:ultraedit:end -->"
COMMIT = "0beb222559b01c6dc025aede801c1fc496ec2920"
#: the git folder of a clone of XiaojieGu/UltraEdit: $ULTRAEDIT_MIRROR, else .ref/ultraedit.git
MIRRORS = (Path(os.environ["ULTRAEDIT_MIRROR"]),) if os.environ.get("ULTRAEDIT_MIRROR") else (REF / "ultraedit.git",)
KEYS = (("edit", "ES"), ("equiv", "GS"), ("unrel", "LS"))
STATS_KEY = "(1536, 576)"  # (d_in, d_out) of SmolLM2's down_proj: one normaliser shared by the six modules


# What the numbers below the tables mean and where each difference comes from (found on 2026-12-07 by
# reading both codes and replaying the dumped tensors).
NOTES = [
    "Where the two sides differ, and why:",
    "",
    "- **Sub-batches.** The authors' `collate_fn` sorts each turn's edits by token length (longest first) "
    "before cutting the sub-batches of 5; `editors.algorithms.ultraedit` does the same (our side is handed the "
    "records in file order), so both sides average the loss and update the normaliser over the same rows.",
    "- **Turn 1 keys and gradients are bit-identical** (transformers 4.46.3 and ours, same float32 weights, "
    "same padded sub-batches).",
    "- **ΔW (relative differences up to ~1e-4)** comes from the authors' float32 LU solve of the d_in × d_in "
    "(1536²) system. Ours, a float64 Cholesky solve in the N × N dual form, is within ~1e-7 of a float64 solve "
    "of the authors' own K, G and statistics (column 'vs float64 solve'). In turn 2 both sides start from "
    "weights that differ by that solve error, so the keys of layers 18–22 and every gradient differ by ≤ ~1e-5 "
    "(relative), and 'vs float64 solve' (computed on the authors' turn-2 inputs) includes those differences.",
    "- **Statistics.** `editors.common.RunningStats.update` groups its sum as the authors' `nets.py` does, "
    "`var += (m·var(x) + n·m·δ²/n)`, so on the same rows the buffers are bit-identical (turn 1); in turn 2 "
    "they differ by the propagated solve differences above.",
    "- **Time.** One torch thread per side, the two sides one after the other (the load average in the "
    "machine line says how busy the cores were). Keys + "
    "gradients + statistics are the same work on both sides (one forward/backward per sub-batch; the authors "
    "also write K and G to disk). The solve is where ours is faster: an N × N system (N = 24–35 answer tokens "
    "per turn) instead of 1536², and no disk round trip.",
    "- Not compared here: bf16, the authors' default (`half: True`); both sides ran float32.",
]


def sha(*paths: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------
# Build


def mirror() -> Path:
    for m in MIRRORS:
        ok = subprocess.run(
            ["git", "--git-dir", str(m), "cat-file", "-e", f"{COMMIT}^{{commit}}"], capture_output=True
        ).returncode
        if ok == 0:
            return m
    raise SystemExit(
        f"no git clone with commit {COMMIT} of XiaojieGu/UltraEdit: clone it once with\n"
        f"  git clone --bare https://github.com/XiaojieGu/UltraEdit {REF / 'ultraedit.git'}\n"
        "or set ULTRAEDIT_MIRROR to a clone's git folder"
    )


def build() -> None:
    """Extract + patch the authors' code and build its venv, each only when its inputs changed."""
    REF.mkdir(exist_ok=True)
    want = f"{COMMIT} {sha(PATCHER)}"
    stamp = UE_DIR / ".build_stamp"
    if (UE_DIR / ".patched").is_file() and stamp.is_file() and stamp.read_text().strip() == want:
        print(f"[build] {UE_DIR.relative_to(ROOT)} up to date ({COMMIT[:7]})")
    else:
        src = mirror()
        shutil.rmtree(UE_DIR, ignore_errors=True)
        UE_DIR.mkdir(parents=True)
        archive = subprocess.run(["git", "--git-dir", str(src), "archive", COMMIT], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(UE_DIR)], input=archive.stdout, check=True)
        (UE_DIR / "REF_COMMIT").write_text(COMMIT + "\n")
        subprocess.run([sys.executable, str(PATCHER), str(UE_DIR)], check=True)
        stamp.write_text(want + "\n")
    want_venv = sha(REQUIREMENTS)
    vstamp = UE_VENV / ".build_stamp"
    if UE_PY.is_file() and vstamp.is_file() and vstamp.read_text().strip() == want_venv:
        print(f"[build] {UE_VENV.relative_to(ROOT)} up to date")
    else:
        if not UE_PY.is_file():
            subprocess.run([sys.executable, "-m", "venv", str(UE_VENV)], check=True)
        pip = [str(UE_PY), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-r", str(REQUIREMENTS)]
        subprocess.run(pip, check=True)
        check = "import torch, transformers, omegaconf; assert transformers.__version__ == '4.46.3'"
        subprocess.run([str(UE_PY), "-c", check], check=True)
        vstamp.write_text(want_venv + "\n")
    if not (MODEL_DIR / ".build_stamp").is_file():
        raise SystemExit(f"{MODEL_DIR.relative_to(ROOT)} is missing: run bash bench/reference/build.sh once")


# ----------------------------------------------------------------------------------------------------
# Run and compare


def run_side(side: str, spec: dict[str, Any], threads: int) -> dict[str, Any]:
    py = str(UE_PY) if side == "theirs" else sys.executable
    out = Path(spec["dump"]) / f"{side}.json"
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = str(ROOT) if side == "ours" else ""
    cmd = [py, str(RUNNER), "--side", side, "--spec", json.dumps(spec), "--out", str(out)]
    print(f"[run] {side}: {' '.join(cmd[:4])} ...", flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"{side} side failed (exit {proc.returncode})")
    return json.loads(out.read_text())


def rel(a, b) -> float:
    """max |a - b| / max |b| (inf when the shapes differ)."""
    if tuple(a.shape) != tuple(b.shape):
        return float("inf")
    scale = float(b.abs().max()) or 1.0
    return float((a.double() - b.double()).abs().max()) / scale


def exact_delta(keys, grads, stats: dict[str, Any], lr: float):
    """The authors' ΔW [d_out, d_in] from their keys, gradients and statistics, with V formed in float32
    as theirs and the solve (KᵀK + I)⁻¹KᵀV in float64: the reference both sides' solves are measured against."""
    import torch

    eps = torch.finfo(torch.float32).eps
    z = (torch.cat([keys, grads], 1) - stats["mean"]) / (stats["std"] + eps)
    k_hat, g_hat = z[:, : keys.shape[1]], z[:, keys.shape[1] :]
    v = -lr * (k_hat * k_hat).sum(-1, keepdim=True) * g_hat
    k = keys.double()
    a = k.T @ k + torch.eye(k.shape[1], dtype=torch.float64)
    return torch.linalg.solve(a, k.T @ v.double()).T


def compare_turns(dump: Path, n_turns: int, modules: list[str], lr: float) -> list[dict[str, Any]]:
    """Per turn: statistics, keys, gradients and ΔW, ours vs theirs, from the runners' dumps; each ΔW also
    against :func:`exact_delta` (float64 solve of the authors' own K, G and statistics)."""
    import torch

    out = []
    for t in range(n_turns):
        o = torch.load(dump / f"ours_turn{t}.pt", weights_only=True)
        a = torch.load(dump / f"theirs_turn{t}.pt", weights_only=True)
        so, sa = o["stats"], a["stats"]
        row: dict[str, Any] = {"turn": t, "stats_keys": {"ours": sorted(so), "theirs": sorted(sa)}}
        if STATS_KEY in so and STATS_KEY in sa:
            x, y = so[STATS_KEY], sa[STATS_KEY]
            row["stats"] = {
                "n": {"ours": float(x["n"]), "theirs": float(y["n"])},
                "max_abs_diff_mean": float((x["mean"] - y["mean"]).abs().max()),
                "max_abs_diff_std": float((x["std"] - y["std"]).abs().max()),
                "max_abs_diff_m2": float((x["m2"] - y["m2"]).abs().max()),
                "rel_mean": rel(x["mean"], y["mean"]),
                "rel_std": rel(x["std"], y["std"]),
                "max_abs_mean": float(y["mean"].abs().max()),
                "max_std": float(y["std"].max()),
            }
        mods = {}
        for m in modules:
            ko, ka = o["kg"][m]["keys"], a["kg"][m]["keys"]
            go, ga = o["kg"][m]["grads"], a["kg"][m]["grads"]
            do, da = o["deltas"][m], a["deltas"][m]
            exact = exact_delta(ka, ga, sa[STATS_KEY], lr) if STATS_KEY in sa else None
            mods[m] = {
                "delta_vs_exact": {
                    "ours": float((do.double() - exact).norm() / exact.norm()) if exact is not None else float("nan"),
                    "theirs": float((da.double() - exact).norm() / exact.norm()) if exact is not None else float("nan"),
                },
                "rows": {"ours": int(ko.shape[0]), "theirs": int(ka.shape[0])},
                "keys_rel": rel(ko, ka),
                "grads_rel": rel(go, ga),
                "delta_fro_rel": float((do.double() - da.double()).norm() / da.double().norm()),
                "delta_norm": {"ours": float(do.double().norm()), "theirs": float(da.double().norm())},
            }
        row["modules"] = mods
        out.append(row)
    return out


def machine(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, Any]:
    import platform

    vo, vt = ours["versions"], theirs["versions"]
    return {
        "cpu": platform.machine(),
        "cores": os.cpu_count(),
        "threads": vo["threads"],
        "torch": vo["torch"],
        "torch_theirs": vt["torch"],
        "transformers_ours": vo["transformers"],
        "transformers_theirs": vt["transformers"],
        "load": os.getloadavg()[0],
    }


def summarise(
    ours: dict[str, Any], theirs: dict[str, Any], turns: list[dict[str, Any]], spec: dict[str, Any]
) -> dict[str, Any]:
    n = spec["n_records"]
    per_record = []
    for i in range(n):
        row = {"record": i}
        for k, label in KEYS:
            row[label] = {"ours": ours["post"][k][i], "theirs": theirs["post_authors_own"][k][i]}
        per_record.append(row)
    metrics = {}
    for k, label in KEYS:
        o, t = ours["post"][k], theirs["post_authors_own"][k]  # the authors' side: their own succ_ratios
        metrics[label] = {
            "ours": 100 * sum(o) / n,
            "theirs": 100 * sum(t) / n,
            "ours_pre": 100 * sum(ours["pre"][k]) / n,
            "theirs_pre": 100 * sum(theirs["pre"][k]) / n,
            "differing": [i for i in range(n) if o[i] != t[i]],
            "theirs_own_equal_replica": theirs["post"][k] == t,
        }
    secs_o = {
        "total": sum(t["seconds"]["total"] for t in ours["turns"]),
        "keys": sum(t["seconds"]["keys"] for t in ours["turns"]),
        "solve": sum(t["seconds"]["solve"] for t in ours["turns"]),
    }
    secs_t = {
        "keys": sum(t["seconds"]["cache"] for t in theirs["turns"]),
        "solve": sum(t["seconds"]["solve"] for t in theirs["turns"]),
        "apply": sum(t["seconds"]["apply"] for t in theirs["turns"]),
    }
    secs_t["total"] = secs_t["keys"] + secs_t["solve"] + secs_t["apply"]
    return {
        "metrics": metrics,
        "per_record": per_record,
        "seconds_per_edit": {
            "ours": {k: v / n for k, v in secs_o.items()},
            "theirs": {k: v / n for k, v in secs_t.items()},
        },
        "turns": turns,
        "update_norms": {
            "ours": [t["update_norms"] for t in ours["turns"]],
            "theirs": [t["update_norms"] for t in theirs["turns"]],
            "ours_applied": [t["applied_norms"] for t in ours["turns"]],
            "theirs_applied": [t["applied_norms"] for t in theirs["turns"]],
        },
        "authors_final_results": theirs.get("authors_final_results"),
        "same_input_ids": ours["input_ids"] == theirs["input_ids"],
        "same_plan": ours["plan"] == theirs["plan"],
        "ours_request_id_mismatch": ours["request_id_mismatch"],
    }


def fmt(x: float, digits: int = 3) -> str:
    if x != x:
        return "–"
    if x == 0:
        return "0"
    return f"{x:.{digits}g}" if abs(x) < 1e-3 or abs(x) >= 1e4 else f"{x:.{digits}f}"


def short(m: str) -> str:
    """model.layers.17.mlp.down_proj -> L17"""
    parts = m.split(".")
    return f"L{parts[2]}" if len(parts) > 2 and parts[2].isdigit() else m


def fmt_table(res: dict[str, Any]) -> str:
    """The section of bench/RESULTS.md between the ``bench:ultraedit`` markers."""
    m, s, spec = res["machine"], res["summary"], res["spec"]
    so, st = s["seconds_per_edit"]["ours"], s["seconds_per_edit"]["theirs"]
    lines = [
        "### UltraEdit: the authors' code (XiaojieGu/UltraEdit @ 0beb222) vs ours, sequential editing",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['threads']} torch thread{'s' if m['threads'] != 1 else ''} "
        f"per side (load average {m['load']:.1f} at the end); torch {m['torch']}; "
        f"ours: transformers {m['transformers_ours']}; authors: "
        f"transformers {m['transformers_theirs']}. Generated by `python -m bench.ultraedit_authors` on {res['date']}.",
        "",
        f"SmolLM2-135M float32 on both sides (the authors' default is bf16); ZsRE records 0–{spec['n_records'] - 1} of "
        f"`zsre_mend_eval_portability_gpt4.json` (target `answers[0]`); "
        f"{spec['n_records'] // spec['n_edits']} turns of {spec['n_edits']} edits in sub-batches of "
        f"{spec['sub_batch']}; `down_proj` of layers "
        f"{spec['layers'][0]}–{spec['layers'][-1]}; lr {spec['lr']:g}, ridge 1. Metrics: the authors' teacher-forced "
        "token accuracy after the last turn (ES edit prompt, GS rephrase, LS locality question vs its NQ answer), "
        "mean over records ×100, both sides scored by the same code on the same sub-batches.",
        "",
        "| | ours | authors | authors ÷ ours |",
        "|---|---:|---:|---:|",
        f"| seconds per edit | {so['total']:.3f} | {st['total']:.3f} | **{st['total'] / so['total']:.1f}×** |",
        f"| of which keys + gradients + statistics | {so['keys']:.3f} | {st['keys']:.3f} | "
        f"{st['keys'] / so['keys']:.1f}× |",
        f"| of which the solve | {so['solve']:.4f} | {st['solve']:.4f} | {st['solve'] / so['solve']:.1f}× |",
    ]
    for _k, label in KEYS:
        x = s["metrics"][label]
        lines.append(
            f"| {label} after / before editing | {x['ours']:.1f} / {x['ours_pre']:.1f} | "
            f"{x['theirs']:.1f} / {x['theirs_pre']:.1f} | |"
        )
    diff = " / ".join(str(len(s["metrics"][label]["differing"])) for _, label in KEYS)
    own = all(s["metrics"][label].get("theirs_own_equal_replica", True) for _, label in KEYS)
    lines += [
        f"| records differing (ES / GS / LS) | {diff} of {spec['n_records']} | | |",
        "",
        "The authors' side's values are their own `succ_ratios` from their `sequential_valid` "
        + (
            "(equal, record for record, to the harness's replica that scores our side)."
            if own
            else "**(which differ from the harness's replica: see the JSON)**."
        ),
        "",
        "Per turn: the normaliser shared by the six modules (same shape) after the turn, and each module's update.",
        "",
        "| turn | rows n ours / authors | max abs diff mean | max abs diff std | rel. (mean / std) |",
        "|---|---|---:|---:|---|",
    ]
    for t in s["turns"]:
        st_ = t.get("stats")
        if st_ is None:
            lines.append(f"| {t['turn'] + 1} | statistics keys differ: {t['stats_keys']} | | | |")
            continue
        lines.append(
            f"| {t['turn'] + 1} | {st_['n']['ours']:.0f} / {st_['n']['theirs']:.0f} | "
            f"{fmt(st_['max_abs_diff_mean'])} | {fmt(st_['max_abs_diff_std'])} | "
            f"{fmt(st_['rel_mean'])} / {fmt(st_['rel_std'])} |"
        )
    lines += [
        "",
        "| turn | module | ‖ΔW‖_F ours | ‖ΔW‖_F authors | ‖ΔW_ours − ΔW_authors‖_F / ‖ΔW_authors‖_F "
        "| vs float64 solve: ours / authors | keys rel. diff | gradients rel. diff |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for t in s["turns"]:
        for mod, x in t["modules"].items():
            ex = x.get("delta_vs_exact", {"ours": float("nan"), "theirs": float("nan")})
            lines.append(
                f"| {t['turn'] + 1} | {short(mod)} | {fmt(x['delta_norm']['ours'], 4)} | "
                f"{fmt(x['delta_norm']['theirs'], 4)} | {fmt(x['delta_fro_rel'])} | "
                f"{fmt(ex['ours'])} / {fmt(ex['theirs'])} | {fmt(x['keys_rel'])} | {fmt(x['grads_rel'])} |"
            )
    lines += [
        "",
        "Rel. diff = max |ours − authors| / max |authors|. Per record (after the last turn, ours / authors):",
        "",
        "| record | answer | ES | GS | LS |",
        "|---|---|---|---|---|",
    ]
    for r, ans in zip(s["per_record"], res["answers"], strict=True):
        cells = []
        for _, label in KEYS:
            o, a = r[label]["ours"], r[label]["theirs"]
            cell = f"{o:.2f} / {a:.2f}"
            cells.append(f"**{cell}**" if o != a else cell)
        lines.append(f"| {r['record']} | {ans} | {' | '.join(cells)} |")
    lines += ["", *res.get("notes", [])]
    return "\n".join(lines).rstrip() + "\n"


def write_results(table: str) -> None:
    """Replace the text between the ``bench:ultraedit`` markers of bench/RESULTS.md (appended at the end
    when missing); written atomically."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmarks\n"
    if BEGIN not in text or END not in text:
        text = text.rstrip("\n") + f"\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\n{table}{END}{tail}"
    fd, tmp = tempfile.mkstemp(dir=RESULTS.parent, prefix=".RESULTS.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(new)
    os.replace(tmp, RESULTS)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=20)
    ap.add_argument("--n-edits", type=int, default=10, help="edits per turn")
    ap.add_argument("--sub-batch", type=int, default=5)
    ap.add_argument("--layers", default="17,18,19,20,21,22")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads per side (1: robust when other jobs share the cores)"
    )
    ap.add_argument("--write-results", action="store_true", help=f"replace the section in {RESULTS.name}")
    ap.add_argument("--build-only", action="store_true")
    ap.add_argument("--keep-dump", action="store_true", help="keep the per-turn tensors (bench/out/ultraedit_dump)")
    args = ap.parse_args(argv)
    build()
    if args.build_only:
        return 0
    if args.records % args.n_edits:
        raise SystemExit("--records must be a multiple of --n-edits (the authors' loader drops the rest)")
    OUT.mkdir(parents=True, exist_ok=True)
    dump = OUT / "ultraedit_dump"
    shutil.rmtree(dump, ignore_errors=True)
    dump.mkdir(parents=True)
    spec = {
        "records": str(RECORDS),
        "n_records": args.records,
        "n_edits": args.n_edits,
        "sub_batch": args.sub_batch,
        "layers": [int(x) for x in args.layers.split(",")],
        "lr": args.lr,
        "ridge": 1.0,
        "threads": args.threads,
        "model_dir": str(MODEL_DIR),
        "dump": str(dump),
    }
    theirs = run_side("theirs", spec, args.threads)
    ours = run_side("ours", spec, args.threads)
    modules = [f"model.layers.{layer}.mlp.down_proj" for layer in spec["layers"]]
    turns = compare_turns(dump, args.records // args.n_edits, modules, args.lr)
    answers = [r["answers"][0] for r in json.loads(RECORDS.read_text())[: args.records]]
    res = {
        "date": datetime.date.today().isoformat(),
        "spec": {k: v for k, v in spec.items() if k != "dump"},
        "machine": machine(ours, theirs),
        "summary": summarise(ours, theirs, turns, spec),
        "answers": answers,
        "notes": NOTES,
        "ours": {k: v for k, v in ours.items() if k not in ("input_ids", "plan")},
        "theirs": {k: v for k, v in theirs.items() if k not in ("input_ids", "plan")},
    }
    table = fmt_table(res)
    (OUT / "ultraedit_authors.json").write_text(json.dumps(res, indent=1))
    (OUT / "ultraedit_authors.md").write_text(table)
    print(table)
    if args.write_results:
        write_results(table)
        print(f"[done] {RESULTS.relative_to(ROOT)} updated")
    if not args.keep_dump:
        shutil.rmtree(dump, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
