"""MQuAKE: multi-hop questions that test whether edits propagate (Zhong et al., EMNLP 2023, arXiv 2305.14795).

A case is a chain of 2-4 facts with one or more of them edited (``requested_rewrite``, CounterFact style),
three paraphrased multi-hop questions whose answer changes because of the edits, and the gold answers
before (``answer``) and after (``new_answer``) editing, each with Wikidata aliases. Every record is
validated when loaded, before any model work; an error names the case id and the field.

Evaluation, as the MQuAKE README and paper describe it for weight-editing methods (princeton-nlp/MQuAKE
released only MeLLo's notebook, not the editing-method evaluation code, so the rules below are written
here and each is named in its docstring):

- **multi-hop accuracy**: each question is asked after the paper's in-context demonstrations, standard
  (``multihop-prompts.txt``) or chain-of-thought (``multihop-cot-prompts.txt``), in the file's own layout
  (:data:`STYLES`); the answer is read from a greedy generation (:func:`extract_answer`); a case is
  correct if **any** of its questions is answered with ``new_answer`` or an alias (``multihop_new``), or,
  as a pre-edit check, with ``answer`` or an alias (``multihop_old``);
- **edit-wise success**: each edited fact's cloze statement (``prompt`` filled with the subject, no
  demonstrations) is completed greedily; it is recalled if the completion starts with ``target_new``
  (:func:`recalls_target`).

The demonstration files are MIT-licensed text of princeton-nlp/MQuAKE; they are read from a folder the
caller names (:func:`load_prompt`) and never shipped here. Their layout, the only thing the code needs
to know about them, is kept in :data:`STYLES`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from editors.requests import EditRequest, encode, fill, target_ids

from .generation import exact_match, greedy_generate, normalize_answer
from .records import DatasetError, Record, check_unique

log = logging.getLogger(__name__)

Style = Literal["direct", "cot"]
Match = Literal["normalized", "exact"]


class MQuAKEError(DatasetError):
    """An MQuAKE record, prompt folder or scoring argument is invalid; the message names the case id
    (or the argument) and the field."""


# ----------------------------------------------------------------------------------------------------
# Records


@dataclass(frozen=True)
class Rewrite:
    """One edited fact of a case (an element of ``requested_rewrite``).

    Attributes:
        prompt: the cloze template with ``{}`` for the subject, e.g. ``"{} was performed by"``.
        subject: e.g. ``"Hey Jude"``.
        target_new: the edited object (``target_new.str``), e.g. ``"Madonna"``.
        target_true: the object before editing (``target_true.str``).
        question: the fact as a question, e.g. ``"Who performed Hey Jude?"``.
        relation_id: the Wikidata relation, e.g. ``"P175"``, if given.
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str
    question: str
    relation_id: str | None = None

    @property
    def cloze(self) -> str:
        """The edited statement without its object: ``prompt`` with the subject filled in."""
        return fill(self.prompt, self.subject)[0]

    def request(self, case_id: int | str | None = None) -> EditRequest:
        return EditRequest(self.prompt, self.subject, self.target_new, self.target_true, case_id)


@dataclass(frozen=True)
class Hop:
    """One single-hop fact of a case's chain (``single_hops`` / ``new_single_hops``)."""

    question: str
    cloze: str
    answer: str
    aliases: tuple[str, ...]


