"""The teacher-forced metrics of every dataset, one scoring path for every algorithm (docs/ALGORITHMS.md
§7, §9), and the entry to the generation-based ones (:mod:`sweep.evals.generation`).

For each prompt, the mean per-token NLL of ``" " + target`` by teacher forcing (memit
``eval_utils_counterfact.py``): the prompt is tokenised with the tokenizer's special tokens (BOS where the
tokenizer adds one), the target without any, and the two id lists are concatenated, so a BOS-adding
tokenizer (Llama-3) scores exactly the target's positions — the pitfall of the unified code that strips
BOS only for Llama-2.

Per record, ×100 after averaging over records:
- ES: mean over rewrite prompts of [P(new) > P(true)]; PS: the same over paraphrases;
  NS: mean over neighbourhood prompts of [P(true) > P(new)];
- EM/PM: mean of exp(−nll_new) − exp(−nll_true) (geometric-mean token probabilities); NM: the reverse;
- ``*_acc``: every target token is the argmax (new target for ES/PS, true answer for NS);
- S: the harmonic mean of ES, PS and NS (``scipy.stats.hmean``);
- ZsRE, QAEdit, WikiBigEdit and UltraEditBench (:func:`score_qa`): ES/PS/NS are token accuracies of
  the target after the question and its paraphrase, and of the unrelated question's own answer (memit
  ``eval_utils_zsre.py``); WikiBigEdit's portability questions give ``port``;
- under ``scoring.generated``, ``gen_es gen_ps gen_ns`` (:func:`generated_scores`) beside them;
- GE: generation entropy, mean over texts of ((2/3)·H₂ + (4/3)·H₃)/2 in bits over word n-grams,
  ×100 (memit ``n_gram_entropy``).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from editors.model import ModelSpec, ModelSpecError, final_hidden, get_module, model_device
from editors.requests import encode, pad_id, pad_right, target_ids
from editors.targets import PrefixCache, cache_kwarg

from .data import Record
from .registry import NAMES, RECORD_FIELDS, TEACHER_FORCED


class _TargetTokens:
    """Accumulates, per (prompt, target) pair, the NLL of its target tokens and how many of them are
    not the argmax, from hidden states at the positions that predict them."""

    def __init__(self, model: nn.Module, spec: ModelSpec, n_pairs: int) -> None:
        self.head = get_module(model, spec.lm_head)
        self.device = model_device(model)
        self.nll = torch.zeros(n_pairs, dtype=torch.float64)
        self.miss = torch.zeros(n_pairs, dtype=torch.long)

    def add(self, hidden: torch.Tensor, targets: list[int], owners: list[int]) -> None:
        """``hidden`` [m, d]: the final-norm states whose logits predict ``targets`` [m] of ``owners``."""
        logits = self.head(hidden).float()
        tgt = torch.tensor(targets, device=self.device)
        tok_nll = -torch.log_softmax(logits, -1).gather(1, tgt[:, None]).squeeze(1).double().cpu()
        hit = (logits.argmax(-1) == tgt).cpu()
        owner = torch.tensor(owners)
        self.nll.index_add_(0, owner, tok_nll)
        self.miss.index_add_(0, owner, (~hit).long())


def target_scores(
    model: nn.Module,
    tok: Any,
    spec: ModelSpec,
    pairs: Sequence[tuple[str, str]],
    *,
    batch_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean per-token NLL of each ``target`` after its ``prompt``, and whether every target token is
    the argmax: ([n] float64, [n] bool). See :func:`target_tokens` for how the forwards are run."""
    nll, miss, lengths = target_tokens(model, tok, spec, pairs, batch_size=batch_size)
    return nll / lengths, miss == 0


