"""MQuAKE: parsing and validation, the paper's multi-hop prompt layouts, answer reading and matching, and
the scores (exactly, through a stand-in for greedy generation; end to end on the tiny model)."""

from __future__ import annotations

import copy
import json
import logging
import re

import pytest

from editors.requests import encode
from sweep.evals import mquake
from sweep.evals.data import DatasetError
from sweep.evals.generation import normalize_answer
from sweep.evals.mquake import (
    STYLES,
    CaseScores,
    MQuAKEError,
    aggregate_mquake,
    answer_matches,
    edit_conflicts,
    extract_answer,
    load_cases,
    load_prompt,
    multihop_scores,
    parse_case,
    parse_cases,
    question_prompt,
    recalls_target,
)
from tests.conftest import DATA

MQUAKE = DATA / "mquake"
HARD = MQUAKE / "MQuAKE-hard.json"
PROMPTS = MQUAKE / "prompts"
needs_shared = pytest.mark.skipif(not HARD.is_file(), reason="../shared/data/mquake is absent")


def hop(question, cloze, answer, *aliases):
    return {"question": question, "cloze": cloze, "answer": answer, "answer_alias": list(aliases)}


def record(case_id=7, **kw):
    """A two-hop case in the MQuAKE schema: both hops edited."""
    rec = {
        "case_id": case_id,
        "requested_rewrite": [
            {
                "prompt": "{} was performed by",
                "relation_id": "P175",
                "target_new": {"str": "Madonna", "id": "Q1744"},
                "target_true": {"str": "The Beatles", "id": "Q1299"},
                "subject": "Hey Jude",
                "question": "Who performed Hey Jude?",
            },
            {
                "prompt": "The official language of {} is",
                "relation_id": "P37",
                "target_new": {"str": "Washington, D.C.", "id": "Q61"},
                "target_true": {"str": "English", "id": "Q1860"},
                "subject": "Madonna",
                "question": "What is the official language of Madonna?",
            },
        ],
        "questions": [
            "What language does the performer of Hey Jude speak?",
            "Which language is spoken by the artist of Hey Jude?",
            "The singer of Hey Jude speaks which language? ",
        ],
        "answer": "English",
        "answer_alias": ["English language", "en"],
        "new_answer": "Washington, D.C.",
        "new_answer_alias": ["Washington DC", "Arabic"],
        "single_hops": [
            hop("Who performed Hey Jude?", "Hey Jude was performed by", "The Beatles", "Beatles"),
            hop("What is the language of The Beatles?", "The language of The Beatles is", "English"),
        ],
        "new_single_hops": [
            hop("Who performed Hey Jude?", "Hey Jude was performed by", "Madonna"),
            hop("What is the language of Madonna?", "The language of Madonna is", "Washington, D.C."),
        ],
        "orig": {"triples": []},
    }
    rec.update(kw)
    return rec


# ----------------------------------------------------------------------------------------------------
# Records


@needs_shared
def test_hard_fixture_parses():
    cases = load_cases(HARD)
    assert len(cases) == 429 and len({c.case_id for c in cases}) == 429
    assert all(len(c.rewrites) == 4 and len(c.questions) == 3 for c in cases)
    assert all(len(c.single_hops) == len(c.new_single_hops) == 4 for c in cases)
    c = next(c for c in cases if c.case_id == 7417)
    r = c.rewrites[0]
    assert (r.prompt, r.subject, r.target_new, r.target_true) == (
        "{} was performed by",
        "Hey Jude",
        "Madonna",
        "The Beatles",
    )
    assert (r.question, r.relation_id, r.cloze) == ("Who performed Hey Jude?", "P175", "Hey Jude was performed by")
    assert (c.answer, c.new_answer) == ("English", "Arabic")
    assert c.answer_aliases == ("en", "eng", "English language")
    assert c.new_answers == ("Arabic", "ar", "Arabian language", "Arabic language")
    assert c.new_single_hops[1].answer == "Narendra Modi" and "Modi" in c.new_single_hops[1].aliases
    reqs = c.requests()
    assert [q.case_id for q in reqs] == ["7417/0", "7417/1", "7417/2", "7417/3"]
    assert reqs[0].template == "{} was performed by" and reqs[0].target_true == "The Beatles"
    # every edit's cloze is one of the case's post-edit single-hop clozes, as in the paper's data
    assert all(r.cloze in {h.cloze for h in c.new_single_hops} for c in cases for r in c.rewrites)
    assert [c.case_id for c in load_cases(str(HARD), n=3)] == [c.case_id for c in cases[:3]]
    # two facts are edited to different objects by different cases of this subset
    assert edit_conflicts(cases) == {
        ("Portal", "P178"): {"Epic Games", "Sony Interactive Entertainment"},
        ("A Hard Day's Night", "P175"): {"Madonna", "Chicago Symphony Orchestra"},
    }


