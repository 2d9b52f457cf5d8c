"""The lifelong-editing sections: forgetting curves, the edited model's health with edits-to-collapse, and
the collapse analytics (CP@60 per measure, the retention matrix; :mod:`sweep.evals.collapse`).

Both read the sequential trials' curves (:data:`.schema.FORGET_CURVES`, :data:`.schema.HEALTH_CURVES`,
step = edits applied) and draw one colour per method (:func:`.figures.method_color`), the same in every
figure of a report.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ..colors import method_color
from ..evals.registry import CORE, label
from .files import markdown_table, write_csv, write_figure, write_text
from .schema import (
    COLLAPSED_AT,
    CP_PREFIX,
    DEFAULT_DATASET,
    HEALTH_CURVES,
    METHOD_ORDER,
    RETENTION_PREFIX,
    SEQUENTIAL_MODES,
    Section,
)

log = logging.getLogger(__name__)


def _label(row: pd.Series, several_batch_sizes: bool) -> str:
    """A run's legend entry: its method, with the batch size when the figure has several."""
    return f"{row['method']} B{row['batch_size']}" if several_batch_sizes else str(row["method"])


def _runs(curves: pd.DataFrame, keys: Sequence[str]) -> list[str]:
    """The sequential runs that have any of ``keys``, in method order."""
    sel = curves[curves["mode"].isin(SEQUENTIAL_MODES) & curves["key"].isin(keys)]
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    first = sel.drop_duplicates("run_id")
    first = first.assign(_o=first["method"].map(lambda m: order.get(m, len(order))))
    return list(first.sort_values(["_o", "method", "batch_size"], kind="stable")["run_id"])


def _curve_panels(
    curves: pd.DataFrame,
    runs: Sequence[str],
    panels: Sequence[tuple[str, Sequence[tuple[str, str]], str]],
    title: str,
    log_y: Sequence[str] = (),
) -> Figure:
    """One panel per (title, [(curve key, line style)], y label), a line per run in its method's colour."""
    cols = 2 if len(panels) <= 4 else 3
    rows = (len(panels) + cols - 1) // cols
    fig = Figure(figsize=(5.8 * cols, 4.2 * rows), layout="constrained")
    fig.suptitle(title)
    grid = list(fig.subplots(rows, cols, squeeze=False).flat)
    for ax in grid[len(panels) :]:
        ax.remove()
    info = curves.drop_duplicates("run_id").set_index("run_id")
    several = info.loc[list(runs), "batch_size"].nunique() > 1 if runs else False
    for ax, (name, lines, ylabel) in zip(grid, panels):
        _draw(ax, curves, runs, info, lines, several)
        ax.set_title(name)
        ax.set_xlabel("edits applied")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if any(k in log_y for k, _ in lines):
            ax.set_yscale("log")
    handles, labels = grid[0].get_legend_handles_labels()
    for ax in grid[1 : len(panels)]:  # a method missing from the first panel still gets a legend entry
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncol=min(6, len(labels)), fontsize="small")
    return fig


def _draw(
    ax: Axes,
    curves: pd.DataFrame,
    runs: Sequence[str],
    info: pd.DataFrame,
    lines: Sequence[tuple[str, str]],
    several: bool,
) -> None:
    """Each run's ``lines`` (curve key, line style) on ``ax`` in its method's colour; the solid ones labelled."""
    for rid in runs:
        row = info.loc[rid]
        for key, style in lines:
            d = curves[(curves["run_id"] == rid) & (curves["key"] == key)].sort_values("step")
            if d.empty:
                continue
            label = _label(row, several) if style == "-" else None
            ax.plot(d["step"], d["value"], style, color=method_color(str(row["method"])), marker="o", ms=3, label=label)


