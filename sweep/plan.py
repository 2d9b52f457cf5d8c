"""Sweep configs and the plan: which trials run, what is computed once and shared, what it will cost.

A sweep config (``sweep/configs/*.yaml``) holds a ``base`` trial config (see :mod:`sweep.trial`) and a
``grid`` of dotted keys to lists of values (``algorithm``, ``layers``, ``batch_size``, ``mode``, any
``hp.<name>``...). The plan expands the grid, validates every trial config before anything starts, and
works out the shared work: the statistics each model needs (one pass over all its layers) and, in
``batch`` mode, the target values each (model, value layer, value hyperparameters) group needs, once
per fact for the whole sweep.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from typing import Any

from editors.config import ConfigError, from_dict, load_yaml, merge, parse_overrides, to_dict
from editors.model import ModelRef, n_layers_of

from .trial import TrialConfig, needs_stats, parse_config, stats_keys, trial_hparams, values_shareable

#: Shapes of models a dry run may be asked about without network access to their config.
KNOWN_SHAPES = {
    "meta-llama/Meta-Llama-3-8B": {"n_layers": 32, "d_model": 4096, "d_key": 14336, "vocab": 128256, "params": 8.03e9},
    "meta-llama/Meta-Llama-3-8B-Instruct": {
        "n_layers": 32,
        "d_model": 4096,
        "d_key": 14336,
        "vocab": 128256,
        "params": 8.03e9,
    },
}


@dataclass(frozen=True)
class MlflowConfig:
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db
    experiment: str = "model-editing"


@dataclass(frozen=True)
class ResourcesConfig:
    cpu: float = 1.0  # per trial
    gpu: float = 0.0  # per trial; fractions share a card (small models only: Ray does not split VRAM)
    max_concurrent: int | None = None
    prepass_gpu: float | None = None  # GPUs of the statistics/values tasks (default: same as a trial)


@dataclass(frozen=True)
class EstimateConfig:
    tflops: float = 200.0  # sustained bf16 TFLOP/s assumed for the time estimate (H100: ~200-400)


@dataclass(frozen=True)
class SweepConfig:
    """A whole study: a base trial and a grid over its keys."""

    name: str
    base: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    retries: int = 1  # a failed trial is retried this many times
    storage: str = ".cache/ray_results"  # Tune's storage_path (S3/NFS on a multi-node cluster)
    values_store: str = ".cache/values"  # disk cache of shared target values
    share_stats: bool = True  # compute statistics once before the trials (off: each trial computes)
    share_values: bool = True  # compute batch-mode values once for the sweep (off: each trial does)
    values_chunk: int = 256  # facts per value-precompute task
    estimate: EstimateConfig = field(default_factory=EstimateConfig)


#: Config paths made absolute before the trials run (Tune moves trials into their own directories).
_PATHS = ("stats.store", "stats.corpus", "dataset.source", "dataset.sample_file", "model.source")


def _absolute(base: dict[str, Any]) -> dict[str, Any]:
    from pathlib import Path

    out = base
    for dotted in _PATHS:
        head, _, leaf = dotted.partition(".")
        value = (base.get(head) or {}).get(leaf)
        if not isinstance(value, str) or ":" in value.split("/")[0] or value == "demo":
            continue  # unset, a URL / hf: / embedded: source, or the demo set
        p = Path(value).expanduser()
        if dotted == "stats.store" or p.exists():
            out = _set(out, dotted, str(p.resolve()))
    return out


def load_sweep(path: str, overrides: list[str] = ()) -> SweepConfig:
    """A :class:`SweepConfig` from YAML plus ``key=value`` overrides (``base.n_edits=16``); relative
    paths of the base trial become absolute."""
    data = merge(load_yaml(path), parse_overrides(overrides))
    data["base"] = _absolute(data.get("base") or {})
    for k in ("storage", "values_store"):
        if isinstance(data.get(k), str) and "://" not in data[k]:
            from pathlib import Path

            data[k] = str(Path(data[k]).expanduser().resolve())
    cfg = from_dict(SweepConfig, data)
    if not cfg.name or not all(c.isalnum() or c in "-_" for c in cfg.name):
        raise ConfigError(f"name: {cfg.name!r} must be letters, digits, '-' or '_'")
    for key, values in cfg.grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"grid.{key}: expected a non-empty list of values")
    if cfg.retries < 0:
        raise ConfigError("retries: must be >= 0")
    return cfg


def _set(d: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    out = dict(d)
    head, _, rest = dotted.partition(".")
    out[head] = _set(dict(out.get(head) or {}), rest, value) if rest else value
    return out


def trial_key(cfg: TrialConfig) -> str:
    """A stable id of a trial config (resume and MLflow dedupe on it)."""
    return hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True, default=str).encode()).hexdigest()[:16]


def sweep_id(cfg: SweepConfig) -> str:
    return hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True, default=str).encode()).hexdigest()[:12]


def expand(cfg: SweepConfig) -> list[TrialConfig]:
    """Every trial of the grid, validated; an invalid combination names the grid key and values."""
    keys = list(cfg.grid)
    trials = []
    for combo in itertools.product(*(cfg.grid[k] for k in keys)):
        data = dict(cfg.base)
        for k, v in zip(keys, combo):
            data = _set(data, k, v)
        try:
            trials.append(parse_config(data))
        except ConfigError as e:
            where = ", ".join(f"{k}={v}" for k, v in zip(keys, combo))
            raise ConfigError(f"grid ({where}): {e}") from None
    if len({trial_key(t) for t in trials}) != len(trials):
        raise ConfigError("grid: two grid points give the same trial (a key repeats a base value?)")
    return trials


# ----------------------------------------------------------------------------------------------------
# Shared work


@dataclass(frozen=True)
class Shape:
    n_layers: int
    d_model: int
    d_key: int
    vocab: int
    params: float


@functools.lru_cache(maxsize=16)
def model_shape(source: str | None, gguf_file: str | None, revision: str | None) -> Shape:
    """The model's widths from its config (no weights), or from :data:`KNOWN_SHAPES` offline."""
    from pathlib import Path

    from editors.model import model_config

    if source in KNOWN_SHAPES and not Path(source).exists():
        return Shape(**KNOWN_SHAPES[source])  # no network round trip for the paper's model
    try:
        c = model_config(source, gguf_file=gguf_file, revision=revision)
    except (OSError, ValueError) as e:
        if source in KNOWN_SHAPES:
            return Shape(**KNOWN_SHAPES[source])
        raise ConfigError(f"base.model.source: cannot read the config of {source!r} ({e})") from None
    n = n_layers_of(c)
    d = getattr(c, "hidden_size", None) or c.n_embd
    dk = getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * d
    v = c.vocab_size
    # embeddings (+ untied head) + per layer: attention ~4d² (fewer with GQA) + MLP 3·d·dk
    kv = getattr(c, "num_key_value_heads", None) or getattr(c, "num_attention_heads", 1)
    heads = getattr(c, "num_attention_heads", 1)
    attn = 2 * d * d + 2 * d * d * kv / heads
    tied = getattr(c, "tie_word_embeddings", False)
    params = v * d * (1 if tied else 2) + n * (attn + 3 * d * dk)
    return Shape(n, d, dk, v, params)


