"""A trial's result: the typed object :func:`sweep.stages.run_trial` returns and the worker, tracking and
reports read, and its JSON form (``trial.json`` in MLflow, ``--out`` of ``python -m sweep.trial``)."""

from __future__ import annotations

import base64
import dataclasses
import json
import zlib
from dataclasses import dataclass, field
from typing import Any

from .evals.registry import CORE, STAGES

#: The key of a trial's last Tune report that carries its whole result (:meth:`TrialResult.pack`).
REPORT_KEY = "trial_result"


@dataclass(frozen=True)
class CurvePoint:
    """One batch's point on a trial's curves (what ``run_trial``'s ``on_batch`` receives).

    Attributes:
        batch, edits, applied: the batch's index, the facts scheduled so far, the edits in the model.
        update_norm: ‖ΔW‖_F of this batch's update (summed over modules); drift: max ‖W − W₀‖_F.
        elapsed_s: seconds since the trial started.
        at_edit: ES/PS/NS/S of every fact so far, each scored right after its own batch.
        batch_scores: ES/PS/NS/S of this batch's facts.
        forget: the forgetting curve's point when measured (``all_*``, ``first_*``), else empty.
        health: the edited matrices' health when measured (``drift sigma_max cond delta_sigma_max norm he
            ppl``).
        probes: the capability probes when measured (``probe_<task>_<metric>``, :mod:`sweep.evals.probes`).
    """

    batch: int
    edits: int
    applied: int
    update_norm: float
    drift: float
    elapsed_s: float
    at_edit: dict[str, float]
    batch_scores: dict[str, float]
    forget: dict[str, float] = field(default_factory=dict)
    health: dict[str, float] = field(default_factory=dict)
    probes: dict[str, float] = field(default_factory=dict)

    def flat(self) -> dict[str, Any]:
        """The point as one flat dict, the form of ``TrialResult.curves`` and of the MLflow metrics
        ``curve.<name>`` at step = edits (``at_edit_s``, ``batch_es``, ``forget_all_es``, ``health_cond``...)."""
        return {
            "batch": self.batch,
            "edits": self.edits,
            "applied": self.applied,
            "update_norm": self.update_norm,
            "drift": self.drift,
            "elapsed_s": self.elapsed_s,
            **{f"at_edit_{m}": v for m, v in self.at_edit.items()},
            **{f"batch_{m}": v for m, v in self.batch_scores.items()},
            **{f"forget_{k}": v for k, v in self.forget.items()},
            **{f"health_{k}": v for k, v in self.health.items()},
            **self.probes,
        }


@dataclass
class UpdateNorms:
    """‖ΔW‖_F of each batch's update (per module summed), and ‖W − W₀‖_F of each edited module at the
    end of a sequential schedule (empty in ``batch`` mode)."""

    per_batch: list[float] = field(default_factory=list)
    final_weight_change: dict[str, float] = field(default_factory=dict)

    @property
    def mean(self) -> float | None:
        return sum(self.per_batch) / len(self.per_batch) if self.per_batch else None


