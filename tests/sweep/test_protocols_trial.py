"""Trials on ZsRE and MQuAKE end to end on a tiny Llama: both protocols side by side, capability probes
over the edits, multi-hop questions once a case's rewrites are in, and the settings' errors."""

from __future__ import annotations

import pytest
import yaml

from editors.config import ConfigError
from sweep.config import load_config
from sweep.evals.registry import NAMES, describe
from sweep.trial import trial_alone
from tests.conftest import SHARED, write_tiny_assets
from tests.sweep.test_trial import overrides

DATA = SHARED / "data"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tok_bos):
    return write_tiny_assets(tmp_path_factory.mktemp("tiny"), tok_bos)


def test_zsre_trial_reports_both_protocols_and_probes_over_the_edits(tiny_dir):
    cfg = load_config(
        None,
        overrides(
            tiny_dir,
            **{
                "dataset.name": "zsre",
                "dataset.source": str(DATA / "zsre" / "zsre_mend_eval_portability_gpt4.json"),
                "mode": "sequential-batch",
                "scoring.ppl": "false",
                "scoring.generated": "true",
                "scoring.gen_max_new_tokens": 6,
                "scoring.probes": "[sst2,mmlu]",
                "scoring.probe_items": 3,
                "scoring.probe_every": 1,
                "scoring.probe_data": str(DATA / "glue_eval"),
            },
        ),
    )
    res = trial_alone(cfg, progress=False)
    pre, final = res.metrics["pre"], res.metrics["final"]
    assert res.dataset == "zsre"
    for stage in res.metrics.values():
        assert set(stage) <= set(NAMES)
    # teacher-forced and generated side by side, each labelled with its protocol and the data it is on
    assert {"es", "ps", "ns", "s", "gen_es", "gen_ps", "gen_ns", "gen_s"} <= set(final)
    assert "em" not in final  # CounterFact's probability gaps are not ZsRE measures
    assert res.metric_info["es"] == describe(["es"], "zsre")["es"]
    assert res.metric_info["es"]["protocol"] == "teacher_forced" and "token acc" in res.metric_info["es"]["label"]
    assert res.metric_info["gen_es"]["protocol"] == "generated" and res.metric_info["gen_es"]["dataset"] == "zsre"
    assert pre["gen_ns"] == 100.0  # the unedited model's own generations are its reference
    # per record: the generated fields beside the teacher-forced ones, at every stage
    row = res.per_record[0]
    assert {"pre_gen_es", "at_edit_gen_es", "final_gen_ns", "final_es"} <= set(row)
    # probes before editing, after every batch (curve points), and in the final stage
    probe_keys = {"probe_sst2_f1", "probe_mmlu_acc", "probe_sst2_lik_acc"}
    assert probe_keys <= set(pre) and probe_keys <= set(final)
    assert all(probe_keys <= set(p) for p in res.curves)
    assert res.curves[-1]["probe_sst2_f1"] == final["probe_sst2_f1"]
    assert res.timings["probes"] > 0
    assert res.metric_info["probe_sst2_lik_acc"]["protocol"] == "likelihood"


def test_mquake_trial_asks_the_multihop_questions_of_complete_cases(tiny_dir, monkeypatch):
    """Two cases of 4 rewrites; 6 edits leave the second case incomplete, so only the first case's
    questions are asked, on the unedited model and after editing (new and old answers both scored)."""
    import sweep.evals.mquake as mq

    asked: list[list[int]] = []
    real = mq.multihop_scores

    def spy(model, tok, cases, *a, **kw):
        asked.append([c.case_id for c in cases])
        return real(model, tok, cases, *a, **kw)

    monkeypatch.setattr(mq, "multihop_scores", spy)
    cfg = load_config(
        None,
        overrides(
            tiny_dir,
            **{
                "dataset.name": "mquake",
                "dataset.source": str(DATA / "mquake" / "MQuAKE-hard.json"),
                "dataset.prompts": str(DATA / "mquake" / "prompts"),
                "n_edits": 6,
                "batch_size": 3,
                "mode": "sequential-batch",
                "scoring.ppl": "false",
            },
        ),
    )
    res = trial_alone(cfg, progress=False)
    cases = mq.load_cases(DATA / "mquake" / "MQuAKE-hard.json", n=2)
    assert asked[0] == [cases[0].case_id] and asked[-1] == [cases[0].case_id]  # only complete cases
    assert res.metrics["pre"]["mquake_cases"] == 1 and res.metrics["final"]["mquake_cases"] == 1
    for stage in ("pre", "final"):
        m = res.metrics[stage]
        assert 0 <= m["mquake_multihop"] <= 100 and 0 <= m["mquake_edit_wise"] <= 100
    assert res.metric_info["mquake_multihop"]["protocol"] == "generated"
    # each rewrite is a CounterFact fact: P(new) > P(true) after its cloze, with the probability margins
    assert {"es", "em", "es_acc"} <= set(res.metrics["final"]) and res.metric_info["es"]["label"] == "ES (efficacy)"
    assert res.per_record[0]["case_id"] == cases[0].case_id * mq.CASE_STRIDE


