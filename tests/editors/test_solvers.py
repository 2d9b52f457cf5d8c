"""Solvers against independent closed forms (numpy, explicit inverses, constrained least squares)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from editors.solvers import (
    NonFiniteSolveError,
    alphaedit_delta,
    emmet_delta,
    memit_delta,
    null_space_projector,
    rome_delta,
)

D_IN, D_OUT = 12, 7


def spd(n: int, seed: int, rank: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, rank or 3 * n, generator=g, dtype=torch.float64)
    return a @ a.T / a.shape[1]


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_rome_matches_numpy_and_hits_target():
    c, k, r = spd(D_IN, 0), rand(D_IN, seed=1), rand(D_OUT, seed=2)
    delta = rome_delta(k, r, c)
    cn, kn, rn = c.numpy(), k.numpy(), r.numpy()
    cik = np.linalg.inv(cn) @ kn
    expected = np.outer(rn, cik) / (kn @ cik)
    np.testing.assert_allclose(delta.numpy(), expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose((delta @ k).numpy(), rn, rtol=1e-10)  # (W + Δ) k = W k + r


def test_rome_left_key_and_identity_cov():
    c, k, ks, r = spd(D_IN, 0), rand(D_IN, seed=1), rand(D_IN, seed=3), rand(D_OUT, seed=2)
    delta = rome_delta(k, r, c, left_key=ks)
    cik = np.linalg.solve(c.numpy(), ks.numpy())
    np.testing.assert_allclose(delta.numpy(), np.outer(r.numpy(), cik) / (k.numpy() @ cik), rtol=1e-10)
    plain = rome_delta(k, r, None)
    np.testing.assert_allclose(plain.numpy(), np.outer(r.numpy(), k.numpy()) / (k.numpy() @ k.numpy()))


def test_memit_is_the_regularised_least_squares_minimiser():
    c, k, r, lam = spd(D_IN, 0), rand(D_IN, 5, seed=1), rand(D_OUT, 5, seed=2), 0.7
    delta = memit_delta(k, r, c, lam).numpy()
    # Independent: min_Δ λ·tr(Δ C Δᵀ) + ‖ΔK − R‖² as one stacked least-squares problem,
    # ‖Δ [√λ L, K] − [0, R]‖² with C = L Lᵀ, solved by numpy's lstsq.
    chol = np.linalg.cholesky(c.numpy())
    a = np.concatenate([np.sqrt(lam) * chol, k.numpy()], axis=1)  # [d_in, d_in + n]
    b = np.concatenate([np.zeros((D_OUT, D_IN)), r.numpy()], axis=1)
    expected = np.linalg.lstsq(a.T, b.T, rcond=None)[0].T
    np.testing.assert_allclose(delta, expected, rtol=1e-8, atol=1e-10)


def test_memit_update_vanishes_as_lambda_grows():
    c, k, r = spd(D_IN, 0), rand(D_IN, 5, seed=1), rand(D_OUT, 5, seed=2)
    base = memit_delta(k, r, c, 1.0).norm()
    norms = [memit_delta(k, r, c, lam).norm() / base for lam in (1e2, 1e4, 1e8)]
    assert norms[0] > norms[1] > norms[2]
    assert norms[2] < 1e-6


def test_memit_prev_keys_and_norm_lambda_enter_the_preservation_term():
    c, k, r, kp = spd(D_IN, 0), rand(D_IN, 3, seed=1), rand(D_OUT, 3, seed=2), rand(D_IN, 4, seed=4)
    got = memit_delta(k, r, c, 2.0, prev_keys=kp, norm_lambda=0.3).numpy()
    a = 2.0 * c.numpy() + 0.3 * np.eye(D_IN) + kp.numpy() @ kp.numpy().T + k.numpy() @ k.numpy().T
    np.testing.assert_allclose(got, r.numpy() @ k.numpy().T @ np.linalg.inv(a), rtol=1e-9)


def test_emmet_matches_paper_formula_and_meets_constraints():
    c, k, r, lam = spd(D_IN, 0), rand(D_IN, 4, seed=1), rand(D_OUT, 4, seed=2), 3.0
    cn, kn, rn = c.numpy(), k.numpy(), r.numpy()
    ci = np.linalg.inv(lam * cn)
    for mu in (0.5, 0.0):
        expected = rn @ np.linalg.inv(kn.T @ ci @ kn + mu * np.eye(4)) @ kn.T @ ci
        np.testing.assert_allclose(emmet_delta(k, r, c, lam, mu).numpy(), expected, rtol=1e-8)
    # μ -> 0: the equality constraints Δ K = R hold (Eq. 6), and ever more tightly.
    errs = [np.abs(emmet_delta(k, r, c, lam, mu).numpy() @ kn - rn).max() for mu in (1e-1, 1e-4, 1e-9)]
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-7


def test_emmet_is_the_minimum_preservation_cost_solution():
    c, k, r = spd(D_IN, 0), rand(D_IN, 4, seed=1), rand(D_OUT, 4, seed=2)
    delta = emmet_delta(k, r, c, 1.0, 0.0).numpy()
    cost = np.trace(delta @ c.numpy() @ delta.T)
    # Any other solution of Δ K = R differs by E with E K = 0; each such one costs more.
    q, _ = np.linalg.qr(k.numpy(), mode="complete")
    null = q[:, 4:]  # columns orthogonal to K's span
    rng = np.random.default_rng(0)
    for _ in range(5):
        other = delta + rng.normal(size=(D_OUT, null.shape[1])) @ null.T * 0.1
        np.testing.assert_allclose(other @ k.numpy(), r.numpy(), atol=1e-9)
        assert np.trace(other @ c.numpy() @ other.T) > cost


def test_emmet_with_ridge_is_memit_with_lambda_times_mu():
    # Push-through identity: Kᵀ(λμC + KKᵀ)⁻¹ = (μI + Kᵀ(λC)⁻¹K)⁻¹Kᵀ(λC)⁻¹, so EMMET's μ is MEMIT's λ
    # (times EMMET's own λ); the SmolLM2 μ sweep reproduces MEMIT's λ sweep metric for metric.
    c, k, r = spd(D_IN, 0), rand(D_IN, 5, seed=1), rand(D_OUT, 5, seed=2)
    for lam, mu in ((1.0, 100.0), (3.0, 0.5), (1e3, 1e-2)):
        torch.testing.assert_close(emmet_delta(k, r, c, lam, mu), memit_delta(k, r, c, lam * mu), rtol=1e-8, atol=1e-10)


def test_rome_equals_emmet_with_one_request():
    c, k, r = spd(D_IN, 0), rand(D_IN, seed=1), rand(D_OUT, seed=2)
    torch.testing.assert_close(rome_delta(k, r, c), emmet_delta(k[:, None], r[:, None], c, 5.0, 0.0))


def test_null_space_projector_and_alphaedit_preserve_null_space_keys():
    # C with a known spectrum: 5 large eigenvalues, 7 below the threshold.
    q, _ = torch.linalg.qr(rand(D_IN, D_IN, seed=7))
    evals = torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5] + [1e-4] * 7, dtype=torch.float64)
    c = q @ torch.diag(evals) @ q.T
    p = null_space_projector(c, 1e-2)
    torch.testing.assert_close(p @ p, p)  # a projector
    assert round(float(torch.trace(p))) == 7
    torch.testing.assert_close(p, q[:, 5:] @ q[:, 5:].T)
    k, r, kp = rand(D_IN, 3, seed=1), rand(D_OUT, 3, seed=2), rand(D_IN, 2, seed=3)
    delta = alphaedit_delta(k, r, p, kp, 0.5)
    # Preserved keys (the span of C's large eigenvectors) keep their outputs exactly.
    k0 = q[:, :5] @ rand(5, 20, seed=4)
    assert (delta @ k0).abs().max() < 1e-10
    # Independent formula (paper Eq. 14) with explicit inverses.
    pn, kn, rn, kpn = p.numpy(), k.numpy(), r.numpy(), kp.numpy()
    expected = rn @ kn.T @ pn @ np.linalg.inv(kpn @ kpn.T @ pn + kn @ kn.T @ pn + 0.5 * np.eye(D_IN))
    np.testing.assert_allclose(delta.numpy(), expected, rtol=1e-8, atol=1e-12)


def test_singular_system_falls_back_and_records_it():
    c, k = spd(D_IN, 0), rand(D_IN, 3, seed=1)
    k = torch.cat([k, k[:, :1]], dim=1)  # a repeated key: D = KᵀC⁻¹K is singular with μ = 0
    r = rand(D_OUT, 4, seed=2)
    info: dict = {}
    delta = emmet_delta(k, r, c, 1.0, 0.0, info=info)
    assert info["fallback"] is True and info["d_method"] == "pinv"
    assert torch.isfinite(delta).all()
    info = {}
    emmet_delta(k[:, :3], r[:, :3], c, 1.0, 0.0, info=info)
    assert info["fallback"] is False and info["method"] == "cholesky"


def test_rank_deficient_statistics_fall_back_to_pinv():
    c = spd(D_IN, 0, rank=4)  # fewer corpus tokens than the key width
    info: dict = {}
    delta = rome_delta(rand(D_IN, seed=1), rand(D_OUT, seed=2), c, info=info)
    assert info["fallback"] is True and torch.isfinite(delta).all()


def test_non_finite_inputs_are_rejected():
    c, k, r = spd(D_IN, 0), rand(D_IN, 2, seed=1), rand(D_OUT, 2, seed=2)
    k[0, 0] = float("nan")
    with pytest.raises(NonFiniteSolveError, match="keys"):
        memit_delta(k, r, c, 1.0)
    with pytest.raises(NonFiniteSolveError, match="zero"):
        rome_delta(torch.zeros(D_IN, dtype=torch.float64), r[:, 0], c)
