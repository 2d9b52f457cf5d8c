"""Planning the shared work of a sweep: what its trials share, what the stores lack, what it will cost.

No model is loaded here. :func:`plan_shared` walks the expanded trials and builds, per content key
(:mod:`sweep.shared.keys`; every key is built here, once, and handed on):

- statistics: per (model, statistics settings), the layers any trial edits. Layers in the store are read
  by the fulfiller; the rest are split into **passes** whose accumulators fit next to the model in a
  worker's device memory (the budget: ``resources.gpu_memory_gb``, else the cluster's GPU nodes, asked
  by the launcher; fp64 counts double), shallow layers together, since each pass stops after its
  deepest layer;
- target values of batch-mode trials whose algorithm can share them (``editors`` ``TRAITS``), per
  (value key, fact);
- pre-edit scores per (scores key, fact), the unedited perplexity per :class:`PplKey` and the unedited
  model's capability probes per :class:`ProbesKey`.

The model's shape comes from its ``config.json`` alone (:func:`model_shape`), and the cost estimate from
shapes. Computing the plan is :mod:`sweep.shared.fulfil`'s job (in this process, or on Ray).
"""

from __future__ import annotations

import functools
import heapq
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from editors import traits
from editors.config import ConfigError
from editors.model import n_layers_of
from editors.stats import StatsKey, StreamSlice, split_stream
from editors.templates import N_TEMPLATES

from .keys import (
    PplKey,
    ProbesKey,
    ScoresKey,
    ScoresStore,
    ValuesKey,
    ValuesStore,
    model_identity,
    ppl_key,
    probes_key,
    record_digest,
    request_digest,
    scores_key,
    stats_dtype,
    stats_keys,
    stats_store,
    values_key,
)
from .mirror import config_source

if TYPE_CHECKING:
    from ..config import ModelConfig, SweepConfig, TrialConfig
    from ..evals.data import Record

log = logging.getLogger(__name__)

#: Share of a worker's device memory a statistics pass may plan for (the rest: allocator fragmentation).
BUDGET_SHARE = 0.9

#: Tokens per Wikipedia article assumed by the time estimate when only ``max_texts`` caps the corpus.
TOKENS_PER_TEXT = 700
_BYTES = {"float32": 4, "float64": 8, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}


# ----------------------------------------------------------------------------------------------------
# Plan types


@dataclass(frozen=True)
class StatsPass:
    """The statistics of ``layers`` of one model and corpus: held by the store at planning
    (``read_only``), or computed in one forward pass over the corpus that stops after ``layers[-1]``."""

    group: str
    trial: TrialConfig
    layers: tuple[int, ...]
    read_only: bool
    keys: dict[int, StatsKey] = field(default_factory=dict)  # layer -> its store key
    memory_gb: float = 0.0
    seconds: float = 0.0


@dataclass
class FactJob:
    """Per-fact work of one key (values or pre-scores): every fact trials need, and those stored."""

    key: ValuesKey | ScoresKey
    trial: TrialConfig
    records: list[Record] = field(default_factory=list)
    digests: list[str] = field(default_factory=list)
    cached: set[str] = field(default_factory=set)
    uses: int = 0  # facts over all trials (what the trials would compute without sharing)

    def add(self, records: Sequence[Record | None], digests: Sequence[str]) -> None:
        self.uses += len(digests)
        have = set(self.digests)
        for r, d in zip(records, digests):
            if d not in have:
                have.add(d)
                self.records.append(r)
                self.digests.append(d)

    def missing(self) -> list[tuple[Record, str]]:
        return [(r, d) for r, d in zip(self.records, self.digests) if d not in self.cached]


@dataclass(frozen=True)
class TrialNeeds:
    """Which shared results one trial reads (keys into :class:`SharedPlan`)."""

    stats_group: str | None
    layers: tuple[int, ...]
    values: ValuesKey | None
    value_digests: tuple[str, ...]
    scores: ScoresKey | None
    score_digests: tuple[str, ...]
    ppl: PplKey | None
    probes: ProbesKey | None = None


