"""The shared-work service in-process: inputs found by what they are, missing ones computed once by the
trials that ask, grants that lapse, and a trial suggested after launch (a new layer) served on demand."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from editors import load_model
from sweep.config import SweepConfig, TrialConfig, parse_config, trial_key
from sweep.shared.fulfil import fulfil_local
from sweep.shared.needs import plan_shared
from sweep.shared.service import SharedWork, obtain
from tests.conftest import write_tiny_assets


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tok_bos):
    return write_tiny_assets(tmp_path_factory.mktemp("service"), tok_bos)


def trial(assets, tmp, **over) -> TrialConfig:
    data = {
        "algorithm": "memit",
        "hparams": "smollm2-135m",
        "layers": [1],
        "n_edits": 4,
        "batch_size": 2,
        "model": {"source": str(assets / "model"), "device": "cpu"},
        "dataset": {"source": str(assets / "cf.json")},
        "stats": {"corpus": str(assets / "corpus.txt"), "max_tokens": 2000, "store": str(tmp / "stats")},
        "hp": {"v_num_grad_steps": 2, "context_templates": "none"},
        "scoring": {"ppl": True, "ppl_offset": 0, "ppl_texts": 2, "ppl_max_len": 64},
        **over,
    }
    return parse_config(data)


def sweep_cfg(tmp) -> SweepConfig:
    return SweepConfig(name="svc", values_store=str(tmp / "values"), scores_store=str(tmp / "scores"))


def client(service: SharedWork, model, tok, data: dict):
    return obtain(
        service.ask, service.renew, service.release, service.deliver, data, model, tok, lambda h: h, poll_s=0.05
    )


def test_trials_that_ask_at_once_compute_each_unit_once(assets, tmp_path):
    model, tok = load_model(str(assets / "model"), device="cpu")
    service = SharedWork(sweep_cfg(tmp_path))
    a = trial(assets, tmp_path, hp={"v_num_grad_steps": 2, "context_templates": "none", "mom2_update_weight": 10.0})
    b = trial(assets, tmp_path, hp={"v_num_grad_steps": 2, "context_templates": "none", "mom2_update_weight": 1e4})
    got = {}
    # each trial its own model, as each Ray trial has its own process; loaded here, one after the other:
    # from_pretrained's loading contexts are process-wide, and two at once in threads can leave them set
    models = {name: load_model(str(assets / "model"), device="cpu") for name in ("a", "b")}

    def run(name, data):
        m, t = models[name]
        got[name] = client(service, m, t, data)

    threads = [threading.Thread(target=run, args=(n, d)) for n, d in (("a", a), ("b", b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    w = service.counts()
    # two trials, one C, one set of values and of pre-edit scores, one perplexity: each computed once
    assert w["stats_layers_computed"] == 1 and w["scores_computed"] == 4 and w["ppl_computed"] == 1
    assert w["values_optimised"] == 4
    assert sum(sum(g.computed.values()) for g in got.values()) == 1 + 4 + 4 + 1
    assert torch.equal(got["a"].inputs.stats[1], got["b"].inputs.stats[1])
    assert got["a"].inputs.pre_scores == got["b"].inputs.pre_scores and got["a"].inputs.pre_ppl is not None
    # the same inputs as a fulfilment of the planned trial in this process
    cfg = a
    key = trial_key(cfg)
    ref, _ = fulfil_local(
        plan_shared(sweep_cfg(tmp_path / "ref"), [cfg], [key]), sweep_cfg(tmp_path / "ref"), model, tok
    )
    assert torch.allclose(ref[key].stats[1], got["a"].inputs.stats[1], rtol=1e-5, atol=1e-7)

    # A trial suggested later at a new layer: only that layer's statistics are computed; the rest is found.
    c = client(service, model, tok, trial(assets, tmp_path, layers=[2]))
    assert c.computed == {"stats": 1, "values": 4}  # the values sit at the last edited layer: 2 now
    assert service.counts()["stats_layers_computed"] == 2 and service.counts()["scores_computed"] == 4
    # A new service over the same stores (a second sweep) reads everything and computes nothing.
    again = SharedWork(sweep_cfg(tmp_path))
    d = client(again, model, tok, trial(assets, tmp_path, layers=[2]))
    assert d.computed == {} and again.counts()["stats_layers_read"] == 1 and again.counts()["scores_read"] == 4


def test_a_lapsed_grant_goes_to_the_next_trial(assets, tmp_path, monkeypatch):
    import sweep.shared.service as svc

    service = SharedWork(sweep_cfg(tmp_path))
    data = trial(assets, tmp_path)
    first = service.ask(data)
    assert first.grant is not None
    other = service.ask(data)  # the first unit is held: the next one goes to the second asker
    assert other.grant is not None and other.grant.unit != first.grant.unit
    monkeypatch.setattr(svc.time, "monotonic", lambda: time.perf_counter() + 10 * svc.LEASE_S)
    again = service.ask(data)  # both holders went silent: their units are granted again
    assert again.grant is not None and again.grant.unit == first.grant.unit
    assert not service.renew(first.grant.token)  # the first holder learns its grant lapsed


def test_a_search_computes_the_statistics_of_every_layer_it_can_reach_in_one_pass(assets, tmp_path):
    """With the layer sets a search can suggest (``reach``), the first trial that needs statistics computes
    every reachable layer in one pass; a later suggestion at another layer finds its C computed, equal to
    the C of a pass over that layer alone."""
    model, tok = load_model(str(assets / "model"), device="cpu")
    service = SharedWork(sweep_cfg(tmp_path), reach=[[1], [2], [0, 2]])
    first = client(service, model, tok, trial(assets, tmp_path, layers=[1]))
    assert first.computed["stats"] == 3  # layers 0, 1 and 2 in the pass a layer-1 trial was granted
    w = service.counts()
    assert w["stats_passes"] == 1 and w["stats_layers_computed"] == 3
    later = client(service, model, tok, trial(assets, tmp_path, layers=[2]))
    assert "stats" not in later.computed and service.counts()["stats_passes"] == 1
    alone = SharedWork(sweep_cfg(tmp_path / "alone"))
    own = client(alone, model, tok, trial(assets, tmp_path / "alone", layers=[2]))
    assert own.computed["stats"] == 1
    assert torch.allclose(own.inputs.stats[2], later.inputs.stats[2], rtol=1e-5, atol=1e-7)


def test_the_drivers_units_start_trials_as_each_is_supplied(assets, tmp_path):
    """A grid's up-front fulfilment beside the trials: while the driver holds a unit, no trial is granted it
    and a trial that needs it cannot start; once supplied, the trials that need nothing else start (while
    others still wait on theirs) and are handed the driver's own handles, counted once (by the driver)."""
    from sweep.shared.fulfil import LocalBackend, StatsUnit, fulfil_unit, units_of

    model, tok = load_model(str(assets / "model"), device="cpu")
    cfg = sweep_cfg(tmp_path)
    a = trial(assets, tmp_path, layers=[1], scoring={"ppl": False, "pre": False})
    stats_b = {"corpus": str(assets / "corpus.txt"), "max_tokens": 1500, "store": str(tmp_path / "stats")}
    b = trial(assets, tmp_path, layers=[2], scoring={"ppl": False, "pre": False}, stats=stats_b)
    # two statistics passes (b's statistics settings differ: a group of their own), values for each layer
    plan = plan_shared(cfg, [a, b], [trial_key(a), trial_key(b)], budget_gb=None)
    units = units_of(plan, cfg)
    stats = [u for u in units if isinstance(u, StatsUnit)]
    assert len(stats) == 2
    by_layer = {la: u for u in stats for la in u.layers}
    service = SharedWork(cfg)
    service.expect(units)
    assert service.startable([a, b]) == [False, False]
    assert service.ask(a).grant is None  # the driver's: no trial computes it
    backend = LocalBackend(model, tok, progress=False)
    done = {id(u): fulfil_unit(u, backend) for u in units}
    for u in units:  # everything but the statistics of layer 2 arrives
        if u is not by_layer[2]:
            service.supply(u, done[id(u)])
    assert service.startable([a, b]) == [True, False]
    ref = service.ask(a).refs
    assert ref is not None and ref.stats[1] is done[id(by_layer[1])].handle[1]  # the driver's own handle
    assert service.ask(b).grant is None and service.ask(b).waiting == 1  # not granted: the driver's
    service.supply(by_layer[2], done[id(by_layer[2])])
    assert service.startable([a, b]) == [True, True]
    ref = service.ask(b).refs
    assert ref is not None and ref.stats[2] is done[id(by_layer[2])].handle[2]
    assert service.counts()["stats_layers_computed"] == 0  # the driver's units are the driver's to count


