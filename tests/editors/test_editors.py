"""The editing engine on a tiny random Llama (and GPT-2) on CPU: invariants, equivalences, errors."""

from __future__ import annotations

import pytest
import torch

from editors import (
    ALGORITHMS,
    ConfigError,
    EditRequest,
    EditState,
    apply_deltas,
    compute_deltas,
    load_hparams,
    restore,
    run_schedule,
    spec_for,
)
from editors.model import ModelSpecError, weight
from editors.requests import RequestError, fill, target_ids, token_at_char
from editors.solvers import NonFiniteSolveError
from editors.targets import ValueHParams, compute_keys, optimize_values, reprs_at_subject
from editors.templates import context_templates

REQUESTS = [
    EditRequest("{} is located in", "The Eiffel Tower", "Rome", "Paris", case_id=0),
    EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English", "French", case_id=1),
    EditRequest("{} plays the", "Toko Yasuda", "piano keyboard", "guitar", case_id=2),
    EditRequest("The capital of {} is", "Italy", "Berlin", "Rome", case_id=3),
]
TEMPLATES = (("{}",), ("Once upon a time. {}", "Because it rained. {}"))
FAST = {"v_num_grad_steps": 6, "v_lr": 0.5}


def random_stats(spec, layers, seed=0, n=400):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer in layers:
        a = torch.randn(spec.d_key, n, generator=g)
        out[layer] = a @ a.T / n
    return out


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_identical(model, snap):
    for k, v in model.state_dict().items():
        assert torch.equal(v, snap[k]), f"{k} changed"


def hparams(alg, **kw):
    base = {"layers": [1, 2] if alg in ("memit", "alphaedit") else [1], **FAST}
    base.update(kw)
    return load_hparams(alg, None, **base)


@pytest.mark.parametrize("alg", sorted(ALGORITHMS))
def test_compute_leaves_every_weight_bit_identical(alg, model, tok):
    spec = spec_for(model)
    snap = snapshot(model)
    res = compute_deltas(alg, model, tok, REQUESTS[:3], hparams(alg), random_stats(spec, range(4)), templates=TEMPLATES)
    assert_identical(model, snap)
    assert res.deltas and all(torch.isfinite(d).all() for d in res.deltas.values())
    assert all(d.shape == (spec.d_model, spec.d_key) for d in res.deltas.values())
    assert all(not p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())


def test_apply_and_restore_are_exact(model, tok):
    spec = spec_for(model)
    snap = snapshot(model)
    res = compute_deltas(
        "memit", model, tok, REQUESTS[:2], hparams("memit"), random_stats(spec, [1, 2]), templates=TEMPLATES
    )
    backup = apply_deltas(model, spec, res.deltas)
    w1 = weight(model, spec, 1)
    assert torch.equal(w1, snap["model.layers.1.mlp.down_proj.weight"] + res.deltas["model.layers.1.mlp.down_proj"])
    restore(model, backup)
    assert_identical(model, snap)


