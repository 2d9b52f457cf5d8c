"""The capability probes (sweep.evals.probes) against AlphaEdit's glue_eval: strings equal to the shared
protocol.json, prompts built by hand the authors' way, metrics against hand-computed values, the parse
rules on hand-written generations, both predictions against the authors' unbatched loop on the tiny model,
and the pickle converter refusing any class."""

from __future__ import annotations

import collections
import hashlib
import io
import json
import math
import pickle
import random
import re
import urllib.error
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sweep.evals import probes as P
from tests.conftest import SHARED

GLUE = SHARED / "data" / "glue_eval"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model gains nothing from threads, and on a busy machine they cost 20× in spinning."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data() -> Path:
    if not (GLUE / "protocol.json").is_file():
        pytest.skip(f"the shared probe data are not at {GLUE}")
    return GLUE


@pytest.fixture(scope="module")
def protocol(data) -> dict:
    return json.loads((data / "protocol.json").read_text(encoding="utf-8"))


def record(data: Path, task: str, index: int) -> dict:
    """Record ``index`` (0-based) of a task's file, read here without sweep.evals.probes."""
    lines = (data / f"{task}.jsonl").read_text(encoding="utf-8").splitlines()
    return json.loads(lines[index])


# ----------------------------------------------------------------------------------------------------
# The protocol's strings


def test_tasks_equal_protocol_json(protocol):
    assert set(P.TASKS) == set(protocol["tasks"])
    for name, spec in protocol["tasks"].items():
        t = P.TASKS[name]
        assert (t.name, t.file, t.question, t.few_shot) == (name, spec["file"], spec["question"], spec["few_shot"])
        assert t.parse_rules == tuple((s, c) for s, c in spec["parse_rules"]), name
        assert t.scored_words == tuple(spec["scored_words_in_order"]), name
        if "label_words" in spec:
            assert {str(c): w for c, w in t.label_words} == spec["label_words"], name
        m = re.fullmatch(r"text after the last '(.*)' in the full decoded output", spec["parse_region"])
        assert t.marker == (m.group(1) if m else None), name
        if m is None:
            assert spec["parse_region"].startswith("generated continuation only"), name
        assert t.min_budget == (5 if "few_shot_budget_stop" in spec else 0), name
    d = protocol["alphaedit_defaults"]
    assert P.ENABLED == tuple(d["tasks_enabled"])
    assert set(P.TASKS) - set(P.ENABLED) == set(d["tasks_available_not_enabled"])
    assert (P.GEN_LEN, P.N_ITEMS, P.FEW_SHOT_POOL) == (d["gen_len"], d["number_of_tests"], d["few_shot_pool_size"])
    assert d["number_of_few_shots"] == 0 and d["test_items"].startswith("records[10:110]")
    assert protocol["max_context_by_model_name"] == P.MAX_CONTEXT
    assert P.COMMIT in protocol["source"]


def test_md5_table_matches_the_shared_files(data):
    for name, (_, md5_jsonl) in P.FILES.items():
        assert hashlib.md5((data / f"{name}.jsonl").read_bytes()).hexdigest() == md5_jsonl, name


