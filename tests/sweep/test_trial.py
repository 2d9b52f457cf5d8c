"""One trial end to end on a tiny random Llama saved to a local folder (the real loading code)."""

from __future__ import annotations

import json

import pytest
import torch

from sweep.config import load_config
from sweep.stages import run_trial
from sweep.trial import main, trial_alone
from tests.conftest import write_tiny_assets


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tok_bos):
    """A tiny Llama + BOS-adding tokenizer saved with save_pretrained, a corpus file, a dataset file."""
    return write_tiny_assets(tmp_path_factory.mktemp("tiny"), tok_bos)


def overrides(d, **kw):
    base = {
        "model.source": str(d / "model"),
        "model.device": "cpu",
        "dataset.source": str(d / "cf.json"),
        "stats.corpus": str(d / "corpus.txt"),
        "stats.max_tokens": 3000,
        "stats.store": str(d / "stats"),
        "n_edits": 4,
        "batch_size": 2,
        "hparams": "smollm2-135m",
        "layers": "[1]",
        "hp.v_num_grad_steps": 4,
        "hp.context_templates": "none",
        "scoring.ppl": "true",
        "scoring.ppl_offset": 0,
        "scoring.ppl_texts": 2,
        "scoring.ppl_max_len": 64,
    }
    base.update(kw)
    return [f"{k}={v}" for k, v in base.items()]


def test_batch_trial_alone_and_with_handed_inputs(tiny_dir):
    """Alone, a trial's fulfilment computes its statistics (through the store), its pre-scores and (batch
    mode) every batch's values up front, which its schedule reuses; handed complete inputs (a one-trial
    plan fulfilled in-process through the stores) it computes none of it and gets the same metrics;
    incomplete inputs are one clear error."""
    from editors import load_model
    from sweep.config import SweepConfig, trial_key
    from sweep.shared.fulfil import fulfil_local
    from sweep.shared.needs import plan_shared

    cfg = load_config(None, overrides(tiny_dir, **{"stats.store": str(tiny_dir / "stats-batch")}))
    first = trial_alone(cfg, progress=False)
    m = first.metrics
    assert set(m) == {"pre", "at_edit", "final"}
    assert {"es", "ps", "ns", "s", "em", "pm", "nm", "ppl"} <= set(m["pre"])
    assert m["final"] == m["at_edit"]  # batch mode: each batch's model is its final model
    assert first.work == {
        "stats_computed": 1,
        "stats_reused": 0,
        "values_optimised": 4,
        "values_reused": 4,
        "scores_computed": 4,
        "scores_reused": 0,
    }
    assert first.timings["values"] > 0  # optimised up front, still the trial's value time
    assert first.stats_tokens == {1: 3000}
    assert [c["edits"] for c in first.curves] == [2, 4] and [c["applied"] for c in first.curves] == [2, 2]
    assert len(first.per_record) == 4 and "final_es" in first.per_record[0]
    assert first.versions["model"].startswith("dir:") and first.timings["total"] > 0

    model, tok = load_model(str(tiny_dir / "model"))
    sweep = SweepConfig(name="t", values_store=str(tiny_dir / "values-batch"), scores_store=str(tiny_dir / "sc"))
    key = trial_key(cfg)
    inputs, work = fulfil_local(plan_shared(sweep, [cfg], [key]), sweep, model, tok, progress=False)
    assert (work.stats_layers_read, work.stats_layers_computed) == (1, 0)  # the store from the first run
    assert (work.values_optimised, work.scores_computed, work.ppl_computed) == (4, 4, 1)
    second = run_trial(cfg, inputs=inputs[key], model=model, tok=tok)
    assert second.work == {
        "stats_computed": 0,
        "stats_reused": 1,
        "values_optimised": 0,
        "values_reused": 4,
        "scores_computed": 0,
        "scores_reused": 4,
    }
    assert second.metrics["pre"] == first.metrics["pre"]
    for k in ("es", "ps", "ns"):
        assert second.metrics["at_edit"][k] == first.metrics["at_edit"][k]
    _, again = fulfil_local(plan_shared(sweep, [cfg], [key]), sweep, model, tok, progress=False)
    assert (again.values_read, again.scores_read, again.ppl_read) == (4, 4, 1)  # all from the stores now
    assert (again.values_optimised, again.scores_computed, again.ppl_computed) == (0, 0, 0)

    inputs[key].pre_scores.pop(next(iter(inputs[key].pre_scores)))
    with pytest.raises(ValueError, match=r"inputs: .*pre-edit scores of 1 fact"):
        run_trial(cfg, inputs=inputs[key], model=model, tok=tok)
    with pytest.raises(ValueError, match="inputs: run_trial needs its shared inputs"):
        run_trial(cfg, inputs=None, model=model, tok=tok)  # type: ignore[arg-type]


