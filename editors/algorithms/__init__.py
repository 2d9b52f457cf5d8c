"""The editing algorithms and the lifelong-editing settings that act on them.

=============  =======================================================================================
``rome``       ROME: rank-one update of one layer (Meng et al. 2022)
``memit``      MEMIT: least squares spread over layers (Meng et al. 2023); ``layered`` is its loop
``emmet``      EMMET: equality-constrained batch update (Gupta et al. 2024)
``alphaedit``  AlphaEdit: null-space projected update (Fang et al. 2025)
``encore``     ENCORE: MEMIT + earlier edits' keys + norm ridge + MPES (Gupta et al. 2025)
``rlsedit``    RLSEdit: recursive ridge least squares over every edit so far (arXiv 2601.15686)
``ultraedit``  UltraEdit: closed form from keys and normalised gradients, lifelong statistics (2505.14679)
``nas``        NAS: target values anchored to the unedited norm (setting ``nas``)
``prune``      PRUNE: the accumulated ΔW's large singular values restrained (``prune_base``)
``rect``       RECT: each update sparsified to its largest relative changes (``rect_keep``)
``sphere``     SPHERE: each update kept off the weight's principal directions (``beta_hse``)
=============  =======================================================================================

Each algorithm module has ``compute_deltas``, ``update_state`` and ``TRAITS`` (and may have
``check_model(model, spec, hparams)``, which ``run_schedule`` calls before the first batch); the settings modules
hold the pure functions the algorithms and :func:`editors.schedule.run_schedule` call.
"""

from __future__ import annotations

from types import ModuleType

from . import alphaedit, emmet, encore, memit, rlsedit, rome, ultraedit

#: algorithm name -> module with ``compute_deltas`` and ``update_state``.
ALGORITHMS: dict[str, ModuleType] = {
    "rome": rome,
    "memit": memit,
    "emmet": emmet,
    "alphaedit": alphaedit,
    "encore": encore,
    "rlsedit": rlsedit,
    "ultraedit": ultraedit,
}
