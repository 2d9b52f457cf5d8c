"""How a sweep's cost grows with the number of facts: wall time by stage, and its work against its unique work.

    python -m sweep.launch --config sweep/configs/smollm2-scale.yaml --local ...   # the three sweeps (header)
    python -m bench.scale --tracking-uri sqlite:///$PWD/mlflow.db --write-results

For each sweep (``smollm2-scale-64``, ``-256``, ``smollm2-scale`` with 1,024 facts) it reads the launcher's
summary (pre-pass counters and seconds per kind of task, summed over workers) and the trials' MLflow
runs (keys + solve = the edits, scoring, and each trial's own work counters), and checks that the
sweep's work equals its unique work: one statistics pass, one target value and one pre-edit score per
fact, and none of either inside a trial.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

BEGIN, END = "<!-- bench:scale:begin -->", "<!-- bench:scale:end -->"
SWEEPS = ("smollm2-scale-64", "smollm2-scale-256", "smollm2-scale")


def summary_of(storage: Path, name: str) -> dict[str, Any]:
    files = sorted(storage.glob(f"{name}-*-summary.json"), key=lambda p: p.stat().st_mtime)
    files = [f for f in files if f.name.count("-") == name.count("-") + 2]  # not smollm2-scale-64's
    if not files:
        raise SystemExit(f"error: no summary of sweep {name} under {storage}")
    return json.loads(files[-1].read_text())


def row(uri: str, storage: Path, name: str) -> dict[str, Any]:
    from sweep.report import fetch_trials, find_sweep, trials_frame
    from sweep.tune.tracking import client

    s = summary_of(storage, name)
    c = client(uri)
    runs = fetch_trials(c, find_sweep(c, "model-editing", name, None))
    df = trials_frame(runs)
    m = {
        k: [r.data.metrics.get(k, 0.0) for r in runs]
        for k in (
            "time.keys",
            "time.solve",
            "time.values",
            "time.score",
            "time.total",
            "work.values_optimised",
            "work.scores_computed",
            "work.stats_computed",
        )
    }
    w = s["work"]
    n = int(df["n_edits"].iloc[0])
    return {
        "sweep": name,
        "facts": n,
        "trials": len(runs),
        "wall_s": s["wall_s"],
        "prepass_s": w["fulfil_s"],
        "stats_task_s": w["stats_s"],
        "values_task_s": w["values_s"],
        "scores_task_s": w["scores_s"],
        "edits_s": sum(m["time.keys"]) + sum(m["time.solve"]) + sum(m["time.values"]),
        "score_s": sum(m["time.score"]),
        "trials_s": sum(m["time.total"]),
        "values_optimised": w["values_optimised"],
        "scores_computed": w["scores_computed"],
        "stats_passes": w["stats_passes"],
        "in_trials": int(
            sum(m["work.values_optimised"]) + sum(m["work.scores_computed"]) + sum(m["work.stats_computed"])
        ),
    }


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| facts | trials | wall | shared work | statistics | values | pre-edit scores | edits (Σ trials) | "
        "scoring (Σ trials) | values / scores / passes computed | computed inside trials |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        n = r["facts"]
        lines.append(
            f"| {n} | {r['trials']} | {r['wall_s'] / 60:.1f} min | {r['prepass_s']:.0f} s "
            f"| {r['stats_task_s']:.0f} s | "
            f"{r['values_task_s']:.0f} s ({r['values_task_s'] / n:.2f} s/fact) | {r['scores_task_s']:.0f} s "
            f"({r['scores_task_s'] / n:.3f} s/fact) | {r['edits_s']:.0f} s | {r['score_s']:.0f} s "
            f"({r['score_s'] / (n * r['trials']):.3f} s/fact) | {r['values_optimised']} / {r['scores_computed']} / "
            f"{r['stats_passes']} | {r['in_trials']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n\n")[0])
    ap.add_argument("--tracking-uri", required=True)
    ap.add_argument("--storage", default=".cache/ray_results", help="the sweeps' Tune storage (summaries)")
    ap.add_argument("--sweeps", default=",".join(SWEEPS), help="comma-separated sweep names")
    ap.add_argument("--write-results", action="store_true")
    args = ap.parse_args(argv)
    rows = [row(args.tracking_uri, Path(args.storage), name) for name in args.sweeps.split(",")]
    from bench.run import publish

    publish(table(rows), rows, "bench/out/scale.json", BEGIN, END, args.write_results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