@dataclass(frozen=True)
class HeadNeeds:
    """What the driver's node (a cluster's head) holds for a sweep. The service keeps one object-store copy
    of every statistic and target value the trials read, for the sweep's length (copies the driver owns,
    :mod:`sweep.shared.fulfil`, so no worker holds them); the stores on its disk gain what is computed.

    Attributes:
        stats_bytes: Σ over the passes' layers of d_key² × the bytes of ``stats.dtype``.
        values_bytes: Σ over the value jobs' facts of d_model × 4 (float32).
        store_bytes: what the stores gain: the statistics to compute and the values to optimise.
        largest_layer_bytes: the largest single object (one layer's C): Ray cannot split an object.
    """

    stats_bytes: int = 0
    values_bytes: int = 0
    store_bytes: int = 0
    largest_layer_bytes: int = 0

    @property
    def object_store_bytes(self) -> int:
        return self.stats_bytes + self.values_bytes


@dataclass
class SharedPlan:
    """What a sweep shares: statistics passes (and store reads), per-key fact jobs for values and
    pre-edit scores, the unedited perplexities, and which of them each trial reads."""

    passes: list[StatsPass]
    values: dict[ValuesKey, FactJob]
    scores: dict[ScoresKey, FactJob]
    ppl: dict[PplKey, TrialConfig]
    ppl_cached: dict[PplKey, float]
    needs: dict[str, TrialNeeds]  # trial key -> needs
    budget_gb: float | None
    probes: dict[ProbesKey, TrialConfig] = field(default_factory=dict)
    probes_cached: dict[ProbesKey, dict[str, float]] = field(default_factory=dict)

    def head(self) -> HeadNeeds:
        """What the driver's node holds and stores for this plan (:class:`HeadNeeds`)."""
        stats = values = stored = largest = 0
        for p in self.passes:
            layer = shape_of(p.trial.model).d_key ** 2 * (8 if p.trial.stats.dtype == "float64" else 4)
            stats += layer * len(p.layers)
            stored += 0 if p.read_only else layer * len(p.layers)
            largest = max(largest, layer)
        for job in self.values.values():
            fact = shape_of(job.trial.model).d_model * 4
            values += fact * len(job.digests)
            stored += fact * len(job.missing())
        return HeadNeeds(stats, values, stored, largest)

    def counts(self) -> dict[str, int]:
        computed = [p for p in self.passes if not p.read_only]
        return {
            "statistics_layers": sum(len(p.layers) for p in self.passes),
            "statistics_to_compute": sum(len(p.layers) for p in computed),
            "statistics_cached": sum(len(p.layers) for p in self.passes if p.read_only),
            "statistics_passes": len(computed),
            "values_to_optimise_shared": sum(len(j.missing()) for j in self.values.values()),
            "values_cached": sum(len(j.cached) for j in self.values.values()),
            "values_without_sharing": sum(j.uses for j in self.values.values()),
            "scores_to_compute": sum(len(j.missing()) for j in self.scores.values()),
            "scores_cached": sum(len(j.cached) for j in self.scores.values()),
            "scores_without_sharing": sum(j.uses for j in self.scores.values()),
        }


# ----------------------------------------------------------------------------------------------------
# Planning


#: Shapes of models a dry run may be asked about without network access to their config.
KNOWN_SHAPES = {
    "meta-llama/Meta-Llama-3-8B": {"n_layers": 32, "d_model": 4096, "d_key": 14336, "vocab": 128256, "params": 8.03e9},
    "meta-llama/Meta-Llama-3-8B-Instruct": {
        "n_layers": 32,
        "d_model": 4096,
        "d_key": 14336,
        "vocab": 128256,
        "params": 8.03e9,
    },
}


@dataclass(frozen=True)
class Shape:
    n_layers: int
    d_model: int
    d_key: int
    vocab: int
    params: float


def shape_of(mc: ModelConfig) -> Shape:
    """:func:`model_shape` of ``mc``, read from its mirror's local copy when there is one."""
    return model_shape(*config_source(mc))


