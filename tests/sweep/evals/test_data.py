"""CounterFact loading in both formats, validation before any model work, selection."""

from __future__ import annotations

import json

import pytest

from sweep.evals.data import DEMO, DatasetError, load_counterfact, parse_records, select
from tests.conftest import COUNTERFACT

EDIT = COUNTERFACT / "counterfact-edit.json"
SAMPLES = COUNTERFACT / "counterfact_sampled_unique_cf_10_20000.json"
needs_shared = pytest.mark.skipif(not EDIT.is_file(), reason="../shared/data/counterfact is absent")


def rome_record(case_id=0, **kw):
    rec = {
        "case_id": case_id,
        "pararel_idx": 2796,
        "requested_rewrite": {
            "prompt": "The mother tongue of {} is",
            "relation_id": "P103",
            "target_new": {"str": "English", "id": "Q1860"},
            "target_true": {"str": "French", "id": "Q150"},
            "subject": "Danielle Darrieux",
        },
        "paraphrase_prompts": [
            "Shayna does this. Danielle Darrieux spoke the language",
            "Danielle Darrieux's tongue is",
        ],
        "neighborhood_prompts": ["Michel Rocard is a native speaker of", "Robert Schuman, speaker of"],
        "attribute_prompts": ["J.R.R. Tolkien is a native speaker of"],
        "generation_prompts": ["Danielle Darrieux's mother tongue is"],
    }
    rec.update(kw)
    return rec


def test_rome_format_file(tmp_path):
    path = tmp_path / "cf.json"
    path.write_text(json.dumps([rome_record(0), rome_record(1)]))
    recs = load_counterfact(str(path))
    r = recs[0]
    assert (r.prompt, r.subject, r.target_new, r.target_true) == (
        "The mother tongue of {} is",
        "Danielle Darrieux",
        "English",
        "French",
    )
    assert r.rewrite_prompt == "The mother tongue of Danielle Darrieux is"
    assert len(r.paraphrase_prompts) == 2 and len(r.neighborhood_prompts) == 2
    assert r.neighborhood_answer == "French" and r.relation_id == "P103" and r.generation_prompts
    assert r.request().template == r.prompt


@needs_shared
def test_easyedit_format_from_shared_data():
    recs = load_counterfact(str(EDIT))
    assert len(recs) == 10_000
    r = recs[0]
    assert r.case_id == 0 and r.prompt == "The mother tongue of {} is" and r.subject == "Danielle Darrieux"
    assert r.target_new == "English" and r.target_true == "French"
    assert r.paraphrase_prompts == ("Where Danielle Darrieux is from, people speak the language of",)
    assert r.neighborhood_prompts == ("Michel Rocard is a native speaker of",) and r.neighborhood_answer == "French"


def test_demo_set_is_valid_rome_format():
    raw = json.loads(DEMO.read_text())
    assert all("requested_rewrite" in r for r in raw)
    recs = load_counterfact("demo")
    assert len(recs) >= 25 and len({r.subject for r in recs}) == len(recs)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: r["requested_rewrite"].pop("subject"), "case 7: missing field 'requested_rewrite.subject'"),
        (lambda r: r["requested_rewrite"].update(prompt="The mother tongue is"), "case 7: .*no '{}'"),
        (lambda r: r["requested_rewrite"]["target_new"].update(str="  "), "case 7: .*target_new"),
        (lambda r: r.pop("neighborhood_prompts"), "case 7: missing field 'neighborhood_prompts'"),
    ],
)
def test_malformed_records_name_the_case(mutate, message):
    rec = rome_record(7)
    mutate(rec)
    with pytest.raises(DatasetError, match=message):
        parse_records([rome_record(1), rec])


def test_easyedit_subject_absent_and_duplicates():
    ee = {
        "case_id": 3,
        "prompt": "The tower is in",
        "subject": "Eiffel Tower",
        "target_new": "Rome",
        "ground_truth": "Paris",
        "rephrase_prompt": "x",
        "locality_prompt": "y",
    }
    with pytest.raises(DatasetError, match="case 3: subject 'Eiffel Tower' not found"):
        parse_records([ee])
    with pytest.raises(DatasetError, match="case 1: duplicate case_id"):
        parse_records([rome_record(1), rome_record(1)])
    with pytest.raises(DatasetError, match=r"dataset\.source"):
        load_counterfact("/nonexistent/cf.json")


@needs_shared
def test_selection_by_sample_file_ids_and_unique_subjects():
    recs = load_counterfact(str(EDIT))
    samples = json.loads(SAMPLES.read_text())
    have = {r.case_id for r in recs}
    chosen = select(recs, n=50, sample_file=str(SAMPLES), sample=0)
    assert [r.case_id for r in chosen] == [i for i in samples["0"] if i in have][:50]
    ids = [recs[7].case_id, recs[2].case_id, recs[40].case_id]
    assert [r.case_id for r in select(recs, case_ids=ids)] == ids
    uniq = select(recs, n=200, unique_subjects_seed=1)
    assert len({r.subject for r in uniq}) == 200
    assert [r.case_id for r in uniq] == [r.case_id for r in select(recs, n=200, unique_subjects_seed=1)]
    with pytest.raises(DatasetError, match="n_edits"):
        select(recs[:5], n=6)
    with pytest.raises(DatasetError, match="case_ids"):
        select(recs, case_ids=[10**7])


@needs_shared
def test_offset_takes_the_facts_after_the_first_and_order_seed_shuffles_the_same_facts():
    """A held-out trial (``dataset.offset``) edits the facts after a search's; a repeat (``order_seed``)
    edits the same facts in another fixed order."""
    from sweep.config import DatasetConfig
    from sweep.evals.data import load_selection

    d = DatasetConfig(source=str(EDIT), unique_subjects_seed=37)
    first = [r.case_id for r in load_selection(d, 20)]
    after = [r.case_id for r in load_selection(DatasetConfig(source=str(EDIT), unique_subjects_seed=37, offset=8), 12)]
    assert after == first[8:]
    shuffled = [
        r.case_id for r in load_selection(DatasetConfig(source=str(EDIT), unique_subjects_seed=37, order_seed=1), 20)
    ]
    again = [
        r.case_id for r in load_selection(DatasetConfig(source=str(EDIT), unique_subjects_seed=37, order_seed=1), 20)
    ]
    other = [
        r.case_id for r in load_selection(DatasetConfig(source=str(EDIT), unique_subjects_seed=37, order_seed=2), 20)
    ]
    assert sorted(shuffled) == sorted(first) and shuffled == again and shuffled != first and other != shuffled
    with pytest.raises(DatasetError, match="n_edits"):
        load_selection(DatasetConfig(source=str(EDIT), case_ids=first[:5], offset=3), 4)
    with pytest.raises(DatasetError, match=r"dataset\.offset"):
        load_selection(DatasetConfig(source=str(EDIT), case_ids=first[:5], offset=5), None)