def test_single_rome_edits_alone_optimise_their_values_together_with_the_same_results(tiny_dir):
    """A trial of single ROME edits optimises every fact's v* up front in one chunk (the fast path of
    ``trial_alone``); the schedule then reuses them and each fact's scores and v* equal those of the
    schedule optimising each fact's value on its own (inputs without values)."""
    from editors import load_model
    from sweep.config import SweepConfig, trial_key
    from sweep.shared.fulfil import fulfil_local
    from sweep.shared.needs import plan_shared

    cfg = load_config(None, overrides(tiny_dir, algorithm="rome", batch_size=1, **{"scoring.ppl": "false"}))
    model, tok = load_model(str(tiny_dir / "model"))
    fast = trial_alone(cfg, model=model, tok=tok, progress=False)
    assert (fast.work["values_optimised"], fast.work["values_reused"]) == (4, 4)
    sweep = SweepConfig(name="t", share_values=False, values_store=None, scores_store=None)  # type: ignore[arg-type]
    key = trial_key(cfg)
    inputs, _ = fulfil_local(plan_shared(sweep, [cfg], [key]), sweep, model, tok, progress=False)
    one_by_one = run_trial(cfg, inputs=inputs[key], model=model, tok=tok)
    assert one_by_one.work["values_optimised"] == 4 and one_by_one.work["values_reused"] == 0
    for a, b in zip(fast.per_record, one_by_one.per_record, strict=True):
        # every score the same; the margins (log-probability differences) within float32 rounding
        # of the differently batched forward passes (about 1e-10 here)
        assert {k: v for k, v in a.items() if k[-2:] not in ("em", "pm", "nm")} == {
            k: v for k, v in b.items() if k[-2:] not in ("em", "pm", "nm")
        }
        assert [a[k] for k in a if k[-2:] in ("em", "pm", "nm")] == pytest.approx(
            [b[k] for k in b if k[-2:] in ("em", "pm", "nm")], rel=1e-5, abs=1e-8
        )


def test_sequential_trial_reports_both_and_restores_the_model(tiny_dir, tok_bos):
    from editors import load_model

    model, tok = load_model(str(tiny_dir / "model"))
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = load_config(None, overrides(tiny_dir, mode="sequential-batch"))
    res = trial_alone(cfg, model=model, tok=tok, progress=False)
    assert [c["applied"] for c in res.curves] == [2, 4]
    assert set(res.metrics["final"]) >= {"es", "ps", "ns", "s", "ppl"}
    assert res.update_norms.final_weight_change["model.layers.1.mlp.down_proj"] > 0
    assert all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())


