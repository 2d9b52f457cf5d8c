"""Fulfil a shared-work plan: every trial's complete inputs, each piece computed once, stored by one owner.

Planning (:mod:`sweep.shared.needs`: shapes, memory, passes, the content keys, cost) says *what* the trials
share; this module makes it exist. The plan becomes **units** (a statistics pass, a chunk of target values
or of pre-edit scores, a perplexity), and each unit goes through one rule, whoever runs it:

    read it from the stores  ->  else claim it (a lease, :func:`editors.store.claim`), compute it on a
    backend, write it to the stores  ->  hand it to the trials that need it

The stores live with the process that fulfils (the driver, on a cluster the head node): the backend only
computes and *returns* its result, the fulfiller writes it. So nothing a sweep computes is stranded on a
worker's disk, a second sweep or ``--resume`` on the same cluster reads it whichever nodes ran the first
one, and two sweeps at once compute each unit once (the lease). Two backends:

- :class:`LocalBackend` computes on a model loaded in this process (:func:`sweep.trial.trial_alone`, which
  ``python -m sweep.trial`` runs, and notebooks); :func:`fulfil_local` returns ``{trial key: TrialInputs}``;
- :class:`RayBackend` submits each unit as Ray tasks (:mod:`sweep.shared.tasks`'s bodies, handed in by the
  launcher), all at once, so passes and chunks run on every free worker, a statistics pass split over
  the workers (its parts' sums added here); a task that holds a GPU runs in a process that exits after
  it, which frees the device and the model it loaded. The driver fetches every result, writes it and
  puts the copy trials read (a layer at a time), dropping the task's own: the objects are the driver's,
  none stays on the worker that computed it. :func:`fulfil_ray` returns ``{trial key: TrialRefs}``
  (references a trial resolves on its worker).

The work itself is :mod:`sweep.shared.compute`'s.

The work counters (:class:`WorkCounts`) count what this fulfilment computed and what it read, unit by unit.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from editors.stats import MomentSums, SecondMoment, StatsKey, StreamSlice, add_sums
from editors.store import claim, part_name

from .compute import compute_ppl, compute_probes, compute_scores, compute_stats, compute_values
from .keys import (
    PplKey,
    ProbesKey,
    ScoresKey,
    ScoresStore,
    TrialInputs,
    TrialRefs,
    ValuesKey,
    ValuesStore,
    as_tensor,
    inputs_of,
    stats_dtype,
    stats_store,
)
from .mirror import loadable

if TYPE_CHECKING:
    from ..config import SweepConfig, TrialConfig
    from ..evals.data import Record
    from .needs import SharedPlan, TrialNeeds

log = logging.getLogger(__name__)

#: Set to N to make the fulfilling process SIGKILL itself once N value/score chunks are stored (fault drill).
CHAOS_KILL_ENV = "MODEL_EDITING_CHAOS_KILL_LAUNCHER_AFTER"


# ----------------------------------------------------------------------------------------------------
# Units: one piece of shared work, its store entries and its claim


@dataclass(frozen=True)
class StatsUnit:
    """The statistics of the layers of ``keys`` (one pass; keys built at planning) in ``store`` (None: not
    stored), shared by the trials of ``group``; computed on Ray in ``shards`` parts (:meth:`parts`)."""

    trial: TrialConfig
    group: str  # the trials that share these statistics (sweep.shared.needs.stats_group)
    keys: dict[int, StatsKey]
    store: str | None
    kind: str = "stats"
    shards: int = 1  # workers the pass splits over (sweep.shared.needs.stats_workers)

    @property
    def layers(self) -> list[int]:
        return sorted(self.keys)

    def parts(self) -> list[StreamSlice]:
        """The parts of the pass's token stream, one task each, whose sums add up to the one-pass C
        (:func:`sweep.shared.needs.pass_parts`: ``shards`` of them, fewer for a stream of fewer tokens or
        texts, one when no cap bounds the stream or the pass checks its convergence)."""
        from .needs import pass_parts

        return pass_parts(self.trial, self.shards)

    @property
    def size(self) -> int:
        return len(self.keys)

    def locks(self) -> list[Path]:
        return [stats_store(self.store).path(self.keys[layer]) for layer in self.layers] if self.store else []

    def stored(self) -> bool:
        """Whether the store holds every layer (file headers only: a claim's waiter polls this)."""
        return bool(self.store) and all(key in stats_store(self.store) for key in self.keys.values())

    def read(self) -> Moments | None:
        """The stored statistics, each layer read from disk only when asked for."""
        if not self.stored():
            return None
        store = stats_store(self.store)  # type: ignore[arg-type]

        def fetch(key: StatsKey) -> SecondMoment:
            sm = store.get(key)
            if sm is None:
                raise FileNotFoundError(f"statistics of layer {key.layer} left the store {store.root}")
            return sm

        tokens = {layer: store.n_tokens(key) for layer, key in self.keys.items()}  # each header read (copied)
        if any(n is None for n in tokens.values()):
            return None  # an entry the store's remote named but that cannot be read: computed again
        fetches = {layer: (lambda k=key: fetch(k)) for layer, key in self.keys.items()}
        return Moments(fetches, tokens)  # type: ignore[arg-type]

    def write(self, value: Moments) -> None:
        if self.store:
            for layer in self.layers:  # one layer in memory at a time
                stats_store(self.store).put(self.keys[layer], value[layer])


class Moments(Mapping[int, SecondMoment]):
    """A pass's statistics, layer -> :class:`SecondMoment`, each fetched when asked for (from a store or
    the object store) and not kept: a 29-layer pass of Llama-3-8B (24 GB) never sits in memory whole."""

    def __init__(self, fetch: dict[int, Callable[[], SecondMoment]], tokens: dict[int, int] | None = None) -> None:
        self._fetch, self._tokens = fetch, tokens

    @classmethod
    def of(cls, got: Mapping[int, SecondMoment]) -> Moments:
        """Statistics already in memory."""
        return cls(
            {layer: (lambda sm=sm: sm) for layer, sm in got.items()}, {la: sm.n_tokens for la, sm in got.items()}
        )

    def __getitem__(self, layer: int) -> SecondMoment:
        return self._fetch[layer]()

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(self._fetch))

    def __len__(self) -> int:
        return len(self._fetch)

    @property
    def tokens(self) -> dict[int, int]:
        """Tokens averaged into each layer's C (from the pass's record when known, else the matrices)."""
        return dict(self._tokens) if self._tokens is not None else {la: self[la].n_tokens for la in self}


