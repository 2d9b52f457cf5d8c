"""ZsRE (MEND and KnowEdit formats) and QAEdit loading, validation before any model work, and selection
through the ZsRE sample lists (positions in zsre_mend_eval.json)."""

from __future__ import annotations

import json
import logging

import pytest

from editors.requests import validate_requests
from sweep.config import DatasetConfig
from sweep.evals.data import (
    ZSRE_URL,
    DatasetError,
    Record,
    load_counterfact,
    load_dataset,
    load_selection,
    parse_qa_records,
    select,
)
from tests import conftest
from tests.conftest import SHARED

# ../shared/data beside the repository root; never copied into the repository
DATA = SHARED / "data"
ZSRE = DATA / "zsre"
MEND = ZSRE / "zsre_mend_eval_portability_gpt4.json"
KNOWEDIT = ZSRE / "ZsRE-test-all.json"
SAMPLES = ZSRE / "zsre_sampled_unique_10_10000.json"
QAEDIT = DATA / "qaedit" / "QAEdit_inter_1k.json"
CF_EDIT = DATA / "counterfact" / "counterfact-edit.json"
needs_shared = pytest.mark.skipif(
    not all(p.is_file() for p in (MEND, KNOWEDIT, SAMPLES, QAEDIT)), reason="../shared/data/{zsre,qaedit} is absent"
)


def mend_record(**kw):
    """A MEND-format ZsRE record (the first record of zsre_mend_eval_portability_gpt4.json, shortened)."""
    rec = {
        "subject": "IAAF Combined Events Challenge",
        "src": "When was the inception of IAAF Combined Events Challenge?",
        "pred": "2011",
        "rephrase": "When was the IAAF Combined Events Challenge launched?",
        "alt": "2006",
        "answers": ["1998"],
        "loc": "nq question: what is the name of the last episode of spongebob",
        "loc_ans": "The String",
        "cond": "2011 >> 2006 || When was the inception of IAAF Combined Events Challenge?",
    }
    rec.update(kw)
    return rec


def knowedit_record(**kw):
    rec = {
        "subject": "Epaspidoceras",
        "target_new": "Noctuidae",
        "prompt": "Which family does Epaspidoceras belong to?",
        "ground_truth": ["Aspidoceratidae"],
        "rephrase_prompt": "What family are Epaspidoceras?",
        "locality": {
            "Relation_Specificity": [
                {"prompt": "The taxon rank of Epaspidoceras is", "ground_truth": ["genus"]},
                {"prompt": "Epaspidoceras taxon rank", "ground_truth": ["genus"]},
            ]
        },
    }
    rec.update(kw)
    return rec


def qaedit_record(**kw):
    rec = {
        "id": 1104,
        "source": "NQ",
        "prompt": "who has the most 70 point games in nba history?",
        "target": "Wilt Chamberlain *",
        "subject": "most 70 point games in nba history",
        "rephrase": "Which NBA player holds the record for the most games scoring 70 points or more?",
        "locality": [{"loc": "who is the saint that protects police officers", "loc_ans": "Michael"}],
    }
    rec.update(kw)
    return rec


def write(tmp_path, name, records):
    path = tmp_path / name
    path.write_text(json.dumps(records))
    return str(path)


@needs_shared
def test_shared_data_path_resolves():
    assert DATA.is_dir() and DATA == conftest.DATA and MEND.resolve().is_relative_to(DATA)


# ----------------------------------------------------------------------------------------------------
# The shared files, first record mapped by hand


@needs_shared
def test_mend_format_first_record_both_targets():
    recs = load_dataset("zsre", str(MEND))
    assert len(recs) == 1037 and [r.case_id for r in recs] == list(range(1037))
    r = recs[0]
    assert r.dataset == "zsre" and r.case_id == 0
    assert (r.prompt, r.subject) == ("When was the inception of {}?", "IAAF Combined Events Challenge")
    assert r.rewrite_prompt == "When was the inception of IAAF Combined Events Challenge?"
    assert (r.target_new, r.target_true, r.target_aliases) == ("1998", "1998", ())
    assert r.paraphrase_prompts == ("When was the IAAF Combined Events Challenge launched?",)
    prompt = "nq question: what is the name of the last episode of spongebob?"
    assert r.neighborhood_prompts == (prompt,) and r.neighborhood_answer == "The String"
    assert r.neighbourhood_pairs() == ((prompt, "The String"),) and r.neighborhood_answers == ()
    assert r.generation_prompts == () and r.relation_id is None
    # record 115 has three gold answers: the first is the target, the others count under exact match
    assert (recs[115].target_new, recs[115].target_aliases) == ("Louise Lester", ("Jack Richardson", "Vivian Rich"))
    raw = json.loads(MEND.read_text())
    assert all(x.rewrite_prompt == y["src"] for x, y in zip(recs, raw, strict=True))

    alt = load_dataset("zsre", str(MEND), target="alt")
    assert len(alt) == 1037  # no alt is empty in this file
    a = alt[0]
    assert (a.target_new, a.target_true, a.target_aliases) == ("2006", "1998", ())
    assert (a.prompt, a.subject, a.paraphrase_prompts, a.neighbourhood_pairs()) == (
        r.prompt,
        r.subject,
        r.paraphrase_prompts,
        r.neighbourhood_pairs(),
    )
    assert alt[115].target_aliases == ()


