"""Shared work: content keys, stores (atomic, checked on read), statistics passes under a budget,
statistics that stop when converged, and a pre-pass that survives SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml

from editors import load_model
from editors.store import Store
from sweep.config import load_sweep, parse_config
from sweep.plan import make_plan
from sweep.shared.compute import compute_stats
from sweep.shared.keys import ValuesStore, model_identity, stats_store, values_key
from sweep.shared.needs import pass_memory_gb, split_passes
from tests.conftest import ROOT, make_model, write_tiny_assets


@pytest.fixture()
def assets(tmp_path, tok_bos):
    return write_tiny_assets(tmp_path, tok_bos)


def sweep_file(d: Path, name: str = "s", **extra) -> Path:
    cfg = {
        "name": name,
        "base": {
            "hparams": "smollm2-135m",
            "n_edits": 4,
            "layers": [1],
            "model": {"source": str(d / "model"), "device": "cpu"},
            "dataset": {"source": str(d / "cf.json")},
            "stats": {"corpus": str(d / "corpus.txt"), "max_tokens": 2000, "store": str(d / "stats")},
            "hp": {"v_num_grad_steps": 2, "context_templates": "none"},
            "scoring": {"ppl": False},
        },
        "grid": {"algorithm": ["memit", "emmet"], "batch_size": [2, 4]},
        "resources": {"cpu": 1, "gpu": 0},
        "mlflow": {"tracking_uri": f"sqlite:///{d / 'mlflow.db'}", "experiment": "test"},
        "storage": str(d / "ray"),
        "values_store": str(d / "values"),
        "scores_store": str(d / "scores"),
        "values_chunk": 1,
        "retries": 0,
    }
    for k, v in extra.items():
        head, _, leaf = k.partition(".")
        if leaf:
            cfg[head] = {**cfg.get(head, {}), leaf: v}
        else:
            cfg[k] = v
    path = d / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# ----------------------------------------------------------------------------------------------------
# Store


@pytest.mark.integration  # a process of its own
def test_atomic_write_leaves_no_torn_file_when_killed_mid_write(tmp_path):
    """A writer SIGKILLed halfway leaves the old file intact (and at most a hidden temp file)."""
    target = tmp_path / "x.safetensors"
    target.write_bytes(b"old")
    code = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path.insert(0, {str(ROOT)!r})
        from editors.store import atomic_write
        def write(p):
            with open(p, "wb") as f:
                f.write(b"half")
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
        atomic_write({str(target)!r}, write)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code])
    assert proc.returncode == -signal.SIGKILL
    assert target.read_bytes() == b"old"
    assert all(p.name.startswith(".") for p in tmp_path.iterdir() if p != target)


def test_store_reports_corrupt_and_foreign_files_as_misses(tmp_path, caplog):
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class K:
        a: int

    st = Store(tmp_path, "test.v1")
    st.put_tensors(K(1), {"x": torch.ones(3)})
    assert torch.equal(st.get_tensors(K(1))[0]["x"], torch.ones(3))
    # A file of another key copied over this key's path: a miss, not a wrong answer.
    st.put_tensors(K(2), {"x": torch.zeros(3)})
    os.replace(st.path(K(2)), st.path(K(1)))
    assert st.get_tensors(K(1)) is None
    # Truncated: a miss with one warning.
    st.put_tensors(K(3), {"x": torch.ones(1000)})
    data = st.path(K(3)).read_bytes()
    st.path(K(3)).write_bytes(data[: len(data) // 2])
    assert st.get_tensors(K(3)) is None and st.get_tensors(K(3)) is None
    assert sum("unreadable" in r.message for r in caplog.records) == 1
    # Another format tag: a miss.
    assert Store(tmp_path, "test.v2").get_tensors(K(2)) is None


# ----------------------------------------------------------------------------------------------------
# Content keys


def test_values_and_scores_of_a_changed_dataset_or_model_are_not_reused(assets, tok_bos):
    """Values and pre-scores are keyed on the facts' content and the weights' fingerprint: a record
    changed in place misses alone; weights re-saved to the same folder miss everywhere."""
    from sweep.shared.keys import ScoresStore, record_digest, request_digest, scores_key
    from sweep.shared.needs import plan_shared
    from sweep.stages import load_records

    cfg = load_sweep(str(sweep_file(assets)))
    plan = make_plan(cfg)
    (vjob,) = plan.shared.values.values()
    (sjob,) = plan.shared.scores.values()
    assert len(vjob.missing()) == 4 and vjob.uses == 16 and len(sjob.missing()) == 4
    # Store values and scores of every fact (as the pre-pass's tasks would).
    t = plan.trials[0]
    mid = model_identity(t.model)
    recs = load_records(t)
    vkey = values_key(t, t.edit_hparams, mid)
    ValuesStore(cfg.values_store).put(vkey, [request_digest(r.request()) for r in recs], torch.randn(4, 32))
    from sweep.evals.metrics import RecordScores

    rows = [RecordScores(r.case_id, 1, 1, 1, 0, 0, 0, 1, 1, 1) for r in recs]
    ScoresStore(cfg.scores_store).put_rows(
        scores_key(t, mid), [record_digest(r) for r in recs], [r.fields() for r in rows]
    )
    again = plan_shared(cfg, plan.trials, plan.keys)
    assert sum(len(j.missing()) for j in again.values.values()) == 0
    assert sum(len(j.missing()) for j in again.scores.values()) == 0

    # The CounterFact file changed in place: record 2's new target differs.
    data = json.loads((assets / "cf.json").read_text())
    data[2]["requested_rewrite"]["target_new"]["str"] = "Madrid"
    (assets / "cf.json").write_text(json.dumps(data))
    changed = plan_shared(cfg, plan.trials, plan.keys)
    (vj,) = changed.values.values()
    (sj,) = changed.scores.values()
    assert [r.case_id for r, _ in vj.missing()] == [2] and [r.case_id for r, _ in sj.missing()] == [2]

    # New weights saved to the same folder: nothing is reused (statistics neither).
    make_model(len(tok_bos), seed=1).save_pretrained(assets / "model")
    assert model_identity(t.model) != mid
    fresh = plan_shared(cfg, plan.trials, plan.keys)
    assert sum(len(j.missing()) for j in fresh.values.values()) == 4
    assert sum(len(j.missing()) for j in fresh.scores.values()) == 4


# ----------------------------------------------------------------------------------------------------
# Statistics passes


def test_split_passes_fills_from_the_deepest_layer():
    assert split_passes([0, 1, 2, 3, 4], lambda n: n <= 2) == [(0,), (1, 2), (3, 4)]
    assert split_passes([5, 1, 3], lambda n: True) == [(1, 3, 5)]
    assert split_passes(range(32), lambda n: n <= 29) == [(0, 1, 2), tuple(range(3, 32))]


def test_passes_under_a_small_budget_give_the_same_statistics_as_one_pass(assets):
    """A budget that fits two layers splits layers 0-3 into two passes; their C equal one pass's."""
    from editors import load_model
    from sweep.shared.needs import model_shape

    path = sweep_file(assets, "budget")
    cfg0 = load_sweep(str(path))
    t = parse_config({**cfg0.base, "layers": [0, 1, 2, 3], "batch_size": 2})
    shape = model_shape(str(assets / "model"), None, None)
    budget = pass_memory_gb(shape, 2, t, on_gpu=False) / 0.9 * 1.0001
    cfg = load_sweep(str(path), ["base.layers=[0,1,2,3]", f"resources.gpu_memory_gb={budget}"])
    plan = make_plan(cfg)
    passes = [p for p in plan.shared.passes if not p.read_only]
    assert [p.layers for p in passes] == [(0, 1), (2, 3)]
    assert all(p.memory_gb <= budget for p in passes)
    model, tok = load_model(str(assets / "model"))
    got = {}
    for p in passes:
        got.update(compute_stats(p.trial, model, tok, p.layers, progress=False))
    one = compute_stats(t, model, tok, [0, 1, 2, 3], progress=False)
    for layer in range(4):
        torch.testing.assert_close(got[layer].mom2, one[layer].mom2, rtol=1e-6, atol=1e-7)
    # The dry run prints the passes with their memory.
    assert "2 pass(es)" in __import__("sweep.plan", fromlist=["format_plan"]).format_plan(cfg, plan)