def token_accuracy(
    model: nn.Module, tok: Any, spec: ModelSpec, pairs: Sequence[tuple[str, str]], *, batch_size: int = 64
) -> torch.Tensor:
    """The fraction of each ``target``'s tokens that are the argmax after its ``prompt`` and the
    target's earlier tokens (teacher forcing): [n] float64 in [0, 1]. The ZsRE metric of ROME/MEMIT/
    AlphaEdit (memit ``eval_utils_zsre.py``: per token, argmax == the target token; the mean over the
    target's tokens per prompt)."""
    _, miss, lengths = target_tokens(model, tok, spec, pairs, batch_size=batch_size)
    return 1.0 - miss.double() / lengths


@torch.no_grad()
def target_tokens(
    model: nn.Module,
    tok: Any,
    spec: ModelSpec,
    pairs: Sequence[tuple[str, str]],
    *,
    batch_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per ``(prompt, target)`` pair: the summed NLL of the target's tokens, how many of them are not
    the argmax, and how many there are: ([n] float64, [n] long, [n] float64).

    Pairs that share a prompt (CounterFact scores the new and the true object after every prompt) share
    one pass over it: every prompt of a batch runs once, right-padded with no mask (a real token never
    attends to a later pad, so its states are exact), keeping its KV cache; the state at its last token
    predicts the first token of each of its targets. Only targets of two or more tokens run again: one
    row per target of its tokens but the last, on its prompt's cache (the prompt's pads masked), all
    such rows of a batch in one forward. A single-token target therefore costs no forward of its own,
    and the LM head runs only at the target positions. Prompts are batched by length
    (:func:`_length_chunks`), at most ``batch_size`` per forward.
    """
    by_prompt: dict[str, list[int]] = {}
    for i, (prompt, _) in enumerate(pairs):
        by_prompt.setdefault(prompt, []).append(i)
    enc = {p: encode(tok, p)[0] for p in by_prompt}
    if empty := [p for p, ids in enc.items() if not ids]:
        raise ValueError(f"target_scores: prompt {empty[0]!r} encodes to no tokens, so nothing predicts its target")
    tids = [target_ids(tok, t) for _, t in pairs]
    order = sorted(by_prompt, key=lambda p: len(enc[p]))  # similar lengths pad less
    acc = _TargetTokens(model, spec, len(pairs))
    try:
        get_module(model, spec.block_name(spec.n_layers - 1))
        cacheable = True
    except ModelSpecError:  # a model without transformer blocks (the tests' bigram): full rows
        cacheable = False
    for chunk in _length_chunks(order, [len(enc[p]) for p in order], batch_size):
        groups = [by_prompt[p] for p in chunk]
        if cacheable:
            _score_cached(model, tok, spec, [enc[p] for p in chunk], groups, tids, acc)
        else:
            rows = [(j, i) for j, g in enumerate(groups) for i in g]
            _score_full_rows(model, tok, spec, [enc[p] for p in chunk], rows, tids, acc)
    lengths = torch.tensor([len(t) for t in tids], dtype=torch.float64)
    return acc.nll, acc.miss, lengths


BATCH_COST_TOKENS = 80
"""A batch's fixed cost in padded tokens: it runs two forwards (the prompts, then the longer targets'
tokens), each ~60 ms however few its tokens (the weights stream from memory) against ~1.5 ms a token,
measured on SmolLM2-135M on 2 CPU cores (docs/RESULTS.md). Larger models and GPUs only shift it."""


def _length_chunks(items: list[str], lengths: list[int], batch_size: int) -> list[list[str]]:
    """Split ``items`` (sorted by ``lengths``, ascending) into consecutive batches of at most
    ``batch_size`` that minimise the tokens run: Σ over batches of (its longest length × its size +
    :data:`BATCH_COST_TOKENS`), by dynamic programming. Cutting only at the size pads a batch to its
    longest prompt (58% more tokens on CounterFact); cutting at every length runs many tiny forwards."""
    n = len(items)
    best = [0.0] + [float("inf")] * n
    cut = [0] * (n + 1)
    for i in range(1, n + 1):
        for j in range(max(0, i - batch_size), i):
            cost = best[j] + lengths[i - 1] * (i - j) + BATCH_COST_TOKENS
            if cost < best[i]:
                best[i], cut[i] = cost, j
    out: list[list[str]] = []
    i = n
    while i > 0:
        out.append(items[cut[i] : i])
        i = cut[i]
    return out[::-1]


def _score_cached(
    model: nn.Module,
    tok: Any,
    spec: ModelSpec,
    seqs: list[list[int]],
    groups: list[list[int]],
    tids: list[list[int]],
    acc: _TargetTokens,
) -> None:
    """One batch of prompts (``seqs``, each with the pairs ``groups[j]``) by the shared-prompt method."""
    from transformers import DynamicCache

    device = model_device(model)
    ids, _ = pad_right(seqs, pad_id(tok), device)
    cache = DynamicCache()
    hidden = final_hidden(model, spec, input_ids=ids, use_cache=True, **{cache_kwarg(model): cache})
    lengths = torch.tensor([len(q) for q in seqs], device=device)
    last = hidden[torch.arange(len(seqs), device=device), lengths - 1]  # [prompts, d]
    firsts = [(j, i) for j, g in enumerate(groups) for i in g]
    acc.add(last[[j for j, _ in firsts]], [tids[i][0] for _, i in firsts], [i for _, i in firsts])
    rows = [(j, i) for j, i in firsts if len(tids[i]) > 1]
    if not rows:
        return
    prefix = PrefixCache.read(cache, lengths, ids.shape[1])
    if prefix is None:  # pragma: no cover - a cache this transformers does not expose: rows in full
        _score_full_rows(model, tok, spec, seqs, rows, tids, acc, first=1)
        return
    sel = torch.tensor([j for j, _ in rows], device=device)
    plen = prefix.lengths[sel]
    valid = torch.arange(prefix.width, device=device)[None] < plen[:, None]
    step_ids, step_mask = pad_right([tids[i][:-1] for _, i in rows], pad_id(tok), device)
    h = final_hidden(
        model,
        spec,
        input_ids=step_ids,
        attention_mask=torch.cat([valid.long(), step_mask], dim=1),
        position_ids=plen[:, None] + torch.arange(step_ids.shape[1], device=device)[None],
        use_cache=True,
        **{cache_kwarg(model): prefix.cache(sel)},
    )
    r_idx = [r for r, (_, i) in enumerate(rows) for _ in tids[i][1:]]
    pos = [k for _, i in rows for k in range(len(tids[i]) - 1)]
    tgt = [t for _, i in rows for t in tids[i][1:]]
    owner = [i for _, i in rows for _ in tids[i][1:]]
    acc.add(h[torch.tensor(r_idx, device=device), torch.tensor(pos, device=device)], tgt, owner)


def _score_full_rows(
    model: nn.Module,
    tok: Any,
    spec: ModelSpec,
    seqs: list[list[int]],
    rows: list[tuple[int, int]],
    tids: list[list[int]],
    acc: _TargetTokens,
    *,
    first: int = 0,
) -> None:
    """One row per (prompt j, pair i) in ``rows``: the prompt and the target's tokens but the last (a
    model without a KV cache); the target's tokens from index ``first`` on are scored."""
    device = model_device(model)
    ids, mask = pad_right([seqs[j] + tids[i][:-1] for j, i in rows], pad_id(tok), device)
    hidden = final_hidden(model, spec, input_ids=ids, attention_mask=mask)
    r_idx, pos, tgt, owner = [], [], [], []
    for r, (j, i) in enumerate(rows):
        for k, t in enumerate(tids[i]):
            if k < first:
                continue
            r_idx.append(r)
            pos.append(len(seqs[j]) - 1 + k)
            tgt.append(t)
            owner.append(i)
    acc.add(hidden[torch.tensor(r_idx, device=device), torch.tensor(pos, device=device)], tgt, owner)


