"""SPHERE, RLSEdit and UltraEdit: each update rule against a hand computation or an independent closed
form, on synthetic matrices and on a tiny random Llama; their settings refused before any model work;
the lifelong state saved and restored bit-identically."""

from __future__ import annotations

import io
import math

import pytest
import torch

from editors import EditState, compute_deltas, load_hparams, run_schedule, spec_for
from editors.algorithms import sphere, ultraedit
from editors.common import RunningStats, apply_deltas, restore
from editors.config import ConfigError
from editors.model import hooks, weight
from editors.solvers import memit_delta, rls_initial_inverse, rls_step, ultraedit_delta
from tests.editors.test_editors import REQUESTS, TEMPLATES, random_stats

F64 = {"dtype": torch.float64}


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), **F64)


# ----------------------------------------------------------------------------------------------------
# SPHERE


def low_rank_stats(d_key: int) -> torch.Tensor:
    """C with 30 directions of weight 1 and the rest 1e-4: AlphaEdit's null space is d_key − 30 wide."""
    q, _ = torch.linalg.qr(randn(d_key, d_key, seed=12))
    return q @ torch.diag(torch.cat([torch.ones(30, **F64), torch.full((d_key - 30,), 1e-4, **F64)])) @ q.T


def test_sphere_directions_and_projection_by_hand():
    """Rows 3×e1 and 1×e2 (unit norm after normalising): ŴᵀŴ/4 = diag(.75, .25, 0). β = 0.5: the first
    direction alone already holds more than half, r = 1; β = 0.8: r = 2. ΔW(I − αUUᵀ) scales exactly
    those columns of ΔW by 1 − α."""
    w = torch.tensor([[2.0, 0, 0], [5.0, 0, 0], [0.5, 0, 0], [0, 3.0, 0]], **F64)
    u1 = sphere.principal_directions(w, 0.5)
    assert u1.shape == (3, 1) and torch.allclose(u1.abs()[:, 0], torch.tensor([1.0, 0, 0], **F64))
    u2 = sphere.principal_directions(w, 0.8)
    assert u2.shape == (3, 2) and torch.allclose((u2 @ u2.T).diagonal(), torch.tensor([1.0, 1.0, 0], **F64))
    delta = randn(4, 3, seed=0)
    got = sphere.project(delta, w, 0.5, 0.5)
    want = delta.clone()
    want[:, 0] *= 0.5
    assert torch.allclose(got, want, atol=1e-12)
    full = sphere.project(delta, w, 0.8, 1.0)
    assert torch.allclose(full[:, :2], torch.zeros(4, 2, **F64), atol=1e-12) and torch.equal(full[:, 2], delta[:, 2])
    assert sphere.project(delta, w, 0.0, 0.5) is delta  # β = 0: off


