"""UltraEdit: training-, subject- and memory-free lifelong editing (Gu et al., arXiv 2505.14679;
``XiaojieGu/UltraEdit`` @ 0beb222, ``editor/ultraedit.py``, ``nets.py``, ``util.py``).

No target values, no Wikipedia statistics, no earlier keys. For each edited projection (by default the
MLP's output projection of every layer in ``layers``; ``ultra_modules`` names another per layer, as the
authors' ``edit_modules``: :func:`module_names`) and each batch ("turn"):

1. Teacher-force prompt + " " + answer (the last answer token not fed); the loss is the mean
   cross-entropy over the answer tokens of each sub-batch of ``ultra_sub_batch`` requests, cut after
   the batch is sorted by the number of tokens fed, longest first (the authors' ``collate_fn``). At the
   positions whose next token is an answer token, capture the projection's input k (the key) and the
   gradient g of the loss with respect to its output.
2. After each sub-batch, every module updates the lifelong running statistics of the rows [k, g]
   (one normaliser per module shape, shared by modules of the same shape, as the authors'
   ``lifelong_normalizer``; :class:`editors.common.RunningStats`, kept in the state across batches).
3. Normalise, k̂ and ĝ, and set each row's target change V_i = −lr·‖k̂_i‖²·ĝ_i (a normalised gradient
   step, weighted by how unusual the key is).
4. Solve ΔWᵀ = (KᵀK + I)⁻¹ KᵀV with the raw keys K (:func:`editors.solvers.ultraedit_delta`).

Every module's ΔW comes from the same forward/backward on the model before the batch and all are
applied together. Where this differs from the authors' code (docs/ALGORITHMS.md): the solve is float64 in
its N×N dual form (theirs: float32, d_in×d_in); the model runs in its own dtype (theirs: bf16, and the
update is cast to bf16 before it is added).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..common import AlgorithmTraits, EditResult, EditState, RunningStats, prepare, timed
from ..hparams import UltraEditHParams
from ..model import ModelSpec, ModelSpecError, get_module, hooks, model_device, no_weight_grads
from ..requests import EditRequest, encode, fill, pad_id, pad_right, target_ids
from ..solvers import ultraedit_delta
from ..templates import TemplateGroups

TRAITS = AlgorithmTraits("ultraedit", uses_values=False, uses_stats=False)


def teacher_forced_rows(tok: Any, requests: Sequence[EditRequest]) -> tuple[list[list[int]], list[list[int]]]:
    """Per request: the ids fed (prompt + answer[:-1]) and the positions whose next token is an answer
    token (the authors' ``labels != -100``: the prompt's last token and every answer token but the last)."""
    seqs, positions = [], []
    for r in requests:
        prompt, _ = fill(r.template, r.subject)
        p_ids, _ = encode(tok, prompt)
        a_ids = target_ids(tok, r.target_new)
        seqs.append(p_ids + a_ids[:-1])
        positions.append(list(range(len(p_ids) - 1, len(p_ids) + len(a_ids) - 1)))
    return seqs, positions


def capture(
    model: nn.Module, tok: Any, names: Sequence[str], requests: Sequence[EditRequest], device: torch.device
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One forward/backward of ``requests``: module -> keys [N, d_in] and output gradients [N, d_out]
    (float32) at the answer positions, N the number of answer tokens; the loss is their mean
    cross-entropy. No weight is changed and no ``.grad`` is written."""
    seqs, positions = teacher_forced_rows(tok, requests)
    ids, mask = pad_right(seqs, pad_id(tok), device)
    rows = torch.tensor([i for i, pos in enumerate(positions) for _ in pos], device=device)
    cols = torch.tensor([p for pos in positions for p in pos], device=device)
    labels = ids.new_tensor([t for r in requests for t in target_ids(tok, r.target_new)])
    with hooks(model, inputs=names, outputs=names) as st, no_weight_grads(model), torch.enable_grad():
        for name in names:  # gradients must reach every edited module's output (the authors' setting)
            get_module(model, name).weight.requires_grad_(True)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits[rows, cols].float(), labels)
        grads = torch.autograd.grad(loss, [st[f"out:{n}"] for n in names])
    keys = {n: st[f"in:{n}"][rows, cols].detach().float() for n in names}
    return keys, {n: g[rows, cols].detach().float() for n, g in zip(names, grads, strict=True)}