def hmean(values: Sequence[float]) -> float:
    """Harmonic mean (0 if any value is 0), as ``scipy.stats.hmean``."""
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


@dataclass
class RecordScores:
    """Per-record scores in [0, 1] (magnitudes in [−1, 1]). ``es ps ns`` are every dataset's efficacy,
    generalisation and specificity under teacher forcing (CounterFact: probability comparisons; ZsRE and
    QAEdit: token accuracy); a field is None where the record's dataset or the trial's protocols do not
    define it (the magnitudes and ``*_acc`` are CounterFact's; ``gen_*`` need ``scoring.generated``).
    The fields are :data:`sweep.evals.registry.RECORD_FIELDS`, in order."""

    case_id: int
    es: float
    ps: float
    ns: float
    em: float | None = None
    pm: float | None = None
    nm: float | None = None
    es_acc: float | None = None
    ps_acc: float | None = None
    ns_acc: float | None = None
    gen_es: float | None = None
    gen_ps: float | None = None
    gen_ns: float | None = None
    port: float | None = None

    def fields(self) -> dict[str, float]:
        """The defined scores without the case id (what the pre-edit scores store keeps per fact)."""
        return {m: v for m in RECORD_FIELDS if (v := getattr(self, m)) is not None}


@dataclass(frozen=True)
class GenSettings:
    """The generation-based (WILD) protocol of a trial (``scoring.gen_*``; :mod:`sweep.evals.generation`)."""

    context: str = "bare"
    max_new_tokens: int = 50
    batch_size: int = 32


