"""AlphaEdit's general-capability probes (``glue_eval``), run exactly as the authors run them.

Source: ``jianghoucheng/AlphaEdit`` at :data:`COMMIT`, ``glue_eval/*_eval.py`` (copied from
scalable-model-editing/unified-model-editing); the procedure is written out in docs/ALGORITHMS.md §9,
and every template string, label word and parse rule is held here as constants (:data:`TASKS`; a test
checks them against the authors' strings as the test data records them). AlphaEdit runs six tasks
(:data:`ENABLED`) before the first edit and after every ``downstream_eval_steps`` batches;
sentiment_analysis and dialogue exist but are off.

Per task (0 shots, the test items records[10:110] of the file, ``gen_len`` 5):

- prompt: the task's question template filled with the record (no few-shot prefix at 0 shots).
- generation prediction: the prompt's ids (``tok(prompt)``: BOS where the tokenizer adds one), ``gen_len``
  greedy new tokens (an EOS of the model's generation config ends them, as ``model.generate`` does for one
  sequence), the whole sequence decoded with ``skip_special_tokens=True``; binary tasks parse the text
  after the last marker (``"Sentiment :"``, ``"Answer:"`` ...), MMLU/dialogue the decoded text with the
  decoded prompt removed (``str.replace``); lower-cased substring rules in the listed order (RTE tests
  "false" before "true", CoLA's "no" also matches "not"), −1 when none matches.
- likelihood prediction: per label word w, the mean NLL of the ids of ``" " + w`` (no BOS) read from the
  logits of ``tok(prompt + " " + w)`` at positions ``len(tok(prompt)) − 1 + j``; p(w) = exp(−NLL).
  Binary: the first word's class if p(first) > p(second), else the second's; 4-way: the strict arg-max,
  −1 on a tie.
- metrics (:func:`task_metrics`): ``f1`` = sklearn's *weighted* F1 of the generation predictions (−1
  kept as a class), ``mcc`` = Matthews correlation (sklearn's multi-class form), ``acc`` = correct /
  total, ``invalid`` = the share of −1; the same for the likelihood predictions as ``lik_*`` (the
  authors' ``f1_new`` is ``lik_f1``).

AlphaEdit's paper plots F1 per task (SST, MRPC, CoLA, RTE, MMLU, NLI): the generation-based ``f1``
(:meth:`ProbeResult.metrics`: ``probe_<task>_f1``).

Where this differs from the authors' loop, on purpose (identical for every model they ran: GPT-2 XL,
GPT-J, Llama-3-8B-Instruct): the prompts of all tasks are generated together in batches on the KV cache
(:func:`sweep.evals.generation.greedy_generate`), and the prefill the generation continues from also
scores every single-token label word that follows the prompt's ids (:func:`predict`); other words are
scored in batches (:func:`sweep.evals.metrics.target_scores` where ``tok(prompt + " " + w)`` is the
prompt's ids followed by the word's, else the joint row as they run it), so a near-tie may fall the
other way by rounding; the label word's BOS is dropped for any
tokenizer that adds one (they test ``"llama" in the model name``); the model-name table of context
lengths is read only when few-shot prompts need it (they look it up, and fail on other names, always).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import math
import os
import pickle
import sys
import time
import urllib.request
import weakref
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from editors.model import final_hidden, get_module, model_device, spec_for
from editors.requests import pad_id, pad_right, target_ids

from .generation import eos_ids

log = logging.getLogger(__name__)

#: the AlphaEdit commit the protocol and the pickles come from
COMMIT = "f5248d3d25f1b3863bff19c387293d635866079f"
#: new tokens per generation (AlphaEdit's ``GLUEEval.evaluate`` default; unified-model-editing: 3)
GEN_LEN = 5
#: records[0:10] of every file are the few-shot pool; the test items start after them
FEW_SHOT_POOL = 10
#: test items per task (``GLUEEval(..., number_of_tests=100)``)
N_ITEMS = 100
#: the tasks AlphaEdit turns on, in the order it runs them
ENABLED = ("sst2", "mmlu", "mrpc", "cola", "rte", "nli")
#: the authors' context lengths by the lower-cased last path part of ``model.config._name_or_path``
#: (read only to budget few-shot prompts)
MAX_CONTEXT = {
    "gpt2-xl": 1024,
    "llama-2-7b-hf": 4096,
    "llama3-8b-instruct": 4096,
    "eleutherai_gpt-j-6b": 2048,
    "gpt2-large": 1024,
    "gpt2-medium": 1024,
}


class ProbeDataError(ValueError):
    """A probe file or pickle cannot be used; the message names the file, the line and the field."""


# ----------------------------------------------------------------------------------------------------
# The tasks


@dataclass(frozen=True)
class ProbeTask:
    """One probe task, as the authors define it (``protocol.json``'s strings).

    Attributes:
        name: the task's name (AlphaEdit stores MMLU's result under ``mmmlu``; here it is ``mmlu``).
        file: the JSON-lines file in the data folder.
        question: the prompt, a ``str.format`` template over the record's fields (lists expand to
            ``choice0..3`` / ``option0..3``).
        few_shot: one shot's text (the same fields plus ``label_word``).
        label_words: (class, word) pairs: the word a few-shot answer shows for each class.
        scored_words: the words whose probabilities the likelihood prediction compares, in order.
        marker: the generation is parsed after the last occurrence of this text in the decoded output;
            None: the decoded output with the decoded prompt removed (MMLU, dialogue).
        parse_rules: (substring, class) tested in order on the lower-cased parse region.
        schema: (field, kind) of every record field used; kinds in :data:`_KINDS`.
        gold: (field, how): the gold class is that field read as ``int``, ``entailment`` (1 iff
            "entailment"), ``int_str`` (``int("1")``) or ``letter`` (A-D -> 0-3).
        min_budget: few-shot prompts stop adding shots when the token budget falls below this.
    """

    name: str
    file: str
    question: str
    few_shot: str
    label_words: tuple[tuple[int, str], ...]
    scored_words: tuple[str, ...]
    marker: str | None
    parse_rules: tuple[tuple[str, int], ...]
    schema: tuple[tuple[str, str], ...]
    gold: tuple[str, str]
    min_budget: int = 0

    def word_class(self, word: str) -> int:
        """The class a label word stands for."""
        return next(c for c, w in self.label_words if w == word)


_BINARY_POS_NEG = ((1, "positive"), (0, "negative"))
_YES_NO = ((1, "Yes"), (0, "No"))
_TRUE_FALSE = ((1, "True"), (0, "False"))
_LETTERS = ((0, "A"), (1, "B"), (2, "C"), (3, "D"))
_LETTER_RULES = (("a\n", 0), ("b\n", 1), ("c\n", 2), ("d\n", 3))

TASKS: dict[str, ProbeTask] = {
    t.name: t
    for t in (
        ProbeTask(
            "sst2", "sst2.jsonl", "Review :{sentence}\nSentiment :",
            "Review : {sentence}\nSentiment : {label_word}\n", _BINARY_POS_NEG, ("positive", "negative"),
            "Sentiment :", (("positive", 1), ("negative", 0)),
            (("sentence", "text"), ("label", "label01")), ("label", "int"),
        ),
        ProbeTask(
            "mrpc", "mrpc.jsonl",
            "Are the sentences paraphrases of each other.\nSentence 1: {sentence1}\nSentence 2: {sentence2}\nAnswer:",
            "Are the sentences paraphrases of each other.\nSentence 1: {sentence1}\nSentence 2: {sentence2}\n"
            "Answer: {label_word}\n",
            _YES_NO, ("Yes", "No"), "Answer:", (("yes", 1), ("no", 0)),
            (("sentence1", "text"), ("sentence2", "text"), ("label", "label01")), ("label", "int"),
        ),
        ProbeTask(
            "cola", "cola.jsonl", "Is this sentence linguistically acceptable?\nSentence: {sentence}\nAnswer: ",
            "Is this sentence linguistically acceptable?\nSentence: {sentence}\nAnswer: {label_word}\n",
            _YES_NO, ("Yes", "No"), "Answer:", (("yes", 1), ("no", 0)),
            (("sentence", "text"), ("label", "label01")), ("label", "int"),
        ),
        ProbeTask(  # "True" is class 1, which in GLUE's RTE means not_entailment: the authors' inversion
            "rte", "rte.jsonl", "{sentence1}\nquestion: {sentence2} True or False?\nanswer:",
            "{sentence1}\nquestion: {sentence2} True or False?\nanswer: {label_word}\n",
            _TRUE_FALSE, ("True", "False"), "answer:", (("false", 0), ("true", 1)),
            (("sentence1", "text"), ("sentence2", "text"), ("label", "label01")), ("label", "int"),
        ),
        ProbeTask(
            "nli", "nli.jsonl", "{sentence1} entails the {sentence2} True or False? Answer:",
            "{sentence1} entails the {sentence2} True or False? Answer: {label_word}\n",
            _TRUE_FALSE, ("True", "False"), "True or False? Answer:", (("true", 1), ("false", 0)),
            (("sentence1", "text"), ("sentence2", "text"), ("label", "entail")), ("label", "entailment"),
        ),
        ProbeTask(
            "mmlu", "mmlu.jsonl",
            "Question: {question}\n(A) {choice0}\n(B) {choice1}\n(C) {choice2}\n(D) {choice3}\nAnswer:",
            "Question: {question}\n(A) {choice0}\n(B) {choice1}\n(C) {choice2}\n(D) {choice3}\n"
            "Answer: {label_word}\n",
            _LETTERS, ("A", "B", "C", "D"), None, _LETTER_RULES,
            (("question", "text"), ("choices", "list4"), ("answer", "answer4")), ("answer", "int"),
        ),
        ProbeTask(
            "sentiment_analysis", "sentiment_analysis.jsonl",
            "For each snippet of text,label the sentiment of the text as positive or negative.The answer should "
            "be exact 'positive' or 'negative'. text: {sentence} answer:",
            "For each snippet of text,label the sentiment of the text as positive or negative.The answer should "
            "be exact 'positive' or 'negative'. text: {sentence} answer: {label_word}\n",
            _BINARY_POS_NEG, ("positive", "negative"), "answer:", (("positive", 1), ("negative", 0)),
            (("sentence", "text"), ("label", "label01_str")), ("label", "int_str"),
        ),
        ProbeTask(
            "dialogue", "dialogue.jsonl",
            "Q: Given the following: {article}\nWhich choice is correct?\n(A){option0}\n(B){option1}\n"
            "(C){option2}\n(D){option3}\nAnswer:",
            "Q: Given the following: {article}\nWhich choice is correct?\n(A){option0}\n(B){option1}\n"
            "(C){option2}\n(D){option3}\nAnswer: {answers}\n\n",
            _LETTERS, ("A", "B", "C", "D"), None, _LETTER_RULES,
            (("article", "text"), ("options", "list4"), ("answers", "letter")), ("answers", "letter"),
            min_budget=5,
        ),
    )
}  # fmt: skip

#: the record field kinds: a check and what it expects
_KINDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "text": (lambda v: isinstance(v, str), "a string"),
    "label01": (lambda v: type(v) is int and v in (0, 1), "the integer 0 or 1"),
    "answer4": (lambda v: type(v) is int and 0 <= v <= 3, "an integer 0-3"),
    "list4": (lambda v: isinstance(v, list) and len(v) == 4 and all(isinstance(x, str) for x in v), "4 strings"),
    "entail": (lambda v: v in ("entailment", "not_entailment"), '"entailment" or "not_entailment"'),
    "label01_str": (lambda v: v in ("0", "1"), 'the string "0" or "1"'),
    "letter": (lambda v: v in ("A", "B", "C", "D"), "a letter A-D"),
}


def task_of(name: str) -> ProbeTask:
    """The task called ``name``; an unknown name lists the known ones."""
    if name not in TASKS:
        raise ValueError(f"probes: unknown task {name!r} (known: {', '.join(TASKS)})")
    return TASKS[name]


# ----------------------------------------------------------------------------------------------------
# Items


@dataclass(frozen=True)
class ProbeItem:
    """One record of a probe file.

    Attributes:
        task: the task's name.
        line: the record's line in its file (1-based; the test items are lines 11-110).
        fields: (name, text) of the template fields the record fills (``choices`` -> ``choice0..3``).
        gold: the gold class (0/1, or 0-3 for MMLU and dialogue).
    """

    task: str
    line: int
    fields: tuple[tuple[str, str], ...]
    gold: int

    def fill(self, template: str, **extra: str) -> str:
        """``template`` with this record's fields (and ``extra``) substituted."""
        return template.format(**dict(self.fields), **extra)


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file (one object a line; a bad line names the file and line)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for n, text in enumerate(f, start=1):
            try:
                rec = json.loads(text)
            except json.JSONDecodeError as e:
                raise ProbeDataError(f"{path}:{n}: not a JSON line ({e.msg})") from None
            if not isinstance(rec, dict):
                raise ProbeDataError(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}")
            out.append(rec)
    return out


