"""The sweep's cells and its trials, each resolved once into a typed :class:`PlannedTrial`.

A **cell** is one variant of the base trial at one point of the grid's lists (its axes); its distributions
(its spaces) are the sweep's ``grid`` under the variant's own ``grid``, so each method searches its own knobs
(MEMIT's λ, AlphaEdit's ``L2``). A cell runs as

- ``grid`` trials: the cell itself, ``repeats`` times (``search.algorithm: grid``, the default);
- ``search`` trials: ``search.num_samples`` configurations of the grid's distributions suggested by the
  search algorithm (:mod:`sweep.tune.search`), on the dev facts when ``search.dev_facts`` is set;
- ``heldout`` trials: the cell's best configuration (or each Pareto point) once the search has ended, on
  the facts after the dev facts, ``repeats`` times.

Repeat ``r`` of a cell changes its seeds (``seed``, ``hp.template_seed``: the context templates and the
value optimisation) and, in sequential modes, its edit order (``dataset.order_seed``); the ``cell`` id
(:attr:`PlannedTrial.cell`) leaves them out, so every repeat of one configuration shares it.

Whatever runs a trial (Tune's trainable, the MLflow callback, the planner) turns Tune's config into the
same :class:`PlannedTrial` with :meth:`Cells.resolve`: the config is parsed and validated there, once.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from editors.config import ConfigError, merge, to_dict

from .config import (
    Distribution,
    SweepConfig,
    TrialConfig,
    _absolute,
    _set,
    parse_config,
    parse_distribution,
    trial_key,
)
from .evals.registry import CORE, GEN_CORE, NAMES, STAGES

Phase = Literal["grid", "search", "heldout"]

#: the fields repeats change: a cell's id leaves them out
SEED_FIELDS = (("seed",), ("hp", "template_seed"), ("dataset", "order_seed"))


@dataclass(frozen=True)
class Cell:
    """One variant at one grid point: ``data`` is the trial config as plain data before sampling."""

    index: int
    variant: str | None
    point: dict[str, Any]  # grid key -> value
    data: dict[str, Any]
    spaces: dict[str, Distribution] = field(default_factory=dict)  # grid key -> what its search samples

    def label(self) -> str:
        """Where the cell comes from, as the config spells it: ``variants.<name>, <key>=<value>, ...``."""
        parts = [f"variants.{self.variant}"] if self.variant else []
        return ", ".join(parts + [f"{k}={v}" for k, v in self.point.items()]) or "base"


@dataclass(frozen=True)
class PlannedTrial:
    """One trial, resolved once: its validated config, key and method, and where it sits in the sweep.

    ``sampled``: the values its search suggested (grid key -> value); ``index``: the order in which the
    search suggested it (search phase only)."""

    config: TrialConfig
    key: str
    method: str
    phase: Phase
    cell: str
    cell_index: int
    repeat: int = 0
    index: int | None = None
    sampled: dict[str, Any] = field(default_factory=dict)

    @property
    def layers(self) -> list[int]:
        return list(self.config.edit_hparams.layers)

    def params(self) -> dict[str, Any]:
        """What the trial's MLflow run adds to its config's params."""
        out: dict[str, Any] = {"phase": self.phase, "repeat": self.repeat, "cell": self.cell}
        if self.index is not None:
            out["search.index"] = self.index
        return out

    def point(self) -> dict[str, Any]:
        """The trial as Tune's config holds it: ``{"point": {"trial": self, ...}}``, the planned trial
        itself (which :func:`planned_of` takes back out, in the trainable, the scheduler and the MLflow
        callback) beside the columns of Tune's progress table (method, layers, batch size, mode, sampled)."""
        t = self.config
        point = {
            "cell": self.cell_index,
            "phase": self.phase,
            "repeat": self.repeat,
            "index": self.index,
            "method": self.method,
            "layers": self.layers,
            "batch_size": t.batch_size,
            "mode": t.mode,
        }
        point["sampled"] = {space_name(k): v for k, v in self.sampled.items()}
        point["trial"] = self
        return {"point": point}