@dataclass(frozen=True)
class FactUnit:
    """A chunk of per-fact work: target values (``kind="values"``, a [n, d_model] tensor) or pre-edit
    score rows (``kind="scores"``, one dict per fact) of ``records``, under ``key`` in ``store``.
    ``planned_stored``: the planner found these facts in the store, maybe in parts of other chunkings
    (read them from every part); otherwise only this chunk's own part can hold them (one file to read)."""

    kind: str
    trial: TrialConfig
    key: ValuesKey | ScoresKey
    records: tuple[Record, ...]
    digests: tuple[str, ...]
    store: str | None
    planned_stored: bool = False

    @property
    def size(self) -> int:
        return len(self.digests)

    def _store(self) -> ValuesStore | ScoresStore:
        return ValuesStore(self.store) if self.kind == "values" else ScoresStore(self.store)

    def stored(self) -> bool:
        return self.read() is not None

    def locks(self) -> list[Path]:
        if not self.store:
            return []
        ext = "safetensors" if self.kind == "values" else "json"
        return [self._store().store.path(self.key, part_name(list(self.digests)), ext=ext)]

    def read(self) -> Any | None:
        if not self.store:
            return None
        part = None if self.planned_stored else part_name(list(self.digests))
        got = self._store().get(self.key, self.digests, part=part)  # type: ignore[arg-type]
        if len(got) != len(self.digests):
            return None
        rows = [got[d] for d in self.digests]
        return torch.stack(rows) if self.kind == "values" else rows

    def write(self, value: Any) -> None:
        if not self.store:
            return
        if self.kind == "values":
            ValuesStore(self.store).put(self.key, self.digests, value)  # type: ignore[arg-type]
        else:
            ScoresStore(self.store).put_rows(self.key, self.digests, value)  # type: ignore[arg-type]