@pytest.mark.parametrize(
    ("over", "field"),
    [
        ({"scoring.generated": "true", "scoring.pre": "false"}, "scoring.generated"),
        ({"scoring.probes": "[glue]"}, "scoring.probes"),
        ({"scoring.probe_every": 2}, "scoring.probe_every"),
        ({"scoring.probes": "[sst2]", "scoring.probe_data": "/nonexistent"}, "scoring.probe_data"),
        ({"dataset.target": "alt"}, "dataset.target"),
        ({"dataset.name": "zsre", "dataset.source": "demo"}, "dataset.source"),
        ({"dataset.name": "mquake", "dataset.source": "x.json"}, "dataset.prompts"),
        ({"scoring.gen_context": "system"}, "scoring.gen_context"),
    ],
)
def test_protocol_settings_errors_name_the_field(over, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, [f"{k}={v}" for k, v in over.items()])


def test_probe_files_neither_given_nor_fetchable_fail_before_any_weights(tiny_dir, tmp_path, monkeypatch):
    import sweep.evals.probes as probes
    import sweep.trial as trial

    def offline(url: str, timeout: float) -> bytes:
        raise probes.ProbeDataError(f"cannot download {url}: no network")

    monkeypatch.setenv("MODEL_EDITING_CACHE", str(tmp_path))
    monkeypatch.setattr(probes, "_download", offline)
    loaded = []
    monkeypatch.setattr(trial, "load_for_trial", lambda *a, **k: loaded.append(1))
    cfg = load_config(None, overrides(tiny_dir, **{"scoring.probes": "[sst2]"}))
    with pytest.raises(probes.ProbeDataError, match=r"scoring\.probe_data: null.*offline"):
        trial_alone(cfg, progress=False)
    assert not loaded and not list(tmp_path.rglob("*.jsonl"))  # nothing half-written


def test_the_unedited_probes_are_shared_work_computed_once(tiny_dir, tmp_path, monkeypatch):
    """Four trials of a sweep share one probe point of the unedited model: computed once, stored under
    a key of the model, tasks, items and the probe files' content, read by a second fulfilment, and
    handed to every trial as its pre-edit probes (none of them probes the unedited model itself)."""
    import sweep.evals.probes as probes
    import sweep.shared.compute as work
    from editors import load_model
    from sweep.config import load_sweep
    from sweep.plan import make_plan
    from sweep.shared.fulfil import fulfil_local
    from sweep.shared.keys import probes_key
    from sweep.stages import run_trial
    from tests.sweep.shared.test_shared import sweep_file

    runs: list[tuple[str, ...]] = []
    real = probes.run_probes

    def counted(model, tok, tasks, *a, **kw):
        runs.append(tuple(tasks))
        return real(model, tok, tasks, *a, **kw)

    monkeypatch.setattr(probes, "run_probes", counted)
    scoring = {
        "ppl": False,
        "probes": ["sst2", "rte"],
        "probe_items": 2,
        "probe_data": str(DATA / "glue_eval"),
    }
    for f in ("model", "cf.json", "corpus.txt"):
        (tmp_path / f).symlink_to(tiny_dir / f)
    base = {**yaml.safe_load(sweep_file(tmp_path).read_text())["base"], "scoring": scoring, "mode": "sequential-batch"}
    cfg = load_sweep(str(sweep_file(tmp_path, base=base)))
    plan = make_plan(cfg)
    assert len(plan.shared.probes) == 1  # four trials, one model, one probe setting: one point
    model, tok = load_model(str(tmp_path / "model"))
    inputs, counts = fulfil_local(plan.shared, cfg, model, tok, progress=False)
    assert (counts.probes_computed, counts.probes_read) == (1, 0) and runs == [("sst2", "rte")]
    again_plan = make_plan(cfg)
    (key,) = again_plan.shared.probes
    assert key == probes_key(plan.trials[0], key.model) and again_plan.shared.probes_cached
    _, again = fulfil_local(again_plan.shared, cfg, model, tok, progress=False)
    assert (again.probes_computed, again.probes_read) == (0, 1) and len(runs) == 1
    res = run_trial(plan.trials[0], inputs=inputs[plan.keys[0]], model=model, tok=tok)
    assert res.metrics["pre"]["probe_sst2_f1"] == again_plan.shared.probes_cached[key]["probe_sst2_f1"]
    assert len(runs) == 1 + 1  # the trial probed after its last batch, never the unedited model
    assert work.compute_probes(plan.trials[0], model, tok) == again_plan.shared.probes_cached[key]
