"""Tune as a search: the search algorithm, the early-stopping scheduler and the best configurations.

- :class:`CellSearch` is the sweep's Tune searcher: one of Tune's own ``OptunaSearch`` per cell (a variant
  at one grid point), each over the grid's distributions with its own seed, taking turns so every cell
  gets ``search.num_samples`` trials. A cell searches its own space because the optimum moves with the
  method and the model (λ on SmolLM2 is 50× below Llama-3-8B's, docs/RESULTS.md §2b). ``random`` uses
  Optuna's random sampler, ``optuna`` its TPE sampler (multi-objective when ``search.metric`` is a list).
- :func:`scheduler` is Tune's ASHA on the per-batch reports, time = edits applied, one rung ladder per
  cell (:class:`PerCell`): a trial is stopped against the trials of its own method, not another's.
- :class:`ReadyFirst` feeds a grid's trials to Tune as their shared inputs come to exist.
- :func:`best_of` picks each cell's best trial (or its Pareto set) from the finished results.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..cells import Cells, PlannedTrial, planned_of, space_name

if TYPE_CHECKING:
    from ..config import Distribution, SweepConfig

log = logging.getLogger(__name__)


def _by_index(options: Sequence[Any]) -> bool:
    """Whether a choice is searched by its options' indices: Optuna's categorical choices are None, bools,
    numbers or strings, not lists (``layers: {choice: [[1], [2]]}``)."""
    return not all(o is None or isinstance(o, (bool, int, float, str)) for o in options)


def tune_space(spaces: dict[str, Distribution]) -> dict[str, Any]:
    """A cell's distributions as Tune's own sampling domains (names as :func:`space_name` makes them; a
    choice of lists by index, :func:`_by_index`)."""
    from ray import tune

    out = {}
    for k, d in spaces.items():
        if d.kind == "choice":
            opts = list(d.args)
            out[space_name(k)] = tune.choice(list(range(len(opts))) if _by_index(opts) else opts)
        else:
            out[space_name(k)] = getattr(tune, d.kind)(*d.args)
    return out


def _sampler(cfg: SweepConfig, seed: int) -> Any:
    """Optuna's random sampler, or its TPE sampler starting from a third of the budget at random (Optuna's
    default of 10 random trials would leave a 16-trial search mostly random)."""
    import optuna

    if cfg.search.algorithm == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    startup = min(10, max(2, cfg.search.num_samples // 3))
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup)


def _searcher_base() -> type:
    from ray.tune.search import Searcher

    return Searcher


class CellSearch(_searcher_base()):  # type: ignore[misc]
    """Tune's ``OptunaSearch`` once per cell, taking turns: ``suggest`` asks the cell with the fewest
    trials so far (below ``num_samples``) and tags the suggestion with its cell and its index in the
    search; results go back to the searcher of the trial's cell."""

    def __init__(self, cfg: SweepConfig, cells: Cells) -> None:
        from ray.tune.search.optuna import OptunaSearch

        s = cfg.search
        metric: Any = list(s.metrics) if len(s.metrics) > 1 else s.metrics[0]
        mode: Any = list(s.modes) if len(s.modes) > 1 else s.modes[0]
        super().__init__(metric=metric, mode=mode)
        self.num_samples = s.num_samples
        self.cells = cells
        self.searchers = {
            c.index: OptunaSearch(
                space=OptunaSearch.convert_search_space(tune_space(c.spaces)),
                metric=metric,
                mode=mode,
                sampler=_sampler(cfg, s.seed + c.index),
            )
            for c in cells.cells
        }
        self.count = {c.index: 0 for c in cells.cells}
        self.owner: dict[str, int] = {}
        self.index = 0

    def set_search_properties(self, metric: Any, mode: Any, config: dict, **spec: Any) -> bool:
        return True  # the space and metric are the sweep's own (given at construction)

    def suggest(self, trial_id: str) -> dict | None:
        open_ = [c for c, n in self.count.items() if n < self.num_samples]
        if not open_:
            return self.FINISHED
        cell = min(open_, key=lambda c: (self.count[c], c))
        got = self.searchers[cell].suggest(trial_id)
        if got is None or got == self.FINISHED:
            return None
        self.count[cell] += 1
        self.owner[trial_id] = cell
        planned = self.cells.trial(cell, "search", 0, _unspace(self.cells.cells[cell].spaces, got), self.index)
        self.index += 1
        return planned.point()

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        # Optuna takes intermediate values of one objective, and only the ones its metric is in: the per-batch
        # reports carry at_edit.*, the last report also final.*
        if trial_id in self.owner and isinstance(self.metric, str) and self.metric in result:
            self.searchers[self.owner[trial_id]].on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self.owner:
            self.searchers[self.owner[trial_id]].on_trial_complete(trial_id, result=result, error=error)

    def save(self, checkpoint_path: str) -> None:
        import pickle

        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str) -> None:
        import pickle

        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))