def test_a_layer_over_the_budget_is_a_config_error(assets):
    from editors.config import ConfigError

    cfg = load_sweep(str(sweep_file(assets, "tiny-budget")), ["resources.gpu_memory_gb=1e-9"])
    with pytest.raises(ConfigError, match=r"resources\.gpu_memory_gb"):
        make_plan(cfg)


def test_every_paper_config_fits_an_l40s_and_estimates_statistics(capsys):
    """The shipped paper configs plan statistics passes that fit 48 GB with bf16 weights, and the
    dry run's total estimate includes the statistics."""
    from sweep import launch

    for name in ("paper-layer-search", "paper-batch", "paper-sequential-batch", "alphaedit-protocol"):
        cfg = load_sweep(str(ROOT / "sweep" / "configs" / f"{name}.yaml"))
        plan = make_plan(cfg, dry_run=True)
        passes = [p for p in plan.shared.passes if not p.read_only]
        assert passes and all(p.memory_gb <= 48 for p in passes), name
        assert all(p.trial.stats.model_dtype == "bfloat16" for p in passes)
        assert plan.shared_seconds["statistics"] > 0
        assert launch.main(["--config", str(ROOT / "sweep" / "configs" / f"{name}.yaml"), "--dry-run"]) == 0
        out = capsys.readouterr().out
        assert "pass: layers" in out and "statistics" in out.splitlines()[-1]
    assert len(passes) >= 1


