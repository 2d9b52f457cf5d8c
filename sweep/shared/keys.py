"""The work trials share: what each result is keyed on, where it is stored, and what a trial is handed.

Three results are the same in many trials of a sweep and are computed once by :mod:`sweep.shared.needs`:

- **second moments** C of one layer: :class:`editors.stats.StatsKey` (model, layer, corpus with its
  sample seed, caps, tokens per text, accumulation dtype, weights dtype, convergence tolerance) in an
  :class:`editors.stats.StatsStore`;
- **target values** v* of batch-mode trials, per fact: :class:`ValuesKey` (model, value site and layer,
  value hyperparameters, context templates) in a :class:`ValuesStore`;
- **pre-edit scores**, per fact: :class:`ScoresKey` (model, scoring settings) in a :class:`ScoresStore`,
  the unedited model's held-out perplexity under a :class:`PplKey` and its capability probes under a
  :class:`ProbesKey`.

Every key is built from content, never from a path: the model is ``ModelRef.identity()`` (a fingerprint
of its weight and tokenizer files) plus the weights' dtype; a corpus is ``corpus_identity`` (a content
hash); a fact is the sha256 of the text fields its result depends on (:func:`request_digest`,
:func:`record_digest`), so weights re-saved to the same folder miss everywhere and a CounterFact file
changed in place misses for exactly the records that changed. Per-fact stores are written one chunk
(a part) at a time as the work finishes, so a killed sweep keeps every chunk it finished.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from editors import traits
from editors.corpus import CorpusSpec, corpus_identity
from editors.model import ModelRef
from editors.requests import EditRequest
from editors.stats import SecondMoment, StatsKey, StatsStore, seq_len_key
from editors.store import Store, key_digest, part_name
from editors.targets import ValueHParams

from ..evals.registry import RECORD_FIELDS, TEACHER_FORCED
from .mirror import store_location

log = logging.getLogger(__name__)

_WARNED: set[str] = set()


def _warn_once(what: str, msg: str, *args: Any) -> None:
    if what not in _WARNED:
        _WARNED.add(what)
        log.warning(msg, *args)


if TYPE_CHECKING:
    from editors.hparams import EditHParams

    from ..config import ModelConfig, TrialConfig
    from ..evals.data import Record

VALUES_FORMAT = "sweep.values.v2"
SCORES_FORMAT = "sweep.scores.v1"


# ----------------------------------------------------------------------------------------------------
# Keys


def model_identity(mc: ModelConfig) -> str:
    """The weights' content identity of ``mc`` (see ``ModelRef.identity``)."""
    return ModelRef(mc.source, mc.gguf_file, mc.revision).identity()


def stats_dtype(cfg: TrialConfig) -> str:
    """The weights' dtype of the statistics pass: ``stats.model_dtype``, else the model's."""
    return cfg.stats.model_dtype or cfg.model.dtype


def stats_keys(cfg: TrialConfig, layers: Iterable[int], model_id: str) -> dict[int, StatsKey]:
    """The statistics key of each of ``layers`` for the trial's model and ``stats`` settings."""
    s = cfg.stats
    corpus = corpus_identity(CorpusSpec(s.corpus, max_texts=s.max_texts, sample_seed=s.sample_seed))
    return {
        layer: StatsKey(
            model_id,
            layer,
            corpus,
            s.max_texts,
            s.max_tokens,
            seq_len_key(s.max_seq_len),
            s.dtype,
            model_dtype=stats_dtype(cfg),
            tolerance=s.tolerance,
        )
        for layer in layers
    }


@dataclass(frozen=True)
class ValuesKey:
    """What a batch-mode target value depends on besides its fact: not the batch size nor the solver,
    so MEMIT, EMMET and AlphaEdit trials share it; ROME's v* sits at another site and has its own."""

    model: str
    model_dtype: str
    site: str
    layer: int
    value_hparams: str  # canonical JSON of the ValueHParams fields
    templates: str
    template_seed: int


def values_key(cfg: TrialConfig, hp: EditHParams, model_id: str) -> ValuesKey:
    vh = {f.name: getattr(hp, f.name) for f in dataclasses.fields(ValueHParams)}
    return ValuesKey(
        model_id,
        cfg.model.dtype,
        traits(cfg.algorithm).value_site,
        hp.layers[-1],
        json.dumps(vh, sort_keys=True, default=str),
        hp.context_templates,
        hp.template_seed,
    )


