"""What runs inside Ray workers: the model cache, the shared-work tasks and the trial trainable.

Ray API calls of the sweep live here and in :mod:`sweep.launch`/:mod:`sweep.tracking` only.

- The model is loaded once per worker process (:func:`cached_model`); with Tune's actor reuse every
  trial of that worker gets the same model, whose edited weights ``run_trial`` restores exactly.
- Statistics and batch-mode target values are computed by tasks before the trials start and reach the
  trials as object-store references: each matrix is stored once, and workers on one node read it
  zero-copy (read-only numpy views of shared memory).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from editors.model import ModelRef
from editors.stats import StatsStore, get_or_compute

from .trial import ModelConfig, TrialConfig, compute_stats, parse_config, resolve_device, run_trial, stats_keys
from .trial import value_key as _value_key

log = logging.getLogger(__name__)

#: Set to a file path to make the first trial that reaches its first batch kill its own worker
#: process (once: the file marks that it happened). Fault-injection for the retry test.
CHAOS_ENV = "MODEL_EDITING_CHAOS_KILL_ONCE"

_MODELS: dict[tuple, tuple[Any, Any]] = {}  # per worker process: (source, gguf, revision, dtype, device)


def cached_model(mc: ModelConfig) -> tuple[Any, Any]:
    """The model and tokenizer of ``mc``, loaded once per process."""
    return _cached_model(mc)[:2]


def _cached_model(mc: ModelConfig) -> tuple[Any, Any, float]:
    """(model, tokenizer, seconds this call spent loading: 0 when the process had it already)."""
    import time

    from editors import load_model

    device = resolve_device(mc.device)
    key = (mc.source, mc.gguf_file, mc.revision, mc.dtype, device)
    if key in _MODELS:
        return (*_MODELS[key], 0.0)
    _MODELS.clear()  # one model per worker: a new model replaces the old one
    t = time.perf_counter()
    _MODELS[key] = load_model(mc.source, gguf_file=mc.gguf_file, revision=mc.revision, dtype=mc.dtype, device=device)
    return (*_MODELS[key], time.perf_counter() - t)


def model_identity(mc: ModelConfig) -> str:
    return ModelRef(mc.source, mc.gguf_file, mc.revision).identity()


def stats_task(trial: dict[str, Any], layers: list[int]) -> list[Any]:
    """Statistics of ``layers`` for the trial's model and corpus: from the disk store where present,
    the rest in ONE pass. Returns one float32/64 numpy array per layer, then the list of layers that
    were computed (so the driver can count)."""
    cfg = parse_config(trial)

    def compute(missing_layers: list[int]) -> dict[int, Any]:
        model, tok = cached_model(cfg.model)  # loaded only when something is missing from the store
        return compute_stats(cfg, model, tok, missing_layers, False)

    if cfg.stats.store:
        keys = stats_keys(cfg, layers, model_identity(cfg.model))
        store = StatsStore(cfg.stats.store)
        missing = [layer for layer in layers if keys[layer] not in store]
        got = get_or_compute(store, keys, compute)
    else:
        missing = list(layers)
        got = compute(layers)
    return [got[layer].mom2.cpu().numpy() for layer in layers] + [missing]


def values_task(trial: dict[str, Any], case_ids: list[int]) -> np.ndarray:
    """Batch-mode target values v* [n, d_model] of ``case_ids`` on the unedited model."""
    from editors import spec_for
    from editors.targets import optimize_values
    from editors.templates import TemplateCache, flat

    from .data import load_counterfact, select
    from .trial import trial_hparams

    cfg = parse_config(trial)
    hp = trial_hparams(cfg)
    model, tok = cached_model(cfg.model)
    records = select(load_counterfact(cfg.dataset.source, cfg.dataset.sha256), case_ids=case_ids)
    tpl = TemplateCache().get(model, tok, hp.context_templates, hp.template_seed)
    site = "rewrite" if cfg.algorithm == "rome" else "block"
    v = optimize_values(
        model,
        tok,
        spec_for(model),
        hp.layers[-1],
        [r.request() for r in records],
        flat(tpl),
        hp,
        at=site,
        max_requests=hp.value_batch,
    )
    return v.values.float().cpu().numpy()


def _as_tensor(a: Any) -> torch.Tensor:
    """A torch view of a (read-only, zero-copy) numpy array from the object store."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "non-writable tensors": the solvers copy anyway
        return torch.from_numpy(a)


def trainable(
    config: dict[str, Any], stats_refs: dict[str, Any], values_refs: dict[str, Any], trials: dict[str, Any]
) -> None:
    """One Tune trial: ``config["point"]["key"]`` names the trial config in ``trials`` (the grid point's
    other fields are for Tune's progress table).

    Reports one intermediate result per batch (edits, S/ES/PS/NS so far) and a final result with the
    trial's scalar metrics and a checkpoint holding the full JSON result.
    """
    import ray
    from ray import tune

    from .plan import stats_group, values_group
    from .trial import trial_hparams

    key = config["point"]["key"]
    cfg: TrialConfig = parse_config(trials[key])
    hp = trial_hparams(cfg)
    model, tok, load_s = _cached_model(cfg.model)
    stats = None
    group = stats_refs.get(stats_group(cfg))
    zero_copy = None
    if group is not None:
        arrays = {layer: ray.get(group[layer]) for layer in hp.layers}
        zero_copy = all(not a.flags.writeable and not a.flags.owndata for a in arrays.values())
        stats = {layer: _as_tensor(a) for layer, a in arrays.items()}
    values_cache = None
    vg = values_refs.get(values_group(cfg))
    if vg is not None:
        case_ids, ref = vg
        arr = ray.get(ref)
        mid = model_identity(cfg.model)
        values_cache = {_value_key(cfg, hp, mid, cid): _as_tensor(arr[i]) for i, cid in enumerate(case_ids)}

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

    result = run_trial(
        cfg, model=model, tok=tok, stats=stats, values_cache=values_cache, on_batch=on_batch, progress=False
    )
    result["trial_key"] = key
    result["timings"]["load"] = load_s  # 0 when an earlier trial of this worker loaded the model
    result["node"] = ray.get_runtime_context().get_node_id()
    result["pid"] = os.getpid()
    result["stats_zero_copy"] = zero_copy  # a read-only view of the object store, not a per-trial copy
    final = {f"{stage}.{k}": v for stage, m in result["metrics"].items() for k, v in m.items()}
    with tempfile.TemporaryDirectory() as d:
        Path(d, "result.json").write_text(json.dumps(result, default=str))
        tune.report(
            {"edits": cfg.n_edits, **{m: result["metrics"]["final"][m] for m in ("s", "es", "ps", "ns")}, **final},
            checkpoint=tune.Checkpoint.from_directory(d),
        )
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
