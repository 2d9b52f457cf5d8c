"""What the report reads of the run schema (:mod:`sweep.tracking`): columns, orders, labels, and the
typed objects that cross its modules."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..registry import CORE, NAMES, STAGES, label

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "model-editing"
SCORES = NAMES  # every metric a stage may hold (sweep.registry)
TIME_STAGES = tuple(f"time.{s}" for s in ("load", "shared", "statistics", "keys", "values", "solve", "score"))
TIMINGS = (*TIME_STAGES, "time.total")
MEMORY = ("memory.cpu_rss_peak_mb", "memory.gpu_peak_mb")
#: mean Frobenius norm of each batch's update (summed over the edited layers)
UPDATE_NORM = "update_norm.mean"
#: edits in the model when the collapse guard stopped a trial (absent: it ran to the end)
COLLAPSED_AT = "collapsed_at"
METRIC_COLUMNS = (*(f"{st}.{m}" for st in STAGES for m in SCORES), UPDATE_NORM, COLLAPSED_AT, *TIMINGS, *MEMORY)
#: the forgetting curves: every fact edited so far (all) and the first batch's (first), re-scored
FORGET_CURVES = tuple(f"curve.forget_{g}_{m}" for g in ("all", "first") for m in CORE)
#: the edited matrices' health: ‖W − W₀‖_F every batch, the rest every ``scoring.health_every`` batches
HEALTH_CURVES = (
    "curve.drift",
    "curve.health_sigma_max",
    "curve.health_cond",
    "curve.health_delta_sigma_max",
    "curve.health_ppl",
)
CURVES = (
    *(f"curve.batch_{m}" for m in CORE),
    *(f"curve.at_edit_{m}" for m in CORE),
    "curve.update_norm",
    *FORGET_CURVES,
    *HEALTH_CURVES,
)
PARAMS = ("method", "algorithm", "layers", "layer", "batch_size", "mode", "n_edits", "model", "hparams")
#: params that are swept settings: hyperparameters and statistics settings (``stats.max_tokens``...)
SETTINGS = ("hp.", "stats.")
INT_PARAMS = ("layer", "batch_size", "n_edits")
#: the order methods are listed in (their colours: :mod:`sweep.colors`)
METHOD_ORDER = ("rome", "memit", "emmet", "alphaedit", "encore", "memit+nas", "memit+prune", "memit+rect")
SEQUENTIAL_MODES = ("sequential-batch", "sequential")
#: optional columns added to the section tables when any trial of the section has them
EXTRA_COLUMNS = ("at_edit.ge", "final.ge", "pre.ppl", "final.ppl", UPDATE_NORM)
LABELS = {m: label(m) for m in CORE}
#: every file a report may write, per section (files not written this time are removed from --out)
SECTION_FILES = {
    "runs": ("runs.csv",),
    "layer_search": ("layer_search.csv", "layer_search.md", "fig_layer_search.png"),
    "batch": ("batch.csv", "batch.md", "fig_batch.png"),
    "sequential": ("sequential.csv", "sequential.md", "fig_sequential.png"),
    "timings": ("timings.csv", "timings.md", "fig_timings.png"),
    "curves": ("curves.csv", "fig_curves.png"),
    "forgetting": ("forgetting.csv", "forgetting.md", "fig_forgetting.png"),
    "health": ("health.csv", "health.md", "fig_health.png"),
    "report": ("report.md",),
}
#: the files of the per-hyperparameter sections (``hparam_<name>``); stale ones are removed from --out
HPARAM_FILES = ("hparam_*.csv", "hparam_*.md", "fig_hparam_*.png")
#: settings that make separate lines in a hyperparameter figure
HPARAM_DIMS = ("mode", "batch_size", "layers", "n_edits", "model", "hparams")
RUN_ID = re.compile(r"^[0-9a-zA-Z_-]+$")


class ReportError(Exception):
    """The sweep cannot be reported (no store, no such sweep, no trials)."""


@dataclass(frozen=True)
class Sweep:
    """The parent run of one sweep."""

    parent_run_id: str
    experiment_id: str
    name: str
    sweep_id: str | None


@dataclass
class Section:
    """What one report section wrote, for the summary and ``report.md``."""

    name: str
    title: str
    paths: dict[str, Path] = field(default_factory=dict)
    table: pd.DataFrame | None = None
    notes: list[str] = field(default_factory=list)