def item_of(task: ProbeTask, path: Path, line: int, rec: Mapping[str, Any]) -> ProbeItem:
    """Validate one record against the task's schema and read its template fields and gold class."""
    fields: list[tuple[str, str]] = []
    for name, kind in task.schema:
        if name not in rec:
            raise ProbeDataError(f"{path}:{line}: field {name!r} is missing (have {sorted(rec)})")
        ok, want = _KINDS[kind]
        if not ok(rec[name]):
            raise ProbeDataError(f"{path}:{line}: field {name!r}: expected {want}, got {rec[name]!r:.80}")
        if isinstance(rec[name], list):
            fields += [(f"{name.rstrip('s')}{i}", x) for i, x in enumerate(rec[name])]
        elif isinstance(rec[name], str):
            fields.append((name, rec[name]))
    key, how = task.gold
    return ProbeItem(task.name, line, tuple(fields), _gold(how, rec[key]))


def _gold(how: str, value: Any) -> int:
    """The gold class of a validated label field read as ``how`` (see :attr:`ProbeTask.gold`)."""
    if how == "entailment":
        return int(value == "entailment")
    if how == "int_str":
        return int(value)
    if how == "letter":
        return "ABCD".index(value)
    return int(value)


def load_all(folder: str | Path, task: str) -> list[ProbeItem]:
    """Every record of ``<folder>/<task file>``, validated (never a pickle: JSON lines only)."""
    t = task_of(task)
    path = Path(folder) / t.file
    if not path.is_file():
        raise ProbeDataError(f"{path}: no such probe file (python -m sweep.evals.probes fetch --out {folder} makes it)")
    return [item_of(t, path, n, r) for n, r in enumerate(read_records(path), start=1)]


