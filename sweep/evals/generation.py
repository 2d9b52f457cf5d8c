"""Generation-based ("WILD") scoring: greedy decoding to a natural stop, then exact match.

Yang et al., "The Mirage of Model Editing: Revisiting Evaluation in the Wild" (ACL 2025, arXiv 2502.11177;
code WanliYoung/Revisit-Editing-Evaluation, ``test_prediction_acc_real``) show that teacher forcing, which
feeds the target's tokens and so tells the model how long the answer is, overstates editing success. Their
WILD protocol scores what the model actually says (docs/ALGORITHMS.md §9):

1. context (``scoring.gen_context``, :func:`context_prompt`): the question alone (``bare``, their
   ``question-only``, the default), ``"Please answer the question:\\n\\nQ: {question}\\nA:"`` (``qa``, their
   ``qa_inst``), or the tokenizer's own chat template (``chat``; theirs hard-codes Llama-2's);
2. greedy decoding, at most 50 new tokens, stopping at EOS or as soon as the new text holds ``"."`` or
   ``"\\n"`` (:func:`greedy_generate`, batched on the KV cache);
3. the new text is cut at its first stop (:func:`cut_answer`) and scored by exact match after SQuAD
   normalisation against the target and its aliases (:func:`exact_match`; the authors' LLM judge, used
   only when an API key is given, is not reproduced).

Per fact (:func:`generated_scores`), each in [0, 1]: ``gen_es`` the rewrite question's exact match,
``gen_ps`` the mean over its paraphrases, ``gen_ns`` the mean over neighbourhood prompts of [the generated
token ids equal the unedited model's] (its own ``neighbour_ids``, kept once, before editing, with the
pre-edit scores). The registry's ``gen_*`` metrics are these ×100. On an edited model ``gen_ns`` needs no
decoding: whether greedy decoding would return the unedited model's ids is decided by one teacher-forced
forward of prompt + those ids (:func:`decodes_to`), so a neighbourhood prompt costs what teacher forcing
costs; the rewrite and paraphrase questions, scored by exact match of the text, are decoded.

The first ``"."`` stops, as in the authors' ``stop_strings``: an answer such as ``"3.5 million"`` is cut to
``"3"``. A model that starts its reply with a newline (common for ``bare`` questions) answers ``""``; that is
the protocol, not a bug here.
"""

from __future__ import annotations

import inspect
import logging
import math
import re
import string
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import nn

from editors.model import ModelSpecError, final_hidden, get_module, model_device, spec_for
from editors.requests import encode, pad_id, pad_right
from editors.targets import cache_kwarg

log = logging.getLogger(__name__)

GenContext = Literal["bare", "qa", "chat"]
#: the WILD code's ``qa_inst`` template
QA_TEMPLATE = "Please answer the question:\n\nQ: {question}\nA:"
#: the stop strings of the WILD protocol (besides EOS)
STOP_TEXTS: tuple[str, ...] = (".", "\n")
#: end-of-text strings cut from a decoded answer (the WILD code's, plus the chat models' usual ones)
EOS_TEXTS: tuple[str, ...] = ("</s>", "<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>")


# ----------------------------------------------------------------------------------------------------
# Greedy decoding