def forgetting_section(curves: pd.DataFrame, out: Path, dataset: str = DEFAULT_DATASET) -> Section | None:
    """Forgetting curves: ES/PS/NS/S of every fact edited so far (solid) and of the first batch's facts
    (dashed), re-scored every ``scoring.retention_every`` batches, against the edits applied; panels
    titled with the metrics' labels on ``dataset``."""
    keys = [f"curve.forget_{g}_{m}" for g in ("all", "first") for m in CORE]
    runs = _runs(curves, keys)
    if not runs:
        return None
    curves = _with_first_batch(curves, runs)
    sec = Section("forgetting", "Forgetting: every fact edited so far (solid) and the first batch (dashed)")
    sel = curves[curves["run_id"].isin(runs) & curves["key"].isin(keys)]
    table = (
        sel.assign(metric=sel["key"].str.removeprefix("curve.forget_"))
        .pivot_table(index=["method", "batch_size", "step"], columns="metric", values="value")
        .reset_index()
        .rename(columns={"step": "edits"})
    )
    table.columns.name = None
    sec.paths["forgetting.csv"] = write_csv(out / "forgetting.csv", table)
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    table = table.assign(_o=table["method"].map(lambda m: order.get(m, len(order))))
    table = table.sort_values(["_o", "method", "batch_size", "edits"], kind="stable").drop(columns="_o")
    table = table.reset_index(drop=True)
    last = table.groupby(["method", "batch_size"], sort=False).tail(1)
    summary = last[
        [
            "method",
            "batch_size",
            "edits",
            *(c for c in ("all_es", "all_ps", "all_ns", "all_s", "first_es") if c in last),
        ]
    ]
    sec.paths["forgetting.md"] = write_text(out / "forgetting.md", markdown_table(summary))
    sec.table = summary
    sec.notes.append("Table: the last point of each curve (all facts edited, and the first batch's ES then).")
    what = {"es": "facts edited so far", "ps": "paraphrases", "ns": "unrelated facts kept", "s": "hmean of ES, PS, NS"}
    panels = [
        (
            f"{label(m, dataset)}: {what[m]}",
            [(f"curve.forget_all_{m}", "-"), (f"curve.forget_first_{m}", "--")],
            f"{m.upper()} (%)",
        )
        for m in CORE
    ]
    fig = _curve_panels(curves, runs, panels, sec.title)
    sec.paths["fig_forgetting.png"] = write_figure(out / "fig_forgetting.png", fig)
    return sec


def _with_first_batch(curves: pd.DataFrame, runs: Sequence[str]) -> pd.DataFrame:
    """Each forgetting curve starts at the first batch's own scores right after its edit (its
    ``curve.batch_*`` point): then every fact edited so far is the first batch's."""
    extra = []
    for rid in runs:
        c = curves[curves["run_id"] == rid]
        for m in CORE:
            first = c[c["key"] == f"curve.batch_{m}"].sort_values("step").head(1)
            for g in ("all", "first"):
                key = f"curve.forget_{g}_{m}"
                if len(first) and not ((c["key"] == key) & (c["step"] == first["step"].iloc[0])).any():
                    extra.append(first.assign(key=key))
    return pd.concat([curves, *extra], ignore_index=True) if extra else curves