# ----------------------------------------------------------------------------------------------------
# Convergence


def test_converged_statistics_stop_early_and_record_their_tokens(tmp_path, tok):
    """On a stationary corpus (one paragraph repeated) the pass stops well before the cap, records its
    token count and history, and the store keeps both."""
    from editors import spec_for
    from editors.stats import StatsKey, StatsStore, collect_second_moments

    model = make_model(len(tok))
    texts = ["The Eiffel Tower is located in Paris. Rome is the capital of Italy. " * 8] * 2000
    out = collect_second_moments(
        model, tok, spec_for(model), [1, 2], texts, max_tokens=400_000, tolerance=0.05, progress=False
    )
    sm = out[1]
    assert sm.converged is True and sm.n_tokens < 100_000
    assert out[2].n_tokens == sm.n_tokens and sm.history[-1][1] < 0.05
    assert all(a[0] < b[0] for a, b in zip(sm.history, sm.history[1:]))
    with pytest.raises(ValueError, match="tolerance"):
        collect_second_moments(model, tok, spec_for(model), [1], texts, tolerance=1.5, progress=False)
    # Without a tolerance it reads to the cap.
    capped = collect_second_moments(model, tok, spec_for(model), [1], texts, max_tokens=150_000, progress=False)
    assert capped[1].n_tokens == 150_000 and capped[1].converged is None
    store = StatsStore(tmp_path)
    key = StatsKey("m", 1, "c", None, 400_000, None, "float32", tolerance=0.05)
    store.put(key, sm)
    back = store.get(key)
    assert back.n_tokens == sm.n_tokens and back.converged is True and back.history == sm.history
    # A key with another tolerance is another entry.
    assert store.get(StatsKey("m", 1, "c", None, 400_000, None, "float32", tolerance=0.01)) is None


# ----------------------------------------------------------------------------------------------------
# A pre-pass killed with SIGKILL


@pytest.mark.integration  # a process of its own
def test_sigkill_mid_prepass_loses_at_most_the_chunks_in_flight(assets, tmp_path):
    """The launcher SIGKILLs itself after 3 stored chunks; the same command then computes exactly what
    the stores lack and the sweep completes."""
    from sweep.shared.fulfil import CHAOS_KILL_ENV

    path = sweep_file(assets, "killed")
    env = {**os.environ, CHAOS_KILL_ENV: "3", CHAOS_KILL_ENV + "_MARK": str(tmp_path / "mark")}
    cmd = [sys.executable, "-m", "sweep.launch", "--config", str(path), "--local", "--num-cpus", "2", "--quiet"]
    first = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
    assert (tmp_path / "mark").read_text() == "3"

    # Only the launcher writes the stores (the Ray tasks return their results), so what is on disk is
    # final the moment it died: the chunks it stored, at least the 3 it counted.
    value_parts = list((assets / "values").rglob("[!.]*.safetensors"))
    score_parts = list((assets / "scores").rglob("[!.]*.json"))
    assert len(value_parts) + len(score_parts) >= 3
    env.pop(CHAOS_KILL_ENV)
    second = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    cfg = load_sweep(str(path))
    from sweep.config import sweep_id

    summary = json.loads((Path(cfg.storage) / f"killed-{sweep_id(cfg)}-summary.json").read_text())
    work = summary["work"]
    assert work["values_optimised"] == 4 - len(value_parts)  # 4 facts, one value key (MEMIT = EMMET)
    assert work["scores_computed"] == 4 - len(score_parts)
    assert work["values_read"] == len(value_parts) and work["scores_read"] == len(score_parts)
    assert summary["errors"] == 0 and summary["trials"] == 4