def pad_left(seqs: Sequence[Sequence[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists: (input_ids [n, L], attention_mask [n, L]), so every row's last token is at
    column L − 1 and new tokens append in one column for all rows."""
    n, length = len(seqs), max(len(s) for s in seqs)
    ids = torch.full((n, length), pad, dtype=torch.long)
    mask = torch.zeros((n, length), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, length - len(s) :] = torch.tensor(list(s), dtype=torch.long)
            mask[i, length - len(s) :] = 1
    return ids.to(device), mask.to(device)


def _stop_hits(
    tok: Any,
    seqs: Sequence[Sequence[int]],
    stop_texts: Sequence[str],
    decided: Callable[[int, str], bool] | None = None,
    rows: Sequence[int] = (),
) -> list[bool]:
    """Whether the decoded text of each of ``seqs`` (the new tokens of a row) holds a stop text, or
    (with ``decided``) whether ``decided(rows[i], text)``: the caller's score of that row is settled."""
    if not (stop_texts or decided) or not seqs:
        return [False] * len(seqs)
    texts = tok.batch_decode([list(s) for s in seqs])
    hits = [any(s in t for s in stop_texts) for t in texts]
    if decided is not None:
        hits = [h or decided(r, t) for h, r, t in zip(hits, rows, texts)]
    return hits


def _last_logits(model: nn.Module, keep_last: bool, **batch: Any) -> torch.Tensor:
    """Logits of the last position of every row [rows, vocab], float32."""
    if keep_last:
        batch["logits_to_keep"] = 1
    return model(**batch).logits[:, -1].float()


def eos_ids(model: nn.Module) -> set[int]:
    """The ids that end ``model.generate`` (its generation config's ``eos_token_id``, else its config's):
    a chat model's end-of-turn among them, e.g. Llama-3-Instruct's <|eot_id|>."""
    gc = getattr(model, "generation_config", None)
    eos = getattr(gc, "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    return set() if eos is None else {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


def end_ids(model: nn.Module, tok: Any) -> set[int]:
    """The token ids that end a generation here: the tokenizer's EOS and the model's (:func:`eos_ids`)."""
    return eos_ids(model) | ({tok.eos_token_id} if tok.eos_token_id is not None else set())


def _prefill_right_padded(model: nn.Module, seqs: Sequence[Sequence[int]], pad: int, cache: Any) -> tuple | None:
    """Prefill right-padded prompts with no attention mask into ``cache``: (logits at each row's last
    token [rows, vocab] float32, the prompts' mask [rows, L], each row's length [rows]), or None for a
    model whose final norm and LM head are not known (then the caller pads left).

    A real token never attends to a later pad (causal attention), so every real token's keys, values and
    logits are those of its row alone, and the pass takes the unmasked attention path. The LM head runs
    at the last tokens only; the decoding steps mask the pads out of the cache."""
    try:
        spec = spec_for(model)
        head = get_module(model, spec.lm_head)
    except ModelSpecError:
        return None
    device = model_device(model)
    ids, mask = pad_right(seqs, pad, device)
    lengths = mask.sum(1)
    hidden = final_hidden(model, spec, use_cache=True, input_ids=ids, **{cache_kwarg(model): cache})
    last = hidden[torch.arange(len(seqs), device=device), lengths - 1]
    return head(last).float(), mask, lengths


def _generate_batch(
    model: nn.Module,
    tok: Any,
    seqs: Sequence[Sequence[int]],
    max_new_tokens: int,
    stop_texts: Sequence[str],
    keep_end: bool = False,
    on_prefill: Callable[[torch.Tensor], None] | None = None,
    decided: Callable[[int, str], bool] | None = None,
) -> list[list[int]]:
    """Greedy decoding of one batch of prompts on a ``DynamicCache``: one prefill forward over the
    prompts (right-padded, unmasked: :func:`_prefill_right_padded`), then one forward of one token per
    still-running row. Finished rows leave the batch (and the cache), so a long-running row does not
    carry the finished ones; so do rows for which ``decided(row, new text)`` is true. ``on_prefill`` gets
    the prefill's last-position logits [rows, vocab] float32 (what else a caller reads of the prompt)."""
    from transformers import DynamicCache

    device = model_device(model)
    eos = end_ids(model, tok)
    cache = DynamicCache()
    params = inspect.signature(model.forward).parameters
    common = {cache_kwarg(model): cache, "use_cache": True}
    keep_last = "logits_to_keep" in params
    right = _prefill_right_padded(model, seqs, pad_id(tok), cache)
    if right is not None:
        logits, mask, next_pos = right  # next_pos [rows]: each row's length, where its first new token goes
    else:  # left-padded, masked: every row's last token in the last column
        ids, mask = pad_left(seqs, pad_id(tok), device)
        positions = (mask.cumsum(1) - 1).clamp(min=0)  # [rows, L]: pads get 0, real tokens 0..len-1
        logits = _last_logits(model, keep_last, input_ids=ids, attention_mask=mask, position_ids=positions, **common)
        next_pos = positions[:, -1] + 1
    if on_prefill is not None:
        on_prefill(logits)
    new: list[list[int]] = [[] for _ in seqs]
    live = list(range(len(seqs)))  # the input row of each batch row
    for step in range(max_new_tokens):
        picked = logits.argmax(-1).tolist()
        grown = [(r, t) for r, t in enumerate(picked) if t not in eos]
        if keep_end:  # a row that picked an end id ends with it
            for r, t in enumerate(picked):
                if t in eos:
                    new[live[r]].append(t)
        for r, t in grown:
            new[live[r]].append(t)
        hits = _stop_hits(tok, [new[live[r]] for r, _ in grown], stop_texts, decided, [live[r] for r, _ in grown])
        keep = [r for (r, _), hit in zip(grown, hits) if not hit]
        if not keep or step == max_new_tokens - 1:
            break
        if len(keep) < len(live):
            sel = torch.tensor(keep, device=device)
            cache.batch_select_indices(sel)
            mask, next_pos = mask[sel], next_pos[sel]
            live = [live[r] for r in keep]
        step_ids = torch.tensor([[picked[r]] for r in keep], device=device)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        logits = _last_logits(
            model, keep_last, input_ids=step_ids, attention_mask=mask, position_ids=next_pos[:, None], **common
        )
        next_pos = next_pos + 1
    return new


@torch.no_grad()
def greedy_generate(
    model: nn.Module,
    tok: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    stop_texts: Sequence[str] = STOP_TEXTS,
    batch_size: int = 32,
    keep_end: bool = False,
    on_prefill: Callable[[Sequence[int], torch.Tensor], None] | None = None,
    decided: Callable[[int, str], bool] | None = None,
) -> list[list[int]]:
    """Greedy continuations of token-id prompts, batched on the KV cache.

    Args:
        prompts: token ids, encoded by the caller (BOS included where the tokenizer adds one:
            :func:`editors.requests.encode`, or :func:`encode_context`).
        max_new_tokens: the cap on new tokens per prompt.
        stop_texts: a row stops as soon as the decoded text of its new tokens holds one of these (the
            token that completed it is kept; :func:`cut_answer` cuts the text). ``()``: only EOS and the cap.
        batch_size: prompts per batch; prompts are sorted by length so a batch pads little.
        keep_end: keep the end id that ended a row as its last token (so a caller can tell which).
        on_prefill: called per batch with the batch's prompt indices and the logits at their last
            tokens [rows, vocab] float32, from the prefill the generation continues from: a caller that
            also scores what follows each prompt reads it here instead of running the prompt again.
        decided: ``decided(i, text)`` (prompt index, decoded new text so far) true ends the row there:
            for a caller whose score of the row can no longer change (:func:`answer_settled`). The
            row's returned ids are then cut short.

    Returns:
        The new token ids of each prompt, in input order; an end id (:func:`end_ids`: EOS, a chat
        model's end of turn) ends a row and is not included unless ``keep_end``.

    Every row sees the positions it would see alone: a batch's prompts are prefilled right-padded with no
    mask (pads come after every real token), then each new token goes at its row's own next position with
    the pads masked (a model whose layout ``editors`` does not know is left-padded and masked instead).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens: must be >= 0, got {max_new_tokens}")
    if empty := [i for i, p in enumerate(prompts) if not len(p)]:
        raise ValueError(f"greedy_generate: prompt {empty[0]} has no tokens, so nothing conditions its continuation")
    out: list[list[int]] = [[] for _ in prompts]
    if max_new_tokens == 0:
        return out
    t0 = time.perf_counter()
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        hook = None if on_prefill is None else (lambda logits, chunk=chunk: on_prefill(chunk, logits))
        settled = None if decided is None else (lambda r, text, chunk=chunk: decided(chunk[r], text))
        gens = _generate_batch(
            model, tok, [prompts[i] for i in chunk], max_new_tokens, stop_texts, keep_end, hook, settled
        )
        for i, g in zip(chunk, gens):
            out[i] = g
    log.debug(
        "greedy_generate: %d prompts, %d new tokens, %.2f s",
        len(prompts),
        sum(len(g) for g in out),
        time.perf_counter() - t0,
    )
    return out


def _stop_index(tok: Any, ids: Sequence[int], stop_texts: Sequence[str]) -> int | None:
    """The first count t >= 1 of new tokens ``ids[:t]`` whose decoded text holds a stop text (where the
    decoding of :func:`greedy_generate` ends a row), else None."""
    for t in range(1, len(ids) + 1):
        if _stop_hits(tok, [ids[:t]], stop_texts)[0]:
            return t
    return None


def _decodes_to(ref: Sequence[int], picks: Sequence[int], stop_at: int | None, cap: int, eos: set[int]) -> bool:
    """Whether greedy decoding returns exactly ``ref``, given ``picks[t]``: the arg-max after the prompt
    and ``ref[:t]`` (t = 0 .. len(ref)). Follows :func:`_generate_batch` step by step while its tokens are
    ``ref``'s: a picked end id ends the row (not kept), a stop text or the cap ends it after a token."""
    n = len(ref)
    if cap == 0 or n > cap:
        return n == 0  # no token can be generated; a reference longer than the cap cannot be
    for t in range(n + 1):
        if t > 0 and (t == stop_at or t == cap):
            return t == n
        if picks[t] in eos:
            return t == n
        if t == n or picks[t] != ref[t]:
            return False  # the decoding goes past the reference, or leaves it here
    return False


@torch.no_grad()
def decodes_to(
    model: nn.Module,
    tok: Any,
    prompts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    stop_texts: Sequence[str] = STOP_TEXTS,
    batch_size: int = 32,
) -> list[bool]:
    """Whether :func:`greedy_generate` (same cap and stop rule) would return exactly ``continuations[i]``
    for ``prompts[i]``, decided without decoding: one teacher-forced forward of prompt + continuation
    gives the arg-max after every prefix of it, and greedy decoding returns the continuation if and only
    if each arg-max is its next token and the row ends exactly at its end (:func:`_decodes_to`).

    This is what an edited model's neighbourhood score asks (are its generations the unedited model's?):
    one forward per prompt instead of one per new token, the cost of teacher forcing. The arg-maxes come
    from one forward over the whole sequence instead of a KV-cached step per token: the same up to
    floating-point ties.

    Args:
        prompts: token ids, as for :func:`greedy_generate`.
        continuations: the new token ids to check per prompt (end id excluded, as it returns them).
        max_new_tokens: the generation cap the continuations were made under.
    Returns:
        One bool per prompt.
    """
    if len(prompts) != len(continuations):
        raise ValueError(f"decodes_to: {len(prompts)} prompts but {len(continuations)} continuations")
    if empty := [i for i, p in enumerate(prompts) if not len(p)]:
        raise ValueError(f"decodes_to: prompt {empty[0]} has no tokens, so nothing conditions its continuation")
    device = model_device(model)
    eos = end_ids(model, tok)
    try:
        spec = spec_for(model)
        head = get_module(model, spec.lm_head)
    except ModelSpecError:
        spec = head = None
    out = [False] * len(prompts)
    seqs = [list(p) + list(c) for p, c in zip(prompts, continuations)]
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        # right-padded, no mask: a real token never attends to a later pad (causal attention)
        ids, _ = pad_right([seqs[i] for i in chunk], pad_id(tok), device)
        rows = [r for r, i in enumerate(chunk) for _ in range(len(continuations[i]) + 1)]
        cols = [len(prompts[i]) - 1 + t for i in chunk for t in range(len(continuations[i]) + 1)]
        r_idx, c_idx = torch.tensor(rows, device=device), torch.tensor(cols, device=device)
        if spec is not None:
            picks = head(final_hidden(model, spec, input_ids=ids)[r_idx, c_idx]).argmax(-1).tolist()
        else:
            picks = model(input_ids=ids).logits[r_idx, c_idx].argmax(-1).tolist()
        at = 0
        for i in chunk:
            n = len(continuations[i])
            stop_at = _stop_index(tok, continuations[i], stop_texts)
            out[i] = _decodes_to(continuations[i], picks[at : at + n + 1], stop_at, max_new_tokens, eos)
            at += n + 1
    return out


# ----------------------------------------------------------------------------------------------------
# Contexts and answers


def context_prompt(tok: Any, question: str, context: GenContext) -> str:
    """The text the model continues: the question alone (``bare``), the WILD ``qa_inst`` template
    (``qa``), or the tokenizer's chat template with the question as the user turn and the generation
    prompt (``chat``)."""
    if context == "bare":
        return question
    if context == "qa":
        return QA_TEMPLATE.format(question=question)
    if context == "chat":
        if not getattr(tok, "chat_template", None):
            name = getattr(tok, "name_or_path", "") or type(tok).__name__
            raise ValueError(
                f"scoring.gen_context: 'chat' needs a tokenizer with a chat template, and {name!r} has none "
                "(a base model); use 'bare' or 'qa'"
            )
        return tok.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
    raise ValueError(f"scoring.gen_context: unknown context {context!r}; use one of {get_args(GenContext)}")


def encode_context(tok: Any, text: str, context: GenContext) -> list[int]:
    """Token ids of a :func:`context_prompt` text: a chat-templated text already holds its special
    tokens (BOS included), so it is encoded without adding any; ``bare``/``qa`` as
    :func:`editors.requests.encode` (BOS where the tokenizer adds one)."""
    if context == "chat":
        return list(tok(text, add_special_tokens=False)["input_ids"])
    return encode(tok, text)[0]


def cut_answer(text: str, stops: Sequence[str] = STOP_TEXTS, eos_texts: Sequence[str] = EOS_TEXTS) -> str:
    """The answer in a generated text: everything before the first stop (``"."``, ``"\\n"``) or
    end-of-text string, stripped.

    Like the WILD code's ``stop_strings``, the first ``"."`` ends the answer even inside a number
    (``"3.5 million"`` -> ``"3"``) or an abbreviation: that is what their greedy generation returns.
    Where a stop shares its token with more text (``". The"``) the rest is dropped too.
    """
    cut = len(text)
    for s in (*stops, *eos_texts):
        i = text.find(s) if s else -1
        if 0 <= i < cut:
            cut = i
    return text[:cut].strip()


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lower-case, drop ASCII punctuation, drop the articles a/an/the, squeeze
    whitespace (the WILD code's ``normalize_answer``, in that order)."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", s).split())


def exact_match(pred: str, answers: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised answer (the target or an alias), else 0.0."""
    p = normalize_answer(pred)
    return float(any(p == normalize_answer(a) for a in answers))


#: the starts of an article: an open word equal to one of these may still be removed by normalisation
_ARTICLE_STARTS = frozenset({"a", "an", "t", "th", "the"})


def answer_settled(text: str, answer_words: Sequence[Sequence[str]], cut_texts: Sequence[str]) -> bool:
    """Whether the exact match (:func:`exact_match`) of the answer cut from ``text`` plus any further
    generation is already decided: ``text`` holds a cut text (its answer is fixed), or no continuation can
    make the normalised answer one of ``answer_words`` (each answer's :func:`normalize_answer` split into
    words). Sound, not complete: where it cannot tell, it says not settled.

    Normalisation acts on each whitespace-separated run alone, so the runs that are complete (followed by
    whitespace) fix the first words; the open last run, once lower-cased and stripped of punctuation, is
    the start of the next word unless it may still become an article or holds a non-word character. A
    cut text may also begin at the end of ``text`` and be completed later, leaving the answer a prefix of it.
    """
    if any(c and c in text for c in cut_texts):
        return True
    for c in cut_texts:  # the answer cut inside the text, where a cut text the next tokens complete begins
        for j in range(1, len(c)):
            if text.endswith(c[:j]) and normalize_answer(text[:-j]).split() in answer_words:
                return False
    runs = text.split()
    open_run = runs.pop() if runs and not text[-1].isspace() else None
    done = [w for r in runs for w in normalize_answer(r).split()]
    k = len(done)
    heads = [list(a) for a in answer_words if list(a[:k]) == done]
    if open_run is None or not heads:
        return not heads
    start = "".join(ch for ch in open_run.lower() if ch not in _PUNCTUATION)
    if start in _ARTICLE_STARTS or not re.fullmatch(r"\w+", start):
        return False
    return not any(len(a) > k and a[k].startswith(start) for a in heads)


# ----------------------------------------------------------------------------------------------------
# Per-fact scores


@dataclass(frozen=True)
class GenFact:
    """The questions of one fact for generation-based scoring.

    Attributes:
        rewrite: the edited question (the edit's prompt with its subject).
        paraphrases: rephrased questions of the same fact.
        neighbourhood: unrelated prompts whose generations editing should leave unchanged.
        answers: the target and its aliases (any one matches).
    """

    rewrite: str
    paraphrases: tuple[str, ...]
    neighbourhood: tuple[str, ...]
    answers: tuple[str, ...]

    def __post_init__(self) -> None:
        for name in ("paraphrases", "neighbourhood", "answers"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise ValueError(f"GenFact.{name}: expected a sequence of strings, got the string {value!r}")
            object.__setattr__(self, name, tuple(value))
        if not self.answers:
            raise ValueError(f"GenFact {self.rewrite!r}: answers is empty, so nothing can match")


@dataclass(frozen=True)
class GenScores:
    """Generation-based scores of one fact, each in [0, 1] (nan where undefined).

    Attributes:
        gen_es: exact match of the rewrite question's answer (0 or 1).
        gen_ps: mean exact match over the paraphrases (nan without any).
        gen_ns: mean over neighbourhood prompts of [generated ids == reference ids] (nan without a
            reference or without neighbourhood prompts).
        texts: the cut answers, rewrite first, then the paraphrases, then (scored without a reference
            only) the neighbourhood prompts.
        neighbour_ids: without a reference, the generated token ids of each neighbourhood prompt (EOS
            excluded), to keep as the reference when the model is the unedited one; () with a reference
            (the neighbourhood is checked against it, not decoded: :func:`decodes_to`).
    """

    gen_es: float
    gen_ps: float
    gen_ns: float
    texts: tuple[str, ...]
    neighbour_ids: tuple[tuple[int, ...], ...]


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def _generate_questions(
    model: nn.Module,
    tok: Any,
    questions: Sequence[str],
    context: GenContext,
    max_new_tokens: int,
    batch_size: int,
    answers: Sequence[Sequence[str] | None] | None = None,
    cut_texts: Sequence[str] = (*STOP_TEXTS, *EOS_TEXTS),
) -> list[tuple[int, ...]]:
    """Generated ids of each question in ``context``, one :func:`greedy_generate` call; a question asked
    more than once (a neighbourhood prompt shared by facts) is generated once. With ``answers`` (per
    question, the strings its exact match accepts, or None where its whole generation is needed) a row
    ends as soon as its match is settled (:func:`answer_settled`), its ids cut short there (not for a
    tokenizer that cleans up spaces when decoding: there a later token can change the text before it)."""
    encoded = [_encode_question(tok, q, context) for q in questions]
    unique = list(dict.fromkeys(encoded))
    decided = None
    # a tokenizer that cleans up spaces (" 's" -> "'s") may join a finished word to a later one, so a
    # text's start does not settle its answer there: decode those to the stop
    if answers is not None and not getattr(tok, "clean_up_tokenization_spaces", False):
        words: dict[tuple[int, ...], list[list[str]] | None] = {}
        for p, ans in zip(encoded, answers):
            if ans is None or (p in words and words[p] is None):
                words[p] = None  # a use that needs the whole generation
            else:
                words[p] = [*words.get(p, []), *(normalize_answer(a).split() for a in ans)]
        per_row = [words[p] for p in unique]

        def decided(i: int, text: str) -> bool:
            return per_row[i] is not None and answer_settled(text, per_row[i], cut_texts)

    gens = greedy_generate(model, tok, unique, max_new_tokens=max_new_tokens, batch_size=batch_size, decided=decided)
    by_prompt = {p: tuple(g) for p, g in zip(unique, gens)}
    return [by_prompt[p] for p in encoded]


def _encode_question(tok: Any, question: str, context: GenContext) -> tuple[int, ...]:
    return tuple(encode_context(tok, context_prompt(tok, question, context), context))


def _check_questions(
    model: nn.Module,
    tok: Any,
    questions: Sequence[str],
    references: Sequence[Sequence[int]],
    context: GenContext,
    max_new_tokens: int,
    batch_size: int,
) -> list[bool]:
    """Whether each question's greedy generation in ``context`` is exactly its reference ids
    (:func:`decodes_to`, one check per distinct question and reference)."""
    pairs = [(_encode_question(tok, q, context), tuple(r)) for q, r in zip(questions, references)]
    unique = list(dict.fromkeys(pairs))
    same = decodes_to(
        model, tok, [p for p, _ in unique], [r for _, r in unique], max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    by_pair = dict(zip(unique, same))
    return [by_pair[pr] for pr in pairs]


def _check_reference(facts: Sequence[GenFact], reference: Sequence[Sequence[Sequence[int]]]) -> None:
    if len(reference) != len(facts):
        raise ValueError(f"reference: {len(reference)} entries for {len(facts)} facts")
    for i, (f, ref) in enumerate(zip(facts, reference)):
        if len(ref) != len(f.neighbourhood):
            raise ValueError(
                f"reference: fact {i} ({f.rewrite!r}) has {len(f.neighbourhood)} neighbourhood prompts but "
                f"{len(ref)} reference generations"
            )


def generated_scores(
    model: nn.Module,
    tok: Any,
    facts: Sequence[GenFact],
    *,
    context: GenContext,
    max_new_tokens: int = 50,
    batch_size: int = 32,
    reference: Sequence[tuple[tuple[int, ...], ...]] | None = None,
) -> list[GenScores]:
    """WILD scores of every fact (see the module docstring): the prompts that are decoded go through one
    :func:`greedy_generate` call, the neighbourhood prompts with a reference through one :func:`decodes_to`.

    Args:
        context: ``bare``, ``qa`` or ``chat`` (:func:`context_prompt`).
        max_new_tokens: the generation cap (50 in the WILD protocol).
        batch_size: prompts per generation batch.
        reference: per fact, the unedited model's generated ids of each neighbourhood prompt
            (the ``neighbour_ids`` of a run on the unedited model), checked by :func:`decodes_to`;
            None: the neighbourhood prompts are decoded and ``gen_ns`` is nan.
    """
    if reference is not None:
        _check_reference(facts, reference)
    eos_texts = (*EOS_TEXTS, tok.eos_token) if getattr(tok, "eos_token", None) else EOS_TEXTS
    asked = [q for f in facts for q in (f.rewrite, *f.paraphrases)]
    answers: list[tuple[str, ...] | None] = [f.answers for f in facts for _ in range(1 + len(f.paraphrases))]
    if reference is None:  # the unedited model: its neighbourhood generations become the reference
        asked += [q for f in facts for q in f.neighbourhood]
        answers += [None] * (len(asked) - len(answers))
        same: list[bool] = []
    else:  # an edited model: only whether each neighbourhood generation is still the reference's
        neighbours = [q for f in facts for q in f.neighbourhood]
        refs = [r for ref in reference for r in ref]
        same = _check_questions(model, tok, neighbours, refs, context, max_new_tokens, batch_size)
    gens = _generate_questions(
        model, tok, asked, context, max_new_tokens, batch_size, answers, (*STOP_TEXTS, *eos_texts)
    )
    texts = [cut_answer(t, eos_texts=eos_texts) for t in tok.batch_decode([list(g) for g in gens])]
    out: list[GenScores] = []
    at = at_neigh = 0
    n_asked = sum(1 + len(f.paraphrases) for f in facts)
    for f in facts:
        n_para, n_neigh = len(f.paraphrases), len(f.neighbourhood)
        own = texts[at : at + 1 + n_para]
        at += 1 + n_para
        if reference is None:
            neighbour_ids = tuple(gens[n_asked + at_neigh : n_asked + at_neigh + n_neigh])
            own = own + texts[n_asked + at_neigh : n_asked + at_neigh + n_neigh]
            ns = math.nan
        else:
            neighbour_ids = ()
            ns = _mean([float(x) for x in same[at_neigh : at_neigh + n_neigh]])
        at_neigh += n_neigh
        out.append(
            GenScores(
                gen_es=exact_match(own[0], f.answers),
                gen_ps=_mean([exact_match(t, f.answers) for t in own[1 : 1 + n_para]]),
                gen_ns=ns,
                texts=tuple(own),
                neighbour_ids=neighbour_ids,
            )
        )
    return out
