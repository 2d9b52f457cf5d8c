"""Keys and target values, shared by every algorithm (docs/ALGORITHMS.md §1–2).

- :func:`compute_keys`: k = input of the edited projection at the subject's last token, averaged over
  context templates (within each group, then across groups).
- :func:`optimize_values`: the target-value optimisation of ROME's ``compute_v`` / MEMIT's
  ``compute_z``: a vector δ added at the subject's last token (to the block output for MEMIT-style
  ``at="block"``, to the edited projection's output for ROME's ``at="rewrite"``) is trained with
  NLL(target) + kl_factor·KL + v_weight_decay·‖δ‖/‖v_init‖², Adam, a norm clamp and an early stop.

Unlike the reference, which optimises one request at a time, all requests of a batch are optimised
together in one padded forward/backward per step. Requests never interact (each row of the batch
belongs to one request, each δ_i reaches only its own rows, and Adam is elementwise), so the result
per request equals the one-at-a-time optimisation; requests that reached the early-stop loss leave the
batch. Model weights never require grad.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .model import ModelSpec, get_module, hooks, model_device, no_weight_grads, run_until
from .requests import EditRequest, encode_at, fill, pad_id, pad_right, target_ids
from .templates import TemplateGroups, flat

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ValueHParams:
    """The target-value optimisation's knobs (names as in the reference hparams files)."""

    v_num_grad_steps: int = 25  # at most this many loss evaluations; steps - 1 Adam updates
    v_lr: float = 0.5  # Adam learning rate
    v_loss_layer: int | None = None  # block whose output is read out through ln_f + lm_head; None = last
    v_weight_decay: float = 1e-3  # weight of ‖δ‖ / ‖v_init‖² (a norm, not squared, as in the code)
    clamp_norm_factor: float = 4.0  # ‖δ‖ ≤ clamp_norm_factor · ‖v_init‖ after every step
    kl_factor: float = 0.0625  # weight of KL on "{subject} is a" at the subject's last token
    early_stop_loss: float = 5e-2  # stop a request once its loss is below this (reference: 5e-2)
    kl_prompt: str = "{} is a"  # the "essence" prompt
    mpes_hits: int = 0  # ENCORE's most-probable early stopping: stop at the n-th check that passes (0: off)

    def __post_init__(self) -> None:
        if self.mpes_hits < 0:
            raise ValueError(f"mpes_hits: must be >= 0 (0 turns MPES off), got {self.mpes_hits}")
        if self.v_num_grad_steps < 1:
            raise ValueError("v_num_grad_steps: must be >= 1")
        if self.v_lr <= 0:
            raise ValueError("v_lr: must be > 0")
        if self.clamp_norm_factor <= 0:
            raise ValueError("clamp_norm_factor: must be > 0")
        if "{}" not in self.kl_prompt:
            raise ValueError("kl_prompt: must hold '{}' for the subject")


@dataclass
class Values:
    """Optimised target values for a batch of requests.

    Attributes:
        values: v* = v_init + δ, [n, d_model] float32 (on the model's device).
        init: v_init, the unedited output at the subject's last token of the bare prompt, [n, d_model].
        loss: each request's last evaluated loss, [n].
        steps: number of loss evaluations each request used, [n].
    """

    values: torch.Tensor
    init: torch.Tensor
    loss: torch.Tensor
    steps: torch.Tensor


# ----------------------------------------------------------------------------------------------------
# Reading representations at the subject's last token


def _rows(tok: Any, requests: Sequence[EditRequest], templates: Sequence[str]) -> tuple[list, list]:
    """Token ids and subject-last-token positions of ``template.format(prompt).format(subject)``."""
    seqs, idxs = [], []
    for r in requests:
        for t in templates:
            text, end = fill(t.replace("{}", r.template, 1), r.subject)
            ids, idx = encode_at(tok, text, end)
            seqs.append(ids)
            idxs.append(idx)
    return seqs, idxs