def test_item0_prompts_built_by_hand(data, protocol):
    """records[10] of every file, prompted the authors' way (their string concatenations, written out
    here) and by protocol.json's template."""
    sa = (
        "For each snippet of text,label the sentiment of the text as positive or negative.The answer should be "
        "exact 'positive' or 'negative'. text:"
    )
    by_hand = {
        "sst2": lambda r: "Review :" + r["sentence"] + "\nSentiment :",
        "mrpc": lambda r: "Are the sentences paraphrases of each other.\n"
        + ("Sentence 1: " + r["sentence1"] + "\n" + "Sentence 2: " + r["sentence2"] + "\n")
        + "Answer:",
        "cola": lambda r: "Is this sentence linguistically acceptable?\n"
        + ("Sentence: " + r["sentence"] + "\n")
        + "Answer: ",
        "rte": lambda r: r["sentence1"] + "\n" + "question: " + r["sentence2"] + " True or False?" + "\n" + "answer:",
        "nli": lambda r: f"{r['sentence1']} entails the {r['sentence2']} True or False? Answer:",
        "mmlu": lambda r: "Question: " + r["question"] + "\n"
        + "".join(f"({x}) {c}\n" for x, c in zip("ABCD", r["choices"]))
        + "Answer:",
        "sentiment_analysis": lambda r: f"{sa} {r['sentence']} answer:",
        "dialogue": lambda r: f"Q: Given the following: {r['article']}\nWhich choice is correct?\n"
        + "".join(f"({x}){o}\n" for x, o in zip("ABCD", r["options"]))
        + "Answer:",
    }  # fmt: skip
    gold = {
        "nli": lambda r: int(r["label"] == "entailment"),
        "sentiment_analysis": lambda r: int(r["label"]),
        "mmlu": lambda r: r["answer"],
        "dialogue": lambda r: "ABCD".index(r["answers"]),
    }
    for task, make in by_hand.items():
        r = record(data, task, 10)
        item = P.load_items(data, task, n_items=3)[0]
        assert item.line == 11
        expected = make(r)
        assert P.question(P.TASKS[task], item) == expected, task
        lists = {f"{k.rstrip('s')}{i}": x for k, v in r.items() if isinstance(v, list) for i, x in enumerate(v)}
        assert protocol["tasks"][task]["question"].format(**r, **lists) == expected, task
        assert item.gold == gold.get(task, lambda r: r["label"])(r), task


def test_test_slice_is_records_10_to_110_and_balanced(data):
    for task in P.TASKS:
        items = P.load_items(data, task)
        assert [it.line for it in items] == list(range(11, 111)), task
        counts = collections.Counter(it.gold for it in items)
        assert set(counts.values()) == ({25} if task in ("mmlu", "dialogue") else {50}), (task, counts)
    with pytest.raises(ValueError, match="n_items must be 1-"):
        P.load_items(data, "rte", n_items=253)


def test_bad_records_name_file_line_and_field(tmp_path):
    good = {"sentence": "a fine film", "label": 1, "idx": 0}
    lines = [json.dumps(good)] * 12
    cases = [
        ({"sentence": "x", "idx": 3}, r"sst2\.jsonl:2: field 'label' is missing"),
        ({"sentence": "x", "label": "1"}, r"sst2\.jsonl:2: field 'label': expected the integer 0 or 1, got '1'"),
        ({"sentence": 7, "label": 0}, r"sst2\.jsonl:2: field 'sentence': expected a string"),
        ([1, 2], r"sst2\.jsonl:2: expected a JSON object, got list"),
    ]
    for bad, msg in cases:
        (tmp_path / "sst2.jsonl").write_text("\n".join([lines[0], json.dumps(bad), *lines[2:]]) + "\n")
        with pytest.raises(P.ProbeDataError, match=msg):
            P.load_items(tmp_path, "sst2", n_items=2)
    (tmp_path / "sst2.jsonl").write_text(lines[0] + "\n{oops\n")
    with pytest.raises(P.ProbeDataError, match=r"sst2\.jsonl:2: not a JSON line"):
        P.load_items(tmp_path, "sst2", n_items=1)
    with pytest.raises(P.ProbeDataError, match=r"no such probe file .*sweep\.evals\.probes fetch"):
        P.load_items(tmp_path, "cola")
    with pytest.raises(ValueError, match="unknown task 'glue'"):
        P.load_items(tmp_path, "glue")


class WordTok:
    """A tokenizer stand-in: one id per whitespace-separated word (hand-countable budgets)."""

    def __call__(self, text: str) -> dict:
        return {"input_ids": list(range(len(text.split())))}