@dataclass(frozen=True)
class Case:
    """One MQuAKE case.

    Attributes:
        rewrites: the edits, in the file's order.
        questions: the paraphrased multi-hop questions (three in MQuAKE), verbatim (a few of them end in
            a space in the data; it is kept, as the authors' code keeps it).
        answer, answer_aliases: the gold answer before editing and its aliases.
        new_answer, new_answer_aliases: the gold answer after editing and its aliases.
        single_hops, new_single_hops: the chain's one-hop facts before and after editing.
    """

    case_id: int
    rewrites: tuple[Rewrite, ...]
    questions: tuple[str, ...]
    answer: str
    answer_aliases: tuple[str, ...]
    new_answer: str
    new_answer_aliases: tuple[str, ...]
    single_hops: tuple[Hop, ...]
    new_single_hops: tuple[Hop, ...]

    @property
    def answers(self) -> tuple[str, ...]:
        """The pre-edit answer and its aliases."""
        return (self.answer, *self.answer_aliases)

    @property
    def new_answers(self) -> tuple[str, ...]:
        """The post-edit answer and its aliases."""
        return (self.new_answer, *self.new_answer_aliases)

    def requests(self) -> list[EditRequest]:
        """The case's edits as requests, ``case_id`` ``"<case_id>/<j>"`` for the j-th rewrite."""
        return [r.request(f"{self.case_id}/{j}") for j, r in enumerate(self.rewrites)]


def _get(node: Any, key: str, path: str, cid: Any) -> Any:
    if not isinstance(node, dict) or key not in node:
        raise MQuAKEError(f"case {cid}: missing field {path!r}")
    return node[key]