def test_ready_first_suggests_each_trial_once_its_inputs_exist_in_plan_order():
    """Tune's grid fed by readiness: nothing is suggested while no trial can start (Tune asks again), then
    the startable trials in plan order, each once, and FINISHED after the last."""
    from types import SimpleNamespace

    from sweep.tune.search import ReadyFirst

    trials = [SimpleNamespace(config=f"c{i}", point=lambda i=i: {"point": {"trial": i}}) for i in range(3)]
    ready: set[str] = set()
    asked: list[list[str]] = []

    def startable(configs):
        asked.append(list(configs))
        return [c in ready for c in configs]

    s = ReadyFirst(trials, startable, poll_s=0.0)
    assert s.suggest("t0") is None  # nothing can start
    ready.add("c2")
    assert s.suggest("t1") == {"point": {"trial": 2}}
    assert s.suggest("t2") is None
    ready.update({"c0", "c1"})
    assert [s.suggest(f"t{i}")["point"]["trial"] for i in (3, 4)] == [0, 1]
    assert s.suggest("t5") == s.FINISHED
    assert asked[-1] == ["c1"]  # only the trials still to start are asked about
    s2 = ReadyFirst(trials, startable, poll_s=60.0)
    ready.clear()
    assert s2.suggest("u0") is None and s2.suggest("u1") is None
    assert len(asked) == 5 + 1  # the second None came from the poll interval, not another question
    failed = [False]
    s3 = ReadyFirst(trials, startable, lambda: failed[0], poll_s=0.0)
    ready.add("c0")
    assert s3.suggest("v0") == {"point": {"trial": 0}}
    failed[0] = True  # the shared work failed: nothing more starts, and Tune is told it is over
    assert s3.suggest("v1") == s3.FINISHED