@torch.no_grad()
def reprs_at_subject(
    model: nn.Module,
    tok: Any,
    requests: Sequence[EditRequest],
    templates: Sequence[str],
    capture: Sequence[tuple[str, Literal["in", "out"]]],
    *,
    max_rows: int = 256,
) -> dict[tuple[str, str], torch.Tensor]:
    """Input/output of modules at the subject's last token, for every (request, template) row.

    Returns ``{(module, "in"|"out"): [n_requests, n_templates, d]}``. The forward stops as soon as
    everything is captured.
    """
    device = model_device(model)
    seqs, idxs = _rows(tok, requests, templates)
    ins = [n for n, k in capture if k == "in"]
    outs = [n for n, k in capture if k == "out"]
    parts: dict[tuple[str, str], list[torch.Tensor]] = {c: [] for c in capture}
    for s in range(0, len(seqs), max_rows):
        ids, mask = pad_right(seqs[s : s + max_rows], pad_id(tok), device)
        pos = torch.tensor(idxs[s : s + max_rows], device=device)
        rows = torch.arange(len(pos), device=device)
        with hooks(model, inputs=ins, outputs=outs, stop_when_captured=True) as st:
            run_until(model, input_ids=ids, attention_mask=mask)
        for name, kind in capture:
            parts[(name, kind)].append(st[f"{kind}:{name}"][rows, pos].float())
    n, t = len(requests), len(templates)
    return {c: torch.cat(v).reshape(n, t, -1) for c, v in parts.items()}


def compute_keys(
    model: nn.Module,
    tok: Any,
    spec: ModelSpec,
    layer: int,
    requests: Sequence[EditRequest],
    templates: TemplateGroups,
) -> torch.Tensor:
    """Template-averaged keys at ``layer``: K [d_key, n] float32 (keys as columns).

    Mean within each template group, then across groups (memit ``compute_ks``); for ROME's single
    group of 21 templates that is the plain mean (rome ``compute_u``).
    """
    name = spec.rewrite_name(layer)
    reps = reprs_at_subject(model, tok, requests, flat(templates), [(name, "in")])[(name, "in")]
    sizes = [len(g) for g in templates]
    groups = torch.split(reps, sizes, dim=1)
    keys = torch.stack([g.mean(1) for g in groups], 0).mean(0)  # [n, d_key]
    return keys.T.contiguous()


# ----------------------------------------------------------------------------------------------------
# Target-value optimisation


def optimize_values(
    model: nn.Module,
    tok: Any,
    spec: ModelSpec,
    layer: int,
    requests: Sequence[EditRequest],
    templates: Sequence[str],
    hp: ValueHParams,
    *,
    at: Literal["block", "rewrite"] = "block",
    max_requests: int = 32,
    reuse_prefix: bool = True,
) -> Values:
    """Optimise v* for every request (docs/ALGORITHMS.md §1 "Target value v*", §2 step 1).

    Args:
        layer: the layer where δ is added (MEMIT: the last edited layer; ROME: the edited layer).
        templates: flat list of context templates; the first must be ``"{}"`` (v_init is read there).
        at: ``"block"`` adds δ to the output of ``spec.block_module`` (MEMIT ``compute_z``),
            ``"rewrite"`` to the output of the edited projection, i.e. the MLP output (ROME
            ``compute_v``).
        max_requests: requests per padded forward (bounds activation memory; results do not depend
            on it).
        reuse_prefix: δ enters at the subject's last token, so every token before it has the same
            keys and values at every step: compute them once (a KV cache of each row's prefix) and run
            only the rest of each prompt per step. Same result (tested), less work.

    A request stops once its loss is below ``hp.early_stop_loss`` or, with ``hp.mpes_hits = n > 0``,
    at the n-th evaluation (not necessarily consecutive) where every target token of every rewriting
    prompt is the argmax: ENCORE's most-probable early stopping (Gu et al. 2025, arXiv 2502.01636 §4;
    ``encore/compute_z.py``, ``prob_cutoff = -n``; Llama-3-8B: n = 2). The check is on the forward of
    the current δ, before its step. ENCORE's code leaves the bare prompt ``"{}"`` out of the check (its
    comment says it meant the KL prompt); here every rewriting prompt counts, the bare one included.

    Returns:
        :class:`Values` with v* = v_init + δ for each request.
    """
    if not templates or templates[0] != "{}":
        raise ValueError("templates: the first context template must be '{}' (v_init is read there)")
    chunks = [
        _optimize_chunk(model, tok, spec, layer, requests[s : s + max_requests], templates, hp, at, reuse_prefix)
        for s in range(0, len(requests), max_requests)
    ]
    return Values(*(torch.cat([getattr(c, f) for c in chunks]) for f in ("values", "init", "loss", "steps")))


