"""What the report reads of the run schema (:mod:`sweep.tune.tracking`): columns, orders, labels, and the
typed objects that cross its modules."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..evals.registry import CORE, GEN_CORE, NAMES, QA_NAMES, STAGES

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "model-editing"
SCORES = NAMES  # every metric a stage may hold (sweep.evals.registry)
TIME_STAGES = tuple(f"time.{s}" for s in ("load", "shared", "statistics", "keys", "values", "solve", "score"))
TIMINGS = (*TIME_STAGES, "time.total")
MEMORY = ("memory.cpu_rss_peak_mb", "memory.gpu_peak_mb")
#: mean Frobenius norm of each batch's update (summed over the edited layers)
UPDATE_NORM = "update_norm.mean"
#: edits in the model when the collapse guard stopped a trial (absent: it ran to the end)
COLLAPSED_AT = "collapsed_at"
#: edits applied when a trial was stopped early (ASHA or the collapse guard; the reason is :data:`STOP_REASON`)
STOPPED_AT = "stopped_at"
METRIC_COLUMNS = (
    *(f"{st}.{m}" for st in STAGES for m in SCORES),
    UPDATE_NORM,
    COLLAPSED_AT,
    STOPPED_AT,
    *TIMINGS,
    *MEMORY,
)
#: the forgetting curves: every fact edited so far (all) and the first batch's (first), re-scored
FORGET_CURVES = tuple(f"curve.forget_{g}_{m}" for g in ("all", "first") for m in CORE)
#: the edited matrices' health: ‖W − W₀‖_F every batch, the rest every ``scoring.health_every`` batches
HEALTH_CURVES = (
    "curve.drift",
    "curve.health_sigma_max",
    "curve.health_cond",
    "curve.health_delta_sigma_max",
    "curve.health_norm",
    "curve.health_he",
    "curve.health_ppl",
)
#: the retention matrix: each cohort of facts re-scored at every forgetting point (``curve.forget_c<j>_es``)
RETENTION_PREFIX = "curve.forget_c"
#: CP@60 of each measure (``collapse.cp60.<curve name>``, :mod:`sweep.evals.collapse`), edits
CP_PREFIX = "collapse.cp60."
#: the generation-based (WILD) curves: every fact so far at its own edit, and each batch's facts
GEN_CURVES = (*(f"curve.at_edit_{m}" for m in GEN_CORE), *(f"curve.batch_{m}" for m in GEN_CORE))
CURVES = (
    *(f"curve.batch_{m}" for m in CORE),
    *(f"curve.at_edit_{m}" for m in CORE),
    *GEN_CURVES,
    "curve.update_norm",
    *FORGET_CURVES,
    *HEALTH_CURVES,
)
#: the param naming the benchmark a trial edits (runs logged before it existed: CounterFact)
DATASET = "dataset.name"
DEFAULT_DATASET = "counterfact"
#: the params that say what a trial's numbers were measured on and how (:func:`sweep.tune.tracking.trial_params`)
DATA_PARAMS = (DATASET, "dataset.target", "scoring.generated", "scoring.gen_context", "scoring.probes")
PARAMS = (
    "method",
    "algorithm",
    "layers",
    "layer",
    "batch_size",
    "mode",
    "n_edits",
    "model",
    "hparams",
    *DATA_PARAMS,
)
#: a study's design (searches, repeats): which phase a trial belongs to (``grid``, ``search`` on the dev
#: facts, ``heldout``: a search's best configuration re-run on the held-out facts), its 0-based repeat, the
#: id of its cell (the config without seeds and edit order: runs of one cell are repeats) and the order in
#: which a search suggested it; a sweep logged before them has none (its report has no study sections)
PHASE = "phase"
REPEAT = "repeat"
CELL = "cell"
SEARCH_INDEX = "search.index"
STUDY_PARAMS = (PHASE, REPEAT, CELL, SEARCH_INDEX)
#: the tag of a trial stopped early: ``asha`` (Tune's scheduler) or ``collapse`` (the collapse guard)
STOP_REASON = "stop.reason"
#: params that are swept settings: hyperparameters and statistics settings (``stats.max_tokens``...)
SETTINGS = ("hp.", "stats.")
#: settings a study's repeats move (sweep.cells.SEED_FIELDS): not swept settings when runs are repeats
REPEAT_MOVED = ("hp.template_seed", "seed", "dataset.order_seed")


def setting_columns(df: pd.DataFrame) -> list[str]:
    """The ``hp.*``/``stats.*`` columns of ``df``, without the seeds its repeats move (when it has repeats)."""
    repeats = REPEAT in df.columns and pd.to_numeric(df[REPEAT], errors="coerce").nunique() > 1
    return sorted(c for c in df.columns if c.startswith(SETTINGS) and not (repeats and c in REPEAT_MOVED))


INT_PARAMS = ("layer", "batch_size", "n_edits")
#: the study params read as integers
INT_STUDY_PARAMS = (REPEAT, SEARCH_INDEX)
#: the order methods are listed in (their colours: :mod:`sweep.colors`)
METHOD_ORDER = (
    "rome",
    "memit",
    "emmet",
    "alphaedit",
    "encore",
    "rlsedit",
    "ultraedit",
    "memit+nas",
    "memit+prune",
    "memit+rect",
    "alphaedit+nas",
    "alphaedit+sphere",
)
SEQUENTIAL_MODES = ("sequential-batch", "sequential")
#: optional columns added to the section tables when any trial of the section has them
EXTRA_COLUMNS = ("at_edit.ge", "final.ge", "pre.ppl", "final.ppl", UPDATE_NORM)
#: the protocols in words, as column headers and legends say them (:mod:`sweep.evals.registry`)
PROTOCOL_WORDS = {"teacher_forced": "teacher-forced", "generated": "generated (WILD)"}
#: capability probes: ``<stage>.probe_<task>_<metric>`` and ``curve.probe_<task>_<metric>``
PROBE_PREFIX = "probe_"
PROBE_CURVE_PREFIX = f"curve.{PROBE_PREFIX}"
#: the figure's metric per probe task: the first of these the trials have (AlphaEdit plots the
#: generation-based F1; ``lik_*`` compare the label words' likelihoods)
PROBE_HEADLINE = ("f1", "acc", "lik_f1", "lik_acc", "mcc", "lik_mcc")
#: (task, metric) -> the score of uniform random guessing, in percent (the probes' scale,
#: :meth:`sweep.evals.probes.ProbeResult.metrics`), drawn as the figure's "chance" line. Binary tasks (sst2 mrpc
#: cola rte nli sentiment_analysis) guess one of two labels: accuracy 50, and F1 (the authors' *weighted*
#: F1, sum over classes of share_c · F1_c = sum share_c² / (share_c + 1/2)) 50 on a balanced slice (52 on a
#: 70/30 slice, as CoLA's and MRPC's roughly are); MCC is 0 for any guess that ignores the input. mmlu and
#: dialogue pick one of four options: accuracy 25, weighted F1 25 (balanced), MCC 0. ``lik_*`` are the same
#: measures of the likelihood prediction and share the levels; ``invalid`` (unparsed answers) has none.
CHANCE: dict[tuple[str, str], float] = {
    **{
        (task, m): v
        for task in ("sst2", "mrpc", "cola", "rte", "nli", "sentiment_analysis")
        for m, v in (("f1", 50.0), ("acc", 50.0), ("mcc", 0.0))
    },
    **{(task, m): v for task in ("mmlu", "dialogue") for m, v in (("f1", 25.0), ("acc", 25.0), ("mcc", 0.0))},
}
#: a probe metric in words (:func:`sweep.evals.probes.task_metrics`; ``lik_<m>``: the same of the likelihood prediction)
PROBE_METRIC_WORDS = {"f1": "weighted F1", "acc": "accuracy", "mcc": "MCC", "invalid": "unparsed answers"}
#: the probe tasks known by name (longest first, so ``sentiment_analysis_f1`` parses as that task)
PROBE_TASKS = tuple(sorted({t for t, _ in CHANCE}, key=lambda t: (-len(t), t)))
#: every file a report may write, per section (files not written this time are removed from --out; a
#: ``*`` is a pattern)
SECTION_FILES = {
    "runs": ("runs.csv",),
    "layer_search": ("layer_search.csv", "layer_search.md", "fig_layer_search.png"),
    "batch": ("batch.csv", "batch.md", "fig_batch.png"),
    "sequential": ("sequential.csv", "sequential.md", "fig_sequential.png"),
    "timings": ("timings.csv", "timings.md", "fig_timings.png"),
    "curves": ("curves.csv", "fig_curves.png"),
    "forgetting": ("forgetting.csv", "forgetting.md", "fig_forgetting.png"),
    "health": ("health.csv", "health.md", "fig_health.png"),
    "collapse": ("collapse.csv", "collapse.md", "fig_retention.png"),
    "protocols": ("protocols.csv", "protocols.md", "fig_protocols.png"),
    "probes": ("probes.csv", "probes.md", "fig_probes.png"),
    "search": ("search.csv", "search.md", "search_trials.csv", "fig_search_*.png"),
    "repeats": ("repeats.csv", "repeats.md", "fig_repeats.png"),
    "paired": ("paired.csv", "paired.md"),
    "report": ("report.md",),
}
#: the files of the per-hyperparameter sections (``hparam_<name>``); stale ones are removed from --out
HPARAM_FILES = ("hparam_*.csv", "hparam_*.md", "fig_hparam_*.png")
#: settings that make separate lines in a hyperparameter figure
HPARAM_DIMS = ("mode", "batch_size", "layers", "n_edits", "model", "hparams")
#: the benchmarks' names in words, as the runs' descriptions write them (:data:`sweep.tune.tracking.DATASET_NAMES`)
DATASET_TITLES = {"counterfact": "CounterFact", "mquake": "MQuAKE", **QA_NAMES}
RUN_ID = re.compile(r"^[0-9a-zA-Z_-]+$")


def dataset_title(dataset: str) -> str:
    """A benchmark's name in words ("zsre" -> "ZsRE"); the name itself when it is not a known one."""
    return DATASET_TITLES.get(dataset, dataset)


