"""Every metric a trial reports, declared once: its name, dataset, protocol, scale, which way is better and
what it means. The trial's result, the worker's reports, MLflow, the per-record CSV, the progress table
and the report all read their names, orders and labels from here; adding a metric touches this module
and the code that computes it.

Protocols (docs/ALGORITHMS.md §4): ``teacher_forced`` scores a target's tokens given the prompt (the
reference code's ES/PS/NS, EM/PM/NM and token accuracies), ``generated`` decodes greedily to a natural
stop and matches the answer (the WILD protocol of arXiv 2502.11177: ``gen_*``; the capability probes'
generation predictions; MQuAKE), ``likelihood`` compares label words' probabilities (the probes'
second prediction), ``sampled`` samples text (generation entropy), ``model`` measures the model itself
(held-out perplexity). A name never changes protocol, so a teacher-forced number is never compared with
a generated one by accident.

Datasets: one name may be declared for several (``es`` is CounterFact's probability comparison and
ZsRE's token accuracy); :func:`metric` finds a name's declaration for a trial's dataset, and the report
keeps datasets apart. ``any`` marks a measure every edit dataset has.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Metric:
    """One metric.

    Attributes:
        name: its key in results, MLflow (``<stage>.<name>``) and reports.
        dataset: the data it is defined on (``counterfact``, ``zsre``, ``qaedit``, ``mquake``, a probe
            task; ``any``: every edit dataset, or the model itself).
        protocol: ``teacher_forced``, ``generated``, ``likelihood``, ``sampled`` or ``model`` (see the
            module docstring).
        scale: ``percent`` (0-100 in results; per record in [0, 1]), ``signed_percent`` (a mean
            probability gap, −100-100), ``entropy`` (bits-weighted n-gram entropy), ``perplexity`` or
            ``count``.
        higher_is_better: which way is better.
        per_record: a per-record score averaged over records (False: computed on the aggregate, e.g.
            S = hmean(ES, PS, NS), or on other text, e.g. perplexity).
        label: the report's axis and column label.
        meaning: one line of what it measures.
        summary: shown in compact tables (the trial's printed table); the token accuracies are not.
    """

    name: str
    dataset: str
    protocol: Literal["teacher_forced", "generated", "likelihood", "sampled", "model"]
    scale: Literal["percent", "signed_percent", "entropy", "perplexity", "count"]
    higher_is_better: bool
    per_record: bool
    label: str
    meaning: str
    summary: bool = True


#: the question-answering benchmarks (scored by token accuracy) and their names in labels
QA_NAMES = {"zsre": "ZsRE", "qaedit": "QAEdit", "wikibigedit": "WikiBigEdit", "ultraeditbench": "UltraEditBench"}

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
    *(m for ds, name in QA_NAMES.items() for m in (
        Metric("es", ds, "teacher_forced", "percent", True, True, f"{name} efficacy (token acc.)",
               "fraction of the new answer's tokens that are the argmax after the edited question (teacher forcing)"),
        Metric("ps", ds, "teacher_forced", "percent", True, True, f"{name} generalisation (token acc.)",
               "the same after the paraphrased question"),
        Metric("ns", ds, "teacher_forced", "percent", True, True, f"{name} specificity (token acc.)",
               "token accuracy of an unrelated question's own answer (against the answer, not the unedited model)"),
        Metric("s", ds, "teacher_forced", "percent", True, False, f"{name} score",
               "harmonic mean of ES, PS and NS"))),
    Metric("port", "wikibigedit", "teacher_forced", "percent", True, True, "WikiBigEdit portability (token acc.)",
           "token accuracy of the answers to the persona-styled and the multi-hop question (where present)"),
    Metric("gen_es", "any", "generated", "percent", True, True, "ES generated (WILD)",
           "greedy generation to a natural stop after the edited prompt exactly matches the new target"),
    Metric("gen_ps", "any", "generated", "percent", True, True, "PS generated (WILD)",
           "the same after the paraphrases"),
    Metric("gen_ns", "any", "generated", "percent", True, True, "NS generated (WILD)",
           "an unrelated prompt's greedy generation is unchanged from the unedited model's"),
    Metric("gen_s", "any", "generated", "percent", True, False, "S generated (WILD)",
           "harmonic mean of the generated ES, PS and NS"),
    Metric("mquake_multihop", "mquake", "generated", "percent", True, False, "MQuAKE multi-hop (new answer)",
           "cases with every rewrite in the model whose multi-hop question (any of 3) is answered with the new answer"),
    Metric("mquake_multihop_orig", "mquake", "generated", "percent", True, False, "MQuAKE multi-hop (old answer)",
           "the same with the answer before editing: what the model still says of the old chain"),
    Metric("mquake_edit_wise", "mquake", "generated", "percent", True, False, "MQuAKE edit-wise",
           "the edited facts' cloze statements continued greedily start with the new object"),
    Metric("mquake_cases", "mquake", "model", "count", True, False, "MQuAKE cases asked",
           "cases whose every rewrite is in the model (their questions are asked)"),
)  # fmt: skip

#: the capability probes (AlphaEdit's glue_eval, sweep.evals.probes): AlphaEdit's six, then the two it ships unused
PROBE_TASKS = ("sst2", "mrpc", "cola", "rte", "nli", "mmlu", "sentiment_analysis", "dialogue")
_PROBE_KINDS = (
    ("f1", "generated", "F1", "weighted F1 of the greedy 5-token answer's parsed label (AlphaEdit's figures)"),
    ("mcc", "generated", "MCC", "Matthews correlation of the parsed label (signed percent)"),
    ("acc", "generated", "accuracy", "accuracy of the parsed label"),
    ("invalid", "generated", "unparsed", "answers no label could be parsed from"),
    ("lik_f1", "likelihood", "F1 (likelihood)", "weighted F1 of the label word with the highest probability"),
    ("lik_mcc", "likelihood", "MCC (likelihood)", "Matthews correlation of the likelihood prediction"),
    ("lik_acc", "likelihood", "accuracy (likelihood)", "accuracy of the likelihood prediction"),
)
METRICS += tuple(
    Metric(
        f"probe_{task}_{kind}",
        task,
        protocol,
        "signed_percent" if "mcc" in kind else "percent",
        kind != "invalid",
        False,
        f"{task.upper() if len(task) <= 4 else task} {lab}",
        f"capability probe {task}: {meaning}",
        summary=False,
    )
    for task in PROBE_TASKS
    for kind, protocol, lab, meaning in _PROBE_KINDS
)

#: each dataset's teacher-forced ES/PS/NS: CounterFact's probability comparisons (MQuAKE's rewrites are
#: CounterFact facts) or the ZsRE lineage's token accuracy (sweep.evals.metrics.score_counterfact / score_qa)
TEACHER_FORCED = {
    "counterfact": "probability",
    "mquake": "probability",
    **dict.fromkeys(QA_NAMES, "token_accuracy"),
}

BY_NAME = {m.name: m for m in reversed(METRICS)}  # a name's first declaration (CounterFact's, for es ps ns s)
#: the four headline scores, in the order tables and curves show them
CORE = ("es", "ps", "ns", "s")
#: the same under generation (``scoring.generated``)
GEN_CORE = ("gen_es", "gen_ps", "gen_ns", "gen_s")
#: the per-record scores (the fields of a stored pre-edit score row), in protocol order
RECORD_FIELDS = tuple(dict.fromkeys(m.name for m in METRICS if m.per_record))
#: every name a stage (pre, at_edit, final) may hold
NAMES = tuple(dict.fromkeys(m.name for m in METRICS))
#: what compact tables show
SUMMARY = tuple(dict.fromkeys(m.name for m in METRICS if m.summary))
#: scoring stages in protocol order: the unedited model, each batch right after its edit, the final model
STAGES = ("pre", "at_edit", "final")


def metric(name: str, dataset: str = "counterfact") -> Metric | None:
    """The declaration of ``name`` for a trial on ``dataset`` (its own, else the ``any`` one), or None."""
    for m in METRICS:
        if m.name == name and m.dataset == dataset:
            return m
    return next((m for m in METRICS if m.name == name and m.dataset == "any"), BY_NAME.get(name))


def label(name: str, dataset: str = "counterfact") -> str:
    """The report's label of a metric name on ``dataset`` (the name itself when it is not one)."""
    m = metric(name, dataset)
    return m.label if m is not None else name


def describe(names: Iterable[str], dataset: str) -> dict[str, dict[str, str]]:
    """name -> {dataset, protocol, label} of each declared name, as a trial's result records them, so
    a number always says which protocol produced it."""
    out = {}
    for n in names:
        if (m := metric(n, dataset)) is not None:
            out[n] = {"dataset": m.dataset if m.dataset != "any" else dataset, "protocol": m.protocol, "label": m.label}
    return out


__all__ = [
    "BY_NAME", "CORE", "GEN_CORE", "METRICS", "NAMES", "PROBE_TASKS", "RECORD_FIELDS", "STAGES", "SUMMARY",
    "TEACHER_FORCED", "Metric", "describe", "label", "metric",
]  # fmt: skip