@functools.lru_cache(maxsize=16)
def model_shape(source: str | None, gguf_file: str | None, revision: str | None) -> Shape:
    """The model's widths from its config (no weights), or from :data:`KNOWN_SHAPES` offline."""

    from editors.model import model_config

    if source in KNOWN_SHAPES and not Path(source).exists():
        return Shape(**KNOWN_SHAPES[source])  # no network round trip for the paper's model
    try:
        c = model_config(source, gguf_file=gguf_file, revision=revision)
    except (OSError, ValueError) as e:
        if source in KNOWN_SHAPES:
            return Shape(**KNOWN_SHAPES[source])
        raise ConfigError(f"base.model.source: cannot read the config of {source!r} ({e})") from None
    n = n_layers_of(c)
    d = getattr(c, "hidden_size", None) or c.n_embd
    dk = getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * d
    v = c.vocab_size
    # embeddings (+ untied head) + per layer: attention ~4d² (fewer with GQA) + MLP 3·d·dk
    kv = getattr(c, "num_key_value_heads", None) or getattr(c, "num_attention_heads", 1)
    heads = getattr(c, "num_attention_heads", 1)
    attn = 2 * d * d + 2 * d * d * kv / heads
    tied = getattr(c, "tie_word_embeddings", False)
    params = v * d * (1 if tied else 2) + n * (attn + 3 * d * dk)
    return Shape(n, d, dk, v, params)


def stats_group(t: TrialConfig, model_id: str | None = None) -> str:
    """Trials of one group share statistics: same model weights (``model_id``: the model's identity when
    already known) and statistics settings."""
    import json

    from editors.config import to_dict

    mid = model_id if model_id is not None else model_identity(t.model)
    return json.dumps([mid, stats_dtype(t), to_dict(t.stats)], sort_keys=True, default=str)


def pass_memory_gb(shape: Shape, n_layers: int, t: TrialConfig, on_gpu: bool = True) -> float:
    """Device memory of a statistics pass over ``n_layers`` layers: the weights in the pass's dtype,
    one [d_key, d_key] accumulator per layer (fp32: 4 bytes, fp64: 8), the activations of one token
    batch (hidden states and MLP activations, and the keys cast to the accumulation dtype), the
    convergence check's fp64 solve and probes when ``stats.tolerance`` is set, and 1 GB of CUDA context
    on a GPU."""
    w = _BYTES.get(stats_dtype(t), 4)
    acc = _BYTES[t.stats.dtype]
    bt = t.stats.batch_tokens or (8192 if on_gpu else 1024)
    act = bt * (8 * shape.d_model + 4 * shape.d_key) * w + bt * shape.d_key * acc
    check = (2 * shape.d_key**2 * 8 + n_layers * shape.d_key * 512 * 8) if t.stats.tolerance else 0
    overhead = 1e9 if on_gpu else 0
    return (shape.params * w + n_layers * shape.d_key**2 * acc + act + check + overhead) / 1e9


def split_passes(layers: Sequence[int], fits: Any) -> list[tuple[int, ...]]:
    """Consecutive runs of ``layers``, each as long as ``fits(n_layers)`` allows, filled from the deepest
    layer down: every pass runs the blocks up to its own deepest layer, so the deepest pass, which runs
    (almost) the whole model anyway, takes as many layers as fit, and the shallow rest share cheap
    passes that stop early (32 layers, 29 per pass: 3 + 32 blocks per token, not 29 + 32)."""
    out: list[tuple[int, ...]] = []
    cur: list[int] = []
    for layer in sorted(layers, reverse=True):
        if cur and not fits(len(cur) + 1):
            out.append(tuple(sorted(cur)))
            cur = []
        cur.append(layer)
    if cur:
        out.append(tuple(sorted(cur)))
    return sorted(out)


def stats_tokens(t: TrialConfig) -> float | None:
    """Tokens the pass will read: ``max_tokens``, else ``max_texts`` × :data:`TOKENS_PER_TEXT`."""
    if t.stats.max_tokens is not None:
        return float(t.stats.max_tokens)
    if t.stats.max_texts is not None:
        return float(t.stats.max_texts * TOKENS_PER_TEXT)
    return None