def _text(value: Any, path: str, cid: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise MQuAKEError(f"case {cid}: field {path!r} must be a non-empty string, got {value!r}")
    return value


def _list(value: Any, path: str, cid: Any, *, nonempty: bool = True) -> list[Any]:
    if not isinstance(value, list) or (nonempty and not value):
        what = "a non-empty list" if nonempty else "a list"
        raise MQuAKEError(f"case {cid}: field {path!r} must be {what}, got {type(value).__name__}")
    return value


def _aliases(value: Any, path: str, cid: Any) -> tuple[str, ...]:
    items = _list(value, path, cid, nonempty=False)
    for k, a in enumerate(items):
        if not isinstance(a, str):
            raise MQuAKEError(f"case {cid}: field '{path}[{k}]' must be a string, got {a!r}")
    return tuple(items)


def _str_at(rec: Any, keys: Sequence[str], path: str, cid: Any) -> str:
    """The non-empty string at ``rec[keys[0]][keys[1]]...``; ``path`` names it in errors."""
    node = rec
    for key in keys:
        node = _get(node, key, path, cid)
    return _text(node, path, cid)


def _rewrite(rec: Any, path: str, cid: Any) -> Rewrite:
    def text(*keys: str) -> str:
        return _str_at(rec, keys, ".".join((path, *keys)), cid)

    prompt = text("prompt")
    if prompt.count("{}") != 1:
        raise MQuAKEError(f"case {cid}: field '{path}.prompt' must hold exactly one '{{}}' for the subject: {prompt!r}")
    rel = rec.get("relation_id")
    if rel is not None and not isinstance(rel, str):
        raise MQuAKEError(f"case {cid}: field '{path}.relation_id' must be a string, got {rel!r}")
    return Rewrite(
        prompt=prompt,
        subject=text("subject"),
        target_new=text("target_new", "str").strip(),
        target_true=text("target_true", "str").strip(),
        question=text("question"),
        relation_id=rel,
    )


def _hop(rec: Any, path: str, cid: Any) -> Hop:
    def text(key: str) -> str:
        return _str_at(rec, (key,), f"{path}.{key}", cid)

    aliases = _aliases(_get(rec, "answer_alias", f"{path}.answer_alias", cid), f"{path}.answer_alias", cid)
    return Hop(text("question"), text("cloze"), text("answer").strip(), aliases)


def parse_case(rec: Any) -> Case:
    """One MQuAKE record (MQuAKE-CF, -CF-3k(-v2), -T or the hard subset) -> a validated :class:`Case`.

    ``orig`` (the Wikidata triples) and MQuAKE-T's ``answer_extended`` are not kept."""
    if not isinstance(rec, dict):
        raise MQuAKEError(f"every MQuAKE record must be a JSON object, got {type(rec).__name__}")
    cid = rec.get("case_id", "?")
    if not isinstance(cid, int) or isinstance(cid, bool):
        raise MQuAKEError(f"case {cid}: field 'case_id' must be an integer")
    rw = _list(_get(rec, "requested_rewrite", "requested_rewrite", cid), "requested_rewrite", cid)
    questions = _list(_get(rec, "questions", "questions", cid), "questions", cid)
    hops = {
        key: tuple(_hop(h, f"{key}[{k}]", cid) for k, h in enumerate(_list(_get(rec, key, key, cid), key, cid)))
        for key in ("single_hops", "new_single_hops")
    }
    if len(hops["single_hops"]) != len(hops["new_single_hops"]):
        raise MQuAKEError(
            f"case {cid}: field 'new_single_hops' has {len(hops['new_single_hops'])} hops but "
            f"'single_hops' has {len(hops['single_hops'])}"
        )
    return Case(
        case_id=cid,
        rewrites=tuple(_rewrite(r, f"requested_rewrite[{j}]", cid) for j, r in enumerate(rw)),
        questions=tuple(_text(q, f"questions[{k}]", cid) for k, q in enumerate(questions)),
        answer=_str_at(rec, ("answer",), "answer", cid).strip(),
        answer_aliases=_aliases(_get(rec, "answer_alias", "answer_alias", cid), "answer_alias", cid),
        new_answer=_str_at(rec, ("new_answer",), "new_answer", cid).strip(),
        new_answer_aliases=_aliases(_get(rec, "new_answer_alias", "new_answer_alias", cid), "new_answer_alias", cid),
        single_hops=hops["single_hops"],
        new_single_hops=hops["new_single_hops"],
    )


def parse_cases(data: Any, source: str = "MQuAKE") -> list[Case]:
    """A JSON list of MQuAKE records -> cases, in order; duplicate case ids are an error."""
    if not isinstance(data, list) or not data:
        raise MQuAKEError(f"{source}: expected a non-empty JSON list of MQuAKE records")
    cases = [parse_case(r) for r in data]
    check_unique([c.case_id for c in cases], source, MQuAKEError)
    return cases


def load_cases(path: str | Path, n: int | None = None) -> list[Case]:
    """The cases of an MQuAKE JSON file (all validated), the first ``n`` of them if given."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise MQuAKEError(f"mquake: {path} is not a file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise MQuAKEError(f"mquake: {path} is not valid JSON ({e})") from None
    cases = parse_cases(data, str(path))
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise MQuAKEError(f"mquake: n must be an integer >= 1, got {n!r}")
        if n > len(cases):
            raise MQuAKEError(f"mquake: {n} cases requested but {path} has only {len(cases)}")
        cases = cases[:n]
    return cases


def edit_conflicts(cases: Iterable[Case]) -> dict[tuple[str, str], set[str]]:
    """(subject, relation) -> the differing new objects, for every fact that two edits of ``cases`` set
    to different objects (the relation is ``relation_id``, else the prompt). Editing such cases together
    makes their multi-hop answers ill-defined: the knowledge conflicts that MQuAKE-CF-3k-v2 removed."""
    targets: dict[tuple[str, str], set[str]] = {}
    for c in cases:
        for r in c.rewrites:
            targets.setdefault((r.subject, r.relation_id or r.prompt), set()).add(r.target_new)
    return {k: v for k, v in targets.items() if len(v) > 1}


# ----------------------------------------------------------------------------------------------------
# Prompting


@dataclass(frozen=True)
class PromptStyle:
    """How one of the paper's multi-hop prompt files is used.

    Attributes:
        file: the file's name in princeton-nlp/MQuAKE's ``prompts/``.
        md5: the md5 of that file at commit fb43dadc (a differing copy is used, with a warning).
        before, after: the text put around the question after the demonstrations: one more
            demonstration in the file's own layout, its answer left to the model.
        stop_texts: where greedy generation may stop: the end of the answer's line (``direct``; not
            ``"."``, which answers such as ``Washington, D.C.`` hold), or the blank line / next
            ``Question:`` that ends a demonstration (``cot``).
        max_new_tokens: the default generation budget (``cot`` writes its reasoning first; MeLLo's
            notebook allows 256 tokens).
    """

    file: str
    md5: str
    before: str
    after: str
    stop_texts: tuple[str, ...]
    max_new_tokens: int


#: The two layouts. ``multihop-prompts.txt`` is one demonstration a line, ``Q: <question> A: <answer>``,
#: lines joined by ``\n``, no final newline; ``multihop-cot-prompts.txt`` is blocks of three lines,
#: ``Question: <q>`` / ``Thoughts: <reasoning>`` / ``Answer: <a>``, joined by a blank line, no final newline.
STYLES: dict[str, PromptStyle] = {
    "direct": PromptStyle(
        file="multihop-prompts.txt",
        md5="f3f2cbcee9213e16372a2a0d636cb111",
        before="\nQ: ",
        after=" A:",
        stop_texts=("\n",),
        max_new_tokens=32,
    ),
    "cot": PromptStyle(
        file="multihop-cot-prompts.txt",
        md5="87bcbbd4fb1c1d9f951e0ef53193be30",
        before="\n\nQuestion: ",
        after="\nThoughts:",
        stop_texts=("\n\n", "\nQuestion:"),
        max_new_tokens=256,
    ),
}
#: the prefix of the answer line in the chain-of-thought layout
COT_ANSWER = "Answer:"
#: stop texts of the cloze completions (edit-wise success): the line's end; not ``"."``, which targets hold
CLOZE_STOP_TEXTS = ("\n",)
#: cloze completions run this many tokens past the target's own length, so that :func:`recalls_target`
#: sees where the target's last word ends
CLOZE_EXTRA_TOKENS = 2


def _style(style: str) -> PromptStyle:
    if style not in STYLES:
        raise MQuAKEError(f"mquake.style: {style!r} is not one of {sorted(STYLES)}")
    return STYLES[style]


def load_prompt(prompts_dir: str | Path | None, style: Style = "direct") -> str:
    """The demonstrations of ``style`` from ``prompts_dir`` (a copy of princeton-nlp/MQuAKE's
    ``prompts/``), without trailing newlines (the upstream files have none).

    There is no default folder: the files are the MQuAKE authors', so the caller says where they are.
    A copy whose md5 differs from the upstream file's is used, with a warning."""
    st = _style(style)
    if prompts_dir is None:
        raise MQuAKEError(
            f"mquake.prompts_dir: not given; name a folder holding princeton-nlp/MQuAKE's prompts/{st.file} "
            "(https://github.com/princeton-nlp/MQuAKE/tree/main/prompts)"
        )
    path = Path(prompts_dir).expanduser() / st.file
    if not path.is_file():
        raise MQuAKEError(f"mquake.prompts_dir: {path} not found (the {style!r} style reads {st.file})")
    raw = path.read_bytes()
    if (digest := hashlib.md5(raw, usedforsecurity=False).hexdigest()) != st.md5:
        log.warning("%s has md5 %s, not the upstream file's %s: using it as it is", path, digest, st.md5)
    return raw.decode("utf-8").rstrip("\r\n")


