"""Figures: panels of metrics against a swept setting, one colour per method in every figure."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullLocator

from ..colors import method_color

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------
# Figures


def series_colors(series: Sequence[str], methods: Sequence[str] | None = None) -> dict[str, Any]:
    """One colour per series: its method's colour (:func:`method_color`) when ``methods`` (one per
    series) names a different method for each, else tab10/tab20 by position (several series of one
    method in a figure need colours of their own)."""
    if methods is not None and len(set(methods)) == len(series):
        return {s: method_color(m) for s, m in zip(series, methods)}
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(series) <= 10 else "tab20"]
    return {s: cmap(i % cmap.N) for i, s in enumerate(series)}


def _panels(n: int, title: str) -> tuple[Figure, list[Axes]]:
    """A 2x2 grid (n <= 4), else 2x3 (n <= 6), of axes on a fresh figure; unused cells are removed."""
    cols = 2 if n <= 4 else 3
    fig = Figure(figsize=(5.5 * cols, 8), layout="constrained")
    grid = list(fig.subplots(2, cols).flat)
    axes = grid[:n]
    for ax in grid[n:]:
        ax.remove()
    fig.suptitle(title)
    return fig, axes


def _int_ticks(ax: Axes, values: Sequence[float], log2: bool) -> None:
    """Ticks at the integer x values present (log2 axis for batch sizes)."""
    xs = sorted({float(v) for v in values if not pd.isna(v)})
    if log2:
        ax.set_xscale("log", base=2)
        ax.xaxis.set_minor_locator(NullLocator())
    if xs and len(xs) <= 16:
        ax.xaxis.set_major_locator(FixedLocator(xs))
    elif not log2:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))


def _hparam_axis(ax: Axes, values: Sequence[float]) -> None:
    """A hyperparameter's x axis: log10 when the positive values span 10x or more (symlog when 0 is among
    them), linear otherwise; ticks at the values present."""
    xs = sorted({float(v) for v in values if not pd.isna(v)})
    pos = [v for v in xs if v > 0]
    if len(pos) >= 2 and pos[-1] / pos[0] >= 10 and min(xs) >= 0:
        if xs[0] == 0:
            ax.set_xscale("symlog", linthresh=pos[0])
        else:
            ax.set_xscale("log")
        ax.xaxis.set_minor_locator(NullLocator())
    if len(xs) <= 16:
        ax.xaxis.set_major_locator(FixedLocator(xs))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))


def series_figure(
    table: pd.DataFrame,
    x: str,
    panels: Sequence[tuple[str, Sequence[tuple[str, str]]]],
    title: str,
    log2: bool,
    hparam_axis: bool = False,
) -> Figure:
    """Panels of metric vs ``x``, one colour per series; each panel lists (column, linestyle) pairs.

    The x axis is log2 (batch sizes), linear integers (layers), or a hyperparameter's (``hparam_axis``).
    """
    fig, axes = _panels(len(panels), title)
    series = list(dict.fromkeys(table["series"]))
    colors = series_colors(series, [table.loc[table["series"] == s, "method"].iloc[0] for s in series])
    for ax, (label, lines) in zip(axes, panels):
        for s in series:
            d = table[table["series"] == s].sort_values(x)
            for col, style in lines:
                if col not in d.columns or d[col].isna().all():
                    continue
                stage = col.split(".")[0]
                name = s if len(lines) == 1 else f"{s} ({stage})"
                ax.plot(d[x].astype(float), d[col], style, color=colors[s], marker="o", ms=4, label=name)
        ax.set_title(label)
        ax.set_xlabel("batch size" if x == "batch_size" else x.removeprefix("hp."))
        ax.grid(alpha=0.3)
        if hparam_axis:
            _hparam_axis(ax, table[x])
        else:
            _int_ticks(ax, table[x], log2)
    if axes:
        handles, labels = axes[0].get_legend_handles_labels()
        if handles:
            fig.legend(handles, labels, loc="outside lower center", ncol=min(4, len(labels)), fontsize="small")
    return fig
