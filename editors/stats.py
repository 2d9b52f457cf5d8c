"""Second-moment statistics of the edited projection's input, and their on-disk cache.

``C = (1/N) Σ k kᵀ`` over every non-padding token of a text corpus, where k is the input of the edited
projection (``spec.rewrite_name(layer)``, the MLP's down projection): the uncentred second moment that
ROME/MEMIT/EMMET/AlphaEdit call "mom2" or "cov" (see ``docs/ALGORITHMS.md`` §1). One forward pass per
token batch collects every requested layer at once and stops after the deepest one.

Cached results are ``<root>/<digest>.safetensors`` files (never pickles) whose metadata holds the full
:class:`StatsKey`, so a hash collision or a stale file is detected and treated as a miss.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from editors.model import ModelSpec, hooks, model_device, parse_dtype, run_until
from editors.requests import pad_id, pad_right

log = logging.getLogger(__name__)

MAX_SEQ_LEN_CAP = 2048
STATS_FORMAT = "editors.stats.v1"
_ACC_DTYPES = {torch.float32: "float32", torch.float64: "float64"}
_TOKENIZE_CHUNK = 64  # texts tokenised per call (fast tokenizers batch in Rust)
_BUFFER_BATCHES = 16  # sequences are sorted by length within a buffer of this many batches' tokens


@dataclass(frozen=True, eq=False)
class SecondMoment:
    """``mom2``: [d_key, d_key] = (1/N) Σ k kᵀ; ``n_tokens``: N, the number of keys averaged."""

    mom2: torch.Tensor
    n_tokens: int


def default_max_seq_len(model: nn.Module) -> int:
    """min(the model's maximum positions, 2048). The original ROME code truncates at the model's
    maximum positions (2048 for GPT-J, 8192 for Llama-3); 2048 keeps activation memory bounded and the
    token count comparable across models. Models without a position limit in the config get 2048."""
    cfg = getattr(model, "config", None)
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    return min(int(limit), MAX_SEQ_LEN_CAP) if limit else MAX_SEQ_LEN_CAP


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
    progress: bool = True,
) -> dict[int, SecondMoment]:
    """Second moments of the edited projection's input at ``layers``, in one pass over ``texts``.

    Each text is tokenised with the tokenizer's own special tokens (BOS if it adds one) and truncated to
    ``max_seq_len`` tokens. Sequences are sorted by length within a buffer and packed into right-padded
    batches of at most ``batch_tokens`` padded tokens (a single longer sequence forms its own batch).
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
        max_seq_len: truncation length; default :func:`default_max_seq_len` (min(max positions, 2048)).
        batch_tokens: padded tokens per forward pass (batch size × padded length); default
            :func:`default_batch_tokens` of the model's device. The result does not depend on it (up to
            float rounding).
        dtype: accumulation dtype, float32 or float64.
        progress: show a tqdm bar over tokens.

    Returns:
        ``{layer: SecondMoment(mom2 [d_key, d_key] on the model's device in dtype, n_tokens)}``.

    Raises:
        ValueError: naming ``layers``, ``dtype``, ``max_texts``, ``max_tokens``, ``max_seq_len`` or
            ``batch_tokens`` for invalid arguments, or ``corpus`` when no token was read.
    """
    layers = _check_layers(spec, layers)
    acc = accumulation_dtype(dtype)
    for name, value in (("max_texts", max_texts), ("max_tokens", max_tokens), ("max_seq_len", max_seq_len)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name}: must be a positive integer or None, got {value!r}")
    if batch_tokens is not None and (
        isinstance(batch_tokens, bool) or not isinstance(batch_tokens, int) or batch_tokens < 1
    ):
        raise ValueError(f"batch_tokens: must be a positive integer or None, got {batch_tokens!r}")
    seq_len = max_seq_len or default_max_seq_len(model)
    device = model_device(model)
    batch_tokens = batch_tokens or default_batch_tokens(device)
    pad = pad_id(tok)
    names = {layer: spec.rewrite_name(layer) for layer in layers}
    sums = {layer: torch.zeros(spec.d_key, spec.d_key, dtype=acc, device=device) for layer in layers}
    n_tokens = 0
    start = time.perf_counter()
    stream = _token_stream(tok, texts, seq_len, max_texts, max_tokens)
    with (
        torch.no_grad(),
        _eval_mode(model),
        hooks(model, inputs=list(names.values()), stop_after=names[layers[-1]]) as store,
        tqdm(total=max_tokens, unit="tok", unit_scale=True, desc="mom2", disable=not progress) as bar,
    ):
        for batch in _batches(stream, batch_tokens):
            input_ids, mask = pad_right(batch, pad, device)
            store.clear()
            run_until(model, input_ids=input_ids, attention_mask=mask)
            keep = mask.bool()
            for layer, name in names.items():
                keys = store.get(f"in:{name}")
                if keys is None or keys.shape[-1] != spec.d_key:
                    got = "nothing" if keys is None else f"width {keys.shape[-1]}"
                    raise ValueError(f"spec.rewrite_module: input of {name} has {got}, expected d_key={spec.d_key}")
                feats = keys[keep].to(acc)  # [n, d_key]
                sums[layer].addmm_(feats.T, feats)
            n = int(keep.sum())
            n_tokens += n
            bar.update(n)
    if n_tokens == 0:
        raise ValueError("corpus: no tokens were read (the corpus is empty or yields only empty texts)")
    log.info(
        "second moments of layers %s: %d tokens in %.1fs (%s)",
        layers,
        n_tokens,
        time.perf_counter() - start,
        _ACC_DTYPES[acc],
    )
    return {layer: SecondMoment(sums[layer].div_(n_tokens), n_tokens) for layer in layers}


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


def _token_stream(
    tok: Any, texts: Iterable[str], seq_len: int, max_texts: int | None, max_tokens: int | None
) -> Iterator[list[int]]:
    """Token ids of each text, truncated to ``seq_len``; stops at ``max_texts`` texts or exactly
    ``max_tokens`` tokens (cutting the last text)."""
    budget = max_tokens
    it = iter(texts)
    n_read = 0
    while True:
        room = _TOKENIZE_CHUNK if max_texts is None else min(_TOKENIZE_CHUNK, max_texts - n_read)
        chunk = [t for _, t in zip(range(room), it)]
        if not chunk:
            return
        n_read += len(chunk)
        for ids in tok(chunk, truncation=True, max_length=seq_len)["input_ids"]:
            if budget is not None:
                ids = ids[:budget]
                budget -= len(ids)
            if ids:
                yield list(ids)
            if budget == 0:
                return


def _batches(stream: Iterator[list[int]], batch_tokens: int) -> Iterator[list[list[int]]]:
    """Group sequences into batches of at most ``batch_tokens`` padded tokens, sorting by length within
    a buffer of ``_BUFFER_BATCHES`` batches' worth of tokens to reduce padding."""
    buffer: list[list[int]] = []
    size = 0
    for ids in stream:
        buffer.append(ids)
        size += len(ids)
        if size >= _BUFFER_BATCHES * batch_tokens:
            yield from _pack(buffer, batch_tokens)
            buffer, size = [], 0
    yield from _pack(buffer, batch_tokens)


def _pack(seqs: list[list[int]], batch_tokens: int) -> Iterator[list[list[int]]]:
    batch: list[list[int]] = []
    for ids in sorted(seqs, key=len, reverse=True):
        if batch and (len(batch) + 1) * len(batch[0]) > batch_tokens:
            yield batch
            batch = []
        batch.append(ids)
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
        max_seq_len: the truncation length used (None: the model's default).
        dtype: accumulation dtype, ``"float32"`` or ``"float64"`` (a torch dtype is converted).
        module: the rewrite module's name, for hand-written specs (None: the default layout).
    """

    model: str
    layer: int
    corpus: str
    max_texts: int | None
    max_tokens: int | None
    max_seq_len: int | None
    dtype: str
    module: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", _ACC_DTYPES[accumulation_dtype(self.dtype)])

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no spaces)."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True, separators=(",", ":"))

    def digest(self) -> str:
        """First 24 hex digits of the sha256 of :meth:`to_json`."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:24]


class StatsStore:
    """A folder of cached second moments, one ``<digest>.safetensors`` file per :class:`StatsKey`."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def path(self, key: StatsKey) -> Path:
        return self.root / f"{key.digest()}.safetensors"

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, StatsKey):
            return False
        try:
            with safe_open(self.path(key), framework="pt") as f:
                return self._matches(f.metadata(), key)
        except (OSError, SafetensorError, ValueError):
            return False

    def get(self, key: StatsKey, device: str | torch.device | None = None) -> SecondMoment | None:
        """The cached statistics (on CPU, or on ``device``), or None on a miss. A file whose stored key
        differs from ``key`` or that cannot be read is a miss, with a warning."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                if not self._matches(meta, key):
                    log.warning("stats cache %s holds another key; ignoring it", path)
                    return None
                mom2 = f.get_tensor("mom2")
            n_tokens = int(meta["n_tokens"])
        except (OSError, SafetensorError, ValueError, KeyError) as e:
            log.warning("stats cache %s is unreadable (%s); ignoring it", path, e)
            return None
        if mom2.ndim != 2 or mom2.shape[0] != mom2.shape[1] or n_tokens < 1:
            log.warning("stats cache %s holds a malformed matrix; ignoring it", path)
            return None
        if device is not None:
            mom2 = mom2.to(device)
        return SecondMoment(mom2, n_tokens)

    def put(self, key: StatsKey, sm: SecondMoment) -> Path:
        """Write ``sm`` under ``key`` atomically (temp file in the same folder, then ``os.replace``)."""
        if _ACC_DTYPES.get(sm.mom2.dtype) != key.dtype:
            raise ValueError(f"dtype: the key says {key.dtype} but the statistics are {sm.mom2.dtype}")
        if sm.n_tokens < 1:
            raise ValueError(f"n_tokens: must be positive, got {sm.n_tokens}")
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.path(key)
        meta = {"format": STATS_FORMAT, "key": key.to_json(), "n_tokens": str(int(sm.n_tokens))}
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{path.stem}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file({"mom2": sm.mom2.detach().cpu().contiguous()}, tmp, metadata=meta)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        log.info("cached layer %d statistics (%d tokens) at %s", key.layer, sm.n_tokens, path)
        return path

    @staticmethod
    def _matches(meta: Mapping[str, str] | None, key: StatsKey) -> bool:
        if not meta or meta.get("format") != STATS_FORMAT:
            return False
        try:
            return json.loads(meta.get("key", "")) == json.loads(key.to_json())
        except json.JSONDecodeError:
            return False


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
        missing.sort()
        log.info("computing statistics for layers %s (%d cached)", missing, len(out))
        computed = compute(missing)
        for layer in missing:
            if layer not in computed:
                raise ValueError(f"compute: returned no statistics for layer {layer}")
            sm = computed[layer]
            store.put(keys[layer], sm)
            out[layer] = sm if device is None else SecondMoment(sm.mom2.to(device), sm.n_tokens)
    return {layer: out[layer] for layer in keys}


__all__ = [
    "SecondMoment",
    "StatsKey",
    "StatsStore",
    "accumulation_dtype",
    "check_stats",
    "collect_second_moments",
    "default_batch_tokens",
    "default_max_seq_len",
    "get_or_compute",
]
