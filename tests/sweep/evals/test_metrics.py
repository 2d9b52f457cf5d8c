"""Metrics against hand-computed values on a tiny bigram model with known logits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import hmean as scipy_hmean
from torch import nn

from editors.model import ModelSpec
from sweep.evals.data import Record
from sweep.evals.metrics import aggregate, hmean, ngram_entropy, score_records, target_scores


class Bigram(nn.Module):
    """logits at position p = L[:, token_p]: a model whose every output is known in closed form."""

    def __init__(self, vocab: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(vocab, vocab, generator=g) * 3  # L[next, prev]
        self.embed = nn.Embedding(vocab, vocab)
        self.embed.weight.data = torch.eye(vocab)
        self.norm = nn.Identity()
        self.head = nn.Linear(vocab, vocab, bias=False)
        self.head.weight.data = self.table.clone()

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return self.head(self.norm(self.embed(input_ids)))


SPEC = ModelSpec("x.{}", "x.{}", "norm", "head", 1, 1, 1)


def expected_nll(model, tok, prompt, target):
    p = tok(prompt)["input_ids"]
    t = tok(" " + target, add_special_tokens=False)["input_ids"]
    logp = torch.log_softmax(model.table, dim=0)  # column = distribution after a token
    prev = [p[-1], *t[:-1]]
    nll = [-float(logp[t_j, prev_j]) for t_j, prev_j in zip(t, prev)]
    argmax_ok = all(int(model.table[:, prev_j].argmax()) == t_j for t_j, prev_j in zip(t, prev))
    return sum(nll) / len(nll), argmax_ok, len(t)


@pytest.mark.parametrize("bos", [False, True])
def test_target_scores_match_hand_computation(bos, tok, tok_bos):
    t = tok_bos if bos else tok
    model = Bigram(len(t))
    pairs = [
        ("The Eiffel Tower is in", "Paris"),
        ("The mother tongue of Danielle Darrieux is", "French language"),
        ("Rome", "Italy"),
    ]
    nll, acc = target_scores(model, t, SPEC, pairs, batch_size=2)
    for i, (p, target) in enumerate(pairs):
        want, ok, _n_tok = expected_nll(model, t, p, target)
        assert nll[i].item() == pytest.approx(want, rel=1e-5)
        assert bool(acc[i]) == ok
    assert expected_nll(model, t, *pairs[1])[2] > 1  # a multi-token target is covered


def test_target_scores_acc_is_true_for_the_argmax_continuation(tok_bos):
    model = Bigram(len(tok_bos), seed=1)
    prompt = "The Eiffel Tower is in"
    prev = tok_bos(prompt)["input_ids"][-1]
    (best,) = tok_bos(" Paris", add_special_tokens=False)["input_ids"][:1]
    model.head.weight.data[best, prev] = model.table[:, prev].max() + 5  # make " Paris"'s first token the argmax
    model.table = model.head.weight.data
    target = tok_bos.decode([best])[1:]
    nll, acc = target_scores(model, tok_bos, SPEC, [(prompt, target), (prompt, "Rome")])
    assert bool(acc[0]) and not bool(acc[1])
    assert nll[0] < nll[1]


def test_record_metrics_and_aggregate_by_hand(tok):
    model = Bigram(len(tok), seed=2)
    rec = Record(
        case_id=5,
        prompt="{} is in",
        subject="The tower",
        target_new="Rome",
        target_true="Paris",
        paraphrase_prompts=("Where is the tower? In", "The tower stands in"),
        neighborhood_prompts=("The Louvre is in", "Notre Dame is in", "The Seine is in"),
        neighborhood_answer="Paris",
    )
    (s,) = score_records(model, tok, SPEC, [rec])

    def pr(prompt, target):
        return math.exp(-expected_nll(model, tok, prompt, target)[0])

    rw = "The tower is in"
    assert s.es == float(pr(rw, "Rome") > pr(rw, "Paris"))
    assert s.em == pytest.approx(pr(rw, "Rome") - pr(rw, "Paris"), rel=1e-5, abs=1e-9)
    ps = [pr(p, "Rome") > pr(p, "Paris") for p in rec.paraphrase_prompts]
    assert s.ps == pytest.approx(np.mean(ps))
    ns = [pr(p, "Paris") > pr(p, "Rome") for p in rec.neighborhood_prompts]
    assert s.ns == pytest.approx(np.mean(ns))
    nm = [pr(p, "Paris") - pr(p, "Rome") for p in rec.neighborhood_prompts]
    assert s.nm == pytest.approx(np.mean(nm), rel=1e-5, abs=1e-9)

    agg = aggregate([s, s])
    assert agg["es"] == pytest.approx(100 * s.es)
    vals = [agg["es"], agg["ps"], agg["ns"]]
    assert agg["s"] == pytest.approx(scipy_hmean(vals) if min(vals) > 0 else 0.0)


def test_hmean_against_scipy():
    for vals in ([90.0, 80.0, 70.0], [100.0, 98.05, 85.61], [50.0, 1.0, 99.0]):
        assert hmean(vals) == pytest.approx(scipy_hmean(vals))
    assert hmean([100.0, 0.0, 50.0]) == 0.0
    # The paper's Table 1 MEMIT row: ES 100, PS 98.05, NS 85.61 -> S 94.10.
    assert hmean([100.0, 98.05, 85.61]) == pytest.approx(94.10, abs=0.01)


def test_ngram_entropy_by_hand():
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))  # bigrams (a b) x2, (b a) x1
    h3 = 1.0  # trigrams (a b a), (b a b)
    assert ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * h3) / 2)
    assert ngram_entropy("same same same same") == 0.0


@pytest.mark.parametrize("bos", [False, True])
def test_cached_prompt_scoring_equals_one_full_forward_per_pair(bos, tok, tok_bos):
    """On a real (tiny random) Llama, scoring with the prompt's KV cache shared by both targets and all
    rows padded together gives each pair's NLL and argmax as one unbatched forward of prompt + target."""
    from editors import spec_for
    from editors.requests import encode, target_ids
    from tests.conftest import make_model

    t = tok_bos if bos else tok
    model = make_model(len(t), seed=3)
    spec = spec_for(model)
    prompts = ["The Eiffel Tower is in", "Rome", "The mother tongue of Danielle Darrieux is", "A"]
    targets = ["Paris", "French language", "the capital of Italy", "B"]
    pairs = [(p, x) for p in prompts for x in targets[:2]] + [(prompts[2], targets[2]), (prompts[3], targets[3])]
    nll, acc = target_scores(model, t, spec, pairs, batch_size=3)
    for i, (p, x) in enumerate(pairs):
        p_ids, t_ids = encode(t, p)[0], target_ids(t, x)
        with torch.no_grad():
            logits = model(torch.tensor([p_ids + t_ids])).logits[0].float()
        logp = torch.log_softmax(logits[len(p_ids) - 1 : -1], -1)
        want = -logp.gather(1, torch.tensor(t_ids)[:, None]).mean()
        assert nll[i].item() == pytest.approx(float(want), rel=1e-4, abs=1e-6), (p, x)
        assert bool(acc[i]) == bool((logits[len(p_ids) - 1 : -1].argmax(-1) == torch.tensor(t_ids)).all())


def test_length_chunks_minimise_the_tokens_run_as_brute_force_does():
    """The prompt batches: consecutive, at most ``batch_size``, and of minimal total cost (longest × size
    + the batch cost), checked against every partition of a small sorted list."""
    import itertools

    from sweep.evals.metrics import BATCH_COST_TOKENS, _length_chunks

    def cost(parts: list[list[int]]) -> int:
        return sum(max(p) * len(p) + BATCH_COST_TOKENS for p in parts)

    gen = torch.Generator().manual_seed(0)
    for trial in range(20):
        lengths = sorted(torch.randint(1, 200, (9,), generator=gen).tolist())
        bs = 2 + trial % 5
        got = _length_chunks(list(lengths), lengths, bs)
        assert [x for c in got for x in c] == lengths and all(len(c) <= bs for c in got)
        best = min(
            cost([lengths[a:b] for a, b in zip((0, *cuts), (*cuts, len(lengths)))])
            for k in range(len(lengths))
            for cuts in itertools.combinations(range(1, len(lengths)), k)
            if all(b - a <= bs for a, b in zip((0, *cuts), (*cuts, len(lengths))))
        )
        assert cost(got) == best