def test_parse_hand_record_keeps_questions_verbatim():
    c = parse_case(record())
    assert c.questions[2].endswith("language? ")  # trailing space in the data, kept as the authors keep it
    assert c.rewrites[1].cloze == "The official language of Madonna is"
    assert c.answers == ("English", "English language", "en")
    assert c.requests()[1].case_id == "7/1" and c.requests()[1].target_new == "Washington, D.C."


def _without(rec, *path):
    node = rec
    for p in path[:-1]:
        node = node[p]
    del node[path[-1]]
    return rec


def _set(rec, value, *path):
    node = rec
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    return rec


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda r: _without(r, "new_answer"), "'new_answer'"),
        (lambda r: _set(r, "The official language of Madonna is", "requested_rewrite", 1, "prompt"),
         "'requested_rewrite[1].prompt'"),
        (lambda r: _set(r, "{} and {} were performed by", "requested_rewrite", 0, "prompt"),
         "'requested_rewrite[0].prompt'"),
        (lambda r: _set(r, "Madonna", "requested_rewrite", 0, "target_new"), "'requested_rewrite[0].target_new.str'"),
        (lambda r: _set(r, " ", "requested_rewrite", 1, "subject"), "'requested_rewrite[1].subject'"),
        (lambda r: _without(r, "requested_rewrite", 1, "question"), "'requested_rewrite[1].question'"),
        (lambda r: _set(r, [], "requested_rewrite"), "'requested_rewrite'"),
        (lambda r: _set(r, [], "questions"), "'questions'"),
        (lambda r: _set(r, ["a?", 3, "c?"], "questions"), "'questions[1]'"),
        (lambda r: _set(r, ["ar", 3], "new_answer_alias"), "'new_answer_alias[1]'"),
        (lambda r: _set(r, "Arabic", "answer_alias"), "'answer_alias'"),
        (lambda r: _without(r, "new_single_hops", 1, "cloze"), "'new_single_hops[1].cloze'"),
        (lambda r: _set(r, r["new_single_hops"][:1], "new_single_hops"), "'new_single_hops'"),
    ],
)  # fmt: skip
def test_validation_names_case_and_field(mutate, field):
    rec = mutate(copy.deepcopy(record(case_id=7)))
    with pytest.raises(MQuAKEError) as e:
        parse_case(rec)
    assert "case 7:" in str(e.value) and field in str(e.value)
    assert isinstance(e.value, DatasetError)  # callers that catch dataset errors catch these


def test_cases_file_errors(tmp_path):
    with pytest.raises(MQuAKEError, match="case x: field 'case_id'"):
        parse_case(record(case_id="x"))
    with pytest.raises(MQuAKEError, match="case 3: duplicate case_id"):
        parse_cases([record(case_id=3), record(case_id=4), record(case_id=3)])
    with pytest.raises(MQuAKEError, match="non-empty JSON list"):
        parse_cases({"case_id": 1})
    path = tmp_path / "m.json"
    path.write_text(json.dumps([record(1), record(2)]))
    assert [c.case_id for c in load_cases(path, n=1)] == [1]
    for n in (0, 3):
        with pytest.raises(MQuAKEError, match="n"):
            load_cases(path, n=n)
    path.write_text("[{")
    with pytest.raises(MQuAKEError, match="not valid JSON"):
        load_cases(path)
    with pytest.raises(MQuAKEError, match="not a file"):
        load_cases(tmp_path / "absent.json")


# ----------------------------------------------------------------------------------------------------
# Prompts


def test_question_prompt_layouts_by_hand():
    q = 'Who is the spouse of the "US" president?'
    assert (
        question_prompt("Q: a? A: b\nQ: c? A: d", q)
        == 'Q: a? A: b\nQ: c? A: d\nQ: Who is the spouse of the "US" president? A:'
    )
    cot = "Question: a?\nThoughts: t.\nAnswer: b"
    assert question_prompt(cot, q, "cot") == (
        'Question: a?\nThoughts: t.\nAnswer: b\n\nQuestion: Who is the spouse of the "US" president?\nThoughts:'
    )
    assert question_prompt("D", "{} {0}?") == "D\nQ: {} {0}? A:"  # braces in a question are text
    with pytest.raises(MQuAKEError, match=r"mquake.style"):
        question_prompt("D", q, "mello")