def question_prompt(demos: str, question: str, style: Style = "direct") -> str:
    """The text the model continues: the demonstrations, then ``question`` as one more demonstration in
    the file's layout with the answer left open (``direct``: ``demos + "\\nQ: " + question + " A:"``;
    ``cot``: ``demos + "\\n\\nQuestion: " + question + "\\nThoughts:"``). The question is kept verbatim."""
    st = _style(style)
    return demos + st.before + question + st.after


def extract_answer(generation: str, style: Style = "direct") -> str:
    """The answer in a continuation of :func:`question_prompt`.

    ``direct``: the text up to the first newline, stripped (the answer's line of the layout).
    ``cot``: the text after ``Answer:`` on the first line that starts with it (before any next
    ``Question:``), stripped; ``""`` when there is none (the model did not answer in the layout; such
    a question counts as wrong, as MeLLo's notebook counts a question with no ``Final answer:``)."""
    _style(style)
    if style == "direct":
        return generation.split("\n", 1)[0].strip()
    body = generation.split("\nQuestion:", 1)[0]
    for line in body.split("\n"):
        line = line.strip()
        if line.startswith(COT_ANSWER):
            return line[len(COT_ANSWER) :].strip()
    return ""


# ----------------------------------------------------------------------------------------------------
# Matching


