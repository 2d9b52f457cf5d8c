"""Generation-based (WILD) scoring: cached batched greedy decoding against an uncached one-prompt loop,
the stop rules on a model whose next token is set by hand, answer cutting and SQuAD exact match, the
prompt contexts, and the per-fact scores."""

from __future__ import annotations

import copy
import dataclasses
import functools
import math

import pytest
import torch
from conftest import make_model

from editors.requests import encode
from sweep.evals import generation
from sweep.evals.generation import (
    GenFact,
    context_prompt,
    cut_answer,
    encode_context,
    exact_match,
    generated_scores,
    greedy_generate,
    normalize_answer,
)

PROMPTS = [
    "The Eiffel Tower is located in",
    "Rome",
    "Danielle Darrieux is a French actress. The mother tongue of Danielle Darrieux is",
    "Who is",
    "The capital of Italy is",
]

CHAT_TEMPLATE = (
    "{% for m in messages %}<s>[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)


@torch.no_grad()
def uncached_greedy(model, tok, prompt: list[int], max_new_tokens: int, stop_texts) -> list[int]:
    """The rule spelled out: re-run the whole sequence every step, take the argmax, stop at EOS (not
    kept), at a stop text in the decoded new text (kept), or at the cap."""
    seq, new = list(prompt), []
    for _ in range(max_new_tokens):
        t = int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
        if t == tok.eos_token_id:
            break
        new.append(t)
        seq.append(t)
        if any(s in tok.decode(new) for s in stop_texts):
            break
    return new


def bigram_model(tok, transitions: dict[int, int]):
    """A tiny Llama whose next token depends only on the current one, set by hand for the tokens of
    ``transitions``: every block's attention and MLP output projections are zero, so the final state at a
    position is its token's (normalised) embedding; source k's embedding is the basis vector e_k and the
    LM head maps e_k to its target alone."""
    assert len(transitions) <= 32
    model = make_model(len(tok), seed=1)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb, head = model.model.embed_tokens.weight, model.lm_head.weight
        for k, (src, dst) in enumerate(transitions.items()):
            emb[src] = 0.0
            emb[src, k] = 1.0
            head[:, k] = 0.0
            head[dst, k] = 10.0
    return model


def word_ids(tok, n: int) -> list[int]:
    """``n`` token ids whose text is a plain word (no stop character)."""
    ids = [i for i in range(3, len(tok)) if tok.decode([i]).strip().isalpha() and len(tok.decode([i]).strip()) > 2]
    assert len(ids) >= n
    return ids[:n]


# ----------------------------------------------------------------------------------------------------
# greedy_generate


def sharp_llama(vocab_size: int, seed: int = 0):
    """The tiny random Llama with its query and key weights scaled up: at the initial scale (std 0.02)
    attention is nearly uniform, so positions (and a wrong position id) barely change the output."""
    model = make_model(vocab_size, seed=seed)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
            layer.self_attn.k_proj.weight.mul_(8.0)
    return model


def make_gpt2(vocab_size: int, seed: int = 0):
    """A tiny random GPT-2: learned absolute positions, so a wrong position id changes its output (RoPE,
    being relative, hides a position offset that is the same for every token of a row)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=128, bos_token_id=0, eos_token_id=1
    )
    return GPT2LMHeadModel(cfg).eval().requires_grad_(False)


@pytest.mark.parametrize(("which", "arch"), [("tok", "llama"), ("tok_bos", "llama"), ("tok", "gpt2")])
def test_batched_cached_greedy_equals_uncached_loop(request, which, arch):
    tok = request.getfixturevalue(which)
    model = sharp_llama(len(tok), seed=3) if arch == "llama" else make_gpt2(len(tok), seed=3)
    prompts = [encode(tok, p)[0] for p in PROMPTS]
    assert len({len(p) for p in prompts}) == len(prompts)  # all lengths differ: real padding
    # a random model never says "." or "\n": stop instead at the text of the first prompt's third token,
    # so that rows stop at different steps (and some run to the cap)
    stops = (".", "\n", tok.decode(uncached_greedy(model, tok, prompts[0], 3, ())[2:]))
    want = [uncached_greedy(model, tok, p, 7, stops) for p in prompts]
    assert len(want[0]) <= 3 and len({len(w) for w in want}) > 1, want
    for bs in (2, 16):
        got = greedy_generate(model, tok, prompts, max_new_tokens=7, stop_texts=stops, batch_size=bs)
        assert got == want, (stops, bs)
    # the prefill ran right-padded and unmasked (the pads masked only in the decoding steps)
    from transformers import DynamicCache

    from sweep.evals.generation import _prefill_right_padded

    assert _prefill_right_padded(model, prompts[:2], 0, DynamicCache()) is not None


def test_batches_are_sorted_by_length(tok, model, monkeypatch):
    prompts = [encode(tok, p)[0] for p in PROMPTS]
    seen: list[list[int]] = []
    real = generation._generate_batch

    def spy(model, tok, seqs, *args):
        seen.append([len(s) for s in seqs])
        return real(model, tok, seqs, *args)

    monkeypatch.setattr(generation, "_generate_batch", spy)
    out = greedy_generate(model, tok, prompts, max_new_tokens=2, batch_size=2)
    assert seen == [sorted(len(p) for p in prompts)[i : i + 2] for i in (0, 2, 4)]
    assert out == [greedy_generate(model, tok, [p], max_new_tokens=2)[0] for p in prompts]  # input order


def test_stop_rules_eos_stop_text_and_cap(tok):
    a0, a1, b0, b1, c0, d0, d1 = word_ids(tok, 7)
    dot, nl_sp, eos = tok.convert_tokens_to_ids("."), tok.encode("\n ", add_special_tokens=False), tok.eos_token_id
    assert tok.decode([dot]) == "." and len(nl_sp) == 1 and tok.decode(nl_sp) == "\n "
    (nl_sp,) = nl_sp
    model = bigram_model(tok, {a0: a1, a1: eos, b0: b1, b1: dot, dot: b1, c0: nl_sp, nl_sp: a0, d0: d1, d1: d0})
    prompts = [[d0, a0], [b0], [a1, c0], [d0]]
    want = [
        [a1],  # EOS ends the row and is not returned
        [b1, dot],  # "." stops, its token kept
        [nl_sp],  # a token whose text holds "\n" among other text stops
        [d1, d0, d1, d0, d1],  # no stop: the cap
    ]
    for bs in (1, 3, 8):  # rows leave a shared batch at different steps
        assert greedy_generate(model, tok, prompts, max_new_tokens=5, batch_size=bs) == want
    # stop_texts=(): only EOS and the cap
    assert greedy_generate(model, tok, prompts, max_new_tokens=5, stop_texts=(), batch_size=4) == [
        [a1],
        [b1, dot, b1, dot, b1],
        [nl_sp, a0, a1],
        [d1, d0, d1, d0, d1],
    ]
    # a stop text that spans two tokens stops at the token that completes it
    spanning = tok.decode([b1])[-1] + "."
    assert greedy_generate(model, tok, [[b0]], max_new_tokens=5, stop_texts=(spanning,)) == [[b1, dot]]
    assert greedy_generate(model, tok, [[b0]], max_new_tokens=5, stop_texts=("!",)) == [[b1, dot, b1, dot, b1]]
    assert greedy_generate(model, tok, prompts, max_new_tokens=0) == [[], [], [], []]
    with pytest.raises(ValueError, match="prompt 1 has no tokens"):
        greedy_generate(model, tok, [[a0], []], max_new_tokens=3)


# ----------------------------------------------------------------------------------------------------
# Answers


def test_cut_answer():
    assert cut_answer(" Paris. It is the capital") == "Paris"
    assert cut_answer(" Rome\nItaly.") == "Rome"
    assert cut_answer(" 3.5 million") == "3"  # the first "." stops, as in the WILD code
    assert cut_answer(" Wilt Chamberlain</s>") == "Wilt Chamberlain"
    assert cut_answer("Toby<|endoftext|>junk.") == "Toby"
    assert cut_answer("  no stop at all  ") == "no stop at all"
    assert cut_answer("\nParis") == ""  # a reply that starts with a newline answers nothing
    assert cut_answer("") == ""
    assert cut_answer("a;b.c", stops=(";",)) == "a"


def test_normalize_answer_and_exact_match():
    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert normalize_answer("Jean-Paul") == "jeanpaul"  # punctuation is dropped, not turned into a space
    assert normalize_answer("An apple, a pear and THE end.") == "apple pear and end"
    assert normalize_answer("Theodore") == "theodore"  # articles only as whole words
    assert normalize_answer("Wilt Chamberlain *") == "wilt chamberlain"
    assert exact_match("the Wilt chamberlain.", ["Wilt Chamberlain *"]) == 1.0
    assert exact_match("Wilt", ["Wilt Chamberlain"]) == 0.0
    assert exact_match("NYC", ["New York City", "nyc"]) == 1.0  # an alias
    assert exact_match("Paris", []) == 0.0


# ----------------------------------------------------------------------------------------------------
# Contexts


def test_context_prompt_and_encoding(tok, tok_bos):
    q = "who has the most 70 point games in nba history?"
    assert context_prompt(tok, q, "bare") == q
    assert context_prompt(tok, q, "qa") == f"Please answer the question:\n\nQ: {q}\nA:"
    assert encode_context(tok_bos, q, "bare") == tok_bos(q)["input_ids"]
    assert encode_context(tok_bos, q, "qa")[0] == tok_bos.bos_token_id
    assert tok_bos.bos_token_id not in encode_context(tok, q, "bare")

    chat_tok = copy.deepcopy(tok_bos)
    chat_tok.chat_template = CHAT_TEMPLATE
    text = context_prompt(chat_tok, q, "chat")
    assert text == f"<s>[user] {q}\n[assistant]"
    ids = encode_context(chat_tok, text, "chat")
    assert ids[0] == chat_tok.bos_token_id and ids.count(chat_tok.bos_token_id) == 1  # no BOS added twice
    assert len(encode(chat_tok, text)[0]) == len(ids) + 1  # the plain encoding would add a second one

    assert not tok.chat_template
    with pytest.raises(ValueError, match=r"scoring\.gen_context: 'chat' needs a tokenizer with a chat template"):
        context_prompt(tok, q, "chat")
    with pytest.raises(ValueError, match=r"scoring\.gen_context: unknown context 'plain'"):
        context_prompt(tok, q, "plain")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------
# Per-fact scores


@pytest.mark.parametrize("context", ["bare", "qa"])
def test_generated_scores_by_hand(tok_bos, context):
    tok = tok_bos
    model = make_model(len(tok), seed=5)
    shared = "Michel Rocard is a native speaker of"
    facts = [
        GenFact("The Eiffel Tower is located in", ("Where is the Eiffel Tower?",), (shared, "Rome is"), ("x",)),
        GenFact("Toko Yasuda plays the", ("What does Toko Yasuda play?", "Yasuda's instrument:"), (shared,), ("y",)),
    ]

    @functools.cache
    def by_hand(question: str) -> tuple[list[int], str]:
        ids = encode_context(tok, context_prompt(tok, question, context), context)
        (gen,) = greedy_generate(model, tok, [ids], max_new_tokens=6)
        return gen, cut_answer(tok.decode(gen))

    # fact 0's answer is exactly what the model says, so its gen_es must be 1
    facts[0] = dataclasses.replace(facts[0], answers=("x", by_hand(facts[0].rewrite)[1]))

    def score(reference=None, batch_size=32):
        return generated_scores(
            model, tok, facts, context=context, max_new_tokens=6, batch_size=batch_size, reference=reference
        )

    scores = score(batch_size=3)
    assert scores[0].gen_es == 1.0
    for f, s in zip(facts, scores):
        texts = [by_hand(q)[1] for q in (f.rewrite, *f.paraphrases, *f.neighbourhood)]
        assert s.texts == tuple(texts)
        assert s.gen_es == exact_match(texts[0], f.answers)
        para = [exact_match(t, f.answers) for t in texts[1 : 1 + len(f.paraphrases)]]
        assert s.gen_ps == pytest.approx(sum(para) / len(para))
        assert s.neighbour_ids == tuple(tuple(by_hand(q)[0]) for q in f.neighbourhood)
        assert math.isnan(s.gen_ns)  # no reference
    assert scores[0].neighbour_ids[0] == scores[1].neighbour_ids[0]  # the shared prompt

    ref = [s.neighbour_ids for s in scores]  # the unedited model's own generations: the stored reference
    assert [s.gen_ns for s in score(ref)] == [1.0, 1.0]
    altered = [((*ref[0][0], 7), ref[0][1]), ref[1]]  # one of fact 0's two references differs
    assert [s.gen_ns for s in score(altered)] == [0.5, 1.0]
    with pytest.raises(ValueError, match=r"fact 1 .* 1 neighbourhood prompts but 2 reference"):
        score([ref[0], ref[0]])


def test_generated_scores_on_set_answers(tok, monkeypatch):
    """Questions whose greedy answer is set by hand: exact values of gen_es/gen_ps/gen_ns, and one
    generation call with every distinct prompt once."""
    paris, rome = (tok.encode(w, add_special_tokens=False) for w in (" Paris", " Rome"))
    questions = ["Eiffel Tower city:", "The Eiffel Tower stands in the city of", "Colosseum city?", "Say hello"]
    last = [encode(tok, q)[0][-1] for q in questions]
    sources = [*last, *paris, *rome]
    assert len(set(sources)) == len(sources), "the chains' tokens must be distinct sources"
    dot = tok.convert_tokens_to_ids(".")
    chains = {a: b for seq in (paris, rome) for a, b in zip(seq, [*seq[1:], dot])}
    starts = {last[0]: paris[0], last[1]: paris[0], last[2]: rome[0], last[3]: rome[0]}
    model = bigram_model(tok, {**starts, **chains})
    fact = GenFact(questions[0], (questions[1], questions[2]), (questions[3], questions[2]), ("the paris", "Lutetia"))
    calls = []
    real = generation.greedy_generate

    def spy(model, tok, prompts, **kw):
        calls.append(len(prompts))
        return real(model, tok, prompts, **kw)

    monkeypatch.setattr(generation, "greedy_generate", spy)
    s, dup = generated_scores(model, tok, [fact, fact], context="bare", max_new_tokens=10)
    assert calls == [4]  # 2 facts x 5 prompts, 4 distinct
    assert s == dup
    assert s.texts == ("Paris", "Paris", "Rome", "Rome", "Rome")
    assert (s.gen_es, s.gen_ps) == (1.0, 0.5)
    rome_ids = (*rome, dot)
    assert s.neighbour_ids == (rome_ids, rome_ids)
    (s2,) = generated_scores(model, tok, [fact], context="bare", reference=[(rome_ids, tuple(rome))])
    assert s2.gen_ns == 0.5
    with pytest.raises(ValueError, match="answers is empty"):
        GenFact("q", (), (), ())