def test_few_shot_budget(data):
    """Budget = max_context − len(question) − gen_len; each shot is taken off before the check; a shot that
    takes it below 0 (dialogue: 5) ends the prefix."""
    tok = WordTok()
    for task, floor in (("sst2", 0), ("dialogue", 5)):
        t = P.TASKS[task]
        item, shots = P.load_items(data, task, 1)[0], P.load_shots(data, task, 3)
        q = P.question(t, item)
        texts = [s.fill(t.few_shot, label_word=dict(t.label_words)[s.gold]) for s in shots]
        n_q, n0, n1 = len(q.split()), len(texts[0].split()), len(texts[1].split())
        fits_two = n_q + P.GEN_LEN + n0 + n1  # the budget is exactly 0 after two shots
        got = P.build_prompt(tok, t, item, shots, max_context=fits_two + floor)
        assert got == texts[0] + texts[1] + q, task
        got = P.build_prompt(tok, t, item, shots, max_context=fits_two + floor - 1)
        assert got == texts[0] + q, task
        assert P.build_prompt(tok, t, item, shots, max_context=0) == q
        assert P.build_prompt(tok, t, item) == q
    assert texts[0].endswith(f"\nAnswer: {record(data, 'dialogue', 0)['answers']}\n\n")
    with pytest.raises(ValueError, match="need max_context"):
        P.build_prompt(tok, t, item, shots)
    with pytest.raises(ValueError, match="n_shots must be 0-10"):
        P.load_shots(data, "sst2", 11)


def test_context_length_by_model_name():
    model = SimpleNamespace(config=SimpleNamespace(_name_or_path="/models/GPT2-XL"))
    assert P.context_length(model) == 1024
    model.config._name_or_path = "meta-llama/Meta-Llama-3-8B"
    with pytest.raises(ValueError, match="no context length for model 'meta-llama-3-8b'"):
        P.context_length(model)


# ----------------------------------------------------------------------------------------------------
# Parsing and the likelihood decision


def test_parse_rules_on_hand_written_generations():
    t = P.TASKS
    sst = "Review :a fine film\nSentiment :"
    assert P.parse_answer(t["sst2"], sst + " Positive!", sst) == 1
    assert P.parse_answer(t["sst2"], sst + " negative.", sst) == 0
    assert P.parse_answer(t["sst2"], sst + " negative or positive", sst) == 1  # "positive" is tested first
    assert P.parse_answer(t["sst2"], sst + " neutral", sst) == -1
    assert P.parse_answer(t["sst2"], sst + " negative\nSentiment : good", sst) == -1  # after the last marker
    rte = "A cat sat.\nquestion: A cat stood. True or False?\nanswer:"
    assert P.parse_answer(t["rte"], rte + " True or false", rte) == 0  # RTE tests "false" first
    assert P.parse_answer(t["rte"], rte + " TRUE", rte) == 1  # class 1 = GLUE's not_entailment
    assert P.parse_answer(t["rte"], rte + " maybe", rte) == -1
    nli = "A cat sat. entails the A cat stood. True or False? Answer:"
    assert P.parse_answer(t["nli"], nli + " True or false", nli) == 1  # NLI tests "true" first
    assert P.parse_answer(t["nli"], nli + " false", nli) == 0
    cola = "Is this sentence linguistically acceptable?\nSentence: Him go.\nAnswer: "
    assert P.parse_answer(t["cola"], cola + "not sure", cola) == 0  # "no" matches inside "not"
    assert P.parse_answer(t["cola"], cola + "No, yes", cola) == 1
    assert P.parse_answer(t["cola"], cola + "maybe", cola) == -1
    mrpc = "Are the sentences paraphrases of each other.\nSentence 1: a\nSentence 2: b\nAnswer:"
    assert P.parse_answer(t["mrpc"], mrpc + " I know", mrpc) == 0
    mmlu = "Question: Where is Ottawa?\n(A) Canada\n(B) Peru\n(C) Chad\n(D) Fiji\nAnswer:"  # "a\n" in the prompt
    assert P.parse_answer(t["mmlu"], mmlu + " B\nQuestion", mmlu) == 1
    assert P.parse_answer(t["mmlu"], mmlu + " c\n", mmlu) == 2
    assert P.parse_answer(t["mmlu"], mmlu + " D\nthe a\n", mmlu) == 0  # "a\n" is tested first
    assert P.parse_answer(t["mmlu"], mmlu + " C", mmlu) == -1  # no newline within gen_len
    assert P.parse_answer(t["mmlu"], mmlu + " E", mmlu) == -1  # the prompt's "Canada\n" is removed first
    assert P.parse_answer(t["dialogue"], "Q: x\nAnswer: A\n", "Q: x\nAnswer:") == 0