@pytest.mark.parametrize("bos", [False, True])
def test_batched_value_optimisation_matches_one_at_a_time(bos, tok, tok_bos):
    from tests.conftest import make_model

    t = tok_bos if bos else tok
    model = make_model(len(t), seed=3)
    spec = spec_for(model)
    tpl = ("{}", "Once upon a time. {}")
    # An early-stop threshold between the requests' losses: some stop early, some run to the end.
    traj = optimize_values(model, t, spec, 1, REQUESTS, tpl, ValueHParams(v_num_grad_steps=4, early_stop_loss=0))
    hp = ValueHParams(v_num_grad_steps=8, v_lr=0.5, early_stop_loss=float(traj.loss.median()))
    batched = optimize_values(model, t, spec, 1, REQUESTS, tpl, hp)
    for i, r in enumerate(REQUESTS):
        single = optimize_values(model, t, spec, 1, [r], tpl, hp)
        assert int(single.steps[0]) == int(batched.steps[i])
        torch.testing.assert_close(batched.values[i], single.values[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(batched.loss[i], single.loss[0], rtol=1e-4, atol=1e-5)
    assert len(set(batched.steps.tolist())) > 1, "the test should mix early-stopped and running requests"
    # Chunking the batch changes nothing either.
    chunked = optimize_values(model, t, spec, 1, REQUESTS, tpl, hp, max_requests=3)
    torch.testing.assert_close(chunked.values, batched.values, rtol=1e-4, atol=1e-5)


def test_value_optimisation_lowers_the_loss_and_respects_the_clamp(model, tok):
    spec = spec_for(model)
    hp = ValueHParams(v_num_grad_steps=15, v_lr=0.5, clamp_norm_factor=0.5, early_stop_loss=0.0)
    first = optimize_values(model, tok, spec, 1, REQUESTS[:2], ("{}",), ValueHParams(v_num_grad_steps=1))
    out = optimize_values(model, tok, spec, 1, REQUESTS[:2], ("{}",), hp)
    assert (out.loss < first.loss).all()
    delta_norm = (out.values - out.init).norm(dim=1)
    assert (delta_norm <= 0.5 * out.init.norm(dim=1) * (1 + 1e-5)).all()
    torch.testing.assert_close(out.init, first.init)


def test_keys_are_the_projection_input_at_the_subject_last_token(model, tok_bos):
    from tests.conftest import make_model

    model = make_model(len(tok_bos))
    spec = spec_for(model)
    r = REQUESTS[0]
    keys = compute_keys(model, tok_bos, spec, 2, [r], TEMPLATES)  # [d_key, 1]
    # Independent: plain hook on down_proj over each prompt separately; group means then their mean.
    feats = []
    h = model.model.layers[2].mlp.down_proj.register_forward_pre_hook(lambda m, a: feats.append(a[0]))
    per = []
    for tpl in ("{}", "Once upon a time. {}", "Because it rained. {}"):
        text, _end = fill(tpl.replace("{}", r.template), r.subject)
        enc = tok_bos(text, return_tensors="pt")
        model(**enc)
        ids = enc["input_ids"][0].tolist()
        sub = tok_bos(" Tower", add_special_tokens=False)["input_ids"]
        pos = max(i for i in range(len(ids)) if ids[i : i + len(sub)] == sub) + len(sub) - 1
        per.append(feats[-1][0, pos])
    h.remove()
    expected = (per[0] + (per[1] + per[2]) / 2) / 2
    torch.testing.assert_close(keys[:, 0], expected, rtol=1e-5, atol=1e-6)


def test_subject_position_with_bos_and_prefix(tok_bos):
    text, end = fill("Once upon a time. {} is located in", "The Eiffel Tower")
    idx = token_at_char(tok_bos, text, end)
    ids = tok_bos(text)["input_ids"]
    assert ids[0] == tok_bos.bos_token_id
    assert tok_bos.decode(ids[: idx + 1], skip_special_tokens=True).endswith("Tower")
    assert not tok_bos.decode(ids[: idx + 2], skip_special_tokens=True).endswith("Tower")
    assert tok_bos.bos_token_id not in target_ids(tok_bos, "Paris")


def test_memit_single_layer_small_lambda_writes_the_values(model, tok):
    spec = spec_for(model)
    hp = hparams("memit", layers=[2], mom2_update_weight=1e-6)
    res = compute_deltas("memit", model, tok, REQUESTS[:2], hp, random_stats(spec, [2]), templates=TEMPLATES)
    keys = res.keys[2]
    before = reprs_at_subject(model, tok, REQUESTS[:2], ["{}"], [("model.layers.2", "out")])
    apply_deltas(model, spec, res.deltas)
    after = reprs_at_subject(model, tok, REQUESTS[:2], ["{}"], [("model.layers.2", "out")])
    delta_out = (after[("model.layers.2", "out")] - before[("model.layers.2", "out")])[:, 0]
    target = res.values - before[("model.layers.2", "out")][:, 0]
    # With λ -> 0 the averaged keys map exactly onto the residuals; the bare-prompt key is close to it.
    torch.testing.assert_close(res.deltas[spec.rewrite_name(2)] @ keys, target.T, rtol=1e-3, atol=1e-4)
    assert torch.nn.functional.cosine_similarity(delta_out, target, dim=1).min() > 0.5


def test_emmet_meets_its_constraints_and_equals_rome_for_one_request(model, tok):
    spec = spec_for(model)
    stats = random_stats(spec, [1])
    hp = hparams("emmet", emmet_lambda=0.0)
    res = compute_deltas("emmet", model, tok, REQUESTS[:3], hp, stats, templates=TEMPLATES)
    w = weight(model, spec, 1).double()
    keys = res.keys[1].double()
    # Block-1 output = W k + (residual stream): the edited keys' outputs move by exactly R.
    resid_needed = res.deltas[spec.rewrite_name(1)].double() @ keys
    cur = reprs_at_subject(model, tok, REQUESTS[:3], ["{}"], [("model.layers.1", "out")])
    target = (res.values.double() - cur[("model.layers.1", "out")][:, 0].double()).T
    torch.testing.assert_close(resid_needed, target, rtol=1e-4, atol=1e-5)
    assert w.shape == (spec.d_model, spec.d_key)
    # B = 1: EMMET == ROME with consistent keys (same templates, same block-output values).
    one = compute_deltas("emmet", model, tok, REQUESTS[:1], hp, stats, templates=TEMPLATES)
    from editors.solvers import rome_delta

    r = (one.values.double() - cur[("model.layers.1", "out")][:1, 0].double())[0]
    expected = rome_delta(one.keys[1][:, 0].double(), r, stats[1].double())
    torch.testing.assert_close(one.deltas[spec.rewrite_name(1)].double(), expected, rtol=1e-5, atol=1e-7)


def test_rome_reference_and_consistent_keys(model, tok):
    spec = spec_for(model)
    stats = random_stats(spec, [1])
    tpl = (("{}", "Once upon a time. {}", "Because it rained. {}"),)
    ref = compute_deltas("rome", model, tok, REQUESTS[:1], hparams("rome"), stats, templates=tpl)
    con = compute_deltas("rome", model, tok, REQUESTS[:1], hparams("rome", consistent_keys=True), stats, templates=tpl)
    name = spec.rewrite_name(1)
    reps = reprs_at_subject(model, tok, REQUESTS[:1], tpl[0], [(name, "in"), (name, "out")])
    k_all, out_all = reps[(name, "in")][0].double(), reps[(name, "out")][0].double()
    k_star = k_all.mean(0)
    v = ref.values[0].double()
    # Reference: the bare key gets v* exactly; r-ROME: the averaged key gets v* − mean output + W k*.
    torch.testing.assert_close(ref.deltas[name].double() @ k_all[0], v - out_all[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(con.deltas[name].double() @ k_star, v - out_all.mean(0), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(ref.deltas[name], con.deltas[name])


def test_alphaedit_preserves_keys_outside_the_null_space_and_accumulates(model, tok):
    spec = spec_for(model)
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(spec.d_key, spec.d_key, generator=g, dtype=torch.float64))
    evals = torch.cat([torch.full((30,), 1.0), torch.full((spec.d_key - 30,), 1e-4)]).double()
    c = q @ torch.diag(evals) @ q.T
    stats = {1: c, 2: c}
    state = EditState()
    hp = hparams("alphaedit", L2=1.0)
    res = compute_deltas("alphaedit", model, tok, REQUESTS[:2], hp, stats, templates=TEMPLATES, state=state)
    k0 = q[:, :30] @ torch.randn(30, 50, generator=g, dtype=torch.float64)
    for d in res.deltas.values():
        assert (d.double() @ k0).abs().max() < 1e-4 * d.double().norm()
        assert d.norm() > 0
    assert set(state.projectors) == {1, 2}

    events = []
    out = run_schedule(
        model,
        tok,
        REQUESTS,
        "alphaedit",
        hp,
        stats,
        batch_size=2,
        mode="sequential-batch",
        templates=TEMPLATES,
        callback=events.append,
    )
    assert [e.applied for e in events] == [2, 4]
    out.restore(model)


@pytest.mark.parametrize("mode", ["batch", "sequential-batch"])
def test_schedule_restores_between_batches_in_batch_mode(mode, model, tok):
    spec = spec_for(model)
    snap = snapshot(model)
    name = spec.rewrite_name(1)
    w0 = snap[name + ".weight"]
    seen = []

    def check(ev):
        w = weight(model, spec, 1)
        seen.append((ev.applied, w.clone(), ev.result.deltas[name].clone()))

    stats = random_stats(spec, [1])
    hp = hparams("memit", layers=[1])
    kw = {"templates": TEMPLATES, "callback": check, "keep_deltas": True}
    out = run_schedule(model, tok, REQUESTS, "memit", hp, stats, batch_size=2, mode=mode, **kw)
    if mode == "batch":
        assert [a for a, _, _ in seen] == [2, 2]
        for _, w, d in seen:  # each batch sits on the unedited weights
            assert torch.equal(w, w0 + d)
        assert_identical(model, snap)
    else:
        assert [a for a, _, _ in seen] == [2, 4]
        assert torch.equal(seen[1][1], seen[0][1] + seen[1][2])  # batch 2 is on top of batch 1
        assert not torch.equal(weight(model, spec, 1), w0)
        out.restore(model)
        assert_identical(model, snap)


def test_encore_add_prev_edits_uses_earlier_keys(model, tok):
    spec = spec_for(model)
    stats = random_stats(spec, [1])
    state = EditState()
    state.add_keys(1, torch.randn(spec.d_key, 5))
    kw = {"templates": TEMPLATES, "state": state}
    hp = hparams("memit", layers=[1], mom2_update_weight=1.0)
    with_prev = compute_deltas(
        "memit",
        model,
        tok,
        REQUESTS[:1],
        hparams("memit", layers=[1], mom2_update_weight=1.0, add_prev_edits=True),
        stats,
        **kw,
    )
    without = compute_deltas("memit", model, tok, REQUESTS[:1], hp, stats, **kw)
    name = spec.rewrite_name(1)
    assert (with_prev.deltas[name] - without.deltas[name]).norm() > 1e-3 * without.deltas[name].norm()
    # Same keys and residual; the only difference is K_p K_pᵀ in the preservation term.
    from editors.solvers import memit_delta

    k = without.keys[1].double()
    resid = without.deltas[name].double() @ (stats[1].double() + k @ k.T)  # R Kᵀ, recovered
    r = torch.linalg.lstsq(k, resid.T).solution.T
    expected = memit_delta(k, r, stats[1], 1.0, prev_keys=state.prev_keys[1])
    torch.testing.assert_close(with_prev.deltas[name].double(), expected, rtol=1e-3, atol=1e-6)


def test_template_generation_is_seeded_and_leaves_rng_alone(model, tok):
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a = context_templates(model, tok, "memit", seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = context_templates(model, tok, "memit", seed=5)
    c = context_templates(model, tok, "memit", seed=6)
    assert a == b and a != c
    assert a[0] == ("{}",) and len(a[1]) == 5 and all(t.endswith(". {}") for t in a[1])
    rome = context_templates(model, tok, "rome", seed=0)
    assert len(rome) == 1 and len(rome[0]) == 21 and rome[0][0] == "{}"


# ---------------------------------------------------------------------------------------------------
# Bad input fails early with a message that names the field


def test_bad_inputs_name_the_field(model, tok):
    spec = spec_for(model)
    stats = random_stats(spec, [1])
    with pytest.raises(ConfigError, match="algorithm"):
        compute_deltas("mend", model, tok, REQUESTS, hparams("memit", layers=[1]), stats)
    with pytest.raises(ValueError, match="layers"):
        compute_deltas("memit", model, tok, REQUESTS, hparams("memit", layers=[7]), stats, templates=TEMPLATES)
    with pytest.raises(RequestError, match="subject"):
        bad = [EditRequest("The tower is in", "Eiffel", "Rome", case_id=9)]
        compute_deltas("memit", model, tok, bad, hparams("memit", layers=[1]), stats, templates=TEMPLATES)
    with pytest.raises(RequestError, match="target_new"):
        bad = [EditRequest("{} is in", "Paris", "   ", case_id=9)]
        compute_deltas("memit", model, tok, bad, hparams("memit", layers=[1]), stats, templates=TEMPLATES)
    wrong = {1: torch.eye(spec.d_key + 4)}
    with pytest.raises(ValueError, match=r"stats: .*another model"):
        compute_deltas("memit", model, tok, REQUESTS, hparams("memit", layers=[1]), wrong, templates=TEMPLATES)
    with pytest.raises(ValueError, match="stats: no second-moment"):
        compute_deltas("memit", model, tok, REQUESTS, hparams("memit", layers=[1]), {}, templates=TEMPLATES)
    nan = {1: torch.full((spec.d_key, spec.d_key), float("nan"))}
    with pytest.raises(ValueError, match="NaN"):
        compute_deltas("emmet", model, tok, REQUESTS, hparams("emmet"), nan, templates=TEMPLATES)
    with pytest.raises(ValueError, match="batch_size"):
        run_schedule(model, tok, REQUESTS, "memit", hparams("memit", layers=[1]), stats, batch_size=5)
    with pytest.raises(ValueError, match="mode"):
        run_schedule(model, tok, REQUESTS, "memit", hparams("memit", layers=[1]), stats, batch_size=1, mode="online")


def test_non_finite_solve_is_an_error(model, tok):
    spec = spec_for(model)
    stats = {1: torch.full((spec.d_key, spec.d_key), 1e308, dtype=torch.float64)}
    with pytest.raises((NonFiniteSolveError, ValueError)):
        compute_deltas("memit", model, tok, REQUESTS[:1], hparams("memit", layers=[1]), stats, templates=TEMPLATES)


def test_hparams_are_strict_typed_and_presets_load():
    hp = load_hparams("memit", "llama3-8b")
    assert hp.layers == (1,) and isinstance(hp.mom2_update_weight, float)
    assert load_hparams("emmet", {"layers": [3], "mom2_update_weight": "5e-1"}).mom2_update_weight == 0.5
    with pytest.raises(ConfigError, match="mom2_update_wieght"):
        load_hparams("memit", "smollm2-135m", mom2_update_wieght=1.0)
    with pytest.raises(ConfigError, match="layers"):
        load_hparams("rome", None, layers=[1, 2])
    with pytest.raises(ConfigError, match="no preset"):
        load_hparams("memit", "gpt-7")
    for alg in ALGORITHMS:
        for preset in ("llama3-8b", "smollm2-135m"):
            assert load_hparams(alg, preset).layers
    with pytest.raises(Exception):  # noqa: B017 - frozen
        hp.layers = (2,)


# ---------------------------------------------------------------------------------------------------
# Other architectures


def tiny_gpt2(vocab):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=3, n_head=4, n_positions=128)
    return GPT2LMHeadModel(cfg).eval().requires_grad_(False)


def test_gpt2_conv1d_is_handled_transposed(tok):
    model = tiny_gpt2(len(tok))
    spec = spec_for(model)
    assert spec.weight_transposed and spec.d_key == 128 and spec.rewrite_name(1) == "transformer.h.1.mlp.c_proj"
    snap = snapshot(model)
    res = compute_deltas(
        "emmet",
        model,
        tok,
        REQUESTS[:2],
        hparams("emmet", emmet_lambda=0.0),
        random_stats(spec, [1]),
        templates=TEMPLATES,
    )
    assert_identical(model, snap)
    name = spec.rewrite_name(1)
    backup = apply_deltas(model, spec, res.deltas)
    assert torch.equal(model.transformer.h[1].mlp.c_proj.weight, snap[name + ".weight"] + res.deltas[name].T)
    restore(model, backup)
    assert_identical(model, snap)


def test_spec_for_other_llama_family_and_unknown(tok):
    from transformers import (
        GPTJConfig,
        GPTJForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    small = {
        "vocab_size": 64,
        "hidden_size": 16,
        "intermediate_size": 24,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
    }
    for cfg_cls, model_cls in ((MistralConfig, MistralForCausalLM), (Qwen2Config, Qwen2ForCausalLM)):
        spec = spec_for(model_cls(cfg_cls(**small)))
        assert (spec.n_layers, spec.d_model, spec.d_key) == (2, 16, 24)
    gptj = GPTJForCausalLM(GPTJConfig(vocab_size=64, n_embd=16, n_layer=2, n_head=2, rotary_dim=4))
    spec = spec_for(gptj)
    assert spec.rewrite_name(0) == "transformer.h.0.mlp.fc_out" and spec.d_key == 64
    model = tiny_gpt2(64)
    model.config.model_type = "falcon"
    with pytest.raises(ModelSpecError, match="ModelSpec"):
        spec_for(model)


@pytest.mark.parametrize("bos", [False, True])
def test_prefix_reuse_gives_the_same_values(bos, tok, tok_bos):
    """Caching every row's tokens before the lookup token changes nothing, including rows whose subject
    is the very first token (an empty prefix) and rows of different lengths."""
    from tests.conftest import make_model

    t = tok_bos if bos else tok
    model = make_model(len(t), seed=5)
    spec = spec_for(model)
    reqs = [*REQUESTS, EditRequest("{} is a letter of", "A", "Greek", case_id=9)]
    assert t("A is a letter of")["input_ids"][: 2 if bos else 1][-1] == t("A", add_special_tokens=False)["input_ids"][0]
    hp = ValueHParams(v_num_grad_steps=6, early_stop_loss=6.0)
    tpl = ("{}", "Once upon a time. {}", "I. {}")
    full = optimize_values(model, t, spec, 2, reqs, tpl, hp, reuse_prefix=False)
    cached = optimize_values(model, t, spec, 2, reqs, tpl, hp, reuse_prefix=True)
    torch.testing.assert_close(cached.values, full.values, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cached.loss, full.loss, rtol=1e-5, atol=1e-6)
    assert cached.steps.tolist() == full.steps.tolist()
    rome_full = optimize_values(model, t, spec, 1, reqs[:2], tpl, hp, at="rewrite", reuse_prefix=False)
    rome_cached = optimize_values(model, t, spec, 1, reqs[:2], tpl, hp, at="rewrite")
    torch.testing.assert_close(rome_cached.values, rome_full.values, rtol=1e-5, atol=1e-6)