@dataclass
class _Rows:
    """One chunk's rows of the value optimisation: per request, every template with the target's tokens
    but the last appended (teacher forcing; ids concatenated, not re-tokenised from decoded text), then
    the KL prompt. With a prefix cache each row holds only its tokens from the lookup on.

    Attributes:
        ids, mask: [rows, L] (mask widened by the cache's prefix); pos: position ids [rows, L] or None;
        lookup: [rows] the subject's last token (where δ enters); tgt_row, tgt_pos, tgt_ids: [targets]
        each target token's row, the position whose logit predicts it, and its id; n_tgt: [n_req]
        target lengths; req_of_row, is_kl_row: [rows].
    """

    ids: torch.Tensor
    mask: torch.Tensor
    pos: torch.Tensor | None
    prefix: PrefixCache | None
    lookup: torch.Tensor
    tgt_row: torch.Tensor
    tgt_pos: torch.Tensor
    tgt_ids: torch.Tensor
    n_tgt: torch.Tensor
    req_of_row: torch.Tensor
    is_kl_row: torch.Tensor
    n_tpl: int

    @property
    def per_req(self) -> int:
        return self.n_tpl + 1  # rewriting prompts + the KL prompt


def _value_rows(
    model: nn.Module,
    tok: Any,
    spec: ModelSpec,
    requests: Sequence[EditRequest],
    templates: Sequence[str],
    hp: ValueHParams,
    loss_name: str,
    reuse_prefix: bool,
) -> _Rows:
    """The padded rows of ``requests`` (see :class:`_Rows`), their prefixes run once into a KV cache."""
    device = model_device(model)
    seqs, lookup, tgt_pos, tgt_ids, tgt_row, n_tgt = [], [], [], [], [], []
    for r in requests:
        t_ids = target_ids(tok, r.target_new)
        n_tgt.append(len(t_ids))
        for t in templates:
            text, end = fill(t.replace("{}", r.template, 1), r.subject)
            ids, idx = encode_at(tok, text, end)
            row = len(seqs)
            seqs.append(ids + t_ids[:-1])
            lookup.append(idx)
            for j, tid in enumerate(t_ids):
                tgt_row.append(row)
                tgt_pos.append(len(ids) - 1 + j)  # the logit at p predicts token p + 1
                tgt_ids.append(tid)
        text, end = fill(hp.kl_prompt, r.subject)
        ids, idx = encode_at(tok, text, end)
        seqs.append(ids)
        lookup.append(idx)
    prefix = prefix_cache(model, spec, seqs, lookup, pad_id(tok), loss_name) if reuse_prefix else None
    if prefix is not None:  # each row from its lookup token on; the prefix comes from the cache
        seqs = [sq[lk:] for sq, lk in zip(seqs, lookup)]
        tgt_pos = [p - lookup[r] for p, r in zip(tgt_pos, tgt_row)]
        lookup = [0] * len(seqs)
    all_ids, all_mask = pad_right(seqs, pad_id(tok), device)
    pos_all = None
    if prefix is not None:
        plen = prefix.lengths
        pos_all = plen[:, None] + torch.arange(all_ids.shape[1], device=device)[None]
        valid = torch.arange(prefix.width, device=device)[None] < plen[:, None]
        all_mask = torch.cat([valid.long(), all_mask], dim=1)
    per_req = len(templates) + 1
    is_kl_row = torch.zeros(len(seqs), dtype=torch.bool, device=device)
    is_kl_row[per_req - 1 :: per_req] = True
    return _Rows(
        ids=all_ids,
        mask=all_mask,
        pos=pos_all,
        prefix=prefix,
        lookup=torch.tensor(lookup, device=device),
        tgt_row=torch.tensor(tgt_row, device=device),
        tgt_pos=torch.tensor(tgt_pos, device=device),
        tgt_ids=torch.tensor(tgt_ids, device=device),
        n_tgt=torch.tensor(n_tgt, device=device),
        req_of_row=torch.arange(len(requests), device=device).repeat_interleave(per_req),
        is_kl_row=is_kl_row,
        n_tpl=len(templates),
    )


