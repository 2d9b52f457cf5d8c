"""The paper's sections (layer search, batch, sequential, hyperparameters), timings, curves, and
``report.md``."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from ..evals.registry import CORE, NAMES, STAGES, label, metric
from .aggregate import aggregate_series, present, stage_metric
from .figures import series_colors, series_figure
from .files import markdown_table, write_csv, write_figure, write_text
from .schema import (
    DEFAULT_DATASET,
    EXTRA_COLUMNS,
    HPARAM_DIMS,
    MEMORY,
    PROTOCOL_WORDS,
    SEQUENTIAL_MODES,
    SETTINGS,
    TIME_STAGES,
    TIMINGS,
    UPDATE_NORM,
    Section,
    Sweep,
    dataset_title,
    setting_columns,
)

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------
# Sections


def _write_table(out: Path, stem: str, table: pd.DataFrame, section: Section) -> None:
    """``<stem>.csv`` and ``<stem>.md``."""
    section.paths[f"{stem}.csv"] = write_csv(out / f"{stem}.csv", table)
    section.paths[f"{stem}.md"] = write_text(out / f"{stem}.md", markdown_table(table))
    section.table = table


def _panels(core: Sequence[str], dataset: str) -> list[tuple[str, list[tuple[str, str]]]]:
    """One panel per ``<stage>.<metric>`` column, titled with the metric's label on ``dataset``."""
    return [(label(c.split(".")[1], dataset), [(c, "-")]) for c in core]


def _stage_panels(core: Sequence[str], dataset: str) -> list[tuple[str, list[tuple[str, str]]]]:
    """One panel per core metric: at edit solid, final dashed (the columns of ``core`` there are)."""
    panels = []
    for m in CORE:
        lines = [(c, style) for c, style in ((f"at_edit.{m}", "-"), (f"final.{m}", "--")) if c in core]
        if lines:
            panels.append((label(m, dataset), lines))
    return panels


def layer_search_section(
    trials: pd.DataFrame, out: Path, dataset: str = DEFAULT_DATASET
) -> tuple[Section | None, dict[str, tuple[int, float, str]]]:
    """Paper Fig. 1: S/ES/PS/NS at edit vs layer, batch mode at batch size 1; returns the best layer per algorithm.

    ``dataset`` names the trials' benchmark (their metrics' labels, :func:`sweep.evals.registry.label`)."""
    sec = Section("layer_search", "Layer search (batch mode, batch size 1, at edit)")
    batch = trials[(trials["mode"] == "batch") & trials["batch_size"].notna() & trials["layer"].notna()]
    picked = []
    for alg, sub in batch.groupby("method"):
        bs = 1 if (sub["batch_size"] == 1).any() else int(sub["batch_size"].min())
        if bs != 1:
            note = f"{alg}: no batch-size-1 trials, layer search uses batch size {bs}"
            log.info("layer_search: %s", note)
            sec.notes.append(note)
        picked.append(sub[sub["batch_size"] == bs])
    if not picked:
        return None, {}
    sel = pd.concat(picked)
    sizes = sorted({int(b) for b in sel["batch_size"]})
    sec.title = f"Layer search (batch mode, batch size {'/'.join(map(str, sizes))}, at edit)"
    if sel["layer"].nunique() < 2:  # one layer (a batch or λ sweep's batch-size-1 trials) is no layer search
        return None, {}
    core = [c for m in ("s", *CORE[:3]) if (c := stage_metric(sel, m, ("at_edit", "final")))]  # S first
    if not core:
        log.info("layer_search: the batch-mode trials have no at_edit metrics")
        return None, {}
    metrics = [*core, *(c for c in present(sel, EXTRA_COLUMNS) if c not in core)]
    table = aggregate_series(sel, "layer", metrics, "layer_search")
    table.insert(
        table.columns.get_loc("layer") + 1,
        "batch_size",
        sel.groupby("method")["batch_size"].min().reindex(table["method"]).to_numpy(),
    )
    _write_table(out, "layer_search", table, sec)
    fig = series_figure(table, "layer", _panels(core, dataset), sec.title, log2=False)
    sec.paths["fig_layer_search.png"] = write_figure(out / "fig_layer_search.png", fig)
    best: dict[str, tuple[int, float, str]] = {}
    s_col = core[0] if core[0].endswith(".s") else None
    if s_col is not None:
        for alg, sub in table.groupby("method", sort=False):
            row = sub.loc[sub[s_col].idxmax()]
            best[str(alg)] = (int(row["layer"]), float(row[s_col]), str(row["series"]))
    return sec, best


