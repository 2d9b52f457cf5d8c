"""How many corpus tokens C needs: edit metrics against the tokens in C, and what ``stats.tolerance`` picks.

    python -m sweep.launch --config sweep/configs/smollm2-stats-tokens.yaml --local      # the sweep
    python -m bench.stats_convergence --tracking-uri sqlite:///$PWD/mlflow.db --write-results

1. From the MLflow runs of the ``smollm2-stats-tokens`` sweep (MEMIT and EMMET at batch 64 and 256, C from
   5k tokens to all of the local Wikipedia): ES/PS/NS/S and the update norm against the tokens in C.
2. One statistics pass of the same layer over the whole corpus with the convergence check on and a
   tolerance too small to stop it, so its history is the relative change of (C + εI)⁻¹P (held-out probe
   keys P) at every check; the token count each tolerance would stop at follows from it.

Writes ``bench/out/stats_convergence.json`` and, with ``--write-results``, the table of bench/RESULTS.md
between its ``bench:convergence:begin/end`` markers.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("bench.stats_convergence")

TOLERANCES = (0.2, 0.1, 0.05, 0.02, 0.01)
BEGIN, END = "<!-- bench:convergence:begin -->", "<!-- bench:convergence:end -->"


def sweep_rows(uri: str, sweep: str) -> list[dict[str, Any]]:
    """One row per trial of ``sweep``: algorithm, B, max_tokens, final ES/PS/NS/S, mean update norm."""
    from sweep.report import fetch_trials, find_sweep
    from sweep.tune.tracking import client

    c = client(uri)
    sw = find_sweep(c, "model-editing", sweep, None)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for r in fetch_trials(c, sw):
            if r.info.status != "FINISHED":
                continue
            res = json.loads(Path(c.download_artifacts(r.info.run_id, "trial.json", d)).read_text())
            m = res["metrics"]["final"]
            norms = res["update_norms"]["per_batch"]
            rows.append(
                {
                    "algorithm": res["config"]["algorithm"],
                    "batch_size": res["config"]["batch_size"],
                    "max_tokens": res["config"]["stats"]["max_tokens"],
                    "stats_tokens": (res.get("stats_tokens") or {}).get("2"),
                    **{k: m[k] for k in ("es", "ps", "ns", "s")},
                    "ppl": m.get("ppl"),
                    "update_norm": sum(norms) / len(norms),
                }
            )
    return rows


def convergence_history(layer: int, tokens: int | None) -> dict[str, Any]:
    """The convergence check's history over the whole corpus (a tolerance that never stops it)."""
    from editors import load_model, spec_for
    from editors.corpus import EMBEDDED_WIKI, CorpusSpec, iter_texts
    from editors.stats import collect_second_moments

    model, tok = load_model(None, device="cpu")
    t = time.perf_counter()
    out = collect_second_moments(
        model,
        tok,
        spec_for(model),
        [layer],
        iter_texts(CorpusSpec(EMBEDDED_WIKI)),
        max_tokens=tokens,
        tolerance=1e-12,
        progress=False,
    )[layer]
    picks = {}
    for tol in TOLERANCES:
        hit = next((n for n, ch in out.history if ch < tol), None)
        picks[str(tol)] = hit
    return {"tokens": out.n_tokens, "seconds": time.perf_counter() - t, "history": out.history, "picks": picks}


def table(rows: list[dict[str, Any]], conv: dict[str, Any]) -> str:
    total = conv["tokens"]
    lines = [
        "| algorithm | B | tokens in C | ES | PS | NS | S | perplexity | mean ‖ΔW‖ |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    key = lambda r: (r["algorithm"], r["batch_size"], r["max_tokens"] or 10**12)  # noqa: E731
    for r in sorted(rows, key=key):
        n = r["stats_tokens"] or r["max_tokens"] or total
        lines.append(
            f"| {r['algorithm']} | {r['batch_size']} | {n:,}{'' if r['max_tokens'] else ' (all)'} | {r['es']:.1f} | "
            f"{r['ps']:.1f} | {r['ns']:.1f} | {r['s']:.2f} | {r['ppl'] or float('nan'):.1f} | {r['update_norm']:.2f} |"
        )
    lines += ["", "| tolerance | stops at (tokens) | share of the corpus |", "|---:|---:|---:|"]
    for tol, n in conv["picks"].items():
        lines.append(f"| {tol} | {n:,} | {n / total:.1%} |" if n else f"| {tol} | not reached | – |")
    lines += ["", "Relative change of (C + εI)⁻¹P between checks (tokens: change):", ""]
    lines.append(", ".join(f"{n:,}: {ch:.3f}" for n, ch in conv["history"]))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.stats_convergence", description=__doc__.split("\n\n")[0])
    ap.add_argument("--tracking-uri", required=True)
    ap.add_argument("--sweep", default="smollm2-stats-tokens")
    ap.add_argument("--layer", type=int, default=2)
    ap.add_argument("--out", default="bench/out/stats_convergence.json")
    ap.add_argument("--write-results", action="store_true")
    ap.add_argument("--history", help="reuse a convergence_history() JSON instead of recomputing it")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    rows = sweep_rows(args.tracking_uri, args.sweep)
    conv = json.loads(Path(args.history).read_text()) if args.history else convergence_history(args.layer, None)
    from bench.run import publish

    publish(table(rows, conv), {"rows": rows, "convergence": conv}, args.out, BEGIN, END, args.write_results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
