"""ROME: Rank-One Model Editing (Meng et al., NeurIPS 2022, arXiv 2202.05262).

One fact at a time: Δ = (v* − W k) (C⁻¹k*)ᵀ / (kᵀ C⁻¹ k*) (paper Eq. 2; 2405.00664 Eq. 3), with
k* the key averaged over 21 context templates, v* optimised at the MLP output (docs/ALGORITHMS.md §1).

The reference code (``rome/compute_v.py``) uses the bare-prompt key k and output W k in the residual
and denominator but k* in C⁻¹k*; r-ROME (Gupta et al. 2024, arXiv 2403.07175) shows this mismatch makes
sequential editing collapse and uses the template averages everywhere. ``consistent_keys`` chooses:
False = the reference, True = r-ROME. Several requests are edited one after another, each on the
weights the previous ones produced (``apply_rome_to_model``), and the summed delta is returned.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..common import AlgorithmTraits, EditResult, EditState, prepare, preserved, timed
from ..hparams import ROMEHParams
from ..model import ModelSpec, model_device, weight
from ..requests import EditRequest
from ..solvers import rome_delta
from ..targets import optimize_values, reprs_at_subject
from ..templates import TemplateGroups, flat

TRAITS = AlgorithmTraits("rome", value_site="rewrite", sequential_within_batch=True, stats_switch="mom2_adjustment")


def compute_deltas(
    model: nn.Module,
    tok: Any,
    requests: Sequence[EditRequest | Mapping[str, Any]],
    hparams: ROMEHParams,
    stats: Mapping[int, Any] | None,
    *,
    spec: ModelSpec | None = None,
    templates: TemplateGroups | None = None,
    state: EditState | None = None,
    values: torch.Tensor | None = None,
) -> EditResult:
    """ROME's delta for ``requests`` (applied one after another); the model is left bit-identical.

    Args:
        stats: layer -> C; may be None when ``mom2_adjustment`` is false (C = I).
        values: precomputed v* [n, d_model] at the MLP output (valid for the first request only when
            n > 1, since later ones see earlier edits; pass it for single edits).
    """
    spec, reqs, covs, templates = prepare(
        model, tok, requests, hparams, stats, spec, templates, need_stats=hparams.mom2_adjustment
    )
    device = model_device(model)
    (layer,) = hparams.layers
    name = spec.rewrite_name(layer)
    tpl = flat(templates)
    cov = covs.get(layer)
    info: dict[str, Any] = {"solver": {layer: []}, "value_loss": [], "value_steps": []}
    total = torch.zeros(spec.d_model, spec.d_key, dtype=torch.float64, device=device)
    all_values, all_keys = [], []
    with preserved(model, [name]):
        for i, r in enumerate(reqs):
            with timed(info, "time_keys", device):
                reps = reprs_at_subject(model, tok, [r], tpl, [(name, "in"), (name, "out")])
                k_all, out_all = reps[(name, "in")][0].double(), reps[(name, "out")][0].double()
                k_star = k_all.mean(0)  # the template-averaged key (one group: a plain mean)
            if values is not None and i == 0 and len(reqs) == 1:
                v_star = values[0].to(device=device, dtype=torch.float64)
            else:
                with timed(info, "time_values", device):
                    v = optimize_values(model, tok, spec, layer, [r], tpl, hparams, at="rewrite")
                v_star = v.values[0].double()
                info["value_loss"] += v.loss.tolist()
                info["value_steps"] += v.steps.tolist()
            solver_info: dict[str, Any] = {}
            with timed(info, "time_solve", device):
                if hparams.consistent_keys:  # r-ROME: k* and its mean output W k* (+ b) everywhere
                    delta = rome_delta(k_star, v_star - out_all.mean(0), cov, info=solver_info)
                else:  # reference: bare-prompt k and W k, with C⁻¹k* on the left
                    delta = rome_delta(k_all[0], v_star - out_all[0], cov, left_key=k_star, info=solver_info)
            info["solver"][layer].append(solver_info)
            total += delta
            all_values.append(v_star.float())
            all_keys.append(k_star.float())
            if i < len(reqs) - 1:  # the next request is edited on top of this one
                with torch.no_grad():
                    w = weight(model, spec, layer)
                    w.add_(delta.to(w.dtype))
    return EditResult(
        deltas={name: total.float()},
        keys={layer: torch.stack(all_keys, 1)},
        values=torch.stack(all_values),
        info=info,
    )


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
    """ROME keeps no state across batches."""
    state.batches += 1