def load_items(folder: str | Path, task: str, n_items: int = N_ITEMS) -> list[ProbeItem]:
    """The authors' test items: records[10 : 10 + n_items] in file order (``load_data_split``)."""
    items = load_all(folder, task)
    have = len(items) - FEW_SHOT_POOL
    if not 0 < n_items <= have:
        raise ValueError(f"probes: n_items must be 1-{have} for {task}, got {n_items}")
    return items[FEW_SHOT_POOL : FEW_SHOT_POOL + n_items]


def load_shots(folder: str | Path, task: str, n_shots: int) -> list[ProbeItem]:
    """The first ``n_shots`` of the few-shot pool records[0:10]."""
    if not 0 <= n_shots <= FEW_SHOT_POOL:
        raise ValueError(f"probes: n_shots must be 0-{FEW_SHOT_POOL}, got {n_shots}")
    return load_all(folder, task)[:n_shots] if n_shots else []


# ----------------------------------------------------------------------------------------------------
# Prompts and parsing


def question(task: ProbeTask, item: ProbeItem) -> str:
    """The bare question: the whole prompt at 0 shots (AlphaEdit's setting)."""
    return item.fill(task.question)


def build_prompt(
    tok: Any,
    task: ProbeTask,
    item: ProbeItem,
    shots: Sequence[ProbeItem] = (),
    *,
    max_context: int | None = None,
    gen_len: int = GEN_LEN,
) -> str:
    """The prompt of ``item``: the question after as many shots as fit (the authors' ``_create_prompt``).

    Budget = ``max_context`` − len(tok(question)) − ``gen_len``; each shot's token count is taken off
    before the check, and the first shot that brings the budget below ``task.min_budget`` (0; dialogue 5)
    ends the prefix. The question itself is never truncated.
    """
    q = question(task, item)
    if not shots:
        return q
    if max_context is None:
        raise ValueError("probes: few-shot prompts need max_context (see MAX_CONTEXT / context_length)")
    budget = max_context - len(tok(q)["input_ids"]) - gen_len
    prefix = ""
    for s in shots:
        text = s.fill(task.few_shot, label_word=dict(task.label_words)[s.gold])
        budget -= len(tok(text)["input_ids"])
        if budget < task.min_budget:
            break
        prefix += text
    return prefix + q


def context_length(model: nn.Module) -> int:
    """The authors' context length of ``model`` (:data:`MAX_CONTEXT`, by the last part of its name)."""
    name = str(getattr(model.config, "_name_or_path", "")).lower().split("/")[-1]
    if name not in MAX_CONTEXT:
        raise ValueError(f"probes: no context length for model {name!r} (the authors know {sorted(MAX_CONTEXT)})")
    return MAX_CONTEXT[name]


