"""RECT: relative-change-based sparsification of each update (Gu et al., EMNLP 2024, arXiv 2401.04700,
"Model Editing Harms General Abilities of Large Language Models: Regularization to the Rescue").

Of each layer's update ΔW of a batch only the entries with the largest relative change
|ΔW_ij| / |W_ij| against the weight before the batch are kept, unscaled; the rest are zeroed (paper
§4; ``memit_rect_main.py``: the threshold is taken over the whole matrix, the fraction kept is 40%).
As in the authors' code the residual of a later layer is solved as if the earlier layers had
received their full update, and the sparsification is applied after the layer loop.
"""

from __future__ import annotations

import torch


def sparsify(delta: torch.Tensor, w: torch.Tensor, keep: float) -> torch.Tensor:
    """ΔW [d_out, d_in] with all but the ``round(keep · numel)`` entries of largest |ΔW| / |W| zeroed
    (``w``: the weight before this update, same shape and orientation). Exactly that many entries are
    kept (ties broken by position), so the fraction is what is configured."""
    if not 0 < keep <= 1:
        raise ValueError(f"rect_keep: the fraction of entries kept must be in (0, 1], got {keep}")
    n_keep = round(keep * delta.numel())
    if n_keep >= delta.numel():
        return delta.clone()
    rel = (delta.double().abs() / w.double().abs().clamp_min(1e-8)).reshape(-1)
    idx = torch.topk(rel, n_keep, sorted=False).indices
    mask = torch.zeros(delta.numel(), dtype=torch.bool, device=delta.device)
    mask[idx] = True
    return delta * mask.reshape(delta.shape)