def batch_section(trials: pd.DataFrame, out: Path, dataset: str = DEFAULT_DATASET) -> Section | None:
    """Paper Figs. 2-3: batch mode, ES/PS/NS/S vs batch size (log2), at edit (= final in batch mode)."""
    sec = Section("batch", "Batch editing (batch mode)")
    sel = trials[(trials["mode"] == "batch") & trials["batch_size"].notna()]
    core = [c for m in CORE if (c := stage_metric(sel, m, ("at_edit", "final")))]
    if sel.empty or not core:
        return None
    metrics = [*core, *(c for c in present(sel, EXTRA_COLUMNS) if c not in core)]
    table = aggregate_series(sel, "batch_size", metrics, "batch", keep_main_layers=True)
    if table.groupby("series")["batch_size"].nunique().max() < 2:  # no line, e.g. a λ sweep at one batch size
        log.info("batch: no setting has two batch sizes (%s)", ", ".join(map(str, table["batch_size"].unique())))
        return None
    _write_table(out, "batch", table, sec)
    fig = series_figure(table, "batch_size", _panels(core, dataset), sec.title, log2=True)
    sec.paths["fig_batch.png"] = write_figure(out / "fig_batch.png", fig)
    return sec


def sequential_section(trials: pd.DataFrame, out: Path, dataset: str = DEFAULT_DATASET) -> Section | None:
    """Paper Figs. 4-5: sequential-batch / sequential modes, at edit (solid) and final (dashed) vs batch size."""
    sec = Section("sequential", "Sequential-batch editing (at edit solid, final dashed)")
    sel = trials[trials["mode"].isin(SEQUENTIAL_MODES) & trials["batch_size"].notna()]
    core = present(sel, [f"{st}.{m}" for m in CORE for st in ("at_edit", "final")])
    if sel.empty or not core:
        return None
    metrics = [*core, *(c for c in present(sel, EXTRA_COLUMNS) if c not in core)]
    table = aggregate_series(sel, "batch_size", metrics, "sequential", keep_main_layers=True)
    _write_table(out, "sequential", table, sec)
    fig = series_figure(table, "batch_size", _stage_panels(core, dataset), sec.title, log2=True)
    sec.paths["fig_sequential.png"] = write_figure(out / "fig_sequential.png", fig)
    return sec


def swept_hparams(trials: pd.DataFrame) -> list[str]:
    """The numeric ``hp.*`` and ``stats.*`` columns that take two or more values within one (algorithm,
    hparams preset).

    A value that differs only between algorithms or presets (MEMIT's λ vs EMMET's) is not a sweep.
    """
    found = []
    for col in setting_columns(trials):
        vals = pd.to_numeric(trials[col], errors="coerce")
        if vals.notna().sum() < 2:
            continue
        sub = trials.assign(_v=vals)[vals.notna()]
        if (sub.groupby(["method", "hparams"], dropna=False)["_v"].nunique() >= 2).any():
            found.append(col)
    return found


