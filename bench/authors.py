"""Side by side with the AUTHORS' code: AlphaEdit, SPHERE, RLSEdit and ENCORE, sequential-batch editing.

    bash bench/reference/build.sh                                  # once: the venv, SmolLM2 as an HF folder
    python3 bench/reference/patch_authors.py --mirror-root DIR     # once: the authors' code, patched for the CPU
    python -m bench.authors [--methods alphaedit,sphere,rlsedit,encore] [--write-results]

For each method, both sides run in fresh processes, one after the other, on the same records with the same
protocol: the first ``--n`` CounterFact records (``bench.run.rome_records``), sequential-batch editing in
batches of ``--batch`` at ``--layer`` of SmolLM2-135M (fp32, CPU, ``--threads``), the value optimisation a fixed
``--steps`` with the 5e-2 loss stop off on both sides, this project's C (our statistics cache, converted by
``bench/reference/stats_to_npz.py``) and our context templates handed to the authors' code, the hyperparameters
of our ``smollm2-135m`` presets mapped field by field (:data:`HP_MAP`).

Per record: ES/PS/NS right after its batch ("at edit") and after the last batch ("final"), scored on our side
by ``sweep.evals.metrics.score_records`` and on theirs by the unified reference's
``compute_rewrite_quality_counterfact`` (the NLL comparisons; ``bench.run`` shows the two agree). Per batch:
‖ΔW‖_F and seconds (keys, values, the rest). Our side uses only the public API: ``editors.run_schedule`` with
a callback that scores each batch, the statistics from the sweep's cache.

The methods (:data:`METHODS`): ours ``algorithm`` + settings vs the authors' code:

- ``alphaedit``: ``alphaedit`` vs jianghoucheng/AlphaEdit;
- ``sphere``: ``alphaedit`` with ``beta_hse`` 0.5, ``sphere_alpha`` 0.5 vs PlusLabNLP/SPHERE (``beta_hse``/``alpha``);
- ``rlsedit``: ``rlsedit`` (``rls_memory`` true, ``rls_target`` delta) vs Euphoria040201/RLSEdit with the returned
  C passed back as ``cache_c`` (their driver does not, see ``run_authors.py``);
- ``encore``: ``encore`` with MPES (``mpes_hits`` 2) vs scalable-model-editing/knowledge-editing-regularization
  with ``prob_cutoff`` -2 (MPES on both sides);
- ``encore-nompes``: the same without MPES on either side (``mpes_hits`` 0, ``prob_cutoff`` 0).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .run import OUT, REF_MODEL, REF_PY, ROOT, machine_info, peak_rss_mb, rome_records, stats_npz, write_results
from .run import trial_config as run_trial_config

RUNNER = ROOT / "bench" / "reference" / "run_authors.py"
BEGIN, END = "<!-- bench:authors:begin -->", "<!-- bench:authors:end -->"
METRICS = ("es", "ps", "ns")

# method -> (our algorithm, our hp overrides, the authors' extra spec keys)
METHODS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "alphaedit": ("alphaedit", {}, {}),
    "sphere": ("alphaedit", {"beta_hse": 0.5, "sphere_alpha": 0.5}, {"sphere": {"beta_hse": 0.5, "alpha": 0.5}}),
    "rlsedit": ("rlsedit", {"rls_memory": True, "rls_target": "delta"}, {}),
    "encore": ("encore", {}, {}),
    "encore-nompes": ("encore", {"mpes_hits": 0}, {}),
}
DEFAULT_METHODS = ("alphaedit", "sphere", "rlsedit", "encore")
# The authors' code each method runs (run_authors.py's METHODS key).
AUTHORS_METHOD = {"encore-nompes": "encore"}

# Our hyperparameter -> the authors' field, per algorithm (the value optimisation is shared by all).
SHARED_HP = {
    "v_num_grad_steps": "v_num_grad_steps",
    "v_lr": "v_lr",
    "v_loss_layer": "v_loss_layer",
    "v_weight_decay": "v_weight_decay",
    "clamp_norm_factor": "clamp_norm_factor",
    "kl_factor": "kl_factor",
    "mom2_dtype": "mom2_dtype",
}
HP_MAP: dict[str, dict[str, str]] = {
    "alphaedit": {"nullspace_threshold": "nullspace_threshold", "L2": "L2"},
    "rlsedit": {"mom2_update_weight": "mom2_update_weight", "lambda_reg": "lambda_reg", "mu_reg": "mu_reg"},
    "encore": {
        "mom2_update_weight": "mom2_update_weight",
        "add_prev_edits": "add_prev_edits",
        "update_norm_lambda": "update_norm_lambda",
        "mpes_hits": "prob_cutoff",  # n hits <-> prob_cutoff = -n (0: off)
    },
}

log = logging.getLogger("bench.authors")


def authors_hparams(algorithm: str, hp: dict[str, Any]) -> dict[str, Any]:
    """The authors' hparams overrides from our resolved hyperparameters (``v_loss_layer`` None is left to the
    runner: the last block)."""
    out: dict[str, Any] = {}
    for ours, theirs in {**SHARED_HP, **HP_MAP[algorithm]}.items():
        v = hp[ours]
        if ours == "mpes_hits":
            v = -int(v)
        if v is not None:
            out[theirs] = v
    return out


# ----------------------------------------------------------------------------------------------------
# Our side (a fresh process: ``python -m bench.authors --side ours --spec ... --out ...``)


def trial_config(spec: dict[str, Any]) -> dict[str, Any]:
    """The sweep.trial configuration whose statistics and records our side uses (``bench.run``'s, in
    sequential-batch mode)."""
    return run_trial_config(spec, mode="sequential-batch")


def run_ours(spec: dict[str, Any]) -> dict[str, Any]:
    """One method on our side: ``editors.run_schedule`` (sequential-batch) with a scoring callback."""
    import torch

    from editors import BatchEvent, TemplateCache, run_schedule
    from editors.stats import StatsStore
    from sweep.config import SweepConfig, parse_config, trial_key
    from sweep.evals.metrics import score_records
    from sweep.shared.fulfil import fulfil_local
    from sweep.shared.keys import model_identity, stats_keys
    from sweep.shared.mirror import prepare
    from sweep.shared.needs import plan_shared
    from sweep.stages import load_for_trial, load_records, versions

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    cfg = parse_config(trial_config(spec))
    hp = cfg.edit_hparams
    records = load_records(cfg)
    model, tok, mspec, _ = load_for_trial(cfg, hp, None, None)
    # Statistics: the sweep's cache (computed once if missing), as a trial gets them.
    sweep = SweepConfig(name="authors", share_values=False, scores_store=None)  # type: ignore[arg-type]
    prepare(sweep, [cfg])
    key = trial_key(cfg)
    inputs, _ = fulfil_local(plan_shared(sweep, [cfg], [key]), sweep, model, tok, False)
    stats = inputs[key].stats
    skey = stats_keys(cfg, [spec["layer"]], model_identity(cfg.model))[spec["layer"]]
    stats_file = StatsStore(cfg.stats.store).path(skey)
    templates = TemplateCache().get(model, tok, hp.context_templates, hp.template_seed)

    per_record: dict[int, dict[str, Any]] = {}
    batches: list[dict[str, Any]] = []
    mark = [time.perf_counter()]

    def callback(ev: BatchEvent) -> None:
        edit_s = time.perf_counter() - mark[0]
        info = ev.result.info
        t = time.perf_counter()
        recs = records[ev.index * spec["batch_size"] : ev.index * spec["batch_size"] + len(ev.requests)]
        for s in score_records(model, tok, mspec, recs):
            at_edit = {m: getattr(s, m) for m in METRICS}
            per_record[s.case_id] = {"case_id": s.case_id, "batch": ev.index, "at_edit": at_edit}
        keys, values = info.get("time_keys", 0.0), info.get("time_values", 0.0)
        batches.append(
            {
                "index": ev.index,
                "n": len(ev.requests),
                "edit": edit_s,
                "keys": keys,
                "values": values,
                "solve": edit_s - keys - values,
                "score": time.perf_counter() - t,
                "update_norms": dict(ev.update_norms),
                "update_norm": sum(v * v for v in ev.update_norms.values()) ** 0.5,
                "value_steps": info.get("value_steps"),
            }
        )
        mark[0] = time.perf_counter()

    sched = run_schedule(
        model,
        tok,
        [r.request() for r in records],
        spec["algorithm"],
        hp,
        stats,
        batch_size=spec["batch_size"],
        mode="sequential-batch",
        callback=callback,
        spec=mspec,
        templates=templates,
        restore_at_end=False,
    )
    t = time.perf_counter()
    for s in score_records(model, tok, mspec, records):
        per_record[s.case_id]["final"] = {m: getattr(s, m) for m in METRICS}
    final_score_s = time.perf_counter() - t
    sched.restore(model)
    from editors.config import to_dict

    return {
        "side": "ours",
        "algorithm": spec["algorithm"],
        "n_edits": len(records),
        "batch_size": spec["batch_size"],
        "batches": batches,
        "final_score_s": final_score_s,
        "per_record": [per_record[r.case_id] for r in records],
        "hparams": to_dict(hp),
        "templates": [list(g) for g in templates],
        "stats_file": str(stats_file) if stats_file.is_file() else None,
        "peak_rss_mb": peak_rss_mb(),
        "versions": versions(model_identity(cfg.model)),
    }


# ----------------------------------------------------------------------------------------------------
# Comparison and the table (pure)


def per_edit(side: dict[str, Any], key: str = "edit") -> float:
    """Seconds per edit of ``key`` over every batch."""
    n = sum(b["n"] for b in side["batches"])
    return sum(b[key] for b in side["batches"]) / n


def compare(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, Any]:
    """Records whose ES/PS/NS differ (at edit, final), and the largest relative ‖ΔW‖_F difference per batch."""
    by = {r["case_id"]: r for r in theirs["per_record"]}
    out: dict[str, Any] = {"records": 0}
    for stage in ("at_edit", "final"):
        out[stage] = {m: [] for m in METRICS}
    for o in ours["per_record"]:
        t = by.get(o["case_id"])
        if t is None:
            continue
        out["records"] += 1
        for stage in ("at_edit", "final"):
            for m in METRICS:
                a, b = o[stage][m], t[stage][m]
                if a is None or b is None or abs(a - b) > 1e-9:
                    out[stage][m].append(o["case_id"])
    rel = []
    for bo, bt in zip(ours["batches"], theirs["batches"], strict=False):
        rel.append(abs(bo["update_norm"] - bt["update_norm"]) / max(bt["update_norm"], 1e-30))
    out["norm_rel_diff"] = rel
    out["norm_rel_max"] = max(rel) if rel else float("nan")
    return out


def mean_pct(side: dict[str, Any], stage: str, m: str) -> float:
    xs = [r[stage][m] for r in side["per_record"] if r[stage][m] is not None]
    return 100 * sum(xs) / len(xs) if xs else float("nan")


STAGES = ("keys", "values", "solve")  # the per-edit split of an edit, where both sides timed it


def fmt_comparison(results: dict[str, Any], other: str, label: str, command: str) -> str:
    """One side-by-side table: ours against ``results["methods"][name][other]`` (the authors' code, EasyEdit).

    Per method: seconds per edit on both sides and their ratio, the keys/values/solve split where both sides
    timed it, the records whose ES/PS/NS differ at edit and final, each batch's ‖ΔW‖_F on both sides and the
    largest relative difference, and the mean final ES/PS/NS. A method that did not run gets its error's
    last line. ``label`` names the other side in the header; ``command`` is the command that wrote it.
    """
    m = results["machine"]
    load = f" (load average {m['load']:.1f} at the end)" if "load" in m else ""
    threads = f"{m['threads']} torch thread{'s' if m['threads'] != 1 else ''} per side"
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, {threads}{load}; torch {m['torch']}; ours: transformers "
        f"{m['transformers']}; {label}: transformers {m.get(f'{other}_transformers', '?')}. {results['n']} "
        f"CounterFact records, sequential-batch in batches of {results['batch']}, layer {results['layer']}, "
        f"{results['steps']} value steps (5e-2 loss stop off). Generated by `{command}` on {results['date']}.",
        "",
        f"| method | {label} | s/edit ours | s/edit {label} | ratio | keys / values / solve s/edit, ours ; "
        f"{label} | records differing at edit (ES/PS/NS) | final (ES/PS/NS) | ‖ΔW‖_F per batch ours / {label} | "
        f"max rel. ‖ΔW‖ diff | ES/PS/NS final ours | ES/PS/NS final {label} |",
        "|---|---|---:|---:|---:|---|---|---|---|---:|---|---|",
    ]
    for name, e in results["methods"].items():
        src = e.get("source", "")
        if e.get("error") or not e.get("ours") or not e.get(other):
            why = (e.get("error") or "not run").strip().splitlines()
            lines.append(f"| {name} | {src} | | | | | not run: {why[-1][:160] if why else ''} | | | | | |")
            continue
        o, t, d = e["ours"], e[other], e["diff"]
        so, st = per_edit(o), per_edit(t)
        stages = [k for k in STAGES if all(k in b for b in o["batches"] + t["batches"])]
        split = " ; ".join(" / ".join(f"{per_edit(side, k):.3f}" for k in stages) for side in (o, t))
        cnt = {
            stage: "/".join(str(len(d[stage][mm])) for mm in METRICS) + f" of {d['records']}"
            for stage in ("at_edit", "final")
        }
        means = [" / ".join(f"{mean_pct(side, 'final', mm):.0f}" for mm in METRICS) for side in (o, t)]
        norms = ", ".join(
            f"{bo['update_norm']:.3g} / {bt['update_norm']:.3g}"
            for bo, bt in zip(o["batches"], t["batches"], strict=False)
        )
        lines.append(
            f"| {name} | {src} | {so:.2f} | {st:.2f} | **{st / so:.1f}x** | {split or '-'} | {cnt['at_edit']} | "
            f"{cnt['final']} | {norms} | {d['norm_rel_max']:.1e} | {means[0]} | {means[1]} |"
        )
    notes = [e["note"] for e in results["methods"].values() if e.get("note")]
    if notes:
        lines += [""] + [f"- {x}" for x in notes]
    return "\n".join(lines) + "\n"


def fmt_table(results: dict[str, Any]) -> str:
    """The section of bench/RESULTS.md between the ``bench:authors`` markers."""
    return fmt_comparison(results, "authors", "authors' code", "python -m bench.authors")


def merge_results(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One results dict from runs of single methods (the first one's header; their settings must agree)."""
    out = dict(parts[0], methods={})
    for p in parts:
        if any(p[k] != out[k] for k in ("n", "batch", "layer", "steps")):
            raise SystemExit("--from-json: the runs differ in --n/--batch/--layer/--steps; merge like with like")
        out["machine"] = {**p["machine"], **out["machine"]}
        out["methods"].update(p["methods"])
    return out


# ----------------------------------------------------------------------------------------------------
# The driver


def subprocess_json(cmd: list[str], out: Path, env: dict[str, str]) -> dict[str, Any]:
    out.unlink(missing_ok=True)
    t = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if p.returncode != 0 or not out.exists():
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {p.returncode}):\n{(p.stdout + p.stderr)[-3000:]}")
    res = json.loads(out.read_text())
    res["wall_s"] = time.perf_counter() - t
    return res