def test_likelihood_decision():
    t = P.TASKS
    assert P.likelihood_prediction(t["sst2"], [0.6, 0.4]) == 1
    assert P.likelihood_prediction(t["sst2"], [0.4, 0.6]) == 0
    assert P.likelihood_prediction(t["sst2"], [0.5, 0.5]) == 0  # 1 only if p(positive) > p(negative)
    assert P.likelihood_prediction(t["rte"], [0.7, 0.3]) == 1  # p(True) larger: class 1
    assert P.likelihood_prediction(t["mmlu"], [0.1, 0.5, 0.2, 0.2]) == 1
    assert P.likelihood_prediction(t["mmlu"], [0.1, 0.2, 0.2, 0.3]) == 3
    assert P.likelihood_prediction(t["mmlu"], [0.4, 0.4, 0.1, 0.1]) == -1  # a tie at the top


# ----------------------------------------------------------------------------------------------------
# Metrics


def confusion(tp: int, fp: int, fn: int, tn: int) -> tuple[list[int], list[int]]:
    gold = [1] * tp + [0] * fp + [1] * fn + [0] * tn
    pred = [1] * tp + [1] * fp + [0] * fn + [0] * tn
    return gold, pred


def test_metrics_hand_computed():
    gold, pred = confusion(tp=3, fp=1, fn=2, tn=4)
    assert P.f1_binary(gold, pred) == pytest.approx(6 / 9)
    assert P.f1_binary(gold, pred, positive=0) == pytest.approx(8 / 11)  # tp 4, fp 2, fn 1
    assert P.f1_weighted(gold, pred) == pytest.approx((5 * 6 / 9 + 5 * 8 / 11) / 10)
    assert P.mcc(gold, pred) == pytest.approx((12 - 2) / math.sqrt(4 * 5 * 5 * 6))
    assert P.accuracy(gold, pred) == pytest.approx(0.7)
    # an invalid (−1) prediction is a class of its own: F1(1) = 2/4, F1(0) = 2/3, weights 2 and 2
    gold, pred = [1, 1, 0, 0], [1, -1, 0, 1]
    assert P.f1_weighted(gold, pred) == pytest.approx((2 * 0.5 + 2 * 2 / 3) / 4)
    # n = 4, correct 2, true counts {1: 2, 0: 2}, predicted {1: 2, -1: 1, 0: 1}
    assert P.mcc(gold, pred) == pytest.approx((2 * 4 - (2 * 2 + 2 * 1)) / math.sqrt((16 - 8) * (16 - 6)))
    assert P.mcc([1, 0, 1, 0], [1, 1, 1, 1]) == 0.0  # a constant prediction
    assert P.f1_binary([0, 0], [0, 0]) == 0.0  # no positive anywhere: 0/0 -> 0
    m = P.task_metrics([1, 0, 1, 0], [1, 1, -1, 0], [1, 1, 1, 0])
    assert (m["acc"], m["invalid"], m["lik_acc"]) == (0.5, 0.25, 0.75)
    # generation: F1(1) = 2/4, F1(0) = 2/3, weighted 7/12 (the authors' f1; the binary F1 would be 1/2)
    assert m["f1"] == pytest.approx(7 / 12) and m["mcc"] == pytest.approx(2 / math.sqrt(80))
    # likelihood: F1(1) = 2·2/(4 + 1) = 4/5, F1(0) = 2/3, weighted 11/15 (the binary F1 would be 4/5);
    # MCC: n 4, correct 3, true {1: 2, 0: 2}, predicted {1: 3, 0: 1}: (12 − 8)/√(8·6)
    assert m["lik_f1"] == pytest.approx(11 / 15) and m["lik_mcc"] == pytest.approx(4 / math.sqrt(48))