@dataclass(frozen=True)
class MeasureUnit:
    """A measure of the unedited model under ``key``: its held-out perplexity (``kind`` ``ppl``, a
    float under a :class:`PplKey`) or its capability probes (``probes``, ``probe_<task>_<metric>`` ->
    value under a :class:`ProbesKey`)."""

    trial: TrialConfig
    key: PplKey | ProbesKey
    store: str | None
    kind: str = "ppl"
    size: int = 1

    def locks(self) -> list[Path]:
        return [ScoresStore(self.store).store.path(self.key, ext="json")] if self.store else []

    def stored(self) -> bool:
        return self.read() is not None

    def read(self) -> Any:
        if not self.store:
            return None
        ss = ScoresStore(self.store)
        return ss.get_ppl(self.key) if self.kind == "ppl" else ss.get_probes(self.key)  # type: ignore[arg-type]

    def write(self, value: Any) -> None:
        if not self.store:
            return
        if self.kind == "ppl":
            ScoresStore(self.store).put_ppl(self.key, value)  # type: ignore[arg-type]
        else:
            ScoresStore(self.store).put_probes(self.key, value)  # type: ignore[arg-type]


Unit = StatsUnit | FactUnit | MeasureUnit


def units_of(plan: SharedPlan, cfg: SweepConfig, shards: int = 1) -> list[Unit]:
    """The plan's units: its statistics passes (layers the store held at planning form their own unit,
    read, not computed), each to be split over ``shards`` workers on Ray; per values/scores key, the
    facts the store held at planning as one unit (one scan of the key's parts) and the missing ones in
    chunks of ``values_chunk``; each perplexity."""
    out: list[Unit] = [
        StatsUnit(p.trial, p.group, dict(p.keys), p.trial.stats.store, shards=1 if p.read_only else shards)
        for p in plan.passes
    ]
    for kind, jobs, store in (("values", plan.values, cfg.values_store), ("scores", plan.scores, cfg.scores_store)):
        for job in jobs.values():
            have = [(r, d) for r, d in zip(job.records, job.digests) if d in job.cached]
            missing = job.missing()
            chunks = [(True, have)] * bool(have)
            chunks += [(False, missing[i : i + cfg.values_chunk]) for i in range(0, len(missing), cfg.values_chunk)]
            for stored, chunk in chunks:
                recs, ds = tuple(r for r, _ in chunk), tuple(d for _, d in chunk)
                out.append(FactUnit(kind, job.trial, job.key, recs, ds, store, stored))
    out += [MeasureUnit(t, key, cfg.scores_store) for key, t in plan.ppl.items()]
    out += [MeasureUnit(t, key, cfg.scores_store, "probes") for key, t in plan.probes.items()]
    return out


# ----------------------------------------------------------------------------------------------------
# Backends


class Backend(Protocol):
    """Computes a unit's value and turns values into what trials are handed (``handle``)."""

    def compute(self, unit: Unit) -> tuple[Any, Any, float]:
        """(the unit's value in this process, for the stores; its handle for the trials; the seconds
        the computation itself took, on whichever node ran it)."""

    def handle(self, unit: Unit, value: Any) -> Any:
        """The handle of a value read from the stores."""


