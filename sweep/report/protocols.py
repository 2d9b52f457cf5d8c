"""The protocols section: each method's final scores under teacher forcing beside the same scores under
generation (the WILD protocol of arXiv 2502.11177, ``gen_*``), the drop between them, and whether the
ranking of methods changes, per dataset.

A teacher-forced ES scores the target's tokens given the prompt; a generated one decodes greedily to a
natural stop and matches the answer, so the two are reported side by side and never in one column.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from ..colors import method_color
from ..evals.registry import CORE, label
from .aggregate import aggregate_series, present
from .files import markdown_table, write_csv, write_figure, write_text
from .schema import DATASET, PROTOCOL_WORDS, Section, dataset_order, dataset_title

log = logging.getLogger(__name__)

TF = PROTOCOL_WORDS["teacher_forced"]
GEN = PROTOCOL_WORDS["generated"]


def value_col(m: str, protocol: str) -> str:
    """The protocols table's column of core metric ``m`` (es ps ns s) under ``protocol`` (a :data:`PROTOCOL_WORDS`
    key): "ES teacher-forced", "ES generated (WILD)"."""
    return f"{m.upper()} {PROTOCOL_WORDS[protocol]}"


def drop_col(m: str) -> str:
    """The column of the drop of ``m`` from teacher forcing to generation (teacher-forced minus generated)."""
    return f"{m.upper()} drop ({TF} - generated)"


def rank_col(m: str, protocol: str) -> str:
    """The column of each method's rank by ``m`` within its dataset under ``protocol`` (1: the highest)."""
    return f"{m.upper()} rank {PROTOCOL_WORDS[protocol]}"


def protocols_table(trials: pd.DataFrame) -> pd.DataFrame | None:
    """One row per dataset and series (a method and the settings varying within it): the final ES/PS/NS/S
    teacher-forced and generated, their drop, and the ranks by each; None when no trial has ``final.gen_*``.

    Only the trials that have a generated score enter, so both protocols' numbers come from the same trials.
    """
    pairs = [m for m in CORE if present(trials, [f"final.{m}", f"final.gen_{m}"]) == [f"final.{m}", f"final.gen_{m}"]]
    if not pairs:
        return None
    gen_cols = [f"final.gen_{m}" for m in pairs]
    sel = trials[trials[gen_cols].notna().any(axis=1)]
    metrics = [*(f"final.{m}" for m in pairs), *gen_cols]
    agg = aggregate_series(sel, DATASET, metrics, "protocols", extra_dims=("mode", "batch_size"))
    dims = [c for c in agg.columns if c not in ("method", "series", DATASET, "n_trials", *metrics)]
    table = pd.DataFrame({"dataset": agg[DATASET], "method": agg["method"], "series": agg["series"]})
    for d in dims:
        table[d] = agg[d].to_numpy()
    table["n_trials"] = agg["n_trials"].to_numpy()
    for m in pairs:
        table[value_col(m, "teacher_forced")] = agg[f"final.{m}"].to_numpy()
        table[value_col(m, "generated")] = agg[f"final.gen_{m}"].to_numpy()
        table[drop_col(m)] = table[value_col(m, "teacher_forced")] - table[value_col(m, "generated")]
    for m in pairs:
        for protocol in ("teacher_forced", "generated"):
            ranks = table.groupby("dataset")[value_col(m, protocol)].rank(ascending=False, method="min")
            table[rank_col(m, protocol)] = ranks.astype("Int64")
    order = {d: i for i, d in enumerate(dataset_order(table["dataset"]))}
    table = table.assign(_d=table["dataset"].map(order))
    return table.sort_values("_d", kind="stable").drop(columns="_d").reset_index(drop=True)


def _order_text(names: Sequence[str], values: Sequence[float]) -> str:
    """The order in words, "a > b = c": the names from the highest value down, ties joined by '='."""
    ranked = sorted(zip(names, values), key=lambda nv: -nv[1])
    text = ranked[0][0]
    for (_, prev), (name, v) in itertools.pairwise(ranked):
        text += f" {'=' if v == prev else '>'} {name}"
    return text


def ranking_sentence(sub: pd.DataFrame, m: str) -> str:
    """In words, whether the ranking of the series of one dataset's table by ``m`` is the same under both
    protocols, else which pairs swap places (a tie under one protocol is no swap)."""
    tf, gen = value_col(m, "teacher_forced"), value_col(m, "generated")
    d = sub[sub[tf].notna() & sub[gen].notna()]
    title = dataset_title(str(sub["dataset"].iloc[0]))
    if len(d) < 2:
        return f"{title}: {len(d)} method(s) with both protocols' {m.upper()}, no ranking to compare."
    names, a, b = list(d["series"]), list(d[tf]), list(d[gen])
    swaps = [
        f"{names[i]} and {names[j]} swap places"
        for i, j in itertools.combinations(range(len(names)), 2)
        if (a[i] - a[j]) * (b[i] - b[j]) < 0
    ]
    if not swaps:
        same = _order_text(names, a)
        return f"{title}: the ranking of methods by {m.upper()} is the same under both protocols ({same})."
    return (
        f"{title}: the ranking of methods by {m.upper()} changes between the protocols: {TF} "
        f"{_order_text(names, a)}, {GEN} {_order_text(names, b)} ({'; '.join(swaps)})."
    )