def pass_seconds(shape: Shape, layers: Sequence[int], t: TrialConfig, tflops: float) -> float:
    """Forwards through the blocks up to the deepest layer (2 FLOP per parameter per token) plus one
    d_key² outer-product accumulation per layer and token, at ``tflops``; NaN when no cap bounds the
    corpus."""
    tokens = stats_tokens(t)
    if tokens is None:
        return math.nan
    per_block = (shape.params - shape.vocab * shape.d_model) / shape.n_layers
    flops = tokens * (2 * per_block * (max(layers) + 1) + 2 * shape.d_key**2 * len(layers))
    return flops / (tflops * 1e12)


def stats_workers(cfg: SweepConfig, cluster: Mapping[str, float] | None = None) -> int:
    """How many workers a statistics pass splits over (its parts, :func:`pass_parts`):
    ``resources.max_concurrent`` when set (the workers the sweep is sized for; on an autoscaling cluster
    the parts that wait for a node make the autoscaler start it, as waiting trials do); else how many
    tasks of a pass's resources (``resources.prepass_gpu`` GPUs, default ``resources.gpu``, and
    ``resources.cpu`` CPUs) ``cluster``'s resources hold at once (``ray.cluster_resources()`` when the
    fulfilment starts: the nodes up then); else 1 (a dry run asks no cluster). 1 is one task per pass."""
    r = cfg.resources
    if r.max_concurrent is not None:
        return max(1, r.max_concurrent)
    if not cluster:
        return 1
    gpu = r.prepass_gpu if r.prepass_gpu is not None else r.gpu
    fits = [cluster.get("CPU", 0.0) / r.cpu] + ([cluster.get("GPU", 0.0) / gpu] if gpu > 0 else [])
    return max(1, int(min(fits) + 1e-9))


def pass_parts(t: TrialConfig, workers: int) -> list[StreamSlice]:
    """The parts of a statistics pass's token stream on ``workers`` workers, one task each
    (:func:`editors.stats.split_stream`: token ranges under ``stats.max_tokens``, else text ranges under
    ``stats.max_texts``, else one part); one part with ``stats.tolerance``, whose convergence check
    decides from the whole stream when to stop."""
    s = t.stats
    if s.tolerance is not None:
        return [StreamSlice()]
    return split_stream(workers, max_tokens=s.max_tokens, max_texts=s.max_texts)


def stats_wall_seconds(passes: Sequence[StatsPass], workers: int) -> float:
    """The computed passes' wall time on ``workers`` workers: each pass in its parts (:func:`pass_parts`),
    each part an equal share of the pass's device time, placed longest first on the least busy worker
    (every part is submitted at once). NaN when a pass's time is unknown; model loading not counted."""
    parts: list[float] = []
    for p in passes:
        if not p.read_only:
            k = len(pass_parts(p.trial, workers))
            parts += [p.seconds / k] * k
    if any(math.isnan(x) for x in parts):
        return math.nan
    busy = [0.0] * max(1, workers)
    for x in sorted(parts, reverse=True):
        heapq.heapreplace(busy, busy[0] + x)
    return max(busy)