class LocalBackend:
    """Computes on a model loaded in this process (a copy in ``stats.model_dtype`` for statistics when
    that differs from the model's dtype); handles are the values themselves."""

    def __init__(self, model: Any, tok: Any, progress: bool = True) -> None:
        self.model, self.tok, self.progress = model, tok, progress

    def _stats_model(self, cfg: TrialConfig) -> tuple[Any, Any]:
        if stats_dtype(cfg) == cfg.model.dtype:
            return self.model, self.tok
        from editors import load_model

        mc = loadable(cfg.model)
        dev = str(self.model.device)
        return load_model(mc.source, gguf_file=mc.gguf_file, revision=mc.revision, dtype=stats_dtype(cfg), device=dev)

    def compute(self, unit: Unit) -> tuple[Any, Any, float]:
        t = unit.trial
        t0 = time.perf_counter()
        if isinstance(unit, StatsUnit):
            model, tok = self._stats_model(t)
            value: Any = Moments.of(compute_stats(t, model, tok, unit.layers, self.progress))
        elif isinstance(unit, MeasureUnit):
            measure = compute_ppl if unit.kind == "ppl" else compute_probes
            value = measure(t, self.model, self.tok)
        elif unit.kind == "values":
            value = compute_values(t, self.model, self.tok, unit.records)
        else:
            value = compute_scores(t, self.model, self.tok, unit.records)
        return value, value, time.perf_counter() - t0

    def handle(self, unit: Unit, value: Any) -> Any:
        return value


class RayTasks(Protocol):
    """The task bodies a :class:`RayBackend` submits (:mod:`sweep.shared.tasks` is one: they load the model
    once per worker process and return what they compute)."""

    def stats_task(self, trial: dict[str, Any], layers: list[int], part: dict[str, Any] | None = None) -> Any: ...
    def values_task(self, trial: dict[str, Any], records: list[Any]) -> tuple[Any, float]: ...
    def scores_task(self, trial: dict[str, Any], records: list[Any]) -> tuple[list[dict[str, float]], float]: ...
    def ppl_task(self, trial: dict[str, Any]) -> tuple[float, float]: ...

    def probes_task(self, trial: dict[str, Any]) -> tuple[dict[str, float], float]: ...


