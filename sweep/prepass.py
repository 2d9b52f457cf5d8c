"""The pre-pass: plan the shared work a sweep is missing, compute it once, hand each trial its inputs.

Planning (:func:`plan_shared`, no model loaded) walks the expanded trials and collects, per content key
(:mod:`sweep.shared`), what the stores lack:

- statistics: per (model, statistics settings), the layers any trial edits. Layers in the store are read
  by a light task (no model load); the rest are split into **passes** whose accumulators fit next to the
  model in a worker's device memory (``resources.gpu_memory_gb``, or the driver's GPU; fp64 counts
  double), shallow layers together, since each pass stops after its deepest layer;
- target values of batch-mode trials whose algorithm can share them (``editors`` ``TRAITS``), per
  (value key, fact), in chunks of ``values_chunk`` facts;
- pre-edit scores per (scores key, fact), in chunks, and the unedited perplexity per :class:`PplKey`.

Computing (:func:`run_prepass`, on Ray) submits every task at once, so passes and chunks run on as many
workers as are free. Each task writes its result to its store as it finishes (a killed launcher keeps
every finished chunk; the same command or ``--resume`` computes only the rest) and returns it as an
object-store reference that goes to the trials as is: results travel worker -> object store -> trial,
never through the driver. :func:`local_inputs` is the same work for one trial without Ray
(``python -m sweep.trial``).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from editors import spec_for, traits
from editors.config import ConfigError
from editors.corpus import CorpusSpec, iter_texts
from editors.stats import StatsStore, collect_second_moments, get_or_compute
from editors.templates import N_TEMPLATES

from .shared import (
    PplKey,
    ScoresKey,
    ScoresStore,
    TrialInputs,
    ValuesKey,
    ValuesStore,
    model_identity,
    ppl_key,
    record_digest,
    request_digest,
    scores_key,
    stats_dtype,
    stats_keys,
    values_key,
)

if TYPE_CHECKING:
    from editors.stats import SecondMoment

    from .data import Record
    from .plan import Shape, SweepConfig
    from .trial import TrialConfig

log = logging.getLogger(__name__)

#: Set to N to make the launcher SIGKILL itself once N value/score chunks are stored (fault injection).
CHAOS_KILL_ENV = "MODEL_EDITING_CHAOS_KILL_LAUNCHER_AFTER"

#: Share of a worker's device memory a statistics pass may plan for (the rest: allocator fragmentation).
BUDGET_SHARE = 0.9

#: Tokens per Wikipedia article assumed by the time estimate when only ``max_texts`` caps the corpus.
TOKENS_PER_TEXT = 700
_BYTES = {"float32": 4, "float64": 8, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}


# ----------------------------------------------------------------------------------------------------
# Plan types


@dataclass(frozen=True)
class StatsPass:
    """One statistics task: ``layers`` of one model and corpus, read from the store (``read_only``) or
    computed in one forward pass over the corpus that stops after ``layers[-1]``."""

    group: str
    trial: TrialConfig
    layers: tuple[int, ...]
    read_only: bool
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


@dataclass
class SharedPlan:
    passes: list[StatsPass]
    values: dict[ValuesKey, FactJob]
    scores: dict[ScoresKey, FactJob]
    ppl: dict[PplKey, TrialConfig]
    ppl_cached: dict[PplKey, float]
    needs: dict[str, TrialNeeds]  # trial key -> needs
    budget_gb: float | None

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


def stats_group(t: TrialConfig) -> str:
    """Trials of one group share statistics: same model weights and statistics settings."""
    import json

    from editors.config import to_dict

    return json.dumps([model_identity(t.model), stats_dtype(t), to_dict(t.stats)], sort_keys=True, default=str)


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


def device_budget_gb(configured: float | None, gpu: float) -> float | None:
    """The statistics' per-worker memory budget: configured, else the driver's first GPU when trials
    use GPUs, else None (no limit)."""
    if configured is not None:
        return configured
    if gpu > 0 and torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / 1e9
    return None


def plan_shared(
    cfg: SweepConfig, trials: Sequence[TrialConfig], keys: Sequence[str], dry_run: bool = False
) -> SharedPlan:
    """What the sweep's trials share and what the stores lack (no model is loaded).

    ``dry_run``: a dataset that is not at hand (a URL, offline) is counted by position instead of
    failing, so the plan of a cluster sweep prints on a laptop; nothing can run from such a plan.
    """
    from .data import DatasetError, load_counterfact, select
    from .plan import model_shape
    from .trial import trial_hparams

    budget = device_budget_gb(cfg.resources.gpu_memory_gb, cfg.resources.gpu)
    groups: dict[str, tuple[TrialConfig, set[int]]] = {}
    values: dict[ValuesKey, FactJob] = {}
    scores: dict[ScoresKey, FactJob] = {}
    ppl: dict[PplKey, TrialConfig] = {}
    needs: dict[str, TrialNeeds] = {}
    datasets: dict[tuple, list[Record]] = {}
    for tkey, t in zip(keys, trials):
        hp = trial_hparams(t)
        tr = traits(t.algorithm)
        mid = model_identity(t.model)
        group = None
        if tr.needs_stats(hp) and cfg.share_stats:
            group = stats_group(t)
            groups.setdefault(group, (t, set()))[1].update(hp.layers)
        share_v = tr.values_shareable(t.mode, t.batch_size) and cfg.share_values
        share_s = t.scoring.pre and cfg.share_scores
        vkey = skey = pkey = None
        vd: tuple[str, ...] = ()
        sd: tuple[str, ...] = ()
        if share_v or share_s:
            d = t.dataset
            dkey = (d.source, d.sha256, d.case_ids, d.sample_file, d.sample, d.unique_subjects_seed, t.n_edits)
            if dkey not in datasets:
                try:
                    datasets[dkey] = select(
                        load_counterfact(d.source, d.sha256),
                        n=t.n_edits,
                        case_ids=d.case_ids,
                        sample_file=d.sample_file,
                        sample=d.sample,
                        unique_subjects_seed=d.unique_subjects_seed,
                    )
                except DatasetError:
                    if not dry_run:
                        raise
                    log.warning("dry run: dataset %s is not at hand; facts counted by position", d.source)
                    datasets[dkey] = [None] * t.n_edits
            recs = datasets[dkey]
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
        needs[tkey] = TrialNeeds(group, tuple(hp.layers), vkey, vd, skey, sd, pkey)

    passes: list[StatsPass] = []
    for group, (t, layers) in groups.items():
        store = StatsStore(t.stats.store) if t.stats.store else None
        skeys = stats_keys(t, sorted(layers), model_identity(t.model))
        cached = tuple(sorted(layer for layer, k in skeys.items() if store is not None and k in store))
        if cached:
            passes.append(StatsPass(group, t, cached, read_only=True))
        missing = sorted(set(layers) - set(cached))
        if not missing:
            continue
        shape = model_shape(t.model.source, t.model.gguf_file, t.model.revision)
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
            passes.append(StatsPass(group, t, run, read_only=False, memory_gb=mem, seconds=sec))

    for job in values.values():
        job.cached = set(ValuesStore(cfg.values_store).get(job.key, job.digests))
    ppl_cached: dict[PplKey, float] = {}
    for job in scores.values():
        job.cached = set(ScoresStore(cfg.scores_store).get(job.key, job.digests))
    for pk in ppl:
        v = ScoresStore(cfg.scores_store).get_ppl(pk)
        if v is not None:
            ppl_cached[pk] = v
    return SharedPlan(passes, values, scores, ppl, ppl_cached, needs, budget)


def _digests(recs: Sequence[Record | None], dkey: tuple, digest_of: Any) -> tuple[str, ...]:
    """Content digests of ``recs``; a dry run without the dataset counts facts by position."""
    return tuple(digest_of(r) if r is not None else f"{dkey}#{i}" for i, r in enumerate(recs))


def value_seconds(t: TrialConfig, shape: Shape, tflops: float, n_facts: int) -> float:
    """Time of ``n_facts`` target-value optimisations: 6 · params · tokens per step (forward + backward)
    × steps, with ~12 tokens per prompt after the cached prefix."""
    from .trial import trial_hparams

    hp = trial_hparams(t)
    n_prompts = N_TEMPLATES[hp.context_templates] + 1
    return 6 * shape.params * n_facts * n_prompts * 12 * hp.v_num_grad_steps / (tflops * 1e12)


def score_seconds(shape: Shape, n_facts: int, tflops: float) -> float:
    """Scoring forwards of ``n_facts`` facts: ~3 prompts × 2 targets of ~13 tokens, 2 FLOP per parameter."""
    return 2 * shape.params * n_facts * 13 * 2 * 3 / (tflops * 1e12)


# ----------------------------------------------------------------------------------------------------
# Computing (the bodies of the Ray tasks, and the same work for a trial without Ray)


def compute_stats(
    cfg: TrialConfig, model: Any, tok: Any, layers: list[int], progress: bool = True
) -> dict[int, SecondMoment]:
    """The statistics of ``layers`` in one pass over the configured corpus."""
    s = cfg.stats
    return collect_second_moments(
        model,
        tok,
        spec_for(model),
        layers,
        iter_texts(CorpusSpec(s.corpus, max_texts=s.max_texts)),
        max_tokens=s.max_tokens,
        batch_tokens=s.batch_tokens,
        dtype=s.dtype,
        tolerance=s.tolerance,
        progress=progress,
    )


def stats_from_store(
    cfg: TrialConfig, layers: list[int], model_loader: Any, progress: bool = False
) -> tuple[dict[int, SecondMoment], list[int]]:
    """(statistics of ``layers``, the layers computed): stored ones read, the rest computed in ONE
    pass and stored; ``model_loader()`` -> (model, tok) is called only when something is missing."""

    def compute(missing: list[int]) -> dict[int, SecondMoment]:
        model, tok = model_loader()
        return compute_stats(cfg, model, tok, missing, progress)

    if not cfg.stats.store:
        return compute(list(layers)), list(layers)
    keys = stats_keys(cfg, layers, model_identity(cfg.model))
    store = StatsStore(cfg.stats.store)
    missing = [layer for layer in layers if keys[layer] not in store]
    return get_or_compute(store, keys, compute), missing


def compute_values(cfg: TrialConfig, model: Any, tok: Any, records: Sequence[Record]) -> torch.Tensor:
    """Batch-mode target values v* [n, d_model] float32 of ``records`` on the unedited model."""
    from editors.targets import optimize_values
    from editors.templates import TemplateCache, flat

    from .trial import trial_hparams

    hp = trial_hparams(cfg)
    tpl = TemplateCache().get(model, tok, hp.context_templates, hp.template_seed)
    v = optimize_values(
        model,
        tok,
        spec_for(model),
        hp.layers[-1],
        [r.request() for r in records],
        flat(tpl),
        hp,
        at=traits(cfg.algorithm).value_site,
        max_requests=hp.value_batch,
    )
    return v.values.float().cpu()


def compute_scores(cfg: TrialConfig, model: Any, tok: Any, records: Sequence[Record]) -> list[Any]:
    """Per-record scores (``RecordScores``) of ``records`` on the model as it is."""
    from .metrics import score_records

    return score_records(model, tok, spec_for(model), records, batch_size=cfg.scoring.batch_size)


def compute_ppl(cfg: TrialConfig, model: Any, tok: Any) -> float:
    """Held-out perplexity on the configured slice of the statistics corpus."""
    from .metrics import heldout_perplexity

    sc = cfg.scoring
    return heldout_perplexity(
        model, tok, spec_for(model), cfg.stats.corpus, sc.ppl_offset, sc.ppl_texts, sc.ppl_max_len
    )


def local_inputs(
    cfg: TrialConfig, model: Any, tok: Any, records: Sequence[Record], need_stats: bool, progress: bool = True
) -> TrialInputs:
    """A trial's shared inputs computed here, without Ray: statistics from ``stats.store`` (the missing
    layers computed in one pass and stored), pre-edit scores and perplexity of the unedited model.
    Values are left to the schedule (one trial has nothing to share them with)."""
    inputs = TrialInputs(counts={})
    if need_stats:
        local_stats(cfg, model, tok, inputs, progress)
    if cfg.scoring.pre:
        fill_scores(cfg, model, tok, records, inputs)
    return inputs


def local_stats(cfg: TrialConfig, model: Any, tok: Any, inputs: TrialInputs, progress: bool = True) -> None:
    """Fill ``inputs.stats`` from ``stats.store``, computing the missing layers in one pass here."""
    from .trial import trial_hparams

    layers = list(trial_hparams(cfg).layers)

    def loader() -> tuple[Any, Any]:
        if stats_dtype(cfg) == cfg.model.dtype:
            return model, tok
        from editors import load_model  # stats.model_dtype differs: the pass gets its own copy

        mc = cfg.model
        dev = str(model.device)
        return load_model(mc.source, gguf_file=mc.gguf_file, revision=mc.revision, dtype=stats_dtype(cfg), device=dev)

    got, computed = stats_from_store(cfg, layers, loader, progress)
    inputs.stats = {layer: sm.mom2 for layer, sm in got.items()}
    inputs.stats_tokens = {layer: sm.n_tokens for layer, sm in got.items()}
    inputs.counts.update(stats_computed=len(computed), stats_reused=len(layers) - len(computed))


def fill_scores(cfg: TrialConfig, model: Any, tok: Any, records: Sequence[Record], inputs: TrialInputs) -> None:
    """Score on the unedited model the records ``inputs`` lacks (and the perplexity), in place."""
    import dataclasses

    todo = [r for r in records if record_digest(r) not in inputs.pre_scores]
    if todo:
        for r, s in zip(todo, compute_scores(cfg, model, tok, todo)):
            inputs.pre_scores[record_digest(r)] = {k: v for k, v in dataclasses.asdict(s).items() if k != "case_id"}
    inputs.counts["scores_computed"] = inputs.counts.get("scores_computed", 0) + len(todo)
    if cfg.scoring.ppl and inputs.pre_ppl is None:
        inputs.pre_ppl = compute_ppl(cfg, model, tok)


# ----------------------------------------------------------------------------------------------------
# Ray tasks


def stats_pass_task(trial: dict[str, Any], layers: list[int]) -> list[Any]:
    """One statistics pass (or store read): one numpy [d_key, d_key] array per layer, then a dict
    ``{"computed": [...], "tokens": {layer: n}, "converged": bool | None}``."""
    from .trial import parse_config
    from .worker import cached_model

    cfg = parse_config(trial)
    t0 = time.perf_counter()
    got, computed = stats_from_store(cfg, layers, lambda: cached_model(cfg.model, stats_dtype(cfg)))
    meta = {
        "seconds": time.perf_counter() - t0,
        "computed": computed,
        "tokens": {layer: got[layer].n_tokens for layer in layers},
        "converged": got[layers[0]].converged,
    }
    return [got[layer].mom2.cpu().numpy() for layer in layers] + [meta]


def values_task(trial: dict[str, Any], case_ids: list[int], store: str | None) -> tuple[np.ndarray, float]:
    """(target values [n, d_model] of ``case_ids``, seconds), written to the values store before returning
    (two returns: the values' reference goes to the trials, the seconds to the driver's counters)."""
    from .data import load_counterfact, select
    from .trial import parse_config, trial_hparams
    from .worker import cached_model

    cfg = parse_config(trial)
    t0 = time.perf_counter()
    model, tok = cached_model(cfg.model)
    records = select(load_counterfact(cfg.dataset.source, cfg.dataset.sha256), case_ids=case_ids)
    v = compute_values(cfg, model, tok, records)
    if store:
        key = values_key(cfg, trial_hparams(cfg), model_identity(cfg.model))
        ValuesStore(store).put(key, [request_digest(r.request()) for r in records], v)
    return v.numpy(), time.perf_counter() - t0


def scores_task(trial: dict[str, Any], case_ids: list[int], store: str | None) -> tuple[list[dict[str, float]], float]:
    """(pre-edit score fields of ``case_ids``, one dict per record; seconds), written to the scores store."""
    import dataclasses

    from .data import load_counterfact, select
    from .trial import parse_config
    from .worker import cached_model

    cfg = parse_config(trial)
    t0 = time.perf_counter()
    model, tok = cached_model(cfg.model)
    records = select(load_counterfact(cfg.dataset.source, cfg.dataset.sha256), case_ids=case_ids)
    scores = compute_scores(cfg, model, tok, records)
    if store:
        ScoresStore(store).put(scores_key(cfg, model_identity(cfg.model)), [record_digest(r) for r in records], scores)
    rows = [{k: v for k, v in dataclasses.asdict(s).items() if k != "case_id"} for s in scores]
    return rows, time.perf_counter() - t0


def ppl_task(trial: dict[str, Any], store: str | None) -> float:
    from .trial import parse_config
    from .worker import cached_model

    cfg = parse_config(trial)
    model, tok = cached_model(cfg.model)
    value = compute_ppl(cfg, model, tok)
    if store:
        ScoresStore(store).put_ppl(ppl_key(cfg, model_identity(cfg.model)), value)
    return value


# ----------------------------------------------------------------------------------------------------
# Running the plan on Ray


@dataclass
class TrialRefs:
    """A trial's shared inputs as object-store references (resolved by :func:`resolve`)."""

    stats: dict[int, Any] = field(default_factory=dict)
    stats_meta: Any = None
    values: list[tuple[tuple[str, ...], Any]] = field(default_factory=list)
    scores: list[tuple[tuple[str, ...], Any]] = field(default_factory=list)
    ppl: Any = None


