"""What the shared work runs inside Ray workers: the per-process model cache, the GPU check and the tasks.

- The model is loaded once per worker process (:func:`cached_model`); with Tune's actor reuse every
  trial of that worker gets the same model, whose edited weights ``run_trial`` restores exactly (the
  trainable, :mod:`sweep.tune.trainable`, uses the same cache).
- The tasks only compute: their bodies are :mod:`sweep.shared.compute`'s ``compute_*`` functions,
  and they *return* their results, which :func:`sweep.shared.fulfil.fulfil_ray` (in the driver) writes to
  the stores and hands to the trials as copies it puts itself. No task writes to its node's disk and none
  of its results stays in its node's object store, so a worker node that shares no disk with the
  driver, or is gone, loses nothing. A task given a GPU runs in a process of its own that exits after
  it (``RayBackend``: ``max_calls=1``), so the model it cached here and its CUDA memory go with it.
- A task or trial that Ray gave a GPU but that sees no CUDA device fails at once (:func:`require_gpu`):
  it never falls back to the CPU.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from ..config import ModelConfig, parse_config, resolve_device
from .compute import compute_ppl, compute_probes, compute_scores, compute_stats, compute_stats_part, compute_values
from .keys import stats_dtype
from .mirror import loadable

log = logging.getLogger(__name__)

_MODELS: dict[tuple, tuple[Any, Any]] = {}  # per worker process: (source, gguf, revision, dtype, device)


class NoGPU(RuntimeError):
    """Ray gave this process a GPU, but torch sees no CUDA device on its node."""


def require_gpu() -> None:
    """Raise :class:`NoGPU`, naming the node and the fix, when Ray assigned this task or actor a GPU
    that torch cannot see (a node started without the NVIDIA runtime still advertises its ``GPU``
    resource; ``device: auto`` would then quietly run an 8B model on the CPU)."""
    import ray

    ids = ray.get_gpu_ids()
    if ids and not torch.cuda.is_available():
        node = ray.util.get_node_ip_address()
        raise NoGPU(
            f"node {node}: Ray assigned GPU {ids} (resources.gpu) but torch {torch.__version__} sees no CUDA "
            f"device (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); fix the node: an "
            "NVIDIA-driver AMI and the NVIDIA container runtime (cluster.yaml, docs/CLUSTER.md), a CUDA build "
            "of torch; or set resources.gpu: 0 to run on CPUs"
        )


def cached_model(mc: ModelConfig, dtype: str | None = None) -> tuple[Any, Any]:
    """The model and tokenizer of ``mc`` (in ``dtype``, default ``mc.dtype``), loaded once per process."""
    return _cached_model(mc, dtype)[:2]


def _cached_model(mc: ModelConfig, dtype: str | None = None) -> tuple[Any, Any, float]:
    """(model, tokenizer, seconds this call spent loading: 0 when the process had it already)."""
    from editors import load_model

    require_gpu()
    mc = loadable(mc)  # a mirrored model: this node's checked copy
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
# The shared-work tasks (submitted by sweep.shared.fulfil.RayBackend; they return, the driver stores)


def stats_task(trial: dict[str, Any], layers: list[int], part: dict[str, Any] | None = None) -> Iterator[Any]:
    """A statistics pass, or one part of it: one numpy [d_key, d_key] array per layer (in the pass's
    accumulation dtype), then ``{"seconds", "tokens": {layer: n}, "converged", "history"}``.

    ``part`` (an :class:`editors.stats.StreamSlice` as a dict): the raw sums Σ k kᵀ of that part of the
    stream, which the driver adds over the parts and divides; None: the whole pass's C with its
    convergence check (``stats.tolerance``). A generator: Ray stores each layer's array as it is
    yielded, so this process holds one layer's host copy at a time (a 29-layer pass of Llama-3-8B is 24 GB).
    """
    from editors.stats import StreamSlice

    cfg = parse_config(trial)
    t0 = time.perf_counter()
    model, tok = cached_model(cfg.model, stats_dtype(cfg))
    meta: dict[str, Any] = {"converged": None, "history": []}
    got: dict[int, Any]
    if part is None:
        got = compute_stats(cfg, model, tok, layers, progress=False)
        meta.update(converged=got[layers[0]].converged, history=[list(h) for h in got[layers[0]].history])
        mats = {layer: got[layer].mom2 for layer in layers}
    else:
        got = compute_stats_part(cfg, model, tok, layers, StreamSlice(**part), progress=False)
        mats = {layer: got[layer].sums for layer in layers}
    meta.update(seconds=time.perf_counter() - t0, tokens={layer: got[layer].n_tokens for layer in layers})
    del got
    for layer in layers:
        yield mats.pop(layer).cpu().numpy()  # the device's copy goes with it
    yield meta


def values_task(trial: dict[str, Any], records: list[Any]) -> tuple[np.ndarray, float]:
    """(target values [n, d_model] float32 of ``records`` on the unedited model, seconds); two returns:
    the values' reference goes to the trials, the seconds to the work counters."""
    cfg = parse_config(trial)
    t0 = time.perf_counter()
    model, tok = cached_model(cfg.model)
    return compute_values(cfg, model, tok, records).numpy(), time.perf_counter() - t0


def scores_task(trial: dict[str, Any], records: list[Any]) -> tuple[list[dict[str, float]], float]:
    """(pre-edit score fields of ``records``, one dict per record; seconds)."""
    cfg = parse_config(trial)
    t0 = time.perf_counter()
    model, tok = cached_model(cfg.model)
    return compute_scores(cfg, model, tok, records), time.perf_counter() - t0


def ppl_task(trial: dict[str, Any]) -> tuple[float, float]:
    """(the unedited model's held-out perplexity, seconds)."""
    cfg = parse_config(trial)
    t0 = time.perf_counter()
    model, tok = cached_model(cfg.model)
    return compute_ppl(cfg, model, tok), time.perf_counter() - t0


def probes_task(trial: dict[str, Any]) -> tuple[dict[str, float], float]:
    """(the unedited model's capability probes, seconds)."""
    cfg = parse_config(trial)
    t0 = time.perf_counter()
    model, tok = cached_model(cfg.model)
    return compute_probes(cfg, model, tok), time.perf_counter() - t0


def gpu_memory_task() -> dict[str, Any]:
    """The node's first CUDA device: ``{"node", "name", "total_gb"}`` (planning asks one GPU node)."""
    import ray

    require_gpu()
    props = torch.cuda.get_device_properties(0)
    return {"node": ray.util.get_node_ip_address(), "name": props.name, "total_gb": props.total_memory / 1e9}