def ours_spec(algorithm: str, hp: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The spec of our side (and of its trial configuration) from the command line's protocol."""
    return {
        "algorithm": algorithm,
        "hp": hp,
        "layer": args.layer,
        "steps": args.steps,
        "n_edits": args.n,
        "batch_size": args.batch,
        "threads": args.threads,
    }


def run_ours_side(tag: str, spec: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    """Our side of one method in a fresh process (``bench/out/<tag>.ours.{spec.json,json}``); it must hand
    over its statistics file."""
    sp = OUT / f"{tag}.ours.spec.json"
    sp.write_text(json.dumps(spec))
    log.info("%s: ours", tag)
    ours_out = OUT / f"{tag}.ours.json"
    cmd = [sys.executable, "-m", "bench.authors", "--side", "ours", "--spec", str(sp), "--out", str(ours_out)]
    o = subprocess_json(cmd, ours_out, env)
    log.info("%s: ours %.2f s/edit", tag, per_edit(o))
    if not o.get("stats_file"):
        raise RuntimeError("our side wrote no statistics file to hand over")
    return o


def results_header(args: argparse.Namespace) -> dict[str, Any]:
    """A results dict before any method ran: the date, the protocol's settings and the machine."""

    return {
        "date": time.strftime("%Y-%m-%d"),
        "n": args.n,
        "batch": args.batch,
        "layer": args.layer,
        "steps": args.steps,
        "machine": machine_info(args.threads),
        "methods": {},
    }


def run_method(name: str, args: argparse.Namespace, records: Path, env: dict[str, str]) -> dict[str, Any]:
    algorithm, hp, extra = METHODS[name]
    o = run_ours_side(f"authors.{name}", ours_spec(algorithm, hp, args), env)
    entry: dict[str, Any] = {"ours": o}
    theirs = AUTHORS_METHOD.get(name, name)
    aspec = {
        "method": theirs,
        "model_dir": str(REF_MODEL),
        "layers": [args.layer],
        "hparams": authors_hparams(algorithm, o["hparams"]),
        "early_stop": False,
        "context_templates": o["templates"],
        "records": str(records),
        "n_records": args.n,
        "batch_size": args.batch,
        "stats": str(stats_npz(Path(o["stats_file"]))),
        "threads": args.threads,
        **extra,
    }
    asp = OUT / f"authors.{name}.authors.spec.json"
    asp.write_text(json.dumps(aspec))
    log.info("%s: authors' code", name)
    a_out = OUT / f"authors.{name}.authors.json"
    cmd = [str(REF_PY), str(RUNNER), "--spec", str(asp), "--out", str(a_out)]
    entry["authors"] = t = subprocess_json(cmd, a_out, env)
    entry["source"] = f"{t['repo']} @ {t['commit'][:7]}"
    entry["diff"] = compare(o, t)
    log.info("%s: authors %.2f s/edit; differing %s", name, per_edit(t), entry["diff"])
    return entry


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    ap.add_argument("--n", type=int, default=20, help="CounterFact records (the first ones)")
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--layer", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10, help="fixed value steps (loss stop off on both sides)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write-results", action="store_true", help="replace the bench:authors section of RESULTS.md")
    ap.add_argument("--json", default=str(OUT / "authors.json"), help="where the results JSON goes")
    ap.add_argument("--from-json", help="only rebuild the table from results JSON(s), comma-separated (merged)")
    ap.add_argument("--side", choices=["ours"], help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.side:
        res = run_ours(json.loads(Path(args.spec).read_text()))
        Path(args.out).write_text(json.dumps(res, default=str))
        return 0
    if args.from_json:  # one results JSON, or several (comma-separated) whose methods are merged
        table = fmt_table(merge_results([json.loads(Path(p).read_text()) for p in args.from_json.split(",")]))
        print(table)
        if args.write_results:
            write_results(table, BEGIN, END)
        return 0
    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise SystemExit(f"error: --methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    missing = [str(p.relative_to(ROOT)) for p in (REF_PY, REF_MODEL, RUNNER) if not p.exists()]
    if missing:
        raise SystemExit(f"error: {', '.join(missing)} missing: run bash bench/reference/build.sh")
    OUT.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    results = results_header(args)
    records = rome_records(args.n)
    for name in names:
        try:
            entry = run_method(name, args, records, env)
            results["machine"]["authors_transformers"] = entry["authors"]["versions"].get("transformers", "?")
        except Exception as e:  # a method that cannot run says why in its row
            log.error("%s: %s", name, e)
            entry = {"error": f"{type(e).__name__}: {e}"}
        results["methods"][name] = entry
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    table = fmt_table(results)
    Path(args.json).with_suffix(".md").write_text(table)
    print(table)
    if args.write_results:
        write_results(table, BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
