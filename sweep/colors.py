"""One colour per method, shared by MLflow (the ``mlflow.runColor`` tag of each trial's run) and every
figure of the report, so a method looks the same in the UI and in a paper's figures."""

from __future__ import annotations

import hashlib

#: the shipped methods (matplotlib's tab10, as hex: what the MLflow UI reads)
METHOD_COLORS = {
    "rome": "#8c564b",
    "memit": "#1f77b4",
    "emmet": "#d62728",
    "alphaedit": "#2ca02c",
    "encore": "#9467bd",
    "memit+nas": "#ff7f0e",
    "memit+prune": "#17becf",
    "memit+rect": "#bcbd22",
    "alphaedit+nas": "#e377c2",
    "alphaedit+sphere": "#98df8a",
    "rlsedit": "#aec7e8",
    "ultraedit": "#ff9896",
}
#: any other method: one of these, by a hash of its name (the same in every figure and every report)
SPARE_COLORS = ("#7f7f7f", "#000080", "#b8860b", "#008080", "#dc143c", "#4b0082", "#bdb76b", "#556b2f")


def method_color(method: str) -> str:
    """The hex colour of ``method``."""
    if method in METHOD_COLORS:
        return METHOD_COLORS[method]
    return SPARE_COLORS[int(hashlib.sha256(method.encode()).hexdigest(), 16) % len(SPARE_COLORS)]
