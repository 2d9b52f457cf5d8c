"""Edit schedules (2405.00664 §3; docs/ALGORITHMS.md §4).

- ``batch``: every batch is edited on the unedited weights, which are restored after each batch.
- ``sequential-batch``: batches accumulate; each is computed on the weights the earlier ones produced.
- ``sequential``: sequential-batch with one request per batch.

After each batch is applied, ``callback(event)`` runs on the edited model, so a caller can score that
batch's facts right after their edit (the reference's protocol), log curves, and stop the schedule
(raise :class:`StopSchedule`, e.g. a collapse guard: the edits so far stay in the model). Every
``health_every`` batches the event carries each edited matrix's :class:`WeightHealth`. With PRUNE
(``hparams.prune_base``) the callback and the final model see W₀ + PRUNE(W − W₀), while the edits go
on from the unrestrained weights, as the authors evaluate it (:mod:`editors.algorithms.prune`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from .algorithms import ALGORITHMS, prune
from .common import EditResult, EditState, apply_deltas, restore
from .model import ModelSpec, get_module, spec_for
from .requests import EditRequest, as_request, validate_requests
from .templates import TemplateCache, TemplateGroups

log = logging.getLogger(__name__)

Mode = Literal["batch", "sequential-batch", "sequential"]
MODES = ("batch", "sequential-batch", "sequential")


class StopSchedule(Exception):
    """Raised by a callback to end the schedule after the current batch; its message is the reason."""


@dataclass(frozen=True)
class WeightHealth:
    """One edited matrix after a batch: ``drift`` ‖W − W₀‖_F, ``sigma_max`` σ_max(W), ``cond`` its
    condition number σ_max/σ_min, ``delta_sigma_max`` σ_max(W − W₀) (PRUNE's quantity), ``norm`` ‖W‖_F
    and ``hyperspherical_energy`` of its neurons (:func:`hyperspherical_energy`; SPHERE's measure)."""

    drift: float
    sigma_max: float
    cond: float
    delta_sigma_max: float
    norm: float = float("nan")
    hyperspherical_energy: float = float("nan")

    @classmethod
    def of(cls, w: torch.Tensor, w0: torch.Tensor, transposed: bool = False) -> WeightHealth:
        """From the parameter now and before the schedule (computed in float64); ``transposed``: the
        parameter is stored [d_in, d_out] (GPT-2's ``Conv1D``), so its neurons are its columns."""
        d = w.double() - w0.double()
        s = torch.linalg.svdvals(w.double())
        return cls(
            drift=float(d.norm()),
            sigma_max=float(s[0]),
            cond=float(s[0] / s[-1].clamp_min(1e-300)),
            delta_sigma_max=float(torch.linalg.matrix_norm(d, ord=2)),
            norm=float(s.square().sum().sqrt()),
            hyperspherical_energy=hyperspherical_energy(w.T if transposed else w),
        )


def hyperspherical_energy(w: torch.Tensor) -> float:
    """The mean inverse distance between W's neurons on the unit sphere, 1/(N(N−1)) Σ_{i≠j} 1/‖ŵ_i − ŵ_j‖
    (Liu et al. 2018's energy with s = 1, averaged over pairs; rows of W [d_out, d_in] in ``nn.Linear``
    orientation, each scaled to unit norm). Uniformly spread neurons give a low energy; neurons that
    crowd into a few directions (what SPHERE, arXiv 2510.01172, ties to collapse) a high one. Computed
    from the Gram matrix: ‖ŵ_i − ŵ_j‖² = 2 − 2 ŵ_iᵀŵ_j."""
    a = w.double()
    a = a / a.norm(dim=1, keepdim=True).clamp_min(1e-12)
    n = a.shape[0]
    dist2 = (2 - 2 * (a @ a.T)).clamp_min(1e-12)
    inv = dist2.rsqrt()
    inv.fill_diagonal_(0)
    return float(inv.sum() / (n * (n - 1)))


@dataclass
class BatchEvent:
    """What the callback sees after batch ``index`` has been applied.

    Attributes:
        index: 0-based batch number; ``requests``: this batch's requests;
        applied: requests whose edits are in the model now (B for ``batch`` mode, all so far otherwise);
        result: the compute step's output; ``update_norms``: module -> ‖ΔW‖_F of this batch;
        drift: module -> ‖W − W₀‖_F now (every batch; cheap);
        health: module -> :class:`WeightHealth` every ``health_every`` batches and at the last, else None.
    """

    index: int
    requests: list[EditRequest]
    applied: int
    result: EditResult
    update_norms: dict[str, float]
    drift: dict[str, float] = field(default_factory=dict)
    health: dict[str, WeightHealth] | None = None


@dataclass
class ScheduleResult:
    """``original``: exact copies of every weight the schedule touched (for :meth:`restore`);
    ``results``: each batch's :class:`EditResult` (deltas dropped unless ``keep_deltas``);
    ``stopped``: the reason a callback gave with :class:`StopSchedule`, else None; ``applied``: the
    requests whose edits are in the model at the end (before any restore)."""

    original: dict[str, torch.Tensor] = field(default_factory=dict)
    results: list[EditResult] = field(default_factory=list)
    stopped: str | None = None
    applied: int = 0

    def restore(self, model: nn.Module) -> None:
        """Put every touched weight back to its value before the schedule (bit-identical)."""
        restore(model, self.original)


def batches(n: int, batch_size: int) -> list[range]:
    return [range(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]


def check_schedule(n_requests: int, batch_size: int, mode: str) -> int:
    """Validate (mode, batch size) against the number of requests; returns the effective batch size."""
    if mode not in MODES:
        raise ValueError(f"mode: unknown schedule {mode!r}; choose one of {list(MODES)}")
    if mode == "sequential":
        if batch_size not in (1, None):
            raise ValueError(f"batch_size: the 'sequential' schedule edits one request at a time, got {batch_size}")
        batch_size = 1
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: must be an integer >= 1, got {batch_size!r}")
    if batch_size > n_requests:
        raise ValueError(f"batch_size: {batch_size} is larger than the number of requests ({n_requests})")
    return batch_size


def run_schedule(
    model: nn.Module,
    tok: Any,
    requests: Sequence[EditRequest | Mapping[str, Any]],
    algorithm: str,
    hparams: Any,
    stats: Mapping[int, Any] | None,
    *,
    batch_size: int,
    mode: Mode = "batch",
    callback: Callable[[BatchEvent], None] | None = None,
    spec: ModelSpec | None = None,
    templates: TemplateGroups | None = None,
    values: Callable[[int, list[EditRequest]], torch.Tensor | None] | None = None,
    keep_deltas: bool = False,
    restore_at_end: bool | None = None,
    health_every: int = 0,
    state: EditState | None = None,
) -> ScheduleResult:
    """Edit ``requests`` in batches of ``batch_size`` under ``mode``.

    Args:
        algorithm: "rome", "memit", "emmet" or "alphaedit".
        values: optional provider ``(batch_index, batch_requests) -> v* [B, d_model] or None`` of
            precomputed target values (only consulted in ``batch`` mode, where values do not depend on
            earlier batches).
        restore_at_end: put the original weights back when done (default: True for ``batch``, which
            always ends unedited, False otherwise so the caller can score the final model; call
            ``result.restore(model)`` later).
        health_every: compute every edited matrix's :class:`WeightHealth` every this many batches
            and after the last (0: never; an SVD per matrix).
        state: what the sequence carries from batch to batch (:class:`EditState`), advanced in place:
            pass the state a stopped sequence left (``EditState.from_state_dict``) with the model it
            left to continue it. Default: a fresh one. ``batch`` mode keeps only its projectors.
    """
    alg = ALGORITHMS.get(str(algorithm).lower())
    if alg is None:
        raise ValueError(f"algorithm: unknown algorithm {algorithm!r}; choose one of {sorted(ALGORITHMS)}")
    reqs = [as_request(r) for r in requests]
    batch_size = check_schedule(len(reqs), batch_size, mode)
    spec = spec or spec_for(model)
    for layer in hparams.layers:
        spec.check_layer(layer, "layers")
    if (check := getattr(alg, "check_model", None)) is not None:  # settings the model's layout must allow
        check(model, spec, hparams)
    validate_requests(tok, reqs)
    if templates is None:  # once, on the unedited model, for every batch
        templates = TemplateCache().get(model, tok, hparams.context_templates, hparams.template_seed)
    out = ScheduleResult()
    state = state if state is not None else EditState()
    applied = 0
    plan = batches(len(reqs), batch_size)
    try:
        for b, idx in enumerate(plan):
            chunk = [reqs[i] for i in idx]
            if mode == "batch":
                state = EditState(projectors=state.projectors)  # projectors depend on C only
            pre = values(b, chunk) if (values is not None and mode == "batch") else None
            result = alg.compute_deltas(
                model, tok, chunk, hparams, stats, spec=spec, templates=templates, state=state, values=pre
            )
            backup = apply_deltas(model, spec, result.deltas)
            for name, w0 in backup.items():
                out.original.setdefault(name, w0)
            applied = len(chunk) if mode == "batch" else applied + len(chunk)
            if mode != "batch":
                alg.update_state(model, tok, chunk, result, hparams, state, spec, templates)
            norms = {n: float(d.double().norm()) for n, d in result.deltas.items()}
            unrestrained = _restrain(model, spec, out.original, hparams.prune_base)
            event = BatchEvent(b, chunk, applied, result, norms, _drift(model, out.original))
            if health_every and ((b + 1) % health_every == 0 or b == len(plan) - 1):
                tr = spec.weight_transposed
                event.health = {
                    n: WeightHealth.of(get_module(model, n).weight, w0, tr) for n, w0 in out.original.items()
                }
            try:
                if callback is not None:
                    callback(event)
            except StopSchedule as stop:
                out.stopped = str(stop) or "stopped by the callback"
            if not keep_deltas:
                result.deltas = {}
            out.results.append(result)
            out.applied = applied
            if mode == "batch":
                restore(model, backup)
                out.applied = 0
            elif unrestrained and b < len(plan) - 1 and out.stopped is None:
                restore(model, unrestrained)  # PRUNE: edit on from the unrestrained weights
            log.info("batch %d: %d requests, %d edits in the model", b, len(chunk), applied)
            if out.stopped is not None:
                log.warning("schedule stopped after batch %d (%d edits): %s", b, applied, out.stopped)
                break
    except BaseException:
        out.restore(model)
        raise
    if restore_at_end if restore_at_end is not None else mode == "batch":
        out.restore(model)
    return out


def _drift(model: nn.Module, original: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """module -> ‖W − W₀‖_F of every weight the schedule has touched."""
    return {n: float((get_module(model, n).weight.double() - w0.double()).norm()) for n, w0 in original.items()}


def _restrain(
    model: nn.Module, spec: ModelSpec, original: Mapping[str, torch.Tensor], base: float | None
) -> dict[str, torch.Tensor]:
    """With PRUNE's log base ``base``: W ← W₀ + PRUNE(W − W₀) for every touched weight; returns the
    unrestrained weights (for :func:`restore`), or nothing when ``base`` is None."""
    if base is None:
        return {}
    backup: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, w0 in original.items():
            w = get_module(model, name).weight
            backup[name] = w.detach().clone()
            w.copy_((w0.double() + prune.restrain(w.double() - w0.double(), w0, base)).to(w.dtype))
    return backup