class RayBackend:
    """Submits each unit as Ray tasks (``tasks``' bodies) with ``options`` (CPUs, GPUs, retries) and
    waits for them; a statistics pass as one task per part of its token stream (:meth:`StatsUnit.parts`).

    Every handle is a copy this process (the driver) puts, never a task's own return: the driver fetches
    what a task returns, makes the handle and drops the task's references, so the object store of the
    worker that computed a unit holds none of it afterwards (a node that leaves, or is scaled down,
    loses nothing and re-runs nothing). Statistics come back one layer at a time: a part returns one
    object per layer, and the driver adds one layer's parts, divides, puts and lets them go before the
    next layer.

    A task that asks for GPUs runs in a worker process that exits after it (``max_calls=1``): the process
    that ran it would otherwise keep the model in its cache (:mod:`sweep.shared.tasks`) and the CUDA
    allocator's memory until the trial placed on that GPU runs out of memory. CPU tasks reuse their
    processes (and the model they loaded)."""

    def __init__(self, options: dict[str, Any], tasks: RayTasks) -> None:
        self.options, self.tasks = options, tasks
        self._remotes: dict[tuple[Callable[..., Any], int], Any] = {}
        self._lock = threading.Lock()

    def _remote(self, fn: Callable[..., Any], num_returns: int) -> Any:
        """``fn`` as a Ray remote function with this backend's options. Ray makes a GPU function's
        processes single-use only in the ``ray.remote(num_gpus=...)(fn)`` form (a later ``.options(num_gpus
        =...)`` keeps reusing them, and ``max_calls`` cannot be set there), so it is set here."""
        import ray

        key = (fn, num_returns)
        with self._lock:
            if key not in self._remotes:
                max_calls = 1 if (self.options.get("num_gpus") or 0) > 0 else 0
                self._remotes[key] = ray.remote(max_calls=max_calls, num_returns=num_returns, **self.options)(fn)
            return self._remotes[key]

    def compute(self, unit: Unit) -> tuple[Any, Any, float]:
        import ray

        worker = self.tasks
        t = _plain(unit.trial)
        if isinstance(unit, StatsUnit):
            return self._stats(unit, t)
        if isinstance(unit, MeasureUnit):
            fn = worker.ppl_task if unit.kind == "ppl" else worker.probes_task
            v, secs = ray.get(list(self._remote(fn, 2).remote(t)))
            return v, v, float(secs)  # a number or a small dict: handed to the trials by value
        fn = worker.values_task if unit.kind == "values" else worker.scores_task
        refs = list(self._remote(fn, 2).remote(t, list(unit.records)))
        got, secs = ray.get(refs)
        del refs  # the task's objects go: from here on only the driver's copy exists
        if unit.kind == "values":
            value: Any = torch.tensor(np.asarray(got))  # [n, d_model], a copy of the fetched view
            del got
            return value, ray.put(value.numpy()), float(secs)
        return got, ray.put(got), float(secs)

    def _stats(self, unit: StatsUnit, t: dict[str, Any]) -> tuple[Moments, dict[int, Any], float]:
        """Run the pass's parts as tasks; per layer, add the parts' sums (or take a convergent pass's C),
        put C and drop the parts' objects of that layer; return (the statistics, read back from the
        driver's copies one layer at a time, for the store; layer -> handle; the tasks' seconds)."""
        import ray

        layers = unit.layers
        task = self._remote(self.tasks.stats_task, len(layers) + 1)
        whole = unit.trial.stats.tolerance is not None  # one task returning C itself, with its convergence
        calls = [
            list(task.remote(t, layers)) if whole else list(task.remote(t, layers, asdict(p))) for p in unit.parts()
        ]
        metas = ray.get([c[-1] for c in calls])
        handles: dict[int, Any] = {}
        tokens: dict[int, int] = {}
        for i, layer in enumerate(layers):
            refs = [c[i] for c in calls]
            for c in calls:
                c[i] = None
            if whole:
                sm = SecondMoment(as_tensor(ray.get(refs[0])), int(metas[0]["tokens"][layer]))
            else:
                sm = add_sums(
                    MomentSums(as_tensor(ray.get(r)), int(m["tokens"][layer])) for r, m in zip(refs, metas)
                ).moment()
            del refs
            handles[layer], tokens[layer] = ray.put(sm.mom2.numpy()), sm.n_tokens
            del sm
        del calls
        converged = metas[0].get("converged") if whole else None
        history = tuple(tuple(h) for h in metas[0].get("history", ())) if whole else ()

        def fetch(layer: int) -> SecondMoment:  # a read-only view of the driver's own copy
            return SecondMoment(as_tensor(ray.get(handles[layer])), tokens[layer], converged, history)

        fetches = {layer: (lambda la=layer: fetch(la)) for layer in layers}
        return Moments(fetches, tokens), handles, float(sum(m["seconds"] for m in metas))

    def handle(self, unit: Unit, value: Any) -> Any:
        return ray_handle(unit, value)


def ray_handle(unit: Unit, value: Any) -> Any:
    """The handle trials read of ``unit``'s ``value``: a copy this process puts in the object store
    (statistics one layer at a time, as numpy; a perplexity or probe point by value)."""
    import ray

    if isinstance(unit, StatsUnit):
        return {layer: ray.put(value[layer].mom2.cpu().numpy()) for layer in value}
    if isinstance(unit, MeasureUnit):
        return value
    return ray.put(value.numpy() if unit.kind == "values" else value)


def _plain(t: TrialConfig) -> dict[str, Any]:
    from editors.config import to_dict

    return to_dict(t)


# ----------------------------------------------------------------------------------------------------
# The rule every unit goes through


