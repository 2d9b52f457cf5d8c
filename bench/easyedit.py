"""Side by side with EasyEdit (zjunlp/EasyEdit @ 14cea82): MEMIT and AlphaEdit, sequential-batch editing.

    bash bench/reference/build.sh                        # once: SmolLM2 as an HF folder (.ref/smollm2-hf)
    python -m bench.easyedit [--methods memit,alphaedit] [--n 20] [--batch 10] [--steps 10] [--write-results]
    python -m bench.easyedit --build-only                # only extract/patch EasyEdit and build its venv

Builds what is missing of EasyEdit's side itself: the code at the pinned commit extracted from a local git
clone (``--mirror`` / ``EASYEDIT_MIRROR``, default ``.ref/easyedit.git``) into ``.ref/easyedit`` and patched
by ``bench/reference/patch_easyedit.py``; its venv ``.ref/venv-easyedit`` from
``bench/reference/requirements-easyedit.txt``. Nothing of it is committed (``.ref/`` is git-ignored).

For each method, three fresh processes, one after the other, on the same records: our side
(``python -m bench.authors --side ours``: ``editors.run_schedule``, sequential-batch, each batch scored right
after its edit and every record after the last batch), EasyEdit's side (``bench/reference/run_easyedit.py``
in its venv: EasyEdit's ``BaseEditor.batch_edit(..., sequential_edit=True)``, the edited weights saved after
each batch), then EasyEdit's weights scored by our scorer (``python -m bench.easyedit --side score``: each
batch's weights loaded into our model, its records scored, then every record on the last weights).
Same protocol on both sides: the first ``--n`` CounterFact records (``bench.run.rome_records``), batches of
``--batch`` at ``--layer`` of SmolLM2-135M (fp32, CPU, ``--threads`` torch threads), the value optimisation
a fixed ``--steps`` with the 5e-2 loss stop off, this project's C (our statistics cache, converted by
``bench/reference/stats_to_npz.py`` and read by EasyEdit's own ``layer_stats`` as its cache file) and our
context templates handed to EasyEdit, the hyperparameters of our ``smollm2-135m`` presets mapped field by
field (:data:`EE_HP`). ES/PS/NS on both sides: ``sweep.evals.metrics.score_records`` (CounterFact's NLL
comparisons; EasyEdit's own metrics are token accuracies, another definition).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from .authors import SHARED_HP, compare, fmt_comparison, ours_spec, per_edit, results_header, run_ours_side
from .authors import trial_config as authors_trial_config
from .run import OUT, REF_MODEL, ROOT, peak_rss_mb, publish, rome_records, stats_npz, subprocess_json
from .ultraedit_authors import sha

REF = ROOT / ".ref"
EE_DIR = REF / "easyedit"
EE_VENV = REF / "venv-easyedit"
EE_PY = EE_VENV / "bin" / "python"
RUNNER = ROOT / "bench" / "reference" / "run_easyedit.py"
PATCHER = ROOT / "bench" / "reference" / "patch_easyedit.py"
REQUIREMENTS = ROOT / "bench" / "reference" / "requirements-easyedit.txt"
BEGIN, END = "<!-- bench:easyedit:begin -->", "<!-- bench:easyedit:end -->"
METRICS = ("es", "ps", "ns")
METHODS = ("memit", "alphaedit")

# Our hyperparameter -> EasyEdit's field, per algorithm (the value optimisation's fields are shared).
EE_HP: dict[str, dict[str, str]] = {
    "memit": {"mom2_update_weight": "mom2_update_weight"},
    "alphaedit": {"nullspace_threshold": "nullspace_threshold", "L2": "L2"},
}
# Our hyperparameters EasyEdit has no field for: the comparison holds only at these values.
OFF: dict[str, dict[str, Any]] = {
    "memit": {"add_prev_edits": False, "update_norm_lambda": 0.0},
    "alphaedit": {"beta_hse": 0.0},
}
OFF_SHARED: dict[str, Any] = {"nas": False, "rect_keep": None, "prune_base": None}

log = logging.getLogger("bench.easyedit")


def easyedit_hparams(algorithm: str, hp: dict[str, Any]) -> dict[str, Any]:
    """EasyEdit's hparams overrides from our resolved hyperparameters (``v_loss_layer`` None is left to the
    runner: the last block).

    Raises:
        ValueError: ``hp`` turns on something EasyEdit's method does not have (ENCORE's previous keys, a
            norm penalty, SPHERE, NAS, RECT, PRUNE).
    """
    for k, off in {**OFF_SHARED, **OFF[algorithm]}.items():
        if k in hp and hp[k] != off:
            raise ValueError(f"{algorithm}: {k} = {hp[k]!r} has no counterpart in EasyEdit (needs {off!r})")
    out: dict[str, Any] = {}
    for ours, theirs in {**SHARED_HP, **EE_HP[algorithm]}.items():
        if hp[ours] is not None:
            out[theirs] = hp[ours]
    return out


# ----------------------------------------------------------------------------------------------------
# Build


def patcher() -> ModuleType:
    """``bench/reference/patch_easyedit.py``, loaded by path (it imports its siblings)."""
    spec = importlib.util.spec_from_file_location("patch_easyedit", PATCHER)
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def build(mirror: str | None) -> None:
    """Extract + patch EasyEdit and build its venv, each only when its inputs changed."""
    REF.mkdir(exist_ok=True)
    patcher().build(mirror)
    want = sha(REQUIREMENTS)
    stamp = EE_VENV / ".build_stamp"
    if EE_PY.is_file() and stamp.is_file() and stamp.read_text().strip() == want:
        log.info("%s up to date", EE_VENV.relative_to(ROOT))
    else:
        if not EE_PY.is_file():
            subprocess.run([sys.executable, "-m", "venv", str(EE_VENV)], check=True)
        quiet = ["--quiet", "--disable-pip-version-check"]
        subprocess.run([str(EE_PY), "-m", "pip", "install", *quiet, "-r", str(REQUIREMENTS)], check=True)
        subprocess.run([str(EE_PY), "-c", "import torch, transformers, yaml, tqdm"], check=True)
        stamp.write_text(want + "\n")
    if not (REF_MODEL / "model.safetensors").is_file():
        raise SystemExit(f"{REF_MODEL.relative_to(ROOT)} is missing: run bash bench/reference/build.sh once")


# ----------------------------------------------------------------------------------------------------
# Our scorer on EasyEdit's weights (a fresh process: ``python -m bench.easyedit --side score ...``)


def score_weights(spec: dict[str, Any]) -> dict[str, Any]:
    """Per record ES/PS/NS of EasyEdit's edits by ``sweep.evals.metrics.score_records``: each batch's edited
    weights loaded into our model (checked to start from the same weights), its records scored ("at edit"),
    then every record on the last batch's weights ("final")."""
    import torch

    from sweep.config import parse_config
    from sweep.evals.metrics import score_records
    from sweep.stages import load_for_trial, load_records

    torch.set_num_threads(spec["threads"])
    cfg = parse_config(authors_trial_config(spec))
    records = load_records(cfg)
    model, tok, mspec, _ = load_for_trial(cfg, cfg.edit_hparams, None, None)
    params = {n: model.get_parameter(n) for n in spec["weight_names"]}
    w0 = torch.load(spec["w0"], weights_only=True)
    w0_diff = max(float((params[n].detach() - w0[n]).abs().max()) for n in params)
    if w0_diff != 0.0:
        raise RuntimeError(f"EasyEdit's unedited weights differ from ours (max |diff| {w0_diff})")

    def load(path: str) -> None:
        w = torch.load(path, weights_only=True)
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(w[n])

    bs = spec["batch_size"]
    per_record: dict[int, dict[str, Any]] = {}
    t = time.perf_counter()
    for b, path in enumerate(spec["weights"]):
        load(path)
        for s in score_records(model, tok, mspec, records[b * bs : (b + 1) * bs]):
            per_record[s.case_id] = {"case_id": s.case_id, "batch": b, "at_edit": {m: getattr(s, m) for m in METRICS}}
    for s in score_records(model, tok, mspec, records):
        per_record[s.case_id]["final"] = {m: getattr(s, m) for m in METRICS}
    return {
        "per_record": [per_record[r.case_id] for r in records],
        "score_s": time.perf_counter() - t,
        "w0_max_abs_diff": w0_diff,
        "peak_rss_mb": peak_rss_mb(),
    }