def parse_answer(task: ProbeTask, decoded: str, prompt_text: str) -> int:
    """The class a generation names, or −1 (the authors' ``_get_answer``).

    Args:
        decoded: the decoded prompt + generation (``skip_special_tokens=True``).
        prompt_text: the decoded prompt, which MMLU/dialogue remove from ``decoded`` (``str.replace``).
    """
    if task.marker is not None:
        region = decoded.split(task.marker)[-1].strip()
    else:
        region = decoded.replace(prompt_text, "")
    low = region.lower()
    return next((cls for sub, cls in task.parse_rules if sub in low), -1)


def likelihood_prediction(task: ProbeTask, probs: Sequence[float]) -> int:
    """The class the label words' probabilities (in ``task.scored_words`` order) pick: binary, the first
    word's class if its p is larger, else the second's; more words, the strict arg-max, −1 on a tie."""
    cls = [task.word_class(w) for w in task.scored_words]
    if len(probs) == 2:
        return cls[0] if probs[0] > probs[1] else cls[1]
    for k, p in enumerate(probs):
        if p > max(q for j, q in enumerate(probs) if j != k):
            return cls[k]
    return -1


# ----------------------------------------------------------------------------------------------------
# Metrics (sklearn's formulas)


def accuracy(gold: Sequence[int], pred: Sequence[int]) -> float:
    """Share of items predicted right (−1 is wrong)."""
    return sum(g == p for g, p in zip(gold, pred)) / len(gold) if gold else math.nan


def f1_binary(gold: Sequence[int], pred: Sequence[int], positive: int = 1) -> float:
    """F1 of class ``positive``: 2·tp / (2·tp + fp + fn), 0 when that is 0/0 (sklearn's zero_division)."""
    tp = sum(g == positive and p == positive for g, p in zip(gold, pred))
    fp = sum(g != positive and p == positive for g, p in zip(gold, pred))
    fn = sum(g == positive and p != positive for g, p in zip(gold, pred))
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def f1_weighted(gold: Sequence[int], pred: Sequence[int]) -> float:
    """sklearn ``f1_score(average="weighted")``: per-class F1 over every class in ``gold`` or ``pred``
    (−1 included), weighted by the class's count in ``gold``."""
    if not gold:
        return math.nan
    support = Counter(gold)
    return sum(support[c] * f1_binary(gold, pred, c) for c in set(gold) | set(pred)) / len(gold)


def mcc(gold: Sequence[int], pred: Sequence[int]) -> float:
    """sklearn ``matthews_corrcoef`` (the multi-class form; binary: (tp·tn − fp·fn)/√(…)); 0 when a
    marginal is constant."""
    n = len(gold)
    if not n:
        return math.nan
    t, p = Counter(gold), Counter(pred)
    correct = sum(g == q for g, q in zip(gold, pred))
    cov_tp = correct * n - sum(t[c] * p[c] for c in t)
    cov_pp = n * n - sum(v * v for v in p.values())
    cov_tt = n * n - sum(v * v for v in t.values())
    return cov_tp / math.sqrt(cov_tt * cov_pp) if cov_tt * cov_pp else 0.0


def task_metrics(gold: Sequence[int], generated: Sequence[int], likelihood: Sequence[int]) -> dict[str, float]:
    """The authors' scores of one task, as fractions: ``f1``/``mcc``/``acc``/``invalid`` of the
    generation predictions and ``lik_f1``/``lik_mcc``/``lik_acc`` of the likelihood ones."""
    return {
        "f1": f1_weighted(gold, generated),
        "mcc": mcc(gold, generated),
        "acc": accuracy(gold, generated),
        "invalid": sum(p == -1 for p in generated) / len(gold),
        "lik_f1": f1_weighted(gold, likelihood),
        "lik_mcc": mcc(gold, likelihood),
        "lik_acc": accuracy(gold, likelihood),
    }


# ----------------------------------------------------------------------------------------------------
# Encoding (once per tokenizer)


@dataclass(frozen=True)
class EncodedTask:
    """A task's items with their prompts tokenised, kept per tokenizer (:func:`encode_task`).

    Attributes:
        task: the task.
        items: the test items.
        prompts: the prompt of each item.
        prompt_ids: ``tok(prompt)["input_ids"]`` per item (BOS where the tokenizer adds one).
        prompt_texts: ``tok.decode(prompt_ids, skip_special_tokens=True)`` per item.
        word_ids: ``tok(" " + w)`` without special tokens, per scored word.
        joint: per item, per word: ``tok(prompt + " " + w)["input_ids"]`` where it is not
            ``prompt_ids + word_ids`` (the authors score that row), else None.
    """

    task: ProbeTask
    items: tuple[ProbeItem, ...]
    prompts: tuple[str, ...]
    prompt_ids: tuple[tuple[int, ...], ...]
    prompt_texts: tuple[str, ...]
    word_ids: tuple[tuple[int, ...], ...]
    joint: tuple[tuple[tuple[int, ...] | None, ...], ...]


#: tokenizer -> task -> (the settings it was encoded with, the encoding)
_ENCODED: weakref.WeakKeyDictionary[Any, dict[str, tuple[tuple[Any, ...], EncodedTask]]] = weakref.WeakKeyDictionary()