def hparam_section(trials: pd.DataFrame, col: str, out: Path, dataset: str = DEFAULT_DATASET) -> Section | None:
    """arXiv 2405.00664 App. A.1 (Tables 3-4): ES/PS/NS/S and perplexity vs one swept ``hp.*`` (e.g. λ).

    One line per algorithm and setting (mode, batch size, layers, other hyperparameters) that has two or
    more values of ``col``; one-off settings are left out. At edit solid; in sequential modes also final
    (dashed). Writes ``hparam_<name>.csv``/``.md`` and ``fig_hparam_<name>.png``.
    """
    name = col.removeprefix("hp.")
    stem = "hparam_" + re.sub(r"[^\w.-]+", "_", name)
    sec = Section(stem, f"{name} sweep")
    sel = trials.assign(**{col: pd.to_numeric(trials[col], errors="coerce")})
    sel = sel[sel[col].notna()]
    others = [c for c in sel.columns if c.startswith(SETTINGS) and c != col]
    keys = ["method", *(d for d in HPARAM_DIMS if d in sel.columns), *others]
    setting = sel[keys].map(str).agg("|".join, axis=1)  # map: NaN as text (astype keeps NA)
    sel = sel[sel.groupby(setting)[col].transform("nunique") >= 2]
    stages = ("at_edit", "final") if sel["mode"].isin(SEQUENTIAL_MODES).any() else ("at_edit",)
    sec.title += " (at edit solid, final dashed)" if len(stages) == 2 else " (at edit)"
    core = present(sel, [f"{st}.{m}" for m in CORE for st in stages])
    if sel.empty or not core:
        return None
    metrics = [*core, *(c for c in present(sel, EXTRA_COLUMNS) if c not in core)]
    dims = [d for d in ("mode", "batch_size") if d in sel.columns]
    table = aggregate_series(sel, col, metrics, sec.name, extra_dims=dims)
    _write_table(out, stem, table, sec)
    panels = _stage_panels(core, dataset)
    if "final.ppl" in metrics:
        panels.append(("held-out perplexity (after editing)", [("final.ppl", "-")]))
    if UPDATE_NORM in metrics:
        panels.append(("update norm ‖Δ‖ (mean per batch)", [(UPDATE_NORM, "-")]))
    fig = series_figure(table, col, panels, sec.title, log2=False, hparam_axis=True)
    sec.paths[f"fig_{stem}.png"] = write_figure(out / f"fig_{stem}.png", fig)
    return sec


def _trial_labels(df: pd.DataFrame) -> list[str]:
    """Readable, unique trial names: 'memit L1 B16 batch', with the trial key (or run id) where names repeat."""
    names = [
        f"{r.algorithm} L{r.layers.strip('[]').replace(' ', '') if isinstance(r.layers, str) else r.layer}"
        f" B{r.batch_size} {r.mode}"
        for r in df.itertuples(index=False)
    ]
    counts = pd.Series(names).value_counts()
    keys = [k if isinstance(k, str) and k else rid[:8] for k, rid in zip(df["trial.key"], df["run_id"])]
    return [f"{n} [{k}]" if counts[n] > 1 else n for n, k in zip(names, keys)]


def timings_section(trials: pd.DataFrame, out: Path) -> Section | None:
    """time.* stages per trial (stacked bars) and peak memory."""
    sec = Section("timings", "Timings per trial (seconds)")
    stages = present(trials, TIME_STAGES)
    if not stages and "time.total" not in trials.columns:
        return None
    cols = present(trials, (*TIMINGS, *MEMORY))
    sel = trials[trials[cols].notna().any(axis=1)]
    if sel.empty:
        return None
    table = sel[["run_id", "trial.key", "method", "layers", "batch_size", "mode", "n_edits"]].copy()
    table.insert(0, "trial", _trial_labels(sel))
    for c in cols:
        table[c] = sel[c].to_numpy()
    if stages and "time.total" in cols:
        rest = table["time.total"] - table[stages].fillna(0).sum(axis=1)
        table.insert(table.columns.get_loc("time.total"), "time.other", rest.clip(lower=0))
        stages = [*stages, "time.other"]
    _write_table(out, "timings", table, sec)
    bars = stages or ["time.total"]
    fig = Figure(figsize=(10, min(60.0, 1.5 + 0.3 * len(table))), layout="constrained")
    ax = fig.subplots()
    y = list(range(len(table)))
    left = pd.Series(0.0, index=table.index)
    colors = series_colors(bars)
    for c in bars:
        vals = table[c].fillna(0.0)
        ax.barh(y, vals, left=left, color=colors[c], label=c.removeprefix("time."))
        left = left + vals
    ax.set_yticks(y, table["trial"], fontsize="small")
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.set_title(sec.title)
    fig.legend(loc="outside lower center", ncol=len(bars), fontsize="small")
    ax.grid(axis="x", alpha=0.3)
    sec.paths["fig_timings.png"] = write_figure(out / "fig_timings.png", fig)
    return sec


def _curve_title(key: str, dataset: str) -> str:
    """A curve's panel title: its key, with the metric's label on ``dataset`` when it is a declared one."""
    name = key.removeprefix("curve.")
    m = name.removeprefix("at_edit_").removeprefix("batch_")
    return f"{name}: {label(m, dataset)}" if m != name and metric(m, dataset) is not None else name


