"""Sweep configs and the plan: which trials run, what is computed once and shared, what it will cost.

A sweep config (``sweep/configs/*.yaml``) holds a ``base`` trial config (see :mod:`sweep.trial`) and a
``grid`` of dotted keys to lists of values (``algorithm``, ``layers``, ``batch_size``, ``mode``, any
``hp.<name>``...). The plan expands the grid, validates every trial config before anything starts, and
hands the shared work to :func:`sweep.prepass.plan_shared` (statistics passes under a memory budget,
target values and pre-edit scores once per fact), and estimates what it will cost.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
from dataclasses import dataclass, field
from typing import Any

from editors import traits
from editors.config import ConfigError, from_dict, load_yaml, merge, parse_overrides, to_dict
from editors.model import n_layers_of
from editors.templates import N_TEMPLATES

from .prepass import SharedPlan, plan_shared, score_seconds, value_seconds
from .shared import stats_dtype
from .trial import TrialConfig, parse_config, trial_hparams

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
    gpu_memory_gb: float | None = None  # a worker's device memory for statistics passes (None: the driver's GPU)


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
    scores_store: str = ".cache/scores"  # disk cache of pre-edit scores and perplexities
    share_stats: bool = True  # compute statistics once before the trials (off: each trial computes)
    share_values: bool = True  # compute batch-mode values once for the sweep (off: each trial does)
    share_scores: bool = True  # score the unedited model once per fact for the sweep (off: each trial does)
    values_chunk: int = 256  # facts per value / pre-score task (each stored as it finishes)
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
    for k in ("storage", "values_store", "scores_store"):
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
    if cfg.values_chunk < 1:
        raise ConfigError(f"values_chunk: must be >= 1, got {cfg.values_chunk}")
    if cfg.resources.gpu_memory_gb is not None and cfg.resources.gpu_memory_gb <= 0:
        raise ConfigError(f"resources.gpu_memory_gb: must be > 0, got {cfg.resources.gpu_memory_gb}")
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


@dataclass
class Plan:
    trials: list[TrialConfig]
    keys: list[str]
    shared: SharedPlan
    estimates: list[dict[str, float]]
    shared_seconds: dict[str, float]  # "statistics", "values", "scores": estimated pre-pass time

    def summary(self) -> dict[str, Any]:
        return {"trials": len(self.trials), **self.shared.counts()}


def make_plan(cfg: SweepConfig, dry_run: bool = False) -> Plan:
    """Expand, validate against the models' shapes, and plan the shared work (no model is loaded;
    ``dry_run``: see :func:`sweep.prepass.plan_shared`)."""
    from editors.model import check_layer

    trials = expand(cfg)
    keys = [trial_key(t) for t in trials]
    for t in trials:
        shape = model_shape(t.model.source, t.model.gguf_file, t.model.revision)
        for layer in trial_hparams(t).layers:
            try:
                check_layer(layer, shape.n_layers, "layers")
            except ValueError as e:
                raise ConfigError(f"trial {t.algorithm} {list(trial_hparams(t).layers)}: {e}") from None
    shared = plan_shared(cfg, trials, keys, dry_run)
    tflops = cfg.estimate.tflops
    estimates = [
        estimate(t, model_shape(t.model.source, t.model.gguf_file, t.model.revision), tflops, shared.needs[k])
        for k, t in zip(keys, trials)
    ]
    seconds = {"statistics": sum(p.seconds for p in shared.passes if not p.read_only)}
    seconds["values"] = sum(
        value_seconds(j.trial, _shape(j.trial), tflops, len(j.missing())) for j in shared.values.values()
    )
    seconds["scores"] = sum(score_seconds(_shape(j.trial), len(j.missing()), tflops) for j in shared.scores.values())
    return Plan(trials, keys, shared, estimates, seconds)


def _shape(t: TrialConfig) -> Shape:
    return model_shape(t.model.source, t.model.gguf_file, t.model.revision)


def estimate(t: TrialConfig, shape: Shape, tflops: float, needs: Any = None) -> dict[str, float]:
    """Rough GPU memory (GB) and time (s) of a trial, from shapes alone.

    Memory: weights in the model dtype + C of each edited layer (fp32) and its fp64 solve copy + the value
    optimisation's saved activations (rows × ~12 tokens after the cached prefix × layers above the edit
    × ~(10·d + 4·dk) values in the model dtype). Time: the value optimisation (none when the sweep shares
    the values) plus the scoring forwards (at edit and, in sequential modes, final; pre-edit scores
    only when the sweep does not share them).
    """
    hp = trial_hparams(t)
    bytes_w = 2 if t.model.dtype in ("bfloat16", "bf16", "float16", "fp16") else 4
    n_prompts = N_TEMPLATES[hp.context_templates] + 1
    rows = min(t.batch_size, hp.value_batch) * n_prompts
    above = shape.n_layers - hp.layers[-1]
    act = rows * 12 * above * (10 * shape.d_model + 4 * shape.d_key) * bytes_w
    stats_mem = len(hp.layers) * shape.d_key**2 * (4 + 8) if traits(t.algorithm).needs_stats(hp) else 0
    mem = shape.params * bytes_w + stats_mem + act
    values_shared = needs is not None and needs.values is not None
    scores_shared = needs is not None and needs.scores is not None
    values = 0.0 if values_shared else value_seconds(t, shape, tflops, t.n_edits)
    rounds = (1 if t.mode == "batch" else 2) + (1 if t.scoring.pre and not scores_shared else 0)
    score = score_seconds(shape, t.n_edits, tflops) * rounds
    return {"gpu_memory_gb": mem / 1e9, "time_s": values + score, "value_steps": float(hp.v_num_grad_steps)}


def _fmt_s(x: float) -> str:
    if math.isnan(x):
        return "?"
    if x < 10:
        return f"{x:.1f} s"
    return f"{x / 3600:.2f} h" if x >= 3600 else f"{x:.0f} s"


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
    sh = plan.shared
    budget = f"{sh.budget_gb:g} GB per worker" if sh.budget_gb is not None else "no memory budget set"
    lines.append(
        f"statistics: {s['statistics_layers']} layer(s), {s['statistics_to_compute']} to compute in "
        f"{s['statistics_passes']} pass(es), {s['statistics_cached']} cached ({budget})"
    )
    for p in sh.passes:
        if p.read_only:
            lines.append(f"  read from the store: layers {list(p.layers)}")
        else:
            tok = p.trial.stats.max_tokens or (p.trial.stats.max_texts and f"{p.trial.stats.max_texts} texts")
            lines.append(
                f"  pass: layers {_span(p.layers)} ({len(p.layers)}), {p.memory_gb:.1f} GB, "
                f"~{_fmt_s(p.seconds)} ({tok or 'whole corpus'}, weights {stats_dtype(p.trial)})"
            )
    lines.append(
        f"target values: {s['values_to_optimise_shared']} to optimise, {s['values_cached']} stored "
        f"(instead of {s['values_without_sharing']} without sharing)"
    )
    lines.append(
        f"pre-edit scores: {s['scores_to_compute']} facts to score, {s['scores_cached']} stored "
        f"(instead of {s['scores_without_sharing']} without sharing)"
    )
    trials_s = sum(e["time_s"] for e in plan.estimates)
    sec = plan.shared_seconds
    total = trials_s + sec["statistics"] + sec["values"] + sec["scores"]
    lines.append(
        f"estimated time at {cfg.estimate.tflops:g} TFLOP/s sustained (rough): statistics {_fmt_s(sec['statistics'])}, "
        f"values {_fmt_s(sec['values'])}, pre-edit scores {_fmt_s(sec['scores'])}, trials {_fmt_s(trials_s)}; "
        f"total {_fmt_s(total)} of device time"
    )
    return "\n".join(lines)


def _span(layers: tuple[int, ...]) -> str:
    ls = list(layers)
    if len(ls) > 2 and ls == list(range(ls[0], ls[-1] + 1)):
        return f"{ls[0]}-{ls[-1]}"
    return str(ls)