def gen_settings(scoring: Any) -> GenSettings | None:
    """The generation protocol of a ``ScoringConfig`` (None when ``scoring.generated`` is off)."""
    if not scoring.generated:
        return None
    return GenSettings(scoring.gen_context, scoring.gen_max_new_tokens, scoring.gen_batch_size)


#: a fact's reference generations: the unedited model's token ids on each neighbourhood prompt
Reference = tuple[tuple[int, ...], ...]


def score_records(
    model: nn.Module,
    tok: Any,
    spec: ModelSpec,
    records: Sequence[Record],
    *,
    batch_size: int = 64,
    generated: GenSettings | None = None,
    reference: Sequence[Reference] | None = None,
) -> list[RecordScores]:
    """Score ``records`` (one dataset) on the model as it is: teacher-forced, by the dataset's metric
    (:func:`score_counterfact` or :func:`score_qa`), and with ``generated`` also by greedy generation
    (``gen_*``; ``gen_ns`` against ``reference``, one per record, else left undefined)."""
    if not records:
        return []
    kinds = {r.dataset for r in records}
    if len(kinds) > 1:
        raise ValueError(f"score_records: records of one dataset at a time, got {sorted(kinds)}")
    score = score_counterfact if TEACHER_FORCED[records[0].dataset] == "probability" else score_qa
    out = score(model, tok, spec, records, batch_size=batch_size)
    if generated is not None:
        gen = generated_scores(model, tok, records, generated, reference)
        for s, g in zip(out, gen):
            s.gen_es, s.gen_ps = g.gen_es, g.gen_ps
            s.gen_ns = None if reference is None else g.gen_ns
    return out


def generated_scores(
    model: nn.Module, tok: Any, records: Sequence[Record], gs: GenSettings, reference: Sequence[Reference] | None
) -> list[Any]:
    """:func:`sweep.evals.generation.generated_scores` of ``records`` (the target and its aliases accepted)."""
    from .generation import GenFact
    from .generation import generated_scores as wild

    facts = [
        GenFact(
            rewrite=r.rewrite_prompt,
            paraphrases=r.paraphrase_prompts,
            neighbourhood=tuple(p for p, _ in r.neighbourhood_pairs()),
            answers=(r.target_new, *r.target_aliases),
        )
        for r in records
    ]
    return wild(
        model,
        tok,
        facts,
        context=gs.context,
        max_new_tokens=gs.max_new_tokens,
        batch_size=gs.batch_size,
        reference=reference,
    )