@needs_shared
def test_knowedit_format_first_record_both_targets():
    recs = load_dataset("zsre", str(KNOWEDIT))
    assert len(recs) == 1301 and recs[-1].case_id == 1300
    r = recs[0]
    assert r.dataset == "zsre" and r.case_id == 0
    assert (r.prompt, r.subject) == ("Which family does {} belong to?", "Epaspidoceras")
    assert (r.target_new, r.target_true, r.target_aliases) == ("Aspidoceratidae", "Aspidoceratidae", ())
    assert r.paraphrase_prompts == ("What family are Epaspidoceras?",)
    nb = ("The taxon rank of Epaspidoceras is", "Epaspidoceras taxon rank")
    assert r.neighborhood_prompts == nb and r.neighborhood_answers == ("genus", "genus")
    assert r.neighborhood_answer == "genus"
    assert r.neighbourhood_pairs() == ((nb[0], "genus"), (nb[1], "genus"))
    assert (recs[32].target_new, recs[32].target_aliases) == ("Minnesota Wild", ("Columbus Blue Jackets",))

    a = load_dataset("zsre", str(KNOWEDIT), target="alt")[0]
    assert (a.target_new, a.target_true, a.target_aliases) == ("Noctuidae", "Aspidoceratidae", ())
    assert a.neighbourhood_pairs() == r.neighbourhood_pairs()


@needs_shared
def test_qaedit_first_record():
    recs = load_dataset("qaedit", str(QAEDIT))
    assert len(recs) == 1000 and [r.case_id for r in recs] == list(range(1000))
    r = recs[0]
    assert r.dataset == "qaedit" and r.case_id == 0
    assert (r.prompt, r.subject) == ("who has the {}?", "most 70 point games in nba history")
    assert (r.target_new, r.target_true, r.target_aliases) == ("Wilt Chamberlain *", "Wilt Chamberlain *", ())
    assert r.paraphrase_prompts == ("Which NBA player holds the record for the most games scoring 70 points or more?",)
    # only locality[0], as the WILD code; a natural question, no "?" appended
    assert r.neighbourhood_pairs() == (("who is the saint that protects police officers", "Michael"),)
    assert recs[28].target_new == "24,303.04"  # " 24,303.04" in the file: whitespace stripped, text kept
    with pytest.raises(DatasetError, match=r"dataset\.target: 'alt' applies to zsre only"):
        load_dataset("qaedit", str(QAEDIT), target="alt")


@needs_shared
def test_every_shared_record_makes_a_valid_edit_request(tok, tok_bos):
    for name, path, targets in (("zsre", MEND, ("answers", "alt")), ("zsre", KNOWEDIT, ("answers", "alt"))):
        for target in targets:
            recs = load_dataset(name, str(path), target=target)
            validate_requests(tok, [r.request() for r in recs])
    recs = load_dataset("qaedit", str(QAEDIT))
    validate_requests(tok, [r.request() for r in recs])
    validate_requests(tok_bos, [r.request() for r in recs])
    assert all(r.request().template == r.prompt and r.neighbourhood_pairs() for r in recs)


