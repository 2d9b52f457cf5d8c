"""The capability probes section: each probe metric of each trial from the unedited model (0 edits) through
the probe points (every ``scoring.probe_every`` batches) to the final model, with the chance level of
each task (:data:`.schema.CHANCE`) and the held-out perplexity beside them.

The probes (AlphaEdit's glue_eval tasks) do not depend on the edit dataset, but the edits do: with
several datasets every line says which benchmark's edits it follows (and its line style differs).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ..colors import method_color
from ..evals.registry import STAGES
from .files import markdown_table, write_csv, write_figure, write_text
from .schema import (
    COLLAPSED_AT,
    DATASET,
    METHOD_ORDER,
    PROBE_CURVE_PREFIX,
    PROBE_HEADLINE,
    PROBE_METRIC_WORDS,
    PROBE_PREFIX,
    Section,
    chance,
    dataset_order,
    dataset_title,
    is_probe_score,
    probe_label,
    probe_parts,
)

log = logging.getLogger(__name__)

#: the order of a probe's points at the same number of edits
POINT_ORDER = {"pre": 0, "curve": 1, "final": 2}
#: the probe tasks in AlphaEdit's order, then any other by name
TASK_ORDER = ("sst2", "mrpc", "cola", "rte", "nli", "mmlu", "sentiment_analysis", "dialogue")
PPL_CURVE = "curve.health_ppl"
COLUMNS = ["dataset", "method", "batch_size", "mode", "run_id", "task", "metric", "point", "edits", "value"]


def _final_edits(t: pd.Series, points: pd.DataFrame) -> float:
    """The edits in the model when the final probes ran: the collapse guard's stop, else the last probe
    point (the last batch is one), else ``n_edits``."""
    if COLLAPSED_AT in t and pd.notna(t[COLLAPSED_AT]):
        return float(t[COLLAPSED_AT])
    if len(points):
        return float(points["step"].max())
    return float(t["n_edits"]) if pd.notna(t["n_edits"]) else float("nan")


def _trial_points(t: pd.Series, curves: pd.DataFrame) -> list[dict]:
    """One trial's probe values: pre at 0 edits, each curve point, final (a curve point at the final
    edits is the final model's probes: listed once, as final)."""
    c = curves[(curves["run_id"] == t["run_id"]) & curves["key"].str.startswith(PROBE_CURVE_PREFIX)]
    names = {k.removeprefix("curve.") for k in c["key"]}
    names |= {k.split(".", 1)[1] for k in t.index if k.startswith(tuple(f"{st}.{PROBE_PREFIX}" for st in STAGES))}
    names = {n for n in names if is_probe_score(n)}
    c = c[c["key"].isin([f"curve.{n}" for n in names])]
    final_at = _final_edits(t, c)
    base = {
        "dataset": t[DATASET],
        "method": t["method"],
        "batch_size": t["batch_size"],
        "mode": t["mode"],
        "run_id": t["run_id"],
    }
    rows = []
    for name in sorted(names):
        task, metric = probe_parts(name)
        pts = c[c["key"] == f"curve.{name}"].sort_values("step")
        final = t.get(f"final.{name}")
        if pd.notna(final):
            pts = pts[pts["step"] != final_at]
        found = [("pre", 0.0, t.get(f"pre.{name}"))]
        found += [("curve", float(s), v) for s, v in zip(pts["step"], pts["value"])]
        found += [("final", final_at, final)]
        rows += [
            {**base, "task": task, "metric": metric, "point": p, "edits": e, "value": float(v)}
            for p, e, v in found
            if v is not None and pd.notna(v)
        ]
    return rows


def _task_key(task: str) -> tuple[int, str]:
    """A task's place: AlphaEdit's order (:data:`TASK_ORDER`), then any other by name."""
    return (TASK_ORDER.index(task) if task in TASK_ORDER else len(TASK_ORDER), task)


