"""WikiBigEdit and UltraEditBench: parsing a hand-written fixture faithful to the released files (their
quirks included: null multi-hop fields, null ids, a NaN tag), errors that name the record and field, and
portability scored as token accuracy against hand computation on the bigram model."""

from __future__ import annotations

import json
import logging

import pytest

from sweep.evals.data import WIKIBIGEDIT_SPANS, WIKIBIGEDIT_URL, DatasetError, load_dataset
from sweep.evals.metrics import aggregate, score_records
from tests.sweep.evals.test_metrics import SPEC, Bigram
from tests.sweep.evals.test_metrics_qa import hand_accuracy

KEYS = ("tag", "subject", "subject_id", "relation", "relation_id", "object", "object_id", "update", "rephrase")


def wbe(subject, relation, obj, update, ans, **kw):
    """A WikiBigEdit record with every key of the release (wiki_big_edit_<span>.json)."""
    rec = {
        "tag": "new",
        "subject": subject,
        "subject_id": "Q1",
        "relation": relation,
        "relation_id": "P31",
        "object": obj,
        "object_id": "Q2",
        "update": update,
        "rephrase": f"Could you tell me: {update[0].lower()}{update[1:]}",
        "personas": f"Hey, do you know {update[0].lower()}{update[1:]}",
        "ans": ans,
        "loc": "For whom did George Zarnecki work?",
        "loc_ans": "Courtauld Institute of Art",
        "mhop": f"What is the country of the {relation} of {subject}?",
        "mhop_ans": "France",
    }
    rec.update(kw)
    return rec


FIXTURE = [
    wbe("Red junglefowl", "taxonomic type", "Gallus", "What is the taxonomic type of Red junglefowl?", "Gallus"),
    wbe("Dalleh", "instance of", "populated place in Syria", "What type of location is Dalleh in Syria?",
        "populated place", tag="update"),
    wbe("George Harinck", "employer", "Free University of Amsterdam", "Who is George Harinck's employer?",
        "Free University of Amsterdam", mhop=None, mhop_ans=None),
    wbe("Mahyeldi", "spouse", "Harneli Bahar", "Who is Mahyeldi married to?", "Harneli Bahar", subject_id=None),
    wbe("Josef Novak", "country of citizenship", "Hungary", "What is the country of citizenship of Josef Novak?",
        "Hungary", tag=None),
]  # fmt: skip


def write(tmp_path, records, name=f"wiki_big_edit_{WIKIBIGEDIT_SPANS[0]}.json", raw=None):
    path = tmp_path / name
    path.write_text(raw if raw is not None else json.dumps(records))
    return path


def test_wikibigedit_fixture_parses_as_the_loaders_map_it(tmp_path):
    recs = load_dataset("wikibigedit", str(write(tmp_path, FIXTURE)))
    assert [r.case_id for r in recs] == [0, 1, 2, 3, 4]
    r = recs[1]
    assert (r.prompt, r.subject, r.target_new, r.target_true) == (
        "What type of location is {} in Syria?",
        "Dalleh",
        "populated place",  # ans, not the longer object
        "populated place",
    )
    assert r.paraphrase_prompts == ("Could you tell me: what type of location is Dalleh in Syria?",)
    assert r.neighbourhood_pairs() == (("For whom did George Zarnecki work?", "Courtauld Institute of Art"),)
    assert r.portability == (
        ("Hey, do you know what type of location is Dalleh in Syria?", "populated place"),
        ("What is the country of the instance of of Dalleh?", "France"),
    )
    assert len(recs[2].portability) == 1  # null mhop: the persona question only
    assert recs[3].request().subject == "Mahyeldi" and recs[0].dataset == "wikibigedit"
    assert WIKIBIGEDIT_URL.format(span=WIKIBIGEDIT_SPANS[-1]).endswith("wiki_big_edit_20240620_20240701.json")


def test_wikibigedit_nan_tag_and_skipped_subjects(tmp_path, caplog):
    """A bare NaN tag (valid for Python's json) is ignored; a record whose subject is not in its question
    is skipped with a count, the rest keep their positions as case ids."""
    moved = wbe("Gallus gallus", "taxonomic type", "Gallus", "What is the taxonomic type of the junglefowl?", "Gallus")
    data = [{**FIXTURE[0], "tag": float("nan")}, FIXTURE[1], moved]
    raw = json.dumps(data)
    assert '"tag": NaN' in raw
    with caplog.at_level(logging.WARNING):
        recs = load_dataset("wikibigedit", str(write(tmp_path, data, raw=raw)))
    assert [r.case_id for r in recs] == [0, 1]
    assert "skipped 1 of 3" in caplog.text and "'Gallus gallus'" in caplog.text


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: r.pop("ans"), "case 0: missing field 'ans'"),
        (lambda r: r.update(loc=None), "case 0: field 'loc' must be a non-empty string"),
        (lambda r: r.update(rephrase=""), "case 0: field 'rephrase' must be a non-empty string"),
        (lambda r: r.pop("update"), "case 0: missing field 'update'"),
    ],
)
def test_wikibigedit_bad_records_name_the_case_and_field(tmp_path, mutate, message):
    rec = json.loads(json.dumps(FIXTURE[0]))
    mutate(rec)
    with pytest.raises(DatasetError, match=message):
        load_dataset("wikibigedit", str(write(tmp_path, [rec])))


def test_a_wikibigedit_file_read_as_zsre_says_which_name_to_set(tmp_path):
    with pytest.raises(DatasetError, match=r"set dataset\.name: wikibigedit"):
        load_dataset("zsre", str(write(tmp_path, FIXTURE)))


def ueb(subject, prompt, ans):
    return {"subject": subject, "prompt": prompt, "rephrase_prompt": f"Tell me: {prompt}", "ans": ans,
            "loc": "Who wrote Hamlet?", "loc_ans": "William Shakespeare"}  # fmt: skip


def test_ultraeditbench_as_a_json_list_and_as_json_lines(tmp_path):
    data = [ueb("Kékes", "What is the elevation of Kékes?", "1014 metres"), ueb("Eger", "Where is Eger?", "Hungary")]
    a = load_dataset("ultraeditbench", str(write(tmp_path, data, name="a.json")))
    b = load_dataset("ultraeditbench", str(write(tmp_path, data, name="b.json", raw="\n".join(map(json.dumps, data)))))
    assert (
        a == b and a[0].prompt == "What is the elevation of {}?" and a[1].neighborhood_answer == "William Shakespeare"
    )
    assert a[0].paraphrase_prompts == ("Tell me: What is the elevation of Kékes?",) and a[0].dataset == "ultraeditbench"


def test_portability_is_the_token_accuracy_of_its_answers(tmp_path, tok):
    """ES/PS/NS/port of WikiBigEdit records against the bigram model's hand-computed token accuracies."""
    recs = load_dataset("wikibigedit", str(write(tmp_path, FIXTURE[:3])))
    model = Bigram(len(tok))
    scores = score_records(model, tok, SPEC, recs)
    for r, s in zip(recs, scores, strict=True):
        assert s.es == pytest.approx(hand_accuracy(model, tok, r.rewrite_prompt, r.target_new))
        assert s.ns == pytest.approx(hand_accuracy(model, tok, *r.neighbourhood_pairs()[0]))
        want = [hand_accuracy(model, tok, q, a) for q, a in r.portability]
        assert s.port == pytest.approx(sum(want) / len(want))
    agg = aggregate(scores)
    assert agg["port"] == pytest.approx(100 * sum(s.port for s in scores) / 3)
