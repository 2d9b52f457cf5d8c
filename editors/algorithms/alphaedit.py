"""AlphaEdit: null-space constrained knowledge editing (Fang et al., ICLR 2025, arXiv 2410.02355).

Δ = R Kᵀ P (K_pK_pᵀ P + K Kᵀ P + αI)⁻¹ (paper Eq. 14), where P projects onto the null space of the
preserved keys' second moment C, so (W + Δ) K0 = W K0: preserved knowledge is untouched. K_p holds the
keys of earlier batches, recomputed on the edited model after each batch (``AlphaEdit_main.py``).
Keys, values and residual spreading are MEMIT's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..common import AlgorithmTraits, EditResult, EditState, prepare
from ..hparams import AlphaEditHParams
from ..model import ModelSpec
from ..requests import EditRequest
from ..solvers import alphaedit_delta, null_space_projector
from ..templates import TemplateGroups
from .layered import keys_after_edit, layered_update

TRAITS = AlgorithmTraits("alphaedit", state_matrices=1)


def compute_deltas(
    model: nn.Module,
    tok: Any,
    requests: Sequence[EditRequest | Mapping[str, Any]],
    hparams: AlphaEditHParams,
    stats: Mapping[int, Any],
    *,
    spec: ModelSpec | None = None,
    templates: TemplateGroups | None = None,
    state: EditState | None = None,
    values: torch.Tensor | None = None,
) -> EditResult:
    """AlphaEdit's deltas; the model is left bit-identical. The projector of each layer is computed
    once from ``stats`` and kept in ``state.projectors`` (pass the same state to reuse it)."""
    spec, reqs, covs, templates = prepare(model, tok, requests, hparams, stats, spec, templates)
    state = state if state is not None else EditState()
    for layer, c in covs.items():
        if layer not in state.projectors:
            state.projectors[layer] = null_space_projector(c, hparams.nullspace_threshold)

    def solve(layer: int, keys: torch.Tensor, resid: torch.Tensor, info: dict[str, Any]) -> torch.Tensor:
        prev = state.prev_keys.get(layer)
        p = state.projectors[layer].to(keys)
        info["null_space_dim"] = int(torch.trace(p).round())
        return alphaedit_delta(keys, resid, p, None if prev is None else prev.to(keys), hparams.L2, info=info)

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
    """After a batch is applied: K_p += this batch's keys recomputed on the edited model."""
    for layer, keys in keys_after_edit(model, tok, spec, hparams.layers, requests, templates).items():
        state.add_keys(layer, keys)
    state.batches += 1