def answer_matches(prediction: str, golds: Iterable[str], match: Match = "normalized") -> bool:
    """Whether ``prediction`` is one of ``golds`` (an answer and its aliases).

    ``normalized`` (the default): equal after SQuAD normalisation (:func:`sweep.evals.generation.exact_match`).
    ``exact``: the stripped prediction equals one of them as written, MeLLo's rule (``ans ==
    d["new_answer"] or ans in d["new_answer_alias"]``, princeton-nlp/MQuAKE ``run_mello.ipynb``), which
    ``normalized`` only widens (case, punctuation, articles). No containment: ``"Arabic or English"``
    matches neither. An empty prediction never matches, not even a gold answer that normalises to
    nothing."""
    if match == "exact":
        p = prediction.strip()
        return bool(p) and any(p == g for g in golds)
    if match != "normalized":
        raise MQuAKEError(f"mquake.match: {match!r} is not one of ['exact', 'normalized']")
    return bool(normalize_answer(prediction)) and exact_match(prediction, list(golds)) == 1.0


def recalls_target(generation: str, target: str) -> bool:
    """Edit-wise success of one edit: the cloze completion starts with ``target``, in whole words,
    after SQuAD normalisation (:func:`sweep.evals.generation.normalize_answer`). The paper counts an edit
    when the edited model's answer to the cloze statement is the new object; under greedy decoding, a
    completion that starts with the object is the generated form of the reference code's "every
    target token is the argmax"."""
    g, t = normalize_answer(generation), normalize_answer(target)
    return bool(t) and (g == t or g.startswith(t + " "))


# ----------------------------------------------------------------------------------------------------
# Scoring


@dataclass(frozen=True)
class CaseScores:
    """One case's scores (each in [0, 1]) and what they were read from.

    Attributes:
        multihop_new: 1 if any question was answered with ``new_answer`` or an alias (multi-hop accuracy).
        multihop_old: the same against ``answer`` and its aliases (the pre-edit check).
        edit_wise: the fraction of the case's edits whose cloze completion starts with ``target_new``.
        answers: the answer read from each question's generation (:func:`extract_answer`).
        generations: each question's decoded continuation.
        new_hits, old_hits: per question, whether its answer matched the new / the original answer.
        cloze_generations, edit_hits: per edit, the cloze completion and whether it recalled the edit.
    """

    case_id: int
    style: str
    multihop_new: float
    multihop_old: float
    edit_wise: float
    answers: tuple[str, ...]
    generations: tuple[str, ...]
    new_hits: tuple[bool, ...]
    old_hits: tuple[bool, ...]
    cloze_generations: tuple[str, ...]
    edit_hits: tuple[bool, ...]


def _generate(
    model: Any,
    tok: Any,
    texts: Sequence[str],
    max_new_tokens: int,
    stop_texts: Sequence[str],
    batch_size: int,
    keep: Sequence[int] | None = None,
) -> list[str]:
    """Greedy continuations of ``texts`` (:func:`sweep.evals.generation.greedy_generate`), decoded without
    special tokens; each distinct text is generated once (MQuAKE cases share many edits). ``keep``: the
    number of new tokens to keep of each (greedy decoding is prefix-consistent, so this is what a run
    with that budget alone returns)."""
    unique = list(dict.fromkeys(texts))
    ids = [encode(tok, t)[0] for t in unique]
    new = greedy_generate(model, tok, ids, max_new_tokens=max_new_tokens, stop_texts=stop_texts, batch_size=batch_size)
    if len(new) != len(ids):
        raise RuntimeError(f"greedy_generate returned {len(new)} continuations for {len(ids)} prompts")
    by_text = dict(zip(unique, new))
    keep = keep if keep is not None else [max_new_tokens] * len(texts)
    return [tok.decode(list(by_text[t])[:k], skip_special_tokens=True) for t, k in zip(texts, keep)]


