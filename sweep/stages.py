"""One trial as stages: (model, algorithm, layers, batch size, schedule, n_edits, hparams) -> one result.

Scoring follows docs/ALGORITHMS.md §4: every fact on the unedited model ("pre"), each batch's facts right
after their own batch ("at_edit", the reference code's protocol) and every fact on the final model
("final", AlphaEdit's protocol; in ``batch`` mode each batch is edited on the unedited weights, so final =
at_edit). The trial consumes complete shared inputs (statistics, batch-mode target values, pre-edit
scores, the unedited perplexity and probes), fulfilled before it starts: a sweep's (:mod:`sweep.shared.fulfil`,
:mod:`sweep.shared.service`), or :func:`sweep.trial.trial_alone`'s for a trial alone. The stages:
:func:`load_records` -> :func:`load_for_trial` -> :func:`check_inputs` -> :func:`edit_and_score` (the
schedule, each batch scored right after it) -> final scoring -> :func:`run_trial`'s result. No Ray, no
MLflow, no CLI.
"""

from __future__ import annotations

import logging
import re
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import torch

from editors import load_model, run_schedule, spec_for, traits
from editors.common import sync
from editors.config import to_dict
from editors.hparams import EditHParams
from editors.model import ModelSpec, check_layer, model_config, model_device, n_layers_of
from editors.requests import validate_requests
from editors.schedule import BatchEvent, StopSchedule
from editors.templates import TemplateCache, TemplateGroups

from .config import TrialConfig, resolve_device
from .evals.collapse import cohort_size, collapse_points
from .evals.data import Record, load_selection
from .evals.metrics import (
    RecordScores,
    Reference,
    aggregate,
    gen_settings,
    generation_entropy,
    heldout_perplexity,
    score_records,
)
from .evals.registry import CORE, GEN_CORE, describe
from .result import CurvePoint, TrialResult, UpdateNorms
from .shared.keys import TrialInputs, model_identity, record_digest, request_digest
from .shared.mirror import loadable

log = logging.getLogger(__name__)