@needs_shared
def test_prompt_files_and_code_agree():
    """The prompt is the file's text plus the question in the file's own layout."""
    q = "What is the capital of the country where the Eiffel Tower is located?"
    direct = (PROMPTS / "multihop-prompts.txt").read_text(encoding="utf-8")
    assert load_prompt(PROMPTS, "direct") == direct  # no trailing newline upstream
    p = question_prompt(load_prompt(PROMPTS), q)
    assert p == direct + "\nQ: " + q + " A:"
    assert p.endswith("A: Elizabeth II\nQ: " + q + " A:")
    lines = p.split("\n")
    assert len(lines) == 17
    # every demonstration line is "Q: <question>? A: <answer>" (one upstream line lacks its "A:")
    odd = [x for x in lines[:-1] if not re.fullmatch(r"Q: [^\n]+\? A: [^\n]+", x)]
    assert odd == ["Q: Who was Dodge Ram SRT-10 created by? Dodge"]
    assert re.fullmatch(r"Q: [^\n]+\? A:", lines[-1])

    cot = (PROMPTS / "multihop-cot-prompts.txt").read_text(encoding="utf-8")
    pc = question_prompt(load_prompt(PROMPTS, "cot"), q, "cot")
    assert pc == cot + "\n\nQuestion: " + q + "\nThoughts:"
    blocks = pc.split("\n\n")
    assert len(blocks) == 6  # five demonstrations and the question
    for b in blocks[:-1]:
        b_lines = b.split("\n")
        assert [x.split(":")[0] for x in b_lines] == ["Question", "Thoughts", "Answer"]
    assert blocks[-1] == f"Question: {q}\nThoughts:"


def test_load_prompt_needs_a_folder(tmp_path, caplog):
    with pytest.raises(MQuAKEError, match="prompts_dir: not given"):
        load_prompt(None)
    with pytest.raises(MQuAKEError, match=r"multihop-cot-prompts.txt"):
        load_prompt(tmp_path, "cot")
    (tmp_path / "multihop-prompts.txt").write_text("Q: a? A: b\n")
    with caplog.at_level(logging.WARNING, logger="sweep.evals.mquake"):
        assert load_prompt(tmp_path) == "Q: a? A: b"  # a trailing newline is dropped
    assert "not the upstream file's" in caplog.text


# ----------------------------------------------------------------------------------------------------
# Answers


def test_extract_answer():
    assert extract_answer(" Jill Biden\nQ: Who is the spouse of Joe Biden? A:") == "Jill Biden"
    assert extract_answer("  Washington, D.C. \n") == "Washington, D.C."
    assert extract_answer("\nQ: something") == ""  # nothing on the answer's line
    gen = " The US president is Joe Biden. The spouse of Joe Biden is Jill Biden.\nAnswer: Jill Biden\n\nQuestion: x"
    assert extract_answer(gen, "cot") == "Jill Biden"
    assert extract_answer(" reasoning.\nAnswer:  Arabic language \n", "cot") == "Arabic language"
    # the layout's answer line only: a free-text "the answer is" is not read
    assert extract_answer(" So the answer is Arabic.", "cot") == ""
    # an answer written for a next, invented question does not count
    assert extract_answer(" hmm.\nQuestion: Who?\nThoughts: t.\nAnswer: Arabic", "cot") == ""


def test_answer_matching():
    golds = ("Washington, D.C.", "Washington DC", "The Beatles")
    assert normalize_answer("  The Washington,  D.C.!") == "washington dc"
    assert answer_matches("washington d.c.", golds)  # case and punctuation
    assert answer_matches("Beatles", golds)  # an article
    assert answer_matches("Washington DC", golds, "exact")  # an alias as written
    assert not answer_matches("washington dc", golds, "exact")
    assert not answer_matches("Washington DC or London", golds)  # no containment
    assert not answer_matches("", ("", "The"))  # empty never matches, even an alias that normalises away
    assert not answer_matches("the", ("The",))
    with pytest.raises(MQuAKEError, match=r"mquake.match"):
        answer_matches("a", ("a",), "contains")  # type: ignore[arg-type]