def probes_table(trials: pd.DataFrame, curves: pd.DataFrame) -> pd.DataFrame:
    """Long format, one row per (trial, probe metric, point): dataset, method, batch_size, mode, run_id,
    task, metric, point (pre | curve | final), edits, value; in dataset, method, trial, task and edit order."""
    rows = [r for _, t in trials.iterrows() for r in _trial_points(t, curves)]
    table = pd.DataFrame(rows, columns=COLUMNS)
    if table.empty:
        return table
    ds = {d: i for i, d in enumerate(dataset_order(table["dataset"]))}
    alg = {m: i for i, m in enumerate(METHOD_ORDER)}
    key = table.assign(
        _d=table["dataset"].map(ds),
        _m=table["method"].map(lambda m: alg.get(m, len(alg))),
        _t=table["task"].map(lambda t: _task_key(t)[0]),
        _p=table["point"].map(POINT_ORDER),
    )
    cols = ["_d", "_m", "method", "batch_size", "run_id", "_t", "task", "metric", "edits", "_p"]
    return key.sort_values(cols, kind="stable").drop(columns=["_d", "_m", "_t", "_p"]).reset_index(drop=True)


def headline_metrics(table: pd.DataFrame) -> dict[str, str]:
    """task -> the metric its panel shows: the first of :data:`.schema.PROBE_HEADLINE` present, else the
    first by name."""
    out = {}
    for task in sorted(table["task"].unique(), key=_task_key):
        have = set(table.loc[table["task"] == task, "metric"])
        out[task] = next((m for m in PROBE_HEADLINE if m in have), min(have))
    return out


def probes_summary(table: pd.DataFrame) -> pd.DataFrame:
    """``probes.md``'s table: per trial and probe metric, the chance level, pre (0 edits), final, the change
    and every point in edit order ("edits: value")."""
    rows = []
    for (run, task, metric), d in table.groupby(["run_id", "task", "metric"], sort=False):
        pre, fin = d[d["point"] == "pre"], d[d["point"] == "final"]
        rows.append(
            {
                "dataset": dataset_title(str(d["dataset"].iloc[0])),
                "method": d["method"].iloc[0],
                "batch_size": d["batch_size"].iloc[0],
                "run": str(run)[:8],
                "probe": f"{task} {metric}",
                "chance": chance(str(task), str(metric)),
                "pre (0 edits)": float(pre["value"].iloc[0]) if len(pre) else None,
                "final": float(fin["value"].iloc[0]) if len(fin) else None,
                "final edits": int(fin["edits"].iloc[0]) if len(fin) else None,
                "points (edits: value)": ", ".join(f"{int(e)}: {v:.1f}" for e, v in zip(d["edits"], d["value"])),
            }
        )
    out = pd.DataFrame(rows)
    out.insert(out.columns.get_loc("final edits") + 1, "change", out["final"] - out["pre (0 edits)"])
    return out.astype({"final edits": "Int64", "chance": float, "pre (0 edits)": float, "final": float})


def _line_labels(table: pd.DataFrame) -> dict[str, tuple[str, str, str]]:
    """run_id -> (legend label, colour, line style): the method, with the batch size when a method has
    several and the edit dataset (and a line style of its own) when there are several."""
    runs = table.drop_duplicates("run_id")
    several_ds = runs["dataset"].nunique() > 1
    several_bs = (runs.groupby(["dataset", "method"])["batch_size"].nunique() > 1).any()
    styles = {d: s for d, s in zip(dataset_order(runs["dataset"]), ("-", "--", ":", "-."))}
    out = {}
    for r in runs.itertuples(index=False):
        name = str(r.method) + (f" B{r.batch_size}" if several_bs else "")
        name += f" (edits: {dataset_title(str(r.dataset))})" if several_ds else ""
        out[str(r.run_id)] = (name, method_color(str(r.method)), styles.get(r.dataset, "-"))
    return out


def _draw_chance(ax: Axes, task: str, metric: str) -> None:
    """The dashed line of random guessing, labelled "chance" (no line for a task without a chance level)."""
    level = chance(task, metric)
    if level is None:
        log.info("probes: no chance level for %s %s (schema.CHANCE)", task, metric)
        return
    ax.axhline(level, ls="--", color="0.35", lw=1, label="chance")
    ax.annotate("chance", (0.99, level), xycoords=("axes fraction", "data"), ha="right", va="bottom", color="0.35")