def health_section(trials: pd.DataFrame, curves: pd.DataFrame, out: Path) -> Section | None:
    """The edited matrix's health against the edits applied (‖W − W₀‖_F, σ_max(W), its condition number,
    held-out perplexity) and a table of edits-to-collapse per method with the final scores."""
    runs = _runs(curves, HEALTH_CURVES)
    if not runs:
        return None
    sec = Section("health", "Health of the edited model and edits to collapse")
    sel = trials[trials["run_id"].isin(runs)]
    rows = []
    for _, t in sel.iterrows():
        c = curves[curves["run_id"] == t["run_id"]]

        def last(key: str, c: pd.DataFrame = c) -> float:
            d = c[c["key"] == key].sort_values("step")
            return float(d["value"].iloc[-1]) if len(d) else float("nan")

        collapsed = t.get(COLLAPSED_AT)
        rows.append(
            {
                "method": t["method"],
                "batch_size": t["batch_size"],
                "n_edits": t["n_edits"],
                "edits_to_collapse": "none" if pd.isna(collapsed) else str(int(collapsed)),
                "drift": last("curve.drift"),
                "sigma_max": last("curve.health_sigma_max"),
                "cond": last("curve.health_cond"),
                "pre.ppl": t.get("pre.ppl"),
                "final.ppl": t.get("final.ppl"),
                **{f"final.{m}": t.get(f"final.{m}") for m in CORE},
                "collapse.reason": t.get("collapse.reason") or "",
            }
        )
    table = pd.DataFrame(rows)
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    table = table.assign(_o=table["method"].map(lambda m: order.get(m, len(order))))
    table = table.sort_values(["_o", "method", "batch_size"], kind="stable").drop(columns="_o").reset_index(drop=True)
    sec.paths["health.csv"] = write_csv(out / "health.csv", table)
    sec.paths["health.md"] = write_text(out / "health.md", markdown_table(table))
    sec.table = table
    sec.notes.append(
        "edits_to_collapse: edits in the model when the collapse guard stopped the trial ('none': it ran to "
        "the end); drift, sigma_max, cond: at the last health point (the largest over the edited matrices)."
    )
    panels = [
        ("‖W − W₀‖_F of the edited matrix", [("curve.drift", "-")], "Frobenius norm"),
        ("Largest singular value σ_max(W)", [("curve.health_sigma_max", "-")], "σ_max"),
        ("Condition number σ_max / σ_min of W", [("curve.health_cond", "-")], "condition number"),
        ("Held-out perplexity", [("curve.health_ppl", "-")], "perplexity (Wikipedia slice)"),
        ("Frobenius norm ‖W‖_F of the edited matrix", [("curve.health_norm", "-")], "‖W‖_F"),
        ("Hyperspherical energy of W's neurons", [("curve.health_he", "-")], "mean 1/‖ŵ_i − ŵ_j‖"),
    ]
    fig = _curve_panels(curves, runs, panels, sec.title, log_y=("curve.health_cond",))
    pre = pd.to_numeric(sel.get("pre.ppl"), errors="coerce").dropna() if "pre.ppl" in sel else pd.Series(dtype=float)
    if len(pre):  # the unedited model's perplexity, for scale
        ax = fig.axes[3]
        ax.axhline(float(pre.iloc[0]), color="0.5", ls=":", lw=1)
        ax.annotate("unedited", (ax.get_xlim()[0], float(pre.iloc[0])), color="0.4", fontsize="small", va="bottom")
    sec.paths["fig_health.png"] = write_figure(out / "fig_health.png", fig)
    return sec


def collapse_section(trials: pd.DataFrame, curves: pd.DataFrame, out: Path) -> Section | None:
    """CP@60 of every measure per sequential run (edits at which it fell below 60% of its start; 'none':
    it never did; '—': not measured) and the retention matrix of each run: every cohort of facts (in edit
    order) re-scored at every forgetting point, efficacy as colour."""
    cp_cols = sorted(c for c in trials.columns if c.startswith(CP_PREFIX))
    runs = _runs(curves, [k for k in curves["key"].unique() if str(k).startswith(RETENTION_PREFIX)])
    seq = trials[trials["mode"].isin(SEQUENTIAL_MODES)] if "mode" in trials else trials.iloc[0:0]
    if not runs and not cp_cols:
        return None
    sec = Section("collapse", "Collapse points and the retention matrix")
    measured = _measured(curves)
    rows = []
    for _, t in seq.iterrows():
        row = {"method": t["method"], "batch_size": t["batch_size"], "n_edits": t["n_edits"]}
        have = measured.get(t["run_id"], set())
        for name in sorted({c.removeprefix(CP_PREFIX) for c in cp_cols} | have):
            v = t.get(CP_PREFIX + name)
            row[f"cp60.{name}"] = str(int(v)) if v is not None and not pd.isna(v) else ("none" if name in have else "—")
        rows.append(row)
    if rows:
        table = pd.DataFrame(rows).fillna("—")
        sec.paths["collapse.csv"] = write_csv(out / "collapse.csv", table)
        sec.paths["collapse.md"] = write_text(out / "collapse.md", markdown_table(headline_collapse(table)))
        sec.table = table
    sec.notes.append(
        "cp60.<measure>: the edits at which the measure first fell below 60% of its start (the NAS paper's CP@60; "
        "for perplexity: rose above its start / 0.6); the start is the unedited model's value where it has one "
        "(perplexity, probes), else the first point. 'none': it never fell that far; '—': not measured. "
        "collapse.md shows the headline measures and the first probe to fall; collapse.csv has every measure."
    )
    if runs:
        sec.paths["fig_retention.png"] = write_figure(out / "fig_retention.png", _retention_figure(curves, runs))
    return sec