def score_counterfact(
    model: nn.Module, tok: Any, spec: ModelSpec, records: Sequence[Record], *, batch_size: int = 64
) -> list[RecordScores]:
    """CounterFact: every record's rewrite, paraphrase and neighbourhood prompts in batched forwards."""
    pairs: list[tuple[str, str]] = []
    slots: list[tuple[int, str, int]] = []  # (record, kind, n prompts)
    for i, r in enumerate(records):
        for kind, prompts, answer in (
            ("rw", (r.rewrite_prompt,), r.target_true),
            ("pp", r.paraphrase_prompts, r.target_true),
            ("nb", r.neighborhood_prompts, r.neighborhood_answer),
        ):
            for p in prompts:
                pairs += [(p, r.target_new), (p, answer)]
            slots.append((i, kind, len(prompts)))
    nll, acc = target_scores(model, tok, spec, pairs, batch_size=batch_size)
    new_nll, true_nll = nll[0::2], nll[1::2]
    new_acc, true_acc = acc[0::2], acc[1::2]
    out: dict[int, dict[str, float]] = {i: {} for i in range(len(records))}
    at = 0
    for i, kind, n in slots:
        sl = slice(at, at + n)
        at += n
        nn_, tn = new_nll[sl], true_nll[sl]
        p_new, p_true = torch.exp(-nn_), torch.exp(-tn)
        if kind == "nb":
            out[i]["ns"] = float((tn < nn_).double().mean())
            out[i]["nm"] = float((p_true - p_new).mean())
            out[i]["ns_acc"] = float(true_acc[sl].double().mean())
        else:
            key = "es" if kind == "rw" else "ps"
            out[i][key] = float((nn_ < tn).double().mean())
            out[i][key[0] + "m"] = float((p_new - p_true).mean())
            out[i][key + "_acc"] = float(new_acc[sl].double().mean())
    return [RecordScores(case_id=records[i].case_id, **out[i]) for i in range(len(records))]


def score_qa(
    model: nn.Module, tok: Any, spec: ModelSpec, records: Sequence[Record], *, batch_size: int = 64
) -> list[RecordScores]:
    """The question-answering benchmarks as ROME/MEMIT/AlphaEdit score ZsRE (memit ``eval_utils_zsre.py``;
    UltraEdit's ``succ_ratios`` is the same measure): per record, the token accuracy
    (:func:`token_accuracy`) of the new target after the rewrite question (ES), after its paraphrases
    (PS, their mean) and of each neighbourhood question's own answer (NS, their mean: accuracy against
    the dataset's answer, not agreement with the unedited model); WikiBigEdit's portability questions
    the same way against their answers (``port``, their mean; None for a record without any)."""
    pairs: list[tuple[str, str]] = []
    spans: list[tuple[int, int, int]] = []  # per record: paraphrase, neighbourhood, portability counts
    for r in records:
        nb = r.neighbourhood_pairs()
        pairs += [(p, r.target_new) for p in (r.rewrite_prompt, *r.paraphrase_prompts)] + list(nb)
        pairs += list(r.portability)
        spans.append((len(r.paraphrase_prompts), len(nb), len(r.portability)))
    acc = token_accuracy(model, tok, spec, pairs, batch_size=batch_size).tolist()
    out, at = [], 0
    for r, (n_pp, n_nb, n_port) in zip(records, spans):
        part = acc[at : at + 1 + n_pp + n_nb + n_port]
        at += len(part)
        pp, nb, port = part[1 : 1 + n_pp], part[1 + n_pp : 1 + n_pp + n_nb], part[1 + n_pp + n_nb :]
        out.append(
            RecordScores(case_id=r.case_id, es=part[0], ps=_mean(pp), ns=_mean(nb), port=_mean(port) if port else None)
        )
    return out


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def aggregate(scores: Sequence[RecordScores]) -> dict[str, float]:
    """Means over records ×100 of every score all records define, plus S = hmean(ES, PS, NS) and, under
    generation, gen_S = hmean(gen_ES, gen_PS, gen_NS) (nan where a part is undefined)."""
    if not scores:
        return {}
    agg = {
        m: 100.0 * sum(getattr(s, m) for s in scores) / len(scores)
        for m in RECORD_FIELDS
        if all(getattr(s, m) is not None for s in scores)
    }
    agg["s"] = hmean([agg["es"], agg["ps"], agg["ns"]])
    if all(m in agg for m in ("gen_es", "gen_ps", "gen_ns")):
        agg["gen_s"] = hmean([agg["gen_es"], agg["gen_ps"], agg["gen_ns"]])
    return {m: agg[m] for m in NAMES if m in agg}


