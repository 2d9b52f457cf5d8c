"""Collapse analytics of a lifelong run, computed from what the trial already measures (its curve points).

- **Collapse point** CP@θ of a measure: the first edit count at which it has fallen below θ of where it
  started (the NAS paper's CP@60, arXiv 2602.02543: θ = 0.6), for a measure where higher is better; for
  one where lower is better (perplexity), the first at which it has risen above its start divided by θ.
  The start is the unedited model's value where the measure has one (perplexity, the probes), else the
  first point (an edit score exists only after the first batch). ``None``: it never fell that far.
- **Retention matrix**: each cohort of batches' facts re-scored at every forgetting point (cohort ×
  edits; :func:`cohort_size`), the ``forget_c<j>_<metric>`` curve series.

The weight traces (‖W‖_F, hyperspherical energy, σ_max, condition) are the health points'
(:class:`editors.schedule.WeightHealth`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

#: CP@60: the fraction of its start a measure falls below to count as collapsed
THRESHOLD = 0.6
#: at most this many cohorts in the retention matrix (consecutive batches grouped evenly)
MAX_COHORTS = 10
#: the curve series whose collapse point a trial reports, and whether higher is better
MEASURES: dict[str, bool] = {
    "batch_es": True,  # each batch's efficacy right after its edit
    "forget_all_es": True,  # every fact so far re-scored
    "forget_all_s": True,
    "health_ppl": False,  # held-out perplexity
}


def collapse_point(
    points: Sequence[tuple[int, float]], start: float | None = None, threshold: float = THRESHOLD, higher: bool = True
) -> int | None:
    """The first edit count in ``points`` [(edits, value)] (any order) at which the value has fallen
    below ``threshold``·start (``higher``) or risen above start / ``threshold`` (not ``higher``);
    ``start``: the measure before editing, else the first point's value. None if it never did."""
    pts = sorted((e, v) for e, v in points if v is not None and math.isfinite(v))
    if not pts:
        return None
    s = pts[0][1] if start is None or not math.isfinite(start) else start
    for edits, v in pts:
        if (v < threshold * s) if higher else (v > s / threshold):
            return int(edits)
    return None


def collapse_points(
    curves: Sequence[Mapping[str, Any]], pre: Mapping[str, float], threshold: float = THRESHOLD
) -> dict[str, int | None]:
    """CP@θ of every :data:`MEASURES` series and every generated-F1 probe (``probe_<task>_f1``) the
    curves hold: name -> edits (None: never). ``pre``: the unedited model's metrics (``ppl``, probes)."""
    names = {k for p in curves for k in p}
    wanted = dict(MEASURES)
    wanted.update({k: True for k in names if k.startswith("probe_") and k.endswith("_f1")})
    out: dict[str, int | None] = {}
    for name, higher in sorted(wanted.items()):
        pts = [(int(p["edits"]), float(p[name])) for p in curves if p.get(name) is not None]
        if not pts:
            continue
        start = pre.get(name.removeprefix("health_"))
        out[name] = collapse_point(pts, start, threshold, higher)
    return out


def cohort_size(n_batches: int, batch_size: int) -> int:
    """Facts per cohort of the retention matrix: consecutive batches grouped into at most
    :data:`MAX_COHORTS` equal cohorts (every batch its own cohort when there are few)."""
    return math.ceil(n_batches / MAX_COHORTS) * batch_size