def _chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _chaos_after() -> int | None:
    v = os.environ.get(CHAOS_KILL_ENV)
    return int(v) if v else None


def run_prepass(cfg: SweepConfig, shared: SharedPlan) -> tuple[dict[str, TrialRefs], dict[str, Any]]:
    """Compute what ``shared`` lacks on Ray, store it as it finishes, and hand every trial its refs.

    Returns (trial key -> :class:`TrialRefs`, work counters).
    """
    import ray

    from editors.config import to_dict

    gpu = cfg.resources.prepass_gpu if cfg.resources.prepass_gpu is not None else cfg.resources.gpu
    opts = {"num_cpus": cfg.resources.cpu, "num_gpus": gpu, "max_retries": cfg.retries}
    t0 = time.perf_counter()
    counts = shared.counts()
    work: dict[str, Any] = {
        "stats_layers_computed": 0,
        "stats_layers_cached": counts["statistics_cached"],
        "stats_passes": 0,
        "values_optimised": 0,
        "values_cached": counts["values_cached"],
        "scores_computed": 0,
        "scores_cached": counts["scores_cached"],
        "stats_task_s": 0.0,  # seconds the tasks of each kind ran, summed over workers
        "values_task_s": 0.0,
        "scores_task_s": 0.0,
    }

    # Statistics: one task per pass; a layer's matrix is in the object store when its pass ends.
    layer_refs: dict[tuple[str, int], Any] = {}
    meta_refs: dict[tuple[str, int], Any] = {}
    pending: dict[Any, str] = {}
    for p in shared.passes:
        o = {**opts, "num_gpus": 0, "num_cpus": min(1.0, cfg.resources.cpu)} if p.read_only else opts
        task = ray.remote(stats_pass_task).options(num_returns=len(p.layers) + 1, **o)
        refs = task.remote(to_dict(p.trial), list(p.layers))
        for layer, ref in zip(p.layers, refs[:-1]):
            layer_refs[(p.group, layer)] = ref
            meta_refs[(p.group, layer)] = refs[-1]
        pending[refs[-1]] = "stats"

    # Values and scores: chunks of what is missing; stored parts are read here and put once.
    fact_refs: dict[tuple[Any, str], Any] = {}  # (key, digest) -> (chunk digests, ref)
    chunk_sizes: dict[Any, tuple[str, int]] = {}
    for kind, jobs, task_fn, store_cls, root in (
        ("values", shared.values, values_task, ValuesStore, cfg.values_store),
        ("scores", shared.scores, scores_task, ScoresStore, cfg.scores_store),
    ):
        for key, job in jobs.items():
            if job.cached:
                stored = store_cls(root).get(key, job.cached)
                ds = tuple(stored)
                if kind == "values":
                    ref = ray.put(torch.stack([stored[d] for d in ds]).numpy())
                else:
                    ref = ray.put([stored[d] for d in ds])
                for d in ds:
                    fact_refs[(key, d)] = (ds, ref)
            for chunk in _chunks(job.missing(), cfg.values_chunk):
                ids = [r.case_id for r, _ in chunk]
                ds = tuple(d for _, d in chunk)
                ref, secs = ray.remote(task_fn).options(num_returns=2, **opts).remote(to_dict(job.trial), ids, root)
                for d in ds:
                    fact_refs[(key, d)] = (ds, ref)
                chunk_sizes[secs] = (kind, len(ds))
                pending[secs] = kind
    ppl_refs: dict[PplKey, Any] = {}
    for pk, t in shared.ppl.items():
        if pk in shared.ppl_cached:
            ppl_refs[pk] = shared.ppl_cached[pk]
        else:
            ppl_refs[pk] = ray.remote(ppl_task).options(**opts).remote(to_dict(t), cfg.scores_store)
            pending[ppl_refs[pk]] = "ppl"
    log.info(
        "pre-pass: %d statistics pass(es) for %d layer(s) (%d read from the store), %d target values and "
        "%d pre-edit scores in %d chunk(s) (%d values, %d scores stored)",
        counts["statistics_passes"],
        counts["statistics_to_compute"],
        counts["statistics_cached"],
        counts["values_to_optimise_shared"],
        counts["scores_to_compute"],
        len(chunk_sizes),
        counts["values_cached"],
        counts["scores_cached"],
    )

    # Wait on everything at once, logging as tasks finish, in any order.
    chaos = _chaos_after()
    chunks_done = 0
    left = list(pending)
    while left:
        ready, left = ray.wait(left, num_returns=1)
        ref = ready[0]
        kind = pending[ref]
        el = time.perf_counter() - t0
        if kind == "stats":
            meta = ray.get(ref)
            work["stats_task_s"] += meta["seconds"]
            work["stats_done_s"] = el
            if meta["computed"]:
                work["stats_passes"] += 1
                work["stats_layers_computed"] += len(meta["computed"])
                log.info(
                    "pre-pass: statistics of layers %s ready, %s tokens (%.0f s)", meta["computed"], meta["tokens"], el
                )
        elif kind in ("values", "scores"):
            work[f"{kind}_task_s"] += ray.get(ref)  # the chunk's seconds; raises the task's error, if any
            work[f"{kind}_done_s"] = el
            n = chunk_sizes[ref][1]
            work["values_optimised" if kind == "values" else "scores_computed"] += n
            chunks_done += 1
            log.info(
                "pre-pass: %d/%d target values, %d/%d pre-edit scores (%.0f s)",
                work["values_optimised"],
                counts["values_to_optimise_shared"],
                work["scores_computed"],
                counts["scores_to_compute"],
                el,
            )
            if chaos is not None and chunks_done >= chaos:
                Path(os.environ.get(CHAOS_KILL_ENV + "_MARK", "/dev/null")).write_text(str(chunks_done))
                os.kill(os.getpid(), signal.SIGKILL)
    work["prepass_s"] = time.perf_counter() - t0

    refs: dict[str, TrialRefs] = {}
    for tkey, need in shared.needs.items():
        tr = TrialRefs()
        if need.stats_group is not None:
            tr.stats = {layer: layer_refs[(need.stats_group, layer)] for layer in need.layers}
            tr.stats_meta = {layer: meta_refs[(need.stats_group, layer)] for layer in need.layers}
        if need.values is not None:
            tr.values = _dedupe([fact_refs[(need.values, d)] for d in need.value_digests])
        if need.scores is not None:
            tr.scores = _dedupe([fact_refs[(need.scores, d)] for d in need.score_digests])
        if need.ppl is not None:
            tr.ppl = ppl_refs[need.ppl]
        refs[tkey] = tr
    log.info("shared work: %s", work)
    return refs, work