@dataclass
class WorkCounts:
    """What one fulfilment computed and what it read from the stores (layers or facts), the seconds the
    computations of each kind took (summed over units, on whichever nodes ran them: more than the wall
    time when they ran in parallel), and the fulfilment's wall time ``fulfil_s``. A statistics pass split
    over workers is one pass; ``stats_shards`` counts its tasks."""

    stats_passes: int = 0
    stats_shards: int = 0
    stats_layers_computed: int = 0
    stats_layers_read: int = 0
    values_optimised: int = 0
    values_read: int = 0
    scores_computed: int = 0
    scores_read: int = 0
    ppl_computed: int = 0
    ppl_read: int = 0
    probes_computed: int = 0
    probes_read: int = 0
    stats_s: float = 0.0
    values_s: float = 0.0
    scores_s: float = 0.0
    ppl_s: float = 0.0
    probes_s: float = 0.0
    fulfil_s: float = 0.0

    def add(self, unit: Unit, computed: bool, seconds: float) -> None:
        n = unit.size
        if unit.kind == "stats":
            if computed:
                self.stats_passes += 1
                self.stats_shards += len(unit.parts()) if isinstance(unit, StatsUnit) else 1
                self.stats_layers_computed += n
            else:
                self.stats_layers_read += n
        elif unit.kind == "values":
            self.values_optimised += n * computed
            self.values_read += n * (not computed)
        elif unit.kind == "scores":
            self.scores_computed += n * computed
            self.scores_read += n * (not computed)
        else:  # a measure of the unedited model: ppl or probes
            setattr(self, f"{unit.kind}_computed", getattr(self, f"{unit.kind}_computed") + computed)
            setattr(self, f"{unit.kind}_read", getattr(self, f"{unit.kind}_read") + (not computed))
        if computed:
            setattr(self, f"{unit.kind}_s", getattr(self, f"{unit.kind}_s") + seconds)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class Done:
    """How one unit was fulfilled: its handle for the trials, whether it was computed here (else read),
    the seconds it took, and (statistics) the tokens averaged into each layer's C."""

    handle: Any
    computed: bool
    seconds: float  # computed: the computation's own seconds; read: the read's
    tokens: dict[int, int] = field(default_factory=dict)


def fulfil_unit(unit: Unit, backend: Backend) -> Done:
    """Read ``unit`` from the stores, else claim it, compute it on ``backend`` and write it; a unit
    another process is computing is waited for (its lease) and read."""
    t0 = time.perf_counter()

    def done(value: Any, handle: Any, computed: bool, seconds: float | None = None) -> Done:
        tokens = value.tokens if isinstance(value, Moments) else {}
        return Done(handle, computed, time.perf_counter() - t0 if seconds is None else seconds, tokens)

    got = unit.read()
    if got is not None:
        return done(got, backend.handle(unit, got), False)
    with contextlib.ExitStack() as held:
        for lock in unit.locks():  # in a fixed order, so two fulfillers cannot deadlock
            held.enter_context(claim(lock, unit.stored))
        got = unit.read()  # stored by another process while we waited
        if got is not None:
            return done(got, backend.handle(unit, got), False)
        value, handle, seconds = backend.compute(unit)
        unit.write(value)
    return done(value, handle, True, seconds)


@dataclass
class Fulfilled:
    """Every unit's handle by what trials ask for, and the work counters."""

    stats: dict[tuple[str, int], Any] = field(default_factory=dict)  # (stats group, layer) -> handle
    stats_tokens: dict[tuple[str, int], int] = field(default_factory=dict)
    # (values or scores key, fact digest) -> (the digests of its chunk, the chunk's handle)
    facts: dict[tuple[Any, str], tuple[tuple[str, ...], Any]] = field(default_factory=dict)
    ppl: dict[PplKey, float] = field(default_factory=dict)
    probes: dict[ProbesKey, dict[str, float]] = field(default_factory=dict)
    work: WorkCounts = field(default_factory=WorkCounts)

    def take(self, unit: Unit, d: Done, count: bool = True) -> None:
        """Index ``unit``'s handle by what it holds; ``count``: add it to :attr:`work` (not when the
        fulfilment that counted it hands it on)."""
        if isinstance(unit, StatsUnit):
            for layer in unit.layers:
                self.stats[(unit.group, layer)] = d.handle[layer]
                self.stats_tokens[(unit.group, layer)] = d.tokens[layer]
        elif isinstance(unit, MeasureUnit) and unit.kind == "ppl":
            self.ppl[unit.key] = float(d.handle)  # type: ignore[index]
        elif isinstance(unit, MeasureUnit):
            self.probes[unit.key] = dict(d.handle)  # type: ignore[index]
        else:
            for digest in unit.digests:
                self.facts[(unit.key, digest)] = (unit.digests, d.handle)
        if count:
            self.work.add(unit, d.computed, d.seconds)


