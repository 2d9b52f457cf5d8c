"""PRUNE: perturbation-restrained sequential editing (Ma et al., ICLR 2025, arXiv 2405.16821).

Sequential edits accumulate ΔW = W − W₀ whose largest singular values outgrow W₀'s and inflate the
condition number of W (the paper's Theorem 3.2 bounds the perturbation of the preserved knowledge by
it). PRUNE restrains them in closed form (paper Eq. 7, ``bi_editor_loadw.py`` ``func_logn``): with
ΔW = U Σ Vᵀ and σ̄ = σ_max(W₀) of the same matrix,

    σᵢ' = log_α(σᵢ) − log_α(σ̄) + σ̄    for σᵢ ≥ σ̄,    σᵢ' = σᵢ otherwise,

and ΔW' = U Σ' Vᵀ. The map is monotone, continuous at σ̄ and maps [σ̄, ∞) into [σ̄, σ̄ + log_α(σ/σ̄)],
so no singular value of ΔW' exceeds σ̄ by more than the log of its excess. The authors apply it to
the accumulated ΔW when the model is evaluated (``edit_load.py``), editing on from the unrestrained
weights; :func:`editors.schedule.run_schedule` does the same (``prune_base`` in the hparams), so every
score, curve point and the final model see the restrained weights.
"""

from __future__ import annotations

import math

import torch


def restrain(delta: torch.Tensor, w0: torch.Tensor, base: float = math.e) -> torch.Tensor:
    """ΔW' from ΔW [d_out, d_in] and the unedited W₀ (same shape) with log base ``base`` = α > 1
    (the authors' choices: e, 2, 1.5, 1.2). Computed in float64, returned in ``delta``'s dtype."""
    if not base > 1:
        raise ValueError(f"prune_base: the log base must be > 1, got {base}")
    d = delta.double()
    sigma_bar = float(torch.linalg.matrix_norm(w0.double(), ord=2))
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    big = s >= sigma_bar
    if not bool(big.any()):
        return delta.clone()
    s_new = s.clone()
    s_new[big] = torch.log(s[big]) / math.log(base) - math.log(sigma_bar) / math.log(base) + sigma_bar
    # Only the restrained directions change: ΔW + U_big diag(σ' − σ) V_bigᵀ (the rest is ΔW exactly).
    fix = (u[:, big] * (s_new[big] - s[big])) @ vh[big]
    return (d + fix).to(delta.dtype)