def _case_scores(case: Case, style: Style, gens: Sequence[str], cloze_gens: Sequence[str], match: Match) -> CaseScores:
    answers = tuple(extract_answer(g, style) for g in gens)
    new_hits = tuple(answer_matches(a, case.new_answers, match) for a in answers)
    old_hits = tuple(answer_matches(a, case.answers, match) for a in answers)
    edit_hits = tuple(recalls_target(g, r.target_new) for g, r in zip(cloze_gens, case.rewrites))
    return CaseScores(
        case_id=case.case_id,
        style=style,
        multihop_new=float(any(new_hits)),
        multihop_old=float(any(old_hits)),
        edit_wise=sum(edit_hits) / len(edit_hits),
        answers=answers,
        generations=tuple(gens),
        new_hits=new_hits,
        old_hits=old_hits,
        cloze_generations=tuple(cloze_gens),
        edit_hits=edit_hits,
    )


def multihop_scores(
    model: Any,
    tok: Any,
    cases: Sequence[Case],
    prompts_dir: str | Path | None,
    style: Style = "direct",
    *,
    max_new_tokens: int | None = None,
    batch_size: int = 32,
    match: Match = "normalized",
) -> list[CaseScores]:
    """MQuAKE's multi-hop accuracy (new and original answer) and edit-wise success of ``cases`` on the
    model as it is (edited or not), one :class:`CaseScores` per case, in order.

    Every question of every case is asked with :func:`question_prompt` after the ``style``
    demonstrations read from ``prompts_dir`` (:func:`load_prompt`) and continued greedily for at most
    ``max_new_tokens`` (default: the style's, :data:`STYLES`) to the style's stop texts; the answer is
    read by :func:`extract_answer` and compared by :func:`answer_matches` under ``match``. Each edit's
    cloze statement is continued greedily, no demonstrations, for its target's token count +
    :data:`CLOZE_EXTRA_TOKENS` (each edit's own budget, so a case scores the same whichever cases it is
    scored with) and checked by :func:`recalls_target`. Prompts are tokenised with the tokenizer's
    special tokens (BOS where it adds one)."""
    st = _style(style)
    if match not in ("normalized", "exact"):
        raise MQuAKEError(f"mquake.match: {match!r} is not one of ['exact', 'normalized']")
    budget = st.max_new_tokens if max_new_tokens is None else max_new_tokens
    if budget < 1 or batch_size < 1:
        raise MQuAKEError(f"mquake: max_new_tokens and batch_size must be >= 1, got {budget} and {batch_size}")
    demos = load_prompt(prompts_dir, style)
    if not cases:
        return []
    texts = [question_prompt(demos, q, style) for c in cases for q in c.questions]
    gens = _generate(model, tok, texts, budget, st.stop_texts, batch_size)
    clozes = [r.cloze for c in cases for r in c.rewrites]
    keep = [len(target_ids(tok, r.target_new)) + CLOZE_EXTRA_TOKENS for c in cases for r in c.rewrites]
    cloze_gens = _generate(model, tok, clozes, max(keep), CLOZE_STOP_TEXTS, batch_size, keep)
    out, qi, ri = [], 0, 0
    for c in cases:
        nq, nr = len(c.questions), len(c.rewrites)
        out.append(_case_scores(c, style, gens[qi : qi + nq], cloze_gens[ri : ri + nr], match))
        qi, ri = qi + nq, ri + nr
    log.info(
        "mquake %s: %d cases, %d questions, %d edits: %s",
        style,
        len(cases),
        len(texts),
        len(clozes),
        {k: round(v, 1) for k, v in aggregate_mquake(out).items()},
    )
    return out