@dataclass(frozen=True)
class ScoresKey:
    """What a fact's scores on the unedited model depend on besides the fact."""

    model: str
    model_dtype: str
    batch_size: int  # prompts per forward: padding changes float rounding, hence the odd tie
    metrics: str = "sweep.evals.metrics.score_records.v1"


def scores_key(cfg: TrialConfig, model_id: str) -> ScoresKey:
    """The key of a trial's pre-edit scores: its dataset's metric and, under ``scoring.generated``, the
    generation protocol (a row then also holds the unedited model's neighbourhood generations,
    ``gen_ref``, which the edited model's ``gen_ns`` is compared with)."""
    sc = cfg.scoring
    qa = TEACHER_FORCED[cfg.dataset.name] == "token_accuracy"
    metrics = "sweep.evals.metrics.score_qa.v1" if qa else ScoresKey.metrics
    if sc.generated:
        metrics += f"+sweep.evals.generation.wild.v1:{sc.gen_context}:{sc.gen_max_new_tokens}:{sc.gen_batch_size}"
    return ScoresKey(model_id, cfg.model.dtype, sc.batch_size, metrics)


@dataclass(frozen=True)
class PplKey:
    """The unedited model's held-out perplexity: model, corpus content and the slice scored."""

    model: str
    model_dtype: str
    corpus: str
    offset: int
    texts: int
    max_len: int


def ppl_key(cfg: TrialConfig, model_id: str) -> PplKey:
    sc = cfg.scoring
    corpus = corpus_identity(CorpusSpec(cfg.stats.corpus))
    return PplKey(model_id, cfg.model.dtype, corpus, sc.ppl_offset, sc.ppl_texts, sc.ppl_max_len)


@dataclass(frozen=True)
class ProbesKey:
    """The unedited model's capability probes: the model, the tasks, items and batch size, and the
    probe files' content (never their path)."""

    model: str
    model_dtype: str
    tasks: tuple[str, ...]
    items: int
    batch_size: int
    files: str  # a digest of the tasks' files: their sha256, or the authors' md5s when fetched
    protocol: str = "sweep.evals.probes.run_probes.v1"


def probes_key(cfg: TrialConfig, model_id: str) -> ProbesKey:
    from ..evals.probes import files_digest

    sc = cfg.scoring
    files = files_digest(sc.probe_data, sc.probes)
    return ProbesKey(model_id, cfg.model.dtype, tuple(sc.probes), sc.probe_items, sc.gen_batch_size, files)


def _digest(fields: Sequence[Any]) -> str:
    return hashlib.sha256(json.dumps(list(fields), separators=(",", ":")).encode()).hexdigest()[:24]


def request_digest(r: EditRequest) -> str:
    """A fact's identity for its target value: the texts v* is optimised on (prompt, subject, new
    target; the case id is a label, not content)."""
    return _digest([r.prompt, r.subject, r.target_new])


def record_digest(r: Record) -> str:
    """A fact's identity for its scores: every text the metrics read."""
    return _digest(
        [
            r.prompt,
            r.subject,
            r.target_new,
            r.target_true,
            list(r.paraphrase_prompts),
            list(r.neighborhood_prompts),
            r.neighborhood_answer,
            # the fields other datasets add; CounterFact's digests are unchanged (stores stay valid)
            *([r.dataset, list(r.neighborhood_answers), list(r.target_aliases)] if r.dataset != "counterfact" else []),
        ]
    )


# ----------------------------------------------------------------------------------------------------
# Stores


def stats_store(root: str | os.PathLike) -> StatsStore:
    """The statistics store at ``root``: a folder, or a URI backed by a local copy (:mod:`.mirror`)."""
    return StatsStore(*store_location(root))


