"""Shared work on demand: one actor on the driver's node hands every trial its shared inputs.

A trial that a search suggests after launch (a new λ, a new layer) was never planned, so nothing was
fulfilled for it by trial key. The service plans its shared work when it asks (:func:`sweep.shared.needs.
plan_shared` on that one trial) and looks each piece up by **what it is** (statistics by (group, layer),
values and scores by (key, fact), perplexity and probes by key), so a piece that any trial, the up-front
fulfilment (:class:`sweep.shared.fulfil.Feed`) or an earlier sweep (the stores) produced is found:

    ask(trial)  ->  complete: its references      (hand_out: what it needs, wherever it came from)
                ->  else one missing unit: read from the stores by the service, or granted to the asker,
                    which computes it on the model it has loaded and its own device, and delivers it
                ->  else wait: other trials are computing what is missing (poll again)

Why the asking trial computes: it holds a GPU (or CPU) slot and the model already; a separate task would
need a slot that waiting trials hold (a deadlock once every slot waits), and a model load. A unit goes to
one trial at a time (a lease, renewed while it computes and dropped when it expires, so a dead trial's
unit is granted again), and trials that need the same units split them chunk by chunk.

A grid's shared work is planned whole and fulfilled by the driver beside the trials (its statistics
passes split over every free worker): those units are the driver's (:meth:`SharedWork.expect`), granted
to no trial, and each is supplied as it ends (:meth:`SharedWork.supply`). The driver starts a trial only
when nothing it needs is still the driver's to fulfil (:meth:`SharedWork.startable`), so no trial holds a
slot that the driver's tasks wait for.

The service writes every delivered unit to the stores (it runs on the driver's node, whose disk holds
them) and puts the copy the trials read: every object is owned by the head, none by the worker that
computed it. Its counters (:class:`sweep.shared.fulfil.WorkCounts`) say what was computed and what was read.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from editors.config import ConfigError, to_dict

from .fulfil import (
    Done,
    FactUnit,
    Fulfilled,
    LocalBackend,
    MeasureUnit,
    Moments,
    StatsUnit,
    Unit,
    hand_out,
    ray_handle,
    units_of,
)
from .keys import TrialInputs, TrialRefs, inputs_of

if TYPE_CHECKING:
    from ..config import SweepConfig, TrialConfig
    from .needs import SharedPlan, TrialNeeds

log = logging.getLogger(__name__)

#: A grant lapses when its holder has not renewed it for this long (it is then granted again).
LEASE_S = 120.0
#: How often a computing trial renews its grant, and how often a waiting trial asks again.
RENEW_S = 15.0
POLL_S = 2.0
#: The holder of the units the driver fulfils up front (:meth:`SharedWork.expect`).
DRIVER = "driver"


@dataclass(frozen=True)
class Grant:
    """A unit granted to the asking trial: compute it and :meth:`SharedWork.deliver` it under ``token``."""

    token: str
    unit: Unit


@dataclass(frozen=True)
class Answer:
    """What :meth:`SharedWork.ask` says: the trial's references (complete), a unit to compute, or how many
    units others are computing (ask again)."""

    refs: TrialRefs | None = None
    grant: Grant | None = None
    waiting: int = 0


def unit_ids(unit: Unit) -> list[tuple]:
    """What a unit holds, piece by piece, as the service indexes it."""
    if isinstance(unit, StatsUnit):
        return [("stats", unit.group, layer) for layer in unit.layers]
    if isinstance(unit, MeasureUnit):
        return [(unit.kind, unit.key)]
    return [("facts", unit.key, d) for d in unit.digests]


def _subunit(unit: Unit, keep: set[tuple]) -> Unit:
    """The part of ``unit`` whose pieces are in ``keep``."""
    if isinstance(unit, StatsUnit):
        return replace(unit, keys={la: k for la, k in unit.keys.items() if ("stats", unit.group, la) in keep})
    if isinstance(unit, FactUnit):
        pairs = [(r, d) for r, d in zip(unit.records, unit.digests) if ("facts", unit.key, d) in keep]
        # a part of a planned chunk is not a file of its own: read it from every part of the key
        part = len(pairs) != len(unit.digests)
        return replace(
            unit,
            records=tuple(r for r, _ in pairs),
            digests=tuple(d for _, d in pairs),
            planned_stored=unit.planned_stored or part,
        )
    return unit


@dataclass
class _Lease:
    ids: list[tuple]
    unit: Unit
    deadline: float
    holder: str  # "service" while it reads the stores, DRIVER for the up-front fulfilment, else the trial's key


@dataclass
class _Planned:
    needs: TrialNeeds
    units: list[Unit]


class SharedWork:
    """The service's state and methods; :func:`start` runs it as a Ray actor (threaded: many trials ask at
    once), and tests call it in-process. What the driver fulfils up front comes unit by unit
    (:meth:`expect`, :meth:`supply`)."""

    def __init__(
        self,
        cfg: SweepConfig,
        put: Callable[[Unit, Any], Any] | None = None,
        budget_gb: float | None = None,
        reach: Sequence[Sequence[int]] = (),
    ) -> None:
        self.cfg = cfg
        self.budget_gb = budget_gb  # a worker's device memory for a statistics pass (None: no limit)
        self.reach = [tuple(ls) for ls in reach]  # the layer sets a search can suggest (Cells.stand_ins)
        self.got = Fulfilled()
        self._put = put or (lambda unit, value: value)
        self._lock = threading.Lock()
        self._leases: dict[str, _Lease] = {}
        self._busy: dict[tuple, str] = {}
        self._plans: dict[str, _Planned] = {}
        self._reach_passes: dict[str, list[StatsUnit]] = {}  # statistics group -> its reachable layers' passes
        self._have: set[tuple] = set()

    # ------------------------------------------------------------------------------------------------
    # What is there

    def _plan(self, t: TrialConfig, key: str) -> _Planned:
        if key not in self._plans:
            from .needs import plan_shared

            plan: SharedPlan = plan_shared(self.cfg, [t], [key], budget_gb=self.budget_gb)
            need = plan.needs[key]
            units = units_of(plan, self.cfg)
            passes = self._passes(t, need) if need.stats_group is not None and self.reach else []
            if set(need.layers) <= {layer for u in passes for layer in u.layers}:  # else its own passes
                units = [u for u in units if not isinstance(u, StatsUnit)] + passes
            self._plans[key] = _Planned(need, units)
        return self._plans[key]

    def _passes(self, t: TrialConfig, need: TrialNeeds) -> list[StatsUnit]:
        """The statistics passes over every layer the search can reach (:attr:`reach`), planned together
        under the budget (once per statistics group), that hold a layer of this trial: a pass costs the
        forward to its deepest layer, so the first trial to ask computes them all in one pass instead of
        one pass per suggested layer."""
        group = need.stats_group
        assert group is not None
        if group not in self._reach_passes:
            from ..config import parse_config
            from .needs import plan_shared

            others = []
            for layers in dict.fromkeys(self.reach):
                if list(layers) != list(need.layers):
                    try:  # a layer set of another method's space may not suit this one (ROME: one layer)
                        others.append(parse_config({**to_dict(t), "layers": list(layers)}))
                    except ConfigError:
                        continue
            keys = [f"reach-{i}" for i in range(len(others) + 1)]
            plan = plan_shared(self.cfg, [t, *others], keys, budget_gb=self.budget_gb)
            self._reach_passes[group] = [u for u in units_of(plan, self.cfg) if isinstance(u, StatsUnit)]
        mine = set(need.layers)
        return [u for u in self._reach_passes[group] if u.group == group and mine & set(u.layers)]

    def _expire(self, now: float) -> None:
        for token, lease in list(self._leases.items()):
            if lease.deadline < now:
                log.warning(
                    "shared work: the grant of %s to %s lapsed; it is granted again", lease.ids[:1], lease.holder
                )
                self._drop(token)

    def _drop(self, token: str) -> None:
        lease = self._leases.pop(token, None)
        for i in lease.ids if lease else ():
            self._busy.pop(i, None)

    # ------------------------------------------------------------------------------------------------
    # The protocol

    def ask(self, t: TrialConfig) -> Answer:
        """The trial's references when everything it needs exists; else a unit for it to compute (after
        the stores were tried); else how many of its units others are computing."""
        from ..config import trial_key

        key = trial_key(t)
        with self._lock:
            planned = self._plan(t, key)
        while True:
            with self._lock:
                self._expire(time.monotonic())
                left = [u for u in planned.units if any(i not in self._have for i in unit_ids(u))]
                if not left:
                    return Answer(refs=hand_out(planned.needs, self.got))
                free = None
                for u in left:
                    ids = {i for i in unit_ids(u) if i not in self._have and i not in self._busy}
                    if ids:
                        free = _subunit(u, ids)
                        break
                if free is None:
                    return Answer(waiting=len(left))
                token = uuid.uuid4().hex
                self._hold(token, free, "service")
            value = free.read()  # the stores first: an earlier sweep, or another sweep at once
            if value is None:
                with self._lock:
                    self._leases[token].holder = key
                    self._leases[token].deadline = time.monotonic() + LEASE_S
                log.info("shared work: %s granted to trial %s", _what(free), key)
                return Answer(grant=Grant(token, free))
            self._take(token, free, value, computed=False, seconds=0.0)

    def _hold(self, token: str, unit: Unit, holder: str) -> None:
        ids = unit_ids(unit)
        self._leases[token] = _Lease(ids, unit, time.monotonic() + LEASE_S, holder)
        for i in ids:
            self._busy[i] = token

    def renew(self, token: str) -> bool:
        """Keep a grant while its unit is computed (False: it lapsed and was granted again)."""
        with self._lock:
            lease = self._leases.get(token)
            if lease is None:
                return False
            lease.deadline = time.monotonic() + LEASE_S
            return True

    def release(self, token: str) -> None:
        """Give a grant back (its computation failed): the unit is granted to the next trial that asks."""
        with self._lock:
            self._drop(token)

    def deliver(self, token: str, unit: Unit, value: Any, seconds: float) -> None:
        """Store the granted ``unit``'s ``value`` (statistics: layer -> SecondMoment; values: [n, d_model];
        scores: rows; a measure) and make it what trials are handed (also under a grant that lapsed
        meanwhile: the value is as good)."""
        if isinstance(value, StatsRefs):
            value = value.moments()
        elif isinstance(unit, StatsUnit):
            value = Moments.of(value)
        unit.write(value)
        self._take(token, unit, value, computed=True, seconds=seconds)

    def _take(self, token: str, unit: Unit, value: Any, computed: bool, seconds: float) -> None:
        tokens = value.tokens if isinstance(value, Moments) else {}
        handle = self._put(unit, value)
        with self._lock:
            self.got.take(unit, Done(handle, computed, seconds, tokens))
            self._have.update(unit_ids(unit))
            self._drop(token)
        log.info("shared work: %s %s", _what(unit), "computed by a trial" if computed else "read from the store")

    # ------------------------------------------------------------------------------------------------
    # The driver's up-front fulfilment, handed over unit by unit

    def expect(self, units: Sequence[Unit]) -> None:
        """Mark ``units`` as being fulfilled by the driver (:func:`sweep.shared.fulfil.fulfil_ray`): no
        trial is granted them, and a trial that needs one is not :meth:`startable` until it is supplied."""
        with self._lock:
            for unit in units:
                token = uuid.uuid4().hex
                self._hold(token, unit, DRIVER)
                self._leases[token].deadline = float("inf")  # the driver's own tasks, retried by Ray

    def supply(self, unit: Unit, done: Done) -> None:
        """A unit the driver fulfilled: its handles (copies the driver owns) become what trials are handed."""
        with self._lock:
            self.got.take(unit, done, count=False)  # the driver's feed counts its own work
            self._have.update(unit_ids(unit))
            for token in {self._busy[i] for i in unit_ids(unit) if i in self._busy}:
                if self._leases[token].holder == DRIVER:
                    self._drop(token)

    def startable(self, trials: Sequence[TrialConfig]) -> list[bool]:
        """For each trial, whether it can start without waiting on the driver: none of the pieces it needs
        is still the driver's to fulfil (a missing piece that is not, the trial computes itself)."""
        from ..config import trial_key

        out = []
        with self._lock:
            for t in trials:
                planned = self._plan(t, trial_key(t))
                missing = [i for u in planned.units for i in unit_ids(u) if i not in self._have]
                out.append(not any(self._leases[self._busy[i]].holder == DRIVER for i in missing if i in self._busy))
        return out

    def counts(self) -> dict[str, float]:
        """What this service computed (through the trials) and read, as :class:`WorkCounts` says it."""
        with self._lock:
            return self.got.work.as_dict()