#: the measures collapse.md shows (when measured), in this order; every one is in collapse.csv
CP_HEADLINE = ("batch_es", "batch_s", "forget_all_es", "forget_all_s", "forget_first_es", "health_ppl")
#: the probe measure whose earliest collapse collapse.md shows (the likelihood accuracy: readable on a small
#: model, whose generated answers rarely parse)
CP_PROBE = re.compile(r"^cp60\.probe_(\w+?)_lik_acc$")


def headline_collapse(table: pd.DataFrame) -> pd.DataFrame:
    """The collapse table's headline columns (:data:`CP_HEADLINE`) and ``cp60.first_probe``: the fewest
    edits at which any probe task's likelihood accuracy fell below 60% of the unedited model's, with the
    task (``400 (rte)``), or 'none' / '—' as the columns say."""
    keep = ["method", "batch_size", "n_edits"] + [f"cp60.{m}" for m in CP_HEADLINE if f"cp60.{m}" in table]
    out = table[[c for c in keep if c in table]].copy()
    probes = {m.group(1): c for c in table.columns if (m := CP_PROBE.match(c))}
    if probes:

        def first(row: pd.Series) -> str:
            hits = [(int(row[c]), task) for task, c in probes.items() if str(row[c]).isdigit()]
            if hits:
                n, task = min(hits)
                return f"{n} ({task})"
            return "none" if any(row[c] == "none" for c in probes.values()) else "—"

        out["cp60.first_probe"] = table.apply(first, axis=1)
    return out


def _measured(curves: pd.DataFrame) -> dict[str, set[str]]:
    """run_id -> the curve names (``batch_es``, ``health_ppl``...) the run has points of."""
    keys = curves.assign(name=curves["key"].str.removeprefix("curve."))
    return {rid: set(g["name"]) for rid, g in keys.groupby("run_id")}


def _retention_figure(curves: pd.DataFrame, runs: Sequence[str]) -> Figure:
    """One heatmap per run: cohort (rows, in edit order) × forgetting point (columns), ES in percent."""
    cols = min(3, len(runs))
    rows = (len(runs) + cols - 1) // cols
    fig = Figure(figsize=(5.2 * cols, 3.8 * rows), layout="constrained")
    fig.suptitle("Retention matrix: each cohort's efficacy (ES, %) re-scored as edits accumulate")
    grid = list(fig.subplots(rows, cols, squeeze=False).flat)
    for ax in grid[len(runs) :]:
        ax.remove()
    info = curves.drop_duplicates("run_id").set_index("run_id")
    image = None
    for ax, rid in zip(grid, runs):
        d = curves[(curves["run_id"] == rid) & curves["key"].str.match(rf"^{re.escape(RETENTION_PREFIX)}\d+_es$")]
        d = d.assign(cohort=d["key"].str.removeprefix(RETENTION_PREFIX).str.split("_").str[0].astype(int))
        m = d.pivot_table(index="cohort", columns="step", values="value", aggfunc="last").sort_index()
        image = ax.imshow(m.to_numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=100, origin="upper")
        ax.set_xticks(range(len(m.columns)), [str(int(c)) for c in m.columns], rotation=45, fontsize="small")
        ax.set_yticks(range(len(m.index)), [str(i) for i in m.index], fontsize="small")
        ax.set_xlabel("edits applied")
        ax.set_ylabel("cohort (edit order)")
        ax.set_title(_label(info.loc[rid], False), color=method_color(str(info.loc[rid, "method"])))
    if image is not None:
        fig.colorbar(image, ax=grid[: len(runs)], label="ES (%)", shrink=0.8)
    return fig