class ValuesStore:
    """Target values per fact under a :class:`ValuesKey`: one safetensors part per finished chunk;
    ``root`` a folder or a URI (:func:`stats_store`)."""

    def __init__(self, root: str | os.PathLike) -> None:
        folder, remote = store_location(root)
        self.store = Store(folder, VALUES_FORMAT, remote)

    def put(self, key: ValuesKey, digests: Sequence[str], values: torch.Tensor) -> None:
        """Store ``values`` [n, d_model] of the facts ``digests`` as one part (atomic)."""
        if values.ndim != 2 or len(values) != len(digests):
            raise ValueError(f"values: expected [{len(digests)}, d_model], got {list(values.shape)}")
        meta = {"facts": json.dumps(list(digests))}
        self.store.put_tensors(key, {"values": values.float()}, meta, part=part_name(list(digests)))

    def get(
        self, key: ValuesKey, digests: Iterable[str] | None = None, part: str | None = None
    ) -> dict[str, torch.Tensor]:
        """The stored v* [d_model] of each of ``digests`` the store holds (all facts when None), from
        every part of ``key``, or from the one ``part`` (a chunk's own file: one read, not a scan)."""
        want = None if digests is None else set(digests)
        out: dict[str, torch.Tensor] = {}
        parts = self.store.iter_parts(key) if part is None else filter(None, [self.store.get_tensors(key, part)])
        for tensors, meta in parts:
            try:
                facts = json.loads(meta.get("facts", "[]"))
                values = tensors["values"]
            except (json.JSONDecodeError, KeyError):
                continue
            if values.ndim != 2 or len(values) != len(facts) or not bool(torch.isfinite(values).all()):
                _warn_once(
                    f"values:{key_digest(key)}:{facts}",
                    "values store: a part of %d facts has shape %s or non-finite values; they are optimised again",
                    len(facts),
                    list(values.shape),
                )
                continue  # a foreign or malformed part: a miss (Store warns about unreadable ones)
            for d, v in zip(facts, values):
                if want is None or d in want:
                    out[d] = v
        return out


class ScoresStore:
    """Pre-edit scores per fact under a :class:`ScoresKey` (JSON parts), and perplexities by key."""

    def __init__(self, root: str | os.PathLike) -> None:
        folder, remote = store_location(root)
        self.store = Store(folder, SCORES_FORMAT, remote)

    def put_rows(self, key: ScoresKey, digests: Sequence[str], rows: Sequence[dict[str, float]]) -> None:
        """Store the score fields (``RecordScores.fields()``) of the facts ``digests`` as one part."""
        self.store.put_json(key, dict(zip(digests, rows)), part=part_name(list(digests)))

    def get(
        self, key: ScoresKey, digests: Iterable[str] | None = None, part: str | None = None
    ) -> dict[str, dict[str, float]]:
        """Stored score fields (``es ps ns em pm nm *_acc``) of each of ``digests`` held, from every part
        of ``key`` or from the one ``part``."""
        want = None if digests is None else set(digests)
        out: dict[str, dict[str, float]] = {}
        fields = set(RECORD_FIELDS)  # a stored row: RecordScores.fields(), and gen_ref under generation
        parts = self.store.iter_parts(key, ext="json") if part is None else [self.store.get_json(key, part)]
        for rows in parts:
            if not isinstance(rows, dict):
                continue
            for d, r in rows.items():
                if want is not None and d not in want:
                    continue
                if isinstance(r, dict) and _valid_row(r, fields):
                    out[d] = r
                else:  # a malformed row (a hand-edited or foreign file): a miss, scored again
                    _warn_once(f"scores:{d}", "scores store: a malformed row for fact %s; it is scored again", d[:12])
        return out

    def put_ppl(self, key: PplKey, value: float) -> None:
        self.store.put_json(key, {"ppl": float(value)})

    def get_ppl(self, key: PplKey) -> float | None:
        got = self.store.get_json(key)
        return float(got["ppl"]) if isinstance(got, dict) and isinstance(got.get("ppl"), (int, float)) else None

    def put_probes(self, key: ProbesKey, metrics: dict[str, float]) -> None:
        self.store.put_json(key, {"probes": {k: float(v) for k, v in metrics.items()}})

    def get_probes(self, key: ProbesKey) -> dict[str, float] | None:
        got = self.store.get_json(key)
        m = got.get("probes") if isinstance(got, dict) else None
        ok = isinstance(m, dict) and m and all(isinstance(v, (int, float)) for v in m.values())
        return {k: float(v) for k, v in m.items()} if ok else None


def _valid_row(row: dict[str, Any], fields: set[str]) -> bool:
    """A stored score row: ES/PS/NS and any other declared score as numbers, ``gen_ref`` as lists of ids."""
    ref = row.get("gen_ref", [])
    return (
        {"es", "ps", "ns"} <= set(row)
        and set(row) <= fields | {"gen_ref"}
        and all(isinstance(v, (int, float)) for k, v in row.items() if k != "gen_ref")
        and isinstance(ref, list)
        and all(isinstance(g, list) and all(isinstance(i, int) for i in g) for g in ref)
    )


# ----------------------------------------------------------------------------------------------------
# What a trial is handed