class ReadyFirst(_searcher_base()):  # type: ignore[misc]
    """A grid's trials in plan order, each suggested as soon as it can start: ``startable`` (the sweep's
    service, :meth:`~sweep.shared.service.SharedWork.startable`) says which trials need nothing the driver
    is still fulfilling. So a trial starts when its own inputs exist, not after all the shared work, and no
    trial holds a worker's slot waiting for a task that needs that slot. ``None`` ("nothing to start now",
    asked again at most every ``poll_s``) until every trial was suggested, then ``FINISHED``; also
    ``FINISHED`` once ``stopped()`` (the shared work failed: no further trial starts)."""

    def __init__(
        self, trials: Sequence[PlannedTrial], startable: Any, stopped: Any = lambda: False, poll_s: float = 1.0
    ) -> None:
        super().__init__()
        self.left = list(trials)
        self._startable = startable
        self._stopped = stopped
        self._poll_s = poll_s
        self._next = 0.0

    def set_search_properties(self, metric: Any, mode: Any, config: dict, **spec: Any) -> bool:
        return True  # nothing is searched: the trials are the plan's

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its config (tuner.pkl): not the service of a sweep that will be gone when it is read
        return {**self.__dict__, "_startable": None, "_stopped": None}

    def suggest(self, trial_id: str) -> dict | None:
        if not self.left or self._stopped():
            return self.FINISHED
        now = time.monotonic()
        if now < self._next:
            return None
        ready = self._startable([p.config for p in self.left])
        i = next((i for i, ok in enumerate(ready) if ok), None)
        if i is None:
            self._next = now + self._poll_s
            return None
        return self.left.pop(i).point()

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        pass


def _unspace(spaces: dict[str, Distribution], sampled: dict[str, Any]) -> dict[str, Any]:
    """A suggestion as grid key -> value (indices of a choice of lists turned back into the option)."""
    out = {}
    for k, d in spaces.items():
        v = sampled[space_name(k)]
        out[k] = d.args[int(v)] if d.kind == "choice" and _by_index(d.args) else v
    return out


def _scheduler_base() -> type:
    from ray.tune.schedulers import FIFOScheduler

    return FIFOScheduler