def dataset_order(datasets: Iterable[str]) -> list[str]:
    """The distinct benchmarks in their usual order (CounterFact, ZsRE, QAEdit, MQuAKE), then any other by name."""
    known = list(DATASET_TITLES)
    return sorted(dict.fromkeys(datasets), key=lambda d: (known.index(d) if d in known else len(known), d))


def probe_parts(name: str) -> tuple[str, str]:
    """(task, metric) of a probe name (``probe_sst2_lik_f1`` -> ("sst2", "lik_f1"); a stage or ``curve.``
    prefix is dropped); an unknown task is the text up to the first underscore."""
    rest = name.split(".", 1)[-1].removeprefix(PROBE_PREFIX)
    for task in PROBE_TASKS:
        if rest.startswith(f"{task}_"):
            return task, rest[len(task) + 1 :]
    task, _, metric = rest.partition("_")
    return task, metric


def is_probe_score(name: str) -> bool:
    """Whether ``name`` (with or without a stage or ``curve.`` prefix) is a probe score ``probe_<task>_<metric>``."""
    bare = name.split(".", 1)[-1]
    return bare.startswith(PROBE_PREFIX) and bool(probe_parts(bare)[1])


def probe_label(task: str, metric: str) -> str:
    """A probe metric in words with its protocol: "sst2 weighted F1 (generated)", "mmlu accuracy (likelihood)"."""
    bare = metric.removeprefix("lik_")
    protocol = "likelihood" if metric.startswith("lik_") else "generated"
    return f"{task} {PROBE_METRIC_WORDS.get(bare, bare)} ({protocol})"