@dataclass
class TrialInputs:
    """The shared inputs of one trial, resolved to tensors (what :func:`sweep.stages.run_trial` reads).

    Attributes:
        stats: layer -> C [d_key, d_key] (None: the algorithm needs none, or the trial must compute).
        stats_tokens: layer -> tokens averaged into C.
        values: :func:`request_digest` -> v* [d_model] (batch mode; empty: the schedule optimises).
        pre_scores: :func:`record_digest` -> score fields of the unedited model.
        pre_ppl: the unedited model's held-out perplexity.
        pre_probes: the unedited model's capability probes (``probe_<task>_<metric>``).
        counts: how many of each the trial used (``stats_reused``, ``values_reused``, ``scores_reused``),
            set afresh by each run of :func:`sweep.stages.run_trial`.
    """

    stats: dict[int, torch.Tensor] | None = None
    stats_tokens: dict[int, int] = field(default_factory=dict)
    values: dict[str, torch.Tensor] = field(default_factory=dict)
    pre_scores: dict[str, dict[str, float]] = field(default_factory=dict)
    pre_ppl: float | None = None
    pre_probes: dict[str, float] | None = None
    counts: dict[str, int] = field(default_factory=dict)
    zero_copy: bool | None = None  # the statistics are read-only views of the object store (no per-trial copy)

    def missing(self, cfg: TrialConfig, records: Sequence[Record], needs_stats: bool) -> list[str]:
        """What the trial ``cfg`` on ``records`` needs that these inputs lack (empty: complete)."""

        out = []
        if needs_stats:
            layers = list(cfg.edit_hparams.layers)
            have = set(self.stats or {})
            if not set(layers) <= have:
                out.append(f"statistics of layers {sorted(set(layers) - have)}")
        if cfg.scoring.pre:
            lack = [r.case_id for r in records if record_digest(r) not in self.pre_scores]
            if lack:
                out.append(f"pre-edit scores of {len(lack)} fact(s) (case ids {lack[:5]}...)")
            if cfg.scoring.ppl and self.pre_ppl is None:
                out.append("the unedited perplexity")
            if cfg.scoring.probes and self.pre_probes is None:
                out.append("the unedited model's capability probes")
        return out


@dataclass
class TrialRefs:
    """A trial's shared inputs as object-store references, resolved on its worker by :func:`inputs_of`
    (:func:`sweep.shared.service.obtain`)."""

    stats: dict[int, Any] = field(default_factory=dict)  # layer -> ref of C [d_key, d_key] (numpy)
    stats_tokens: dict[int, int] = field(default_factory=dict)
    values: list[tuple[tuple[str, ...], Any]] = field(default_factory=list)  # (chunk digests, ref [n, d_model])
    scores: list[tuple[tuple[str, ...], Any]] = field(default_factory=list)  # (chunk digests, ref of rows)
    ppl: float | None = None
    probes: dict[str, float] | None = None


def as_tensor(a: Any) -> torch.Tensor:
    """A tensor over ``a`` (a numpy array, maybe a read-only object-store view: nothing writes to it)."""
    if isinstance(a, torch.Tensor):
        return a
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch warns about read-only memory
        return torch.from_numpy(a)


def inputs_of(tr: TrialRefs, get: Callable[[Any], Any]) -> TrialInputs:
    """:class:`TrialInputs` from ``tr``'s handles, ``get`` turning a handle into its value (``ray.get`` on a
    trial's worker; the identity for a fulfilment in this process)."""

    inputs = TrialInputs()
    if tr.stats:
        arrays = {layer: get(h) for layer, h in tr.stats.items()}
        inputs.stats = {layer: (a.mom2 if isinstance(a, SecondMoment) else as_tensor(a)) for layer, a in arrays.items()}
        inputs.stats_tokens = dict(tr.stats_tokens)
        inputs.zero_copy = all(not getattr(a, "flags", None) or not a.flags.writeable for a in arrays.values())
    for ds, h in tr.values:
        arr = get(h)
        inputs.values.update({d: as_tensor(arr[i]) for i, d in enumerate(ds)})
    for ds, h in tr.scores:
        inputs.pre_scores.update(dict(zip(ds, get(h))))
    inputs.pre_ppl = tr.ppl
    inputs.pre_probes = tr.probes
    return inputs


__all__ = [
    "PplKey",
    "ProbesKey",
    "ScoresKey",
    "ScoresStore",
    "TrialInputs",
    "TrialRefs",
    "ValuesKey",
    "ValuesStore",
    "as_tensor",
    "inputs_of",
    "model_identity",
    "ppl_key",
    "probes_key",
    "record_digest",
    "request_digest",
    "scores_key",
    "stats_dtype",
    "stats_keys",
    "values_key",
]
