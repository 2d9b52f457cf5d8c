"""Second-moment statistics of the edited projection's input, and their on-disk cache.

``C = (1/N) Σ k kᵀ`` over every non-padding token of a text corpus, where k is the input of the edited
projection (``spec.rewrite_name(layer)``, the MLP's down projection): the uncentred second moment that
ROME/MEMIT/EMMET/AlphaEdit call "mom2" or "cov" (see ``docs/ALGORITHMS.md`` §1). One forward pass per
token batch collects every requested layer at once and stops after the deepest one.

With ``tolerance`` the pass stops once C has converged for editing: see :func:`collect_second_moments`
and ``docs/SHARED_WORK.md``.

C is a sum over the texts, so a pass can be split over workers: :func:`split_stream` cuts the pass's
token stream into parts (:class:`StreamSlice`), :func:`second_moment_sums` computes one part's raw sums
Σ k kᵀ and key count (:class:`MomentSums`), and :func:`add_sums` adds the parts; divided
(:meth:`MomentSums.moment`) they give the one-pass C up to float rounding, since the parts hold exactly
the keys of the single pass (the same texts, the same ``max_tokens`` cut).

Cached results live in an :class:`editors.store.Store` (``<root>/<digest>.safetensors``, never pickles)
whose metadata holds the full :class:`StatsKey`, so a hash collision or a stale file is detected and
treated as a miss.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from editors.model import ModelSpec, hooks, model_device, parse_dtype, run_until
from editors.requests import pad_id, pad_right
from editors.store import Remote, Store, claim, key_digest, key_json

log = logging.getLogger(__name__)

#: Tokens per text for a model whose config declares no position limit.
FALLBACK_MAX_SEQ_LEN = 2048
#: ``StatsKey.max_seq_len`` of a pass that cuts each text at the model's context (``max_seq_len=None``).
CONTEXT = "context"
STATS_FORMAT = "editors.stats.v2"
_ACC_DTYPES = {torch.float32: "float32", torch.float64: "float64"}
_TOKENIZE_CHUNK = 64  # texts tokenised per call (fast tokenizers batch in Rust)
_BUFFER_BATCHES = 16  # sequences are sorted by length within a buffer of this many batches' tokens


#: Held-out probe keys of the convergence check, and the growth of the token count between checks.
PROBE_TOKENS = 512
CHECK_GROWTH = 1.25


@dataclass(frozen=True, eq=False)
class SecondMoment:
    """``mom2``: [d_key, d_key] = (1/N) Σ k kᵀ; ``n_tokens``: N, the number of keys averaged.

    With a convergence tolerance: ``converged`` says whether the pass stopped on it (False: the corpus
    or ``max_tokens`` ran out first) and ``history`` holds ``(tokens, relative change)`` at each check.
    """

    mom2: torch.Tensor
    n_tokens: int
    converged: bool | None = None
    history: tuple[tuple[int, float], ...] = ()


def model_max_positions(model: nn.Module) -> int | None:
    """The model's context length as its config declares it (``n_positions``, ``max_sequence_length``,
    ``max_position_embeddings`` or ``seq_length``, in the reference's order), or None."""
    cfg = getattr(model, "config", None)
    for attr in ("n_positions", "max_sequence_length", "max_position_embeddings", "seq_length"):
        limit = getattr(cfg, attr, None)
        if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
            return limit
    return None


def default_max_seq_len(model: nn.Module) -> int:
    """The model's context length (:func:`model_max_positions`; :data:`FALLBACK_MAX_SEQ_LEN` when the
    config declares none): where the reference code cuts each text (``rome/layer_stats.py``: ``maxlen =
    model.config.n_positions`` or ``max_position_embeddings``: 2,048 for GPT-J, 8,192 for Llama-3)."""
    return model_max_positions(model) or FALLBACK_MAX_SEQ_LEN


def seq_len_key(max_seq_len: int | None) -> int | str:
    """``StatsKey.max_seq_len`` of a pass run with ``max_seq_len``: the number, or :data:`CONTEXT` for
    None (the model's context, which the model's identity fixes)."""
    return CONTEXT if max_seq_len is None else max_seq_len


