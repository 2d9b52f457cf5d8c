"""One report: read the sweep, write every section, remove stale files; the command line."""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from .files import write_csv, write_text
from .lifelong import collapse_section, forgetting_section, health_section
from .probes import probes_section
from .protocols import protocols_section
from .repeats import PerRecordLoader, paired_section, repeats_section
from .runs import (
    check_store,
    curves_frame,
    fetch_per_record,
    fetch_search,
    fetch_trials,
    find_sweep,
    resolve_tracking_uri,
    trials_frame,
)
from .schema import (
    DATASET,
    DATASET_TITLES,
    DEFAULT_EXPERIMENT,
    HPARAM_FILES,
    PHASE,
    REPEAT,
    SECTION_FILES,
    ReportError,
    SearchSpec,
    Section,
    Sweep,
    dataset_order,
    dataset_title,
)
from .search import search_section
from .sections import (
    batch_section,
    curves_section,
    hparam_section,
    layer_search_section,
    metric_glossary,
    report_markdown,
    sequential_section,
    swept_hparams,
    timings_section,
)

log = logging.getLogger(__name__)


Best = dict[str, tuple[int, float, str]]


@dataclass(frozen=True)
class Study:
    """What the study sections (search, repeats, paired) read besides the trials: the parent run's
    search (None: not a searched sweep) and a loader of the trials' per-fact scores."""

    search: SearchSpec | None
    per_record: PerRecordLoader


def _no_per_record(run_ids: Sequence[str]) -> dict[str, pd.DataFrame]:
    """A loader that has no per-fact scores (the paired comparisons are skipped)."""
    return {}


def _folder(dataset: str) -> str:
    """A dataset's subfolder name."""
    return re.sub(r"[^\w.-]+", "_", dataset)


def _dataset_sections(
    trials: pd.DataFrame, curves: pd.DataFrame, out: Path, dataset: str
) -> tuple[dict[str, Section | None], Best]:
    """The sections of one dataset's finished trials (labels on ``dataset``), written into ``out``;
    returns them by name and the best layer per method."""
    layer_sec, best = layer_search_section(trials, out, dataset)
    sections: dict[str, Section | None] = {
        "layer_search": layer_sec,
        "batch": batch_section(trials, out, dataset),
        "sequential": sequential_section(trials, out, dataset),
        "timings": timings_section(trials, out),
        "curves": curves_section(curves, out, dataset),
        "forgetting": forgetting_section(curves, out, dataset),
        "health": health_section(trials, curves, out),
        "collapse": collapse_section(trials, curves, out),
    }
    for col in swept_hparams(trials):
        sec = hparam_section(trials, col, out, dataset)
        if sec is not None:
            sections[sec.name] = sec
    return sections, best


def _study_sections(trials: pd.DataFrame, out: Path, dataset: str, study: Study) -> dict[str, Section | None]:
    """The sections of a study's design, on one dataset's trials of every status (each picks its own):
    the search, the cells' repeats and the paired comparisons; absent from a sweep without them."""
    return {
        "search": search_section(trials, study.search, out),
        "repeats": repeats_section(trials, out, dataset),
        "paired": paired_section(trials, study.per_record, out, dataset),
    }


def _cross_sections(trials: pd.DataFrame, curves: pd.DataFrame, out: Path) -> dict[str, Section | None]:
    """The sections that compare per dataset in one table and figure: protocols and probes."""
    return {"protocols": protocols_section(trials, out), "probes": probes_section(trials, curves, out)}


def _written(sections: dict[str, Section | None]) -> list[Section]:
    """The sections written (the skipped ones logged)."""
    for name, sec in sections.items():
        if sec is None:
            log.info("%s: no trials for this section, skipped", name)
    return [sec for sec in sections.values() if sec is not None]


def _remove_stale(out: Path, current: set[str]) -> None:
    """Remove every report file in ``out`` not in ``current``: left from an earlier report of another shape."""
    for pattern in (*(f for files in SECTION_FILES.values() for f in files), *HPARAM_FILES):
        for stale in out.glob(pattern):
            if stale.name not in current:
                log.info("removing %s from an earlier report", stale)
                stale.unlink()


def _remove_dataset_folders(out: Path, keep: Sequence[str]) -> None:
    """Remove the report files of the dataset subfolders not in ``keep`` (an earlier report of a sweep
    over other datasets), and each folder left empty."""
    for folder in (out / _folder(d) for d in DATASET_TITLES):
        if folder.name in keep or not folder.is_dir():
            continue
        _remove_stale(folder, set())
        if not any(folder.iterdir()):
            folder.rmdir()


def _best_lines(best: Best, dataset: str | None = None) -> list[str]:
    """The best layer of each method in words ("memit: layer 2 (S 90.00)"; "memit (ZsRE): ..." with a dataset)."""
    where = f" ({dataset_title(dataset)})" if dataset else ""
    return [
        f"{alg}{where}: layer {layer} (S {s:.2f}{'' if series == alg else f'; {series}'})"
        for alg, (layer, s, series) in best.items()
    ]