# ----------------------------------------------------------------------------------------------------
# Generation entropy and perplexity


def _words(text: str) -> list[str]:
    from nltk.tokenize import TreebankWordTokenizer  # punkt-free, so it works offline

    return TreebankWordTokenizer().tokenize(text)


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """memit ``compute_n_gram_entropy``: arithmetic mean of weight_n · H_n (bits) over n-grams of words."""
    words = _words(text)
    parts = []
    for n, w in zip(ns, weights):
        grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        total = sum(grams.values())
        h = -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0
        parts.append(w * h)
    return sum(parts) / len(parts)


@torch.no_grad()
def generation_entropy(
    model: nn.Module,
    tok: Any,
    prompts: Sequence[str],
    *,
    max_len: int = 100,
    strip_prompt: bool = True,
    seed: int = 0,
) -> float:
    """GE ×100: top-k (k = 5) samples of at most ``max_len`` tokens (prompt included, as the reference's
    ``generate_fast``), entropy of each text (without the prompt if ``strip_prompt``, as the unified
    code does), averaged."""
    from editors.templates import generate_texts

    if not prompts:
        return float("nan")
    vals = []
    for i, p in enumerate(prompts):
        (text,) = generate_texts(model, tok, [p], 1, max_len, seed + i)
        if strip_prompt and text.startswith(p):
            text = text[len(p) :]
        vals.append(ngram_entropy(text))
    return 100.0 * sum(vals) / len(vals)


@torch.no_grad()
def perplexity(model: nn.Module, tok: Any, spec: ModelSpec, texts: Sequence[str], *, max_len: int = 256) -> float:
    """exp(mean NLL) over every predicted token of ``texts`` (each truncated to ``max_len`` tokens)."""
    device = model_device(model)
    total, count = 0.0, 0
    lm_head = get_module(model, spec.lm_head)
    for text in texts:
        ids = tok(text, truncation=True, max_length=max_len)["input_ids"]
        if len(ids) < 2:
            continue
        x = torch.tensor([ids], device=device)
        logp = torch.log_softmax(lm_head(final_hidden(model, spec, input_ids=x)[0, :-1]).float(), -1)
        total += float(-logp.gather(1, x[0, 1:, None]).sum())
        count += len(ids) - 1
    return math.exp(total / count) if count else float("nan")


def heldout_perplexity(
    model: nn.Module, tok: Any, spec: ModelSpec, corpus: str, offset: int, n_texts: int, max_len: int
) -> float:
    """:func:`perplexity` on texts ``offset .. offset + n_texts`` of ``corpus`` (the statistics read the
    first texts, so a slice further on is held out)."""
    from editors.corpus import CorpusSpec, iter_texts

    texts = [x for i, x in zip(range(offset + n_texts), iter_texts(CorpusSpec(corpus))) if i >= offset]
    return perplexity(model, tok, spec, texts, max_len=max_len)