def peak_memory_mb(device: str) -> dict[str, float]:
    out = {"cpu_rss_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.startswith("cuda") and torch.cuda.is_available():
        out["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def versions(model_id: str) -> dict[str, str]:
    import transformers

    try:
        own = metadata.version("model-editing-sweep")
    except metadata.PackageNotFoundError:
        own = "source"
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "model_editing_sweep": own,
        "model": model_id,
        **machine(),
    }


def machine() -> dict[str, str]:
    """What the numbers can depend on beyond the code: the CPU (or GPU), torch's thread count and the
    BLAS/oneDNN build; the same sweep on another machine may move a borderline fact (docs/RUNBOOK.md,
    "Reproducibility")."""
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    out = {"cpu": cpu, "threads": str(torch.get_num_threads()), "blas": _blas()}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
        out["cuda"] = str(torch.version.cuda)
    return out


def _blas() -> str:
    """The BLAS/LAPACK torch was built with and the CPU kernels it uses, from ``torch.__config__``."""
    text = torch.__config__.show()
    found = re.findall(r"(BLAS_INFO=\w+|LAPACK_INFO=\w+|CPU capability usage: \w+|MKL-DNN v[\d.]+)", text)
    return ", ".join(dict.fromkeys(found)) or "unknown"


# ----------------------------------------------------------------------------------------------------
# The trial's stages: data -> model -> shared inputs -> schedule with per-batch scoring -> final -> result


def load_records(cfg: TrialConfig) -> list[Record]:
    """The trial's facts, in the sweep's fixed order (a bad record fails before any model work)."""
    return load_selection(cfg.dataset, cfg.n_edits)


def load_for_trial(cfg: TrialConfig, hp: EditHParams, model: Any, tok: Any) -> tuple[Any, Any, ModelSpec, float]:
    """(model, tokenizer, spec, seconds spent loading): the given model, or the configured one loaded
    after its layers are checked against its config (so a bad layer costs no weights)."""
    t = time.perf_counter()
    if model is None:
        mc = loadable(cfg.model)  # a mirrored model: this node's checked copy
        n_layers = n_layers_of(model_config(mc.source, gguf_file=mc.gguf_file, revision=mc.revision))
        for layer in hp.layers:
            check_layer(layer, n_layers, "layers")
        model, tok = load_model(
            mc.source, gguf_file=mc.gguf_file, revision=mc.revision, dtype=mc.dtype, device=resolve_device(mc.device)
        )
    load_s = time.perf_counter() - t
    spec = spec_for(model)
    for layer in hp.layers:
        spec.check_layer(layer, "layers")
    return model, tok, spec, load_s


class Scorer:
    """Scoring of the model as it is now, timed: the dataset's teacher-forced scores, the generated ones
    under ``scoring.generated`` (``gen_ns`` against the unedited model's generations, ``reference``:
    case id -> token ids per neighbourhood prompt), generation entropy and the capability probes when
    configured."""

    def __init__(self, cfg: TrialConfig, model: Any, tok: Any, spec: ModelSpec) -> None:
        self.cfg, self.model, self.tok, self.spec = cfg, model, tok, spec
        self.seconds = 0.0
        self.probe_seconds = 0.0
        self.reference: dict[int, Reference] = {}
        self._cases: list[Any] | None = None  # MQuAKE's cases, read once

    def __call__(self, recs: list[Record]) -> tuple[list[RecordScores], dict[str, float]]:
        sc = self.cfg.scoring
        gs = gen_settings(sc)
        ref = [self.reference[r.case_id] for r in recs] if gs is not None else None
        sync(self.model.device)
        t0 = time.perf_counter()
        per = score_records(
            self.model, self.tok, self.spec, recs, batch_size=sc.batch_size, generated=gs, reference=ref
        )
        out = aggregate(per)
        if sc.generation:
            out["ge"] = self.generation_entropy(recs)
        sync(self.model.device)
        self.seconds += time.perf_counter() - t0
        return per, out

    def generation_entropy(self, recs: list[Record]) -> float:
        sc = self.cfg.scoring
        src = [
            (r.generation_prompts or r.paraphrase_prompts)
            if sc.generation_prompts == "generation"
            else r.paraphrase_prompts
            for r in recs
        ]
        prompts = [p for ps in src for p in ps[: sc.generation_per_record]]
        return generation_entropy(
            self.model,
            self.tok,
            prompts,
            max_len=sc.generation_max_len,
            strip_prompt=sc.generation_strip_prompt,
            seed=self.cfg.seed,
        )

    def probes(self) -> dict[str, float]:
        """The capability probes (``scoring.probes``) on the model as it is (:mod:`sweep.evals.probes`)."""
        from .shared.compute import compute_probes

        sync(self.model.device)
        t0 = time.perf_counter()
        out = compute_probes(self.cfg, self.model, self.tok)
        sync(self.model.device)
        self.probe_seconds += time.perf_counter() - t0
        return out

    def multihop(self, recs: list[Record]) -> dict[str, float]:
        """MQuAKE's multi-hop scores of the cases whose every rewrite is among ``recs`` (the edits in the
        model; :func:`sweep.evals.mquake.multihop_metrics`), or nothing for another dataset."""
        d = self.cfg.dataset
        if d.name != "mquake":
            return {}
        from .evals.data import resolve_source
        from .evals.mquake import complete_cases, load_cases, multihop_metrics

        if self._cases is None:
            self._cases = load_cases(resolve_source(d.source, d.sha256))
        t0 = time.perf_counter()
        cases = complete_cases(self._cases, [r.case_id for r in recs])
        out = multihop_metrics(
            self.model, self.tok, cases, d.prompts, d.multihop, batch_size=self.cfg.scoring.gen_batch_size
        )
        self.seconds += time.perf_counter() - t0
        return out

    def ppl(self) -> float:
        t0 = time.perf_counter()
        sc = self.cfg.scoring
        value = heldout_perplexity(
            self.model, self.tok, self.spec, self.cfg.stats.corpus, sc.ppl_offset, sc.ppl_texts, sc.ppl_max_len
        )
        self.seconds += time.perf_counter() - t0
        return value


def pre_scores(
    cfg: TrialConfig, records: list[Record], inputs: TrialInputs, scorer: Scorer
) -> tuple[list[RecordScores], dict[str, float]]:
    """The unedited model's scores of ``records`` from the shared inputs (GE, which samples over the
    trial's own prompts, is computed here); the stored neighbourhood generations become the scorer's
    reference for ``gen_ns``."""
    rows = [inputs.pre_scores[record_digest(r)] for r in records]
    per = [
        RecordScores(case_id=r.case_id, **{k: v for k, v in row.items() if k != "gen_ref"})
        for r, row in zip(records, rows)
    ]
    if cfg.scoring.generated:
        scorer.reference = {r.case_id: tuple(tuple(g) for g in row["gen_ref"]) for r, row in zip(records, rows)}
    agg = aggregate(per)
    if cfg.scoring.generation:
        agg["ge"] = scorer.generation_entropy(records)
    if cfg.scoring.ppl and inputs.pre_ppl is not None:
        agg["ppl"] = inputs.pre_ppl
    return per, agg


@dataclass
class BatchLog:
    """What the schedule's callback gathers: at-edit scores, curve points, stage times, fallbacks."""

    scores: list[RecordScores] = field(default_factory=list)
    ge: list[tuple[int, float]] = field(default_factory=list)
    curves: list[dict[str, Any]] = field(default_factory=list)
    stages: dict[str, float] = field(default_factory=lambda: {"keys": 0.0, "values": 0.0, "solve": 0.0})
    values_optimised: int = 0
    solver_fallbacks: int = 0
    ppl_at_edit: float | None = None
    retention: list[dict[str, Any]] = field(default_factory=list)
    health: list[dict[str, Any]] = field(default_factory=list)
    collapsed_at: int | None = None
    collapse_reason: str | None = None
    final_drift: dict[str, float] = field(default_factory=dict)  # module -> ‖W − W₀‖_F after the last batch
    # the last batch's retention point and perplexity: the final model's, which final_scores reuses
    scored_last: tuple[int, list[RecordScores], dict[str, float]] | None = None
    ppl_last: float | None = None
    probes_final: dict[str, float] = field(default_factory=dict)  # the probes after the last batch
    multihop_final: dict[str, float] = field(default_factory=dict)  # MQuAKE, after the last batch

    def count(self, ev: BatchEvent) -> None:
        """Add a batch's stage times, optimised values, solver fallbacks and weight drift."""
        info = ev.result.info
        for k in self.stages:
            self.stages[k] += info.get(f"time_{k}", 0.0)
        if "value_loss" in info:
            self.values_optimised += len(ev.requests)
        for layer_info in info.get("solver", {}).values():
            for rec in layer_info if isinstance(layer_info, list) else [layer_info]:
                self.solver_fallbacks += bool(rec.get("fallback"))
        self.final_drift = dict(ev.drift)


def periodic_points(
    cfg: TrialConfig, ev: BatchEvent, last: bool, scorer: Scorer, records: list[Record], log_: BatchLog
) -> tuple[dict[str, float], dict[str, float], dict[str, float], float | None]:
    """The measurements taken every few batches and after the last one, each logged in ``log_``:
    (the forgetting point, the probes, the matrices' health, the held-out perplexity measured with it)."""
    sc = cfg.scoring
    forget: dict[str, float] = {}
    if sc.retention_every and cfg.mode != "batch" and ((ev.index + 1) % sc.retention_every == 0 or last):
        per_so_far, agg = scorer(records[: ev.applied])
        if last:
            log_.scored_last = (ev.applied, per_so_far, agg)
        cohort = cohort_size(cfg.n_batches, cfg.batch_size)
        log_.retention.append(retention_point(ev.applied, per_so_far, cfg.batch_size, cohort))
        forget = {k: v for k, v in log_.retention[-1].items() if k != "edits"}
    probes: dict[str, float] = {}
    if sc.probes and (last or (sc.probe_every and (ev.index + 1) % sc.probe_every == 0)):
        probes = scorer.probes()
        if last:
            log_.probes_final = probes
    if last:  # batch mode: the last batch's model; otherwise every edit is in
        log_.multihop_final = scorer.multihop(records[: ev.applied] if cfg.mode != "batch" else records)
    ppl = None
    health: dict[str, float] = {}
    if ev.health is not None:
        ppl = scorer.ppl() if sc.ppl else None
        if last:
            log_.ppl_last = ppl
        log_.health.append(health_point(ev, ppl))
        health = {k: v for k, v in log_.health[-1].items() if k != "edits"}
    return forget, probes, health, ppl


def retention_point(edits: int, per: list[RecordScores], first_batch: int, cohort: int) -> dict[str, Any]:
    """A forgetting-curve point: every fact edited so far (``all_*``), the first batch's facts
    (``first_*``) and each cohort of ``cohort`` facts in edit order (``c<j>_es``, ``c<j>_s``: a column of
    the retention matrix, :mod:`sweep.evals.collapse`) re-scored on the model after ``edits`` edits
    (percent)."""
    point: dict[str, Any] = {"edits": edits}
    for prefix, group in (("all", per), ("first", per[:first_batch])):
        agg = aggregate(group)
        point.update({f"{prefix}_{m}": agg[m] for m in CORE})
    for j in range(0, len(per), cohort):
        agg = aggregate(per[j : j + cohort])
        point.update({f"c{j // cohort}_{m}": agg[m] for m in ("es", "s")})
    return point


def health_point(ev: BatchEvent, ppl: float | None) -> dict[str, Any]:
    """The edited matrices' health after a batch (:class:`editors.schedule.WeightHealth`; the largest
    over the edited modules) and the held-out perplexity when measured."""
    hs = list((ev.health or {}).values())
    point: dict[str, Any] = {
        "edits": ev.applied,
        "drift": max(h.drift for h in hs),
        "sigma_max": max(h.sigma_max for h in hs),
        "cond": max(h.cond for h in hs),
        "delta_sigma_max": max(h.delta_sigma_max for h in hs),
        "norm": max(h.norm for h in hs),
        "he": max(h.hyperspherical_energy for h in hs),
    }
    if ppl is not None:
        point["ppl"] = ppl
    return point


def guard_check(cfg: TrialConfig, batch_es: float, ppl: float | None, pre_ppl: float | None) -> str | None:
    """Why the collapse guard stops the trial after this batch, or None (``cfg.guard``)."""
    g = cfg.guard
    if g.min_batch_es is not None and batch_es < g.min_batch_es:
        return f"the batch's ES at edit {batch_es:.1f} < guard.min_batch_es {g.min_batch_es}"
    if g.max_ppl_ratio is not None and ppl is not None and pre_ppl and ppl > g.max_ppl_ratio * pre_ppl:
        return f"perplexity {ppl:.1f} > guard.max_ppl_ratio {g.max_ppl_ratio} × the unedited {pre_ppl:.1f}"
    return None


def edit_and_score(
    cfg: TrialConfig,
    hp: EditHParams,
    model: Any,
    tok: Any,
    spec: ModelSpec,
    records: list[Record],
    inputs: TrialInputs,
    scorer: Scorer,
    templates: TemplateGroups,
    t_start: float,
    on_batch: Callable[[CurvePoint], None] | None,
) -> tuple[BatchLog, Any]:
    """Run the schedule, scoring each batch's facts right after their batch (the reference's protocol);
    returns the log and the schedule's result (the model is left edited in sequential modes)."""
    log_ = BatchLog()
    shareable = traits(cfg.algorithm).values_shareable(cfg.mode, cfg.batch_size)

    def provide(b: int, chunk: list) -> torch.Tensor | None:
        digests = [request_digest(r) for r in chunk]
        if not shareable or not all(d in inputs.values for d in digests):
            return None
        inputs.counts["values_reused"] = inputs.counts.get("values_reused", 0) + len(chunk)
        return torch.stack([torch.as_tensor(inputs.values[d]) for d in digests]).to(model.device)

    def callback(ev: BatchEvent) -> None:
        log_.count(ev)
        recs = records[ev.index * cfg.batch_size : ev.index * cfg.batch_size + len(ev.requests)]
        per, agg = scorer(recs)
        log_.scores.extend(per)
        if "ge" in agg:
            log_.ge.append((len(recs), agg["ge"]))
        last = ev.index == cfg.n_batches - 1
        if cfg.scoring.ppl and cfg.mode == "batch" and last:
            log_.ppl_at_edit = scorer.ppl()  # batch mode: the last batch's model stands for all of them
        so_far = aggregate(log_.scores)
        forget, probes, health, ppl = periodic_points(cfg, ev, last, scorer, records, log_)
        point = CurvePoint(
            batch=ev.index,
            edits=ev.index * cfg.batch_size + len(ev.requests),
            applied=ev.applied,
            update_norm=sum(ev.update_norms.values()),
            drift=max(ev.drift.values(), default=0.0),
            elapsed_s=time.perf_counter() - t_start,
            at_edit={m: so_far[m] for m in (*CORE, *GEN_CORE) if m in so_far},
            batch_scores={m: agg[m] for m in (*CORE, *GEN_CORE) if m in agg},
            forget=forget,
            health=health,
            probes=probes,
        )
        log_.curves.append(point.flat())
        if on_batch is not None:
            on_batch(point)
        why = guard_check(cfg, agg["es"], ppl, inputs.pre_ppl)
        if why is not None:
            log_.collapsed_at, log_.collapse_reason = point.edits, why
            if not last:
                raise StopSchedule(why)

    sched = run_schedule(
        model,
        tok,
        [r.request() for r in records],
        cfg.algorithm,
        hp,
        inputs.stats,
        batch_size=cfg.batch_size,
        mode=cfg.mode,
        callback=callback,
        spec=spec,
        templates=templates,
        values=provide,
        restore_at_end=False,
        health_every=cfg.scoring.health_every,
    )
    return log_, sched


def check_inputs(cfg: TrialConfig, hp: EditHParams, records: list[Record], inputs: TrialInputs | None) -> TrialInputs:
    """``inputs`` when it holds everything the trial needs (statistics of its layers, pre-edit scores
    of its facts, the unedited perplexity and probes), else one error saying what is missing and where it comes
    from. A trial computes no shared work itself."""
    if inputs is None:
        raise ValueError(
            "inputs: run_trial needs its shared inputs; fulfil them first "
            "(trial_alone(cfg) runs one trial with them, as python -m sweep.trial does)"
        )
    stats = cfg.needs_stats
    lack = inputs.missing(cfg, records, stats)
    if lack:
        raise ValueError(f"inputs: the trial's shared inputs lack {'; '.join(lack)} (sweep.shared.fulfil fulfils them)")
    inputs.counts = {  # this run's use of them (values_reused grows as the schedule takes values)
        "stats_reused": len(hp.layers) if stats else 0,
        "values_reused": 0,
        "scores_reused": sum(record_digest(r) in inputs.pre_scores for r in records) * cfg.scoring.pre,
    }
    return inputs


def fact_rows(records: list[Record]) -> dict[int, dict[str, Any]]:
    """case id -> the per-record row's identity columns (the scores are merged in by stage)."""
    return {
        r.case_id: {
            "case_id": r.case_id,
            "subject": r.subject,
            "prompt": r.rewrite_prompt,
            "target_new": r.target_new,
            "target_true": r.target_true,
        }
        for r in records
    }


def final_scores(
    cfg: TrialConfig, log_: BatchLog, sched: Any, scorer: Scorer, records: list[Record]
) -> tuple[dict[str, float], dict[str, float], list[RecordScores]]:
    """(at-edit metrics, final metrics, final per-record scores) of the model the schedule left: in
    ``batch`` mode final = at edit (each batch on the unedited model); otherwise the facts whose edits
    are in the model (all of them unless the guard stopped the trial) are scored again, unless the last
    batch's retention point already scored them on this model (and its health point took the
    perplexity): then those are the final scores, not a second pass of the same forward passes."""
    at_edit = aggregate(log_.scores)
    if log_.ge:
        at_edit["ge"] = sum(n * g for n, g in log_.ge) / sum(n for n, _ in log_.ge)
    if log_.ppl_at_edit is not None:
        at_edit["ppl"] = log_.ppl_at_edit
    if cfg.mode == "batch":
        return at_edit, {**at_edit, **log_.probes_final, **log_.multihop_final}, log_.scores
    if log_.scored_last is not None and log_.scored_last[0] == sched.applied:
        per, final = log_.scored_last[1], dict(log_.scored_last[2])
    else:
        per, final = scorer(records[: sched.applied])
    if cfg.scoring.ppl:
        final["ppl"] = log_.ppl_last if log_.ppl_last is not None else scorer.ppl()
    final.update(log_.probes_final or (scorer.probes() if cfg.scoring.probes else {}))  # a guard stop: now
    final.update(log_.multihop_final or scorer.multihop(records[: sched.applied]))
    return at_edit, final, per


def work_counts(inputs: TrialInputs, log_: BatchLog) -> dict[str, int]:
    """Shared work this trial was handed (statistics layers, values, pre-edit scores) and the values its
    schedule optimised itself; a trial computes no shared work (``*_computed`` are its fulfilment's
    when it ran alone: :func:`trial_alone`)."""
    c = inputs.counts
    return {
        "stats_computed": 0,
        "stats_reused": c.get("stats_reused", 0),
        "values_optimised": log_.values_optimised,
        "values_reused": c.get("values_reused", 0),
        "scores_computed": 0,
        "scores_reused": c.get("scores_reused", 0),
    }


def run_trial(
    cfg: TrialConfig,
    *,
    inputs: TrialInputs,
    model: Any = None,
    tok: Any = None,
    templates: TemplateCache | None = None,
    on_batch: Callable[[CurvePoint], None] | None = None,
) -> TrialResult:
    """Run one trial and return its :class:`~sweep.result.TrialResult` (see the module docstring).

    Args:
        inputs: the trial's shared inputs, complete (:mod:`sweep.shared.fulfil`: a sweep's fulfilment, or
            :func:`trial_alone` for a trial alone); what is missing is an error.
        model, tok: a loaded model to reuse (its edited weights are restored exactly at the end).
        on_batch: called with each batch's curve point (a sweep reports it as an intermediate result).
    """
    t_start = time.perf_counter()
    hp = cfg.edit_hparams
    torch.manual_seed(cfg.seed)
    records = load_records(cfg)
    model, tok, spec, load_s = load_for_trial(cfg, hp, model, tok)
    validate_requests(tok, [r.request() for r in records])
    device = str(model_device(model))
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    inputs = check_inputs(cfg, hp, records, inputs)

    scorer = Scorer(cfg, model, tok, spec)
    metrics: dict[str, dict[str, float]] = {}
    per_record = fact_rows(records)
    if cfg.scoring.pre:
        per, metrics["pre"] = pre_scores(cfg, records, inputs, scorer)
        _merge(per_record, "pre", per)
        metrics["pre"].update(inputs.pre_probes or {})  # the unedited model's probes: shared work
        metrics["pre"].update(scorer.multihop(records))  # MQuAKE: the unedited model on every case
    tpl = (templates or TemplateCache()).get(model, tok, hp.context_templates, hp.template_seed)
    log_, sched = edit_and_score(cfg, hp, model, tok, spec, records, inputs, scorer, tpl, t_start, on_batch)
    try:
        metrics["at_edit"], metrics["final"], per = final_scores(cfg, log_, sched, scorer, records)
    finally:
        sched.restore(model)  # a reused model goes back to its unedited weights, bit-identical
    _merge(per_record, "at_edit", log_.scores)
    _merge(per_record, "final", per)
    norms = log_.final_drift if cfg.mode != "batch" else {}
    timings = {"load": load_s, **log_.stages, "score": scorer.seconds}
    if cfg.scoring.probes:
        timings["probes"] = scorer.probe_seconds
    timings["total"] = time.perf_counter() - t_start
    return TrialResult(
        config=to_dict(cfg),
        hparams=to_dict(hp),
        metrics=metrics,
        per_record=list(per_record.values()),
        curves=log_.curves,
        retention=log_.retention,
        health=log_.health,
        collapsed_at=log_.collapsed_at,
        collapse_reason=log_.collapse_reason,
        collapse_points=collapse_points(log_.curves, metrics.get("pre", {})) if cfg.mode != "batch" else {},
        method=cfg.method_name,
        update_norms=UpdateNorms([p["update_norm"] for p in log_.curves], norms),
        solver_fallbacks=log_.solver_fallbacks,
        stats_tokens=dict(inputs.stats_tokens),
        timings=timings,
        memory=peak_memory_mb(device),
        work=work_counts(inputs, log_),
        versions=versions(model_identity(cfg.model)),
        templates=[list(g) for g in tpl],
        dataset=cfg.dataset.name,
        metric_info=describe(sorted({k for m in metrics.values() for k in m}), cfg.dataset.name),
    )


def _merge(per_record: dict[int, dict[str, Any]], stage: str, scores: list[RecordScores]) -> None:
    for s in scores:
        per_record[s.case_id].update({f"{stage}_{m}": v for m, v in s.fields().items()})