@pytest.mark.filterwarnings("ignore:A single label was found")
def test_metrics_equal_sklearn():
    skm = pytest.importorskip("sklearn.metrics")
    rng = random.Random(0)
    for k in (2, 4):
        for _ in range(30):
            gold = [rng.randrange(k) for _ in range(rng.randrange(1, 40))]
            pred = [rng.choice([*range(k), -1]) for _ in gold]
            assert P.f1_weighted(gold, pred) == pytest.approx(skm.f1_score(gold, pred, average="weighted"))
            assert P.mcc(gold, pred) == pytest.approx(skm.matthews_corrcoef(gold, pred), abs=1e-12)
            assert P.accuracy(gold, pred) == pytest.approx(skm.accuracy_score(gold, pred))
            if k == 2:
                assert P.f1_binary(gold, pred) == pytest.approx(skm.f1_score(gold, pred, labels=[1], average="macro"))


def test_result_metric_names():
    r = P.ProbeResult({"sst2": P.task_metrics([1, 0], [1, -1], [1, 1])}, seconds=2.5)
    m = r.metrics()
    names = ("f1", "mcc", "acc", "invalid", "lik_f1", "lik_mcc", "lik_acc")
    assert set(m) == {f"probe_sst2_{n}" for n in names}
    assert m["probe_sst2_acc"] == 50.0 and m["probe_sst2_invalid"] == 50.0


# ----------------------------------------------------------------------------------------------------
# Both predictions against the authors' unbatched loop


def authors_generation(model, tok, task: P.ProbeTask, prompt: str) -> tuple[int, str]:
    """Their loop: tok.encode, model.generate(max_length = len + gen_len, greedy), decode, _get_answer."""
    ids = tok.encode(prompt, return_tensors="pt")
    text = tok.decode(ids[0], skip_special_tokens=True)
    out = model.generate(ids, max_length=ids.shape[1] + P.GEN_LEN, do_sample=False)
    decoded = tok.decode(out[0], skip_special_tokens=True)
    return P.parse_answer(task, decoded, text), decoded.replace(text, "")


def authors_nll(model, tok, prompt: str, word: str) -> float:
    """Their likelihood loop, with their ``"llama" in name`` branch (which drops the BOS of the word's ids
    and the first logit row: the BOS tokenizer's model is named tiny-llama)."""
    w = tok(f" {word}")["input_ids"]
    n = len(tok(prompt)["input_ids"])
    logits = model(**tok([f"{prompt} {word}"], return_tensors="pt")).logits
    if "llama" in model.config._name_or_path.lower():
        w, logits, n = w[1:], logits[:, 1:, :], n - 1
    return sum(-torch.log_softmax(logits[0, n + j - 1, :], dim=0)[w[j]].item() for j in range(len(w))) / len(w)


@pytest.mark.parametrize("which", ["tok", "tok_bos"])
def test_run_probes_equals_the_authors_loop(data, which, request):
    from conftest import make_model

    tok = request.getfixturevalue(which)
    model = make_model(len(tok))
    model.config._name_or_path = "tiny-llama" if which == "tok_bos" else "tiny"
    tasks = P.ENABLED if which == "tok" else ("sst2", "cola", "mmlu")
    r = P.run_probes(model, tok, tasks, data, n_items=4, batch_size=3)
    m = r.metrics()
    assert len(m) == 7 * len(tasks) and all(math.isfinite(v) for v in m.values())
    for name in tasks:
        enc = P.encode_task(tok, name, data, 4)
        assert P.encode_task(tok, name, data, 4) is enc  # cached per tokenizer
        pr = r.predictions[name]
        assert pr.gold == tuple(it.gold for it in P.load_items(data, name, 4))
        for i in (0, 3):
            assert (pr.generated[i], pr.texts[i]) == authors_generation(model, tok, enc.task, enc.prompts[i]), name
            ref = [authors_nll(model, tok, enc.prompts[i], w) for w in enc.task.scored_words]
            assert pr.nll[i] == pytest.approx(ref, abs=1e-5), name
            assert pr.likelihood[i] == P.likelihood_prediction(enc.task, [math.exp(-v) for v in ref])
        assert r.tasks[name] == P.task_metrics(pr.gold, pr.generated, pr.likelihood)