def test_recalls_target():
    assert recalls_target(" Madonna.", "Madonna")
    assert recalls_target(" Madonna and Prince", "Madonna")
    assert recalls_target(" Washington, D.C. is the capital", "Washington, D.C.")
    assert recalls_target(" the Beatles", "The Beatles")
    assert not recalls_target(" Madonnas", "Madonna")  # whole words
    assert not recalls_target(" Prince", "Madonna")
    assert not recalls_target("", "Madonna")


def test_aggregate():
    s = [
        CaseScores(1, "direct", 1.0, 0.0, 0.5, (), (), (), (), (), ()),
        CaseScores(2, "direct", 0.0, 1.0, 1.0, (), (), (), (), (), ()),
    ]
    assert aggregate_mquake(s) == {"mquake_multihop": 50.0, "mquake_multihop_orig": 50.0, "mquake_edit_wise": 75.0}
    with pytest.raises(ValueError):
        aggregate_mquake([])


# ----------------------------------------------------------------------------------------------------
# Scores


def fake_generation(monkeypatch, tok, replies):
    """Stand in for :func:`sweep.evals.generation.greedy_generate`: each prompt gets the continuation of the first
    key of ``replies`` its text ends with; every call is recorded."""
    calls = []

    def greedy_generate(model, tok_, prompts, *, max_new_tokens, stop_texts=(".", "\n"), batch_size=32):
        calls.append({"prompts": [list(p) for p in prompts], "max_new_tokens": max_new_tokens,
                      "stop_texts": tuple(stop_texts), "batch_size": batch_size})  # fmt: skip
        out = []
        for p in prompts:
            text = tok_.decode(p, skip_special_tokens=True)
            reply = next(v for k, v in replies.items() if text.endswith(k))
            out.append(tok_(reply, add_special_tokens=False)["input_ids"])
        return out

    monkeypatch.setattr(mquake, "greedy_generate", greedy_generate)
    return calls


@pytest.mark.parametrize("bos", [False, True])
def test_multihop_scores_exact(monkeypatch, tmp_path, request, bos):
    tok = request.getfixturevalue("tok_bos" if bos else "tok")
    demos = "Q: Who is the spouse of Joe Biden? A: Jill Biden"
    (tmp_path / "multihop-prompts.txt").write_text(demos)
    a = parse_case(record(1))
    b = parse_case(record(2, questions=["Q one?", "Q two?", "Q three?"], new_answer_alias=[]))
    replies = {
        # case 1: question 2 gets an alias of the new answer, question 0 the old answer
        a.questions[0] + " A:": " English\nQ: next",
        a.questions[1] + " A:": " Paris\n",
        a.questions[2] + " A:": " washington dc.\nQ:",
        "Q one? A:": " Arabic",
        "Q two? A:": " Washington D.C.",
        "Q three? A:": "",
        # the two cases share their edits
        "Hey Jude was performed by": " Madonna, who sang it in a long and winding road",
        "The official language of Madonna is": " English and",
    }
    calls = fake_generation(monkeypatch, tok, replies)
    scores = multihop_scores(None, tok, [a, b], tmp_path, batch_size=5)

    questions, clozes = calls
    want = [demos + "\nQ: " + q + " A:" for c in (a, b) for q in c.questions]
    assert questions["prompts"] == [encode(tok, t)[0] for t in want]
    assert (questions["prompts"][0][0] == tok.bos_token_id) is bos
    assert questions["stop_texts"] == ("\n",) and questions["max_new_tokens"] == STYLES["direct"].max_new_tokens
    assert questions["batch_size"] == clozes["batch_size"] == 5
    # the cases share their two edits: each cloze is generated once, bare (no demonstrations)
    assert clozes["prompts"] == [encode(tok, "Hey Jude was performed by")[0],
                                 encode(tok, "The official language of Madonna is")[0]]  # fmt: skip
    assert clozes["stop_texts"] == ("\n",)
    assert clozes["max_new_tokens"] == len(tok(" Washington, D.C.", add_special_tokens=False)["input_ids"]) + 2

    s1, s2 = scores
    assert s1.answers == ("English", "Paris", "washington dc.")
    assert (s1.new_hits, s1.old_hits) == ((False, False, True), (True, False, False))
    assert (s1.multihop_new, s1.multihop_old) == (1.0, 1.0)
    # each cloze completion is cut to its own target's length + 2 tokens
    madonna = tok(" Madonna, who sang it in a long and winding road", add_special_tokens=False)["input_ids"]
    cut = tok.decode(madonna[: len(tok(" Madonna", add_special_tokens=False)["input_ids"]) + 2])
    assert cut.startswith(" Madonna") and len(cut) < 20
    assert s1.cloze_generations == (cut, " English and") and s1.edit_hits == (True, False)
    assert s1.edit_wise == 0.5 and s1.style == "direct" and s1.case_id == 1
    # case 2: "Washington D.C." is the new answer up to punctuation; "Arabic" is no alias of it any more
    assert s2.answers == ("Arabic", "Washington D.C.", "")
    assert s2.new_hits == (False, True, False) and s2.multihop_old == 0.0
    assert aggregate_mquake(scores) == {
        "mquake_multihop": 100.0,
        "mquake_multihop_orig": 50.0,
        "mquake_edit_wise": 50.0,
    }

    # a case scores the same whichever cases it is scored with
    assert multihop_scores(None, tok, [a], tmp_path, batch_size=5) == [s1]
    calls.clear()
    exact = multihop_scores(None, tok, [a, b], tmp_path, match="exact", max_new_tokens=7)
    assert [s.new_hits for s in exact] == [(False, False, False), (False, False, False)]
    assert calls[0]["max_new_tokens"] == 7