def _report_folder(
    sweep: Sweep, trials: pd.DataFrame, curves: pd.DataFrame, out: Path, dataset: str, cross: bool, study: Study
) -> tuple[dict[str, Path], Best]:
    """One dataset's report in ``out``: its runs.csv, the study's sections, the others (and the cross-dataset
    ones when ``cross``: a sweep of one dataset), report.md; stale files removed. Returns the paths by file
    name and the best layers."""
    paths = {"runs.csv": write_csv(out / "runs.csv", trials)}
    finished = _reported(trials)
    curves = curves[curves["run_id"].isin(finished["run_id"])]
    paper, best = _dataset_sections(finished, curves, out, dataset)
    sections = {**_study_sections(trials, out, dataset, study), **paper}
    if cross:
        sections.update(_cross_sections(finished, curves, out))
    written = _written(sections)
    for sec in written:
        paths.update(sec.paths)
    _remove_stale(out, {*paths, "report.md"})
    text = report_markdown(sweep, len(trials), written, _best_lines(best), dataset, metric_glossary(finished, dataset))
    paths["report.md"] = write_text(out / "report.md", text)
    return paths, best


def _finished(trials: pd.DataFrame) -> pd.DataFrame:
    """The FINISHED trials (the only ones in the sections but the search)."""
    return trials[trials["status"] == "FINISHED"]


def _reported(trials: pd.DataFrame) -> pd.DataFrame:
    """The FINISHED trials of every section but the search: a search's dev trials (``phase`` = search, each a
    configuration a search tried) are left to the search section."""
    finished = _finished(trials)
    if PHASE in finished.columns:
        finished = finished[finished[PHASE] != "search"]
    return finished


def _top_report(
    sweep: Sweep, trials: pd.DataFrame, curves: pd.DataFrame, out: Path, best: dict[str, Best]
) -> dict[str, Path]:
    """The top folder of a sweep over several datasets: runs.csv, the cross-dataset sections, report.md
    linking each dataset's report."""
    paths = {"runs.csv": write_csv(out / "runs.csv", trials)}
    finished = _reported(trials)
    written = _written(_cross_sections(finished, curves, out))
    for sec in written:
        paths.update(sec.paths)
    _remove_stale(out, {*paths, "report.md"})
    counts = trials[DATASET].value_counts()
    links = [
        f"- [{dataset_title(d)}]({_folder(d)}/report.md): {counts[d]} trials, every section on its own"
        for d in dataset_order(trials[DATASET])
    ]
    preamble = [
        "## Datasets",
        "",
        "Each dataset's numbers are reported apart (ES/PS/NS/S mean different things on each); the tables",
        "and figures below name the dataset of every row, panel and line.",
        "",
        *links,
        "",
    ]
    lines = [line for d, b in best.items() for line in _best_lines(b, d)]
    paths["report.md"] = write_text(
        out / "report.md", report_markdown(sweep, len(trials), written, lines, None, preamble)
    )
    return paths


def build_report(client: Any, sweep: Sweep, out: Path) -> tuple[dict[str, Path], list[str]]:
    """Read the sweep's trials and write every section into ``out``; returns (paths by file name, relative
    to ``out``, and best-layer lines).

    A sweep over one dataset writes every section into ``out``; over several, each dataset's sections go
    into ``out/<dataset>/`` (its own report.md) and ``out`` holds the cross-dataset sections (protocols,
    probes) and a report.md linking the datasets' reports. A study's sections (search, repeats, paired
    comparisons) come first where the sweep has them; the others leave a search's dev trials out.
    """
    runs = fetch_trials(client, sweep)
    if not runs:
        raise ReportError(f"sweep {sweep.name!r} (parent run {sweep.parent_run_id}) has no trial runs")
    trials = trials_frame(runs)
    log.info("sweep %s: %d trials (parent run %s)", sweep.name, len(trials), sweep.parent_run_id)
    finished = _finished(trials)
    if len(finished) < len(trials):
        statuses = trials.loc[trials["status"] != "FINISHED", "status"].value_counts().to_dict()
        log.warning("%d trials not FINISHED are left out of the sections: %s", len(trials) - len(finished), statuses)
    reported = set(_reported(trials)["run_id"])
    curves = curves_frame(client, [r for r in runs if r.info.run_id in reported], finished)
    study = _study(client, sweep, trials)
    datasets = dataset_order(trials[DATASET])
    if len(datasets) == 1:
        _remove_dataset_folders(out, ())
        paths, best = _report_folder(sweep, trials, curves, out, datasets[0], cross=True, study=study)
        return paths, _best_lines(best)
    log.info("sweep %s: %d datasets (%s), one subfolder each", sweep.name, len(datasets), ", ".join(datasets))
    paths, bests = {}, {}
    for d in datasets:
        sub, folder = trials[trials[DATASET] == d], _folder(d)
        got, bests[d] = _report_folder(sweep, sub, curves, out / folder, d, cross=False, study=study)
        paths.update({f"{folder}/{name}": p for name, p in got.items()})
    _remove_dataset_folders(out, [_folder(d) for d in datasets])
    paths.update(_top_report(sweep, trials, curves, out, bests))
    return paths, [line for d, b in bests.items() for line in _best_lines(b, d)]


def _study(client: Any, sweep: Sweep, trials: pd.DataFrame) -> Study:
    """The parent's search (read only when some trial is in a search phase) and a per-fact score loader
    from MLflow (used only by a sweep with repeat params)."""
    searched = PHASE in trials.columns and (trials[PHASE] == "search").any()
    search = fetch_search(client, sweep) if searched else None
    if REPEAT not in trials.columns:
        return Study(search, _no_per_record)
    return Study(search, lambda run_ids: fetch_per_record(client, run_ids))


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