def planned_of(config: dict[str, Any]) -> PlannedTrial:
    """The :class:`PlannedTrial` a Tune config carries (:meth:`PlannedTrial.point`), as it was planned."""
    return config["point"]["trial"]


def space_name(key: str) -> str:
    """A grid key as a Tune/Optuna parameter name (no dots: Tune flattens nested names on ``/``)."""
    return key.replace(".", "__")


def cell_id(data: dict[str, Any]) -> str:
    """The id of a trial config without its seeds and edit order (:data:`SEED_FIELDS`)."""
    plain = json.loads(json.dumps(data, default=str))
    for path in SEED_FIELDS:
        node = plain
        for p in path[:-1]:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(path[-1], None)
    return hashlib.sha256(json.dumps(plain, sort_keys=True).encode()).hexdigest()[:12]


def dev_split(cfg: SweepConfig, n_edits: int) -> tuple[int, int] | None:
    """(dev facts, held-out facts) of ``base.n_edits`` facts, or None without ``search.dev_facts``."""
    d = cfg.search.dev_facts
    if d is None:
        return None
    n_dev = round(d * n_edits) if d < 1 else int(d)
    if d <= 0 or (d >= 1 and not float(d).is_integer()) or not 1 <= n_dev < n_edits:
        raise ConfigError(
            f"search.dev_facts: a count of facts in [1, {n_edits - 1}] or a fraction in (0, 1) of base.n_edits "
            f"({n_edits}) leaving facts on both sides, got {d}"
        )
    return n_dev, n_edits - n_dev