def curves_section(curves: pd.DataFrame, out: Path, dataset: str = DEFAULT_DATASET) -> Section | None:
    """The per-batch curves of the sequential trials: S at edit and the update norm vs edits applied."""
    sec = Section("curves", "Sequential editing curves (vs edits applied)")
    seq = curves[curves["mode"].isin(SEQUENTIAL_MODES)]
    if seq.empty:
        return None
    sec.paths["curves.csv"] = write_csv(out / "curves.csv", seq)
    keys = [k for k in ("curve.at_edit_s", "curve.update_norm") if (seq["key"] == k).any()]
    if not keys:
        keys = list(dict.fromkeys(seq["key"]))[:2]
    fig = Figure(figsize=(6 * len(keys), 4.5), layout="constrained")
    fig.suptitle(sec.title)
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    runs = list(dict.fromkeys(seq["run_id"]))
    algs = list(dict.fromkeys(seq["method"]))
    colors = series_colors(algs, algs)
    styles = ("-", "--", ":", "-.")
    for ax, key in zip(axes, keys):
        d = seq[seq["key"] == key]
        for i, rid in enumerate(runs):
            r = d[d["run_id"] == rid].sort_values("step")
            if r.empty:
                continue
            alg, bs = r["method"].iloc[0], r["batch_size"].iloc[0]
            marker = "o" if len(r) <= 4 else None  # a one-batch run is a single point: show it
            ax.plot(
                r["step"], r["value"], styles[i % len(styles)], color=colors[alg], marker=marker, label=f"{alg} B{bs}"
            )
        positive = d["value"][d["value"] > 0]
        if key == "curve.update_norm" and len(positive) and positive.max() / positive.min() > 100:
            ax.set_yscale("log")  # norms of a collapsing run are orders of magnitude above the rest
        ax.set_title(_curve_title(key, dataset))
        ax.set_xlabel("edits applied")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles and len(labels) <= 16:
        axes[0].legend(fontsize="small")
    sec.paths["fig_curves.png"] = write_figure(out / "fig_curves.png", fig)
    return sec


def metric_glossary(trials: pd.DataFrame, dataset: str) -> list[str]:
    """Markdown lines: what each stage metric the trials have means on ``dataset`` (label, protocol, meaning),
    so a number is never read under another benchmark's or protocol's meaning."""
    names = [n for n in NAMES if any(f"{st}.{n}" in trials and trials[f"{st}.{n}"].notna().any() for st in STAGES)]
    decl = [(n, m) for n in names if (m := metric(n, dataset)) is not None]
    if not decl:
        return []
    table = pd.DataFrame(
        {
            "metric": [n for n, _ in decl],
            "label": [m.label for _, m in decl],
            "protocol": [PROTOCOL_WORDS.get(m.protocol, m.protocol) for _, m in decl],
            "meaning": [m.meaning for _, m in decl],
        }
    )
    return [f"## Metrics on {dataset_title(dataset)}", "", markdown_table(table)]


def report_markdown(
    sweep: Sweep,
    n_trials: int,
    sections: Sequence[Section],
    best_lines: Sequence[str],
    dataset: str | None = None,
    preamble: Sequence[str] = (),
) -> str:
    """``report.md``: the sweep (and its benchmark, when ``dataset`` is given), ``preamble`` (the metrics'
    meanings, or the links to each dataset's report), the best layers, then every section's table and figure."""
    title = f"# Sweep {sweep.name}" + (f": {dataset_title(dataset)}" if dataset else "")
    lines = [
        title,
        "",
        f"- parent run: `{sweep.parent_run_id}` (experiment {sweep.experiment_id})",
        f"- sweep id: `{sweep.sweep_id}`" if sweep.sweep_id else "- sweep id: (none)",
        f"- trials: {n_trials} (`runs.csv`)",
        *([f"- dataset: {dataset_title(dataset)} (`{dataset}`)"] if dataset else []),
        "",
        *preamble,
    ]
    if best_lines:
        lines += ["## Best layer (max S, layer search)", "", *(f"- {b}" for b in best_lines), ""]
    for sec in sections:
        lines += [f"## {sec.title}", ""]
        if sec.notes:  # one quoted paragraph per note, apart from the figure
            lines += ["\n>\n".join(f"> {n}" for n in sec.notes), ""]
        figs = [p for p in sec.paths if p.endswith(".png")]
        lines += [f"![{sec.name}]({p})" for p in figs]
        lines += [""]
        if sec.table is not None:
            lines += [markdown_table(sec.table)]
    return "\n".join(lines) + "\n"