# ----------------------------------------------------------------------------------------------------
# Errors name the case (its position) and the field


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (mend_record(subject="Decathlon"), r"case 1: field 'subject' 'Decathlon' is not in field 'src'"),
        (mend_record(answers=[]), r"case 1: field 'answers' must be a non-empty list"),
        (mend_record(answers=["  "]), r"case 1: field 'answers' must be a non-empty string"),
        ({k: v for k, v in mend_record().items() if k != "loc"}, r"case 1: missing field 'loc'"),
        (mend_record(loc="what is the name"), r"case 1: field 'loc' must hold 'nq question: '"),
        (mend_record(rephrase=""), r"case 1: field 'rephrase' must be a non-empty string"),
        (mend_record(src="When was {} founded?"), r"case 1: field 'src' already holds '\{\}'"),
        ({"subject": "x", "answers": ["y"]}, r"case 1: missing field 'src' \(ZsRE MEND format\) or 'prompt'"),
        ("not a record", r"case 1: every record must be a JSON object"),
        (knowedit_record(locality={}), r"case 1: missing field 'locality.Relation_Specificity'"),
        (
            knowedit_record(locality={"Relation_Specificity": [{"prompt": "p", "ground_truth": []}]}),
            r"case 1: field 'locality.Relation_Specificity\[0\].ground_truth' must be a non-empty list",
        ),
        (knowedit_record(ground_truth=[]), r"case 1: field 'ground_truth' must be a non-empty list"),
    ],
)
def test_zsre_errors_name_case_and_field(bad, message):
    with pytest.raises(DatasetError, match=message):
        parse_qa_records([mend_record(), bad], "zsre")


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (qaedit_record(locality=[]), r"case 1: field 'locality' must be a non-empty list"),
        (qaedit_record(locality=[{"loc": "who?"}]), r"case 1: field 'locality\[0\].loc_ans' must be a non-empty"),
        (qaedit_record(target=" "), r"case 1: field 'target' must be a non-empty string"),
        ({k: v for k, v in qaedit_record().items() if k != "rephrase"}, r"case 1: missing field 'rephrase'"),
        (qaedit_record(subject="MVP"), r"case 1: field 'subject' 'MVP' is not in field 'prompt'"),
    ],
)
def test_qaedit_errors_name_case_and_field(bad, message):
    with pytest.raises(DatasetError, match=message):
        parse_qa_records([qaedit_record(), bad], "qaedit")


def test_knowedit_target_alt_needs_target_new():
    bad = {k: v for k, v in knowedit_record().items() if k != "target_new"}
    assert parse_qa_records([bad], "zsre")[0].target_new == "Aspidoceratidae"
    with pytest.raises(DatasetError, match=r"case 0: missing field 'target_new'"):
        parse_qa_records([bad], "zsre", target="alt")


def test_wrong_benchmark_suggests_dataset_name(tmp_path):
    cf = write(tmp_path, "cf.json", [{"case_id": 0, "requested_rewrite": {}, "neighborhood_prompts": []}])
    with pytest.raises(
        DatasetError, match=r"case 0: dataset.name is 'zsre' but .* CounterFact .*dataset.name: counterfact"
    ):
        load_dataset("zsre", cf)
    zsre = write(tmp_path, "zsre.json", [mend_record()])
    with pytest.raises(DatasetError, match=r"case 0: dataset.name is 'qaedit' but .* ZsRE .*dataset.name: zsre"):
        load_dataset("qaedit", zsre)
    with pytest.raises(DatasetError, match=r"case 0: dataset.name is 'counterfact' but .*dataset.name: zsre"):
        load_dataset("counterfact", zsre)
    qa = write(tmp_path, "qa.json", [qaedit_record()])
    with pytest.raises(DatasetError, match=r"case 0: dataset.name is 'zsre' but .* QAEdit .*dataset.name: qaedit"):
        load_dataset("zsre", qa)
    ke = write(tmp_path, "ke.json", [knowedit_record()])
    with pytest.raises(DatasetError, match=r"case 0: dataset.name is 'qaedit' but .* ZsRE"):
        load_dataset("qaedit", ke)
    with pytest.raises(DatasetError, match=r"dataset\.name: 'wikidata' is not one of"):
        load_dataset("wikidata", zsre)
    with pytest.raises(DatasetError, match="field 'case_id' must be an integer"):  # a ZsRE file read as MQuAKE
        load_dataset("mquake", zsre)


@pytest.mark.skipif(not CF_EDIT.is_file(), reason="../shared/data/counterfact is absent")
def test_shared_counterfact_file_read_as_zsre():
    with pytest.raises(DatasetError, match=r"case 0: dataset.name is 'zsre'.*set dataset.name: counterfact"):
        load_dataset("zsre", str(CF_EDIT))


def test_demo_and_target_rules():
    for name in ("zsre", "qaedit"):
        with pytest.raises(DatasetError, match=rf"dataset\.source: 'demo' is the CounterFact demo set.*'{name}'"):
            load_dataset(name, "demo")
    with pytest.raises(DatasetError, match=r"dataset\.source: .*" + ZSRE_URL):
        load_dataset("zsre", "demo")
    with pytest.raises(DatasetError, match=r"dataset\.target: 'alt' applies to zsre only"):
        load_dataset("counterfact", "demo", target="alt")
    assert load_dataset("counterfact", "demo") == load_counterfact("demo")
    assert all(r.dataset == "counterfact" for r in load_dataset("counterfact", "demo"))


# ----------------------------------------------------------------------------------------------------
# EasyEdit's empty-alt rule