def encode_task(
    tok: Any,
    task: str,
    folder: str | Path,
    n_items: int = N_ITEMS,
    *,
    n_shots: int = 0,
    max_context: int | None = None,
    gen_len: int = GEN_LEN,
) -> EncodedTask:
    """Load, prompt and tokenise a task's items once per tokenizer (cached while ``tok`` lives; a
    changed file is read again)."""
    t = task_of(task)
    path = (Path(folder) / t.file).resolve()
    st = path.stat() if path.is_file() else None
    key = (str(path), st and (st.st_mtime_ns, st.st_size), n_items, n_shots, max_context, gen_len)
    try:
        cache = _ENCODED.setdefault(tok, {})
    except TypeError:  # a tokenizer that takes no weak reference: encoded every time
        cache = {}
    if task in cache and cache[task][0] == key:
        return cache[task][1]
    items = load_items(folder, task, n_items)
    shots = load_shots(folder, task, n_shots)
    prompts = [build_prompt(tok, t, it, shots, max_context=max_context, gen_len=gen_len) for it in items]
    ids = [tuple(tok(p)["input_ids"]) for p in prompts]
    words = [tuple(target_ids(tok, w)) for w in t.scored_words]
    joint = []
    for p, pid in zip(prompts, ids):
        rows = (tuple(tok(f"{p} {w}")["input_ids"]) for w in t.scored_words)
        joint.append(tuple(None if row == pid + wid else row for row, wid in zip(rows, words)))
    texts = [tok.decode(list(i), skip_special_tokens=True) for i in ids]
    enc = EncodedTask(t, tuple(items), tuple(prompts), tuple(ids), tuple(texts), tuple(words), tuple(joint))
    if n_mismatch := sum(r is not None for row in joint for r in row):
        log.info(
            "probes %s: %d prompt/word pairs tokenise jointly otherwise; scored on the joint row", task, n_mismatch
        )
    cache[task] = (key, enc)  # one setting per (tokenizer, task): a new one replaces the old
    return enc


# ----------------------------------------------------------------------------------------------------
# Predictions


@torch.no_grad()
def _logits_at(
    model: nn.Module, tok: Any, seqs: Sequence[Sequence[int]], positions: Sequence[Sequence[int]], bs: int
) -> list[torch.Tensor]:
    """Logits [len(positions[r]), vocab] float32 at the given positions of each token list's forward,
    right-padded in batches of ``bs`` (the LM head runs at those positions only)."""
    spec = spec_for(model)
    head, device, out = get_module(model, spec.lm_head), model_device(model), []
    for b in range(0, len(seqs), bs):
        rows = range(b, min(b + bs, len(seqs)))
        x, mask = pad_right([list(seqs[r]) for r in rows], pad_id(tok), device)
        hidden = final_hidden(model, spec, input_ids=x, attention_mask=mask)
        r_idx = torch.tensor([k for k, r in enumerate(rows) for _ in positions[r]], device=device)
        pos = torch.tensor([p for r in rows for p in positions[r]], device=device)
        out += list(head(hidden[r_idx, pos]).float().cpu().split([len(positions[r]) for r in rows]))
    return out


def _joint_nll(
    model: nn.Module, tok: Any, rows: Sequence[tuple[Sequence[int], int, Sequence[int]]], bs: int
) -> list[float]:
    """Mean NLL of ``word`` read at ``start + j`` of the forward of ``ids``, per (ids, start, word) row:
    the authors' joint-row scoring."""
    for ids, start, word in rows:
        if start + len(word) > len(ids):
            raise ValueError(f"probes: the joint tokenisation {list(ids)[-8:]} is shorter than its scored word")
    positions = [[start + j for j in range(len(word))] for _, start, word in rows]
    logits = _logits_at(model, tok, [ids for ids, _, _ in rows], positions, bs)
    out = []
    for lg, (_, _, word) in zip(logits, rows):
        logp = torch.log_softmax(lg, -1).gather(1, torch.tensor(list(word))[:, None]).squeeze(1)
        out.append(float((-logp).double().mean()))
    return out


