"""EMMET: Equality-constrained Mass Model Editing (Gupta et al. 2024, arXiv 2403.14236).

Δ = R (Kᵀ(λC)⁻¹K + μI)⁻¹ Kᵀ(λC)⁻¹ (2405.00664 Eq. 7): every edited key's output is set exactly
(as μ → 0) while ‖ΔK0‖ stays minimal. Keys, values and residual spreading are MEMIT's
(unified-model-editing ``emmet_main.py``); μ = ``emmet_lambda`` is added only when the batch has more
than one request, so B = 1 is ROME's update with consistent keys (docs/ALGORITHMS.md §3).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..common import AlgorithmTraits, EditResult, EditState, prepare
from ..hparams import EMMETHParams
from ..model import ModelSpec
from ..requests import EditRequest
from ..solvers import emmet_delta
from ..templates import TemplateGroups
from .layered import layered_update
from .memit import update_state

TRAITS = AlgorithmTraits("emmet")


def compute_deltas(
    model: nn.Module,
    tok: Any,
    requests: Sequence[EditRequest | Mapping[str, Any]],
    hparams: EMMETHParams,
    stats: Mapping[int, Any],
    *,
    spec: ModelSpec | None = None,
    templates: TemplateGroups | None = None,
    state: EditState | None = None,
    values: torch.Tensor | None = None,
) -> EditResult:
    """EMMET's deltas for ``requests``; the model is left bit-identical (arguments as MEMIT's)."""
    spec, reqs, covs, templates = prepare(model, tok, requests, hparams, stats, spec, templates)
    state = state or EditState()

    def solve(layer: int, keys: torch.Tensor, resid: torch.Tensor, info: dict[str, Any]) -> torch.Tensor:
        prev = state.prev_keys.get(layer) if hparams.add_prev_edits else None
        mu = hparams.emmet_lambda if keys.shape[1] > 1 else 0.0
        return emmet_delta(
            keys,
            resid,
            covs[layer],
            hparams.mom2_update_weight,
            mu,
            prev_keys=None if prev is None else prev.to(keys),
            norm_lambda=hparams.update_norm_lambda,
            info=info,
        )

    return layered_update(model, tok, spec, reqs, hparams, templates, solve, values, state)


__all__ = ["compute_deltas", "update_state"]
