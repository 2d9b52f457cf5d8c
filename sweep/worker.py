"""What runs inside Ray workers: the model cache, the shared-work tasks and the trial trainable.

Ray API calls of the sweep live here and in :mod:`sweep.launch`/:mod:`sweep.tracking` only.

- The model is loaded once per worker process (:func:`cached_model`); with Tune's actor reuse every
  trial of that worker gets the same model, whose edited weights ``run_trial`` restores exactly.
- The shared work (statistics, batch-mode target values, pre-edit scores) is computed by the tasks here
  (their bodies are :mod:`sweep.prepass`'s functions; :func:`sweep.launch.run_prepass` submits them),
  each storing its result before it returns, and reaches each trial as object-store references
  (:class:`TrialRefs`): each matrix is stored once, and workers on one node read it zero-copy
  (read-only numpy views of shared memory).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from editors.store import claim, part_name

from .config import ModelConfig, TrialConfig, parse_config, resolve_device, trial_hparams
from .data import load_counterfact, select
from .prepass import compute_ppl, compute_scores, compute_values, stats_from_store
from .shared import (
    ScoresStore,
    TrialInputs,
    ValuesStore,
    model_identity,
    ppl_key,
    record_digest,
    request_digest,
    scores_key,
    stats_dtype,
    values_key,
)
from .trial import run_trial

log = logging.getLogger(__name__)
T = TypeVar("T")

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


# ----------------------------------------------------------------------------------------------------
# The shared-work tasks (bodies in sweep.prepass; each stores its result before returning)


def stats_pass_task(trial: dict[str, Any], layers: list[int]) -> list[Any]:
    """One statistics pass (or store read): one numpy [d_key, d_key] array per layer, then a dict
    ``{"seconds": s, "computed": [...], "tokens": {layer: n}, "converged": bool | None}``."""
    cfg = parse_config(trial)
    t0 = time.perf_counter()
    got, computed = stats_from_store(cfg, layers, lambda: cached_model(cfg.model, stats_dtype(cfg)))
    meta = {
        "seconds": time.perf_counter() - t0,
        "computed": computed,
        "tokens": {layer: got[layer].n_tokens for layer in layers},
        "converged": got[layers[0]].converged,
    }
    return [got[layer].mom2.cpu().numpy() for layer in layers] + [meta]


def _chunk_once(path: Path, stored: Callable[[], T | None], compute: Callable[[], T]) -> T:
    """A chunk of a store computed once among the processes sharing it: what another process stored
    (``stored()``, None while missing), else ``compute()`` (which stores it) under the chunk's claim."""
    with claim(path, lambda: stored() is not None):
        got = stored()
        return got if got is not None else compute()


def values_task(trial: dict[str, Any], case_ids: list[int], store: str | None) -> tuple[np.ndarray, float]:
    """(target values [n, d_model] of ``case_ids``, seconds), written to the values store before returning
    (two returns: the values' reference goes to the trials, the seconds to the driver's counters)."""
    cfg = parse_config(trial)
    t0 = time.perf_counter()
    records = select(load_counterfact(cfg.dataset.source, cfg.dataset.sha256), case_ids=case_ids)

    def compute() -> torch.Tensor:
        model, tok = cached_model(cfg.model)
        v = compute_values(cfg, model, tok, records)
        if store:
            vs.put(key, digests, v)
        return v

    if not store:
        return compute().numpy(), time.perf_counter() - t0
    key = values_key(cfg, trial_hparams(cfg), model_identity(cfg.model))
    digests = [request_digest(r.request()) for r in records]
    vs = ValuesStore(store)

    def stored() -> torch.Tensor | None:
        got = vs.get(key, digests)
        return torch.stack([got[d] for d in digests]) if len(got) == len(digests) else None

    v = _chunk_once(vs.store.path(key, part_name(digests)), stored, compute)
    return v.numpy(), time.perf_counter() - t0


