"""Run and time the AUTHORS' code of AlphaEdit, SPHERE, RLSEdit or ENCORE on CPU, sequential-batch editing.

Runs INSIDE the reference venv (transformers 4.46), from the repository root, after ``bench/reference/build.sh``
and ``bench/reference/patch_authors.py`` (``python -m bench.authors`` does all of it and writes the spec):

    .ref/venv/bin/python bench/reference/run_authors.py --spec spec.json --out out.json

Spec keys: ``method`` (alphaedit | sphere | rlsedit | encore), ``model_dir``, ``layers``, ``hparams`` (overrides of
the method's Llama-3-8B hparams file; module templates are Llama's with ``lm_head_module = model.embed_tokens``,
SmolLM2 ties its head; ``v_loss_layer`` defaults to the last block), ``early_stop`` (false: the ``5e-2`` loss stop
off; ENCORE's ``prob_cutoff`` stays whatever ``hparams`` says), ``context_templates`` (list of lists, replace the
generated ones), ``records`` (ROME-format CounterFact), ``n_records``, ``batch_size``, ``stats`` (an ``.npz`` of
``stats_to_npz.py``), ``sphere`` (``{"beta_hse": .., "alpha": ..}``), ``threads``.

Protocol, as each authors' driver runs sequential editing, with what their driver leaves out made explicit:

- AlphaEdit / SPHERE (``experiments/evaluate.py``): ``cache_c`` and ``P`` zero tensors of shape
  (layers, d_ff, d_ff) (their Llama branch), ``P[i] = get_project(model, tok, layer, hparams)`` (the function's
  source is taken from their ``evaluate.py``, which is not importable without its baselines), then per batch
  ``model, cache_c = apply_AlphaEdit_to_model(model, tok, requests, hparams, cache_c=cache_c, P=P)``; SPHERE adds
  ``beta_hse=, alpha=, save_weights=False``.
- RLSEdit: ``model, C = apply_RLSEdit_to_model(..., cache_c=C)`` with ``C = None`` at the first batch and the
  returned C passed back in afterwards: the recursion carried from batch to batch (their ``evaluate.py`` drops
  the returned C, so their runs restart from C0 every batch).
- ENCORE (``experiments/evaluate_unified_editing.py --sequential``): ``hparams.sequential = True``, then per batch
  ``apply_encore_to_model(model, tok, requests, hparams)`` (its ``SEQ_CACHE`` carries the earlier keys).

After each batch its records are scored ("at edit"), after the last batch every record ("final"), with the
unified reference's ``compute_rewrite_quality_counterfact`` (generation test skipped) and ``run_reference.py``'s
``record_metrics``: ES/PS/NS from the NLL comparisons.

Timings per batch (``time.perf_counter``): ``edit`` = the apply call (plus, at the first batch of AlphaEdit/SPHERE,
the driver's ``get_project`` calls, which ours does inside its first edit) minus the loading of the C file (ours
has C in memory; kept as ``c_load``); ``keys`` = ``compute_ks``, ``values`` = ``compute_z``; ``solve`` = the rest.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import importlib.util
import io
import json
import logging
import os
import random
import sys
import tempfile
import time
from collections import defaultdict
from copy import deepcopy
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
import run_reference as rr  # noqa: E402  (load_model, record_metrics, npz_moment, peak_rss_mb)

UNIFIED = Path(os.environ.get("REF_DIR", ROOT / ".ref" / "unified-model-editing"))

# method -> (folder under .ref, main module, apply function, hparams class path, base hparams file)
METHODS = {
    "alphaedit": (
        "AlphaEdit",
        "AlphaEdit.AlphaEdit_main",
        "apply_AlphaEdit_to_model",
        "AlphaEdit.AlphaEdit_hparams:AlphaEditHyperParams",
        "hparams/AlphaEdit/Llama3-8B.json",
    ),
    "sphere": (
        "SPHERE",
        "AlphaEdit.AlphaEdit_main",
        "apply_AlphaEdit_to_model",
        "AlphaEdit.AlphaEdit_hparams:AlphaEditHyperParams",
        "hparams/AlphaEdit/Llama3-8B.json",
    ),
    "rlsedit": (
        "RLSEdit",
        "RLSEdit.RLSEdit_main",
        "apply_RLSEdit_to_model",
        "RLSEdit.RLSEdit_hparams:RLSEditHyperParams",
        "hparams/RLSEdit/Llama3-8B.json",
    ),
    "encore": (
        "knowledge-editing-regularization",
        "encore.encore_main",
        "apply_encore_to_model",
        "encore.encore_hparams:ENCOREHyperParams",
        "hparams/ENCORE/llama3-8b.json",
    ),
}


def function_from_source(path: Path, name: str, namespace: dict) -> object:
    """The top-level function ``name`` of the file ``path`` (or, for ``"Class.method"``, that method as a plain
    function of ``self``), compiled alone into ``namespace`` (so a driver whose module imports are unavailable
    still lends its function, verbatim)."""
    *owners, fname = name.split(".")
    body = ast.parse(path.read_text()).body
    for owner in owners:
        body = next((n.body for n in body if isinstance(n, ast.ClassDef) and n.name == owner), [])
    for node in body:
        if isinstance(node, ast.FunctionDef) and node.name == fname:
            mod = ast.Module(body=[node], type_ignores=[])
            exec(compile(mod, str(path), "exec"), namespace)  # the authors' own function, verbatim
            return namespace[fname]
    raise SystemExit(f"{path}: no function {name}")


def load_unified_scorer():
    """The unified reference's CounterFact evaluation (patched for CPU, generation test switchable off)."""
    if not (UNIFIED / ".patched").is_file():
        raise SystemExit(f"{UNIFIED} is missing or unpatched: run bench/reference/build.sh first")
    sys.path.append(str(UNIFIED))  # after the authors' tree: only what it lacks (dsets) comes from here
    path = UNIFIED / "experiments" / "py" / "eval_utils_counterfact.py"
    spec = importlib.util.spec_from_file_location("unified_eval_utils_counterfact", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.SKIP_SLIDING_GENERATION = True
    return mod


def build_hparams(method: str, folder: Path, layers: list[int], overrides: dict, n_layers: int):
    _, _, _, cls_path, base = METHODS[method]
    mod_name, cls_name = cls_path.split(":")
    cls = getattr(importlib.import_module(mod_name), cls_name)
    data = json.loads((folder / base).read_text())
    data.update(rr.LLAMA_TEMPLATES)
    if "model_name" in data:
        data["model_name"] = "SmolLM2-135M"
    data["layers"] = list(layers)
    data["v_loss_layer"] = n_layers - 1
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return cls(**data)
    except TypeError as e:
        raise SystemExit(f"hparams: {e}") from None


def run_spec(spec: dict, quiet: bool) -> dict:
    t_start = time.perf_counter()
    method = spec["method"]
    if method not in METHODS:
        raise SystemExit(f"method: {method!r} is not one of {sorted(METHODS)}")
    rr.setup_threads(spec.get("threads"))
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    os.environ["REF_EARLY_STOP_LOSS"] = "5e-2" if spec.get("early_stop", True) else "-inf"
    tmp = Path(tempfile.mkdtemp(prefix="authors-"))
    os.environ["RLSEDIT_OBJ_CSV"] = str(tmp / "rlsedit_obj_terms.csv")
    folder_name, main_name, apply_name, _, _ = METHODS[method]
    folder = ROOT / ".ref" / folder_name
    if not (folder / ".patched").is_file():
        raise SystemExit(f"{folder} is missing or unpatched: run python3 bench/reference/patch_authors.py")
    records = json.loads(rr.resolve(spec["records"]).read_text())[: int(spec["n_records"])]
    stats_npz = rr.resolve(spec["stats"])
    model_dir = rr.resolve(spec.get("model_dir", ROOT / ".ref" / "smollm2-hf"))
    os.chdir(folder)  # util/globals.py opens globals.yml from the working directory
    sys.path.insert(0, str(folder))
    main = importlib.import_module(main_name)
    apply_fn = getattr(main, apply_name)
    ecf = load_unified_scorer()

    model, tok = rr.load_model(model_dir)
    hparams = build_hparams(method, folder, spec["layers"], spec.get("hparams", {}), model.config.num_hidden_layers)

    templates = [list(t) for t in spec["context_templates"]]
    main.get_context_templates = lambda model, tok: templates
    main.CONTEXT_TEMPLATES_CACHE = templates

    T: dict[str, float] = defaultdict(float)

    # C: our matrix, read by the authors' own runningstats classes, in place of the Wikipedia pass.
    from util.runningstats import CombinedStat, SecondMoment

    want_c, _, _ = rr.npz_moment(stats_npz)
    stats_check: dict = {}

    def given_layer_stats(model, tok, layer_name, *a, **k):
        t = time.perf_counter()
        stat = CombinedStat(mom2=SecondMoment())
        with np.load(stats_npz) as d:
            stat.load_state_dict({key: d[key] for key in d.files})
        got = stat.mom2.moment().double().numpy()
        diff = float(np.abs(got - want_c).max())
        stats_check[layer_name] = {"count": int(stat.mom2.count), "max_abs_diff": diff}
        if diff > 1e-6 * float(np.abs(want_c).max()):
            raise SystemExit(f"{layer_name}: the C handed over differs from {stats_npz} by {diff}")
        T["c_load"] += time.perf_counter() - t
        return (stat, None) if method == "encore" else stat

    main.layer_stats = given_layer_stats
    main.COV_CACHE.clear()
    main.compute_ks = timed(main.compute_ks, T, "keys")
    main.compute_z = timed(main.compute_z, T, "values")

    weight_names = [f"{hparams.rewrite_module_tmp.format(layer)}.weight" for layer in hparams.layers]
    from util import nethook

    def weights() -> dict[str, torch.Tensor]:
        return {n: nethook.get_parameter(model, n).detach().clone() for n in weight_names}

    out_stream = io.StringIO() if quiet else None
    quiet_ctx = (lambda: contextlib.redirect_stdout(out_stream)) if quiet else contextlib.nullcontext

    # The driver's state before the first batch.
    extra: dict = {}
    pre_edit_s = 0.0
    if method in ("alphaedit", "sphere"):
        w_out = nethook.get_parameter(model, weight_names[-1])
        d = w_out.shape[1]  # the Llama branch of their evaluate.py (nn.Linear: d_ff = shape[1])
        cache_c = torch.zeros((len(hparams.layers), d, d), device="cpu")
        P = torch.zeros((len(hparams.layers), d, d), device="cpu")
        get_project = function_from_source(
            folder / "experiments" / "evaluate.py", "get_project", {"torch": torch, "get_cov": main.get_cov}
        )
        t = time.perf_counter()
        with quiet_ctx():
            for i, layer in enumerate(hparams.layers):
                P[i, :, :] = get_project(model, tok, layer, hparams)
        pre_edit_s = time.perf_counter() - t - T["c_load"]  # the C file's loading is kept apart (c_load)
        extra["pre_edit_c_load"] = T["c_load"]
        extra["null_space_dim"] = [int(torch.trace(P[i]).round()) for i in range(len(hparams.layers))]
        kwargs = {"cache_c": cache_c, "P": P}
        if method == "sphere":
            s = spec.get("sphere") or {}
            kwargs.update(beta_hse=float(s["beta_hse"]), alpha=float(s["alpha"]), save_weights=False)
    elif method == "rlsedit":
        kwargs = {"cache_c": None}
    else:
        hparams.sequential = True
        kwargs = {}

    bs = int(spec["batch_size"])
    per_record: dict[int, dict] = {}
    batches = []
    for b in range(0, len(records), bs):
        chunk = records[b : b + bs]
        requests = [{"case_id": r["case_id"], **deepcopy(r["requested_rewrite"])} for r in chunk]
        before = weights()
        T0 = dict(T)
        with quiet_ctx():
            t = time.perf_counter()
            ret = apply_fn(model, tok, requests, hparams, **kwargs)
            edit_s = time.perf_counter() - t
        if method in ("alphaedit", "sphere"):
            kwargs["cache_c"] = ret[1]
        elif method == "rlsedit":
            kwargs["cache_c"] = ret[1]  # carried: their driver drops it (see the module docstring)
        if b == 0:
            edit_s += pre_edit_s
        after = weights()
        norms = {n: float((after[n].double() - before[n].double()).norm()) for n in weight_names}
        dt = {k: T[k] - T0.get(k, 0.0) for k in ("keys", "values", "c_load")}
        edit_s -= dt["c_load"]
        t = time.perf_counter()
        with quiet_ctx():
            for r in chunk:
                m = rr.record_metrics(ecf.compute_rewrite_quality_counterfact(model, tok, r, None, None))
                per_record[r["case_id"]] = {"case_id": r["case_id"], "batch": b // bs, "at_edit": m}
        score_s = time.perf_counter() - t
        batches.append(
            {
                "index": b // bs,
                "n": len(chunk),
                "edit": edit_s,
                "keys": dt["keys"],
                "values": dt["values"],
                "solve": edit_s - dt["keys"] - dt["values"],
                "c_load": dt["c_load"],
                "score": score_s,
                "update_norms": norms,
                "update_norm": float(np.sqrt(sum(v * v for v in norms.values()))),
            }
        )
        if quiet:
            out_stream.seek(0)
            out_stream.truncate()
        norm = batches[-1]["update_norm"]
        print(f"batch {b // bs}: {len(chunk)} edits in {edit_s:.1f}s, |dW| {norm:.4g}", file=sys.stderr)
    t = time.perf_counter()
    with quiet_ctx():
        for r in records:
            m = rr.record_metrics(ecf.compute_rewrite_quality_counterfact(model, tok, r, None, None))
            per_record[r["case_id"]]["final"] = m
    final_score_s = time.perf_counter() - t
    if method == "rlsedit":
        extra["rls_inverse_symmetry"] = float((kwargs["cache_c"] - kwargs["cache_c"].transpose(-1, -2)).abs().max())
    return {
        "side": "authors",
        "method": method,
        "repo": (folder / "REF_REPO").read_text().strip(),
        "commit": (folder / "REF_COMMIT").read_text().strip(),
        "layers": list(hparams.layers),
        "batch_size": bs,
        "n_edits": len(records),
        "early_stop": bool(spec.get("early_stop", True)),
        "batches": batches,
        "pre_edit_s": pre_edit_s,
        "final_score_s": final_score_s,
        "per_record": [per_record[r["case_id"]] for r in records],
        "stats_check": stats_check,
        "extra": extra,
        "hparams": {k: v for k, v in vars(hparams).items()},
        "context_templates": templates,
        "threads": torch.get_num_threads(),
        "peak_rss_mb": rr.peak_rss_mb(),
        "total_wall": time.perf_counter() - t_start,
        "versions": {k: v for k, v in rr.versions().items() if k != "reference_commit"},
    }


def timed(fn, totals, key):
    """``fn`` with its wall time added to ``totals[key]``."""

    def wrapper(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            totals[key] += time.perf_counter() - t

    return wrapper


def serve(run, whose, log=False):
    """A runner's command line: ``--spec`` (a run's JSON) in, ``run(spec, quiet)``'s result JSON to ``--out``;
    ``whose``: the code run, for the help text; ``log``: configure logging first."""
    ap = argparse.ArgumentParser(description=f"Run/time {whose} (see the module docstring).")
    ap.add_argument("--spec", required=True, help="JSON file of a run")
    ap.add_argument("--out", required=True, help="write the result JSON here")
    ap.add_argument("--verbose", action="store_true", help=f"keep {whose}'s own prints")
    args = ap.parse_args()
    if log:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    spec = json.loads(rr.resolve(args.spec).read_text())
    out = rr.resolve(args.out)
    res = run(spec, quiet=not args.verbose)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1, default=str) + "\n")


def main() -> None:
    serve(run_spec, "the authors' code")


if __name__ == "__main__":
    main()
