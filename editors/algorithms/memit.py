"""MEMIT: Mass-Editing Memory in a Transformer (Meng et al., ICLR 2023, arXiv 2210.07229).

Δ_l = R_l K_lᵀ (λC_l + K_l K_lᵀ)⁻¹ (paper Eq. 14; 2405.00664 Eq. 5) at each edited layer, the
residual spread evenly over the remaining layers (docs/ALGORITHMS.md §2). With ENCORE's
``add_prev_edits`` the keys of earlier batches join the preservation term (λC + K_pK_pᵀ + KKᵀ).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..common import AlgorithmTraits, EditResult, EditState, prepare
from ..hparams import MEMITHParams
from ..model import ModelSpec
from ..requests import EditRequest
from ..solvers import memit_delta
from ..templates import TemplateGroups
from .layered import layered_update

TRAITS = AlgorithmTraits("memit")


def compute_deltas(
    model: nn.Module,
    tok: Any,
    requests: Sequence[EditRequest | Mapping[str, Any]],
    hparams: MEMITHParams,
    stats: Mapping[int, Any],
    *,
    spec: ModelSpec | None = None,
    templates: TemplateGroups | None = None,
    state: EditState | None = None,
    values: torch.Tensor | None = None,
) -> EditResult:
    """MEMIT's deltas for ``requests``; the model is left bit-identical.

    Args:
        stats: layer -> C [d_key, d_key] (or a :class:`editors.stats.SecondMoment`).
        state: carried across batches (only used with ``add_prev_edits``).
        values: precomputed v* [n, d_model] at block ``layers[-1]`` (shared across trials).
    """
    spec, reqs, covs, templates = prepare(model, tok, requests, hparams, stats, spec, templates)
    state = state or EditState()

    def solve(layer: int, keys: torch.Tensor, resid: torch.Tensor, info: dict[str, Any]) -> torch.Tensor:
        prev = state.prev_keys.get(layer) if hparams.add_prev_edits else None
        return memit_delta(
            keys,
            resid,
            covs[layer],
            hparams.mom2_update_weight,
            prev_keys=None if prev is None else prev.to(keys),
            norm_lambda=hparams.update_norm_lambda,
            info=info,
        )

    return layered_update(model, tok, spec, reqs, hparams, templates, solve, values, state)


def update_state(
    model: nn.Module,
    tok: Any,
    requests: Sequence[EditRequest],
    result: EditResult,
    hparams: Any,
    state: EditState,
    spec: ModelSpec,
    templates: TemplateGroups,
) -> None:
    """After a batch is applied in a sequential schedule: remember its keys (ENCORE keeps the keys used
    in the solve, i.e. computed before that layer's update)."""
    for layer, keys in result.keys.items():
        state.add_keys(layer, keys)
    state.batches += 1
