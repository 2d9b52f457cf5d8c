"""Typed, frozen hyperparameters of every algorithm, and the shipped presets.

One YAML file per (algorithm, model) under ``editors/hparams/<algorithm>/<preset>.yaml`` holds only the
algorithm's knobs: module names come from :class:`editors.model.ModelSpec`, devices and paths from the
caller. Unknown keys are rejected with the list of valid ones.

Field names follow the reference hparams files (``mom2_update_weight``, ``emmet_lambda``, ``L2``...),
so values can be copied from them; docs/ALGORITHMS.md §6 lists the sources.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .config import ConfigError, from_dict, load_yaml, merge
from .targets import ValueHParams

PRESET_DIR = Path(__file__).parent / "hparams"


@dataclass(frozen=True, kw_only=True)
class EditHParams(ValueHParams):
    """Fields every algorithm has (plus :class:`ValueHParams`, the target-value optimisation).

    Attributes:
        layers: edited layers (ROME and single-layer runs: one; MEMIT-style spreading: several,
            ascending; the target value is computed at the last).
        context_templates: "rome" (21 prefixes, plain mean), "memit" (``{}`` + 5 prefixes, two
            groups) or "none".
        template_seed: seed of the template generation (the reference does not seed it).
        mom2_n_samples, mom2_dtype: statistics the caller should pass (provenance; the reference
            computes them from this many Wikipedia texts in this dtype).
        value_batch: requests per padded forward in the value optimisation (memory bound only).

    The lifelong-editing settings (docs/ALGORITHMS.md §8), off by default, each on any algorithm:
        nas: NAS (arXiv 2602.02543), target values' MLP part anchored to the unedited model's norm
            (:mod:`editors.algorithms.nas`; MEMIT-style algorithms).
        rect_keep: RECT (arXiv 2401.04700), keep this fraction of each update's entries, those of
            largest relative change (:mod:`editors.algorithms.rect`; the authors' code: 0.4).
        prune_base: PRUNE (arXiv 2405.16821), the log base α that restrains the accumulated ΔW's
            singular values above σ_max(W₀) (:mod:`editors.algorithms.prune`; e, 2, 1.5 or 1.2).
        mpes_hits: ENCORE's most-probable early stopping in the value optimisation
            (:func:`editors.targets.optimize_values`).
        beta_hse, sphere_alpha: SPHERE (arXiv 2510.01172), each layer's update projected away from
            the weight's principal hyperspherical directions that hold a share ``beta_hse`` of the
            energy, with strength ``sphere_alpha`` (:mod:`editors.algorithms.sphere`; 0 = off; the
            authors: 0.5 / 0.5 on AlphaEdit, 0.5 / 0.8 on MEMIT).
    """

    layers: tuple[int, ...]
    context_templates: Literal["rome", "memit", "none"] = "memit"
    template_seed: int = 0
    mom2_n_samples: int = 100_000
    mom2_dtype: Literal["float32", "float64"] = "float32"
    value_batch: int = 32
    nas: bool = False
    rect_keep: float | None = None
    prune_base: float | None = None
    beta_hse: float = 0.0
    sphere_alpha: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.beta_hse <= 1:
            raise ValueError(f"beta_hse: SPHERE's energy share must be in [0, 1] (0: off), got {self.beta_hse}")
        if not 0 <= self.sphere_alpha <= 1:
            raise ValueError(f"sphere_alpha: SPHERE's suppression strength must be in [0, 1], got {self.sphere_alpha}")
        if self.rect_keep is not None and not 0 < self.rect_keep <= 1:
            raise ValueError(f"rect_keep: the fraction of entries kept must be in (0, 1] or null, got {self.rect_keep}")
        if self.prune_base is not None and not self.prune_base > 1:
            raise ValueError(f"prune_base: the log base must be > 1 or null, got {self.prune_base}")
        if not self.layers:
            raise ValueError("layers: at least one layer is needed")
        if list(self.layers) != sorted(set(self.layers)):
            raise ValueError(f"layers: must be ascending and unique, got {list(self.layers)}")
        if self.value_batch < 1:
            raise ValueError("value_batch: must be >= 1")


@dataclass(frozen=True, kw_only=True)
class ROMEHParams(EditHParams):
    """ROME (Meng et al. 2022). ``consistent_keys`` = r-ROME (2403.07175): use the template-averaged
    key k* in the residual and denominator too, instead of the bare-prompt key (the reference's
    inconsistency that collapses sequential editing)."""

    context_templates: Literal["rome", "memit", "none"] = "rome"
    mom2_adjustment: bool = True
    consistent_keys: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.layers) != 1:
            raise ValueError(f"layers: ROME edits exactly one layer, got {list(self.layers)}")
        if self.nas or self.rect_keep is not None or self.beta_hse:
            raise ValueError(
                "nas / rect_keep / beta_hse: apply to the MEMIT-style algorithms "
                "(memit, emmet, alphaedit, encore, rlsedit)"
            )


@dataclass(frozen=True, kw_only=True)
class MEMITHParams(EditHParams):
    """MEMIT (Meng et al. 2023): λ = ``mom2_update_weight``; ENCORE's (2502.01636) options
    ``add_prev_edits`` (earlier batches' keys join the preservation term) and
    ``update_norm_lambda`` (a ridge on ΔW)."""

    mom2_update_weight: float = 15_000.0
    add_prev_edits: bool = False
    update_norm_lambda: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mom2_update_weight <= 0:
            raise ValueError("mom2_update_weight: must be > 0")


@dataclass(frozen=True, kw_only=True)
class EMMETHParams(MEMITHParams):
    """EMMET (Gupta et al. 2024): ``emmet_lambda`` = μ, the ridge on D = Kᵀ(λC)⁻¹K, added only when
    the batch has more than one request (as the reference does)."""

    mom2_update_weight: float = 1.0
    emmet_lambda: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.emmet_lambda < 0:
            raise ValueError("emmet_lambda: must be >= 0")


@dataclass(frozen=True, kw_only=True)
class AlphaEditHParams(EditHParams):
    """AlphaEdit (Fang et al. 2025): ``nullspace_threshold`` picks C's null space, ``L2`` = α."""

    nullspace_threshold: float = 2e-2
    L2: float = 10.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.nullspace_threshold <= 0:
            raise ValueError("nullspace_threshold: must be > 0")
        if self.L2 < 0:
            raise ValueError("L2: must be >= 0")


@dataclass(frozen=True, kw_only=True)
class ENCOREHParams(MEMITHParams):
    """ENCORE (Gupta et al. 2025, arXiv 2502.01636): MEMIT with the earlier batches' keys in the
    preservation term (``add_prev_edits``), a ridge λ_n I on the update (``update_norm_lambda``, not
    scaled by λ) and most-probable early stopping of the target values (``mpes_hits``): the
    authors' ``hparams/ENCORE/llama3-8b.json`` (λ = 15,000, λ_n = 20, prob_cutoff = −2)."""

    add_prev_edits: bool = True
    update_norm_lambda: float = 20.0
    mpes_hits: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.update_norm_lambda < 0:
            raise ValueError("update_norm_lambda: must be >= 0")


@dataclass(frozen=True, kw_only=True)
class RLSEditHParams(MEMITHParams):
    """RLSEdit (arXiv 2601.15686, ``Euphoria040201/RLSEdit``): recursive ridge least squares over every
    edit so far, from M_0 = λ²I + μ²·w·C (``lambda_reg`` λ, ``mu_reg`` μ, w = ``mom2_update_weight``).

    ``rls_target``: ``"delta"`` (the authors' code: the layer's output is fitted to the hidden-state
    shift z* − h itself, residual (z* − h − W k)/(L − i)) or ``"absolute"`` (MEMIT's convention: the
    output moves by the shift, residual (z* − h)/(L − i)). ``rls_memory``: carry P_t from batch to
    batch (recursive least squares); false restarts every batch from P_0, which is what the authors'
    ``evaluate.py`` runs (it passes no ``cache_c`` to RLSEdit)."""

    lambda_reg: float = 0.0
    mu_reg: float = 1.0
    rls_target: Literal["delta", "absolute"] = "delta"
    rls_memory: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lambda_reg < 0 or self.mu_reg < 0:
            raise ValueError(f"lambda_reg / mu_reg: must be >= 0, got {self.lambda_reg} / {self.mu_reg}")
        if self.lambda_reg == 0 and self.mu_reg == 0:
            raise ValueError(
                "lambda_reg / mu_reg: both 0 leave M_0 = 0 and no preservation term; set mu_reg > 0 (the "
                "authors' Llama-3-8B value: 1.0) or lambda_reg > 0"
            )
        if self.add_prev_edits or self.update_norm_lambda:
            raise ValueError(
                "add_prev_edits / update_norm_lambda: ENCORE's options; RLSEdit keeps every earlier key in "
                "its recursion (rls_memory) and its ridge is lambda_reg"
            )


@dataclass(frozen=True, kw_only=True)
class UltraEditHParams(EditHParams):
    """UltraEdit (arXiv 2505.14679, ``XiaojieGu/UltraEdit``): the update of each edited projection
    solved in closed form from its keys and output gradients at the answer tokens, normalised by
    running statistics kept over the whole lifetime (:mod:`editors.algorithms.ultraedit`).

    ``ultra_lr``: the step size in V = −lr·‖k̂‖²·ĝ (the authors' 1e-6); ``ultra_ridge``: the ridge of
    the solve (hard-coded 1 there); ``ultra_sub_batch``: requests per forward/backward, over which the
    loss is averaged and after each of which the statistics are updated (the authors' dataset
    ``batch_size``: 10); ``ultra_modules``: the projection edited in each layer, a module path inside
    the block (``mlp.gate_proj``), one for every layer or one per entry of ``layers`` in its order
    (empty: the MLP output projection, ``ModelSpec.rewrite_module``; the authors' Llama-3-8B setting is
    ``gate_proj`` at layers 11-15 and ``up_proj`` at 18-24). The value optimisation's fields are not
    used."""

    context_templates: Literal["rome", "memit", "none"] = "none"
    ultra_lr: float = 1e-6
    ultra_ridge: float = 1.0
    ultra_sub_batch: int = 10
    ultra_modules: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.ultra_lr > 0:
            raise ValueError(f"ultra_lr: must be > 0, got {self.ultra_lr}")
        if not self.ultra_ridge > 0:
            raise ValueError(f"ultra_ridge: must be > 0, got {self.ultra_ridge}")
        if self.ultra_sub_batch < 1:
            raise ValueError(f"ultra_sub_batch: must be >= 1, got {self.ultra_sub_batch}")
        if self.nas or self.beta_hse:
            raise ValueError("nas / beta_hse: act on target values and a layered solve UltraEdit does not have")
        if len(self.ultra_modules) not in (0, 1, len(self.layers)):
            raise ValueError(
                f"ultra_modules: give one module for every layer or one per layer of layers ({len(self.layers)}), "
                f"got {len(self.ultra_modules)}"
            )
        for m in self.ultra_modules:
            if not isinstance(m, str) or not m or "{" in m or m.startswith(".") or m.endswith("."):
                raise ValueError(f"ultra_modules: {m!r} is not a module path inside a block, e.g. 'mlp.up_proj'")


HPARAMS: dict[str, type[EditHParams]] = {
    "rome": ROMEHParams,
    "memit": MEMITHParams,
    "emmet": EMMETHParams,
    "alphaedit": AlphaEditHParams,
    "encore": ENCOREHParams,
    "rlsedit": RLSEditHParams,
    "ultraedit": UltraEditHParams,
}


def check_algorithm(name: str) -> str:
    """Lower-cased algorithm name, or a ConfigError naming ``algorithm`` and the valid choices."""
    key = str(name).lower()
    if key not in HPARAMS:
        raise ConfigError(f"algorithm: unknown algorithm {name!r}; choose one of {sorted(HPARAMS)}")
    return key


def presets(algorithm: str) -> list[str]:
    """Names of the shipped presets of ``algorithm``."""
    return sorted(p.stem for p in (PRESET_DIR / check_algorithm(algorithm)).glob("*.yaml"))


def load_hparams(
    algorithm: str, preset: str | Path | dict[str, Any] | None = "smollm2-135m", **overrides: Any
) -> EditHParams:
    """Hyperparameters of ``algorithm`` from a shipped preset name, a YAML path or a dict, with
    keyword overrides, e.g. ``load_hparams("memit", "llama3-8b", layers=[1], mom2_update_weight=5e4)``.
    """
    alg = check_algorithm(algorithm)
    if preset is None:
        data: dict[str, Any] = {}
    elif isinstance(preset, dict):
        data = dict(preset)
    else:
        path = Path(preset)
        if not path.suffix:
            path = PRESET_DIR / alg / f"{preset}.yaml"
            if not path.is_file():
                raise ConfigError(f"hparams: no preset {preset!r} for {alg}; shipped: {presets(alg)}")
        data = load_yaml(path)
    try:
        return from_dict(HPARAMS[alg], merge(data, overrides))
    except ValueError as e:
        raise ConfigError(f"{alg} hparams: {e}") from None