def _dedupe(items: Iterable[tuple[tuple[str, ...], Any]]) -> list[tuple[tuple[str, ...], Any]]:
    seen: dict[int, tuple[tuple[str, ...], Any]] = {}
    for ds, ref in items:
        seen.setdefault(id(ref), (ds, ref))
    return list(seen.values())


def resolve(refs: TrialRefs) -> TrialInputs:
    """A trial's :class:`TrialInputs` from its references (inside the trial's worker)."""
    import warnings

    import ray

    def as_tensor(a: Any) -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only zero-copy views; the solvers copy
            return torch.from_numpy(a)

    inputs = TrialInputs(counts={})
    if refs.stats:
        arrays = {layer: ray.get(r) for layer, r in refs.stats.items()}
        inputs.stats = {layer: as_tensor(a) for layer, a in arrays.items()}
        metas = {layer: ray.get(r) for layer, r in (refs.stats_meta or {}).items()}
        inputs.stats_tokens = {layer: int(m["tokens"][layer]) for layer, m in metas.items()}
        inputs.counts["stats_reused"] = len(arrays)
        inputs.counts["stats_zero_copy"] = int(all(not a.flags.writeable for a in arrays.values()))
    for ds, ref in refs.values:
        arr = ray.get(ref)
        inputs.values.update({d: as_tensor(arr[i]) for i, d in enumerate(ds)})
    for ds, ref in refs.scores:
        rows = ray.get(ref)
        inputs.pre_scores.update(dict(zip(ds, rows)))
    if refs.ppl is not None:
        inputs.pre_ppl = float(refs.ppl if isinstance(refs.ppl, (int, float)) else ray.get(refs.ppl))
    return inputs