def _legend_line(dataset: str, metrics: Sequence[str]) -> str:
    """What the columns measure on ``dataset``: each metric's label under either protocol."""
    parts = [f"{m.upper()} = {label(m, dataset)} vs {label(f'gen_{m}', dataset)}" for m in metrics]
    return f"{dataset_title(dataset)} ({TF} vs {GEN}): " + "; ".join(parts) + "."


def compact(table: pd.DataFrame) -> pd.DataFrame:
    """The markdown's columns: the series (the method alone when no setting varies), the values, drops and
    the ranks by S (the CSV has the ranks by every metric)."""
    keep = [c for c in table.columns if " rank " not in c or c.startswith("S rank ")]
    if (table["series"] == table["method"]).all():
        keep.remove("series")
    return table[keep]


def protocols_markdown(table: pd.DataFrame) -> tuple[str, list[str]]:
    """``protocols.md`` (one table per dataset, with what its columns mean and the ranking by each metric
    in words) and the sentences for the report: the ranking by S, and by any other metric that changes."""
    metrics = [m for m in CORE if value_col(m, "generated") in table.columns]
    lines = [
        f"# Final scores: {TF} vs {GEN}",
        "",
        f"drop = {TF} minus {GEN}; rank 1 is the highest within the dataset (the CSV ranks by every metric).",
        "",
    ]
    notes = []
    for ds in dataset_order(table["dataset"]):
        sub = table[table["dataset"] == ds]
        said = {m: ranking_sentence(sub, m) for m in sorted(metrics, key=lambda m: m != "s")}  # S first
        notes += [t for m, t in said.items() if m == "s" or "swap places" in t]
        lines += [f"## {dataset_title(ds)}", "", _legend_line(ds, metrics), "", *(f"- {t}" for t in said.values())]
        lines += ["", markdown_table(compact(sub).drop(columns="dataset")), ""]
    return "\n".join(lines), notes


def _bars(ax: Axes, sub: pd.DataFrame, m: str, dataset: str) -> None:
    """One group per series: the teacher-forced bar (solid) and the generated one (hatched), in its method's colour."""
    xs = list(range(len(sub)))
    colors = [method_color(str(a)) for a in sub["method"]]
    tf, gen = sub[value_col(m, "teacher_forced")], sub[value_col(m, "generated")]
    for shift, values, style in ((-0.2, tf, {}), (0.2, gen, {"alpha": 0.5, "hatch": "//"})):
        bars = ax.bar([x + shift for x in xs], values, 0.4, color=colors, edgecolor="black", **style)
        ax.bar_label(bars, fmt="%.1f", fontsize="x-small")
    tilt = len(sub) > 3
    ax.set_xticks(xs, list(sub["series"]), rotation=20 if tilt else 0, ha="right" if tilt else "center")
    ax.set_title(f"{dataset_title(dataset)}: {m.upper()}, {TF} vs {GEN}")
    ax.set_ylabel(f"{label(m, dataset)} / {label(f'gen_{m}', dataset)}")
    ax.set_ylim(0, max(100.0, float(pd.concat([tf, gen]).max()) * 1.1))
    ax.grid(axis="y", alpha=0.3)


def protocols_figure(table: pd.DataFrame) -> Figure:
    """One panel per dataset: grouped bars per method of the final S (else the first core metric both
    protocols have), the two protocols side by side."""
    m = next(m for m in ("s", *CORE) if value_col(m, "generated") in table.columns)
    datasets = dataset_order(table["dataset"])
    width = max(5.5, 1.6 * table.groupby("dataset").size().max())
    fig = Figure(figsize=(width * len(datasets), 4.8), layout="constrained")
    fig.suptitle(f"Final {m.upper()}: {TF} (solid) vs {GEN} (hatched)")
    for ax, ds in zip(fig.subplots(1, len(datasets), squeeze=False)[0], datasets):
        _bars(ax, table[table["dataset"] == ds].reset_index(drop=True), m, ds)
    handles = [
        Patch(facecolor="0.6", edgecolor="black", label=TF),
        Patch(facecolor="0.6", edgecolor="black", alpha=0.5, hatch="//", label=GEN),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncol=2, fontsize="small")
    return fig


def protocols_section(trials: pd.DataFrame, out: Path) -> Section | None:
    """``protocols.csv``, ``protocols.md`` and ``fig_protocols.png``: teacher-forced vs generated final
    scores per dataset and method (:func:`protocols_table`); None when no trial scored by generation."""
    table = protocols_table(trials)
    if table is None or table.empty:
        return None
    sec = Section("protocols", f"Protocols: {TF} vs {GEN} (final scores)")
    text, notes = protocols_markdown(table)
    sec.paths["protocols.csv"] = write_csv(out / "protocols.csv", table)
    sec.paths["protocols.md"] = write_text(out / "protocols.md", text)
    sec.paths["fig_protocols.png"] = write_figure(out / "fig_protocols.png", protocols_figure(table))
    sec.table = compact(table)
    sec.notes += notes
    for note in notes:
        log.info("protocols: %s", note)
    return sec