def stats_group(t: TrialConfig) -> str:
    """Trials in one group share one statistics pass (same model and statistics settings)."""
    s = t.stats
    return json.dumps([to_dict(t.model), s.corpus, s.max_tokens, s.max_texts, s.dtype, s.store], sort_keys=True)


def values_group(t: TrialConfig) -> str:
    """Trials in one group share target values: model, value site and layer, value hparams, templates,
    dataset selection (values are per fact, so the group holds the union of its trials' facts)."""
    from editors.targets import ValueHParams

    hp = trial_hparams(t)
    vh = {k: getattr(hp, k) for k in ValueHParams.__dataclass_fields__}
    site = "rewrite" if t.algorithm == "rome" else "block"
    return json.dumps(
        [to_dict(t.model), site, hp.layers[-1], vh, hp.context_templates, hp.template_seed, to_dict(t.dataset)],
        sort_keys=True,
        default=str,
    )


@dataclass
class Plan:
    trials: list[TrialConfig]
    keys: list[str]
    stats: dict[str, dict[str, Any]]  # group -> {"trial": TrialConfig, "layers": [...], "cached": [...]}
    values: dict[str, dict[str, Any]]  # group -> {"trial": TrialConfig, "n_facts": int, "uses": int}
    estimates: list[dict[str, float]]

    def summary(self) -> dict[str, Any]:
        n_stats = sum(len(g["layers"]) for g in self.stats.values())
        n_cached = sum(len(g["cached"]) for g in self.stats.values())
        v_once = sum(g["n_facts"] for g in self.values.values())
        v_naive = sum(g["uses"] for g in self.values.values())
        return {
            "trials": len(self.trials),
            "statistics_layers": n_stats,
            "statistics_to_compute": n_stats - n_cached,
            "statistics_cached": n_cached,
            "values_to_optimise_shared": v_once,
            "values_without_sharing": v_naive,
        }