def aggregate_mquake(scores: Sequence[CaseScores]) -> dict[str, float]:
    """Means over cases, ×100: ``mquake_multihop`` (multi-hop accuracy, new answer),
    ``mquake_multihop_orig`` (the same against the original answer) and ``mquake_edit_wise``."""
    if not scores:
        raise ValueError("aggregate_mquake: no case scores")
    n = len(scores)
    return {
        "mquake_multihop": 100.0 * sum(s.multihop_new for s in scores) / n,
        "mquake_multihop_orig": 100.0 * sum(s.multihop_old for s in scores) / n,
        "mquake_edit_wise": 100.0 * sum(s.edit_wise for s in scores) / n,
    }


__all__ = [
    "CLOZE_EXTRA_TOKENS", "CLOZE_STOP_TEXTS", "COT_ANSWER", "STYLES", "Case", "CaseScores", "Hop", "MQuAKEError",
    "PromptStyle", "Rewrite", "aggregate_mquake", "answer_matches", "edit_conflicts", "extract_answer",
    "load_cases", "load_prompt", "multihop_scores", "parse_case", "parse_cases", "question_prompt",
    "recalls_target",
]  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# MQuAKE as a trial's dataset: each case's rewrites are edits; its questions are asked once they all are in

#: a rewrite's record id: case_id × CASE_STRIDE + its index in the case (MQuAKE cases hold at most 4)
CASE_STRIDE = 10


def case_records(cases: Sequence[Case]) -> list[Any]:
    """Every rewrite of ``cases`` as a :class:`sweep.evals.data.Record` (``dataset="mquake"``), case by case
    in order, ``case_id = case × CASE_STRIDE + j``. A rewrite has no paraphrase or neighbourhood prompt:
    its teacher-forced ES is CounterFact's (P(new) > P(true) after the cloze); MQuAKE's own measure is
    the multi-hop one (:func:`multihop_metrics`)."""
    out = []
    for c in cases:
        if len(c.rewrites) > CASE_STRIDE:
            raise MQuAKEError(f"case {c.case_id}: {len(c.rewrites)} rewrites, at most {CASE_STRIDE} are supported")
        for j, rw in enumerate(c.rewrites):
            out.append(
                Record(
                    case_id=c.case_id * CASE_STRIDE + j,
                    prompt=rw.prompt,
                    subject=rw.subject,
                    target_new=rw.target_new,
                    target_true=rw.target_true,
                    paraphrase_prompts=(),
                    neighborhood_prompts=(),
                    neighborhood_answer=rw.target_true,
                    relation_id=rw.relation_id,
                    dataset="mquake",
                )
            )
    if conflicts := edit_conflicts(cases):
        log.warning(
            "MQuAKE: %d (subject, relation) pairs are edited to different objects by different cases (e.g. %s); "
            "edited together, the later edit wins",
            len(conflicts),
            next(iter(conflicts)),
        )
    return out


def complete_cases(cases: Sequence[Case], record_ids: Iterable[int]) -> list[Case]:
    """The cases every rewrite of which is among ``record_ids`` (the edits in the model)."""
    have = set(record_ids)
    return [c for c in cases if all(c.case_id * CASE_STRIDE + j in have for j in range(len(c.rewrites)))]


def multihop_metrics(
    model: Any,
    tok: Any,
    cases: Sequence[Case],
    prompts_dir: str | Path | None,
    style: Style = "direct",
    *,
    batch_size: int = 32,
) -> dict[str, float]:
    """:func:`aggregate_mquake` of :func:`multihop_scores` (×100), plus ``mquake_cases``, the number
    of cases asked; empty when no case is complete."""
    if not cases:
        return {}
    scores = multihop_scores(model, tok, cases, prompts_dir, style, batch_size=batch_size)
    return {**aggregate_mquake(scores), "mquake_cases": float(len(cases))}
