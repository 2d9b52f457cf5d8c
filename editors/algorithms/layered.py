"""The MEMIT-style layer loop shared by MEMIT, EMMET, AlphaEdit and ENCORE (docs/ALGORITHMS.md §2
step 3), with the hooks of the lifelong-editing settings that act inside it (NAS, RECT)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..common import EditResult, EditState, preserved, timed
from ..model import ModelSpec, model_device, weight
from ..requests import EditRequest
from ..targets import compute_keys, optimize_values, reprs_at_subject
from ..templates import TemplateGroups, flat
from . import nas, rect, sphere

Solve = Callable[[int, torch.Tensor, torch.Tensor, dict[str, Any]], torch.Tensor]


def layered_update(
    model: nn.Module,
    tok: Any,
    spec: ModelSpec,
    requests: Sequence[EditRequest],
    hp: Any,
    templates: TemplateGroups,
    solve: Solve,
    values: torch.Tensor | None = None,
    state: EditState | None = None,
) -> EditResult:
    """MEMIT's update loop (memit_main.execute_memit), with the solve step supplied by the algorithm.

    1. z_i at block L = layers[-1] (:func:`optimize_values`, ``at="block"``) unless ``values`` given.
    2. For each layer l ascending: K_l = template-averaged keys on the current, partly edited model;
       R = Z − (current block-L output at the bare prompt); residual R/(n_layers − i) goes to
       ``solve(l, K_l, resid, info) -> ΔW_l`` (float64 in, [d_out, d_in] out), which is written into the
       model at once so later layers see it.
    3. The model is restored exactly at the end; the deltas are returned.

    The lifelong-editing settings act here: with ``hp.nas`` the targets' MLP part is anchored to
    ``state.value_norm_anchor`` (set from the first batch, :mod:`.nas`) before the residuals are taken;
    with ``hp.rect_keep`` each layer's ΔW is sparsified against its weight before the batch after the
    loop (:mod:`.rect`), as the authors' code does; with ``hp.beta_hse`` each layer's ΔW is projected
    off the principal directions of its weight before it is written (:mod:`.sphere`, SPHERE).
    """
    device = model_device(model)
    info: dict[str, Any] = {"solver": {}}
    z_layer = hp.layers[-1]
    if values is None:
        with timed(info, "time_values", device):
            v = optimize_values(
                model,
                tok,
                spec,
                z_layer,
                requests,
                flat(templates),
                hp,
                at="block",
                max_requests=hp.value_batch,
            )
        values, info["value_loss"], info["value_steps"] = v.values, v.loss.tolist(), v.steps.tolist()
    elif tuple(values.shape) != (len(requests), spec.d_model):
        raise ValueError(f"values: expected shape {(len(requests), spec.d_model)}, got {tuple(values.shape)}")
    zs = values.to(device=device, dtype=torch.float64)
    deltas: dict[str, torch.Tensor] = {}
    keys_used: dict[int, torch.Tensor] = {}
    names = [spec.rewrite_name(layer) for layer in hp.layers]
    with preserved(model, names):
        for i, layer in enumerate(hp.layers):
            with timed(info, "time_keys", device):
                # One forward gives the keys at l (every template) and block L's output at the bare
                # prompt (template "{}" comes first, and causality makes later tokens irrelevant).
                rw, blk = spec.rewrite_name(layer), spec.block_name(z_layer)
                capture = [(rw, "in"), (blk, "out")]
                if hp.nas and i == 0:  # v₀: the last edited layer's MLP output, before this batch
                    capture.append((spec.rewrite_name(z_layer), "out"))
                reps = reprs_at_subject(model, tok, requests, flat(templates), capture)
                sizes = [len(g) for g in templates]
                keys = torch.stack([g.mean(1) for g in torch.split(reps[(rw, "in")], sizes, 1)]).mean(0).T
                cur_z = reps[(blk, "out")][:, 0]
            if hp.nas and i == 0:
                zs = _anchor_targets(
                    zs, cur_z.double(), reps[(spec.rewrite_name(z_layer), "out")][:, 0].double(), state, info
                )
            resid = (zs - cur_z.double()).T / (len(hp.layers) - i)  # [d_model, n]
            layer_info: dict[str, Any] = {}
            with timed(info, "time_solve", device):
                delta = solve(layer, keys.double(), resid, layer_info)
                if hp.beta_hse:  # SPHERE: off the principal directions of W as it is now
                    delta = sphere.project(delta, weight(model, spec, layer), hp.beta_hse, hp.sphere_alpha)
            info["solver"][layer] = layer_info
            deltas[rw] = delta.float()
            keys_used[layer] = keys.float().contiguous()
            if i < len(hp.layers) - 1:  # later layers see this layer's update
                with torch.no_grad():
                    w = weight(model, spec, layer)
                    w.add_(delta.to(w.dtype))
    if hp.rect_keep is not None:
        deltas = {
            spec.rewrite_name(layer): rect.sparsify(
                deltas[spec.rewrite_name(layer)], weight(model, spec, layer), hp.rect_keep
            )
            for layer in hp.layers
        }
        info["rect_keep"] = hp.rect_keep
    return EditResult(deltas=deltas, keys=keys_used, values=values, info=info)


def _anchor_targets(
    zs: torch.Tensor, h: torch.Tensor, v0: torch.Tensor, state: EditState | None, info: dict[str, Any]
) -> torch.Tensor:
    """NAS on the batch's targets zs [n, d] (float64); the anchor is the state's, or this batch's own
    when the state has none yet (the first batch: the unedited model), then kept in the state."""
    norms = (v0 + zs - h).norm(dim=1)  # ‖v*‖ per request
    anchor = state.value_norm_anchor if state is not None else None
    if anchor is None:
        anchor = nas.anchor_of(norms)
        if state is not None:
            state.value_norm_anchor = anchor
    info["nas_anchor"] = anchor
    info["nas_skipped"] = int((norms > nas.SKIP_FACTOR * anchor).sum())
    return nas.anchored(zs, h, v0, anchor)


def keys_after_edit(
    model: nn.Module,
    tok: Any,
    spec: ModelSpec,
    layers: Sequence[int],
    requests: Sequence[EditRequest],
    templates: TemplateGroups,
) -> dict[int, torch.Tensor]:
    """Keys of ``requests`` recomputed on the (edited) model: AlphaEdit's cache update."""
    return {layer: compute_keys(model, tok, spec, layer, requests, templates) for layer in layers}
