"""NAS: norm-anchored target values for lifelong editing (arXiv 2602.02543).

As sequential edits accumulate, the optimised target values grow in norm and each batch pushes the
edited matrix further. NAS anchors the MLP part of every target value to the norm target values have
on the unedited model (``NAS/compute_z.py``): with h the block output and v₀ the edited MLP's output
at the subject's last token (both on the model as it is), δ the optimised shift and v* = v₀ + δ,

    v* ← v₀                       if ‖v*‖ > 2 N̄   (the fact's shift is dropped),
    v* ← N̄ · v* / ‖v*‖            otherwise,
    z  = (h − v₀) + v*,

where N̄, the anchor, is the mean ‖v*‖ of MEMIT's target values on the unedited model with the top 5%
dropped. The authors estimate N̄ once from 1,000 random CounterFact rewrites; here it is estimated
from the schedule's first batch (optimised on the unedited model, with the trial's own value
settings), which needs no extra optimisation; in ``batch`` mode every batch is its own first batch.
"""

from __future__ import annotations

import math

import torch

UPPER_QUANTILE = 0.95  # the authors' trimmed mean: drop the top 5% of ‖v*‖ before averaging
SKIP_FACTOR = 2.0  # a fact whose ‖v*‖ exceeds this multiple of the anchor keeps v₀


def anchor_of(vstar_norms: torch.Tensor) -> float:
    """N̄: the mean of ``vstar_norms`` [n] after dropping the ⌊0.05 n⌋ largest (the authors' rule)."""
    n = vstar_norms.numel()
    if n == 0:
        raise ValueError("nas: no target values to anchor to")
    drop = math.floor((1 - UPPER_QUANTILE) * n)
    kept = torch.sort(vstar_norms.double()).values[: n - drop]
    return float(kept.mean())


def anchored(z: torch.Tensor, h: torch.Tensor, v0: torch.Tensor, anchor: float) -> torch.Tensor:
    """Target block outputs z [n, d] with their MLP part's norm set to ``anchor`` (module docstring);
    ``h``, ``v0`` [n, d]: the block and MLP outputs at the subject's last token without the edit."""
    vstar = v0 + (z - h)
    norm = vstar.norm(dim=1, keepdim=True)
    scaled = vstar * (anchor / norm.clamp_min(1e-10))
    vstar = torch.where(norm > SKIP_FACTOR * anchor, v0, scaled)
    return (h - v0) + vstar