def default_batch_tokens(device: torch.device | str) -> int:
    """Padded tokens per forward pass when the caller does not say: 1,024 on a CPU, 8,192 on an
    accelerator. On CPUs small batches are faster (SmolLM2, 2 cores, one layer: 5,300 tok/s at 1,024 vs
    2,600 at 8,192; all 30 layers 1.6x faster at 2,048): the working set stays in cache and there is
    little padding. GPUs want the large batches."""
    return 1024 if torch.device(device).type == "cpu" else 8192


def accumulation_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32"``/``"float64"`` (or the torch dtypes) -> the torch dtype; anything else is a ValueError
    naming ``dtype`` (float16/bfloat16 sums lose the small directions of C, EasyEdit #436)."""
    try:
        dt = parse_dtype(dtype)
    except ValueError:
        dt = None
    if dt not in _ACC_DTYPES:
        raise ValueError(f"dtype: statistics accumulate in float32 or float64, not {dtype!r}")
    return dt


def collect_second_moments(
    model: nn.Module,
    tok: Any,
    spec: ModelSpec,
    layers: Sequence[int],
    texts: Iterable[str],
    *,
    max_texts: int | None = None,
    max_tokens: int | None = None,
    max_seq_len: int | None = None,
    batch_tokens: int | None = None,
    dtype: str | torch.dtype = torch.float32,
    tolerance: float | None = None,
    probe_tokens: int = PROBE_TOKENS,
    progress: bool = True,
) -> dict[int, SecondMoment]:
    """Second moments of the edited projection's input at ``layers``, in one pass over ``texts``.

    Each text is tokenised with the tokenizer's own special tokens (BOS if it adds one) and truncated to
    ``max_seq_len`` tokens (by default the model's context, as the reference code). Sequences are sorted
    by length within a buffer and packed into right-padded batches of at most ``batch_tokens`` padded
    tokens (a single longer sequence forms its own batch).
    Each batch runs once under ``torch.no_grad()`` with forward-pre hooks on every requested rewrite
    module, and stops after the deepest one, so the layers above it never run. Keys of non-padding
    positions (``attention_mask == 1``) are cast to ``dtype`` and accumulated on the model's device.

    Args:
        model: causal LM; left bit-identical (no writes; its train/eval flags are restored).
        tok: its tokenizer (callable on a list of strings, with ``pad_token_id`` or ``eos_token_id``).
        spec: module layout; keys are inputs of ``spec.rewrite_name(layer)``, d_key wide.
        layers: layer indices (non-empty, each in 0..n_layers-1).
        texts: the corpus (e.g. ``editors.corpus.iter_texts(corpus_spec)``).
        max_texts: read at most this many texts.
        max_tokens: stop after exactly this many keys: the first ``max_tokens`` tokens of the stream
            (the text where the budget runs out is cut, which leaves its earlier keys unchanged since
            attention is causal), so ``n_tokens == max_tokens`` whenever the corpus is long enough.
        max_seq_len: tokens per text (truncation); default :func:`default_max_seq_len`, the model's
            context (8,192 for Llama-3), as the reference code. At most the model's context.
        batch_tokens: padded tokens per forward pass (batch size × padded length); default
            :func:`default_batch_tokens` of the model's device. The result does not depend on it (up to
            float rounding).
        dtype: accumulation dtype, float32 or float64.
        tolerance: stop once C has converged for editing (None: read up to the caps): the relative
            change of G = Pᵀ(C + εI)⁻¹P on held-out probe keys P between checks falls below it at
            every layer (the rule and why: :class:`_Convergence`, docs/SHARED_WORK.md).
        probe_tokens: number of held-out probe keys (with ``tolerance`` only).
        progress: show a tqdm bar over tokens.

    Returns:
        ``{layer: SecondMoment(mom2 [d_key, d_key] on the model's device in dtype, n_tokens)}``.

    Raises:
        ValueError: naming ``layers``, ``dtype``, ``max_texts``, ``max_tokens``, ``max_seq_len`` or
            ``batch_tokens`` for invalid arguments, or ``corpus`` when no token was read.
    """
    layers = _check_layers(spec, layers)
    acc = accumulation_dtype(dtype)
    _check_caps(max_texts=max_texts, max_tokens=max_tokens, max_seq_len=max_seq_len, batch_tokens=batch_tokens)
    check = _Convergence(layers, spec.d_key, tolerance, probe_tokens) if tolerance is not None else None
    start = time.perf_counter()
    stream = _stream(tok, texts, _seq_len(model, max_seq_len), max_texts, max_tokens, StreamSlice())
    sums, n_tokens = _run_pass(model, tok, spec, layers, stream, batch_tokens, acc, check, max_tokens, progress)
    if n_tokens == 0:
        raise ValueError("corpus: no tokens were read (the corpus is empty or yields only empty texts)")
    log.info(
        "second moments of layers %s: %d tokens in %.1fs (%s)",
        layers,
        n_tokens,
        time.perf_counter() - start,
        _ACC_DTYPES[acc],
    )
    converged, hist = (check.done, tuple(check.history)) if check is not None else (None, ())
    return {layer: SecondMoment(sums[layer].div_(n_tokens), n_tokens, converged, hist) for layer in layers}


@dataclass(frozen=True)
class StreamSlice:
    """A part of a statistics pass's key stream: the keys at stream positions ``start <= p < stop`` that
    come from texts ``first_text <= j < stop_text`` (None: no bound).

    The stream is :func:`collect_second_moments`' own: every text's tokens (truncated to
    ``max_seq_len``) one after the other, up to ``max_texts`` texts and ``max_tokens`` keys in all, the
    text where the budget runs out cut. Slices that partition the positions (or the texts) hold every
    key of the single pass exactly once. A text that starts before ``start`` still runs from its first
    token (its earlier keys are the context of the later ones; attention is causal) but only its keys
    from ``start`` on are counted.
    """

    start: int = 0
    stop: int | None = None
    first_text: int = 0
    stop_text: int | None = None

    def __post_init__(self) -> None:
        for name, lo, hi in (("start", self.start, self.stop), ("first_text", self.first_text, self.stop_text)):
            if isinstance(lo, bool) or not isinstance(lo, int) or lo < 0:
                raise ValueError(f"{name}: must be a non-negative integer, got {lo!r}")
            if hi is not None and (isinstance(hi, bool) or not isinstance(hi, int) or hi < lo):
                raise ValueError(f"{name}: the slice [{lo}, {hi}) must end at or after its start")

    @property
    def whole(self) -> bool:
        """Whether this is the whole stream."""
        return self == StreamSlice()


def split_stream(n: int, *, max_tokens: int | None = None, max_texts: int | None = None) -> list[StreamSlice]:
    """At most ``n`` slices holding every key of a pass's stream exactly once, of equal size.

    With ``max_tokens``: equal ranges of the stream's first ``max_tokens`` positions (a boundary may
    fall inside a text: the slice after it runs that text's head as context, at most one text of extra
    forward work per boundary). Else with ``max_texts``: equal ranges of the first ``max_texts`` texts.
    Else one whole-stream slice: the stream's length is not known before reading it. Never more slices
    than tokens (or texts).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n: must be a positive integer, got {n!r}")
    _check_caps(max_tokens=max_tokens, max_texts=max_texts)
    total = max_tokens if max_tokens is not None else max_texts
    if total is None or n == 1:
        return [StreamSlice()]
    n = min(n, total)
    bounds = [total * i // n for i in range(n + 1)]
    if max_tokens is not None:
        return [StreamSlice(start=a, stop=b) for a, b in itertools.pairwise(bounds)]
    return [StreamSlice(first_text=a, stop_text=b) for a, b in itertools.pairwise(bounds)]


@dataclass(frozen=True, eq=False)
class MomentSums:
    """``sums``: [d_key, d_key] = Σ k kᵀ over the keys of a part of a pass's stream, in the accumulation
    dtype (float32 or float64); ``n_tokens``: the number of keys summed. Parts add (:func:`add_sums`);
    :meth:`moment` divides."""

    sums: torch.Tensor
    n_tokens: int

    def moment(self) -> SecondMoment:
        """C = Σ k kᵀ / N [d_key, d_key] in the sums' dtype.

        Raises:
            ValueError: naming ``corpus`` when no key was summed.
        """
        if self.n_tokens < 1:
            raise ValueError("corpus: no tokens were read (the corpus is empty or yields only empty texts)")
        return SecondMoment(self.sums / self.n_tokens, self.n_tokens)


def add_sums(parts: Iterable[MomentSums]) -> MomentSums:
    """The sum of ``parts`` (one layer's partial sums), consumed one at a time: the first is copied (it
    may be a read-only view, e.g. of Ray's object store), the others added to it in place, so only the
    total and the part being added are in memory.

    Raises:
        ValueError: naming ``parts`` when there are none, or they differ in shape or dtype.
    """
    total: torch.Tensor | None = None
    n = 0
    for p in parts:
        if total is None:
            total = p.sums.clone()
        elif p.sums.shape != total.shape or p.sums.dtype != total.dtype:
            raise ValueError(
                f"parts: sums of shape {tuple(p.sums.shape)} {p.sums.dtype} cannot be added to "
                f"{tuple(total.shape)} {total.dtype} (parts of different passes?)"
            )
        else:
            total.add_(p.sums.to(total.device))
        n += int(p.n_tokens)
    if total is None:
        raise ValueError("parts: no partial sums to add")
    return MomentSums(total, n)


def second_moment_sums(
    model: nn.Module,
    tok: Any,
    spec: ModelSpec,
    layers: Sequence[int],
    texts: Iterable[str],
    *,
    part: StreamSlice = StreamSlice(),
    max_texts: int | None = None,
    max_tokens: int | None = None,
    max_seq_len: int | None = None,
    batch_tokens: int | None = None,
    dtype: str | torch.dtype = torch.float32,
    progress: bool = True,
) -> dict[int, MomentSums]:
    """The raw sums Σ k kᵀ and key counts of ``part`` of the stream :func:`collect_second_moments` reads.

    The arguments other than ``part`` are :func:`collect_second_moments`' and must be the same for
    every part of one pass (the stream, its caps and the accumulation dtype). Texts before the part are
    tokenised to find its positions but not run (when neither ``max_tokens`` nor ``part``'s positions
    bound it, texts before ``part.first_text`` are skipped untokenised); the pass stops at the part's
    end. There is no convergence check: a pass with a tolerance decides when to stop from the whole
    stream (:func:`collect_second_moments`).

    Returns:
        ``{layer: MomentSums(sums [d_key, d_key] on the model's device in dtype, n_tokens)}``;
        ``n_tokens`` is 0 for a part past the end of the corpus. ``add_sums`` over the parts of a
        :func:`split_stream` and :meth:`MomentSums.moment` give the one-pass C to float rounding.

    Raises:
        ValueError: naming ``layers``, ``dtype``, ``max_texts``, ``max_tokens``, ``max_seq_len`` or
            ``batch_tokens`` for invalid arguments.
    """
    layers = _check_layers(spec, layers)
    acc = accumulation_dtype(dtype)
    _check_caps(max_texts=max_texts, max_tokens=max_tokens, max_seq_len=max_seq_len, batch_tokens=batch_tokens)
    if not isinstance(part, StreamSlice):
        raise ValueError(f"part: expected a StreamSlice, got {type(part).__name__}")
    start = time.perf_counter()
    stream = _stream(tok, texts, _seq_len(model, max_seq_len), max_texts, max_tokens, part)
    stop = part.stop if max_tokens is None else min(max_tokens, part.stop or max_tokens)
    total = None if stop is None else stop - min(part.start, stop)
    sums, n_tokens = _run_pass(model, tok, spec, layers, stream, batch_tokens, acc, None, total, progress)
    log.info(
        "partial sums of layers %s over %s: %d tokens in %.1fs", layers, part, n_tokens, time.perf_counter() - start
    )
    return {layer: MomentSums(sums[layer], n_tokens) for layer in layers}


def _run_pass(
    model: nn.Module,
    tok: Any,
    spec: ModelSpec,
    layers: list[int],
    stream: Iterator[tuple[list[int], int]],
    batch_tokens: int | None,
    acc: torch.dtype,
    check: _Convergence | None,
    total: int | None,
    progress: bool,
) -> tuple[dict[int, torch.Tensor], int]:
    """Run the model over ``stream`` (token ids, leading keys to leave out) in packed batches, stopping
    after the deepest of ``layers``; returns ({layer: Σ k kᵀ [d_key, d_key] in ``acc`` on the model's
    device}, keys summed). ``check`` may stop it early (and holds its probe keys out of the sums)."""
    device = model_device(model)
    batch_tokens = batch_tokens or default_batch_tokens(device)
    pad = pad_id(tok)
    names = {layer: spec.rewrite_name(layer) for layer in layers}
    sums = {layer: torch.zeros(spec.d_key, spec.d_key, dtype=acc, device=device) for layer in layers}
    n_tokens = 0
    with (
        torch.no_grad(),
        _eval_mode(model),
        hooks(model, inputs=list(names.values()), stop_after=names[layers[-1]]) as store,
        tqdm(total=total, unit="tok", unit_scale=True, desc="mom2", disable=not progress) as bar,
    ):
        for batch in _batches(stream, batch_tokens):
            input_ids, mask = pad_right([ids for ids, _ in batch], pad, device)
            keep = mask.bool()
            for row, (_, skip) in enumerate(batch):
                keep[row, :skip] = False  # the context of a text that starts before the slice
            store.clear()
            run_until(model, input_ids=input_ids, attention_mask=mask)
            n = _accumulate(store, names, keep, sums, check, spec.d_key)
            n_tokens += n
            bar.update(n)
            if check is not None and check.due(n_tokens) and check.converged(sums, n_tokens):
                break
    return sums, n_tokens


def _seq_len(model: nn.Module, max_seq_len: int | None) -> int:
    """Tokens per text: ``max_seq_len``, else the model's context; more than the context is an error."""
    seq_len = max_seq_len or default_max_seq_len(model)
    limit = model_max_positions(model)
    if limit is not None and seq_len > limit:
        raise ValueError(f"max_seq_len: {seq_len} tokens exceed the model's context of {limit} positions")
    return seq_len


def _accumulate(
    store: Mapping[str, torch.Tensor],
    names: Mapping[int, str],
    keep: torch.Tensor,
    sums: dict[int, torch.Tensor],
    check: _Convergence | None,
    d_key: int,
) -> int:
    """Add one batch's keys (non-padding positions ``keep``, cast to the sums' dtype; the convergence
    check's held-out probes set aside) to each layer's sum of k kᵀ; returns the keys added per layer."""
    n = 0
    for layer, name in names.items():
        feats = _layer_keys(store, name, d_key)[keep].to(sums[layer].dtype)  # [n, d_key]
        if check is not None:
            feats = check.hold_out(layer, feats)
        if len(feats):
            sums[layer].addmm_(feats.T, feats)
        n = len(feats)
    return n


def _check_caps(**caps: int | None) -> None:
    """Each cap is a positive integer or None; a ValueError names the first that is not."""
    for name, value in caps.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name}: must be a positive integer or None, got {value!r}")


def _layer_keys(store: Mapping[str, torch.Tensor], name: str, d_key: int) -> torch.Tensor:
    """The captured input of ``name`` [batch, seq, d_key], checked against the spec's width."""
    keys = store.get(f"in:{name}")
    if keys is None or keys.shape[-1] != d_key:
        got = "nothing" if keys is None else f"width {keys.shape[-1]}"
        raise ValueError(f"spec.rewrite_module: input of {name} has {got}, expected d_key={d_key}")
    return keys


class _Convergence:
    """The stopping rule of ``collect_second_moments(tolerance=...)``.

    The first ``probe_tokens`` keys of the stream are held out as probes P [d_key, m] (not in C); each
    time the token count has grown by :data:`CHECK_GROWTH` (from 2·d_key on), the Gram matrix
    G = Pᵀ(C + εI)⁻¹P is formed (ε = 1e-6·tr(C)/d_key, fp64) and the pass stops when ‖G − G_prev‖_F /
    ‖G‖_F is below the tolerance at every layer. The measure follows the edit, not C: an update
    ΔW = R Kᵀ(λC + KKᵀ)⁻¹ (MEMIT; EMMET and ROME alike) acts on any input k through the bilinear forms
    k_iᵀC⁻¹k of the edit keys with it, which G holds for held-out keys, where a norm of C would follow
    its large directions, which converge first (docs/SHARED_WORK.md).
    """

    def __init__(self, layers: list[int], d_key: int, tolerance: float, probe_tokens: int) -> None:
        if isinstance(tolerance, bool) or not (isinstance(tolerance, (int, float)) and 0 < tolerance < 1):
            raise ValueError(f"tolerance: must be a number in (0, 1) or None, got {tolerance!r}")
        if isinstance(probe_tokens, bool) or not isinstance(probe_tokens, int) or probe_tokens < 1:
            raise ValueError(f"probe_tokens: must be a positive integer, got {probe_tokens!r}")
        self.tol = tolerance
        self.m = probe_tokens
        self.probes: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
        self.have = dict.fromkeys(layers, 0)
        self.prev: dict[int, torch.Tensor] = {}
        self.next_check = 2 * d_key
        self.history: list[tuple[int, float]] = []
        self.done = False

    def hold_out(self, layer: int, feats: torch.Tensor) -> torch.Tensor:
        """Keep the first probe keys of the stream out of C; return the keys to accumulate."""
        need = self.m - self.have[layer]
        if need <= 0:
            return feats
        self.probes[layer].append(feats[:need])
        self.have[layer] += len(feats[:need])
        return feats[need:]

    def due(self, n_tokens: int) -> bool:
        return n_tokens >= self.next_check and all(h >= self.m for h in self.have.values())

    def converged(self, sums: Mapping[int, torch.Tensor], n_tokens: int) -> bool:
        self.next_check = int(n_tokens * CHECK_GROWTH) + 1
        change = 0.0
        for layer, s in sums.items():
            c = s.double() / n_tokens
            d = c.shape[0]
            c.diagonal().add_(1e-6 * float(c.diagonal().sum()) / d)
            p = torch.cat(self.probes[layer]).to(c).T  # [d_key, m]
            g = p.T @ torch.cholesky_solve(p, torch.linalg.cholesky(c))  # [m, m]
            old = self.prev.get(layer)
            change = max(change, float("inf") if old is None else float((g - old).norm() / g.norm()))
            self.prev[layer] = g
            del c
        self.history.append((n_tokens, change))
        log.info("statistics at %d tokens: relative change of PᵀC⁻¹P %.2e (tolerance %.1e)", n_tokens, change, self.tol)
        self.done = change < self.tol
        return self.done


def check_stats(stats: SecondMoment | torch.Tensor, spec: ModelSpec, layer: int, field: str = "stats") -> torch.Tensor:
    """The [d_key, d_key] matrix of ``stats``, after checking it fits ``spec`` at ``layer``.

    Raises:
        ValueError: naming ``field`` when it is not a square finite floating matrix of width
            ``spec.d_key`` (stats computed for another model: EasyEdit #347).
    """
    t = stats.mom2 if isinstance(stats, SecondMoment) else stats
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{field}: stats for layer {layer} must be a tensor, got {type(t).__name__}")
    shape = "x".join(str(s) for s in t.shape) or "a scalar"
    if t.ndim != 2 or t.shape[0] != t.shape[1]:
        raise ValueError(f"{field}: stats for layer {layer} are {shape}, not a square [d_key, d_key] matrix")
    if t.shape[0] != spec.d_key:
        raise ValueError(
            f"{field}: stats for layer {layer} are {shape} but the layer's keys are {spec.d_key}-wide: "
            "statistics were computed for another model; recompute them for this one"
        )
    if not t.is_floating_point():
        raise ValueError(f"{field}: stats for layer {layer} have dtype {t.dtype}, expected a float dtype")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{field}: stats for layer {layer} contain NaN or inf")
    return t


# ----------------------------------------------------------------------------------------------------
# Batching


def _check_layers(spec: ModelSpec, layers: Sequence[int]) -> list[int]:
    if isinstance(layers, (int, str)) or not layers:
        raise ValueError(f"layers: expected a non-empty list of layer indices, got {layers!r}")
    for layer in layers:
        spec.check_layer(layer, "layers")
    return sorted(set(layers))


def _text_tokens(
    tok: Any, texts: Iterable[str], seq_len: int, max_texts: int | None, skip: int = 0
) -> Iterator[tuple[int, list[int]]]:
    """(index of the text, its token ids truncated to ``seq_len``) of the first ``max_texts`` texts,
    tokenised :data:`_TOKENIZE_CHUNK` at a time; the first ``skip`` texts are passed over untokenised."""
    it = iter(texts)
    n_read = sum(1 for _ in itertools.islice(it, skip if max_texts is None else min(skip, max_texts)))
    while True:
        room = _TOKENIZE_CHUNK if max_texts is None else min(_TOKENIZE_CHUNK, max_texts - n_read)
        chunk = [t for _, t in zip(range(room), it)]
        if not chunk:
            return
        for i, ids in enumerate(tok(chunk, truncation=True, max_length=seq_len)["input_ids"]):
            yield n_read + i, list(ids)
        n_read += len(chunk)


def _stream(
    tok: Any, texts: Iterable[str], seq_len: int, max_texts: int | None, max_tokens: int | None, part: StreamSlice
) -> Iterator[tuple[list[int], int]]:
    """(token ids to run, leading keys to leave out) of each text with keys in ``part`` of the stream:
    every text's ids truncated to ``seq_len``, at most ``max_texts`` texts and exactly ``max_tokens``
    tokens in all (cutting the last text). A text is cut at the part's end; one that starts before
    the part's start runs whole with its keys before it left out."""
    positional = max_tokens is not None or part.start > 0 or part.stop is not None
    budget = max_tokens
    pos = 0
    for j, ids in _text_tokens(tok, texts, seq_len, max_texts, 0 if positional else part.first_text):
        if part.stop_text is not None and j >= part.stop_text:
            return
        if budget is not None:
            ids = ids[:budget]
            budget -= len(ids)
        begin, pos = pos, pos + len(ids)
        if part.stop is not None and begin >= part.stop:
            return
        if ids and j >= part.first_text and pos > part.start:
            yield ids[: None if part.stop is None else part.stop - begin], max(0, part.start - begin)
        if budget == 0:
            return


def _batches(stream: Iterator[tuple[list[int], int]], batch_tokens: int) -> Iterator[list[tuple[list[int], int]]]:
    """Group sequences (ids, keys to leave out) into batches of at most ``batch_tokens`` padded tokens,
    sorting by length within a buffer of ``_BUFFER_BATCHES`` batches' worth of tokens to reduce padding."""
    buffer: list[tuple[list[int], int]] = []
    size = 0
    for item in stream:
        buffer.append(item)
        size += len(item[0])
        if size >= _BUFFER_BATCHES * batch_tokens:
            yield from _pack(buffer, batch_tokens)
            buffer, size = [], 0
    yield from _pack(buffer, batch_tokens)


def _pack(seqs: list[tuple[list[int], int]], batch_tokens: int) -> Iterator[list[tuple[list[int], int]]]:
    batch: list[tuple[list[int], int]] = []
    for item in sorted(seqs, key=lambda x: len(x[0]), reverse=True):
        if batch and (len(batch) + 1) * len(batch[0][0]) > batch_tokens:
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) for the duration; every module's training flag is restored afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


# ----------------------------------------------------------------------------------------------------
# Cache


@dataclass(frozen=True)
class StatsKey:
    """Everything the statistics of one layer depend on.

    Attributes:
        model: ``ModelRef.identity()`` (changes with the weights and the tokenizer files).
        layer: layer index.
        corpus: ``editors.corpus.corpus_identity(corpus_spec)``.
        max_texts, max_tokens: the caps passed to :func:`collect_second_moments` (None: none).
        max_seq_len: tokens per text: the ``max_seq_len`` passed to :func:`collect_second_moments`, or
            :data:`CONTEXT` when it was None (the model's context; :func:`seq_len_key`). None: not
            recorded (keys built by hand, or stored before texts were cut at the model's context).
        dtype: accumulation dtype, ``"float32"`` or ``"float64"`` (a torch dtype is converted).
        module: the rewrite module's name, for hand-written specs (None: the default layout).
        model_dtype: the weights' dtype during the pass (None: not recorded, e.g. float32 notebooks).
        tolerance: the convergence tolerance of the pass (None: read up to the caps).
    """

    model: str
    layer: int
    corpus: str
    max_texts: int | None
    max_tokens: int | None
    max_seq_len: int | str | None
    dtype: str
    module: str | None = None
    model_dtype: str | None = None
    tolerance: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", _ACC_DTYPES[accumulation_dtype(self.dtype)])

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no spaces)."""
        return key_json(self)

    def digest(self) -> str:
        """First 24 hex digits of the sha256 of :meth:`to_json`."""
        return key_digest(self)


class StatsStore:
    """A folder of cached second moments, one ``<digest>.safetensors`` file per :class:`StatsKey`
    (an :class:`editors.store.Store`: atomic writes, the key checked on read)."""

    def __init__(self, root: str | os.PathLike, remote: Remote | None = None) -> None:
        self.root = Path(root)
        self._store = Store(self.root, STATS_FORMAT, remote)

    def path(self, key: StatsKey) -> Path:
        return self._store.path(key)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, StatsKey) and self._store.has(key)

    def n_tokens(self, key: StatsKey) -> int | None:
        """Tokens averaged into the stored C of ``key``, from the file header (no matrix read), or None."""
        meta = self._store.metadata(key)
        try:
            return int(meta["n_tokens"]) if meta is not None else None
        except (KeyError, ValueError):
            return None

    def get(self, key: StatsKey, device: str | torch.device | None = None) -> SecondMoment | None:
        """The cached statistics (on CPU, or on ``device``), or None on a miss. A file whose stored key
        differs from ``key``, that cannot be read or whose matrix is malformed is a miss, with a
        warning."""
        got = self._store.get_tensors(key)
        if got is None:
            return None
        tensors, meta = got
        mom2 = tensors.get("mom2")
        try:
            n_tokens = int(meta["n_tokens"])
            history = tuple((int(n), float(c)) for n, c in json.loads(meta.get("history", "[]")))
        except (KeyError, ValueError, TypeError):
            n_tokens, history = 0, ()
        if mom2 is None or mom2.ndim != 2 or mom2.shape[0] != mom2.shape[1] or n_tokens < 1:
            log.warning("stats cache %s holds a malformed matrix; ignoring it", self.path(key))
            return None
        converged = {"true": True, "false": False}.get(meta.get("converged", ""))
        if device is not None:
            mom2 = mom2.to(device)
        return SecondMoment(mom2, n_tokens, converged, history)

    def put(self, key: StatsKey, sm: SecondMoment) -> Path:
        """Write ``sm`` under ``key`` atomically (temp file in the same folder, then ``os.replace``)."""
        if _ACC_DTYPES.get(sm.mom2.dtype) != key.dtype:
            raise ValueError(f"dtype: the key says {key.dtype} but the statistics are {sm.mom2.dtype}")
        if sm.n_tokens < 1:
            raise ValueError(f"n_tokens: must be positive, got {sm.n_tokens}")
        meta = {"n_tokens": int(sm.n_tokens), "history": json.dumps([list(h) for h in sm.history])}
        if sm.converged is not None:
            meta["converged"] = "true" if sm.converged else "false"
        path = self._store.put_tensors(key, {"mom2": sm.mom2}, meta)
        log.info("cached layer %d statistics (%d tokens) at %s", key.layer, sm.n_tokens, path)
        return path


def get_or_compute(
    store: StatsStore,
    keys: Mapping[int, StatsKey],
    compute: Callable[[list[int]], dict[int, SecondMoment]],
    device: str | torch.device | None = None,
) -> dict[int, SecondMoment]:
    """Statistics for every layer of ``keys``: cached ones from ``store``, the missing ones from ONE call
    ``compute(missing_layers)`` (sorted), which are then stored.

    Args:
        keys: ``{layer: StatsKey}`` with ``key.layer == layer``.
        compute: e.g. ``lambda ls: collect_second_moments(model, tok, spec, ls, texts, ...)``.
        device: move every result there (None: cached ones stay on CPU, computed ones where computed).
    """
    out: dict[int, SecondMoment] = {}
    missing: list[int] = []
    for layer, key in keys.items():
        if key.layer != layer:
            raise ValueError(f"keys: the key for layer {layer} says layer {key.layer}")
        sm = store.get(key, device=device)
        if sm is None:
            missing.append(layer)
        else:
            out[layer] = sm
    if missing:
        with contextlib.ExitStack() as claims:  # in layer order, so two processes cannot deadlock
            mine = []
            for layer in sorted(missing):
                key = keys[layer]
                held = claims.enter_context(claim(store.path(key), lambda key=key: key in store))
                sm = store.get(key, device=device)  # stored by another process while we waited
                if sm is not None:
                    out[layer] = sm
                elif held:
                    mine.append(layer)
            if mine:
                log.info("computing statistics for layers %s (%d cached)", mine, len(out))
                computed = compute(mine)
                for layer in mine:
                    if layer not in computed:
                        raise ValueError(f"compute: returned no statistics for layer {layer}")
                    sm = computed[layer]
                    store.put(keys[layer], sm)
                    out[layer] = sm if device is None else SecondMoment(sm.mom2.to(device), sm.n_tokens)
    return {layer: out[layer] for layer in keys}


__all__ = [
    "MomentSums",
    "SecondMoment",
    "StatsKey",
    "StatsStore",
    "StreamSlice",
    "accumulation_dtype",
    "add_sums",
    "check_stats",
    "collect_second_moments",
    "default_batch_tokens",
    "default_max_seq_len",
    "get_or_compute",
    "model_max_positions",
    "second_moment_sums",
    "seq_len_key",
    "split_stream",
]