@pytest.mark.integration  # a process of its own
def test_two_processes_sharing_a_store_compute_an_entry_once(tmp_path):
    """A claim on an entry: the second process waits while the first computes, then reads its result;
    a claim whose holder died is taken over."""
    import multiprocessing as mp

    from editors.stats import SecondMoment, StatsKey, StatsStore, get_or_compute

    ctx = mp.get_context("spawn")
    calls = tmp_path / "calls"
    calls.mkdir()
    procs = [ctx.Process(target=_compute_once, args=(str(tmp_path / "store"), str(calls), i)) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    assert len(list(calls.iterdir())) == 1  # exactly one process computed the statistics
    key = StatsKey(**_KEY)
    store = StatsStore(tmp_path / "store")
    assert torch.equal(store.get(key).mom2, torch.full((2, 2), 3.0))
    # a lock file left by a dead process (no process holds its lock) does not block
    lock = Path(f"{store.path(StatsKey(**{**_KEY, 'layer': 1}))}.lock")
    lock.write_text(json.dumps({"host": __import__("socket").gethostname(), "pid": 2**22 + 7}))
    got = get_or_compute(store, {1: StatsKey(**{**_KEY, "layer": 1})}, lambda ls: {1: SecondMoment(torch.eye(2), 5)})
    assert got[1].n_tokens == 5 and json.loads(lock.read_text())["pid"] == os.getpid()  # this process held it


_KEY = {
    "model": "m",
    "layer": 0,
    "module": "mlp",
    "corpus": "c",
    "max_tokens": 1,
    "max_texts": None,
    "max_seq_len": None,
    "dtype": "float32",
}


def _compute_once(root: str, calls: str, i: int) -> None:

    from editors.stats import SecondMoment, StatsKey, StatsStore, get_or_compute

    def compute(layers):
        Path(calls, str(i)).write_text("x")
        time.sleep(2)  # long enough for the other process to find the claim
        return {0: SecondMoment(torch.full((2, 2), 3.0), 10)}

    get_or_compute(StatsStore(root), {0: StatsKey(**_KEY)}, compute)


def test_malformed_values_and_score_rows_are_misses_reported_once(tmp_path, caplog):
    """A values part of the right key but the wrong shape or with NaNs, and a score row missing fields,
    are read as misses (to be recomputed) with one warning each, never returned."""
    from dataclasses import dataclass

    from sweep.evals.metrics import RecordScores
    from sweep.shared.keys import ScoresStore, ValuesStore

    @dataclass(frozen=True)
    class K:
        name: str

    vs = ValuesStore(tmp_path / "v")
    key = K("k")
    vs.put(key, ["a", "b"], torch.ones(2, 4))
    bad = torch.ones(2, 4)
    bad[1, 0] = float("nan")
    vs.store.put_tensors(key, {"values": bad}, {"facts": json.dumps(["c", "d"])}, part="p2")
    vs.store.put_tensors(key, {"values": torch.ones(3, 4)}, {"facts": json.dumps(["e", "f"])}, part="p3")
    for _ in range(2):
        assert set(vs.get(key)) == {"a", "b"}
    assert sum("values store" in r.message for r in caplog.records) == 2  # one per bad part, not per read
    ss = ScoresStore(tmp_path / "s")
    row = RecordScores(case_id=0, es=1, ps=1, ns=0, em=0.5, pm=0.5, nm=0, es_acc=1, ps_acc=1, ns_acc=0)
    ss.put_rows(key, ["x"], [row.fields()])
    ss.store.put_json(key, {"y": {"es": 1.0}}, part="bad")
    assert set(ss.get(key)) == {"x"} and set(ss.get(key)) == {"x"}
    assert sum("malformed row" in r.message for r in caplog.records) == 1


def test_fulfil_reads_what_the_stores_hold_and_two_fulfillers_compute_each_unit_once(assets):
    """The one rule every unit goes through (sweep.shared.fulfil): computed and stored by the fulfiller when
    missing, read when stored (counted as read, with no computation), and two fulfillers at once (two
    sweeps on one driver) compute each unit exactly once between them."""
    import threading

    from editors import load_model
    from sweep.shared.fulfil import LocalBackend, run_units, units_of

    cfg = load_sweep(str(sweep_file(assets, "rule", **{"base.scoring": {"ppl": True, "ppl_texts": 2}})))
    plan = make_plan(cfg)
    model, tok = load_model(str(assets / "model"))
    calls: list[str] = []

    class Slow(LocalBackend):
        def compute(self, unit):
            calls.append(unit.kind)
            time.sleep(0.3)  # long enough for the other fulfiller to find the claim
            return super().compute(unit)

    units = units_of(plan.shared, cfg)
    assert sorted({u.kind for u in units}) == ["ppl", "scores", "stats", "values"]
    outs = []
    models = [model, load_model(str(assets / "model"))[0]]  # each fulfiller its own (hooks are per model)
    threads = [
        threading.Thread(target=lambda m=m: outs.append(run_units(units, Slow(m, tok, False), False))) for m in models
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(outs) == 2
    assert sorted(calls) == sorted(u.kind for u in units)  # each unit computed once, by one of the two
    computed = [o.work.values_optimised + o.work.scores_computed + o.work.stats_layers_computed for o in outs]
    read = [o.work.values_read + o.work.scores_read + o.work.stats_layers_read for o in outs]
    assert sum(computed) == 4 + 4 + 1 and sum(read) == 4 + 4 + 1  # 4 values, 4 scores, 1 layer; each once
    calls.clear()
    again = run_units(units_of(make_plan(cfg).shared, cfg), Slow(model, tok, False), True)
    assert calls == [] and (again.work.values_read, again.work.scores_read, again.work.stats_layers_read) == (4, 4, 1)
    assert again.work.ppl_read == 1 and again.work.ppl_computed == 0
    a, b = outs[0], again
    for k, (ds, h) in a.facts.items():  # every fact's value or score row, computed then read, is the same
        ds2, h2 = b.facts[k]
        x, y = h[ds.index(k[1])], h2[ds2.index(k[1])]
        assert torch.equal(x, y) if torch.is_tensor(x) else x == y


def test_hub_models_are_keyed_on_the_commit_their_revision_resolves_to(tmp_path, monkeypatch):
    """A hub id is keyed on its commit (a moved branch is another key), from the hub or, offline, from
    the local Hugging Face cache's ref; a commit hash is its own; unresolvable is marked so."""
    from huggingface_hub import constants

    from editors.model import ModelRef, hub_commit

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    hub_commit.cache_clear()
    sha = "a" * 40
    assert ModelRef("org/model", revision=sha).identity() == f"hub:org/model@{sha}"
    assert ModelRef("org/model").identity() == "hub:org/model@main:unresolved"
    refs = tmp_path / "models--org--model" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text("b" * 40 + "\n")
    hub_commit.cache_clear()
    first = ModelRef("org/model").identity()
    assert first == f"hub:org/model@{'b' * 40}"
    (refs / "main").write_text("c" * 40)  # the branch moved: another key
    hub_commit.cache_clear()
    assert ModelRef("org/model").identity() != first
    hub_commit.cache_clear()


def test_a_pass_of_many_layers_is_read_and_written_one_layer_at_a_time(tmp_path, monkeypatch):
    """A statistics unit's claim is polled on file headers only, and its matrices are fetched one layer
    at a time when asked for (a 29-layer pass of Llama-3-8B is 24 GB: never in memory whole)."""
    from editors.stats import SecondMoment, StatsKey, StatsStore
    from sweep.config import parse_config
    from sweep.shared.fulfil import Moments, StatsUnit

    keys = {layer: StatsKey(**{**_KEY, "layer": layer}) for layer in range(3)}
    unit = StatsUnit(parse_config({}), "g", keys, str(tmp_path))
    assert not unit.stored() and unit.read() is None
    fetched: list[int] = []

    def fetch(layer: int) -> SecondMoment:
        fetched.append(layer)
        return SecondMoment(torch.full((2, 2), float(layer)), 10 + layer)

    value = Moments({layer: (lambda la=layer: fetch(la)) for layer in range(3)}, {la: 10 + la for la in range(3)})
    unit.write(value)
    assert fetched == [0, 1, 2] and unit.stored()
    gets: list[int] = []
    real = StatsStore.get
    monkeypatch.setattr(StatsStore, "get", lambda self, key, device=None: gets.append(key.layer) or real(self, key))
    assert unit.stored() and gets == []  # headers only
    got = unit.read()
    assert gets == [] and got.tokens == {0: 10, 1: 11, 2: 12} and gets == []  # tokens without the matrices
    assert torch.equal(got[2].mom2, torch.full((2, 2), 2.0)) and gets == [2]


# ----------------------------------------------------------------------------------------------------
# On Ray: processes that free their GPU, statistics split over workers


@pytest.fixture()
def local_ray():
    """A fresh local Ray with two CPUs and one fake GPU (``address="local"``: never a running cluster)."""
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, logging_level="ERROR")
    try:
        yield ray
    finally:
        ray.shutdown()


def _recording_tasks(folder: Path, d_key: int, d_model: int):
    """:class:`sweep.shared.fulfil.RayTasks` whose bodies write the pid of the process that ran them into
    ``folder`` and return small results of the right shapes; no model (a fake GPU has no CUDA device,
    which sweep.shared.tasks's bodies refuse)."""
    from types import SimpleNamespace

    import numpy as np

    def mark(kind: str) -> None:
        (folder / f"{kind}.{os.getpid()}.{time.time_ns()}").touch()

    def stats_task(trial, layers, part=None):
        mark("stats")
        n = part["stop"] - part["start"] if part and part["stop"] is not None else 100
        meta = {"seconds": 0.01, "tokens": {la: n for la in layers}, "converged": None, "history": []}
        return [np.eye(d_key, dtype=np.float32) * n for _ in layers] + [meta]

    def values_task(trial, records):
        mark("values")
        return np.zeros((len(records), d_model), np.float32), 0.01

    def scores_task(trial, records):
        from sweep.evals.metrics import RecordScores

        mark("scores")
        return [RecordScores(r.case_id, 1, 1, 0, 0, 0, 0, 1, 1, 0).fields() for r in records], 0.01

    def ppl_task(trial):
        mark("ppl")
        return 12.5, 0.01

    def probes_task(trial):
        mark("probes")
        return {}, 0.01

    return SimpleNamespace(
        stats_task=stats_task,
        values_task=values_task,
        scores_task=scores_task,
        ppl_task=ppl_task,
        probes_task=probes_task,
    )


def test_no_process_that_computed_a_gpu_unit_outlives_the_fulfilment(assets, tmp_path, local_ray):
    """Every shared-work task that asks for a GPU runs in a process that exits after it: a process that
    computed a unit would otherwise keep the model in its cache and the CUDA allocator's memory while a
    trial waits for that GPU (ray.remote(fn).options(num_gpus=1) reuses its processes)."""
    import psutil

    from sweep.shared.fulfil import fulfil_ray

    resources = {"cpu": 1, "gpu": 1, "gpu_memory_gb": 24}
    path = sweep_file(assets, "gpu", resources=resources, values_chunk=2, **{"base.scoring": {"ppl": True}})
    cfg = load_sweep(str(path))
    plan = make_plan(cfg)
    marks = tmp_path / "pids"
    marks.mkdir()
    refs, work = fulfil_ray(plan.shared, cfg, _recording_tasks(marks, d_key=48, d_model=32))
    ran = [p.name.split(".") for p in marks.iterdir()]
    assert sorted({kind for kind, _, _ in ran}) == ["ppl", "scores", "stats", "values"]
    assert len(ran) == 1 + 2 + 2 + 1  # a pass, two chunks of values, two of scores, the perplexity
    assert (work.stats_passes, work.values_optimised, work.scores_computed, work.ppl_computed) == (1, 4, 4, 1)
    pids = {int(pid) for _, pid, _ in ran}
    assert len(pids) == len(ran), "each GPU task ran in a process of its own"
    deadline = time.time() + 20
    alive = pids
    while alive and time.time() < deadline:
        time.sleep(0.2)
        alive = {p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE}
    assert not alive, f"processes that computed shared work on the GPU still live: {sorted(alive)}"
    # the trials' handles resolve, from the driver's own copies
    tr = next(iter(refs.values()))
    assert local_ray.get(tr.stats[1]).shape == (48, 48) and tr.ppl == 12.5


def test_the_planning_probe_of_a_gpu_node_leaves_no_process_holding_it(tmp_path, local_ray, monkeypatch):
    """Asking a GPU node for its card opens a CUDA context there: the process that did exits after it,
    as the shared-work tasks' do, rather than keeping the context while trials wait for that GPU."""
    import psutil

    from sweep import launch
    from sweep.shared import tasks

    marks = tmp_path / "pids"
    marks.mkdir()

    def probe() -> dict:
        (marks / str(os.getpid())).touch()
        return {"node": "fake", "name": "fake GPU", "total_gb": 24.0}

    monkeypatch.setattr(tasks, "gpu_memory_task", probe)
    assert launch._ask_cluster_gpu() == 24.0
    (pid,) = (int(p.name) for p in marks.iterdir())
    deadline = time.time() + 20
    while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE and time.time() < deadline:
        time.sleep(0.2)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_a_pass_split_over_workers_through_fulfil_ray_equals_one_pass(assets, local_ray):
    """A statistics pass split into parts (three, on two CPUs: resources.max_concurrent) through
    fulfil_ray, on sweep.shared.tasks's own task bodies, stores the C of one unsplit pass; it counts as one
    pass of three tasks."""
    from editors import load_model
    from editors.stats import StatsStore
    from sweep.shared import tasks
    from sweep.shared.fulfil import fulfil_ray

    over = ["base.layers=[0,2]", "share_values=false", "resources.max_concurrent=3"]
    cfg = load_sweep(str(sweep_file(assets, "split", **{"base.scoring": {"ppl": False, "pre": False}})), over)
    plan = make_plan(cfg)
    refs, work = fulfil_ray(plan.shared, cfg, tasks)
    assert (work.stats_passes, work.stats_shards, work.stats_layers_computed) == (1, 3, 2)
    (p,) = plan.shared.passes
    model, tok = load_model(str(assets / "model"))
    one = compute_stats(p.trial, model, tok, [0, 2], progress=False)
    store = StatsStore(cfg.base["stats"]["store"])
    for layer in (0, 2):
        got = store.get(p.keys[layer])
        assert got.n_tokens == one[layer].n_tokens == 2000
        torch.testing.assert_close(got.mom2, one[layer].mom2, rtol=1e-5, atol=1e-6)
        handed = next(iter(refs.values())).stats[layer]
        torch.testing.assert_close(
            torch.from_numpy(local_ray.get(handed).copy()), one[layer].mom2, rtol=1e-5, atol=1e-6
        )


def test_the_heads_share_of_a_plan_is_its_statistics_and_values_by_hand(assets):
    """HeadNeeds: 2 layers × d_key² × 4 bytes (8 in float64) and 4 facts × d_model × 4 bytes, from the
    model's config.json; a stored layer still counts for the object store but no longer for the disk."""
    conf = json.loads((assets / "model" / "config.json").read_text())
    d_key, d_model = conf["intermediate_size"], conf["hidden_size"]
    path = sweep_file(assets, "head", grid={"algorithm": ["memit"], "batch_size": [2, 4]})
    head = make_plan(load_sweep(str(path), ["base.layers=[0,1]"])).shared.head()
    assert head.stats_bytes == 2 * d_key**2 * 4 and head.largest_layer_bytes == d_key**2 * 4
    assert head.values_bytes == 4 * d_model * 4
    assert head.store_bytes == head.object_store_bytes == head.stats_bytes + head.values_bytes
    wide = make_plan(load_sweep(str(path), ["base.layers=[0,1]", "base.stats.dtype=float64"])).shared.head()
    assert wide.stats_bytes == 2 * d_key**2 * 8

    plan = make_plan(load_sweep(str(path), ["base.layers=[0,1]"]))
    model, tok = load_model(str(assets / "model"))
    p = plan.shared.passes[0]
    stats_store(p.trial.stats.store).put(p.keys[0], compute_stats(p.trial, model, tok, [0], progress=False)[0])
    after = make_plan(load_sweep(str(path), ["base.layers=[0,1]"])).shared.head()
    assert after.object_store_bytes == head.object_store_bytes
    assert after.store_bytes == head.store_bytes - d_key**2 * 4