def scores_task(trial: dict[str, Any], case_ids: list[int], store: str | None) -> tuple[list[dict[str, float]], float]:
    """(pre-edit score fields of ``case_ids``, one dict per record; seconds), written to the scores store."""
    cfg = parse_config(trial)
    t0 = time.perf_counter()
    records = select(load_counterfact(cfg.dataset.source, cfg.dataset.sha256), case_ids=case_ids)

    def compute() -> list[dict[str, float]]:
        model, tok = cached_model(cfg.model)
        scores = compute_scores(cfg, model, tok, records)
        if store:
            ss.put(key, digests, scores)
        return [s.fields() for s in scores]

    if not store:
        return compute(), time.perf_counter() - t0
    key = scores_key(cfg, model_identity(cfg.model))
    digests = [record_digest(r) for r in records]
    ss = ScoresStore(store)

    def stored() -> list[dict[str, float]] | None:
        got = ss.get(key, digests)
        return [got[d] for d in digests] if len(got) == len(digests) else None

    rows = _chunk_once(ss.store.path(key, part_name(digests), ext="json"), stored, compute)
    return rows, time.perf_counter() - t0


def ppl_task(trial: dict[str, Any], store: str | None) -> float:

    cfg = parse_config(trial)
    model, tok = cached_model(cfg.model)
    value = compute_ppl(cfg, model, tok)
    if store:
        ScoresStore(store).put_ppl(ppl_key(cfg, model_identity(cfg.model)), value)
    return value


# ----------------------------------------------------------------------------------------------------
# A trial


@dataclass
class TrialRefs:
    """A trial's shared inputs as object-store references (resolved by :func:`resolve`)."""

    stats: dict[int, Any] = field(default_factory=dict)
    stats_meta: dict[int, Any] = field(default_factory=dict)  # layer -> its pass's metadata
    values: list[tuple[tuple[str, ...], Any]] = field(default_factory=list)
    scores: list[tuple[tuple[str, ...], Any]] = field(default_factory=list)
    ppl: Any = None


def resolve(refs: TrialRefs) -> TrialInputs:
    """A trial's :class:`TrialInputs` from its references (inside the trial's worker)."""
    import ray

    def as_tensor(a: Any) -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only zero-copy views; the solvers copy
            return torch.from_numpy(a)

    inputs = TrialInputs(counts={})
    if refs.stats:
        arrays = {layer: ray.get(r) for layer, r in refs.stats.items()}
        inputs.stats = {layer: as_tensor(a) for layer, a in arrays.items()}
        metas = {layer: ray.get(r) for layer, r in refs.stats_meta.items()}
        inputs.stats_tokens = {layer: int(m["tokens"][layer]) for layer, m in metas.items()}
        inputs.counts["stats_reused"] = len(arrays)
        inputs.counts["stats_zero_copy"] = int(all(not a.flags.writeable for a in arrays.values()))
    for ds, ref in refs.values:
        arr = ray.get(ref)
        inputs.values.update({d: as_tensor(arr[i]) for i, d in enumerate(ds)})
    for ds, ref in refs.scores:
        rows = ray.get(ref)
        inputs.pre_scores.update(dict(zip(ds, rows)))
    if refs.ppl is not None:
        inputs.pre_ppl = float(refs.ppl if isinstance(refs.ppl, (int, float)) else ray.get(refs.ppl))
    return inputs


def trainable(config: dict[str, Any], refs: dict[str, Any], trials: dict[str, Any]) -> None:
    """One Tune trial: ``config["point"]["key"]`` names the trial config in ``trials`` and its shared
    inputs in ``refs`` (:class:`sweep.prepass.TrialRefs`; the grid point's other fields are for Tune's
    progress table).

    Reports one intermediate result per batch (edits, S/ES/PS/NS so far) and a final result with the
    trial's scalar metrics and a checkpoint holding the full JSON result.
    """
    import ray
    from ray import tune

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
                **{f"curve.{k}": v for k, v in point.items() if isinstance(v, (int, float))},
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
