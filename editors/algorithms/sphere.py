"""SPHERE: each update kept off the principal hyperspherical directions of the weight it edits
(ICLR 2026, arXiv 2510.01172; ``PlusLabNLP/SPHERE`` @ 6e8978a,
``AlphaEdit/AlphaEdit_main.py::project_B_into_soft_dirs``).

Sequential edits pile up along the few directions that already dominate the weight's neurons, and the
model collapses when those directions take over (the paper's hyperspherical-energy argument). SPHERE
projects every layer's update away from them. With W [d_out, d_in] the weight just before this layer's
update (earlier batches and earlier layers of this batch included, as the authors' code reads it):

    Ŵ = W with every row scaled to unit norm (‖·‖ + 1e-8),
    Ŵᵀ Ŵ / d_out = Σ λ_j u_j u_jᵀ  (eigenvalues descending, u_j ∈ R^{d_in}),
    r = 1 + #{k : (λ_1 + … + λ_k) / Σ λ ≤ β},   U = [u_1 … u_r],
    ΔW ← ΔW (I − α U Uᵀ)                          (β = ``beta_hse``, α = ``sphere_alpha``).

β = 0 turns SPHERE off (the authors' baseline switch); α = 1 removes the r directions entirely, α = 0
leaves ΔW as it is. The authors recompute U for every layer of every batch, in float32; here it is
float64. The rows are the weight's output units in ``nn.Linear``'s orientation, the layout of the
paper's Llama-3 and Qwen2.5 models (for GPT-2's transposed ``Conv1D`` the authors' code normalises the
other axis; here the orientation is always ``nn.Linear``'s, so one rule holds for every model).
"""

from __future__ import annotations

import torch


def principal_directions(w: torch.Tensor, beta: float) -> torch.Tensor:
    """U [d_in, r]: the top-r eigenvectors of the row-normalised weight's Gram matrix ŴᵀŴ / d_out, r
    the fewest leading directions whose share of the energy exceeds ``beta`` (module docstring).

    Args:
        w: W [d_out, d_in] in ``nn.Linear`` orientation (any float dtype; computed in float64).
        beta: the energy share β in [0, 1].
    """
    if not 0 <= beta <= 1:
        raise ValueError(f"beta_hse: the energy share must be in [0, 1], got {beta}")
    a = w.double()
    a_hat = a / (a.norm(dim=1, keepdim=True) + 1e-8)
    gram = a_hat.T @ a_hat / a_hat.shape[0]
    evals, evecs = torch.linalg.eigh(gram)  # ascending
    share = torch.cumsum(evals.flip(0), 0) / evals.sum()
    r = min(int((share <= beta).sum()) + 1, evals.numel())
    return evecs[:, -r:]


def project(delta: torch.Tensor, w: torch.Tensor, beta: float, alpha: float) -> torch.Tensor:
    """ΔW (I − α U Uᵀ) with U = :func:`principal_directions` (w, β): [d_out, d_in], ``delta``'s dtype.

    Computed as ΔW − α (ΔW U) Uᵀ, so the [d_in, d_in] projector is never formed (d_in = 14,336 on
    Llama-3-8B). β = 0 returns ``delta`` unchanged (SPHERE off)."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"sphere_alpha: the suppression strength must be in [0, 1], got {alpha}")
    if beta == 0 or alpha == 0:
        return delta
    if delta.shape != w.shape:
        raise ValueError(f"sphere: ΔW {tuple(delta.shape)} and W {tuple(w.shape)} differ in shape")
    u = principal_directions(w, beta)
    d = delta.double()
    return (d - alpha * (d @ u) @ u.T).to(delta.dtype)