def _ppl_lines(trials: pd.DataFrame, curves: pd.DataFrame, runs: Sequence[str]) -> pd.DataFrame:
    """Each run's held-out perplexity curve, from the unedited model's ``pre.ppl`` at 0 edits."""
    c = curves[curves["run_id"].isin(runs) & (curves["key"] == PPL_CURVE)][["run_id", "step", "value"]]
    if c.empty:
        return c
    pre = trials[trials["run_id"].isin(runs)]
    if "pre.ppl" in pre:
        pre = pre[pre["pre.ppl"].notna()]
        c = pd.concat([pd.DataFrame({"run_id": pre["run_id"], "step": 0, "value": pre["pre.ppl"]}), c])
    return c.drop_duplicates(["run_id", "step"], keep="last").sort_values(["run_id", "step"])


def probes_figure(table: pd.DataFrame, ppl: pd.DataFrame) -> Figure:
    """One panel per task (its headline metric vs edits, the chance line dashed), and one of the held-out
    perplexity when ``ppl`` has points; a line per trial in its method's colour."""
    heads = headline_metrics(table)
    n = len(heads) + (not ppl.empty)
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig = Figure(figsize=(5.2 * cols, 4.0 * rows + 0.6), layout="constrained")
    fig.suptitle("Capability probes vs edits applied (0 = the unedited model)")
    grid = list(fig.subplots(rows, cols, squeeze=False).flat)
    for ax in grid[n:]:
        ax.remove()
    lines = _line_labels(table)
    for ax, (task, metric) in zip(grid, heads.items()):
        d = table[(table["task"] == task) & (table["metric"] == metric)]
        for rid, r in d.groupby("run_id", sort=False):
            name, color, style = lines[str(rid)]
            ax.plot(r["edits"], r["value"], style, color=color, marker="o", ms=3, label=name)
        _draw_chance(ax, task, metric)
        ax.set_title(probe_label(task, metric))
        ax.set_ylabel(f"{PROBE_METRIC_WORDS.get(metric.removeprefix('lik_'), metric)} (%)")
    if not ppl.empty:
        ax = grid[len(heads)]
        for rid, r in ppl.groupby("run_id", sort=False):
            name, color, style = lines[str(rid)]
            ax.plot(r["step"], r["value"], style, color=color, marker="o", ms=3, label=name)
        ax.set_title("held-out perplexity")
        ax.set_ylabel("perplexity")
    handles: dict[str, object] = {}
    for ax in grid[:n]:
        ax.set_xlabel("edits applied")
        ax.grid(alpha=0.3)
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncol=min(5, len(handles)))
    return fig


def probes_section(trials: pd.DataFrame, curves: pd.DataFrame, out: Path) -> Section | None:
    """``probes.csv`` (:func:`probes_table`), ``probes.md`` (:func:`probes_summary`) and ``fig_probes.png``
    (:func:`probes_figure`); None when no trial ran a probe."""
    table = probes_table(trials, curves)
    if table.empty:
        return None
    sec = Section("probes", "Capability probes (pre, every probe point, final)")
    sec.paths["probes.csv"] = write_csv(out / "probes.csv", table)
    summary = probes_summary(table)
    heads = headline_metrics(table)
    levels = ", ".join(
        f"{t} {m} {chance(t, m):g}" if chance(t, m) is not None else f"{t} {m} (none)" for t, m in heads.items()
    )
    sec.notes += [
        "Figure: " + ", ".join(f"{t} {m}" for t, m in heads.items()) + f"; chance (uniform random guessing): {levels}.",
        "The last probe point is the final model's probes: it is listed once, as final.",
    ]
    if table["dataset"].nunique() > 1:
        sec.notes.append("Each line follows one edit dataset's trials (named in the legend, one line style each).")
    text = "\n".join([f"# {sec.title}", "", *(f"> {n}" for n in sec.notes), "", markdown_table(summary)])
    sec.paths["probes.md"] = write_text(out / "probes.md", text)
    ppl = _ppl_lines(trials, curves, list(table["run_id"].unique()))
    sec.paths["fig_probes.png"] = write_figure(out / "fig_probes.png", probes_figure(table, ppl))
    sec.table = summary
    return sec