def test_sphere_off_is_alphaedit_and_on_projects_alphaedits_update(model, tok):
    """β = 0 gives AlphaEdit's deltas bit for bit over a sequence; with β > 0 a batch's update is
    AlphaEdit's projected off the principal directions of the weight before it."""
    spec = spec_for(model)
    stats = {1: low_rank_stats(spec.d_key)}
    common = {"layers": [1], "v_num_grad_steps": 4, "v_lr": 0.5, "L2": 1.0}
    kw = {"batch_size": 2, "mode": "sequential-batch", "templates": TEMPLATES, "keep_deltas": True}
    base = run_schedule(model, tok, REQUESTS, "alphaedit", load_hparams("alphaedit", None, **common), stats, **kw)
    base.restore(model)
    off = run_schedule(
        model, tok, REQUESTS, "alphaedit", load_hparams("alphaedit", None, **common, beta_hse=0.0), stats, **kw
    )
    off.restore(model)
    name = spec.rewrite_name(1)
    assert all(torch.equal(a.deltas[name], b.deltas[name]) for a, b in zip(base.results, off.results, strict=True))
    w0 = weight(model, spec, 1).detach().clone()
    hp = load_hparams("alphaedit", None, **common, beta_hse=0.5, sphere_alpha=0.8)
    on = compute_deltas("alphaedit", model, tok, REQUESTS[:2], hp, stats, templates=TEMPLATES)
    want = sphere.project(base.results[0].deltas[name].double(), w0, 0.5, 0.8)
    assert torch.allclose(on.deltas[name].double(), want, atol=1e-6)
    assert not torch.allclose(on.deltas[name], base.results[0].deltas[name], atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# RLSEdit


def test_rls_recursion_equals_the_batch_ridge_solution():
    """T Woodbury steps from P_0 = (λ²I + μ²wC)⁻¹: P_T⁻¹ = M_0 + Σ K Kᵀ, and W_T is the ridge solution on
    every key so far, W = (W₀M_0 + Σ V_s K_sᵀ)(M_0 + Σ K_s K_sᵀ)⁻¹ (targets V_s, residuals V_s − W K_s)."""
    d_in, d_out, lam, mu, w_c = 12, 5, 0.5, 2.0, 3.0
    a = randn(d_in, 40, seed=1)
    cov = a @ a.T / 40
    m0 = lam**2 * torch.eye(d_in, **F64) + mu**2 * w_c * cov
    p = rls_initial_inverse(cov, w_c, lam, mu)
    assert torch.allclose(p @ m0, torch.eye(d_in, **F64), atol=1e-10)
    w0 = randn(d_out, d_in, seed=2)
    w = w0.clone()
    ks, vs = [], []
    for t in range(4):
        k, v = randn(d_in, 3, seed=10 + t), randn(d_out, 3, seed=20 + t)
        delta, p = rls_step(p, k, v - w @ k)
        w = w + delta
        ks.append(k)
        vs.append(v)
    k_all, v_all = torch.cat(ks, 1), torch.cat(vs, 1)
    assert torch.allclose(torch.linalg.inv(p), m0 + k_all @ k_all.T, rtol=1e-9, atol=1e-9)
    want = torch.linalg.solve((m0 + k_all @ k_all.T).T, (w0 @ m0 + v_all @ k_all.T).T).T
    assert torch.allclose(w, want, atol=1e-10)


def test_rls_first_step_is_memits_solve():
    """λ = 0, μ = 1: the first step is MEMIT's R Kᵀ(wC + KKᵀ)⁻¹."""
    a = randn(10, 30, seed=3)
    cov, k, r = a @ a.T / 30, randn(10, 4, seed=4), randn(6, 4, seed=5)
    delta, _ = rls_step(rls_initial_inverse(cov, 7.0, 0.0, 1.0), k, r)
    assert torch.allclose(delta, memit_delta(k, r, cov, 7.0), atol=1e-10)


def test_rlsedit_on_a_model(model, tok):
    """On the tiny Llama: ``absolute`` with λ = 0, μ = 1 is MEMIT on the first batch (same values); the
    state after two batches holds (M_0 + Σ K Kᵀ)⁻¹ of the keys each solve used; without ``rls_memory``
    it stays P_0; ``delta`` subtracts the layer's own output W k from the residual."""
    spec = spec_for(model)
    stats = random_stats(spec, [1])
    common = {"layers": [1], "v_num_grad_steps": 4, "v_lr": 0.5, "mom2_update_weight": 2.0}
    name = spec.rewrite_name(1)
    memit = compute_deltas(
        "memit", model, tok, REQUESTS[:2], load_hparams("memit", None, **common), stats, templates=TEMPLATES
    )
    hp = load_hparams("rlsedit", None, **common, rls_target="absolute")
    rls = compute_deltas("rlsedit", model, tok, REQUESTS[:2], hp, stats, templates=TEMPLATES, values=memit.values)
    assert torch.allclose(rls.deltas[name], memit.deltas[name], atol=1e-5, rtol=1e-4)

    kw = {"batch_size": 2, "mode": "sequential-batch", "templates": TEMPLATES, "keep_deltas": True}
    st = EditState()
    out = run_schedule(model, tok, REQUESTS, "rlsedit", hp, stats, state=st, **kw)
    out.restore(model)
    k_all = torch.cat([r.keys[1] for r in out.results], 1).double()
    want = 2.0 * stats[1].double() + k_all @ k_all.T
    assert st.batches == 2 and torch.allclose(st.rls_inverse[1] @ want, torch.eye(want.shape[0], **F64), atol=1e-6)

    d = load_hparams("rlsedit", None, **common, rls_target="delta", rls_memory=False)
    st = EditState()
    res = compute_deltas(
        "rlsedit", model, tok, REQUESTS[:2], d, stats, templates=TEMPLATES, state=st, values=memit.values
    )
    p0 = st.rls_inverse[1].clone()
    w = weight(model, spec, 1).double()
    k = res.keys[1].double()
    resid = (memit.values.double().T - _block_out(model, tok, spec, memit)) - w @ k
    want, _ = rls_step(p0, k, resid)
    assert torch.allclose(res.deltas[name].double(), want, atol=1e-5)
    from editors.algorithms import rlsedit

    rlsedit.update_state(model, tok, REQUESTS[:2], res, d, st, spec, TEMPLATES)
    assert torch.equal(st.rls_inverse[1], p0)


def _block_out(model, tok, spec, result):
    """h: block L's output at the subject's last token on the bare prompt, [d_model, n] float64."""
    from editors.targets import reprs_at_subject

    blk = spec.block_name(1)
    reps = reprs_at_subject(model, tok, REQUESTS[:2], ["{}"], [(blk, "out")])
    return reps[(blk, "out")][:, 0].double().T


# ----------------------------------------------------------------------------------------------------
# UltraEdit


@pytest.mark.parametrize("n", [3, 20])
def test_ultraedit_solve_is_the_ridge_closed_form(n):
    """Both the dual (N ≤ d_in) and primal paths give ΔWᵀ = (KᵀK + I)⁻¹KᵀV."""
    k, v = randn(n, 8, seed=6), randn(n, 5, seed=7)
    want = torch.linalg.inv(k.T @ k + torch.eye(8, **F64)) @ k.T @ v
    assert torch.allclose(ultraedit_delta(k, v, 1.0), want.T, atol=1e-10)


def test_running_statistics_follow_the_authors_update_by_hand():
    """x₁ = [1, 3], x₂ = [2, 4, 6]: mean 2 then 3.2; the authors' M2 adds m·var (not (m − 1)·var):
    4 after x₁, 4 + 3·4 + 2·3·2²/5 = 20.8 after x₂ (the exact sum of squared deviations is 14.8)."""
    r = RunningStats.zeros(1)
    r.update(torch.tensor([[1.0], [3.0]]))
    assert float(r.mean) == 2.0 and float(r.m2) == 4.0 and float(r.n) == 2.0
    r.update(torch.tensor([[2.0], [4.0], [6.0]]))
    assert math.isclose(float(r.mean), 3.2, rel_tol=1e-6) and math.isclose(float(r.m2), 20.8, rel_tol=1e-6)
    assert math.isclose(float(r.std), math.sqrt(20.8 / (4 + torch.finfo(torch.float32).eps)), rel_tol=1e-6)
    with pytest.raises(ValueError, match="at least 2 rows"):
        r.update(torch.tensor([[1.0]]))


def test_ultraedit_captures_keys_and_output_gradients(model, tok):
    """The captured gradient equals dL/d(output) taken another way (a zero added to the output), the
    keys equal the module's input, at exactly the answer positions; no weight changes, no .grad."""
    spec = spec_for(model)
    names = [spec.rewrite_name(1), spec.rewrite_name(2)]
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    keys, grads = ultraedit.capture(model, tok, names, REQUESTS[:2], torch.device("cpu"))
    assert all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    seqs, positions = ultraedit.teacher_forced_rows(tok, REQUESTS[:2])
    from editors.requests import pad_id, pad_right, target_ids

    ids, mask = pad_right(seqs, pad_id(tok), torch.device("cpu"))
    zeros = {n: None for n in names}

    def add_zero(n):
        def f(out):
            zeros[n] = torch.zeros_like(out, requires_grad=True)
            return out + zeros[n]

        return f

    with hooks(model, inputs=names, edit_output={n: add_zero(n) for n in names}) as st, torch.enable_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        lps = []
        for i, (pos, r) in enumerate(zip(positions, REQUESTS[:2], strict=True)):
            for p, t in zip(pos, target_ids(tok, r.target_new), strict=True):
                lps.append(-logits[i, p].log_softmax(-1)[t])
        loss = torch.stack(lps).mean()
        g = torch.autograd.grad(loss, [zeros[n] for n in names])
    for n, gn in zip(names, g, strict=True):
        rows = [(i, p) for i, pos in enumerate(positions) for p in pos]
        want_g = torch.stack([gn[i, p] for i, p in rows])
        want_k = torch.stack([st[f"in:{n}"][i, p] for i, p in rows]).detach()
        assert torch.allclose(grads[n], want_g, atol=1e-7) and torch.equal(keys[n], want_k)


def test_ultraedit_lowers_the_answer_loss_and_its_state_restores_bit_identically(model, tok):
    """A batch's update lowers the edited answers' loss; a sequence stopped after batch 1 whose state
    went through torch.save/torch.load gives batch 2 the same deltas bit for bit."""
    spec = spec_for(model)
    hp = load_hparams("ultraedit", None, layers=[1, 2], ultra_lr=1e-2, ultra_sub_batch=2)
    b1, b2 = REQUESTS[:3], REQUESTS[1:]

    def answer_loss():
        return float(_loss(model, tok, b1))

    before = answer_loss()
    state = EditState()
    r1 = compute_deltas("ultraedit", model, tok, b1, hp, None, state=state)
    backup = apply_deltas(model, spec, r1.deltas)
    assert answer_loss() < before
    buf = io.BytesIO()
    torch.save(state.state_dict(), buf)
    r2 = compute_deltas("ultraedit", model, tok, b2, hp, None, state=state)
    buf.seek(0)
    restored = EditState.from_state_dict(torch.load(buf, weights_only=True))
    r2b = compute_deltas("ultraedit", model, tok, b2, hp, None, state=restored)
    assert r2.deltas.keys() == r2b.deltas.keys()
    assert all(torch.equal(r2.deltas[n], r2b.deltas[n]) for n in r2.deltas)
    sd, sdb = state.state_dict()["running"], restored.state_dict()["running"]
    assert all(torch.equal(sd[k][f], sdb[k][f]) for k in sd for f in sd[k])
    restore(model, backup)


def _loss(model, tok, requests):
    from editors.requests import pad_id, pad_right, target_ids

    seqs, positions = ultraedit.teacher_forced_rows(tok, requests)
    ids, mask = pad_right(seqs, pad_id(tok), torch.device("cpu"))
    with torch.no_grad():
        lp = model(input_ids=ids, attention_mask=mask).logits.log_softmax(-1)
    return torch.stack(
        [
            -lp[i, p, t]
            for i, (pos, r) in enumerate(zip(positions, requests, strict=True))
            for p, t in zip(pos, target_ids(tok, r.target_new), strict=True)
        ]
    ).mean()


def test_edit_state_round_trips_every_field():
    st = EditState(batches=3, value_norm_anchor=1.5)
    st.add_keys(1, randn(4, 2, seed=8).float())
    st.projectors[1] = randn(4, 4, seed=9)
    st.rls_inverse[1] = randn(4, 4, seed=10)
    st.running[(4, 3)] = RunningStats.zeros(7)
    st.running[(4, 3)].update(randn(5, 7, seed=11).float())
    buf = io.BytesIO()
    torch.save(st.state_dict(), buf)
    buf.seek(0)
    back = EditState.from_state_dict(torch.load(buf, weights_only=True))
    assert (back.batches, back.value_norm_anchor) == (3, 1.5)
    assert torch.equal(back.prev_keys[1], st.prev_keys[1]) and torch.equal(back.rls_inverse[1], st.rls_inverse[1])
    assert torch.equal(back.projectors[1], st.projectors[1])
    assert all(
        torch.equal(getattr(back.running[(4, 3)], f), getattr(st.running[(4, 3)], f))
        for f in ("n", "mean", "m2", "std")
    )


# ----------------------------------------------------------------------------------------------------
# Settings checked before any model work


@pytest.mark.parametrize(
    ("alg", "overrides", "field"),
    [
        ("alphaedit", {"beta_hse": 1.5}, "beta_hse"),
        ("alphaedit", {"beta_hse": -0.1}, "beta_hse"),
        ("memit", {"beta_hse": 0.5, "sphere_alpha": -0.2}, "sphere_alpha"),
        ("rome", {"beta_hse": 0.5}, "beta_hse"),
        ("rlsedit", {"lambda_reg": -1.0}, "lambda_reg"),
        ("rlsedit", {"lambda_reg": 0.0, "mu_reg": 0.0}, "mu_reg"),
        ("rlsedit", {"rls_target": "sideways"}, "rls_target"),
        ("rlsedit", {"add_prev_edits": True}, "add_prev_edits"),
        ("ultraedit", {"ultra_lr": 0.0}, "ultra_lr"),
        ("ultraedit", {"ultra_sub_batch": 0}, "ultra_sub_batch"),
        ("ultraedit", {"nas": True}, "nas"),
    ],
)
def test_out_of_range_settings_name_their_field(alg, overrides, field):
    with pytest.raises(ConfigError, match=field):
        load_hparams(alg, "smollm2-135m", **overrides)


def test_ultraedit_edits_the_named_module_of_each_layer_with_one_normaliser_per_shape(model, tok):
    """``ultra_modules`` as the authors' Llama-3-8B setting (gate_proj, then up_proj): each named module
    gets ΔWᵀ = (KᵀK + I)⁻¹KᵀV from its own keys and gradients, normalised by ONE running statistic that
    both modules feed (same shape), in module order per sub-batch, computed here by hand; naming the
    output projection explicitly is bit-identical to the default."""
    spec = spec_for(model)
    reqs = REQUESTS[:3]
    hp = load_hparams(
        "ultraedit",
        None,
        layers=[1, 2],
        ultra_modules=["mlp.gate_proj", "mlp.up_proj"],
        ultra_lr=1e-2,
        ultra_sub_batch=3,
    )
    state = EditState()
    res = compute_deltas("ultraedit", model, tok, reqs, hp, None, state=state)
    names = ["model.layers.1.mlp.gate_proj", "model.layers.2.mlp.up_proj"]
    assert list(res.deltas) == names
    d_ff = model.config.intermediate_size
    assert all(res.deltas[n].shape == (d_ff, spec.d_model) for n in names)
    assert list(state.running) == [(spec.d_model, d_ff)]  # one normaliser for both

    fed = [len(x) for x in ultraedit.teacher_forced_rows(tok, reqs)[0]]
    order = [reqs[i] for i in sorted(range(3), key=lambda i: fed[i], reverse=True)]
    k, g = ultraedit.capture(model, tok, names, order, torch.device("cpu"))
    stats = RunningStats.zeros(spec.d_model + d_ff)
    for n in names:
        stats.update(torch.cat([k[n], g[n]], dim=1))
    assert torch.equal(stats.mean, state.running[(spec.d_model, d_ff)].mean)
    for n in names:
        z = stats.normalise(torch.cat([k[n], g[n]], dim=1))
        k_hat, g_hat = z[:, : spec.d_model], z[:, spec.d_model :]
        v = -1e-2 * (k_hat * k_hat).sum(-1, keepdim=True) * g_hat
        want = torch.linalg.solve(
            k[n].double().T @ k[n].double() + torch.eye(spec.d_model, dtype=torch.float64), k[n].double().T @ v.double()
        )
        torch.testing.assert_close(res.deltas[n].double(), want.T, rtol=1e-5, atol=1e-9)

    default = load_hparams("ultraedit", None, layers=[1, 2], ultra_lr=1e-2, ultra_sub_batch=3)
    named = load_hparams(
        "ultraedit", None, layers=[1, 2], ultra_modules=["mlp.down_proj"], ultra_lr=1e-2, ultra_sub_batch=3
    )
    a = compute_deltas("ultraedit", model, tok, reqs, default, None, state=EditState())
    b = compute_deltas("ultraedit", model, tok, reqs, named, None, state=EditState())
    assert a.deltas.keys() == b.deltas.keys() and all(torch.equal(a.deltas[n], b.deltas[n]) for n in a.deltas)


@pytest.mark.parametrize(
    ("modules", "message"),
    [
        (["mlp.up_proj", "mlp.gate_proj", "mlp.down_proj"], "one per layer of layers \\(2\\), got 3"),
        (["mlp.{}.up_proj"], "not a module path"),
        (["mlp.nothing"], "model.layers.1.mlp.nothing is not a module"),
        (["mlp"], "model.layers.1.mlp is not a module with a weight"),
    ],
)
def test_ultraedit_modules_it_cannot_edit_are_one_error_naming_the_field(model, tok, modules, message):
    state = EditState()
    with pytest.raises(ValueError, match=message) as e:
        hp = load_hparams("ultraedit", None, layers=[1, 2], ultra_modules=modules)
        compute_deltas("ultraedit", model, tok, REQUESTS[:3], hp, None, state=state)
    assert "ultra_modules" in str(e.value) and state.running == {}
    if modules == ["mlp.nothing"]:  # a schedule refuses it before its first batch, the model untouched
        snap = {k: v.clone() for k, v in model.state_dict().items()}
        hp = load_hparams("ultraedit", None, layers=[1, 2], ultra_modules=modules)
        with pytest.raises(ValueError, match="ultra_modules"):
            run_schedule(model, tok, REQUESTS[:3], "ultraedit", hp, None, batch_size=3, mode="sequential-batch")
        assert all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())


def test_ultraedit_refuses_a_sub_batch_with_one_answer_token(model, tok):
    """One request with a one-token answer gives one row: its variance is undefined (the authors' code
    would write NaN into the statistics for good); here it is an error and the state is untouched."""
    from editors import EditRequest

    hp = load_hparams("ultraedit", None, layers=[1], ultra_sub_batch=1)
    one = EditRequest("{} is in", "Paris", "the", "Spain")
    from editors.requests import target_ids

    assert len(target_ids(tok, one.target_new)) == 1
    state = EditState()
    with pytest.raises(ValueError, match="at least 2 rows"):
        compute_deltas("ultraedit", model, tok, [one], hp, None, state=state)
    assert state.running == {}
