"""What every algorithm shares: results, state across batches, weight apply/restore, and the
checks every algorithm runs before its work (the MEMIT-style layer loop is
:mod:`editors.algorithms.layered`).

The compute step of every algorithm returns deltas and leaves the model bit-identical (the invariant
of memit's ``execute_memit``); applying them is a separate step (:func:`apply_deltas`), undone exactly by
:func:`restore`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from .model import ModelSpec, get_module, model_device
from .requests import EditRequest
from .templates import TemplateGroups


@dataclass(frozen=True)
class AlgorithmTraits:
    """What a caller that shares work across trials must know of an algorithm, declared once by the
    algorithm's own module (``TRAITS``) instead of being re-derived from its name.

    Attributes:
        name: the algorithm's name.
        value_site: where v* is optimised: ``"block"`` (the block output, MEMIT-style: MEMIT, EMMET,
            AlphaEdit share values) or ``"rewrite"`` (the edited projection's output: ROME's v*).
        sequential_within_batch: the requests of one batch are edited one on top of the other (ROME),
            so their values depend on the batch's earlier requests.
        stats_switch: the boolean hyperparameter that turns the statistics off (ROME's
            ``mom2_adjustment``: C = I), or None when they are always needed.
        uses_values: whether the algorithm edits towards optimised target values v* (UltraEdit
            does not: nothing to share or precompute).
        uses_stats: whether the algorithm ever reads the second moments C (UltraEdit does not).
        state_matrices: how many [d_key, d_key] float64 matrices per edited layer it keeps across
            batches (AlphaEdit's projector, RLSEdit's P_t), for memory planning.
    """

    name: str
    value_site: Literal["block", "rewrite"] = "block"
    sequential_within_batch: bool = False
    stats_switch: str | None = None
    uses_values: bool = True
    uses_stats: bool = True
    state_matrices: int = 0

    def needs_stats(self, hparams: Any) -> bool:
        """Whether a run with ``hparams`` needs the second moments C."""
        if not self.uses_stats:
            return False
        return self.stats_switch is None or bool(getattr(hparams, self.stats_switch, True))

    def values_shareable(self, mode: str, batch_size: int) -> bool:
        """Whether each request's v* depends only on the unedited model (so trials can share it):
        ``batch`` mode only (otherwise earlier batches' edits are in the model), and for an algorithm
        that edits a batch's requests one after another, only single-request batches."""
        if not self.uses_values:
            return False
        return mode == "batch" and not (self.sequential_within_batch and batch_size > 1)


@dataclass
class EditState:
    """What a sequence of batches carries from one batch to the next (reset for ``batch`` mode).

    Attributes:
        prev_keys: layer -> keys of earlier batches, [d_key, m] float32 (AlphaEdit's K_p; ENCORE's
            ``add_prev_edits``).
        projectors: layer -> AlphaEdit's null-space projector P [d_key, d_key] float64, computed once
            from the statistics.
        batches: number of batches applied so far.
        value_norm_anchor: NAS's anchor N̄ of the target values' norm, from the first batch.
        rls_inverse: layer -> RLSEdit's P_t = (M_0 + Σ K Kᵀ)⁻¹ [d_key, d_key] float64.
        running: module shape (d_in, d_out) -> UltraEdit's lifelong running statistics.

    :meth:`state_dict` and :meth:`from_state_dict` save and restore all of it bit-identically (e.g. with
    ``torch.save``), so a sequence of batches can be stopped and continued.
    """

    prev_keys: dict[int, torch.Tensor] = field(default_factory=dict)
    projectors: dict[int, torch.Tensor] = field(default_factory=dict)
    batches: int = 0
    value_norm_anchor: float | None = None
    rls_inverse: dict[int, torch.Tensor] = field(default_factory=dict)
    running: dict[tuple[int, int], RunningStats] = field(default_factory=dict)

    def add_keys(self, layer: int, keys: torch.Tensor) -> None:
        old = self.prev_keys.get(layer)
        self.prev_keys[layer] = keys if old is None else torch.cat([old, keys], dim=1)

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors, numbers and dicts (loadable with ``torch.load(weights_only=True)``)."""
        return {
            "prev_keys": dict(self.prev_keys),
            "projectors": dict(self.projectors),
            "batches": self.batches,
            "value_norm_anchor": self.value_norm_anchor,
            "rls_inverse": dict(self.rls_inverse),
            "running": {f"{d_in}x{d_out}": r.state_dict() for (d_in, d_out), r in self.running.items()},
        }

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, Any]) -> EditState:
        """The state :meth:`state_dict` saved."""
        running = {}
        for key, r in sd.get("running", {}).items():
            d_in, d_out = (int(x) for x in key.split("x"))
            running[(d_in, d_out)] = RunningStats.from_state_dict(r)
        return cls(
            prev_keys=dict(sd.get("prev_keys", {})),
            projectors=dict(sd.get("projectors", {})),
            batches=int(sd.get("batches", 0)),
            value_norm_anchor=sd.get("value_norm_anchor"),
            rls_inverse=dict(sd.get("rls_inverse", {})),
            running=running,
        )


@dataclass
class RunningStats:
    """UltraEdit's lifelong normaliser of token rows x = [key, output gradient] (``nets.py``
    ``RunningMeanStd``, float32 buffers as there): count ``n`` [1], ``mean`` [d], ``m2`` [d] (the sum of
    squared deviations, the authors' ``var``) and ``std`` [d].

    :meth:`update` is the authors' parallel update, kept as written: it adds m·var(x) where Chan's
    exact formula has (m − 1)·var(x), so the statistics match theirs to the bit, not the textbook's.
    """

    n: torch.Tensor
    mean: torch.Tensor
    m2: torch.Tensor
    std: torch.Tensor

    @classmethod
    def zeros(cls, size: int, device: torch.device | str = "cpu") -> RunningStats:
        z = torch.zeros(size, dtype=torch.float32, device=device)
        return cls(torch.zeros(1, dtype=torch.float32, device=device), z.clone(), z.clone(), z.clone())

    def update(self, x: torch.Tensor) -> None:
        """Take in rows x: [m, d] (m ≥ 2: the sample variance of one row is undefined)."""
        if x.ndim != 2 or x.shape[0] < 2:
            raise ValueError(f"running statistics: need at least 2 rows of shape [m, d], got {tuple(x.shape)}")
        x = x.to(self.mean)
        m = x.shape[0]
        n = self.n + m
        delta = x.mean(0) - self.mean
        self.mean = self.mean + m * delta / n
        self.m2 = self.m2 + (m * x.var(0) + self.n * m * delta.pow(2) / n)  # their grouping, to the bit
        self.std = (self.m2 / (n - 1 + torch.finfo(x.dtype).eps)).sqrt()
        self.n = n

    def clone(self) -> RunningStats:
        return RunningStats.from_state_dict(self.state_dict())

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """(x − mean) / (std + eps): [m, d]."""
        return (x - self.mean) / (self.std + torch.finfo(self.std.dtype).eps)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"n": self.n, "mean": self.mean, "m2": self.m2, "std": self.std}

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor]) -> RunningStats:
        return cls(sd["n"].clone(), sd["mean"].clone(), sd["m2"].clone(), sd["std"].clone())


@dataclass
class EditResult:
    """The output of a compute step.

    Attributes:
        deltas: module name -> ΔW [d_out, d_in] float32, in ``nn.Linear`` orientation.
        keys: layer -> K [d_key, n] used in that layer's solve.
        values: v* [n, d_model] (block output for MEMIT-style, MLP output for ROME) — cacheable in
            ``batch`` mode, where it depends only on (model, layer, request, value hparams).
        info: per-layer solver records (method, condition estimate, fallback), value losses and
            stage timings in seconds (``time_keys``, ``time_values``, ``time_solve``).
    """

    deltas: dict[str, torch.Tensor]
    keys: dict[int, torch.Tensor]
    values: torch.Tensor
    info: dict[str, Any]


def sync(device: torch.device) -> None:
    """Wait for queued kernels so that wall-clock timings are honest on accelerators."""
    if device.type != "cpu":
        mod = getattr(torch, device.type, None)
        if mod is not None and hasattr(mod, "synchronize"):
            mod.synchronize(device)


@contextlib.contextmanager
def timed(info: dict[str, Any], key: str, device: torch.device) -> Iterator[None]:
    """Add the wall time of the block to ``info[key]`` (seconds)."""
    sync(device)
    t0 = time.perf_counter()
    try:
        yield
    finally:
        sync(device)
        info[key] = info.get(key, 0.0) + time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------------
# Apply and restore


def apply_deltas(model: nn.Module, spec: ModelSpec, deltas: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """W += ΔW for every module in ``deltas``; returns exact copies of the old weights for :func:`restore`."""
    backup: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, delta in deltas.items():
            w = get_module(model, name).weight
            backup[name] = w.detach().clone()
            d = delta.T if spec.weight_transposed else delta
            w.add_(d.to(device=w.device, dtype=w.dtype))
    return backup


def restore(model: nn.Module, backup: Mapping[str, torch.Tensor]) -> None:
    """Write the saved weights back (bit-identical to before :func:`apply_deltas`)."""
    with torch.no_grad():
        for name, w0 in backup.items():
            get_module(model, name).weight.copy_(w0)


@contextlib.contextmanager
def preserved(model: nn.Module, names: Sequence[str]) -> Iterator[None]:
    """Restore the named modules' weights exactly on exit, whatever happens inside."""
    backup = {n: get_module(model, n).weight.detach().clone() for n in names}
    try:
        yield
    finally:
        restore(model, backup)


# ----------------------------------------------------------------------------------------------------
# Statistics checks


def stats_matrix(stats: Mapping[int, Any] | None, spec: ModelSpec, layer: int, device: torch.device) -> torch.Tensor:
    """C of ``layer`` from ``stats`` (a tensor or a :class:`editors.stats.SecondMoment`) as float64 on
    ``device``, after :func:`editors.stats.check_stats` (square, finite, as wide as the layer's keys)."""
    from .stats import check_stats

    if stats is None or layer not in stats:
        have = sorted(stats) if stats else []
        raise ValueError(f"stats: no second-moment statistics for layer {layer} (have layers {have})")
    return check_stats(stats[layer], spec, layer, "stats").to(device=device, dtype=torch.float64)


def prepare(
    model: nn.Module,
    tok: Any,
    requests: Sequence[EditRequest | Mapping[str, Any]],
    hp: Any,
    stats: Mapping[int, Any] | None,
    spec: ModelSpec | None,
    templates: TemplateGroups | None,
    need_stats: bool = True,
) -> tuple[ModelSpec, list[EditRequest], dict[int, torch.Tensor], TemplateGroups]:
    """Validate everything before any expensive work: spec, layers, requests, statistics; then the
    context templates (generated, seeded, if not given)."""
    from .model import spec_for
    from .requests import as_request, validate_requests
    from .templates import context_templates

    spec = spec or spec_for(model)
    for layer in hp.layers:
        spec.check_layer(layer, "layers")
    if hp.v_loss_layer is not None:
        spec.check_layer(hp.v_loss_layer, "v_loss_layer")
    reqs = [as_request(r) for r in requests]
    if not reqs:
        raise ValueError("requests: nothing to edit")
    validate_requests(tok, reqs)
    device = model_device(model)
    covs = {layer: stats_matrix(stats, spec, layer, device) for layer in hp.layers} if need_stats else {}
    if templates is None:
        templates = context_templates(model, tok, hp.context_templates, hp.template_seed)
    if not templates or not templates[0] or templates[0][0] != "{}":
        raise ValueError("templates: the first template must be '{}'")
    return spec, reqs, covs, templates