def run_units(
    units: Sequence[Unit],
    backend: Backend,
    parallel: bool,
    on_done: Callable[[Unit, Done], None] | None = None,
) -> Fulfilled:
    """Fulfil every unit (at once on threads when ``parallel``: a Ray backend's tasks then run on every
    free worker), logging each as it ends and passing it to ``on_done``; raises the first unit's error."""
    out = Fulfilled()
    t0 = time.perf_counter()
    chaos = int(os.environ[CHAOS_KILL_ENV]) if os.environ.get(CHAOS_KILL_ENV) else None
    lock = threading.Lock()
    stored = [0]

    def one(unit: Unit) -> None:
        d = fulfil_unit(unit, backend)
        if on_done is not None:
            on_done(unit, d)
        with lock:
            out.take(unit, d)
            _log_unit(unit, d.computed, time.perf_counter() - t0)
            if d.computed and isinstance(unit, FactUnit):
                stored[0] += 1
                if chaos is not None and stored[0] >= chaos:
                    Path(os.environ.get(CHAOS_KILL_ENV + "_MARK", "/dev/null")).write_text(str(stored[0]))
                    os.kill(os.getpid(), signal.SIGKILL)

    if not parallel or len(units) <= 1:
        for u in units:
            one(u)
    else:
        with ThreadPoolExecutor(max_workers=min(len(units), 256), thread_name_prefix="fulfil") as pool:
            for fut in as_completed([pool.submit(one, u) for u in units]):
                fut.result()
    out.work.fulfil_s = time.perf_counter() - t0
    return out


def _log_unit(unit: Unit, computed: bool, elapsed: float) -> None:
    what = "computed" if computed else "read from the store"
    if isinstance(unit, StatsUnit):
        log.info("shared work: statistics of layers %s %s (%.0f s)", unit.layers, what, elapsed)
    elif isinstance(unit, MeasureUnit):
        noun = "perplexity" if unit.kind == "ppl" else "capability probes"
        log.info("shared work: the unedited model's %s %s (%.0f s)", noun, what, elapsed)
    else:
        noun = "target values" if unit.kind == "values" else "pre-edit scores"
        log.info("shared work: %d %s %s (%.0f s)", unit.size, noun, what, elapsed)


# ----------------------------------------------------------------------------------------------------
# What trials are handed


def hand_out(need: TrialNeeds, got: Fulfilled) -> TrialRefs:
    """One trial's handles, found by what it needs (not by which trial asks): its layers' C, the chunks
    holding its facts' values and scores, its perplexity and probes (handles are values for a local
    fulfilment, references for Ray). A KeyError names a need ``got`` lacks."""
    tr = TrialRefs()
    if need.stats_group is not None:
        tr.stats = {layer: got.stats[(need.stats_group, layer)] for layer in need.layers}
        tr.stats_tokens = {layer: got.stats_tokens[(need.stats_group, layer)] for layer in need.layers}
    if need.values is not None:
        tr.values = _dedupe([got.facts[(need.values, d)] for d in need.value_digests])
    if need.scores is not None:
        tr.scores = _dedupe([got.facts[(need.scores, d)] for d in need.score_digests])
    if need.ppl is not None:
        tr.ppl = got.ppl[need.ppl]
    if need.probes is not None:
        tr.probes = got.probes[need.probes]
    return tr


