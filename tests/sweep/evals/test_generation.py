"""Generation-based (WILD) scoring: cached batched greedy decoding against an uncached one-prompt loop,
the stop rules on a model whose next token is set by hand, answer cutting and SQuAD exact match, the
prompt contexts, and the per-fact scores."""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import math

import pytest
import torch
from conftest import make_model

from editors.requests import encode
from sweep.evals import generation
from sweep.evals.generation import (
    STOP_TEXTS,
    GenFact,
    answer_settled,
    context_prompt,
    cut_answer,
    decodes_to,
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


def _variants(gen: list[int], other: int) -> list[list[int]]:
    """The generation itself and continuations that differ from it: each proper prefix, one token more,
    its last token replaced."""
    out = [list(gen), [*gen, other]] + [list(gen[:k]) for k in range(len(gen))]
    if gen:
        out.append([*gen[:-1], other if other != gen[-1] else other + 1])
    return out


@pytest.mark.parametrize(("which", "arch"), [("tok", "llama"), ("tok_bos", "llama"), ("tok", "gpt2")])
def test_decodes_to_is_whether_greedy_decoding_returns_it(request, which, arch):
    """One teacher-forced forward decides what decoding returns: True for the generation itself only,
    under the stop texts and the cap (rows that stop early, rows that run to it)."""
    tok = request.getfixturevalue(which)
    model = sharp_llama(len(tok), seed=3) if arch == "llama" else make_gpt2(len(tok), seed=3)
    prompts = [encode(tok, p)[0] for p in PROMPTS]
    stops = (".", "\n", tok.decode(uncached_greedy(model, tok, prompts[0], 3, ())[2:]))
    gens = greedy_generate(model, tok, prompts, max_new_tokens=6, stop_texts=stops)
    assert len({len(g) for g in gens}) > 1, gens
    rows = [(p, c) for p, g in zip(prompts, gens) for c in _variants(g, 5)]
    got = decodes_to(
        model, tok, [p for p, _ in rows], [c for _, c in rows], max_new_tokens=6, stop_texts=stops, batch_size=4
    )
    assert got == [c == g for (p, c) in rows for g in [gens[prompts.index(p)]]]
    assert sum(got) == len(prompts)


def test_decodes_to_under_eos_stop_text_and_cap(tok):
    a0, a1, b0, b1, c0, d0, d1 = word_ids(tok, 7)
    dot, eos = tok.convert_tokens_to_ids("."), tok.eos_token_id
    model = bigram_model(tok, {a0: a1, a1: eos, b0: b1, b1: dot, dot: b1, d0: d1, d1: d0, c0: eos})
    cases = [
        ([d0, a0], [a1], True),  # ends at EOS, which is not part of it
        ([d0, a0], [a1, eos], False),
        ([d0, a0], [], False),  # the decoding goes on to a1
        ([c0], [], True),  # EOS first: nothing generated
        ([b0], [b1, dot], True),  # "." stops, kept
        ([b0], [b1, dot, b1], False),  # decoding stops at "." before this
        ([b0], [b1], False),
        ([d0], [d1, d0, d1, d0], True),  # the cap (4)
        ([d0], [d1, d0, d1], False),
        ([d0], [d1, d0, d1, d0, d1], False),  # longer than the cap
    ]
    got = decodes_to(model, tok, [p for p, _, _ in cases], [c for _, c, _ in cases], max_new_tokens=4, batch_size=3)
    assert got == [w for _, _, w in cases]
    assert got == [greedy_generate(model, tok, [p], max_new_tokens=4)[0] == c for p, c, _ in cases]
    assert decodes_to(model, tok, [[d0], [d0]], [[], [d1]], max_new_tokens=0) == [True, False]
    with pytest.raises(ValueError, match="2 prompts but 1 continuations"):
        decodes_to(model, tok, [[a0], [b0]], [[a1]], max_new_tokens=3)


def test_edited_neighbourhood_is_checked_not_decoded(tok_bos, monkeypatch):
    """With a reference the neighbourhood prompts are not decoded, and gen_ns is what decoding them gives."""
    tok = tok_bos
    model = sharp_llama(len(tok), seed=3)
    facts = [GenFact(PROMPTS[0], (PROMPTS[1],), (PROMPTS[2], PROMPTS[3], PROMPTS[4]), ("x",))]
    unedited = generated_scores(model, tok, facts, context="bare", max_new_tokens=5)
    ref = [unedited[0].neighbour_ids]
    torch.manual_seed(0)
    w = model.model.layers[0].mlp.down_proj.weight
    with torch.no_grad():  # "edit" the model: its generations of some neighbourhood prompts change
        w.add_(0.05 * torch.randn_like(w))
    by_decoding = [
        float(tuple(g) == r)
        for g, r in zip(
            greedy_generate(model, tok, [encode(tok, q)[0] for q in facts[0].neighbourhood], max_new_tokens=5),
            ref[0],
        )
    ]
    assert 0 < sum(by_decoding) < 3, by_decoding  # some changed, some did not
    decoded = []
    real = generation.greedy_generate
    monkeypatch.setattr(
        generation, "greedy_generate", lambda m, t, p, **kw: decoded.append(len(p)) or real(m, t, p, **kw)
    )
    (s,) = generated_scores(model, tok, facts, context="bare", max_new_tokens=5, reference=ref)
    assert decoded == [2]  # the rewrite and the paraphrase only
    assert s.gen_ns == pytest.approx(sum(by_decoding) / 3)
    assert s.neighbour_ids == () and len(s.texts) == 2


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


def _words(*answers):
    return [normalize_answer(a).split() for a in answers]


@pytest.mark.parametrize(
    ("text", "answers", "settled"),
    [
        ("", ("Paris",), False),
        (" Par", ("Paris",), False),
        (" Paris", ("Paris",), False),  # matches as it is
        (" Paris Hilton", ("Paris",), True),  # one word too many
        (" Lon", ("Paris",), True),
        (" London", ("Paris", "London"), False),  # an alias
        (" The", ("Paris",), False),  # "the" is dropped by the normalisation, or starts "Theodore"
        (" the city", ("Paris",), True),
        (" the Par", ("Paris",), False),
        (" a", ("Paris",), False),
        (" New York", ("New York City",), False),
        (" New Jersey", ("New York City",), True),
        (" New ", ("New York City",), False),
        (" Paris, France", ("Paris",), True),
        (" Paris,", ("Paris",), False),  # "Paris,ian" would still be "parisian"
        (" Jean-", ("Jean-Paul",), False),
        (" Jean-Pi", ("Jean-Paul",), True),
        (" Pa—", ("Paris",), False),  # a non-word character: normalisation may split there
        (" Paris.", ("Paris",), True),  # a stop: the answer is fixed
        (" Paris<", ("Paris",), False),  # "<|endoftext|>" may follow: the answer would be "Paris"
        (" Lyon<", ("Paris",), True),
    ],
)
def test_answer_settled_by_hand(text, answers, settled):
    cut = (*STOP_TEXTS, "<|endoftext|>")
    assert answer_settled(text, _words(*answers), cut) is settled


def test_answer_settled_never_cuts_a_match_short():
    """Every prefix of a text whose answer matches is unsettled, up to its stop."""
    for full, answers in [(" The Eiffel Tower, Paris.", ("Eiffel Tower Paris",)), (" a New York.", ("new york",))]:
        assert exact_match(cut_answer(full), answers) == 1.0
        stop = full.index(".")
        assert not any(answer_settled(full[:i], _words(*answers), STOP_TEXTS) for i in range(stop))


def test_settled_rows_end_early_with_the_same_scores(tok, monkeypatch):
    """A rewrite question whose answer cannot match any more stops decoding; its score is unchanged."""
    words = word_ids(tok, 9)
    chain = dict(itertools.pairwise(words))  # each word is followed by the next: no stop until the cap
    model = bigram_model(tok, chain)
    q = tok.decode([words[0]])
    want = tok.decode(words[1:3]).strip()  # the model says words 1, 2, 3, ...: "w1 w2" matches only up to w2
    fact_hit, fact_miss = GenFact(q, (), (), (want + tok.decode([words[3]]),)), GenFact(q, (), (), ("zzz",))
    steps = []
    real = generation._generate_batch
    monkeypatch.setattr(generation, "_generate_batch", lambda *a: steps.append(1) or real(*a))
    full = greedy_generate(model, tok, [encode(tok, q)[0]], max_new_tokens=8)[0]
    assert len(full) == 8
    hit, miss = generated_scores(model, tok, [fact_hit, fact_miss], context="bare", max_new_tokens=8)
    # the same prompt, two answers: it runs while either may match; each fact scored as by full decoding
    assert hit.gen_es == exact_match(cut_answer(tok.decode(full)), fact_hit.answers)
    assert miss.gen_es == 0.0
    (alone,) = generated_scores(model, tok, [fact_miss], context="bare", max_new_tokens=8)
    assert alone.gen_es == 0.0 and len(alone.texts[0].split()) < len(tok.decode(full).split())


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
        n_own = 1 + len(f.paraphrases)
        assert s.texts[n_own:] == tuple(texts[n_own:])  # no reference: the neighbourhood decoded to its stop
        # a question whose answer was settled early stopped there: its text is the start of the full one
        assert all(full.startswith(t) for t, full in zip(s.texts[:n_own], texts[:n_own]))
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
