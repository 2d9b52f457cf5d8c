"""The lifelong-editing methods (NAS, PRUNE, RECT, ENCORE's MPES), the schedule's stop and health, and
the trial's forgetting curves and collapse guard: each against an independent formula or a property
its paper states, on a tiny random Llama."""

from __future__ import annotations

import math

import pytest
import torch

from editors import EditRequest, EditState, load_hparams, run_schedule, spec_for
from editors.algorithms import nas, prune, rect
from editors.model import hooks, weight
from editors.requests import encode_at, fill, target_ids
from editors.schedule import StopSchedule, WeightHealth, hyperspherical_energy
from editors.targets import ValueHParams, optimize_values, reprs_at_subject
from tests.editors.test_editors import REQUESTS, TEMPLATES, random_stats


def orthonormal(n: int, k: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


# ----------------------------------------------------------------------------------------------------
# PRUNE


@pytest.mark.parametrize("base", [math.e, 2.0, 1.2])
def test_prune_maps_the_singular_values_above_w0s_largest_by_the_log_rule(base):
    """ΔW = U diag(s) Vᵀ with known s: PRUNE's result has exactly the singular values
    log_α(s) − log_α(σ̄) + σ̄ where s ≥ σ̄ = σ_max(W₀), the others unchanged, the same singular vectors,
    and none above σ̄ + log_α(s_max / σ̄)."""
    w0 = torch.randn(24, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigma_bar = float(torch.linalg.matrix_norm(w0, ord=2))
    s = torch.tensor([40.0, 3.0 * sigma_bar, 1.01 * sigma_bar, 0.9 * sigma_bar, 1.0, 0.1], dtype=torch.float64)
    u, v = orthonormal(24, 6, 1), orthonormal(16, 6, 2)
    delta = (u * s) @ v.T
    out = prune.restrain(delta, w0, base)
    want = torch.where(
        s >= sigma_bar, torch.log(s) / math.log(base) - math.log(sigma_bar) / math.log(base) + sigma_bar, s
    )
    got = torch.linalg.svdvals(out)[:6]
    assert torch.allclose(got, torch.sort(want, descending=True).values, rtol=1e-10)
    assert torch.allclose(u.T @ out @ v, torch.diag(want), atol=1e-9)  # same singular vectors
    assert float(got[0]) <= sigma_bar + math.log(40.0 / sigma_bar, base) + 1e-9
    small = prune.restrain(delta * 1e-3, w0, base)  # nothing above σ̄: unchanged
    assert torch.equal(small, delta * 1e-3)
    with pytest.raises(ValueError, match="prune_base"):
        prune.restrain(delta, w0, 1.0)


def test_prune_in_a_schedule_scores_the_restrained_weights_and_edits_on_from_the_raw_ones(model, tok):
    """The callback sees W₀ + PRUNE(W − W₀); the next batch is computed on the unrestrained weights
    (the authors' protocol), and the final model holds the restrained ones."""
    spec = spec_for(model)
    name = spec.rewrite_name(1)
    w0 = weight(model, spec, 1).detach().clone()
    stats = random_stats(spec, [1])
    common = {"layers": [1], "v_num_grad_steps": 6, "v_lr": 2.0, "mom2_update_weight": 1e-3}
    raw_hp = load_hparams("memit", None, **common)
    hp = load_hparams("memit", None, **common, prune_base=2.0)
    kw = {"batch_size": 2, "mode": "sequential-batch", "templates": TEMPLATES, "keep_deltas": True}
    raw = run_schedule(model, tok, REQUESTS, "memit", raw_hp, stats, **kw)
    w_raw = weight(model, spec, 1).detach().clone()
    raw.restore(model)
    seen = []
    out = run_schedule(
        model, tok, REQUESTS, "memit", hp, stats, callback=lambda ev: seen.append(weight(model, spec, 1).clone()), **kw
    )
    assert torch.linalg.matrix_norm((w_raw - w0).double(), ord=2) > torch.linalg.matrix_norm(w0.double(), ord=2)
    want_final = w0.double() + prune.restrain((w_raw - w0).double(), w0, 2.0)
    assert torch.allclose(weight(model, spec, 1).double(), want_final, atol=1e-4)
    assert torch.allclose(seen[-1].double(), want_final, atol=1e-4)
    # the second batch's delta was computed on the raw (unrestrained) first-batch weights
    assert torch.allclose(out.results[1].deltas[name], raw.results[1].deltas[name], atol=1e-5)
    out.restore(model)


# ----------------------------------------------------------------------------------------------------
# RECT


@pytest.mark.parametrize("keep", [0.4, 0.2, 1.0])
def test_rect_keeps_exactly_the_fraction_of_largest_relative_changes(keep):
    g = torch.Generator().manual_seed(3)
    w, delta = torch.randn(30, 20, generator=g), torch.randn(30, 20, generator=g)
    out = rect.sparsify(delta, w, keep)
    kept = out != 0
    assert int(kept.sum()) == round(keep * delta.numel())
    assert torch.equal(out[kept], delta[kept])  # kept entries are not rescaled
    rel = (delta / w).abs()
    if keep < 1:
        assert rel[kept].min() >= rel[~kept].max()
    with pytest.raises(ValueError, match="rect_keep"):
        rect.sparsify(delta, w, 0.0)


def test_rect_in_memit_sparsifies_each_update_against_the_weight_before_it(model, tok):
    spec = spec_for(model)
    stats = random_stats(spec, [1, 2])
    common = {"layers": [1, 2], "v_num_grad_steps": 4}
    from editors import compute_deltas

    full = compute_deltas(
        "memit", model, tok, REQUESTS[:2], load_hparams("memit", None, **common), stats, templates=TEMPLATES
    )
    sparse = compute_deltas(
        "memit",
        model,
        tok,
        REQUESTS[:2],
        load_hparams("memit", None, **common, rect_keep=0.4),
        stats,
        templates=TEMPLATES,
    )
    for layer in (1, 2):
        name = spec.rewrite_name(layer)
        want = rect.sparsify(full.deltas[name], weight(model, spec, layer), 0.4)
        assert torch.allclose(sparse.deltas[name], want, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# NAS


def test_nas_anchor_is_the_trimmed_mean_and_anchored_values_have_its_norm():
    norms = torch.arange(1.0, 41.0)  # 40 values: the top ⌊0.05·40⌋ = 2 are dropped
    assert nas.anchor_of(norms) == pytest.approx(sum(range(1, 39)) / 38)
    g = torch.Generator().manual_seed(4)
    h, v0 = torch.randn(5, 8, generator=g, dtype=torch.float64), torch.randn(5, 8, generator=g, dtype=torch.float64)
    z = h + torch.randn(5, 8, generator=g, dtype=torch.float64) * torch.tensor([1, 1, 1, 1, 50.0])[:, None]
    anchor = 3.0
    out = nas.anchored(z, h, v0, anchor)
    vstar_in = v0 + z - h
    vstar = out - (h - v0)
    for i in range(5):
        if vstar_in[i].norm() > nas.SKIP_FACTOR * anchor:  # the outlier keeps v₀
            assert torch.allclose(vstar[i], v0[i])
        else:
            assert float(vstar[i].norm()) == pytest.approx(anchor)
            assert torch.allclose(vstar[i] / vstar[i].norm(), vstar_in[i] / vstar_in[i].norm())
    assert torch.allclose(vstar[4], v0[4])


def test_nas_anchors_every_batch_to_the_first_batchs_norm_on_the_unedited_model(model, tok):
    """In a sequential schedule the anchor is the trimmed mean of ‖v₀ + z − h‖ over the first batch,
    computed independently here on the unedited model, and the same anchor is used for every batch."""
    spec = spec_for(model)
    stats = random_stats(spec, [1, 2])
    hp = load_hparams("memit", None, layers=[1, 2], v_num_grad_steps=5, nas=True)
    from editors.templates import flat

    first = REQUESTS[:2]
    z = optimize_values(model, tok, spec, 2, first, flat(TEMPLATES), hp, at="block").values.double()
    reps = reprs_at_subject(model, tok, first, ["{}"], [(spec.block_name(2), "out"), (spec.rewrite_name(2), "out")])
    h, v0 = reps[(spec.block_name(2), "out")][:, 0].double(), reps[(spec.rewrite_name(2), "out")][:, 0].double()
    want = nas.anchor_of((v0 + z - h).norm(dim=1))
    events = []
    out = run_schedule(
        model,
        tok,
        REQUESTS,
        "memit",
        hp,
        stats,
        batch_size=2,
        mode="sequential-batch",
        templates=TEMPLATES,
        callback=events.append,
    )
    anchors = [e.result.info["nas_anchor"] for e in events]
    assert anchors[0] == pytest.approx(want, rel=1e-4)
    assert anchors[1] == anchors[0]
    out.restore(model)
    state = EditState()
    from editors.algorithms import memit

    memit.compute_deltas(model, tok, first, hp, stats, templates=TEMPLATES, state=state)
    assert state.value_norm_anchor == pytest.approx(want, rel=1e-4)


# ----------------------------------------------------------------------------------------------------
# ENCORE's MPES


def _all_argmax(model, tok, spec, layer, request, templates, value, init) -> bool:
    """Whether, with v* added at block ``layer``'s output at the subject's last token, every target
    token of every template is the argmax: one plain forward per template (no cache, no batching)."""
    t_ids = target_ids(tok, request.target_new)
    delta = (value - init).to(torch.float32)
    for t in templates:
        text, end = fill(t.replace("{}", request.template, 1), request.subject)
        ids, idx = encode_at(tok, text, end)

        def add(out, idx=idx):
            out = out.clone()
            out[0, idx] += delta
            return out

        with torch.no_grad(), hooks(model, edit_output={spec.block_name(layer): add}):
            logits = model(torch.tensor([ids + t_ids[:-1]])).logits[0]
        if not torch.equal(logits[len(ids) - 1 :].argmax(-1), torch.tensor(t_ids)):
            return False
    return True


def test_mpes_stops_at_the_first_evaluation_where_every_target_token_is_the_argmax(model, tok):
    spec = spec_for(model)
    templates = ["{}", "Once upon a time. {}"]
    # The subject ends the prompt, so δ shapes the target's logits directly (a random tiny model moves
    # later positions only weakly); a small step makes the argmax take a few steps.
    req = [EditRequest("Tell me about {}", "Italy", "of", "the")]
    base = {"v_lr": 0.01, "early_stop_loss": 0.0, "kl_factor": 0.0, "clamp_norm_factor": 100.0}
    v = optimize_values(model, tok, spec, 1, req, templates, ValueHParams(v_num_grad_steps=60, mpes_hits=1, **base))
    n = int(v.steps[0])
    assert 1 < n < 60
    # the same trajectory without MPES, cut at n and at n − 1 evaluations
    at_n = optimize_values(model, tok, spec, 1, req, templates, ValueHParams(v_num_grad_steps=n, **base))
    before = optimize_values(model, tok, spec, 1, req, templates, ValueHParams(v_num_grad_steps=n - 1, **base))
    assert torch.allclose(at_n.values, v.values, atol=1e-6)
    assert _all_argmax(model, tok, spec, 1, req[0], templates, at_n.values[0], at_n.init[0])
    assert not _all_argmax(model, tok, spec, 1, req[0], templates, before.values[0], before.init[0])
    two = optimize_values(model, tok, spec, 1, req, templates, ValueHParams(v_num_grad_steps=60, mpes_hits=2, **base))
    assert int(two.steps[0]) > n  # a second passing check needs at least one more step
    with pytest.raises(ValueError, match="mpes_hits"):
        ValueHParams(mpes_hits=-1)


def test_encore_is_memit_with_prev_keys_norm_ridge_and_mpes():
    hp = load_hparams("encore", "smollm2-135m")
    assert hp.add_prev_edits and hp.update_norm_lambda > 0 and hp.mpes_hits == 2
    llama = load_hparams("encore", "llama3-8b")
    assert (llama.mom2_update_weight, llama.update_norm_lambda, llama.mpes_hits) == (15000.0, 20.0, 2)


# ----------------------------------------------------------------------------------------------------
# The schedule's stop and health


def test_stop_schedule_keeps_the_edits_so_far_and_health_matches_direct_svd(model, tok):
    spec = spec_for(model)
    w0 = weight(model, spec, 1).detach().clone()
    stats = random_stats(spec, [1])
    hp = load_hparams("memit", None, layers=[1], v_num_grad_steps=4)
    seen = []

    def cb(ev):
        seen.append(ev)
        if ev.index == 1:
            raise StopSchedule("enough")

    out = run_schedule(
        model,
        tok,
        REQUESTS,
        "memit",
        hp,
        stats,
        batch_size=1,
        mode="sequential-batch",
        templates=TEMPLATES,
        callback=cb,
        health_every=2,
    )
    assert out.stopped == "enough" and out.applied == 2 and len(out.results) == 2
    assert [e.health is not None for e in seen] == [False, True]
    w = weight(model, spec, 1).detach()
    assert not torch.equal(w, w0)  # the two edits stay
    h = seen[1].health[spec.rewrite_name(1)]
    s = torch.linalg.svdvals(w.double())
    assert h == WeightHealth(
        drift=pytest.approx(float((w.double() - w0.double()).norm())),
        sigma_max=pytest.approx(float(s[0])),
        cond=pytest.approx(float(s[0] / s[-1])),
        delta_sigma_max=pytest.approx(float(torch.linalg.svdvals((w - w0).double())[0])),
        norm=pytest.approx(float(w.double().norm())),
        hyperspherical_energy=pytest.approx(hyperspherical_energy(w)),
    )
    out.restore(model)
    assert torch.equal(weight(model, spec, 1), w0)
