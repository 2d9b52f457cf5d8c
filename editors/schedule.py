"""Edit schedules (2405.00664 §3; docs/ALGORITHMS.md §4).

- ``batch``: every batch is edited on the unedited weights, which are restored after each batch.
- ``sequential-batch``: batches accumulate; each is computed on the weights the earlier ones produced.
- ``sequential``: sequential-batch with one request per batch.

After each batch is applied, ``callback(event)`` runs on the edited model, so a caller can score that
batch's facts right after their edit (the reference's protocol) and log curves.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from .common import EditResult, EditState, apply_deltas, restore
from .model import ModelSpec, spec_for
from .requests import EditRequest, as_request, validate_requests
from .templates import TemplateCache, TemplateGroups

log = logging.getLogger(__name__)

Mode = Literal["batch", "sequential-batch", "sequential"]
MODES = ("batch", "sequential-batch", "sequential")


@dataclass
class BatchEvent:
    """What the callback sees after batch ``index`` has been applied.

    Attributes:
        index: 0-based batch number; ``requests``: this batch's requests;
        applied: requests whose edits are in the model now (B for ``batch`` mode, all so far otherwise);
        result: the compute step's output; ``update_norms``: module -> ‖ΔW‖_F of this batch.
    """

    index: int
    requests: list[EditRequest]
    applied: int
    result: EditResult
    update_norms: dict[str, float]


@dataclass
class ScheduleResult:
    """``original``: exact copies of every weight the schedule touched (for :meth:`restore`);
    ``results``: each batch's :class:`EditResult` (deltas dropped unless ``keep_deltas``)."""

    original: dict[str, torch.Tensor] = field(default_factory=dict)
    results: list[EditResult] = field(default_factory=list)

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
    """
    from . import ALGORITHMS

    alg = ALGORITHMS.get(str(algorithm).lower())
    if alg is None:
        raise ValueError(f"algorithm: unknown algorithm {algorithm!r}; choose one of {sorted(ALGORITHMS)}")
    reqs = [as_request(r) for r in requests]
    batch_size = check_schedule(len(reqs), batch_size, mode)
    spec = spec or spec_for(model)
    for layer in hparams.layers:
        spec.check_layer(layer, "layers")
    validate_requests(tok, reqs)
    if templates is None:  # once, on the unedited model, for every batch
        templates = TemplateCache().get(model, tok, hparams.context_templates, hparams.template_seed)
    out = ScheduleResult()
    state = EditState()
    applied = 0
    try:
        for b, idx in enumerate(batches(len(reqs), batch_size)):
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
            if callback is not None:
                callback(BatchEvent(b, chunk, applied, result, norms))
            if not keep_deltas:
                result.deltas = {}
            out.results.append(result)
            if mode == "batch":
                restore(model, backup)
            log.info("batch %d: %d requests, %d edits in the model", b, len(chunk), applied)
    except BaseException:
        out.restore(model)
        raise
    if restore_at_end if restore_at_end is not None else mode == "batch":
        out.restore(model)
    return out