def likelihood_nll(
    model: nn.Module,
    tok: Any,
    enc: EncodedTask,
    *,
    batch_size: int = 32,
    pairs: Sequence[tuple[int, int]] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean NLL of each scored word after each prompt: [items, words] float64 (the authors' ``probs``
    before exp(−·)). Pairs whose joint tokenisation is the prompt's ids then the word's go through
    :func:`sweep.evals.metrics.target_scores` (one pass per prompt, shared by its words); others run the
    joint row as the authors do. ``pairs``: only these (item, word) entries, written into ``out``."""
    from .metrics import target_scores

    spec = spec_for(model)
    n, k = len(enc.items), len(enc.word_ids)
    out = torch.empty(n, k, dtype=torch.float64) if out is None else out
    todo = [(i, w) for i in range(n) for w in range(k)] if pairs is None else list(pairs)
    fast = [(i, w) for i, w in todo if enc.joint[i][w] is None]
    if fast:
        pairs = [(enc.prompts[i], enc.task.scored_words[w]) for i, w in fast]
        nll, _ = target_scores(model, tok, spec, pairs, batch_size=batch_size)
        out[[i for i, _ in fast], [w for _, w in fast]] = nll.double()
    slow = [(i, w) for i, w in todo if enc.joint[i][w] is not None]
    if slow:
        rows = [(enc.joint[i][w], len(enc.prompt_ids[i]) - 1, enc.word_ids[w]) for i, w in slow]
        vals = _joint_nll(model, tok, rows, batch_size)
        out[[i for i, _ in slow], [w for _, w in slow]] = torch.tensor(vals, dtype=torch.float64)
    return out


#: generation-config settings under which ``model.generate`` would not be plain greedy decoding
_PROCESSORS = ("repetition_penalty", "no_repeat_ngram_size", "bad_words_ids", "suppress_tokens", "min_new_tokens")


def _check_generation_config(model: nn.Module) -> None:
    """Warn where the model's generation config makes ``model.generate`` (the authors' call) change the
    greedy pick, which :func:`_generate` does not reproduce."""
    gc = getattr(model, "generation_config", None)
    odd = {k: v for k in _PROCESSORS if (v := getattr(gc, k, None)) not in (None, 1.0, 0, [], ())}
    if getattr(gc, "min_length", 0):
        odd["min_length"] = gc.min_length
    if odd:
        log.warning("probes: the model's generation config sets %s, which model.generate applies; not here", odd)


def _generate(
    model: nn.Module,
    tok: Any,
    prompts: Sequence[Sequence[int]],
    gen_len: int,
    bs: int,
    on_prefill: Callable[[Sequence[int], torch.Tensor], None] | None = None,
) -> list[list[int]]:
    """``gen_len`` greedy new tokens per prompt, ended as ``model.generate`` ends one sequence: at the first
    of the model's EOS ids (:func:`eos_ids`, kept, as ``generate`` keeps it). ``on_prefill`` sees each
    batch of prompts' last-token logits (:func:`~sweep.evals.generation.greedy_generate`).

    :func:`~sweep.evals.generation.greedy_generate` ends a row at any of its end ids (the tokenizer's EOS too)
    and keeps that id here (``keep_end``); a row ended by an id that is not one of the model's EOS ids
    (``generate`` would go on) is continued from where it stopped.
    """
    from .generation import end_ids, greedy_generate

    model_eos, ends = eos_ids(model), end_ids(model, tok)
    seqs: list[list[int]] = [[] for _ in prompts]
    todo = list(range(len(prompts)))
    while todo:
        left = {i: gen_len - len(seqs[i]) for i in todo}
        rows = [[*prompts[i], *seqs[i]] for i in todo]
        hook, on_prefill = on_prefill, None  # the first round's prefill is of the prompts alone
        new = greedy_generate(
            model,
            tok,
            rows,
            max_new_tokens=max(left.values()),
            stop_texts=(),
            batch_size=bs,
            keep_end=True,
            on_prefill=hook,
        )
        going = []
        for i, g in zip(todo, new):
            seqs[i] += list(g)[: left[i]]
            if seqs[i] and seqs[i][-1] in ends and seqs[i][-1] not in model_eos and len(seqs[i]) < gen_len:
                going.append(i)
        todo = going
    return [s[: next((j + 1 for j, t in enumerate(s) if t in model_eos), len(s))] for s in seqs]


def _answers(tok: Any, enc: EncodedTask, new: Sequence[Sequence[int]]) -> tuple[list[int], list[str]]:
    """Each item's generation prediction and continuation from its new tokens ``new``."""
    preds, texts = [], []
    for ids, gen, ptext in zip(enc.prompt_ids, new, enc.prompt_texts):
        decoded = tok.decode([*ids, *gen], skip_special_tokens=True)
        preds.append(parse_answer(enc.task, decoded, ptext))
        texts.append(decoded.replace(ptext, ""))
    return preds, texts


def generate_answers(
    model: nn.Module, tok: Any, enc: EncodedTask, *, gen_len: int = GEN_LEN, batch_size: int = 32
) -> tuple[list[int], list[str]]:
    """The generation prediction of every item and its continuation (the decoded output with the decoded
    prompt removed, ``str.replace`` as the authors do)."""
    return _answers(tok, enc, _generate(model, tok, enc.prompt_ids, gen_len, batch_size))


def predict(
    model: nn.Module, tok: Any, encs: Sequence[EncodedTask], *, gen_len: int = GEN_LEN, batch_size: int = 32
) -> list[tuple[list[int], list[str], torch.Tensor]]:
    """Both predictions of every item of every task in ``encs``: (generation predictions, continuations,
    the words' NLLs [items, words] float64) per task, as :func:`generate_answers` and
    :func:`likelihood_nll` give them, with each prompt run once for both.

    The prompts of all tasks are generated together, sorted by length (so batches pad little across
    tasks); the prefill that the generation continues from also gives, at each prompt's last token, the
    NLL of every single-token scored word that follows the prompt's ids as they are. Only multi-token
    words and words that tokenise jointly with the prompt (:class:`EncodedTask` ``joint``) run a
    forward of their own (:func:`likelihood_nll`). The same logits as the separate passes up to float
    noise (a row's padding differs): the predictions equal theirs except where two words tie within it.
    """
    prompts = [ids for enc in encs for ids in enc.prompt_ids]
    owner = [(k, i) for k, enc in enumerate(encs) for i in range(len(enc.items))]
    nll = [torch.full((len(enc.items), len(enc.word_ids)), math.nan, dtype=torch.float64) for enc in encs]
    single = [[(w, wid[0]) for w, wid in enumerate(enc.word_ids) if len(wid) == 1] for enc in encs]

    def read(rows: Sequence[int], logits: torch.Tensor) -> None:
        logp = torch.log_softmax(logits, dim=-1)
        for r, j in enumerate(rows):
            k, i = owner[j]
            for w, wid in single[k]:
                if encs[k].joint[i][w] is None:
                    nll[k][i, w] = -float(logp[r, wid])

    new = _generate(model, tok, prompts, gen_len, batch_size, on_prefill=read)
    out, start = [], 0
    for k, enc in enumerate(encs):
        gen = new[start : start + len(enc.items)]
        start += len(enc.items)
        rest = [(i, w) for i in range(len(enc.items)) for w in range(len(enc.word_ids)) if math.isnan(nll[k][i, w])]
        if rest:
            likelihood_nll(model, tok, enc, batch_size=batch_size, pairs=rest, out=nll[k])
        out.append((*_answers(tok, enc, gen), nll[k]))
    return out


# ----------------------------------------------------------------------------------------------------
# Running


@dataclass(frozen=True)
class TaskPredictions:
    """Per item of one task: gold class, both predictions, the generated text and the words' NLLs."""

    gold: tuple[int, ...]
    generated: tuple[int, ...]
    likelihood: tuple[int, ...]
    texts: tuple[str, ...]
    nll: tuple[tuple[float, ...], ...]


@dataclass(frozen=True)
class ProbeResult:
    """One probe point.

    Attributes:
        tasks: task -> :func:`task_metrics` (fractions: F1, accuracy and invalid in [0, 1], MCC in [−1, 1]).
        seconds: wall time of the whole point.
        task_seconds: task -> its share of the point's wall time, by its prompts' tokens (the tasks run
            together, batched across tasks).
        predictions: task -> the per-item predictions.
    """

    tasks: dict[str, dict[str, float]]
    seconds: float
    task_seconds: dict[str, float] = field(default_factory=dict)
    predictions: dict[str, TaskPredictions] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        """Flat ``probe_<task>_<metric>`` ×100 (percent; MCC a signed percent), e.g. ``probe_sst2_f1`` (the
        authors' headline, the generation-based weighted F1 AlphaEdit's figures plot), ``probe_sst2_mcc``,
        ``probe_sst2_acc``, ``probe_sst2_invalid``, ``probe_sst2_lik_f1`` / ``_lik_mcc`` / ``_lik_acc``
        (each declared in :mod:`sweep.evals.registry`; the point's time is :attr:`seconds`)."""
        return {f"probe_{t}_{k}": 100.0 * v for t, d in self.tasks.items() for k, v in d.items()}


def _sync(model: nn.Module) -> None:
    from editors.common import sync

    sync(model_device(model))


@torch.no_grad()
def run_probes(
    model: nn.Module,
    tok: Any,
    tasks: Sequence[str],
    folder: str | Path,
    n_items: int = N_ITEMS,
    batch_size: int = 32,
    *,
    gen_len: int = GEN_LEN,
    n_shots: int = 0,
) -> ProbeResult:
    """Run the probe ``tasks`` on the model as it is (AlphaEdit: :data:`ENABLED`, 100 items, 0 shots).

    Prompts are built and tokenised once per tokenizer (:func:`encode_task`), so a point costs the
    generation and scoring forwards only. ``n_shots`` > 0 budgets the shots by the authors' context
    length of the model's name (:func:`context_length`).
    """
    names = [task_of(t).name for t in dict.fromkeys(tasks)]  # an unknown name fails before any work
    max_context = context_length(model) if n_shots else None
    _check_generation_config(model)
    _sync(model)
    t0 = time.perf_counter()
    encs = [
        encode_task(tok, name, folder, n_items, n_shots=n_shots, max_context=max_context, gen_len=gen_len)
        for name in names
    ]
    got = predict(model, tok, encs, gen_len=gen_len, batch_size=batch_size)
    _sync(model)
    seconds = time.perf_counter() - t0
    tokens = [sum(map(len, enc.prompt_ids)) for enc in encs]
    metrics, secs, preds = {}, {}, {}
    for name, enc, (gen, texts, nll), n_tok in zip(names, encs, got, tokens):
        lik = [likelihood_prediction(enc.task, [math.exp(-v) for v in row]) for row in nll.tolist()]
        gold = [it.gold for it in enc.items]
        metrics[name] = task_metrics(gold, gen, lik)
        preds[name] = TaskPredictions(
            tuple(gold), tuple(gen), tuple(lik), tuple(texts), tuple(map(tuple, nll.tolist()))
        )
        secs[name] = seconds * n_tok / max(sum(tokens), 1)
        log.info("probe %s: f1 %.3f mcc %.3f", name, metrics[name]["f1"], metrics[name]["mcc"])
    log.info("probe point: %d tasks, %d items, %.1f s", len(names), sum(len(e.items) for e in encs), seconds)
    return ProbeResult(metrics, seconds, secs, preds)


# ----------------------------------------------------------------------------------------------------
# Fetching the authors' pickles


#: the authors' files at :data:`COMMIT`: name -> (md5 of the pickle, md5 of its JSON lines as converted here)
FILES: dict[str, tuple[str, str]] = {
    "sst2": ("dd751a16a50850480fc663584f4f1133", "a64d409b4bb2120d146a24e789fe5988"),
    "mrpc": ("6dddc4e39b015ca086c879070ae77120", "f478d2a17c1a103839986364f1089979"),
    "cola": ("34a5ed0794c0be290a97bcbd555f9f51", "4572c84e99cbdf57bfbbdcf928177936"),
    "rte": ("20e6d828ed74666dd86474205f30b8cc", "0694483b7ae9506173d028d007159450"),
    "mmlu": ("87696aff77f7a1cc27800efad5e1712a", "f5104d1f55d9b8e853b0f306b1253a87"),
    "nli": ("5d1d15acb3b85da0db9c870d251265ce", "767a0c977f041e854a66df81a26aab70"),
    "sentiment_analysis": ("842a9f3e5f579a255c5fac1fe1b642b0", "9fb9b6f8b056ad006c4f51117c585116"),
    "dialogue": ("3c73726dc46ab54e97a5eac0448f0203", "b7e26c3db04d88b29477dde0e93d120b"),
}
URL = "https://raw.githubusercontent.com/jianghoucheng/AlphaEdit/{commit}/glue_eval/dataset/{name}.pkl"
MAX_DOWNLOAD = 32 << 20  # bytes; the largest pickle is ~1 MB


class _NoClassUnpickler(pickle.Unpickler):
    """Unpickles plain lists, dicts, strings and numbers only: any class or persistent id is refused."""

    def find_class(self, module: str, name: str) -> Any:
        raise ProbeDataError(f"refused: the pickle references {module}.{name} (no class is allowed)")

    def persistent_load(self, pid: Any) -> Any:
        raise ProbeDataError("refused: the pickle holds a persistent id (no external object is allowed)")


def _check_plain(value: Any, where: str) -> None:
    """Only JSON's types (a tuple, set or bytes would not survive the round trip)."""
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ProbeDataError(f"{where}: key {k!r} is not a string")
            _check_plain(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
    elif not (value is None or isinstance(value, (str, int, float, bool))):
        raise ProbeDataError(f"{where}: a {type(value).__name__} has no JSON form")


def convert_pickle(src: Path, dst: Path) -> int:
    """Convert the authors' pickle ``src`` (a list of dicts) to JSON lines ``dst``; returns the record count.

    Unpickled by :class:`_NoClassUnpickler` (nothing executes); each record written as
    ``json.dumps(record, ensure_ascii=False)`` + newline, read back and compared equal.
    """
    src, dst = Path(src), Path(dst)
    try:
        data = _NoClassUnpickler(io.BytesIO(src.read_bytes())).load()
    except ProbeDataError as e:
        raise ProbeDataError(f"{src}: {e}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError) as e:
        raise ProbeDataError(f"{src}: not a readable pickle ({type(e).__name__}: {e})") from None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise ProbeDataError(f"{src}: expected a list of dicts, got {type(data).__name__}")
    for i, rec in enumerate(data):
        _check_plain(rec, f"{src}: record {i}")
    tmp = dst.with_name(dst.name + ".part")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in data), encoding="utf-8")
    if read_records(tmp) != data:
        raise ProbeDataError(f"{src}: the JSON lines do not read back equal to the pickle")
    os.replace(tmp, dst)
    return len(data)


def md5_file(path: Path) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def _download(url: str, timeout: float) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        data = r.read(MAX_DOWNLOAD + 1)
    if len(data) > MAX_DOWNLOAD:
        raise ProbeDataError(f"{url}: larger than {MAX_DOWNLOAD} bytes")
    return data


def fetch(out: str | Path, names: Sequence[str] = tuple(FILES), *, timeout: float = 60.0) -> list[Path]:
    """Download the authors' pickles at :data:`COMMIT`, check their md5, convert each to
    ``<out>/<name>.jsonl`` (:func:`convert_pickle`) and check that md5 too. The pickles are not kept."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    made = []
    for name in names:
        if name not in FILES:
            raise ValueError(f"probes: unknown file {name!r} (known: {', '.join(FILES)})")
        url = URL.format(commit=COMMIT, name=name)
        try:
            data = _download(url, timeout)
        except OSError as e:  # URLError, timeouts, refused connections
            raise ProbeDataError(f"cannot download {url}: {getattr(e, 'reason', e)}") from None
        want_pkl, want_jsonl = FILES[name]
        if (got := hashlib.md5(data).hexdigest()) != want_pkl:
            raise ProbeDataError(f"{url}: md5 {got}, expected {want_pkl} (not the authors' file)")
        pkl = out / f"{name}.pkl.part"
        pkl.write_bytes(data)
        try:
            n = convert_pickle(pkl, out / f"{name}.jsonl")
        finally:
            pkl.unlink(missing_ok=True)
        if (got := md5_file(out / f"{name}.jsonl")) != want_jsonl:
            raise ProbeDataError(f"{out / name}.jsonl: md5 {got}, expected {want_jsonl}")
        log.info("probes: %s.jsonl: %d records, md5 %s", name, n, got)
        made.append(out / f"{name}.jsonl")
    return made


def files_digest(data: str | Path | None, tasks: Sequence[str]) -> str:
    """What the probe files of ``tasks`` hold, without fetching anything: the sha256 of each file in the
    ``scoring.probe_data`` folder, or, when it is null, the authors' files' md5s (:data:`FILES`; a
    fetch checks them, so the content is known before it is fetched)."""
    h = hashlib.sha256()
    for task in tasks:
        if data is None:
            h.update(f"{task}:md5:{FILES[task][1]}\n".encode())
        else:
            path = Path(data) / f"{task}.jsonl"
            content = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "-"
            h.update(f"{task}:sha256:{content}\n".encode())
    return h.hexdigest()[:24]


def probe_folder(data: str | Path | None, tasks: Sequence[str]) -> Path:
    """The folder of the probe files a trial reads: ``scoring.probe_data`` when given, else the cache's
    ``glue_eval`` folder, where the authors' files are fetched and converted once per node
    (:func:`fetch`; their md5s are checked, so the cache is keyed on content)."""
    if data is not None:
        return Path(data)
    from .data import cache_dir

    folder = cache_dir() / "glue_eval"
    missing = [t for t in tasks if not (folder / f"{t}.jsonl").is_file()]
    if missing:
        log.info("probe files %s not in %s: fetching the authors' files once", missing, folder)
        try:
            fetch(folder, missing)
        except ProbeDataError as e:
            raise ProbeDataError(
                f"scoring.probe_data: null, and {e}; offline? give a folder of the probe JSON lines "
                "(python -m sweep.evals.probes fetch --out DIR where there is a network)"
            ) from None
    return folder


def check_probe_data(trials: list[Any]) -> None:
    """The probe files each trial reads, at hand before any work starts: a ``scoring.probe_data``
    folder holding every task's file, or the authors' files fetched once into the driver's cache (each
    node fetches its own the same way); a ``ProbeDataError`` (a ValueError) names the setting."""
    for data, tasks in {(t.scoring.probe_data, t.scoring.probes) for t in trials if t.scoring.probes}:
        folder = probe_folder(data, tasks)
        if missing := [task for task in tasks if not (folder / f"{task}.jsonl").is_file()]:
            raise ValueError(f"scoring.probe_data: {folder} has no file for {missing} ({missing[0]}.jsonl)")


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m sweep.evals.probes fetch --out DIR``: the authors' probe data as checked JSON lines."""
    parser = argparse.ArgumentParser(prog="python -m sweep.evals.probes", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fetch", help=f"download AlphaEdit's glue_eval pickles ({COMMIT[:7]}) as JSON lines")
    f.add_argument("--out", required=True, type=Path, help="folder for the <task>.jsonl files")
    f.add_argument("--tasks", nargs="+", default=list(FILES), choices=list(FILES), help="files to fetch (all)")
    f.add_argument("--timeout", type=float, default=60.0, help="seconds per download")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        fetch(args.out, args.tasks, timeout=args.timeout)
    except ProbeDataError as e:
        sys.exit(f"sweep.evals.probes fetch: {' '.join(str(e).split())}")


if __name__ == "__main__":
    main()