def module_names(model: nn.Module, spec: ModelSpec, hparams: UltraEditHParams) -> list[str]:
    """The edited module of each layer of ``hparams.layers``, in order: ``ultra_modules`` (one for all,
    or one per layer) inside each block, else the MLP output projection. A module that does not exist
    or has no 2-D weight is a ValueError naming ``ultra_modules``, before any forward."""
    mods = hparams.ultra_modules
    if not mods:
        names = [spec.rewrite_name(layer) for layer in hparams.layers]
    else:
        per_layer = mods * len(hparams.layers) if len(mods) == 1 else mods
        names = [f"{spec.block_name(layer)}.{m}" for layer, m in zip(hparams.layers, per_layer, strict=True)]
    for name in names:
        try:
            w = get_module(model, name).weight
        except (ModelSpecError, AttributeError):
            raise ValueError(f"ultra_modules: {name} is not a module with a weight in this model") from None
        if w.ndim != 2:
            raise ValueError(f"ultra_modules: {name} has a {w.ndim}-D weight; UltraEdit edits 2-D projections")
    return names


def check_model(model: nn.Module, spec: ModelSpec, hparams: UltraEditHParams) -> None:
    """Called by :func:`editors.schedule.run_schedule` before the first batch: every module of
    ``ultra_modules`` exists with a 2-D weight (else one ValueError naming the field)."""
    module_names(model, spec, hparams)


def compute_deltas(
    model: nn.Module,
    tok: Any,
    requests: Sequence[EditRequest | Mapping[str, Any]],
    hparams: UltraEditHParams,
    stats: Mapping[int, Any] | None = None,
    *,
    spec: ModelSpec | None = None,
    templates: TemplateGroups | None = None,
    state: EditState | None = None,
    values: torch.Tensor | None = None,
) -> EditResult:
    """UltraEdit's deltas; the model is left bit-identical. The running statistics in ``state.running``
    take in this batch's rows when the batch's deltas are done (before that they are updated on a copy,
    so a batch that fails leaves the state as it was); pass the same state from batch to batch: it is
    the method's memory. ``stats`` and ``values`` are not used (UltraEdit needs neither)."""
    spec, reqs, _, templates = prepare(model, tok, requests, hparams, None, spec, templates, need_stats=False)
    state = state if state is not None else EditState()
    device = model_device(model)
    names = module_names(model, spec, hparams)
    shapes = {}  # module -> (d_in, d_out): modules of one shape share one normaliser (the authors')
    for name in names:
        w = get_module(model, name).weight
        d_out, d_in = w.shape if not spec.weight_transposed else w.shape[::-1]
        shapes[name] = (int(d_in), int(d_out))
    info: dict[str, Any] = {"solver": {}}
    keys: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    grads: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    sub = hparams.ultra_sub_batch
    fed = [len(seq) for seq in teacher_forced_rows(tok, reqs)[0]]
    reqs = [reqs[i] for i in sorted(range(len(reqs)), key=lambda i: fed[i], reverse=True)]  # stable
    running = {shape: r.clone() for shape, r in state.running.items()}
    for shape in shapes.values():
        running.setdefault(shape, RunningStats.zeros(sum(shape), device))
    with timed(info, "time_keys", device):
        for s in range(0, len(reqs), sub):
            k, g = capture(model, tok, names, reqs[s : s + sub], device)
            for name in names:  # statistics updated per (sub-batch, module), before any solve
                running[shapes[name]].update(torch.cat([k[name], g[name]], dim=1))
                keys[name].append(k[name])
                grads[name].append(g[name])
    deltas: dict[str, torch.Tensor] = {}
    keys_used: dict[int, torch.Tensor] = {}
    with timed(info, "time_solve", device):
        for layer, name in zip(hparams.layers, names, strict=True):
            k, g = torch.cat(keys[name]), torch.cat(grads[name])
            d_in = shapes[name][0]
            z = running[shapes[name]].normalise(torch.cat([k, g], dim=1))
            k_hat, g_hat = z[:, :d_in], z[:, d_in:]
            v = -hparams.ultra_lr * (k_hat * k_hat).sum(-1, keepdim=True) * g_hat  # [N, d_out]
            deltas[name] = ultraedit_delta(k, v, hparams.ultra_ridge).float()
            keys_used[layer] = k.T.contiguous()
            info["solver"][layer] = {"method": "ultraedit", "tokens": int(k.shape[0])}
    state.running.update(running)
    empty = torch.zeros(len(reqs), 0)
    return EditResult(deltas=deltas, keys=keys_used, values=empty, info=info)


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
    """Nothing beyond the running statistics, which :func:`compute_deltas` updated (the authors update
    them before the solve)."""
    state.batches += 1