def _hand_out(plan: SharedPlan, got: Fulfilled) -> dict[str, TrialRefs]:
    """Each planned trial's handles (:func:`hand_out`)."""
    return {tkey: hand_out(need, got) for tkey, need in plan.needs.items()}


def _dedupe(items: Sequence[tuple[tuple[str, ...], Any]]) -> list[tuple[tuple[str, ...], Any]]:
    seen: dict[int, tuple[tuple[str, ...], Any]] = {}
    for ds, handle in items:
        seen.setdefault(id(handle), (ds, handle))
    return list(seen.values())


def _ray_units(plan: SharedPlan, cfg: SweepConfig, tasks: RayTasks) -> tuple[list[Unit], RayBackend]:
    """The plan's units, each statistics pass split over the workers that can run it
    (:func:`sweep.shared.needs.stats_workers` of the cluster's resources now), and the backend for them."""
    import ray

    from .needs import stats_workers

    gpu = cfg.resources.prepass_gpu if cfg.resources.prepass_gpu is not None else cfg.resources.gpu
    backend = RayBackend({"num_cpus": cfg.resources.cpu, "num_gpus": gpu, "max_retries": cfg.retries}, tasks)
    return units_of(plan, cfg, stats_workers(cfg, ray.cluster_resources())), backend


def fulfil_ray(plan: SharedPlan, cfg: SweepConfig, tasks: RayTasks) -> tuple[dict[str, TrialRefs], WorkCounts]:
    """Fulfil ``plan`` on Ray: every missing unit tasks (``tasks``: :mod:`sweep.shared.tasks`), all at once, a
    statistics pass split over the workers that can run it; this process writes the stores and owns every
    handle. Returns (trial key -> its references, what was computed and read)."""
    units, backend = _ray_units(plan, cfg, tasks)
    got = run_units(units, backend, parallel=True)
    return _hand_out(plan, got), got.work


class Feed:
    """:func:`fulfil_ray` beside the trials: the units are the driver's to fulfil (the service grants them
    to no trial, :meth:`~sweep.shared.service.SharedWork.expect`), each is handed to the service as soon as
    it ends, so a trial whose inputs exist starts then, not after all the shared work
    (:class:`sweep.tune.search.ReadyFirst` asks the service which can start). A unit that fails (after
    Ray's retries) fails the sweep, as a fulfilment up front would: no further trial starts, and
    :meth:`join` raises its error."""

    def __init__(self, plan: SharedPlan, cfg: SweepConfig, tasks: RayTasks, service: Any) -> None:
        import ray

        self.units, self._backend = _ray_units(plan, cfg, tasks)
        self._service = service
        self.error: BaseException | None = None
        self._work = WorkCounts()
        ray.get(service.expect.remote(self.units))
        self._thread = threading.Thread(target=self._run, name="fulfil", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import ray

        def done(unit: Unit, d: Done) -> None:
            ray.get(self._service.supply.remote(unit, d))

        try:
            self._work = run_units(self.units, self._backend, True, done).work
        except BaseException as e:
            self.error = e

    def join(self) -> WorkCounts:
        """Wait for the fulfilment to end; what it computed and read (its error, if a unit failed)."""
        self._thread.join()
        if self.error is not None:
            raise self.error
        return self._work


def fulfil_local(
    plan: SharedPlan, cfg: SweepConfig, model: Any, tok: Any, progress: bool = True
) -> tuple[dict[str, TrialInputs], WorkCounts]:
    """Fulfil ``plan`` in this process on ``model``: (trial key -> its complete inputs, work counters)."""
    got = run_units(units_of(plan, cfg), LocalBackend(model, tok, progress), parallel=False)
    return {k: inputs_of(tr, lambda h: h) for k, tr in _hand_out(plan, got).items()}, got.work