class Cells:
    """The cells of ``cfg`` and the resolver of its trials (picklable: it travels to Tune's trials)."""

    def __init__(self, cfg: SweepConfig) -> None:
        self.cfg = cfg
        groups = []  # (variant, its base, its grid: the sweep's grid under the variant's own ``grid``)
        for name, over in cfg.variants.items():
            over = dict(over)
            grid = {**cfg.grid, **(over.pop("grid", None) or {})}
            groups.append((name, merge(cfg.base, {**over, "method": name}), grid))
        self.cells: list[Cell] = []
        #: every space of every cell (grid key -> distribution; the first cell's where variants differ)
        self.spaces: dict[str, Distribution] = {}
        for name, base, grid in groups or [(None, dict(cfg.base), dict(cfg.grid))]:
            spaces = {k: d for k, v in grid.items() if (d := parse_distribution(k, v)) is not None}
            axes = {k: v for k, v in grid.items() if k not in spaces}
            for k, d in spaces.items():
                self.spaces.setdefault(k, d)
            for combo in itertools.product(*axes.values()):
                data = dict(base)
                for k, v in zip(axes, combo):
                    data = _set(data, k, v)
                self.cells.append(Cell(len(self.cells), name, dict(zip(axes, combo)), _absolute(data), spaces))
        self.searching = cfg.search.algorithm != "grid"
        self.split = dev_split(cfg, int(cfg.base.get("n_edits", TrialConfig.n_edits))) if self.searching else None

    # ------------------------------------------------------------------------------------------------
    # Resolving one trial

    def trial(
        self,
        cell: int,
        phase: Phase,
        repeat: int = 0,
        sampled: dict[str, Any] | None = None,
        index: int | None = None,
    ) -> PlannedTrial:
        """The planned trial of ``cell`` in ``phase``, repeat ``repeat``, with the ``sampled`` values; an
        invalid combination is a :class:`ConfigError` naming the cell and the values."""
        c = self.cells[cell]
        sampled = {k: _plain(v) for k, v in (sampled or {}).items()}
        data = dict(c.data)
        for k, v in sampled.items():
            data = _set(data, k, v)
        data = self._phase(data, phase)
        if self.cfg.repeats > 1:
            data = _repeat(data, repeat)
        try:
            t = parse_config(_absolute(data))
        except ConfigError as e:
            where = ", ".join([c.label()] + [f"{k}={v}" for k, v in sampled.items()])
            raise ConfigError(f"grid ({where}): {e}") from None
        plain = to_dict(t)
        # a search may suggest one configuration twice (a choice-only space, TPE repeating itself): each
        # suggestion is a trial and a run of its own, so its place in the search is part of its key
        key = trial_key(t) if index is None else f"{trial_key(t)}-{index}"
        return PlannedTrial(t, key, t.method_name, phase, cell_id(plain), cell, repeat, index, sampled)

    def _phase(self, data: dict[str, Any], phase: Phase) -> dict[str, Any]:
        """The facts of ``phase``: a search's first ``dev`` facts, the held-out ones after them."""
        if self.split is None or phase == "grid":
            return data
        n_dev, n_test = self.split
        offset = int((data.get("dataset") or {}).get("offset", 0))
        if phase == "search":
            return _set(data, "n_edits", n_dev)
        return _set(_set(data, "n_edits", n_test), "dataset.offset", offset + n_dev)

    # ------------------------------------------------------------------------------------------------
    # Whole phases

    def grid_trials(self) -> list[PlannedTrial]:
        """Every trial of a grid sweep: each cell ``repeats`` times."""
        out = [self.trial(c.index, "grid", r) for c in self.cells for r in range(self.cfg.repeats)]
        if len({t.key for t in out}) != len(out):
            raise ConfigError("grid: two grid points give the same trial (a key repeats a base value?)")
        return out

    def stand_ins(self) -> list[PlannedTrial]:
        """A search's trials as far as they are known before it starts, for validation, planning and the
        dry run: each cell at every combination of its spaces' options (a space with too many options, or
        a continuous one, at its middle); the trials of both phases are checked at every extreme too."""
        out = []
        for c in self.cells:
            for k, d in c.spaces.items():
                for v in d.extremes():
                    for phase in ("search", "heldout") if self.split else ("search",):
                        self.trial(c.index, phase, 0, {k: v})  # type: ignore[arg-type]
            keys = list(c.spaces)
            values = [c.spaces[k].options() or [c.spaces[k].middle()] for k in keys]
            for combo in itertools.product(*values):
                out.append(self.trial(c.index, "search", 0, dict(zip(keys, combo))))
        return out


def expand(cfg: SweepConfig) -> list[TrialConfig]:
    """Every trial config of a grid sweep, validated (:meth:`Cells.grid_trials`); an invalid combination
    names the grid key and values."""
    return [t.config for t in Cells(cfg).grid_trials()]


def _repeat(data: dict[str, Any], r: int) -> dict[str, Any]:
    """Repeat ``r``: seeds moved by ``r`` (the trial's, the context templates'); a sequential trial's
    facts edited in the order of ``dataset.order_seed = r``."""
    out = _set(data, "seed", int(data.get("seed", 0)) + r)
    hp = dict(out.get("hp") or {})
    out = _set(out, "hp.template_seed", int(hp.get("template_seed", 0)) + r)
    if data.get("mode", TrialConfig.mode) != "batch":
        out = _set(out, "dataset.order_seed", r)
    return out


def _plain(v: Any) -> Any:
    """A sampled value as plain data (numpy scalars from a sampler become Python numbers)."""
    if hasattr(v, "item") and not isinstance(v, (list, tuple)):
        return v.item()
    if isinstance(v, tuple):
        return list(v)
    return v


# ----------------------------------------------------------------------------------------------------
# Checks that need no model (the launcher runs them before any work)


