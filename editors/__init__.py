"""Fact editing in Hugging Face causal LMs: ROME, MEMIT, EMMET, AlphaEdit and ENCORE, with the
lifelong-editing settings NAS, PRUNE and RECT (:mod:`editors.algorithms`).

PyTorch and transformers only (no Ray, no MLflow), usable from a notebook::

    from editors import load_model, load_hparams, compute_deltas, apply_deltas
    model, tok = load_model()                      # the embedded SmolLM2-135M
    ...

Each algorithm's ``compute_deltas(model, tok, requests, hparams, stats)`` returns the weight updates
and leaves the model bit-identical; :func:`apply_deltas` writes them and returns what
:func:`restore` needs to undo them exactly. :func:`run_schedule` runs batch / sequential-batch /
sequential editing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .algorithms import ALGORITHMS
from .common import AlgorithmTraits, EditResult, EditState, apply_deltas, restore
from .config import ConfigError
from .hparams import (
    AlphaEditHParams,
    EditHParams,
    EMMETHParams,
    ENCOREHParams,
    MEMITHParams,
    ROMEHParams,
    check_algorithm,
    load_hparams,
)
from .model import ModelRef, ModelSpec, load_model, smollm2_path, spec_for
from .requests import EditRequest
from .schedule import BatchEvent, ScheduleResult, run_schedule
from .templates import TemplateCache


def traits(algorithm: str) -> AlgorithmTraits:
    """What ``algorithm`` declares of itself (value site, statistics, sharing of values)."""
    return ALGORITHMS[check_algorithm(algorithm)].TRAITS


def compute_deltas(
    algorithm: str,
    model: Any,
    tok: Any,
    requests: Sequence[EditRequest | Mapping[str, Any]],
    hparams: EditHParams,
    stats: Mapping[int, Any] | None,
    **kwargs: Any,
) -> EditResult:
    """Dispatch to ``editors.<algorithm>.compute_deltas`` (see there for the arguments)."""
    alg = check_algorithm(algorithm)
    return ALGORITHMS[alg].compute_deltas(model, tok, requests, hparams, stats, **kwargs)


__all__ = [
    "ALGORITHMS",
    "AlgorithmTraits",
    "AlphaEditHParams",
    "BatchEvent",
    "ConfigError",
    "EMMETHParams",
    "ENCOREHParams",
    "EditHParams",
    "EditRequest",
    "EditResult",
    "EditState",
    "MEMITHParams",
    "ModelRef",
    "ModelSpec",
    "ROMEHParams",
    "ScheduleResult",
    "TemplateCache",
    "apply_deltas",
    "compute_deltas",
    "load_hparams",
    "load_model",
    "restore",
    "run_schedule",
    "smollm2_path",
    "spec_for",
    "traits",
]
