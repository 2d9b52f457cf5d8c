"""CounterFact metrics: one scoring path for every algorithm (docs/ALGORITHMS.md §7).

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

from editors.model import ModelSpec, ModelSpecError, get_module, hooks, model_device, run_until
from editors.requests import encode, pad_id, pad_right, target_ids
from editors.targets import cache_kwarg, prefix_cache

from .data import Record

METRICS = ("es", "ps", "ns", "s", "em", "pm", "nm", "es_acc", "ps_acc", "ns_acc")


@torch.no_grad()
def target_scores(
    model: nn.Module,
    tok: Any,
    spec: ModelSpec,
    pairs: Sequence[tuple[str, str]],
    *,
    batch_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean per-token NLL of each ``target`` after its ``prompt``, and whether every target token is
    the argmax: ([n] float64, [n] bool).

    Pairs that share a prompt (CounterFact scores the new and the true object after every prompt) share
    one pass over it: the prompt's tokens but its last run once per prompt into a KV cache
    (:func:`editors.targets.prefix_cache`: right-padded, no mask, so exact), then one row per target
    runs the prompt's last token and the target's tokens but its last, all rows of a batch padded
    together; the logit at each step predicts the next target token. The LM head runs only at the
    target positions. ``batch_size`` counts prompts per forward.
    """
    device = model_device(model)
    pad = pad_id(tok)
    by_prompt: dict[str, list[int]] = {}
    for i, (prompt, _) in enumerate(pairs):
        by_prompt.setdefault(prompt, []).append(i)
    enc = {p: encode(tok, p)[0] for p in by_prompt}
    tids = [target_ids(tok, t) for _, t in pairs]
    order = sorted(by_prompt, key=lambda p: len(enc[p]))  # similar lengths pad less
    nll = torch.zeros(len(pairs), dtype=torch.float64)
    acc = torch.zeros(len(pairs), dtype=torch.bool)
    lm_head = get_module(model, spec.lm_head)
    last_block = spec.block_name(spec.n_layers - 1)
    try:
        get_module(model, last_block)
        cacheable = True
    except ModelSpecError:  # a model without transformer blocks (the tests' bigram): full rows
        cacheable = False
    for s in range(0, len(order), batch_size):
        chunk = order[s : s + batch_size]
        seqs = [enc[p] for p in chunk]
        lookup = [len(q) - 1 for q in seqs]
        prefix = prefix_cache(model, spec, seqs, lookup, pad, last_block) if cacheable else None
        start = [len(q) - 1 for q in seqs] if prefix is not None else [0] * len(seqs)
        row_prompt, row_pair, steps = [], [], []
        for j, p in enumerate(chunk):
            for i in by_prompt[p]:
                row_prompt.append(j)
                row_pair.append(i)
                steps.append(seqs[j][start[j] :] + tids[i][:-1])
        ids, mask = pad_right(steps, pad, device)
        batch: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        if prefix is not None:
            rows = torch.tensor(row_prompt, device=device)
            plen = prefix.lengths[rows]
            valid = torch.arange(prefix.width, device=device)[None] < plen[:, None]
            batch.update(
                attention_mask=torch.cat([valid.long(), mask], dim=1),
                position_ids=plen[:, None] + torch.arange(ids.shape[1], device=device)[None],
                use_cache=True,
            )
            batch[cache_kwarg(model)] = prefix.cache(rows)
        with hooks(model, outputs=[spec.final_norm], stop_after=spec.final_norm) as st:
            run_until(model, **batch)
        hidden = st[f"out:{spec.final_norm}"]
        r_idx, pos, tgt, owner = [], [], [], []
        for r, (j, i) in enumerate(zip(row_prompt, row_pair)):
            first = len(seqs[j]) - 1 - start[j]  # the step whose logit predicts the first target token
            for k, t in enumerate(tids[i]):
                r_idx.append(r)
                pos.append(first + k)
                tgt.append(t)
                owner.append(i)
        logits = lm_head(hidden[torch.tensor(r_idx, device=device), torch.tensor(pos, device=device)]).float()
        logp = torch.log_softmax(logits, -1)
        tgt_t = torch.tensor(tgt, device=device)
        tok_nll = -logp.gather(1, tgt_t[:, None]).squeeze(1).double().cpu()
        hit = (logits.argmax(-1) == tgt_t).cpu()
        owner_t = torch.tensor(owner)
        nll.index_add_(0, owner_t, tok_nll)
        miss = torch.zeros(len(pairs), dtype=torch.long).index_add_(0, owner_t, (~hit).long())
        acc[row_pair] = miss[row_pair] == 0
    lengths = torch.tensor([len(t) for t in tids], dtype=torch.float64)
    return nll / lengths, acc


def hmean(values: Sequence[float]) -> float:
    """Harmonic mean (0 if any value is 0), as ``scipy.stats.hmean``."""
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


@dataclass
class RecordScores:
    """Per-record scores in [0, 1] (magnitudes in [−1, 1])."""

    case_id: int
    es: float
    ps: float
    ns: float
    em: float
    pm: float
    nm: float
    es_acc: float
    ps_acc: float
    ns_acc: float

    def fields(self) -> dict[str, float]:
        """The scores without the case id (what the pre-edit scores store keeps per fact)."""
        return {m: getattr(self, m) for m in METRICS if m != "s"}


def score_records(
    model: nn.Module, tok: Any, spec: ModelSpec, records: Sequence[Record], *, batch_size: int = 64
) -> list[RecordScores]:
    """Score every record's rewrite, paraphrase and neighbourhood prompts in batched forwards."""
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


def aggregate(scores: Sequence[RecordScores]) -> dict[str, float]:
    """Means over records ×100, plus S = hmean(ES, PS, NS)."""
    if not scores:
        return {}
    agg = {m: 100.0 * sum(getattr(s, m) for s in scores) / len(scores) for m in METRICS if m != "s"}
    agg["s"] = hmean([agg["es"], agg["ps"], agg["ns"]])
    return {m: agg[m] for m in METRICS}


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
        with hooks(model, outputs=[spec.final_norm], stop_after=spec.final_norm) as st:
            run_until(model, input_ids=x)
        logp = torch.log_softmax(lm_head(st[f"out:{spec.final_norm}"][0, :-1]).float(), -1)
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