def plan_shared(
    cfg: SweepConfig,
    trials: Sequence[TrialConfig],
    keys: Sequence[str],
    dry_run: bool = False,
    budget_gb: float | None = None,
) -> SharedPlan:
    """What the sweep's trials share and what the stores lack (no model is loaded): per trial, the
    statistics group and the values, scores and perplexity keys it reads; then the statistics passes
    (:func:`_stats_passes`) and what the fact stores hold (:func:`_mark_stored`).

    ``budget_gb``: a worker's device memory for statistics passes (None: no limit, e.g. CPU trials).
    ``dry_run``: a dataset that is not at hand (a URL, offline) is counted by position instead of
    failing, so the plan of a cluster sweep prints on a laptop; nothing can run from such a plan.
    """
    groups: dict[str, tuple[TrialConfig, set[int]]] = {}
    values: dict[ValuesKey, FactJob] = {}
    scores: dict[ScoresKey, FactJob] = {}
    ppl: dict[PplKey, TrialConfig] = {}
    probes: dict[ProbesKey, TrialConfig] = {}
    needs: dict[str, TrialNeeds] = {}
    datasets: dict[tuple, list[Record]] = {}
    identities: dict[tuple, str] = {}  # a model's identity hashes its files: once per model, not per trial
    for tkey, t in zip(keys, trials):
        hp = t.edit_hparams
        tr = traits(t.algorithm)
        mref = (t.model.source, t.model.gguf_file, t.model.revision)
        if mref not in identities:
            identities[mref] = model_identity(t.model)
        mid = identities[mref]
        group = None
        if tr.needs_stats(hp):
            group = stats_group(t, mid)
            groups.setdefault(group, (t, set()))[1].update(hp.layers)
        share_v = tr.values_shareable(t.mode, t.batch_size) and cfg.share_values
        share_s = t.scoring.pre
        vkey = skey = pkey = qkey = None
        vd: tuple[str, ...] = ()
        sd: tuple[str, ...] = ()
        if share_v or share_s:
            dkey, recs = _selection(t, datasets, dry_run)
            if share_v:
                vkey = values_key(t, hp, mid)
                vd = _digests(recs, dkey, lambda r: request_digest(r.request()))
                values.setdefault(vkey, FactJob(vkey, t)).add(recs, vd)
            if share_s:
                skey = scores_key(t, mid)
                sd = _digests(recs, dkey, record_digest)
                scores.setdefault(skey, FactJob(skey, t)).add(recs, sd)
                if t.scoring.ppl:
                    pkey = ppl_key(t, mid)
                    ppl.setdefault(pkey, t)
                if t.scoring.probes:
                    qkey = probes_key(t, mid)
                    probes.setdefault(qkey, t)
        needs[tkey] = TrialNeeds(group, tuple(hp.layers), vkey, vd, skey, sd, pkey, qkey)
    passes = _stats_passes(cfg, groups, identities, budget_gb)
    ppl_cached, probes_cached = _mark_stored(cfg, values, scores, ppl, probes)
    return SharedPlan(passes, values, scores, ppl, ppl_cached, needs, budget_gb, probes, probes_cached)


def _selection(t: TrialConfig, datasets: dict[tuple, list[Any]], dry_run: bool) -> tuple[tuple, list[Any]]:
    """(the selection's key, its records) of trial ``t``, loaded once per selection; in a dry run, a
    dataset not at hand gives ``None`` per fact (counted by position); a selection that is wrong (more
    edits than it holds, a bad record) is an error in a dry run too."""
    from ..evals.data import load_selection
    from ..evals.records import SourceUnavailable

    d = t.dataset
    dkey = (
        d.name,
        d.target,
        d.source,
        d.sha256,
        d.case_ids,
        d.sample_file,
        d.sample,
        d.unique_subjects_seed,
        d.offset,
        d.order_seed,
        t.n_edits,
    )
    if dkey not in datasets:
        try:
            datasets[dkey] = load_selection(d, t.n_edits)
        except SourceUnavailable as e:
            if not dry_run:
                raise
            log.warning("dry run: %s; facts counted by position", e)
            datasets[dkey] = [None] * t.n_edits
    return dkey, datasets[dkey]


