"""Closed-form weight updates of ROME, MEMIT, EMMET and AlphaEdit: pure functions on float64 tensors.

Shapes follow the papers and ``nn.Linear.weight``: W: [d_out, d_in]; keys as columns K: [d_in, n];
residuals R: [d_out, n] = target output minus current output W K; second moment C: [d_in, d_in]
(C = K0 K0ᵀ / N over a text corpus). Every solver returns ΔW: [d_out, d_in].

- ROME (Meng et al. 2022, Eq. 2; 2405.00664 Eq. 3):   Δ = r (C⁻¹k)ᵀ / (kᵀC⁻¹k)
- MEMIT (Meng et al. 2023, Eq. 14; 2405.00664 Eq. 5): Δ = R Kᵀ (λC + K Kᵀ)⁻¹
- EMMET (Gupta et al. 2024, 2403.14236; 2405.00664 Eq. 7): Δ = R (Kᵀ(λC)⁻¹K + μI)⁻¹ Kᵀ(λC)⁻¹
- AlphaEdit (Fang et al. 2025, 2410.02355 Eq. 14):   Δ = R Kᵀ P (K_p K_pᵀ P + K Kᵀ P + αI)⁻¹
- RLSEdit (arXiv 2601.15686):  P_t = (P_{t-1}⁻¹ + K Kᵀ)⁻¹ by Woodbury, Δ = R Kᵀ P_t, P_0 = (λ²I + μ²wC)⁻¹
- UltraEdit (arXiv 2505.14679):  Δ = Vᵀ K (KᵀK + I)⁻¹ with token rows K: [N, d_in], V: [N, d_out]

Linear systems are solved, never inverted: a Cholesky solve for the symmetric positive definite
systems, LU for AlphaEdit's non-symmetric one. If a factorisation fails or the system is
ill-conditioned (condition estimate above ``MAX_COND``), the solve falls back to the pseudo-inverse,
as the EMMET reference does (``torch.inverse`` -> ``pinv``; docs/ALGORITHMS.md §3), and records that in
``info``. A non-finite result raises :class:`NonFiniteSolveError`.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

#: Above this (lower-bound) condition estimate a float64 solve loses more than ~4 significant digits.
MAX_COND = 1e12


class NonFiniteSolveError(FloatingPointError):
    """A solve produced NaN/Inf; the message names the solver and the likely cause."""


def _check(name: str, t: torch.Tensor, ndim: int) -> torch.Tensor:
    if t.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise NonFiniteSolveError(f"{name}: contains NaN or Inf")
    return t.to(torch.float64)


def _record(info: dict[str, Any] | None, **kv: Any) -> None:
    if info is not None:
        info.update(kv)


def spd_solve(a: torch.Tensor, b: torch.Tensor, info: dict[str, Any] | None = None) -> torch.Tensor:
    """X = A⁻¹B for symmetric positive (semi)definite A: [d, d], B: [d, m] (float64).

    Cholesky first; on failure, or if the condition estimate (max/min of diag(L))² exceeds
    ``MAX_COND``, the Moore-Penrose pseudo-inverse (``torch.linalg.lstsq`` with a relative cutoff).
    """
    chol, err = torch.linalg.cholesky_ex(a)
    if int(err) == 0:
        d = torch.diagonal(chol)
        cond = float((d.max() / d.min()) ** 2) if float(d.min()) > 0 else float("inf")
        if cond <= MAX_COND:
            _record(info, method="cholesky", cond_estimate=cond, fallback=False)
            return torch.cholesky_solve(b, chol)
    else:
        cond = float("inf")
    log.warning("ill-conditioned or singular system (cond ≳ %.3g): falling back to pinv", cond)
    _record(info, method="pinv", cond_estimate=cond, fallback=True)
    return torch.linalg.pinv(a, hermitian=True) @ b


def general_solve(a: torch.Tensor, b: torch.Tensor, info: dict[str, Any] | None = None) -> torch.Tensor:
    """X = A⁻¹B for a general square A (LU with partial pivoting), pinv on failure."""
    x, err = torch.linalg.solve_ex(a, b)
    if int(err) == 0 and torch.isfinite(x).all():
        _record(info, method="lu", fallback=False)
        return x
    log.warning("singular system in LU solve: falling back to pinv")
    _record(info, method="pinv", fallback=True)
    return torch.linalg.pinv(a) @ b


def _finite(name: str, delta: torch.Tensor) -> torch.Tensor:
    if not torch.isfinite(delta).all():
        raise NonFiniteSolveError(
            f"{name}: the update is not finite; the statistics may be rank-deficient (too few corpus "
            "tokens) or the keys degenerate: raise the regulariser or the statistics sample"
        )
    return delta


def preservation(
    cov: torch.Tensor,
    lam: float = 1.0,
    prev_keys: torch.Tensor | None = None,
    norm_lambda: float = 0.0,
) -> torch.Tensor:
    """λC + norm_lambda·I + K_p K_pᵀ: [d_in, d_in], the matrix whose quadratic form MEMIT/EMMET keep.

    ``prev_keys`` [d_in, m] are earlier edits' keys (ENCORE's ``add_prev_edits``); ``norm_lambda`` is
    ENCORE's ``update_norm_lambda``. Order as in the reference: C is scaled by λ first, then the others
    are added unscaled.
    """
    c = _check("cov", cov, 2) * lam
    if norm_lambda:
        c = c + norm_lambda * torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
    if prev_keys is not None and prev_keys.numel():
        kp = _check("prev_keys", prev_keys, 2)
        c = c + kp @ kp.T
    return c


def rome_delta(
    key: torch.Tensor,
    residual: torch.Tensor,
    cov: torch.Tensor | None,
    *,
    left_key: torch.Tensor | None = None,
    info: dict[str, Any] | None = None,
) -> torch.Tensor:
    """ROME's rank-one update Δ = r (C⁻¹k)ᵀ / (kᵀC⁻¹k): [d_out, d_in].

    Args:
        key: k [d_in], the key whose output must become W k + r.
        residual: r [d_out] = v* − W k.
        cov: C [d_in, d_in], or None for C = I (``mom2_adjustment: false``).
        left_key: the key used in C⁻¹k when it differs from ``key`` (the original ROME code uses the
            template-averaged k* there but the bare-prompt k in the denominator; r-ROME passes None).
    """
    k = _check("key", key, 1)
    r = _check("residual", residual, 1)
    kl = k if left_key is None else _check("left_key", left_key, 1)
    ck = kl if cov is None else spd_solve(_check("cov", cov, 2), kl[:, None], info)[:, 0]
    denom = torch.dot(k, ck)
    if not torch.isfinite(denom) or denom.abs() < torch.finfo(torch.float64).tiny:
        raise NonFiniteSolveError("rome_delta: kᵀC⁻¹k is zero or not finite (a zero key?)")
    return _finite("rome_delta", torch.outer(r, ck) / denom)


def memit_delta(
    keys: torch.Tensor,
    residuals: torch.Tensor,
    cov: torch.Tensor,
    lam: float,
    *,
    prev_keys: torch.Tensor | None = None,
    norm_lambda: float = 0.0,
    info: dict[str, Any] | None = None,
) -> torch.Tensor:
    """MEMIT's least-squares update Δ = R Kᵀ (λC + K Kᵀ)⁻¹: [d_out, d_in].

    keys K: [d_in, n]; residuals R: [d_out, n]; cov C: [d_in, d_in]; lam λ = ``mom2_update_weight``.
    Minimises λ·tr(Δ C Δᵀ) + ‖(W+Δ)K − V‖² (plus ENCORE's extra terms, see :func:`preservation`).
    """
    k = _check("keys", keys, 2)
    r = _check("residuals", residuals, 2)
    a = preservation(cov, lam, prev_keys, norm_lambda) + k @ k.T
    adj = spd_solve(a, k, info)  # (λC + KKᵀ)⁻¹ K: [d_in, n]
    return _finite("memit_delta", r @ adj.T)


def emmet_delta(
    keys: torch.Tensor,
    residuals: torch.Tensor,
    cov: torch.Tensor,
    lam: float,
    mu: float,
    *,
    prev_keys: torch.Tensor | None = None,
    norm_lambda: float = 0.0,
    info: dict[str, Any] | None = None,
) -> torch.Tensor:
    """EMMET's equality-constrained update Δ = R (Kᵀ(λC)⁻¹K + μI)⁻¹ Kᵀ(λC)⁻¹: [d_out, d_in].

    Solves min ‖ΔK0‖ s.t. (W+Δ)K = V (2405.00664 Eq. 6–7); μ = ``emmet_lambda`` regularises the
    n×n matrix D = Kᵀ(λC)⁻¹K (μ → 0 meets the constraints exactly; the reference adds it only when
    n > 1, which the algorithm layer does). λ is not neutral: the effective ridge is λ·μ.
    """
    k = _check("keys", keys, 2)
    r = _check("residuals", residuals, 2)
    c = preservation(cov, lam, prev_keys, norm_lambda)
    x = spd_solve(c, k, info)  # (λC)⁻¹K: [d_in, n]
    d = k.T @ x
    d = (d + d.T) / 2 + mu * torch.eye(d.shape[0], dtype=d.dtype, device=d.device)
    d_info: dict[str, Any] = {}
    y = spd_solve(d, x.T, d_info)  # D⁻¹ Kᵀ(λC)⁻¹: [n, d_in]
    _record(info, d_method=d_info.get("method"), d_cond_estimate=d_info.get("cond_estimate"))
    if info is not None and d_info.get("fallback"):
        info["fallback"] = True
    return _finite("emmet_delta", r @ y)


def null_space_projector(cov: torch.Tensor, threshold: float) -> torch.Tensor:
    """AlphaEdit's projector P = U₀U₀ᵀ onto the span of C's eigenvectors with eigenvalue < threshold.

    cov C: [d_in, d_in] (symmetric PSD, so its singular values are its eigenvalues and ``eigh`` gives
    the reference's SVD result faster). Returns P: [d_in, d_in] float64; P k0 ≈ 0 for every key k0 the
    statistics saw with weight above the threshold. (The paper's text says 1e-2; the code uses 2e-2.)
    """
    c = _check("cov", cov, 2)
    evals, evecs = torch.linalg.eigh((c + c.T) / 2)
    u0 = evecs[:, evals < threshold]
    return u0 @ u0.T


def alphaedit_delta(
    keys: torch.Tensor,
    residuals: torch.Tensor,
    projector: torch.Tensor,
    prev_keys: torch.Tensor | None,
    alpha: float,
    *,
    info: dict[str, Any] | None = None,
) -> torch.Tensor:
    """AlphaEdit's null-space update Δ = R Kᵀ P (K_p K_pᵀ P + K Kᵀ P + αI)⁻¹: [d_out, d_in].

    keys K: [d_in, n]; residuals R: [d_out, n]; projector P: [d_in, d_in]; prev_keys K_p: [d_in, m]
    (keys of earlier batches) or None; alpha α = the reference's ``L2``. Computed as the reference
    does, Δᵀ = (P(KKᵀ + K_pK_pᵀ) + αI)⁻¹ P K Rᵀ. Since Δ k0 = 0 whenever P k0 = 0, preserved keys'
    outputs are unchanged exactly.
    """
    k = _check("keys", keys, 2)
    r = _check("residuals", residuals, 2)
    p = _check("projector", projector, 2)
    pk = p @ k
    m = pk @ k.T
    if prev_keys is not None and prev_keys.numel():
        kp = _check("prev_keys", prev_keys, 2)
        m = m + (p @ kp) @ kp.T
    m = m + alpha * torch.eye(m.shape[0], dtype=m.dtype, device=m.device)
    delta_t = general_solve(m, pk @ r.T, info)  # [d_in, d_out]
    return _finite("alphaedit_delta", delta_t.T)


def rls_initial_inverse(cov: torch.Tensor, weight: float, lambda_reg: float, mu_reg: float) -> torch.Tensor:
    """RLSEdit's P_0 = M_0⁻¹, M_0 = λ²I + μ²·w·C: [d_in, d_in] float64 (``RLSEdit_main.py`` L278-280).

    cov C: [d_in, d_in]; ``weight`` w = ``mom2_update_weight``; λ = ``lambda_reg`` and μ = ``mu_reg``
    enter squared, as in the authors' code. Inverted through :func:`spd_solve` (Cholesky, pinv when
    ill-conditioned), and symmetrised.
    """
    c = _check("cov", cov, 2)
    m0 = (mu_reg**2 * weight) * c + lambda_reg**2 * torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
    p0 = spd_solve((m0 + m0.T) / 2, torch.eye(c.shape[0], dtype=c.dtype, device=c.device))
    return (p0 + p0.T) / 2


def rls_inverse_update(inverse: torch.Tensor, keys: torch.Tensor, info: dict[str, Any] | None = None) -> torch.Tensor:
    """RLSEdit's P_t = (P_{t-1}⁻¹ + K Kᵀ)⁻¹ by Woodbury (``RLSEdit_main.py`` L363-367): [d_in, d_in].

    inverse P_{t-1}: [d_in, d_in] = (M_0 + Σ_{s<t} K_s K_sᵀ)⁻¹; keys K: [d_in, n]. With F = P_{t-1} K and
    S = I + Kᵀ F: P_t = P_{t-1} − F S⁻¹ Fᵀ (an n×n solve), symmetrised.
    """
    p = _check("inverse", inverse, 2)
    k = _check("keys", keys, 2)
    f = p @ k
    s = torch.eye(k.shape[1], dtype=k.dtype, device=k.device) + k.T @ f
    p_new = p - f @ spd_solve((s + s.T) / 2, f.T, info)
    return (p_new + p_new.T) / 2


def rls_step(
    inverse: torch.Tensor, keys: torch.Tensor, residuals: torch.Tensor, *, info: dict[str, Any] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One recursive least-squares step of RLSEdit (``RLSEdit_main.py`` L363-373): (ΔW, P_t).

    inverse P_{t-1}: [d_in, d_in]; keys K: [d_in, n]; residuals R: [d_out, n]. P_t is
    :func:`rls_inverse_update`'s, and ΔW = R (P_t K)ᵀ: [d_out, d_in], the block-RLS gain. Over T steps from
    P_0 the weights reach the ridge solution on every key so far,
    argmin Σ_s ‖W K_s − Ṽ_s‖² + tr((W − W₀) M_0 (W − W₀)ᵀ).
    """
    k = _check("keys", keys, 2)
    r = _check("residuals", residuals, 2)
    p_new = rls_inverse_update(inverse, k, info)
    return _finite("rls_step", r @ (p_new @ k).T), p_new


def ultraedit_delta(keys: torch.Tensor, values: torch.Tensor, ridge: float = 1.0) -> torch.Tensor:
    """UltraEdit's closed form ΔWᵀ = (KᵀK + ridge·I)⁻¹ KᵀV (``editor/ultraedit.py`` L90-94): [d_out, d_in].

    keys K: [N, d_in] (one row per captured token, raw); values V: [N, d_out] (the normalised-gradient
    targets). Solved in the N×N dual form Kᵀ(KKᵀ + ridge·I)⁻¹V, the same matrix (push-through identity),
    whichever of N and d_in is smaller is factorised.
    """
    k = _check("keys", keys, 2)
    v = _check("values", values, 2)
    n, d_in = k.shape
    if n <= d_in:
        g = k @ k.T
        x = spd_solve(g + ridge * torch.eye(n, dtype=k.dtype, device=k.device), v)  # [N, d_out]
        return _finite("ultraedit_delta", (k.T @ x).T)
    g = k.T @ k
    x = spd_solve(g + ridge * torch.eye(d_in, dtype=k.dtype, device=k.device), k.T @ v)  # [d_in, d_out]
    return _finite("ultraedit_delta", x.T)