def _what(unit: Unit) -> str:
    if isinstance(unit, StatsUnit):
        return f"statistics of layers {unit.layers}"
    if isinstance(unit, MeasureUnit):
        return f"the unedited model's {'perplexity' if unit.kind == 'ppl' else 'capability probes'}"
    return f"{unit.size} {'target values' if unit.kind == 'values' else 'pre-edit scores'}"


# ----------------------------------------------------------------------------------------------------
# On Ray


@dataclass(frozen=True)
class StatsRefs:
    """A computed pass as a Ray trial delivers it: one object-store reference per layer's
    :class:`SecondMoment`, so the service fetches, stores and copies one layer's C at a time (a Llama-3-8B
    layer is 822 MB) instead of receiving the whole pass in one call."""

    refs: dict[int, Any]
    tokens: dict[int, int]

    def moments(self) -> Moments:
        import ray

        return Moments({la: (lambda r=r: ray.get(r)) for la, r in self.refs.items()}, dict(self.tokens))


class _RaySharedWork(SharedWork):
    def __init__(
        self,
        cfg: SweepConfig,
        budget_gb: float | None,
        reach: Sequence[Sequence[int]],
    ) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        super().__init__(cfg, ray_handle, budget_gb, reach)

    def node(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()


def start(
    cfg: SweepConfig,
    budget_gb: float | None = None,
    reach: Sequence[Sequence[int]] = (),
) -> Any:
    """The service as a threaded Ray actor on this (the driver's) node: its stores are this node's disk
    and the objects it puts live in this node's object store. No CPU is reserved for it. ``budget_gb``
    bounds a statistics pass as planning does; ``reach``: the layer sets a search can suggest, whose
    statistics are computed together (:meth:`SharedWork._passes`)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    actor = (
        ray.remote(_RaySharedWork)
        .options(
            num_cpus=0,
            max_concurrency=256,
            scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False),
            max_restarts=0,
        )
        .remote(cfg, budget_gb, [list(ls) for ls in reach])
    )
    ray.get(actor.node.remote())  # started (its errors surface here, not in the first trial)
    return actor


# ----------------------------------------------------------------------------------------------------
# The trial's side


@dataclass
class Obtained:
    """A trial's inputs and what it computed for the sweep on the way (units, seconds)."""

    inputs: TrialInputs
    computed: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    waited_s: float = 0.0


def obtain(
    ask: Callable[[TrialConfig], Answer],
    renew: Callable[[str], bool],
    release: Callable[[str], None],
    deliver: Callable[[str, Unit, Any, float], None],
    trial: TrialConfig,
    model: Any,
    tok: Any,
    get: Callable[[Any], Any],
    poll_s: float = POLL_S,
) -> Obtained:
    """Ask until the trial's inputs are complete, computing what the service grants on ``model`` and
    delivering it; ``get`` resolves a handle (``ray.get`` in a Ray trial)."""
    backend = LocalBackend(model, tok, progress=False)
    out = Obtained(TrialInputs())
    t0 = time.perf_counter()
    while True:
        a = ask(trial)
        if a.refs is not None:
            out.inputs = inputs_of(a.refs, get)
            out.waited_s = time.perf_counter() - t0 - out.seconds
            return out
        if a.grant is None:
            time.sleep(poll_s)
            continue
        unit = a.grant.unit
        stop = threading.Event()
        keeper = threading.Thread(target=_keep, args=(renew, a.grant.token, stop), daemon=True)
        keeper.start()
        try:
            value, _, secs = backend.compute(unit)
            value = _to_cpu(value)
        except BaseException:
            release(a.grant.token)
            raise
        finally:
            stop.set()
        deliver(a.grant.token, unit, value, secs)
        out.computed[unit.kind] = out.computed.get(unit.kind, 0) + unit.size
        out.seconds += secs


def _to_cpu(value: Any) -> Any:
    """A computed value as it travels to the service: statistics as layer -> SecondMoment, tensors on the CPU."""
    import torch

    if isinstance(value, Moments):
        return {layer: replace(sm, mom2=sm.mom2.cpu()) for layer in value for sm in [value[layer]]}
    return value.cpu() if isinstance(value, torch.Tensor) else value


def _keep(renew: Callable[[str], bool], token: str, stop: threading.Event) -> None:
    while not stop.wait(RENEW_S):
        if not renew(token):
            return


def obtain_ray(service: Any, trial: TrialConfig, model: Any, tok: Any) -> Obtained:
    """:func:`obtain` through the service actor (in a Tune trial)."""
    import ray

    def deliver(token: str, unit: Unit, value: Any, seconds: float) -> None:
        if isinstance(unit, StatsUnit):  # a layer at a time (StatsRefs)
            value = StatsRefs(
                {la: ray.put(sm) for la, sm in value.items()}, {la: sm.n_tokens for la, sm in value.items()}
            )
        ray.get(service.deliver.remote(token, unit, value, seconds))

    return obtain(
        lambda t: ray.get(service.ask.remote(t)),
        lambda tok_: ray.get(service.renew.remote(tok_)),
        lambda tok_: ray.get(service.release.remote(tok_)),
        deliver,
        trial,
        model,
        tok,
        ray.get,
    )