# ----------------------------------------------------------------------------------------------------
# The table (pure)


def fmt_table(results: dict[str, Any]) -> str:
    """The section of bench/RESULTS.md between the ``bench:easyedit`` markers."""
    return fmt_comparison(results, "easyedit", "EasyEdit", "python -m bench.easyedit")


# ----------------------------------------------------------------------------------------------------
# The driver


def run_method(name: str, args: argparse.Namespace, records: Path, env: dict[str, str]) -> dict[str, Any]:
    """Both sides of one method and the comparison."""
    spec = ours_spec(name, {}, args)
    o = run_ours_side(f"easyedit.{name}", spec, env)
    entry: dict[str, Any] = {"ours": o}
    espec = {
        "method": name,
        "model_dir": str(REF_MODEL),
        "layers": [args.layer],
        "hparams": easyedit_hparams(name, o["hparams"]),
        "early_stop": False,
        "context_templates": o["templates"],
        "records": str(records),
        "n_records": args.n,
        "batch_size": args.batch,
        "stats": str(stats_npz(Path(o["stats_file"]))),
        "threads": args.threads,
        "weights_dir": str(OUT / f"easyedit.{name}.weights"),
    }
    esp = OUT / f"easyedit.{name}.easyedit.spec.json"
    esp.write_text(json.dumps(espec))
    log.info("%s: EasyEdit", name)
    e_out = OUT / f"easyedit.{name}.easyedit.json"
    t = subprocess_json([str(EE_PY), str(RUNNER), "--spec", str(esp), "--out", str(e_out)], e_out, env)
    entry["easyedit"] = t
    entry["source"] = f"{t['repo']} @ {t['commit'][:7]}"
    log.info("%s: EasyEdit %.2f s/edit; scoring its weights on our side", name, per_edit(t))
    ssp = OUT / f"easyedit.{name}.score.spec.json"
    ssp.write_text(json.dumps({**spec, **{k: t[k] for k in ("weight_names", "w0", "weights")}}))
    s_out = OUT / f"easyedit.{name}.score.json"
    cmd = [sys.executable, "-m", "bench.easyedit", "--side", "score", "--spec", str(ssp), "--out", str(s_out)]
    scored = subprocess_json(cmd, s_out, env)
    t["per_record"] = scored["per_record"]
    t["scoring"] = {k: v for k, v in scored.items() if k != "per_record"}
    entry["diff"] = compare(o, t)
    log.info("%s: differing %s", name, entry["diff"])
    return entry


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    ap.add_argument("--n", type=int, default=20, help="CounterFact records (the first ones)")
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--layer", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10, help="fixed value steps (loss stop off on both sides)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per side")
    ap.add_argument("--mirror", help="git folder of an EasyEdit clone (default: $EASYEDIT_MIRROR, .ref/easyedit.git)")
    ap.add_argument("--build-only", action="store_true", help="only extract/patch EasyEdit and build its venv")
    ap.add_argument("--write-results", action="store_true", help="replace the bench:easyedit section of RESULTS.md")
    ap.add_argument("--json", default=str(OUT / "easyedit.json"), help="where the results JSON goes")
    ap.add_argument("--side", choices=["score"], help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.side:
        res = score_weights(json.loads(Path(args.spec).read_text()))
        Path(args.out).write_text(json.dumps(res, default=str))
        return 0
    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise SystemExit(f"error: --methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    build(args.mirror)
    if args.build_only:
        return 0
    OUT.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    env["TOKENIZERS_PARALLELISM"] = "false"
    results = results_header(args)
    records = rome_records(args.n)
    for name in names:
        try:
            entry = run_method(name, args, records, env)
            results["machine"]["easyedit_transformers"] = entry["easyedit"]["versions"].get("transformers", "?")
        except Exception as e:  # a method that cannot run says why in its row
            log.error("%s: %s", name, e)
            entry = {"error": f"{type(e).__name__}: {e}"}
        results["methods"][name] = entry
        results["machine"]["load"] = os.getloadavg()[0]
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    table = fmt_table(results)
    Path(args.json).with_suffix(".md").write_text(table)
    publish(table, results, args.json, BEGIN, END, args.write_results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