def test_multihop_scores_cot(monkeypatch, tmp_path, tok):
    demos = "Question: a?\nThoughts: t.\nAnswer: b"
    (tmp_path / "multihop-cot-prompts.txt").write_text(demos)
    c = parse_case(record(5, questions=["Q one?"]))
    calls = fake_generation(
        monkeypatch,
        tok,
        {
            "Q one?\nThoughts:": " Hey Jude was performed by Madonna. Madonna speaks English.\nAnswer: English\n\n",
            "performed by": " Madonna",
            "Madonna is": " Washington, D.C.",
        },
    )
    (s,) = multihop_scores(None, tok, [c], tmp_path, "cot")
    assert calls[0]["prompts"] == [encode(tok, demos + "\n\nQuestion: Q one?\nThoughts:")[0]]
    assert calls[0]["stop_texts"] == ("\n\n", "\nQuestion:") and calls[0]["max_new_tokens"] == 256
    assert s.answers == ("English",) and (s.multihop_new, s.multihop_old, s.edit_wise) == (0.0, 1.0, 1.0)


def test_multihop_scores_arguments(tmp_path, tok):
    c = parse_case(record())
    with pytest.raises(MQuAKEError, match="prompts_dir"):
        multihop_scores(None, tok, [c], None)
    with pytest.raises(MQuAKEError, match=r"mquake.style"):
        multihop_scores(None, tok, [c], tmp_path, "mello")  # type: ignore[arg-type]
    with pytest.raises(MQuAKEError, match=r"mquake.match"):
        multihop_scores(None, tok, [c], tmp_path, match="contains")  # type: ignore[arg-type]
    with pytest.raises(MQuAKEError, match="max_new_tokens"):
        multihop_scores(None, tok, [c], tmp_path, max_new_tokens=0)


def test_multihop_scores_tiny_model(model, tok, tmp_path):
    """End to end with the real greedy generation: the scores are read from the generations, and a
    case whose gold answer is the model's own answer scores 1."""
    (tmp_path / "multihop-prompts.txt").write_text("Q: Who is the spouse of Joe Biden? A: Jill Biden")
    cases = [parse_case(record(1)), parse_case(record(2, questions=["Where is Rome?"]))]
    scores = multihop_scores(model, tok, cases, tmp_path, max_new_tokens=6, batch_size=2)
    assert [s.case_id for s in scores] == [1, 2] and [len(s.answers) for s in scores] == [3, 1]
    for s, c in zip(scores, cases):
        assert s.answers == tuple(extract_answer(g) for g in s.generations)
        assert s.new_hits == tuple(answer_matches(x, c.new_answers) for x in s.answers)
        assert s.multihop_new == float(any(s.new_hits)) and s.edit_wise == sum(s.edit_hits) / 2
    own = scores[1].answers[0]
    if normalize_answer(own):
        again = parse_case(record(2, questions=["Where is Rome?"], new_answer=own + " "))
        assert multihop_scores(model, tok, [again], tmp_path, max_new_tokens=6)[0].multihop_new == 1.0
