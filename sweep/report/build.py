"""One report: read the sweep, write every section, remove stale files; the command line."""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .files import write_csv, write_text
from .lifelong import forgetting_section, health_section
from .runs import check_store, curves_frame, fetch_trials, find_sweep, resolve_tracking_uri, trials_frame
from .schema import DEFAULT_EXPERIMENT, HPARAM_FILES, SECTION_FILES, ReportError, Section, Sweep
from .sections import (
    batch_section,
    curves_section,
    hparam_section,
    layer_search_section,
    report_markdown,
    sequential_section,
    swept_hparams,
    timings_section,
)

log = logging.getLogger(__name__)


def build_report(client: Any, sweep: Sweep, out: Path) -> tuple[dict[str, Path], list[str]]:
    """Read the sweep's trials and write every section into ``out``; returns (paths by file name, best-layer lines)."""
    runs = fetch_trials(client, sweep)
    if not runs:
        raise ReportError(f"sweep {sweep.name!r} (parent run {sweep.parent_run_id}) has no trial runs")
    trials = trials_frame(runs)
    log.info("sweep %s: %d trials (parent run %s)", sweep.name, len(trials), sweep.parent_run_id)
    paths: dict[str, Path] = {"runs.csv": write_csv(out / "runs.csv", trials)}
    finished = trials[trials["status"] == "FINISHED"]
    if len(finished) < len(trials):
        statuses = trials.loc[trials["status"] != "FINISHED", "status"].value_counts().to_dict()
        log.warning("%d trials not FINISHED are left out of the sections: %s", len(trials) - len(finished), statuses)
    finished_runs = [r for r in runs if r.info.status == "FINISHED"]

    layer_sec, best = layer_search_section(finished, out)
    sections: dict[str, Section | None] = {
        "layer_search": layer_sec,
        "batch": batch_section(finished, out),
        "sequential": sequential_section(finished, out),
        "timings": timings_section(finished, out),
        "curves": curves_section(curves := curves_frame(client, finished_runs, finished), out),
        "forgetting": forgetting_section(curves, out),
        "health": health_section(finished, curves, out),
    }
    for col in swept_hparams(finished):
        sec = hparam_section(finished, col, out)
        if sec is not None:
            sections[sec.name] = sec
    for name, sec in sections.items():
        if sec is None:
            log.info("%s: no trials for this section, skipped", name)
    written = [sec for sec in sections.values() if sec is not None]
    for sec in written:
        paths.update(sec.paths)
    # Every report file this run did not write is left from an earlier report of another shape: remove it.
    current = {*paths, "report.md"}
    for pattern in (*(f for files in SECTION_FILES.values() for f in files), *HPARAM_FILES):
        for stale in out.glob(pattern):
            if stale.name not in current:
                log.info("removing %s from an earlier report", stale)
                stale.unlink()
    best_lines = [
        f"{alg}: layer {layer} (S {s:.2f}{'' if series == alg else f'; {series}'})"
        for alg, (layer, s, series) in best.items()
    ]
    paths["report.md"] = write_text(out / "report.md", report_markdown(sweep, len(trials), written, best_lines))
    return paths, best_lines


# ----------------------------------------------------------------------------------------------------
# CLI


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    ap = argparse.ArgumentParser(
        prog="python -m sweep.report", description="Tables and figures of one sweep, read from MLflow."
    )
    pick = ap.add_mutually_exclusive_group()
    pick.add_argument("--sweep", help="sweep name (tag sweep.name); the latest parent run with it (default: latest)")
    pick.add_argument("--parent-run-id", help="the sweep's parent run id")
    ap.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="MLflow experiment (default: %(default)s)")
    ap.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db")
    ap.add_argument("--out", help="output folder (default: reports/<sweep name>)")
    ap.add_argument("--quiet", action="store_true", help="warnings only")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    """Write the report of one sweep; prints the output folder and the best layers; returns the written paths.

    Raises ``ReportError`` when the store, the sweep or its trials are missing.
    """
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(asctime)s %(name)s: %(message)s"
    )
    from mlflow.tracking import MlflowClient  # slow import, kept out of module import

    uri = resolve_tracking_uri(args.tracking_uri)
    check_store(uri)
    client = MlflowClient(tracking_uri=uri)
    sweep = find_sweep(client, args.experiment, args.sweep, args.parent_run_id)
    out = Path(args.out) if args.out else Path("reports") / re.sub(r"[^\w.-]+", "_", sweep.name)
    paths, best_lines = build_report(client, sweep, out)
    print(f"report: {out} ({len(paths)} files)")
    for line in best_lines:
        print(f"best layer {line}")
    return paths


def cli() -> int:
    """``python -m sweep.report``: exit 2 with one line on a ReportError."""
    try:
        main()
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
