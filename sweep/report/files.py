"""Writing the report's files atomically: CSV, markdown tables, figures."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from editors.store import atomic_write

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------
# Writing files


def write_text(path: Path, text: str) -> Path:
    """Write ``text`` (UTF-8) atomically."""
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def write_csv(path: Path, df: pd.DataFrame) -> Path:
    """Write ``df`` as CSV (full precision, no index) atomically."""
    return atomic_write(path, lambda p: df.to_csv(p, index=False))


def write_figure(path: Path, fig: Figure, dpi: int = 120) -> Path:
    """Render ``fig`` with the Agg canvas to PNG atomically."""
    FigureCanvasAgg(fig)
    return atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=dpi))


def _cell(value: Any, floatfmt: str) -> str:
    """One markdown cell: blanks for missing values, floats formatted, pipes escaped."""
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return ""
    if isinstance(value, float):
        return format(value, floatfmt)
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(df: pd.DataFrame, floatfmt: str = ".2f") -> str:
    """A GitHub-flavoured markdown table of ``df`` (numbers right-aligned), without ``tabulate``."""
    cols = [str(c) for c in df.columns]
    numeric = [pd.api.types.is_numeric_dtype(df[c]) for c in df.columns]
    lines = [
        "| " + " | ".join(c.replace("|", "\\|") for c in cols) + " |",
        "|" + "|".join("---:" if n else ":---" for n in numeric) + "|",
    ]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(_cell(v, floatfmt) for v in row) + " |")
    return "\n".join(lines) + "\n"
