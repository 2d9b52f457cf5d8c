"""One trial end to end: (model, algorithm, layers, batch size, schedule, n_edits, hparams) -> one result.

    python -m sweep.trial                                   # the demo: SmolLM2, MEMIT, 8 demo facts
    python -m sweep.trial --config sweep/configs/trial/demo.yaml algorithm=emmet batch_size=4 --out r.json

Works without Ray and MLflow. Scoring follows ALGORITHMS.md §4: every fact on the unedited model
("pre"), each batch's facts right after their own batch ("at_edit", the reference code's protocol) and
every fact on the final model ("final", AlphaEdit's protocol; in ``batch`` mode each batch is edited
on the unedited weights, so final = at_edit). Statistics and target values come from caches the caller
provides (the sweep shares them across trials); when absent the trial computes them itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import torch

from editors import ModelRef, load_hparams, load_model, run_schedule, spec_for
from editors.common import sync
from editors.config import ConfigError, from_dict, load_yaml, merge, parse_overrides, to_dict
from editors.corpus import EMBEDDED_WIKI, CorpusSpec, corpus_identity, iter_texts
from editors.hparams import EditHParams, check_algorithm
from editors.model import check_layer, model_config, n_layers_of, parse_dtype
from editors.requests import validate_requests
from editors.schedule import MODES, BatchEvent, check_schedule
from editors.stats import SecondMoment, StatsKey, StatsStore, collect_second_moments, get_or_compute
from editors.templates import TemplateCache

from .data import Record, load_counterfact, select
from .metrics import METRICS, aggregate, generation_entropy, perplexity, score_records

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelConfig:
    source: str | None = None  # hub id, folder, .gguf path; None = the embedded SmolLM2-135M
    gguf_file: str | None = None
    revision: str | None = None
    dtype: str = "float32"  # float32 as the reference; bfloat16 halves memory on a GPU
    device: str = "auto"  # "auto" = the first CUDA device if there is one, else CPU


@dataclass(frozen=True)
class DatasetConfig:
    source: str = "demo"  # "demo", a local CounterFact file (ROME or EasyEdit format), or a URL
    sha256: str | None = None  # checked when downloading a URL
    case_ids: tuple[int, ...] | None = None  # exactly these records, in order
    sample_file: str | None = None  # counterfact_sampled_unique_cf_10_20000.json format
    sample: int = 0  # which sample of sample_file (the paper uses sample 0)
    unique_subjects_seed: int | None = None  # shuffle with this seed, one record per subject


@dataclass(frozen=True)
class StatsConfig:
    corpus: str = EMBEDDED_WIKI  # text file/folder, "embedded:wiki", or "hf:<dataset>[:config][:split]"
    max_tokens: int | None = 100_000  # keys averaged into C (the reference: 100k whole articles)
    max_texts: int | None = None
    dtype: Literal["float32", "float64"] = "float32"
    batch_tokens: int | None = None  # padded tokens per forward pass (None: 1024 on CPU, 8192 on GPU)
    store: str | None = ".cache/stats"  # disk cache folder (None: keep in memory only)


@dataclass(frozen=True)
class ScoringConfig:
    batch_size: int = 64  # prompts per scoring forward
    pre: bool = True  # score the unedited model
    generation: bool = False  # generation entropy (GE): top-k sampling, 100 tokens per prompt
    generation_prompts: Literal["generation", "paraphrase"] = "generation"
    generation_per_record: int = 1
    generation_max_len: int = 100
    generation_strip_prompt: bool = True  # the unified code scores the continuation only
    ppl: bool = False  # held-out perplexity on a fixed slice of the statistics corpus
    ppl_offset: int = 2000  # texts of the corpus skipped before the slice (the stats use the first ones)
    ppl_texts: int = 20
    ppl_max_len: int = 256


@dataclass(frozen=True)
class TrialConfig:
    """Everything a trial depends on. ``hp`` overrides fields of the hparams preset by name."""

    algorithm: str = "memit"
    hparams: str = "smollm2-135m"  # preset name (editors/hparams/<algorithm>/) or a YAML path
    hp: dict[str, Any] = field(default_factory=dict)
    layers: tuple[int, ...] | None = None  # overrides hparams.layers
    n_edits: int = 8
    batch_size: int = 8
    mode: Literal["batch", "sequential-batch", "sequential"] = "batch"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    stats: StatsConfig = field(default_factory=StatsConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)


def parse_config(data: dict[str, Any]) -> TrialConfig:
    """A validated :class:`TrialConfig` from a dict (YAML + overrides): every check that needs no
    model runs here, each error naming its field."""
    cfg = from_dict(TrialConfig, data)
    check_algorithm(cfg.algorithm)
    trial_hparams(cfg)
    if cfg.mode not in MODES:
        raise ConfigError(f"mode: unknown schedule {cfg.mode!r}; choose one of {list(MODES)}")
    if cfg.n_edits < 1:
        raise ConfigError(f"n_edits: must be >= 1, got {cfg.n_edits}")
    try:
        check_schedule(cfg.n_edits, cfg.batch_size, cfg.mode)
    except ValueError as e:
        raise ConfigError(str(e).replace("number of requests", "n_edits")) from None
    parse_dtype(cfg.model.dtype)
    return cfg


def load_config(path: str | None, overrides: list[str] = ()) -> TrialConfig:
    base = load_yaml(path) if path else {}
    return parse_config(merge(base, parse_overrides(overrides)))


def trial_hparams(cfg: TrialConfig) -> EditHParams:
    extra = dict(cfg.hp)
    if cfg.layers is not None:
        extra["layers"] = list(cfg.layers)
    try:
        return load_hparams(cfg.algorithm, cfg.hparams, **extra)
    except ConfigError as e:
        raise ConfigError(f"hp.{e}" if not str(e).startswith(("hparams", "algorithm")) else str(e)) from None


def needs_stats(cfg: TrialConfig, hp: EditHParams | None = None) -> bool:
    """Every algorithm needs the statistics except ROME with ``mom2_adjustment: false`` (C = I)."""
    hp = hp or trial_hparams(cfg)
    return not (cfg.algorithm == "rome" and not getattr(hp, "mom2_adjustment", True))


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


# ----------------------------------------------------------------------------------------------------
# Caches the sweep shares (the trial computes what they lack)


def stats_keys(cfg: TrialConfig, layers: list[int], model_id: str) -> dict[int, StatsKey]:
    corpus = corpus_identity(CorpusSpec(cfg.stats.corpus, max_texts=cfg.stats.max_texts))
    return {
        layer: StatsKey(model_id, layer, corpus, cfg.stats.max_texts, cfg.stats.max_tokens, None, cfg.stats.dtype)
        for layer in layers
    }


def compute_stats(
    cfg: TrialConfig, model: Any, tok: Any, layers: list[int], progress: bool = True
) -> dict[int, SecondMoment]:
    """The statistics of ``layers`` in one pass over the configured corpus."""
    texts = iter_texts(CorpusSpec(cfg.stats.corpus, max_texts=cfg.stats.max_texts))
    return collect_second_moments(
        model,
        tok,
        spec_for(model),
        layers,
        texts,
        max_tokens=cfg.stats.max_tokens,
        batch_tokens=cfg.stats.batch_tokens,
        dtype=cfg.stats.dtype,
        progress=progress,
    )


def values_shareable(cfg: TrialConfig) -> bool:
    """Target values can be shared across trials only in ``batch`` mode (otherwise they depend on the
    earlier batches' edits), and for ROME only for single edits (ROME edits a batch's requests one on
    top of the other)."""
    return cfg.mode == "batch" and not (cfg.algorithm == "rome" and cfg.batch_size > 1)


def value_key(cfg: TrialConfig, hp: EditHParams, model_id: str, case_id: int) -> str:
    """Cache key of a batch-mode target value: it depends on the model, the value layer and site,
    the value hyperparameters and the templates' style/seed — not on the batch size or the solver,
    so MEMIT, EMMET and AlphaEdit trials share it (ROME's v* sits at the MLP output: its own key)."""
    site = "rewrite" if cfg.algorithm == "rome" else "block"
    from editors.targets import ValueHParams

    vh = {f.name: getattr(hp, f.name) for f in dataclasses.fields(ValueHParams)}
    blob = json.dumps(
        [model_id, site, hp.layers[-1], vh, hp.context_templates, hp.template_seed, case_id],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


# ----------------------------------------------------------------------------------------------------
# The trial


def peak_memory_mb(device: str) -> dict[str, float]:
    out = {"cpu_rss_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.startswith("cuda") and torch.cuda.is_available():
        out["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def versions(model_id: str) -> dict[str, str]:
    import transformers

    try:
        own = metadata.version("model-editing-sweep")
    except metadata.PackageNotFoundError:
        own = "source"
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "model_editing_sweep": own,
        "model": model_id,
    }


def run_trial(
    cfg: TrialConfig,
    *,
    model: Any = None,
    tok: Any = None,
    stats: dict[int, Any] | None = None,
    stats_provider: Callable[[list[int]], dict[int, Any]] | None = None,
    values_cache: MutableMapping[str, torch.Tensor] | None = None,
    templates: TemplateCache | None = None,
    on_batch: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run one trial and return its result (see the module docstring and README for the fields).

    Args:
        model, tok: a loaded model to reuse (its edited weights are restored exactly at the end).
        stats: layer -> C to use as given; ``stats_provider(layers)`` is asked otherwise; failing both,
            the trial uses the disk store of ``cfg.stats.store`` and computes what is missing.
        values_cache: shared target values (batch mode), keyed by :func:`value_key`.
        on_batch: called with each batch's curve point (a sweep reports it as an intermediate result).
    """
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    work = {"stats_computed": 0, "stats_reused": 0, "values_optimised": 0, "values_reused": 0}
    hp = trial_hparams(cfg)
    torch.manual_seed(cfg.seed)

    # Data first: a bad record fails before any model work.
    records = select(
        load_counterfact(cfg.dataset.source, cfg.dataset.sha256),
        n=cfg.n_edits,
        case_ids=cfg.dataset.case_ids,
        sample_file=cfg.dataset.sample_file,
        sample=cfg.dataset.sample,
        unique_subjects_seed=cfg.dataset.unique_subjects_seed,
    )
    ref = ModelRef(cfg.model.source, cfg.model.gguf_file, cfg.model.revision)
    model_id = ref.identity()
    device = resolve_device(cfg.model.device)
    if model is None:  # validate layers against the config before loading the weights
        n_layers = n_layers_of(
            model_config(cfg.model.source, gguf_file=cfg.model.gguf_file, revision=cfg.model.revision)
        )
        for layer in hp.layers:
            check_layer(layer, n_layers, "layers")
    t = time.perf_counter()
    if model is None:
        model, tok = load_model(
            cfg.model.source,
            gguf_file=cfg.model.gguf_file,
            revision=cfg.model.revision,
            dtype=cfg.model.dtype,
            device=device,
        )
        timings["load"] = time.perf_counter() - t
    else:
        timings["load"] = 0.0
    spec = spec_for(model)
    for layer in hp.layers:
        spec.check_layer(layer, "layers")
    requests = [r.request() for r in records]
    validate_requests(tok, requests)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()

    # Statistics.
    need_stats = needs_stats(cfg, hp)
    t = time.perf_counter()
    if need_stats and stats is None:
        layers = list(hp.layers)
        if stats_provider is not None:
            stats = stats_provider(layers)
            work["stats_reused"] += len(layers)
        elif cfg.stats.store:
            store = StatsStore(cfg.stats.store)
            keys = stats_keys(cfg, layers, model_id)
            missing = [layer for layer in layers if keys[layer] not in store]
            got = get_or_compute(store, keys, lambda ls: compute_stats(cfg, model, tok, ls, progress), model.device)
            stats = {layer: sm.mom2 for layer, sm in got.items()}
            work["stats_computed"] += len(missing)
            work["stats_reused"] += len(layers) - len(missing)
        else:
            stats = {layer: sm.mom2 for layer, sm in compute_stats(cfg, model, tok, layers, progress).items()}
            work["stats_computed"] += len(layers)
    elif stats is not None:
        work["stats_reused"] += len(hp.layers)
    timings["statistics"] = time.perf_counter() - t

    templates = templates or TemplateCache()
    tpl = templates.get(model, tok, hp.context_templates, hp.template_seed)
    score_time = 0.0

    def score(recs: list[Record]) -> tuple[list, dict[str, float]]:
        nonlocal score_time
        sync(model.device)
        t0 = time.perf_counter()
        per = score_records(model, tok, spec, recs, batch_size=cfg.scoring.batch_size)
        out = aggregate(per)
        if cfg.scoring.generation:
            out["ge"] = generation_entropy(
                model,
                tok,
                gen_prompts(recs),
                max_len=cfg.scoring.generation_max_len,
                strip_prompt=cfg.scoring.generation_strip_prompt,
                seed=cfg.seed,
            )
        sync(model.device)
        score_time += time.perf_counter() - t0
        return per, out

    def gen_prompts(recs: list[Record]) -> list[str]:
        k = cfg.scoring.generation_per_record
        src = [
            (r.generation_prompts or r.paraphrase_prompts)
            if cfg.scoring.generation_prompts == "generation"
            else r.paraphrase_prompts
            for r in recs
        ]
        return [p for ps in src for p in ps[:k]]

    def ppl() -> float:
        texts = iter_texts(CorpusSpec(cfg.stats.corpus))
        sl = [
            x
            for i, x in zip(range(cfg.scoring.ppl_offset + cfg.scoring.ppl_texts), texts)
            if i >= cfg.scoring.ppl_offset
        ]
        return perplexity(model, tok, spec, sl, max_len=cfg.scoring.ppl_max_len)

    result_metrics: dict[str, dict[str, float]] = {}
    per_record: dict[int, dict[str, Any]] = {r.case_id: {"case_id": r.case_id} for r in records}
    if cfg.scoring.pre:
        per, agg = score(records)
        if cfg.scoring.ppl:
            agg["ppl"] = ppl()
        result_metrics["pre"] = agg
        for s in per:
            per_record[s.case_id].update({f"pre_{m}": getattr(s, m) for m in METRICS if m != "s"})

    # Values shared across trials (batch mode only: otherwise values depend on earlier edits).
    def provide(b: int, chunk: list) -> torch.Tensor | None:
        if values_cache is None or not values_shareable(cfg):
            return None
        keys = [value_key(cfg, hp, model_id, r.case_id) for r in chunk]
        if all(k in values_cache for k in keys):
            work["values_reused"] += len(chunk)
            return torch.stack([torch.as_tensor(values_cache[k]) for k in keys]).to(model.device)
        return None

    at_edit_scores: list = []
    at_edit_ge: list[tuple[int, float]] = []
    curves: list[dict[str, Any]] = []
    stage = {"keys": 0.0, "values": 0.0, "solve": 0.0}
    solver_fallbacks = 0
    batches = (cfg.n_edits + cfg.batch_size - 1) // cfg.batch_size
    ppl_at_edit: float | None = None

    def callback(ev: BatchEvent) -> None:
        nonlocal solver_fallbacks, ppl_at_edit
        info = ev.result.info
        for k in stage:
            stage[k] += info.get(f"time_{k}", 0.0)
        if "value_loss" in info:
            work["values_optimised"] += len(ev.requests)
            if values_cache is not None and values_shareable(cfg):
                for r, v in zip(ev.requests, ev.result.values):
                    values_cache[value_key(cfg, hp, model_id, r.case_id)] = v.detach().cpu()
        for layer_info in info.get("solver", {}).values():
            for rec in layer_info if isinstance(layer_info, list) else [layer_info]:
                solver_fallbacks += bool(rec.get("fallback"))
        recs = records[ev.index * cfg.batch_size : ev.index * cfg.batch_size + len(ev.requests)]
        per, agg = score(recs)
        at_edit_scores.extend(per)
        if "ge" in agg:
            at_edit_ge.append((len(recs), agg["ge"]))
        if cfg.scoring.ppl and cfg.mode == "batch" and ev.index == batches - 1:
            ppl_at_edit = ppl()  # batch mode: the last batch's model stands for all of them
        so_far = aggregate(at_edit_scores)
        point = {
            "batch": ev.index,
            "edits": ev.index * cfg.batch_size + len(ev.requests),
            "applied": ev.applied,
            "update_norm": sum(ev.update_norms.values()),
            "elapsed_s": time.perf_counter() - t_start,
            **{f"at_edit_{m}": so_far[m] for m in ("es", "ps", "ns", "s")},
            **{f"batch_{m}": agg[m] for m in ("es", "ps", "ns", "s")},
        }
        curves.append(point)
        if on_batch is not None:
            on_batch(point)

    sched = run_schedule(
        model,
        tok,
        requests,
        cfg.algorithm,
        hp,
        stats,
        batch_size=cfg.batch_size,
        mode=cfg.mode,
        callback=callback,
        spec=spec,
        templates=tpl,
        values=provide,
        restore_at_end=False,
    )
    try:
        at_edit = aggregate(at_edit_scores)
        if at_edit_ge:
            at_edit["ge"] = sum(n * g for n, g in at_edit_ge) / sum(n for n, _ in at_edit_ge)
        if ppl_at_edit is not None:
            at_edit["ppl"] = ppl_at_edit
        for s in at_edit_scores:
            per_record[s.case_id].update({f"at_edit_{m}": getattr(s, m) for m in METRICS if m != "s"})
        if cfg.mode == "batch":
            final = dict(at_edit)  # each batch on the unedited model: its at-edit model is its final one
            final_scores = at_edit_scores
        else:
            final_scores, final = score(records)
            if cfg.scoring.ppl:
                final["ppl"] = ppl()
            norms = {
                n: float((model.get_submodule(n).weight.double() - w0.double()).norm())
                for n, w0 in sched.original.items()
            }
        for s in final_scores:
            per_record[s.case_id].update({f"final_{m}": getattr(s, m) for m in METRICS if m != "s"})
    finally:
        sched.restore(model)  # a reused model goes back to its unedited weights, bit-identical
    result_metrics["at_edit"] = at_edit
    result_metrics["final"] = final
    timings.update({k: v for k, v in stage.items()})
    timings["score"] = score_time
    timings["total"] = time.perf_counter() - t_start
    return {
        "config": to_dict(cfg),
        "hparams": to_dict(hp),
        "metrics": result_metrics,
        "per_record": list(per_record.values()),
        "curves": curves,
        "update_norms": {
            "per_batch": [c["update_norm"] for c in curves],
            "final_weight_change": norms if cfg.mode != "batch" else {},
        },
        "solver_fallbacks": solver_fallbacks,
        "timings": timings,
        "memory": peak_memory_mb(device),
        "work": work,
        "versions": versions(model_id),
        "templates": [list(g) for g in tpl],
    }


# ----------------------------------------------------------------------------------------------------
# CLI


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON to ``path`` through a temp file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, default=str)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def format_table(result: dict[str, Any]) -> str:
    cols = [
        m
        for m in ("es", "ps", "ns", "s", "em", "pm", "nm", "ge", "ppl")
        if any(m in v for v in result["metrics"].values())
    ]
    lines = ["          " + "".join(f"{c:>8}" for c in cols)]
    for name, vals in result["metrics"].items():
        lines.append(f"{name:<10}" + "".join(f"{vals.get(c, float('nan')):>8.2f}" for c in cols))
    t = result["timings"]
    lines.append("timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in t.items()))
    w = result["work"]
    lines.append("work: " + ", ".join(f"{k} {v}" for k, v in w.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sweep.trial", description="Run one editing trial.")
    ap.add_argument("--config", help="trial YAML (default: the demo trial)")
    ap.add_argument("--out", help="write the JSON result here")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. algorithm=emmet hp.emmet_lambda=0.1")
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(asctime)s %(name)s: %(message)s"
    )
    try:
        cfg = load_config(args.config, args.overrides)
        result = run_trial(cfg, progress=not args.quiet)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"\n{cfg.algorithm} layers {list(result['hparams']['layers'])}, {cfg.n_edits} edits, "
        f"batch {cfg.batch_size}, {cfg.mode}"
    )
    print(format_table(result))
    if args.out:
        write_json_atomic(args.out, result)
        print(f"result: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