def check_metric(where: str, name: str, per_batch: bool = False) -> None:
    """``name`` is ``<stage>.<metric>`` with a stage and a metric the registry declares (``per_batch``:
    one the per-batch reports carry, ``at_edit`` of the headline scores)."""
    stage, _, m = name.partition(".")
    if per_batch and not (stage == "at_edit" and m in (*CORE, *GEN_CORE)):
        raise ConfigError(
            f"{where}: {name!r} is not in the per-batch reports the scheduler reads; use at_edit.<m> with m one "
            f"of {[*CORE, *GEN_CORE]} (the scores of the facts edited so far)"
        )
    if stage not in STAGES or m not in NAMES:
        raise ConfigError(
            f"{where}: {name!r} is not a metric the registry declares; give <stage>.<metric> with stage one of "
            f"{list(STAGES)} (e.g. final.s, at_edit.es, final.gen_s, final.probe_sst2_f1)"
        )


def check_search(cfg: SweepConfig, cells: Cells, trials: list[PlannedTrial] | None = None) -> None:
    """The ``search``, ``scheduler`` and ``repeats`` blocks against the grid (and, given, the trials), each
    error naming its field."""
    s, sch = cfg.search, cfg.scheduler
    if cfg.repeats < 1:
        raise ConfigError(f"repeats: must be >= 1, got {cfg.repeats}")
    if s.num_samples < 1:
        raise ConfigError(f"search.num_samples: must be >= 1, got {s.num_samples}")
    if s.algorithm == "grid":
        if cells.spaces:
            k, d = next(iter(cells.spaces.items()))
            raise ConfigError(
                f"search.algorithm: grid cannot sample grid.{k} ({{{d.kind}: ...}}); set search.algorithm to "
                f"random or optuna, or give grid.{k} a list"
            )
        if s.dev_facts is not None:
            raise ConfigError("search.dev_facts: held-out facts are for a search (search.algorithm random or optuna)")
    else:
        if bare := [c for c in cells.cells if not c.spaces]:
            raise ConfigError(
                f"search.algorithm: {s.algorithm} searches distributions, and the grid of {bare[0].label()} has "
                "none; give a key a distribution (e.g. grid.hp.mom2_update_weight: {loguniform: [100, 100000]}, "
                "or a variant's own grid)"
            )
        if not s.metrics:
            raise ConfigError(f"search.metric: {s.algorithm} needs the metric it optimises (e.g. final.s)")
        if cfg.repeats > 1 and s.dev_facts is None:
            raise ConfigError(
                "repeats: a search repeats its best configurations on held-out facts; set search.dev_facts"
            )
    if s.metrics:
        for m in s.metrics:
            check_metric("search.metric", m)
        if len(set(s.metrics)) != len(s.metrics):
            raise ConfigError("search.metric: every metric at most once")
        if len(s.modes) != len(s.metrics) or any(m not in ("max", "min") for m in s.modes):
            raise ConfigError(f"search.mode: max or min, one per metric ({len(s.metrics)}), got {s.mode!r}")
    if sch is None:
        return
    if len(s.metrics) > 1:
        raise ConfigError(
            f"scheduler: {sch.name} stops trials on one metric, and search.metric lists {len(s.metrics)} "
            "(a Pareto search); drop the scheduler or search one metric"
        )
    if s.algorithm == "grid" and cfg.repeats > 1:
        raise ConfigError(
            f"scheduler: {sch.name} would stop a grid cell's repeats against the other grid points' trials; "
            "drop repeats or the scheduler (a search's held-out repeats are never stopped)"
        )
    check_metric("scheduler.metric", sch.metric, per_batch=True)
    if sch.grace_edits < 1:
        raise ConfigError(f"scheduler.grace_edits: must be >= 1, got {sch.grace_edits}")
    if not 1 < sch.reduction_factor < math.inf:
        raise ConfigError(f"scheduler.reduction_factor: must be > 1, got {sch.reduction_factor}")
    if batch := [t for t in trials or () if t.config.mode == "batch"]:
        raise ConfigError(
            f"scheduler: {sch.name} compares trials by edits applied, and {batch[0].method}'s trials run in "
            "batch mode (every batch edits the unedited model, so a trial has no time to stop at); use "
            "mode sequential-batch or sequential, or drop the scheduler"
        )
