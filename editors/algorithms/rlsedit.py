"""RLSEdit: recursive least squares for lifelong editing (Wang et al., IJCAI-ECAI 2026, arXiv 2601.15686,
"Beyond Hard Writes and Rigid Preservation: Soft Recursive Least-Squares for Lifelong LLM Editing";
``Euphoria040201/RLSEdit`` @ 6688b89, ``RLSEdit/RLSEdit_main.py``).

Every edited layer keeps P_t = (M_0 + Σ_{s≤t} K_s K_sᵀ)⁻¹, M_0 = λ²I + μ²·w·C, updated batch by batch by
Woodbury (:func:`editors.solvers.rls_step`), and each batch moves the weight by the block-RLS gain:
ΔW = R Kᵀ P_t. After T batches the weight is the ridge solution over every edit so far with the
preservation term tr((W − W₀) M_0 (W − W₀)ᵀ), at a cost per batch that does not grow with the history
(the d_key² inverse is the whole memory). Keys, target values and the layer loop are MEMIT's.

Where this differs from the authors' code (docs/ALGORITHMS.md): P_t and the solve are float64 (theirs
float32, never re-symmetrised); P_t is carried from batch to batch (``rls_memory``; the authors' driver
does not pass it back, so their runs restart every batch from P_0: ``rls_memory: false``). The
residual follows the authors (``rls_target: delta``) unless ``rls_target: absolute`` asks for MEMIT's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..common import AlgorithmTraits, EditResult, EditState, prepare
from ..hparams import RLSEditHParams
from ..model import ModelSpec, weight
from ..requests import EditRequest
from ..solvers import rls_initial_inverse, rls_inverse_update, rls_step
from ..templates import TemplateGroups
from .layered import layered_update

TRAITS = AlgorithmTraits("rlsedit", state_matrices=1)


def compute_deltas(
    model: nn.Module,
    tok: Any,
    requests: Sequence[EditRequest | Mapping[str, Any]],
    hparams: RLSEditHParams,
    stats: Mapping[int, Any],
    *,
    spec: ModelSpec | None = None,
    templates: TemplateGroups | None = None,
    state: EditState | None = None,
    values: torch.Tensor | None = None,
) -> EditResult:
    """RLSEdit's deltas; the model is left bit-identical and the state's P_t as it was
    (``update_state`` advances it).

    Args:
        stats: layer -> C [d_key, d_key] (for M_0).
        state: carries P_t across batches (``state.rls_inverse``; P_0 is put there on first use, as
            AlphaEdit's projector).
        values: precomputed v* [n, d_model] at block ``layers[-1]``.
    """
    spec, reqs, covs, templates = prepare(model, tok, requests, hparams, stats, spec, templates)
    state = state if state is not None else EditState()
    for layer, c in covs.items():
        if layer not in state.rls_inverse:
            hp = hparams
            state.rls_inverse[layer] = rls_initial_inverse(c, hp.mom2_update_weight, hp.lambda_reg, hp.mu_reg)
    remaining = {layer: len(hparams.layers) - i for i, layer in enumerate(hparams.layers)}

    def solve(layer: int, keys: torch.Tensor, resid: torch.Tensor, info: dict[str, Any]) -> torch.Tensor:
        if hparams.rls_target == "delta":  # the authors' residual: (z* − h − W k) / (L − i)
            resid = resid - (weight(model, spec, layer).double() @ keys) / remaining[layer]
        delta, _ = rls_step(state.rls_inverse[layer].to(keys), keys, resid, info=info)
        return delta

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
    """After a batch is applied: P_t ← (P_{t-1}⁻¹ + K Kᵀ)⁻¹ with the keys of each layer's solve (the
    Woodbury update the solve took for its gain; nothing is kept without ``rls_memory``)."""
    if hparams.rls_memory:
        for layer, keys in result.keys.items():
            prev = state.rls_inverse[layer]
            state.rls_inverse[layer] = rls_inverse_update(prev, keys.to(prev.device, torch.float64))
    state.batches += 1