def chance(task: str, metric: str) -> float | None:
    """The score of random guessing on a probe (:data:`CHANCE`; ``lik_*`` as their plain metric), or None."""
    return CHANCE.get((task, metric.removeprefix("lik_")))


class ReportError(Exception):
    """The sweep cannot be reported (no store, no such sweep, no trials)."""


@dataclass(frozen=True)
class Sweep:
    """The parent run of one sweep."""

    parent_run_id: str
    experiment_id: str
    name: str
    sweep_id: str | None


@dataclass(frozen=True)
class SearchSpec:
    """What a sweep's parent run says of its search (params ``search.algorithm``, ``search.metric`` and
    ``search.mode``, comma-joined; artifact ``search.json``): the metrics and their modes (max or min), and
    per method the best trial (one metric) or the Pareto set (several), each point a dict ``run_id``,
    ``values`` {metric: value} and ``config`` {``hp.<name>``: value, ``layers``: [...]}."""

    algorithm: str | None
    metrics: tuple[str, ...]
    modes: tuple[str, ...]
    best: dict[str, dict] = field(default_factory=dict)
    pareto: dict[str, list[dict]] = field(default_factory=dict)


@dataclass
class Section:
    """What one report section wrote, for the summary and ``report.md``."""

    name: str
    title: str
    paths: dict[str, Path] = field(default_factory=dict)
    table: pd.DataFrame | None = None
    notes: list[str] = field(default_factory=list)
