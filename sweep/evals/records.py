"""The typed record every benchmark's loader produces (:mod:`sweep.evals.data`, :mod:`sweep.evals.mquake`) and the
error a bad one raises: the lowest floor of the data, imported by loaders, metrics and trials alike."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from editors.requests import EditRequest

#: The benchmarks a trial can edit (``DatasetConfig.name``; :func:`sweep.evals.data.load_dataset`).
BENCHMARKS = ("counterfact", "zsre", "qaedit", "mquake", "wikibigedit", "ultraeditbench")
#: the question-answering benchmarks, scored by token accuracy (the ZsRE lineage)
QA_BENCHMARKS = ("zsre", "qaedit", "wikibigedit", "ultraeditbench")


class DatasetError(ValueError):
    """A dataset record or selection is invalid; the message names the case id and the field."""


class SourceUnavailable(DatasetError):
    """The dataset's file is not at hand: a local path that is not a file, or a URL that could not be
    downloaded. A dry run plans without it (facts counted by position); every other :class:`DatasetError`
    (a bad record, more edits than the selection holds) stops a dry run as it stops a launch."""


@dataclass(frozen=True)
class Record:
    """One edit case of any benchmark.

    Attributes:
        prompt: the rewrite prompt with ``{}`` for the subject.
        target_true: the true object, for display and CounterFact's scores. ZsRE (target ``answers``)
            and QAEdit edit in the true answer itself, so there it equals ``target_new``; under ZsRE's
            ``alt`` target it is the first gold answer.
        neighborhood_prompts: prompts whose answer must not change: about other subjects whose answer
            is ``neighborhood_answer`` (the record's true object in CounterFact; NS asks that it still
            beats ``target_new``), or unrelated questions (ZsRE, QAEdit).
        generation_prompts: prompts for the generation-entropy test (ROME format only).
        dataset: the benchmark (one of :data:`BENCHMARKS`); it decides how the record is scored.
        neighborhood_answers: one answer per neighbourhood prompt when they differ (KnowEdit's
            Relation_Specificity); empty: every prompt's answer is ``neighborhood_answer``.
        target_aliases: other answers that count as ``target_new`` under exact match (ZsRE's other
            gold answers when the target is the first one).
        portability: (question, answer) pairs that follow from the edit without stating it
            (WikiBigEdit's persona-styled paraphrase, answered by the new answer, and its multi-hop
            question), scored as ``port``.
    """

    case_id: int
    prompt: str
    subject: str
    target_new: str
    target_true: str
    paraphrase_prompts: tuple[str, ...]
    neighborhood_prompts: tuple[str, ...]
    neighborhood_answer: str
    generation_prompts: tuple[str, ...] = ()
    relation_id: str | None = None
    dataset: str = "counterfact"
    neighborhood_answers: tuple[str, ...] = ()
    target_aliases: tuple[str, ...] = ()
    portability: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.dataset not in BENCHMARKS:
            raise DatasetError(f"case {self.case_id}: dataset {self.dataset!r} is not one of {BENCHMARKS}")
        if self.neighborhood_answers and len(self.neighborhood_answers) != len(self.neighborhood_prompts):
            raise DatasetError(
                f"case {self.case_id}: neighborhood_answers has {len(self.neighborhood_answers)} answers for "
                f"{len(self.neighborhood_prompts)} neighborhood_prompts"
            )

    @property
    def rewrite_prompt(self) -> str:
        return self.prompt.replace("{}", self.subject, 1)

    def request(self) -> EditRequest:
        return EditRequest(self.prompt, self.subject, self.target_new, self.target_true, self.case_id)

    def neighbourhood_pairs(self) -> tuple[tuple[str, str], ...]:
        """(prompt, its answer) for every neighbourhood prompt."""
        answers = self.neighborhood_answers or (self.neighborhood_answer,) * len(self.neighborhood_prompts)
        return tuple(zip(self.neighborhood_prompts, answers, strict=True))


def check_unique(case_ids: Sequence[Any], source: str, error: type[DatasetError] = DatasetError) -> None:
    """Every case id at most once in ``source``, else ``error`` naming the first repeated one."""
    seen: set[Any] = set()
    for cid in case_ids:
        if cid in seen:
            raise error(f"case {cid}: duplicate case_id in {source}")
        seen.add(cid)