def test_one_prefill_serves_both_predictions_of_every_task(data, model, tok, monkeypatch):
    """predict (the tasks pooled, each prompt run once for its generation and its single-token words) gives
    what the separate passes give: the same generations, the same NLLs to float noise, the same
    likelihood predictions; only the pairs the prefill cannot score (multi-token or jointly tokenised
    words) reach likelihood_nll."""
    tasks = ("sst2", "mrpc", "mmlu", "rte")
    encs = [P.encode_task(tok, t, data, 5) for t in tasks]
    separate = [
        (*P.generate_answers(model, tok, enc, batch_size=3), P.likelihood_nll(model, tok, enc, batch_size=3))
        for enc in encs
    ]
    asked: list[tuple[str, list]] = []
    real = P.likelihood_nll

    def spy(model, tok, enc, *, batch_size=32, pairs=None, out=None):
        asked.append((enc.task.name, list(pairs)))
        return real(model, tok, enc, batch_size=batch_size, pairs=pairs, out=out)

    monkeypatch.setattr(P, "likelihood_nll", spy)
    pooled = P.predict(model, tok, encs, batch_size=3)
    for enc, (gen, texts, nll), (gen0, texts0, nll0) in zip(encs, pooled, separate):
        assert (gen, texts) == (gen0, texts0), enc.task.name
        assert torch.allclose(nll, nll0, atol=1e-5), enc.task.name
        lik = [P.likelihood_prediction(enc.task, [math.exp(-v) for v in row]) for row in nll.tolist()]
        lik0 = [P.likelihood_prediction(enc.task, [math.exp(-v) for v in row]) for row in nll0.tolist()]
        assert lik == lik0, enc.task.name
    for name, pairs in asked:
        enc = encs[tasks.index(name)]
        assert pairs and all(len(enc.word_ids[w]) > 1 or enc.joint[i][w] is not None for i, w in pairs)
    n_single = sum(
        len(wid) == 1 and enc.joint[i][w] is None
        for enc in encs
        for i in range(len(enc.items))
        for w, wid in enumerate(enc.word_ids)
    )
    assert n_single > 0, "the tiny tokenizer must give the prefill some words to score"


def test_joint_rows_score_as_the_prompt_then_word(data, model, tok):
    """The authors' joint-row path (used where ``tok(prompt + " " + w)`` splits otherwise) agrees with the
    shared-prompt path where the two tokenisations are the same."""
    enc = P.encode_task(tok, "mmlu", data, 3)
    fast = P.likelihood_nll(model, tok, enc, batch_size=2)
    joint = tuple(tuple(tuple(tok(f"{p} {w}")["input_ids"]) for w in enc.task.scored_words) for p in enc.prompts)
    slow = P.likelihood_nll(model, tok, replace(enc, joint=joint), batch_size=2)
    assert torch.allclose(fast, slow, atol=1e-5)


def test_generation_ends_where_generate_ends(data, model, tok):
    """greedy_generate ends a row at the tokenizer's EOS, model.generate at the model's generation-config
    EOS ids (the tiny model's: 2, not the tokenizer's 1): make the model emit either, and the continuation
    still equals model.generate's."""
    enc = P.encode_task(tok, "sst2", data, 3)
    first = int(model.generate(torch.tensor([enc.prompt_ids[0]]), max_new_tokens=1, do_sample=False)[0, -1])
    model.generation_config.eos_token_id = first  # the model's EOS, emitted at once by item 0
    preds, texts = P.generate_answers(model, tok, enc, batch_size=2)
    for i in range(3):
        assert (preds[i], texts[i]) == authors_generation(model, tok, enc.task, enc.prompts[i])
    model.generation_config.eos_token_id = 2
    head = model.lm_head.weight
    with torch.no_grad():
        head[tok.eos_token_id] = head[first] * 1.5  # EOS now wins wherever that token did
    assert tok.eos_token_id not in P.eos_ids(model)
    preds, texts = P.generate_answers(model, tok, enc, batch_size=2)
    for i in range(3):
        assert (preds[i], texts[i]) == authors_generation(model, tok, enc.task, enc.prompts[i])
    model.generation_config.eos_token_id = tok.eos_token_id  # now both stop there
    preds, texts = P.generate_answers(model, tok, enc, batch_size=2)
    for i in range(3):
        assert (preds[i], texts[i]) == authors_generation(model, tok, enc.task, enc.prompts[i])