def test_empty_alt_records_are_skipped_under_alt_only(tmp_path, caplog):
    path = write(
        tmp_path, "zsre.json", [mend_record(), mend_record(alt=""), mend_record(alt="  "), mend_record(alt="1990")]
    )
    assert [r.case_id for r in load_dataset("zsre", path)] == [0, 1, 2, 3]
    with caplog.at_level(logging.INFO, logger="sweep.evals.data"):
        recs = load_dataset("zsre", path, target="alt")
    assert [(r.case_id, r.target_new) for r in recs] == [(0, "2006"), (3, "1990")]  # positions kept
    assert "skipped 2 of 4 records with an empty 'alt'" in caplog.text
    with pytest.raises(DatasetError, match="every record has an empty 'alt'"):
        parse_qa_records([mend_record(alt="")], "zsre", target="alt")
    with pytest.raises(DatasetError, match=r"case 0: field 'alt' must be a non-empty string"):
        parse_qa_records([mend_record(alt=None)], "zsre", target="alt")


# ----------------------------------------------------------------------------------------------------
# Selection: ZsRE sample lists hold positions in zsre_mend_eval.json


def zsre_records(n):
    return [Record(i, "{} is", f"s{i}", "a", "a", ("p",), ("nq question: q?",), "b", dataset="zsre") for i in range(n)]


@needs_shared
def test_zsre_sample_file_format_selects_positions():
    samples = json.loads(SAMPLES.read_text())
    assert len(samples) == 10 and all(len(v) == 10_000 for v in samples.values())
    assert max(max(v) for v in samples.values()) == 19_085  # positions in the full 19,086-record file
    full = zsre_records(19_086)  # stands in for zsre_mend_eval.json, which is not in shared/
    chosen = select(full, n=50, sample_file=str(SAMPLES), sample=3)
    assert [r.case_id for r in chosen] == samples["3"][:50]


@needs_shared
def test_zsre_sample_file_on_another_file_is_an_error():
    # Positions in the 1,037-record EasyEdit file are other questions than the same positions in
    # zsre_mend_eval.json: the sample list must not pick from it the way CounterFact keeps the ids it has.
    cfg = DatasetConfig(name="zsre", source=str(MEND), sample_file=str(SAMPLES))
    with pytest.raises(DatasetError, match=r"dataset\.sample_file: \d+ of the 10000 ids .*1037-record file"):
        load_selection(cfg, 10)
    with pytest.raises(DatasetError, match=r"dataset\.sample_file: .*not positions"):
        select(load_dataset("zsre", str(MEND)), n=10, sample_file=str(SAMPLES))
    recs = load_selection(DatasetConfig(name="zsre", source=str(MEND), case_ids=(5, 2, 900)), None)
    assert [r.case_id for r in recs] == [5, 2, 900]


def test_zsre_sample_ids_of_skipped_records_are_dropped(tmp_path):
    path = write(tmp_path, "zsre.json", [mend_record(), mend_record(alt=""), mend_record(), mend_record()])
    samples = write(tmp_path, "samples.json", {"0": [3, 1, 0, 2], "1": [3, 4]})
    cfg = DatasetConfig(name="zsre", source=path, sample_file=samples, target="alt")
    assert [r.case_id for r in load_selection(cfg, None)] == [3, 0, 2]
    answers = DatasetConfig(name="zsre", source=path, sample_file=samples)
    assert [r.case_id for r in load_selection(answers, 4)] == [3, 1, 0, 2]
    with pytest.raises(DatasetError, match=r"dataset\.sample_file: 1 of the 2 ids .*4-record file .*e\.g\. \[4\]"):
        load_selection(DatasetConfig(name="zsre", source=path, sample_file=samples, sample=1), None)
    qa = write(tmp_path, "qa.json", [qaedit_record()] * 3)
    cfg = DatasetConfig(name="qaedit", source=qa, unique_subjects_seed=0)
    assert len(load_selection(cfg, None)) == 1  # one subject


def test_counterfact_selection_is_unchanged():
    assert load_selection(DatasetConfig(), 5) == select(load_counterfact("demo"), n=5)


# ----------------------------------------------------------------------------------------------------
# Record


def test_record_neighbourhood_pairs_and_checks():
    cf = Record(0, "{} is in", "Rome", "Paris", "Italy", ("p",), ("a", "b"), "Italy")
    assert cf.neighbourhood_pairs() == (("a", "Italy"), ("b", "Italy")) and cf.dataset == "counterfact"
    ke = Record(1, "{} is", "X", "y", "y", ("p",), ("a", "b"), "c", dataset="zsre", neighborhood_answers=("c", "d"))
    assert ke.neighbourhood_pairs() == (("a", "c"), ("b", "d"))
    with pytest.raises(DatasetError, match="case 2: neighborhood_answers has 1 answers for 2 neighborhood_prompts"):
        Record(2, "{} is", "X", "y", "y", ("p",), ("a", "b"), "c", neighborhood_answers=("c",))
    with pytest.raises(DatasetError, match="case 3: dataset 'wikidata' is not one of"):
        Record(3, "{} is", "X", "y", "y", ("p",), ("a",), "c", dataset="wikidata")