@dataclass
class _Unedited:
    """What δ = 0 gives, captured at the first evaluation: v_init [n_req, d_model] (the edited output
    at the bare prompt, template "{}", row 0) and log p_0 at each request's KL row [n_req, vocab]."""

    init: torch.Tensor
    captured: bool = False
    kl_logp: torch.Tensor | None = None


def _evaluate(
    model: nn.Module,
    spec: ModelSpec,
    rows: _Rows,
    active: torch.Tensor,
    delta: torch.Tensor,
    ref: _Unedited,
    hp: ValueHParams,
    edit_name: str,
    loss_name: str,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One forward of the active requests' rows with δ added at ``edit_name``: (loss [n_req], with
    grad; only active entries are meaningful) and, with MPES on, each request's count of target tokens
    that are not the argmax [n_req] (else None)."""
    device = delta.device
    n_req = len(rows.n_tgt)
    row_sel = active[rows.req_of_row].nonzero().squeeze(1)  # rows of active requests
    sub_req = rows.req_of_row[row_sel]  # request index of each selected row
    sub_lookup = rows.lookup[row_sel]
    rows_local = torch.arange(len(row_sel), device=device)

    def add_delta(out: torch.Tensor) -> torch.Tensor:
        if not ref.captured:
            first = rows_local[:: rows.per_req]
            ref.init.copy_(out[first, sub_lookup[first]].detach().float())
            ref.captured = True
        add = torch.zeros_like(out, dtype=delta.dtype)
        add = add.index_put((rows_local, sub_lookup), delta[sub_req])
        return out + add.to(out.dtype)

    ln_f, lm_head = get_module(model, spec.final_norm), get_module(model, spec.lm_head)
    with torch.enable_grad(), no_weight_grads(model):
        batch: dict[str, Any] = {"input_ids": rows.ids[row_sel], "attention_mask": rows.mask[row_sel]}
        if rows.prefix is not None:
            batch.update(position_ids=rows.pos[row_sel], use_cache=True)
            batch[cache_kwarg(model)] = rows.prefix.cache(row_sel)
        with hooks(model, outputs=[loss_name], edit_output={edit_name: add_delta}, stop_after=loss_name) as st:
            run_until(model, **batch)
        hidden = st[f"out:{loss_name}"]
        # Map global row ids to positions in the selected sub-batch.
        local_of = torch.full((len(rows.req_of_row),), -1, dtype=torch.long, device=device)
        local_of[row_sel] = rows_local
        t_sel = local_of[rows.tgt_row] >= 0
        t_rows = local_of[rows.tgt_row[t_sel]]
        kl_rows_local = rows_local[rows.is_kl_row[row_sel]]
        kl_req = sub_req[rows.is_kl_row[row_sel]]
        h = torch.cat([hidden[t_rows, rows.tgt_pos[t_sel]], hidden[kl_rows_local, sub_lookup[kl_rows_local]]])
        logp = F.log_softmax(lm_head(ln_f(h)).float(), dim=-1)
        n_t = int(t_sel.sum())
        tgt = rows.tgt_ids[t_sel]
        tok_logp = logp[:n_t].gather(1, tgt[:, None]).squeeze(1)
        # NLL per row: −Σ log p(target) / #target tokens; per request: mean over its rewrite rows.
        t_req = rows.req_of_row[rows.tgt_row[t_sel]]
        nll = torch.zeros(n_req, device=device).index_add(0, t_req, -tok_logp)
        nll = nll / rows.n_tgt / rows.n_tpl
        kl_logp = logp[n_t:]
        if ref.kl_logp is None:
            ref.kl_logp = kl_logp.detach().clone()  # δ = 0 at the first step: the unedited p_0
        # F.kl_div(init, cur, log_target=True) of the reference: Σ p_cur (log p_cur − log p_0).
        kl = torch.zeros(n_req, device=device).index_add(
            0, kl_req, (kl_logp.exp() * (kl_logp - ref.kl_logp[kl_req])).sum(1)
        )
        wd = hp.v_weight_decay * delta.norm(dim=1) / ref.init.norm(dim=1).clamp_min(1e-12) ** 2
        loss = nll + hp.kl_factor * kl + wd
    wrong = None
    if hp.mpes_hits:  # MPES: every target token of every rewriting prompt is the argmax
        with torch.no_grad():
            wrong = torch.zeros(n_req, dtype=torch.long, device=device)
            wrong.index_add_(0, t_req, (logp[:n_t].argmax(-1) != tgt).long())
    return loss, wrong


@dataclass
class _Adam:
    """torch.optim.Adam's update (its defaults, as the reference) on the active rows of δ, then the
    clamp ‖δ‖ ≤ clamp_norm_factor · ‖v_init‖."""

    m: torch.Tensor
    v: torch.Tensor
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8

    @torch.no_grad()
    def step(
        self, delta: torch.Tensor, grad: torch.Tensor, active: torch.Tensor, t: int, lr: float, max_norm: torch.Tensor
    ) -> None:
        b1, b2 = self.b1, self.b2
        self.m[active] = b1 * self.m[active] + (1 - b1) * grad[active]
        self.v[active] = b2 * self.v[active] + (1 - b2) * grad[active] ** 2
        denom = (self.v[active].sqrt() / (1 - b2**t) ** 0.5) + self.eps
        new = delta[active] - (lr / (1 - b1**t)) * self.m[active] / denom
        norm = new.norm(dim=1, keepdim=True)
        delta[active] = torch.where(norm > max_norm, new * max_norm / norm, new)


def _optimize_chunk(
    model: nn.Module,
    tok: Any,
    spec: ModelSpec,
    layer: int,
    requests: Sequence[EditRequest],
    templates: Sequence[str],
    hp: ValueHParams,
    at: str,
    reuse_prefix: bool = True,
) -> Values:
    """:func:`optimize_values` for one chunk of requests: rows, then evaluate / stop / Adam step."""
    device = model_device(model)
    loss_layer = spec.n_layers - 1 if hp.v_loss_layer is None else max(hp.v_loss_layer, layer)
    loss_name = spec.block_name(loss_layer)
    edit_name = spec.block_name(layer) if at == "block" else spec.rewrite_name(layer)
    rows = _value_rows(model, tok, spec, requests, templates, hp, loss_name, reuse_prefix)
    n_req = len(requests)
    delta = torch.zeros(n_req, spec.d_model, device=device, dtype=torch.float32, requires_grad=True)
    adam = _Adam(torch.zeros_like(delta), torch.zeros_like(delta))
    ref = _Unedited(torch.zeros(n_req, spec.d_model, device=device))
    active = torch.ones(n_req, dtype=torch.bool, device=device)
    last_loss = torch.zeros(n_req, device=device)
    steps = torch.zeros(n_req, dtype=torch.long, device=device)
    mpes_count = torch.zeros(n_req, dtype=torch.long, device=device)  # checks passed so far (ENCORE)

    for it in range(hp.v_num_grad_steps):
        act_req = active.nonzero().squeeze(1)
        loss, wrong = _evaluate(model, spec, rows, active, delta, ref, hp, edit_name, loss_name)
        with torch.no_grad():
            last_loss[act_req] = loss.detach()[act_req]
            steps[act_req] += 1
            done = active & (last_loss < hp.early_stop_loss)
            if wrong is not None:
                mpes_count[act_req] += (wrong[act_req] == 0).long()
                done |= active & (mpes_count >= hp.mpes_hits)
            active &= ~done
            if it == hp.v_num_grad_steps - 1 or not bool(active.any()):
                break
        (grad,) = torch.autograd.grad(loss[active].sum(), delta)
        # every still-active request has taken exactly `it` steps before this one
        adam.step(
            delta, grad, active, it + 1, hp.v_lr, hp.clamp_norm_factor * ref.init[active].norm(dim=1, keepdim=True)
        )
    log.debug("values: layer %d, %d requests, loss %s", layer, n_req, last_loss.tolist())
    values = (ref.init + delta).detach()
    return Values(values=values, init=ref.init.clone(), loss=last_loss, steps=steps)


@dataclass
class PrefixCache:
    """Keys/values of every row's tokens before its lookup token, per layer up to the loss layer.

    Rows are right-padded to ``width`` with no attention mask in the prefix pass: a real token never
    attends to a later pad (causal attention), so its keys and values are exact, and no query row is
    fully masked (which would turn pad states into NaN). The pads are masked out in the step passes.
    """

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    lengths: torch.Tensor  # [rows] prefix length = lookup index
    width: int

    @classmethod
    def read(cls, cache: Any, lengths: torch.Tensor, width: int) -> PrefixCache | None:
        """The keys/values a forward with ``use_cache=True`` left in ``cache`` (a ``DynamicCache``), or
        None if they cannot be read or do not span ``width`` positions."""
        layers = getattr(cache, "layers", None)
        if layers is None:  # pragma: no cover - older transformers
            kv = list(zip(cache.key_cache, cache.value_cache))
        else:
            kv = [(layer.keys, layer.values) for layer in layers]
        if not kv or any(k is None or k.shape[-2] != width for k, _ in kv):
            return None
        return cls(kv=kv, lengths=lengths, width=width)

    def cache(self, rows: torch.Tensor) -> Any:
        """A fresh cache holding the selected rows' prefixes (the step pass appends to it)."""
        from transformers import DynamicCache

        cache = DynamicCache()
        for i, (k, v) in enumerate(self.kv):
            cache.update(k[rows], v[rows], i)
        return cache


def cache_kwarg(model: nn.Module) -> str:
    """The forward argument that takes a KV cache: ``cache`` in recent transformers, else
    ``past_key_values``."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def prefix_cache(
    model: nn.Module, spec: ModelSpec, seqs: list[list[int]], lookup: list[int], pad: int, last: str
) -> PrefixCache | None:
    """Run every row's prefix once (up to block ``last``) and keep its KV cache; None if no row has a
    prefix or the model's cache cannot be read (then the full rows run at every step)."""
    width = max(lookup)
    if width == 0:
        return None
    try:
        from transformers import DynamicCache
    except ImportError:  # pragma: no cover - transformers always has it
        return None
    device = model_device(model)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    for i, (sq, lk) in enumerate(zip(seqs, lookup)):
        ids[i, :lk] = torch.tensor(sq[:lk], dtype=torch.long)
    cache = DynamicCache()
    with hooks(model, stop_after=last):
        run_until(model, use_cache=True, input_ids=ids.to(device), **{cache_kwarg(model): cache})
    return PrefixCache.read(cache, torch.tensor(lookup, device=device), width)
