"""ZsRE/QAEdit teacher-forced token accuracy against hand computation on the bigram model whose every
logit is known (tests/sweep/evals/test_metrics.py), for both ZsRE edit targets."""

from __future__ import annotations

import pytest
import torch

from sweep.evals.data import load_dataset
from sweep.evals.metrics import aggregate, score_records, token_accuracy
from tests.conftest import SHARED
from tests.sweep.evals.test_metrics import SPEC, Bigram

DATA = SHARED / "data"


def hand_accuracy(model: Bigram, tok, prompt: str, target: str) -> float:
    """The fraction of the target's tokens that are the bigram table's argmax after the token before."""
    p = tok(prompt)["input_ids"]
    t = tok(" " + target, add_special_tokens=False)["input_ids"]
    prev = [p[-1], *t[:-1]]
    hits = [int(model.table[:, b].argmax()) == a for a, b in zip(t, prev)]
    return sum(hits) / len(hits)


def forced_bigram(tok, prompt: str, target: str, hit: set[int]) -> Bigram:
    """A bigram model whose argmax after each token of ``target``'s chain is the next target token at
    the positions in ``hit`` only (a known token accuracy)."""
    m = Bigram(len(tok))
    p = tok(prompt)["input_ids"]
    t = tok(" " + target, add_special_tokens=False)["input_ids"]
    for j, (a, b) in enumerate(zip(t, [p[-1], *t[:-1]])):
        col = m.head.weight.data[:, b]
        if j in hit:
            col[a] = col.max() + 5.0
        elif int(col.argmax()) == a:
            col[a] = col.min() - 5.0
    m.table = m.head.weight.data
    return m


@pytest.mark.parametrize("bos", [False, True])
def test_token_accuracy_matches_hand_computation(bos, tok, tok_bos):
    t = tok_bos if bos else tok
    prompt, target = "When was the inception of IAAF Combined Events Challenge?", "Combined Events 1998"
    n = len(t(" " + target, add_special_tokens=False)["input_ids"])
    assert n >= 3
    for hit in ({0}, {0, n - 1}, set(range(n)), set()):
        model = forced_bigram(t, prompt, target, hit)
        acc = token_accuracy(model, t, SPEC, [(prompt, target), ("Rome", "Italy")], batch_size=1)
        assert acc[0].item() == pytest.approx(len(hit) / n)  # a known accuracy, not just the code's own
        assert acc[1].item() == pytest.approx(hand_accuracy(model, t, "Rome", "Italy"))


@pytest.mark.parametrize("target", ["answers", "alt"])
def test_zsre_scores_are_token_accuracies_of_the_chosen_target(target, tok_bos):
    records = load_dataset("zsre", str(DATA / "zsre" / "zsre_mend_eval_portability_gpt4.json"), target=target)[:4]
    assert records[0].target_new == ("1998" if target == "answers" else "2006")
    model = Bigram(len(tok_bos), seed=3)
    scores = score_records(model, tok_bos, SPEC, records, batch_size=3)
    for r, s in zip(records, scores):
        assert s.es == pytest.approx(hand_accuracy(model, tok_bos, r.rewrite_prompt, r.target_new))
        assert s.ps == pytest.approx(hand_accuracy(model, tok_bos, r.paraphrase_prompts[0], r.target_new))
        ((loc, ans),) = r.neighbourhood_pairs()
        assert loc.endswith("?") and loc.startswith("nq question: ")
        assert s.ns == pytest.approx(hand_accuracy(model, tok_bos, loc, ans))
        assert s.em is None and s.es_acc is None  # CounterFact's measures are not defined here
    agg = aggregate(scores)
    assert agg["es"] == pytest.approx(100 * sum(s.es for s in scores) / 4)
    assert set(agg) == {"es", "ps", "ns", "s"}


def test_knowedit_neighbourhood_answers_are_per_prompt(tok):
    (r,) = load_dataset("zsre", str(DATA / "zsre" / "ZsRE-test-all.json"), target="alt")[:1]
    pairs = r.neighbourhood_pairs()
    assert len(pairs) == 2
    model = Bigram(len(tok), seed=1)
    (s,) = score_records(model, tok, SPEC, [r])
    want = sum(hand_accuracy(model, tok, p, a) for p, a in pairs) / 2
    assert s.ns == pytest.approx(want)
    assert torch.isfinite(torch.tensor(s.es))