# ----------------------------------------------------------------------------------------------------
# The pickle converter and the fetch command


def test_convert_pickle_plain_records(tmp_path, data):
    recs = [{"sentence": "é ok", "label": 1, "idx": 3}, {"q": "x", "choices": ["a", "b"], "answer": 0, "f": None}]
    (tmp_path / "a.pkl").write_bytes(pickle.dumps(recs))
    assert P.convert_pickle(tmp_path / "a.pkl", tmp_path / "a.jsonl") == 2
    assert (tmp_path / "a.jsonl").read_text(encoding="utf-8").splitlines() == [
        '{"sentence": "é ok", "label": 1, "idx": 3}',
        '{"q": "x", "choices": ["a", "b"], "answer": 0, "f": null}',
    ]
    # the shared file's records, pickled and converted, give the shared file byte for byte
    sst = [json.loads(line) for line in (data / "sst2.jsonl").read_text(encoding="utf-8").splitlines()]
    (tmp_path / "sst2.pkl").write_bytes(pickle.dumps(sst, protocol=4))
    P.convert_pickle(tmp_path / "sst2.pkl", tmp_path / "sst2.jsonl")
    assert P.md5_file(tmp_path / "sst2.jsonl") == P.FILES["sst2"][1]


class Boom:
    def __reduce__(self):
        return (print, ("EXECUTED",))


def test_convert_pickle_refuses_classes(tmp_path, capsys):
    cases = [
        (pickle.dumps([collections.OrderedDict()]), r"refused: the pickle references collections\.OrderedDict"),
        (pickle.dumps([Boom()]), r"refused: the pickle references builtins\.print"),
        (pickle.dumps({"a": 1}), "expected a list of dicts, got dict"),
        (pickle.dumps([{"a": (1, 2)}]), r"record 0\.a: a tuple has no JSON form"),
        (pickle.dumps([{1: "a"}]), "key 1 is not a string"),
        (b"not a pickle", "not a readable pickle"),
    ]
    buf = io.BytesIO()
    pk = pickle.Pickler(buf)
    pk.persistent_id = lambda obj: "ext" if obj == "x" else None
    pk.dump([{"a": "x"}])
    cases.append((buf.getvalue(), "refused: the pickle holds a persistent id"))
    for blob, msg in cases:
        (tmp_path / "bad.pkl").write_bytes(blob)
        with pytest.raises(P.ProbeDataError, match=msg):
            P.convert_pickle(tmp_path / "bad.pkl", tmp_path / "bad.jsonl")
        assert not (tmp_path / "bad.jsonl").exists()
    assert "EXECUTED" not in capsys.readouterr().out


def test_fetch_fails_with_one_line(tmp_path, monkeypatch):
    def offline(url, timeout):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(P, "_download", offline)
    with pytest.raises(SystemExit) as e:
        P.main(["fetch", "--out", str(tmp_path / "d"), "--tasks", "sst2"])
    msg = str(e.value.code)
    assert "\n" not in msg and msg.startswith("sweep.evals.probes fetch: cannot download https://raw.githubusercontent")
    assert f"/{P.COMMIT}/glue_eval/dataset/sst2.pkl" in msg and "name resolution" in msg

    monkeypatch.setattr(P, "_download", lambda url, timeout: pickle.dumps([{"a": 1}]))
    with pytest.raises(SystemExit, match=r"md5 \w+, expected dd751a16a50850480fc663584f4f1133"):
        P.main(["fetch", "--out", str(tmp_path / "d"), "--tasks", "sst2"])
    assert list((tmp_path / "d").iterdir()) == []