def _stats_passes(
    cfg: SweepConfig,
    groups: dict[str, tuple[TrialConfig, set[int]]],
    identities: dict[tuple, str],
    budget: float | None,
) -> list[StatsPass]:
    """Per statistics group, the layers its store holds (one read-only pass) and the missing ones in
    passes that fit ``budget`` (a layer that cannot fit alone is a config error naming the field)."""
    passes: list[StatsPass] = []
    for group, (t, layers) in groups.items():
        store = stats_store(t.stats.store) if t.stats.store else None
        mid = identities[(t.model.source, t.model.gguf_file, t.model.revision)]
        skeys = stats_keys(t, sorted(layers), mid)
        cached = tuple(sorted(layer for layer, k in skeys.items() if store is not None and k in store))
        if cached:
            passes.append(StatsPass(group, t, cached, read_only=True, keys={la: skeys[la] for la in cached}))
        missing = sorted(set(layers) - set(cached))
        if not missing:
            continue
        shape = shape_of(t.model)
        on_gpu = cfg.resources.gpu > 0 and t.model.device != "cpu"
        one = pass_memory_gb(shape, 1, t, on_gpu)
        if budget is not None and one > BUDGET_SHARE * budget:
            raise ConfigError(
                f"resources.gpu_memory_gb: one layer's statistics pass needs {one:.1f} GB (weights in "
                f"{stats_dtype(t)} + a {shape.d_key}² {t.stats.dtype} accumulator) but {BUDGET_SHARE:.0%} of the "
                f"budget is {BUDGET_SHARE * budget:.1f} GB; "
                "use a larger card, stats.model_dtype: bfloat16, or stats.dtype: float32"
            )

        def fits(n: int, shape: Shape = shape, t: TrialConfig = t, on_gpu: bool = on_gpu) -> bool:
            return budget is None or pass_memory_gb(shape, n, t, on_gpu) <= BUDGET_SHARE * budget

        for run in split_passes(missing, fits):
            mem = pass_memory_gb(shape, len(run), t, on_gpu)
            sec = pass_seconds(shape, run, t, cfg.estimate.tflops)
            keys_ = {la: skeys[la] for la in run}
            passes.append(StatsPass(group, t, run, read_only=False, keys=keys_, memory_gb=mem, seconds=sec))
    return passes


def _mark_stored(
    cfg: SweepConfig,
    values: dict[ValuesKey, FactJob],
    scores: dict[ScoresKey, FactJob],
    ppl: dict[PplKey, TrialConfig],
    probes: dict[ProbesKey, TrialConfig],
) -> tuple[dict[PplKey, float], dict[ProbesKey, dict[str, float]]]:
    """Set each fact job's ``cached`` to the facts its store holds; returns the stored perplexities and
    the stored probe points of the unedited models."""
    if cfg.values_store:
        for job in values.values():
            job.cached = set(ValuesStore(cfg.values_store).get(job.key, job.digests))
    ppl_cached: dict[PplKey, float] = {}
    probes_cached: dict[ProbesKey, dict[str, float]] = {}
    if cfg.scores_store:
        store = ScoresStore(cfg.scores_store)
        for job in scores.values():
            job.cached = set(store.get(job.key, job.digests))
        ppl_cached = {pk: v for pk in ppl if (v := store.get_ppl(pk)) is not None}
        probes_cached = {qk: m for qk in probes if (m := store.get_probes(qk)) is not None}
    return ppl_cached, probes_cached


def _digests(recs: Sequence[Record | None], dkey: tuple, digest_of: Any) -> tuple[str, ...]:
    """Content digests of ``recs``; a dry run without the dataset counts facts by position."""
    return tuple(digest_of(r) if r is not None else f"{dkey}#{i}" for i, r in enumerate(recs))


def value_seconds(t: TrialConfig, shape: Shape, tflops: float, n_facts: int) -> float:
    """Time of ``n_facts`` target-value optimisations: 6 · params · tokens per step (forward + backward)
    × steps, with ~12 tokens per prompt after the cached prefix. An algorithm without target values
    (UltraEdit) runs one forward and backward of each request's prompt and answer instead (~16 tokens)."""

    hp = t.edit_hparams
    if not traits(t.algorithm).uses_values:
        return 6 * shape.params * n_facts * 16 / (tflops * 1e12)
    n_prompts = N_TEMPLATES[hp.context_templates] + 1
    return 6 * shape.params * n_facts * n_prompts * 12 * hp.v_num_grad_steps / (tflops * 1e12)


def score_seconds(shape: Shape, n_facts: int, tflops: float) -> float:
    """Scoring forwards of ``n_facts`` facts: ~3 prompts × 2 targets of ~13 tokens, 2 FLOP per parameter."""
    return 2 * shape.params * n_facts * 13 * 2 * 3 / (tflops * 1e12)