@dataclass
class TrialResult:
    """Everything one trial measured.

    Attributes:
        config, hparams: the resolved trial config and hyperparameters (as plain data).
        metrics: stage (``pre``, ``at_edit``, ``final``) -> metric (``es ps ns s em pm nm *_acc ge ppl
            gen_* probe_*``, :mod:`sweep.evals.registry`) -> value, in percent (ES...) or as is (ppl).
        per_record: one row per fact: ``case_id`` and ``<stage>_<metric>``.
        curves: one point per batch (``edits``, ``applied``, ``update_norm``, S/ES/PS/NS so far...).
        stats_tokens: layer -> tokens averaged into its C.
        timings: stage -> seconds (``load shared keys values solve score total``).
        memory: ``cpu_rss_peak_mb`` (and ``gpu_peak_mb``).
        work: counters of shared work computed vs reused (statistics, values, pre-edit scores).
        versions: torch, transformers, this package, the model's fingerprint.
        templates: the context templates used.
        retention: the forgetting curve, every ``scoring.retention_every`` batches: ``edits`` and
            ES/PS/NS/S of every fact edited so far (``all_*``) and of the first batch's (``first_*``).
        health: every ``scoring.health_every`` batches: ``edits``, ``drift`` ‖W − W₀‖_F,
            ``sigma_max``, ``cond``, ``delta_sigma_max``, ``norm`` ‖W‖_F, ``he`` (hyperspherical energy;
            each the largest over the edited matrices), ``ppl``.
        collapsed_at, collapse_reason: edits in the model when the collapse guard stopped the trial,
            and why (None: it ran to the end).
        collapse_points: CP@60 of each measure its curves hold (:mod:`sweep.evals.collapse`): the edits
            at which it fell below 60% of its start (perplexity: rose above start / 0.6); None: never.
            Sequential modes only.
        method: the method's name in reports (:func:`sweep.config.method_name`).
        trial_key, node, pid, stats_zero_copy: set by a sweep's worker.
        dataset: the benchmark the facts come from (``dataset.name``).
        metric_info: each metric's dataset, protocol and label (:func:`sweep.evals.registry.describe`), so a
            teacher-forced number is never read as a generated one.
    """

    config: dict[str, Any]
    hparams: dict[str, Any]
    metrics: dict[str, dict[str, float]]
    per_record: list[dict[str, Any]]
    curves: list[dict[str, Any]]
    update_norms: UpdateNorms
    solver_fallbacks: int
    stats_tokens: dict[int, int]
    timings: dict[str, float]
    memory: dict[str, float]
    work: dict[str, int]
    versions: dict[str, str]
    templates: list[list[str]]
    retention: list[dict[str, Any]] = field(default_factory=list)
    health: list[dict[str, Any]] = field(default_factory=list)
    collapsed_at: int | None = None
    collapse_reason: str | None = None
    collapse_points: dict[str, int | None] = field(default_factory=dict)
    method: str | None = None
    trial_key: str | None = None
    node: str | None = None
    pid: int | None = None
    stats_zero_copy: bool | None = None
    dataset: str = "counterfact"
    metric_info: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def layers(self) -> list[int]:
        return list(self.hparams["layers"])

    def flat_metrics(self) -> dict[str, float]:
        """``{"<stage>.<metric>": value}`` (e.g. ``final.s``)."""
        return {f"{stage}.{k}": v for stage, m in self.metrics.items() for k, v in m.items()}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (layer keys as strings)."""
        out = dataclasses.asdict(self)
        out["stats_tokens"] = {str(k): v for k, v in self.stats_tokens.items()}
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrialResult:
        """The inverse of :meth:`to_dict` (fields it does not know are an error: a foreign file)."""
        d = dict(data)
        d["update_norms"] = UpdateNorms(**d.get("update_norms", {}))
        d["stats_tokens"] = {int(k): int(v) for k, v in (d.get("stats_tokens") or {}).items()}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"trial result: unknown fields {sorted(unknown)}")
        return cls(**d)

    def pack(self) -> str:
        """The result as one string for a Tune report (zlib-compressed JSON in base64: a trial of 2,000
        facts with 27 scores each packs into about 0.8 MB, from 2.1 MB of JSON, in 0.2 s). It travels to
        the driver through Ray, so no node needs the driver's disk; the driver keeps it in Tune's
        experiment state, where ``--resume`` finds it."""
        raw = json.dumps(self.to_dict(), separators=(",", ":"), default=str).encode()
        return base64.b64encode(zlib.compress(raw, 6)).decode("ascii")

    @classmethod
    def unpack(cls, packed: str) -> TrialResult:
        """The inverse of :meth:`pack`."""
        return cls.from_dict(json.loads(zlib.decompress(base64.b64decode(packed))))


__all__ = ["CORE", "REPORT_KEY", "STAGES", "CurvePoint", "TrialResult", "UpdateNorms"]