class PerCell(_scheduler_base()):  # type: ignore[misc]
    """One Tune scheduler per group of trials (made by ``make``), so ASHA's rungs compare a trial only with
    its own kind: a search's trials with the other suggestions of their cell (method and grid point); a
    grid's trials with the other grid points of their method (its cells are single configurations)."""

    def __init__(self, make: Any, metric: str, mode: str) -> None:
        super().__init__()
        self._metric, self._mode = metric, mode
        self._make = make
        self._by_cell: dict[str, Any] = {}

    def _of(self, trial: Any) -> Any:
        p = planned_of(trial.config)
        group = f"cell {p.cell_index}" if p.phase == "search" else p.method
        if group not in self._by_cell:
            self._by_cell[group] = self._make()
        return self._by_cell[group]

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        self._of(trial).on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        return self._of(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        self._of(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        self._of(trial).on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return "; ".join(f"{g}: {s.debug_string()}" for g, s in sorted(self._by_cell.items()))


def scheduler(cfg: SweepConfig, max_edits: int) -> Any | None:
    """Tune's ASHA per cell on ``scheduler.metric``, time = edits applied (None: no scheduler)."""
    sch = cfg.scheduler
    if sch is None:
        return None
    from ray.tune.schedulers import ASHAScheduler

    def make() -> Any:
        return ASHAScheduler(
            time_attr="edits",
            metric=sch.metric,
            mode=sch.mode,
            max_t=max_edits,
            grace_period=min(sch.grace_edits, max_edits),
            reduction_factor=sch.reduction_factor,
        )

    return PerCell(make, sch.metric, sch.mode)


# ----------------------------------------------------------------------------------------------------
# The best configurations


@dataclass(frozen=True)
class Best:
    """One of a cell's best trials: its sampled values and its metrics."""

    cell: int
    method: str
    key: str
    sampled: dict[str, Any]
    values: dict[str, float]

    def as_dict(self, run_id: str | None = None) -> dict[str, Any]:
        cfg = {f"{k}": v for k, v in self.sampled.items()}
        return {"run_id": run_id, "trial_key": self.key, "values": self.values, "config": cfg}


def pareto(points: Sequence[Sequence[float]], modes: Sequence[str]) -> list[int]:
    """Indices of the non-dominated ``points`` (each a value per objective, ``modes`` max/min)."""
    sign = [1.0 if m == "max" else -1.0 for m in modes]
    vals = [[s * v for s, v in zip(sign, p)] for p in points]
    out = []
    for i, p in enumerate(vals):
        dominated = any(
            all(q[j] >= p[j] for j in range(len(p))) and any(q[j] > p[j] for j in range(len(p)))
            for k, q in enumerate(vals)
            if k != i
        )
        if not dominated:
            out.append(i)
    return out


def best_of(cfg: SweepConfig, finished: Sequence[tuple[PlannedTrial, dict[str, Any]]]) -> dict[int, list[Best]]:
    """Per cell, its best trial by ``search.metric`` (one metric) or its Pareto set (several), from
    (trial, its metrics) of the trials that finished (a trial stopped early has no final metrics and is
    left out)."""
    metrics, modes = cfg.search.metrics, cfg.search.modes
    by_cell: dict[int, list[Best]] = {}
    for t, m in finished:
        vals = {k: m.get(k) for k in metrics}
        if any(not isinstance(v, (int, float)) or not math.isfinite(v) for v in vals.values()):
            continue
        by_cell.setdefault(t.cell_index, []).append(Best(t.cell_index, t.method, t.key, t.sampled, vals))  # type: ignore[arg-type]
    return {cell: _select(cands, metrics, modes) for cell, cands in by_cell.items()}


def per_method(cfg: SweepConfig, best: dict[int, list[Best]]) -> dict[str, list[Best]]:
    """The best of each method over its cells (a method with grid axes has several): the best one (one
    metric) or the Pareto set of its cells' points (several)."""
    by_method: dict[str, list[Best]] = {}
    for _, bs in sorted(best.items()):
        by_method.setdefault(bs[0].method, []).extend(bs)
    return {m: _select(bs, cfg.search.metrics, cfg.search.modes) for m, bs in by_method.items()}


def _select(cands: list[Best], metrics: Sequence[str], modes: Sequence[str]) -> list[Best]:
    """The best of ``cands`` by one metric, or their Pareto set by several (ties: a fixed order)."""
    cands = sorted(cands, key=lambda b: b.key)  # not Tune's finishing order
    if len(metrics) == 1:
        sign = 1.0 if modes[0] == "max" else -1.0
        return [max(cands, key=lambda b: sign * b.values[metrics[0]])]
    return [cands[i] for i in pareto([[b.values[k] for k in metrics] for b in cands], modes)]
