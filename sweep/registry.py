"""Every metric a trial reports, declared once: its name, dataset, protocol, scale, which way is better and
what it means. The trial's result, the worker's reports, MLflow, the per-record CSV, the progress table
and the report all read their names, orders and labels from here; adding a metric touches this module
and the code that computes it.

Protocols (docs/ALGORITHMS.md §4): ``teacher_forced`` scores a target's tokens given the prompt (the
reference code's ES/PS/NS, EM/PM/NM and token accuracies), ``sampled`` generates text (generation
entropy), ``model`` measures the model itself (held-out perplexity). A name never changes protocol, so
a teacher-forced number is never compared with a generated one by accident.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Metric:
    """One metric.

    Attributes:
        name: its key in results, MLflow (``<stage>.<name>``) and reports.
        dataset: the data it is defined on (``counterfact``; ``any`` for a model-level measure).
        protocol: ``teacher_forced``, ``sampled`` or ``model`` (see the module docstring).
        scale: ``percent`` (0-100 in results; per record in [0, 1]), ``signed_percent`` (a mean
            probability gap, −100-100), ``entropy`` (bits-weighted n-gram entropy) or ``perplexity``.
        higher_is_better: which way is better.
        per_record: a per-record score averaged over records (False: computed on the aggregate, e.g.
            S = hmean(ES, PS, NS), or on other text, e.g. perplexity).
        label: the report's axis and column label.
        meaning: one line of what it measures.
        summary: shown in compact tables (the trial's printed table); the token accuracies are not.
    """

    name: str
    dataset: Literal["counterfact", "any"]
    protocol: Literal["teacher_forced", "sampled", "model"]
    scale: Literal["percent", "signed_percent", "entropy", "perplexity"]
    higher_is_better: bool
    per_record: bool
    label: str
    meaning: str
    summary: bool = True


METRICS: tuple[Metric, ...] = (
    Metric("es", "counterfact", "teacher_forced", "percent", True, True, "ES (efficacy)",
           "the rewrite prompt gives the new target a higher probability than the true one"),
    Metric("ps", "counterfact", "teacher_forced", "percent", True, True, "PS (paraphrase)",
           "the same, on the paraphrased prompts"),
    Metric("ns", "counterfact", "teacher_forced", "percent", True, True, "NS (neighbourhood)",
           "prompts about other subjects still prefer their true answer to the new target"),
    Metric("s", "counterfact", "teacher_forced", "percent", True, False, "S (score)",
           "harmonic mean of ES, PS and NS"),
    Metric("em", "counterfact", "teacher_forced", "signed_percent", True, True, "EM (efficacy magnitude)",
           "mean P(new) − P(true) on the rewrite prompt"),
    Metric("pm", "counterfact", "teacher_forced", "signed_percent", True, True, "PM (paraphrase magnitude)",
           "mean P(new) − P(true) on the paraphrases"),
    Metric("nm", "counterfact", "teacher_forced", "signed_percent", True, True, "NM (neighbourhood magnitude)",
           "mean P(true) − P(new) on the neighbourhood prompts"),
    Metric("es_acc", "counterfact", "teacher_forced", "percent", True, True, "ES accuracy",
           "the new target's tokens are each the argmax after the rewrite prompt", summary=False),
    Metric("ps_acc", "counterfact", "teacher_forced", "percent", True, True, "PS accuracy",
           "the same after the paraphrases", summary=False),
    Metric("ns_acc", "counterfact", "teacher_forced", "percent", True, True, "NS accuracy",
           "the true answer's tokens are each the argmax after the neighbourhood prompts", summary=False),
    Metric("ge", "counterfact", "sampled", "entropy", True, False, "GE (generation entropy)",
           "n-gram entropy of sampled continuations: low means repetitive, broken text"),
    Metric("ppl", "any", "model", "perplexity", False, False, "perplexity",
           "held-out perplexity of the model on a fixed text slice"),
)  # fmt: skip

BY_NAME = {m.name: m for m in METRICS}
#: the four headline scores, in the order tables and curves show them
CORE = ("es", "ps", "ns", "s")
#: the per-record scores (the fields of a stored pre-edit score row), in protocol order
RECORD_FIELDS = tuple(m.name for m in METRICS if m.per_record)
#: every name a stage (pre, at_edit, final) may hold
NAMES = tuple(m.name for m in METRICS)
#: what compact tables show
SUMMARY = tuple(m.name for m in METRICS if m.summary)
#: scoring stages in protocol order: the unedited model, each batch right after its edit, the final model
STAGES = ("pre", "at_edit", "final")


def label(name: str) -> str:
    """The report's label of a metric name (the name itself when it is not one)."""
    m = BY_NAME.get(name)
    return m.label if m is not None else name


__all__ = ["BY_NAME", "CORE", "METRICS", "NAMES", "RECORD_FIELDS", "STAGES", "SUMMARY", "Metric", "label"]