def test_cli_writes_the_result(tiny_dir, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main([*overrides(tiny_dir, algorithm="emmet"), "--out", str(out), "--quiet"]) == 0
    res = json.loads(out.read_text())
    assert res["config"]["algorithm"] == "emmet" and res["hparams"]["layers"] == [1]
    assert {"config", "metrics", "per_record", "curves", "timings", "memory", "work", "versions"} <= set(res)
    assert "pre" in capsys.readouterr().out
    from sweep.result import TrialResult

    back = TrialResult.from_dict(res)  # the JSON form reads back into the typed result, unchanged
    assert (
        back.to_dict() == res and back.layers == [1] and back.flat_metrics()["final.s"] == res["metrics"]["final"]["s"]
    )
    with pytest.raises(ValueError, match="unknown fields"):
        TrialResult.from_dict({**res, "colour": 1})


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 5}, "batch_size"),
        ({"algorithm": "mend"}, "algorithm"),
        ({"colour": "red"}, "colour"),
        ({"hp.mom2_update_wieght": 1}, "mom2_update_wieght"),
        ({"layers": "[99]"}, "layers"),
        ({"mode": "online"}, "mode"),
        ({"dataset.source": "/nope.json"}, "dataset.source"),
        ({"model.source": "/nonexistent/dir"}, "model.source"),
        ({"scoring.batch_size": 0}, "scoring.batch_size"),
        ({"stats.corpus": "/nope.txt"}, "stats.corpus"),
        ({"stats.max_tokens": 0}, "stats.max_tokens"),
        ({"hp.v_lr": -1}, "hp.v_lr"),
    ],
)
def test_bad_configs_fail_with_one_line_and_no_file(bad, field, tiny_dir, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main([*overrides(tiny_dir, **bad), "--out", str(out), "--quiet"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and field in err[0], err
    assert not out.exists()


def test_forgetting_curve_equals_a_direct_rescoring_and_health_is_recorded(tiny_dir, tok_bos, monkeypatch):
    """The forgetting points re-score every fact edited so far: the last equals the final scores and,
    for the first batch, the mean of its facts' final per-record scores; the first equals the first
    batch's scores at edit (the same model). The last point IS the final scoring: the 4 facts are
    scored once on the final model, its perplexity taken once. Health points come every
    ``health_every`` batches."""
    from editors import load_model
    from sweep import stages
    from sweep.evals.metrics import aggregate, score_records
    from sweep.stages import load_records

    ov = overrides(
        tiny_dir, mode="sequential-batch", batch_size=1, **{"scoring.retention_every": 2, "scoring.health_every": 1}
    )
    cfg = load_config(None, ov)
    model, tok = load_model(str(tiny_dir / "model"), device="cpu")
    calls: list[int] = []
    ppl_calls: list[int] = []
    score, ppl = stages.Scorer.__call__, stages.Scorer.ppl
    monkeypatch.setattr(stages.Scorer, "__call__", lambda self, recs: calls.append(len(recs)) or score(self, recs))
    monkeypatch.setattr(stages.Scorer, "ppl", lambda self: ppl_calls.append(1) or ppl(self))
    res = trial_alone(cfg, model=model, tok=tok, progress=False)
    assert calls == [1, 1, 2, 1, 1, 4]  # each batch at edit, the points after batches 2 and 4; no final pass
    assert len(ppl_calls) == 4  # one per health point; the final perplexity is the last one's
    assert res.metrics["final"]["ppl"] == res.health[-1]["ppl"]
    monkeypatch.undo()
    assert [p["edits"] for p in res.retention] == [2, 4]  # every 2 batches
    last = res.retention[-1]
    for m in ("es", "ps", "ns", "s"):
        assert last[f"all_{m}"] == pytest.approx(res.metrics["final"][m])
    rows = {r["case_id"]: r for r in res.per_record}
    first_ids = [r.case_id for r in load_records(cfg)[:1]]
    for m in ("es", "ps", "ns"):
        want = 100 * sum(rows[c][f"final_{m}"] for c in first_ids) / 1
        assert last[f"first_{m}"] == pytest.approx(want)
    ids = [r.case_id for r in load_records(cfg)]  # the retention matrix: one cohort per batch here
    assert [k for k in res.retention[0] if k.startswith("c")] == ["c0_es", "c0_s", "c1_es", "c1_s"]
    for j, cid in enumerate(ids):
        assert last[f"c{j}_es"] == pytest.approx(100 * rows[cid]["final_es"])
    assert [h["edits"] for h in res.health] == [1, 2, 3, 4]
    assert all(h["cond"] >= 1 and h["sigma_max"] > 0 and "ppl" in h for h in res.health)
    assert all(h["norm"] >= h["sigma_max"] and 0 < h["he"] for h in res.health)
    assert set(res.collapse_points) == {"batch_es", "forget_all_es", "forget_all_s", "health_ppl"}
    assert max(res.update_norms.final_weight_change.values()) == pytest.approx(res.health[-1]["drift"])
    assert res.collapsed_at is None and res.method == "memit"
    # the model the trial handed back is unedited; re-edit 2 facts by hand and re-score them directly
    from editors import run_schedule, spec_for
    from editors.stats import StatsStore
    from sweep.shared.keys import model_identity, stats_keys

    recs = load_records(cfg)
    store = StatsStore(cfg.stats.store)
    key = stats_keys(cfg, [1], model_identity(cfg.model))[1]
    sched = run_schedule(
        model,
        tok,
        [r.request() for r in recs[:2]],
        "memit",
        cfg.edit_hparams,
        {1: store.get(key).mom2},
        batch_size=1,
        mode="sequential-batch",
    )
    direct = aggregate(score_records(model, tok, spec_for(model), recs[:2]))
    sched.restore(model)
    for m in ("es", "ps", "ns", "s"):
        assert res.retention[0][f"all_{m}"] == pytest.approx(direct[m])


def test_the_collapse_guard_stops_the_trial_and_keeps_what_it_measured(tiny_dir):
    ov = overrides(tiny_dir, mode="sequential-batch", **{"guard.min_batch_es": 100, "hp.v_num_grad_steps": 1})
    res = trial_alone(load_config(None, ov), progress=False)
    assert res.collapsed_at == 2 and "guard.min_batch_es" in res.collapse_reason
    assert [p["edits"] for p in res.curves] == [2]  # stopped after the first batch
    assert {"es", "ps", "ns", "s"} <= set(res.metrics["final"])  # the 2 facts edited, scored
    assert sum("final_es" in r for r in res.per_record) == 2


def test_the_same_trial_twice_gives_identical_metrics_and_records_the_machine(tiny_dir, tmp_path):
    """Run twice from scratch (statistics recomputed into separate stores): every metric and every
    record's scores are equal, and the result names the CPU, torch's threads and the BLAS."""
    runs = [
        trial_alone(
            load_config(None, overrides(tiny_dir, mode="sequential-batch", **{"stats.store": str(tmp_path / f"s{i}")})),
            progress=False,
        )
        for i in range(2)
    ]
    a, b = runs
    assert (
        a.metrics == b.metrics
        and a.per_record == b.per_record
        and a.curves[-1]["at_edit_s"] == b.curves[-1]["at_edit_s"]
    )
    assert {"cpu", "threads", "blas"} <= set(a.versions) and a.versions["threads"].isdigit()


def test_every_metric_a_trial_reports_is_declared_once_in_the_registry(tiny_dir):
    """The registry is the one list of metrics: a trial's stages hold only declared names, its per-record
    rows only declared per-record fields, and each declaration is complete and unique."""
    from sweep.evals.registry import BY_NAME, CORE, METRICS, NAMES, RECORD_FIELDS, STAGES

    assert len(set(NAMES)) == len(NAMES) and set(CORE) <= set(NAMES)
    assert len({(m.name, m.dataset) for m in METRICS}) == len(METRICS)  # one declaration per name and dataset
    protocols = ("teacher_forced", "generated", "likelihood", "sampled", "model")
    assert all(m.meaning and m.label and m.protocol in protocols for m in METRICS)
    assert not BY_NAME["s"].per_record and BY_NAME["ppl"].higher_is_better is False
    res = trial_alone(load_config(None, overrides(tiny_dir, mode="sequential-batch")), progress=False)
    assert set(res.metrics) == set(STAGES)
    for stage in res.metrics.values():
        assert set(stage) <= set(NAMES), set(stage) - set(NAMES)
    fields = {f"{st}_{m}" for st in STAGES for m in RECORD_FIELDS}
    identity = {"case_id", "subject", "prompt", "target_new", "target_true"}
    assert all(set(row) <= fields | identity for row in res.per_record)
    # every CounterFact field of every stage is there (generation is off here; portability is WikiBigEdit's)
    teacher_forced = {f for f in fields if "gen_" not in f and not f.endswith("_port")}
    assert set(res.per_record[0]) - identity == teacher_forced
    assert res.dataset == "counterfact" and res.metric_info["es"]["protocol"] == "teacher_forced"


@pytest.mark.parametrize(
    ("algorithm", "hp", "method", "stats"),
    [
        ("rlsedit", {}, "rlsedit", 1),
        ("ultraedit", {"hp.ultra_lr": 1e-2}, "ultraedit", 0),
        ("alphaedit", {"hp.beta_hse": 0.5, "hp.nullspace_threshold": 10.0}, "alphaedit+sphere", 1),
    ],
)
def test_the_2026_methods_run_as_sequential_trials(algorithm, hp, method, stats, tiny_dir):
    """RLSEdit, UltraEdit and AlphaEdit + SPHERE as trials: named as reports name them, UltraEdit with no
    statistics and no values, every edit applied and scored."""
    store = tiny_dir / f"stats-{algorithm}"
    ov = overrides(tiny_dir, algorithm=algorithm, mode="sequential-batch", **{"stats.store": str(store), **hp})
    cfg = load_config(None, ov)
    res = trial_alone(cfg, progress=False)
    assert res.method == method and cfg.needs_stats == bool(stats)
    assert res.work["stats_computed"] == stats and res.work["values_optimised"] == (4 if stats else 0)
    assert [c["edits"] for c in res.curves] == [2, 4]
    assert all(isinstance(res.metrics["final"][m], float) for m in ("es", "ps", "ns"))
