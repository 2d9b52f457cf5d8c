"""The repeats and paired-comparison sections: how far a cell's numbers move between repeats, and whether
one method beats another on the same facts beyond that noise.

Runs with the same param ``cell`` are repeats of one configuration (the trial config without its seeds
and edit order; param ``repeat`` numbers them). Both sections read the runs a study reports: the
held-out phase's (``phase`` = heldout, a search's best configurations on the held-out facts) when the
sweep has them, else the grid's; never the search's dev trials.

- ``repeats``: each cell's mean ± 95% Student-t interval of the final S/ES/PS/NS over its repeats
  (:func:`.significance.mean_ci`; one repeat: no interval, and the table says so).
- ``paired``: for each pair of cells of two methods under the same conditions (dataset, model, facts,
  mode, batch size; the methods' own settings differ) and the same repeats, the per-fact scores of both
  (their ``per_record.csv``, joined on ``case_id``), merged over the repeats: a paired bootstrap over facts
  of ES/PS/NS/S (:func:`.significance.paired_bootstrap`, a fact's repeats drawn together) and the exact
  sign test on per-fact efficacy (each fact's ES averaged over the repeats; ties dropped), each pair said
  in words (:func:`.significance.compare_in_words`).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..colors import method_color
from ..evals.registry import label
from .aggregate import stage_metric
from .files import markdown_table, write_csv, write_figure, write_text
from .schema import CELL, DATASET, DEFAULT_DATASET, PHASE, REPEAT, SETTINGS, Section
from .search import method_order
from .significance import (
    PAIRED_METRICS,
    PARTS,
    beyond_noise,
    compare_in_words,
    mean_ci,
    paired_bootstrap,
    sign_test_scores,
)

log = logging.getLogger(__name__)

#: the metrics of the repeats table, S first
REPEAT_METRICS = ("s", "es", "ps", "ns")
#: what makes two cells of different methods comparable on the same facts: everything but the method's
#: own settings (``hp.*``, ``stats.*``, the hparams preset; in a grid the layers are a condition too)
CONDITIONS = (
    PHASE,
    DATASET,
    "dataset.target",
    "scoring.generated",
    "scoring.gen_context",
    "model",
    "n_edits",
    "mode",
    "batch_size",
)
#: settings named in a cell's label when they vary between cells
LABEL_DIMS = (*CONDITIONS[1:], "hparams", "layers")
#: the paired sentences given in report.md (the rest are in paired.md)
MAX_NOTES = 24

#: loads each run's per_record.csv by run id (:func:`.runs.fetch_per_record`)
PerRecordLoader = Callable[[Sequence[str]], dict[str, pd.DataFrame]]


def reported_trials(trials: pd.DataFrame) -> tuple[pd.DataFrame, str | None]:
    """The FINISHED runs a study reports with repeats, and their phase: the held-out phase when the sweep
    has one, else the grid (or every run of a sweep with cells but no phase); empty for a sweep without
    cells (logged before repeats existed)."""
    if CELL not in trials.columns:
        return trials.iloc[0:0], None
    done = trials[(trials["status"] == "FINISHED") & trials[CELL].notna()]
    if REPEAT in done.columns:  # a run without the param is its cell's first repeat
        done = done.assign(**{REPEAT: done[REPEAT].fillna(0)})
    if PHASE not in done.columns:
        return done, None
    for phase in ("heldout", "grid"):
        sel = done[done[PHASE] == phase]
        if not sel.empty:
            return sel, phase
    return done.iloc[0:0], None


def _value(v: Any) -> str:
    """A setting in a label."""
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return format(v, "g") if isinstance(v, float) else str(v)


def cell_labels(sel: pd.DataFrame) -> dict[str, str]:
    """A readable name per cell: its method, the conditions and layers that vary between cells, and the
    ``hp.*``/``stats.*`` settings that vary between the cells of its method ("memit, batch_size=16,
    hp.mom2_update_weight=300")."""
    first = sel.drop_duplicates(CELL).set_index(CELL)
    shared = [c for c in LABEL_DIMS if c in first.columns and first[c].map(str).nunique() > 1]
    names = {}
    for cell, row in first.iterrows():
        mine = first[first["method"] == row["method"]]
        own = [
            c for c in sorted(first.columns) if c.startswith(SETTINGS) and c in mine and mine[c].map(str).nunique() > 1
        ]
        parts = [f"{c}={_value(row[c])}" for c in (*shared, *own) if not pd.isna(row[c])]
        names[str(cell)] = ", ".join([str(row["method"]), *parts])
    counts = pd.Series(list(names.values())).value_counts()
    return {c: (n if counts[n] == 1 else f"{n} [{c[:8]}]") for c, n in names.items()}


def _stage_cols(sel: pd.DataFrame) -> dict[str, str]:
    """Each repeats metric's column: its final value, else at edit (a batch-mode run's are equal)."""
    return {m: c for m in REPEAT_METRICS if (c := stage_metric(sel, m, ("final", "at_edit")))}


def _cell_order(sel: pd.DataFrame, labels: dict[str, str]) -> list[str]:
    """Cells in method order, then by label."""
    methods = method_order(sel["method"])
    first = sel.drop_duplicates(CELL)
    return sorted(
        (str(c) for c in first[CELL]),
        key=lambda c: (methods.index(first.loc[first[CELL] == c, "method"].iloc[0]), labels[c]),
    )


def repeats_table(sel: pd.DataFrame) -> pd.DataFrame:
    """One row per cell: method, its label, the cell id, the number of repeats and, per metric, the mean
    and the 95% interval's bounds (empty for a single repeat)."""
    labels = cell_labels(sel)
    cols = _stage_cols(sel)
    rows = []
    for cell in _cell_order(sel, labels):
        runs = sel[sel[CELL] == cell]
        row: dict[str, Any] = {"method": runs["method"].iloc[0], "setting": labels[cell], CELL: cell}
        row["repeats"] = int(runs[REPEAT].nunique()) if REPEAT in runs.columns else len(runs)
        row["runs"] = len(runs)
        for col in cols.values():
            if runs[col].notna().any():
                ci = mean_ci(runs[col])
                row.update({f"{col} mean": ci.mean, f"{col} low": ci.low, f"{col} high": ci.high})
        rows.append(row)
    return pd.DataFrame(rows)


def _compact(table: pd.DataFrame, cols: dict[str, str]) -> pd.DataFrame:
    """The markdown's columns: the setting, the repeats and each metric as "mean ± half-width"."""
    out = table[["setting", "repeats"]].copy()
    for col in cols.values():
        if f"{col} mean" not in table.columns:
            continue
        half = (table[f"{col} high"] - table[f"{col} low"]) / 2
        out[col] = [f"{mu:.2f}" if pd.isna(h) else f"{mu:.2f} ± {h:.2f}" for mu, h in zip(table[f"{col} mean"], half)]
    return out


def repeats_figure(table: pd.DataFrame, cols: dict[str, str], dataset: str, title: str) -> Figure:
    """One panel per metric: each cell's mean with its 95% interval, in its method's colour."""
    panels = [(m, c) for m, c in cols.items() if f"{c} mean" in table.columns]
    ncols = 2 if len(panels) > 1 else 1
    nrows = (len(panels) + ncols - 1) // ncols
    width = max(5.5, 0.7 * len(table) + 2.5)
    fig = Figure(figsize=(width * ncols, 3.8 * nrows), layout="constrained")
    fig.suptitle(title)
    grid = list(fig.subplots(nrows, ncols, squeeze=False).flat)
    for ax in grid[len(panels) :]:
        ax.remove()
    xs = np.arange(len(table))
    for ax, (m, col) in zip(grid, panels):
        mean = table[f"{col} mean"].astype(float)
        err = ((table[f"{col} high"] - table[f"{col} low"]) / 2).astype(float).fillna(0.0)
        for x, mu, e, method in zip(xs, mean, err, table["method"]):
            ax.errorbar([x], [mu], yerr=[e], fmt="o", capsize=4, color=method_color(str(method)))
        tilt = len(table) > 3
        ax.set_xticks(xs, list(table["setting"]), rotation=20 if tilt else 0, ha="right" if tilt else "center")
        ax.set_xlim(-0.5, len(table) - 0.5)
        ax.set_title(f"{col}: {label(m, dataset)}")
        ax.grid(axis="y", alpha=0.3)
    return fig


def _phase_words(phase: str | None) -> str:
    """The reported phase in a title."""
    return {"heldout": "held-out facts", "grid": "grid"}.get(phase or "", "every run")


def repeats_section(trials: pd.DataFrame, out: Path, dataset: str = DEFAULT_DATASET) -> Section | None:
    """``repeats.csv``/``.md`` and ``fig_repeats.png``: each cell's mean and 95% interval over its repeats;
    None when no cell has two or more runs (or the sweep has no cells)."""
    sel, phase = reported_trials(trials)
    if sel.empty or sel.groupby(CELL).size().max() < 2:
        return None
    cols = _stage_cols(sel)
    if not cols:
        log.info("repeats: the runs have no final or at-edit ES/PS/NS/S")
        return None
    table = repeats_table(sel)
    sec = Section("repeats", f"Repeats: mean ± 95% CI per cell ({_phase_words(phase)})")
    compact = _compact(table, cols)
    sec.paths["repeats.csv"] = write_csv(out / "repeats.csv", table)
    sec.paths["repeats.md"] = write_text(out / "repeats.md", f"# {sec.title}\n\n{markdown_table(compact)}")
    sec.paths["fig_repeats.png"] = write_figure(
        out / "fig_repeats.png", repeats_figure(table, cols, dataset, sec.title)
    )
    sec.table = compact
    single = int((table["runs"] < 2).sum())
    sec.notes.append(
        "Intervals: mean ± t(0.975, n − 1) · s / √n over each cell's repeats (Student t, s the sample standard "
        "deviation); they differ only in seeds and edit order."
        + (f" {single} cell(s) have one repeat: a mean without an interval." if single else "")
    )
    return sec


# ----------------------------------------------------------------------------------------------------
# Paired comparisons


def _conditions(sel: pd.DataFrame) -> list[str]:
    """The condition columns the runs have; in a grid also the edited layers (a grid axis pairs memit and
    emmet at the same layer), while held-out runs are each method's best configuration, layers included."""
    conds = [c for c in CONDITIONS if c in sel.columns]
    heldout = PHASE in sel.columns and (sel[PHASE] == "heldout").all()
    return conds if heldout or "layers" not in sel.columns else [*conds, "layers"]


def comparable_pairs(sel: pd.DataFrame) -> list[tuple[str, str, list[tuple[int, str, str]]]]:
    """Each pair of cells of two different methods under the same conditions, with the repeats both have:
    (cell A, cell B, [(repeat, run of A, run of B), ...]); A comes first in method order."""
    conds = _conditions(sel)
    key = sel[conds].map(str).agg("|".join, axis=1) if conds else pd.Series("", index=sel.index)
    methods = method_order(sel["method"])
    pairs = []
    for _, group in sel.groupby(key, sort=False):
        cells = group.drop_duplicates(CELL)
        cells = cells.assign(_o=cells["method"].map(methods.index)).sort_values(["_o", CELL], kind="stable")
        for (ca, ma), (cb, mb) in itertools.combinations(zip(cells[CELL], cells["method"]), 2):
            if ma == mb:
                continue
            runs = []
            ra = group[group[CELL] == ca].drop_duplicates(REPEAT).set_index(REPEAT)["run_id"]
            rb = group[group[CELL] == cb].drop_duplicates(REPEAT).set_index(REPEAT)["run_id"]
            for rep in sorted(set(ra.index) & set(rb.index)):
                runs.append((int(rep), str(ra[rep]), str(rb[rep])))
            if runs:
                pairs.append((str(ca), str(cb), runs))
    return pairs


def _score_stage(frames: Sequence[pd.DataFrame]) -> str | None:
    """The stage whose per-fact ES/PS/NS every frame has: final, else at edit; None if neither."""
    for stage in ("final", "at_edit"):
        if all(all(f"{stage}_{m}" in f.columns for m in PARTS) for f in frames):
            return stage
    return None


def paired_scores(
    runs: Sequence[tuple[int, str, str]], per_record: dict[str, pd.DataFrame]
) -> tuple[pd.DataFrame, str | None]:
    """The per-fact ES/PS/NS of both cells, joined on ``case_id`` per repeat and stacked over the repeats
    (columns ``repeat case_id a_es a_ps a_ns b_es b_ps b_ns``), and the stage they are from; facts missing
    a score in either run are dropped (logged)."""
    have = [(r, a, b) for r, a, b in runs if a in per_record and b in per_record]
    stage = _score_stage([per_record[x] for _, a, b in have for x in (a, b)])
    if not have or stage is None:
        return pd.DataFrame(), None
    cols = [f"{stage}_{m}" for m in PARTS]
    parts = []
    for rep, a, b in have:
        fa = per_record[a][["case_id", *cols]].drop_duplicates("case_id")
        fb = per_record[b][["case_id", *cols]].drop_duplicates("case_id")
        joined = fa.rename(columns={c: f"a_{c.split('_')[-1]}" for c in cols}).merge(
            fb.rename(columns={c: f"b_{c.split('_')[-1]}" for c in cols}), on="case_id"
        )
        if len(joined) < min(len(fa), len(fb)):
            log.info("paired: repeat %d: %d of %d/%d facts in common", rep, len(joined), len(fa), len(fb))
        parts.append(joined.assign(repeat=rep))
    both = pd.concat(parts, ignore_index=True)
    score_cols = [f"{w}_{m}" for w in "ab" for m in PARTS]
    ok = both[score_cols].apply(pd.to_numeric, errors="coerce").notna().all(axis=1)
    if not ok.all():
        log.info("paired: %d paired scores with a missing value dropped", int((~ok).sum()))
    both = both[ok]
    return both[["repeat", "case_id", *score_cols]].astype({c: float for c in score_cols}), stage


def _what(stage: str, m: str) -> str:
    """A metric in a sentence: "final ES", "at edit S"."""
    return f"{'final' if stage == 'final' else 'at edit'} {m.upper()}"


def compare_cells(
    label_a: str, label_b: str, scores: pd.DataFrame, stage: str, n_repeats: int, extra: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """The rows of one pair: per metric the difference A − B with its bootstrap interval and p, the sign
    test on efficacy, and the sentence."""
    a = {m: scores[f"a_{m}"].to_numpy() for m in PARTS}
    b = {m: scores[f"b_{m}"].to_numpy() for m in PARTS}
    groups = scores["case_id"].astype(str).to_numpy()
    diffs = paired_bootstrap(a, b, PAIRED_METRICS, groups=groups)
    sign = sign_test_scores(a["es"], b["es"], groups)
    rows = []
    for m in PAIRED_METRICS:
        d = diffs[m]
        s = sign if m == "es" else None
        row: dict[str, Any] = {"A": label_a, "B": label_b, **(extra or {}), "repeats": n_repeats}
        row.update({"metric": _what(stage, m), "facts": d.n_facts, "A - B": d.diff, "ci low": d.low})
        row.update({"ci high": d.high, "p bootstrap": d.p})
        if s is not None:
            row.update({"wins": s.wins, "losses": s.losses, "ties": s.ties, "p sign": s.p})
        row["beyond noise"] = beyond_noise(d, s)
        row["in words"] = compare_in_words(label_a, label_b, _what(stage, m), d, s)
        rows.append(row)
    return rows


def paired_table(sel: pd.DataFrame, load: PerRecordLoader) -> pd.DataFrame:
    """Every comparable pair's rows (:func:`compare_cells`); the per-fact scores of the runs in a pair are
    loaded once."""
    pairs = comparable_pairs(sel)
    if not pairs:
        return pd.DataFrame()
    labels = cell_labels(sel)
    per_record = load([rid for _, _, runs in pairs for _, a, b in runs for rid in (a, b)])
    conds = [c for c in _conditions(sel) if c != PHASE and sel[c].map(str).nunique() > 1]
    info = sel.drop_duplicates(CELL).set_index(CELL)
    rows = []
    for ca, cb, runs in pairs:
        scores, stage = paired_scores(runs, per_record)
        if stage is None or scores.empty:
            log.info("paired: %s vs %s: no per-fact scores in common, skipped", labels[ca], labels[cb])
            continue
        extra = {c: info.loc[ca, c] for c in conds}
        rows += compare_cells(labels[ca], labels[cb], scores, stage, scores["repeat"].nunique(), extra)
    return pd.DataFrame(rows)


def _paired_compact(table: pd.DataFrame) -> pd.DataFrame:
    """The markdown's columns: the pair, the metric, the difference with its interval, the p values and
    the verdict."""
    out = table[[c for c in table.columns if c not in ("in words", "ci low", "ci high", "wins", "losses", "ties")]]
    out = out.copy()
    out.insert(
        out.columns.get_loc("A - B") + 1,
        "95% CI",
        [f"[{lo:.2f}, {hi:.2f}]" for lo, hi in zip(table["ci low"], table["ci high"])],
    )
    if "wins" in table.columns:
        out.insert(
            out.columns.get_loc("p sign"),
            "sign test (W/L/T)",
            [
                "" if pd.isna(w) else f"{int(w)}/{int(lo)}/{int(t)}"
                for w, lo, t in zip(table["wins"], table["losses"], table["ties"])
            ],
        )
    for col in ("p bootstrap", "p sign"):
        if col in out.columns:
            out[col] = ["" if pd.isna(v) else f"{v:.3g}" for v in out[col]]
    out["beyond noise"] = out["beyond noise"].map({True: "yes", False: "no"})
    return out


def paired_section(
    trials: pd.DataFrame, load: PerRecordLoader, out: Path, dataset: str = DEFAULT_DATASET
) -> Section | None:
    """``paired.csv``/``.md``: each pair of methods on the same facts, by the paired bootstrap and the sign
    test, in words; None for a sweep without repeat params or without two methods under one condition."""
    sel, phase = reported_trials(trials)
    if sel.empty or REPEAT not in sel.columns or sel["method"].nunique() < 2:
        return None
    table = paired_table(sel, load)
    if table.empty:
        return None
    sec = Section("paired", f"Paired comparisons of methods on the same facts ({_phase_words(phase)})")
    words = list(table["in words"])
    sec.paths["paired.csv"] = write_csv(out / "paired.csv", table)
    compact = _paired_compact(table)
    how = (
        "A − B per metric over the same facts, merged over the repeats both ran: paired bootstrap over facts "
        "(2000 resamples, seed 0; a fact's repeats drawn together; S recomputed as the harmonic mean of the "
        "resampled ES, PS, NS means), 95% percentile interval and two-sided p; exact sign test on each fact's "
        "efficacy (averaged over repeats, ties dropped). Beyond noise: the interval excludes 0 (and, for ES, "
        "the sign test agrees at p < 0.05)."
    )
    text = [f"# {sec.title}", "", how, "", *(f"- {w}." for w in words), "", markdown_table(compact)]
    sec.paths["paired.md"] = write_text(out / "paired.md", "\n".join(text))
    sec.table = compact
    sec.notes.append(how)
    headline = [w for w, m in zip(words, table["metric"]) if m.endswith((" S", " ES"))]
    sec.notes += [f"{w}." for w in headline[:MAX_NOTES]]
    if len(headline) > MAX_NOTES:
        sec.notes.append(f"... {len(headline) - MAX_NOTES} more in paired.md.")
    for w in headline:
        log.info("paired: %s", w)
    return sec
