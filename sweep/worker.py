"""What runs inside Ray workers: the model cache, the shared-work tasks and the trial trainable.

Ray API calls of the sweep live here and in :mod:`sweep.launch`/:mod:`sweep.tracking` only.

- The model is loaded once per worker process (:func:`cached_model`); with Tune's actor reuse every
  trial of that worker gets the same model, whose edited weights ``run_trial`` restores exactly.
- The shared work (statistics, batch-mode target values, pre-edit scores) is computed by the pre-pass's
  tasks (:mod:`sweep.prepass`) and reaches each trial as object-store references: each matrix is
  stored once, and workers on one node read it zero-copy (read-only numpy views of shared memory).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import tempfile
from pathlib import Path
from typing import Any

import torch

from .trial import ModelConfig, TrialConfig, parse_config, resolve_device, run_trial

log = logging.getLogger(__name__)

#: Set to a file path to make the first trial that reaches its first batch kill its own worker
#: process (once: the file marks that it happened). Fault-injection for the retry test.
CHAOS_ENV = "MODEL_EDITING_CHAOS_KILL_ONCE"

_MODELS: dict[tuple, tuple[Any, Any]] = {}  # per worker process: (source, gguf, revision, dtype, device)


def cached_model(mc: ModelConfig, dtype: str | None = None) -> tuple[Any, Any]:
    """The model and tokenizer of ``mc`` (in ``dtype``, default ``mc.dtype``), loaded once per process."""
    return _cached_model(mc, dtype)[:2]


def _cached_model(mc: ModelConfig, dtype: str | None = None) -> tuple[Any, Any, float]:
    """(model, tokenizer, seconds this call spent loading: 0 when the process had it already)."""
    import time

    from editors import load_model

    device = resolve_device(mc.device)
    dtype = dtype or mc.dtype
    key = (mc.source, mc.gguf_file, mc.revision, dtype, device)
    if key in _MODELS:
        return (*_MODELS[key], 0.0)
    _MODELS.clear()  # one model per worker: a new model replaces the old one
    t = time.perf_counter()
    _MODELS[key] = load_model(mc.source, gguf_file=mc.gguf_file, revision=mc.revision, dtype=dtype, device=device)
    return (*_MODELS[key], time.perf_counter() - t)


def trainable(config: dict[str, Any], refs: dict[str, Any], trials: dict[str, Any]) -> None:
    """One Tune trial: ``config["point"]["key"]`` names the trial config in ``trials`` and its shared
    inputs in ``refs`` (:class:`sweep.prepass.TrialRefs`; the grid point's other fields are for Tune's
    progress table).

    Reports one intermediate result per batch (edits, S/ES/PS/NS so far) and a final result with the
    trial's scalar metrics and a checkpoint holding the full JSON result.
    """
    import ray
    from ray import tune

    from .prepass import resolve

    key = config["point"]["key"]
    cfg: TrialConfig = parse_config(trials[key])
    model, tok, load_s = _cached_model(cfg.model)
    inputs = resolve(refs[key])
    zero_copy = bool(inputs.counts.pop("stats_zero_copy")) if "stats_zero_copy" in inputs.counts else None

    chaos = os.environ.get(CHAOS_ENV)

    def on_batch(point: dict[str, Any]) -> None:
        if chaos and not Path(chaos).exists():
            Path(chaos).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        tune.report(
            {
                "edits": point["edits"],
                "s": point["at_edit_s"],
                "es": point["at_edit_es"],
                "ps": point["at_edit_ps"],
                "ns": point["at_edit_ns"],
            }
        )

    result = run_trial(cfg, model=model, tok=tok, inputs=inputs, on_batch=on_batch, progress=False)
    result.trial_key = key
    result.timings["load"] = load_s  # 0 when an earlier trial of this worker loaded the model
    result.node = ray.get_runtime_context().get_node_id()
    result.pid = os.getpid()
    result.stats_zero_copy = zero_copy  # a read-only view of the object store, not a per-trial copy
    with tempfile.TemporaryDirectory() as d:
        Path(d, "result.json").write_text(json.dumps(result.to_dict(), default=str))
        tune.report(
            {
                "edits": cfg.n_edits,
                **{m: result.metrics["final"][m] for m in ("s", "es", "ps", "ns")},
                **result.flat_metrics(),
            },
            checkpoint=tune.Checkpoint.from_directory(d),
        )
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
