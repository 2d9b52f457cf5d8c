"""ENCORE: MEMIT made to last 10,000 sequential edits (Gupta et al., 2025, arXiv 2502.01636; the
authors of arXiv 2405.00664).

Three changes to MEMIT, all settings of :class:`editors.hparams.ENCOREHParams`: the keys of every earlier
batch join the preservation term, λC + λ_n I + Σ K_p K_pᵀ + K Kᵀ (``add_prev_edits``; the keys are those
used in each batch's solve, ``encore_main.py``), the ridge λ_n I bounds the update's norm
(``update_norm_lambda``), and the target values stop as soon as the new object is the most probable
continuation of every rewriting prompt (MPES, ``mpes_hits``, :func:`editors.targets.optimize_values`),
which keeps them from overshooting. The update itself is MEMIT's (:mod:`.memit`).
"""

from __future__ import annotations

from ..common import AlgorithmTraits
from .memit import compute_deltas, update_state

TRAITS = AlgorithmTraits("encore")

__all__ = ["TRAITS", "compute_deltas", "update_state"]