def make_plan(cfg: SweepConfig) -> Plan:
    """Expand, validate against the models' shapes, and count the shared work (no model is loaded)."""
    from editors.model import check_layer
    from editors.stats import StatsStore

    trials = expand(cfg)
    stats: dict[str, dict[str, Any]] = {}
    values: dict[str, dict[str, Any]] = {}
    estimates = []
    for t in trials:
        shape = model_shape(t.model.source, t.model.gguf_file, t.model.revision)
        hp = trial_hparams(t)
        for layer in hp.layers:
            try:
                check_layer(layer, shape.n_layers, "layers")
            except ValueError as e:
                raise ConfigError(f"trial {t.algorithm} {list(hp.layers)}: {e}") from None
        if needs_stats(t) and cfg.share_stats:
            g = stats.setdefault(stats_group(t), {"trial": t, "layers": set(), "cached": []})
            g["layers"].update(hp.layers)
        if values_shareable(t) and cfg.share_values:
            g = values.setdefault(values_group(t), {"trial": t, "n_facts": t.n_edits, "uses": 0})
            g["n_facts"] = max(g["n_facts"], t.n_edits)
            g["uses"] += t.n_edits
        shared = values_shareable(t) and cfg.share_values
        estimates.append(estimate(t, shape, cfg.estimate.tflops, values_shared=shared))
    for g in values.values():
        t = g["trial"]
        g["seconds"] = value_seconds(
            t, model_shape(t.model.source, t.model.gguf_file, t.model.revision), cfg.estimate.tflops, g["n_facts"]
        )
    for g in stats.values():
        g["layers"] = sorted(g["layers"])
        t = g["trial"]
        if t.stats.store:
            keys = stats_keys(t, g["layers"], ModelRef(t.model.source, t.model.gguf_file, t.model.revision).identity())
            store = StatsStore(t.stats.store)
            g["cached"] = [layer for layer, k in keys.items() if k in store]
    return Plan(trials, [trial_key(t) for t in trials], stats, values, estimates)


def value_seconds(t: TrialConfig, shape: Shape, tflops: float, n_facts: int) -> float:
    """Time of the target-value optimisation of ``n_facts`` facts: 6 · params · tokens per step (forward +
    backward) × steps, with ~12 tokens per prompt after the cached prefix."""
    hp = trial_hparams(t)
    n_prompts = {"rome": 21, "memit": 6, "none": 1}[hp.context_templates] + 1
    return 6 * shape.params * n_facts * n_prompts * 12 * hp.v_num_grad_steps / (tflops * 1e12)


def estimate(t: TrialConfig, shape: Shape, tflops: float, values_shared: bool = False) -> dict[str, float]:
    """Rough GPU memory (GB) and time (s) of a trial, from shapes alone.

    Memory: weights in the model dtype + C of each edited layer (fp32) and its fp64 solve copy + the value
    optimisation's saved activations (rows × ~12 tokens after the cached prefix × layers above the edit
    × ~(10·d + 4·dk) values in the model dtype). Time: the value optimisation (none when the sweep shares
    the values) plus the scoring forwards (2 · params per token; pre, at edit and, in sequential modes,
    final).
    """
    hp = trial_hparams(t)
    bytes_w = 2 if t.model.dtype in ("bfloat16", "bf16", "float16", "fp16") else 4
    n_prompts = {"rome": 21, "memit": 6, "none": 1}[hp.context_templates] + 1
    rows = min(t.batch_size, hp.value_batch) * n_prompts
    above = shape.n_layers - hp.layers[-1]
    act = rows * 12 * above * (10 * shape.d_model + 4 * shape.d_key) * bytes_w
    stats_mem = len(hp.layers) * shape.d_key**2 * (4 + 8)
    mem = shape.params * bytes_w + stats_mem + act
    values = 0.0 if values_shared else value_seconds(t, shape, tflops, t.n_edits)
    score = 2 * shape.params * t.n_edits * 13 * 2 * 20 * (2 if t.mode == "batch" else 3) / (tflops * 1e12)
    return {"gpu_memory_gb": mem / 1e9, "time_s": values + score, "value_steps": float(hp.v_num_grad_steps)}


def format_plan(cfg: SweepConfig, plan: Plan) -> str:
    s = plan.summary()
    lines = [f"sweep {cfg.name}: {s['trials']} trials (id {sweep_id(cfg)})"]
    lines.append(
        f"{'#':>3} {'algorithm':<10} {'layers':<10} {'B':>5} {'mode':<17} {'n':>5} {'GPU GB':>7} {'est. s':>8}  hp"
    )
    for i, (t, e) in enumerate(zip(plan.trials, plan.estimates)):
        hp = ", ".join(f"{k}={v}" for k, v in t.hp.items())
        lines.append(
            f"{i:>3} {t.algorithm:<10} {list(trial_hparams(t).layers)!s:<10} {t.batch_size:>5} "
            f"{t.mode:<17} {t.n_edits:>5} {e['gpu_memory_gb']:>7.1f} {e['time_s']:>8.0f}  {hp}"
        )
    lines.append(
        f"statistics: {s['statistics_layers']} layer(s), {s['statistics_to_compute']} to compute, "
        f"{s['statistics_cached']} cached"
    )
    lines.append(
        f"target values: {s['values_to_optimise_shared']} optimisations shared across trials "
        f"(instead of {s['values_without_sharing']} without sharing)"
    )
    total = sum(e["time_s"] for e in plan.estimates) + sum(g["seconds"] for g in plan.values.values())
    lines.append(
        f"estimated trial time: {total / 3600:.2f} GPU-hours at {cfg.estimate.tflops:g} TFLOP/s sustained "
        f"(rough; shared values included, statistics not)"
    )
    return "\n".join(lines)
