"""Typed, frozen configs of a trial and of a sweep, from YAML plus dotted overrides.

A trial config (:class:`TrialConfig`) is everything one trial depends on; a sweep config
(:class:`SweepConfig`) is a ``base`` trial plus a ``grid`` of dotted keys to lists of values or search
spaces (:class:`Distribution`), with the sweep's search, scheduler, repeats, resources, stores and
tracking. Every check that needs no model runs at parse time, and each error names the field the user
wrote. The configs flow one way: config -> cells and plan (:mod:`sweep.cells`, :mod:`sweep.plan`) ->
shared work (:mod:`sweep.shared.needs`) -> trial (:mod:`sweep.stages`) -> result -> tracking -> report.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import torch

from editors import load_hparams, traits
from editors.config import ConfigError, from_dict, load_yaml, merge, parse_overrides, to_dict
from editors.corpus import EMBEDDED_WIKI
from editors.hparams import EditHParams, check_algorithm
from editors.model import parse_dtype
from editors.schedule import MODES, check_schedule
from editors.stats import accumulation_dtype

from .evals.registry import PROBE_TASKS

# ----------------------------------------------------------------------------------------------------
# One trial


@dataclass(frozen=True)
class ModelConfig:
    source: str | None = None  # hub id, folder, .gguf path; None = the embedded SmolLM2-135M
    gguf_file: str | None = None
    revision: str | None = None
    dtype: str = "float32"  # float32 as the reference; bfloat16 halves memory on a GPU
    device: str = "auto"  # "auto" = the first CUDA device if there is one, else CPU
    # A copy of the hub model's files on the cluster's storage (s3://..., or a folder every node mounts),
    # filled from the Hub once by the driver; workers load from it (sweep.shared.mirror). Needs a commit revision
    mirror: str | None = None


@dataclass(frozen=True)
class DatasetConfig:
    # Which benchmark: counterfact (ROME/EasyEdit formats), zsre (MEND/KnowEdit formats), qaedit, mquake,
    # wikibigedit (one timestep file), ultraeditbench
    # (MQuAKE cases: n_edits counts rewrites; a case's multi-hop questions are asked once all its rewrites are in)
    name: Literal["counterfact", "zsre", "qaedit", "mquake", "wikibigedit", "ultraeditbench"] = "counterfact"
    source: str = "demo"  # "demo" (CounterFact only), a local file of that benchmark, or a URL
    # ZsRE's edit target: "answers" (answers[0]: ROME/MEMIT/AlphaEdit) or "alt" (EasyEdit); not comparable
    target: Literal["answers", "alt"] = "answers"
    sha256: str | None = None  # checked when downloading a URL
    case_ids: tuple[int, ...] | None = None  # exactly these records, in order
    sample_file: str | None = None  # counterfact_sampled_unique_cf_10_20000.json format
    sample: int = 0  # which sample of sample_file (the paper uses sample 0)
    unique_subjects_seed: int | None = None  # shuffle with this seed, one record per subject
    prompts: str | None = None  # MQuAKE: the folder of its prompt files (multihop-prompts.txt, ...)
    multihop: Literal["direct", "cot"] = "direct"  # MQuAKE: few-shot answers or chain of thought
    # The selection's first ``offset`` records are skipped: a search's held-out trials edit the facts after
    # its dev facts (sweep.cells), so nothing the search saw is reported as held out
    offset: int = 0
    # Shuffle the trial's facts with this seed before editing (None: the selection's order); repeats of a
    # sequential trial edit the same facts in different orders (sweep.cells)
    order_seed: int | None = None


@dataclass(frozen=True)
class StatsConfig:
    corpus: str = EMBEDDED_WIKI  # text file/folder, "embedded:wiki", or "hf:<dataset>[:config][:split]"
    max_tokens: int | None = 100_000  # keys averaged into C (the reference: 100k whole articles)
    max_texts: int | None = None
    # Tokens per text: None cuts at the model's context (8,192 for Llama-3), as the reference's layer_stats
    max_seq_len: int | None = None
    # Which texts: None reads the first max_texts in corpus order; a seed draws max_texts at random with
    # it, as the reference (random_sample=1: Python's random.Random(1) permutation of the rows)
    sample_seed: int | None = None
    dtype: Literal["float32", "float64"] = "float32"
    batch_tokens: int | None = None  # padded tokens per forward pass (None: 1024 on CPU, 8192 on GPU)
    store: str | None = ".cache/stats"  # a folder, or a URI (s3://lab/stats) backed by a local copy; None: in memory
    tolerance: float | None = None  # stop once C⁻¹ of held-out keys changes less than this (None: read to the caps)
    model_dtype: str | None = None  # weights' dtype during the pass (None: model.dtype); bfloat16 halves it


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
    retention_every: int = 0  # sequential modes: re-score every fact edited so far every this many batches (0: off)
    health_every: int = 0  # every this many batches: σ_max and cond of each edited W (+ ppl if ppl is on) (0: off)
    # Generation-based scores (WILD, docs/ALGORITHMS.md): greedy, natural stop, exact match; gen_* metrics
    generated: bool = False
    gen_context: Literal["bare", "qa", "chat"] = "bare"  # the prompt alone, a QA instruction, the chat template
    gen_max_new_tokens: int = 50  # the cap (the WILD protocol's max_new_tokens)
    gen_batch_size: int = 32  # prompts per generation batch
    # Capability probes (AlphaEdit's glue_eval): before editing, every probe_every batches, and at the end
    probes: tuple[str, ...] = ()  # of sst2, mrpc, cola, rte, nli, mmlu (sentiment_analysis, dialogue)
    probe_every: int = 0  # batches between probe points (0: before editing and at the end only)
    probe_items: int = 100  # items per task (AlphaEdit: records[10:110])
    probe_data: str | None = None  # the folder of the probe JSON lines (python -m sweep.evals.probes fetch makes one)


@dataclass(frozen=True)
class GuardConfig:
    """The collapse guard: a trial stops (``collapsed_at``) at the first batch that breaks a bound."""

    max_ppl_ratio: float | None = None  # held-out perplexity above this × the unedited one (needs ppl, health_every)
    min_batch_es: float | None = None  # the last batch's ES at edit (percent) below this


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
    guard: GuardConfig = field(default_factory=GuardConfig)
    method: str | None = None  # the method's name in reports (None: the algorithm + its lifelong settings)

    @cached_property
    def edit_hparams(self) -> EditHParams:
        """The algorithm's typed hyperparameters: its preset with ``hp`` and ``layers`` over it, resolved
        once per config (the value is cached on the object and pickles with it, so a planned trial carries
        it through Tune to its worker). An invalid value is a :class:`ConfigError` naming ``hp.<field>``."""
        return _resolve_hparams(self)

    @property
    def method_name(self) -> str:
        """The trial's method as reports name it: ``method`` if set, else the algorithm with the
        lifelong-editing settings it turns on, e.g. ``memit+nas+prune``."""
        if self.method:
            return self.method
        hp = self.edit_hparams
        parts = [self.algorithm.lower()]
        settings = (("nas", hp.nas), ("prune", hp.prune_base), ("rect", hp.rect_keep), ("sphere", hp.beta_hse))
        parts += [name for name, on in settings if on]
        return "+".join(parts)

    @property
    def n_batches(self) -> int:
        """How many batches the schedule edits ``n_edits`` in (the last may be smaller)."""
        return -(-self.n_edits // self.batch_size)

    @property
    def needs_stats(self) -> bool:
        """Whether the trial's algorithm needs the statistics (as its ``TRAITS`` declare)."""
        return traits(self.algorithm).needs_stats(self.edit_hparams)


def parse_config(data: dict[str, Any]) -> TrialConfig:
    """A validated :class:`TrialConfig` from a dict (YAML + overrides): every check that needs no
    model runs here, each error naming its field."""
    cfg = from_dict(TrialConfig, data)
    check_algorithm(cfg.algorithm)
    cfg.edit_hparams  # noqa: B018  (resolved and checked here, once)
    if cfg.mode not in MODES:
        raise ConfigError(f"mode: unknown schedule {cfg.mode!r}; choose one of {list(MODES)}")
    if cfg.n_edits < 1:
        raise ConfigError(f"n_edits: must be >= 1, got {cfg.n_edits}")
    try:
        check_schedule(cfg.n_edits, cfg.batch_size, cfg.mode)
    except ValueError as e:
        raise ConfigError(str(e).replace("number of requests", "n_edits")) from None
    _check_fields(cfg)
    s = cfg.stats
    for name in ("max_tokens", "max_texts", "batch_tokens", "max_seq_len"):
        v = getattr(s, name)
        if v is not None and v < 1:
            raise ConfigError(f"stats.{name}: must be >= 1 or null, got {v}")
    if s.sample_seed is not None and s.sample_seed < 0:
        raise ConfigError(f"stats.sample_seed: must be >= 0 or null, got {s.sample_seed}")
    if s.tolerance is not None and not 0 < s.tolerance < 1:
        raise ConfigError(f"stats.tolerance: must be in (0, 1) or null, got {s.tolerance}")
    if s.model_dtype is not None:
        try:
            parse_dtype(s.model_dtype)
        except ValueError:
            raise ConfigError(f"stats.model_dtype: unknown dtype {s.model_dtype!r}") from None
    try:
        accumulation_dtype(s.dtype)
    except ValueError as e:
        raise ConfigError(f"stats.{e}") from None
    sc, g = cfg.scoring, cfg.guard
    for name in ("retention_every", "health_every"):
        if getattr(sc, name) < 0:
            raise ConfigError(f"scoring.{name}: must be >= 0 (0 turns it off), got {getattr(sc, name)}")
    if sc.retention_every and cfg.mode == "batch":
        raise ConfigError("scoring.retention_every: forgetting curves need mode sequential-batch or sequential")
    if g.max_ppl_ratio is not None and (g.max_ppl_ratio <= 1 or not sc.ppl or not sc.health_every):
        raise ConfigError(
            "guard.max_ppl_ratio: must be > 1 and needs scoring.ppl=true and scoring.health_every >= 1 "
            f"(the perplexity is measured at the health points), got {g.max_ppl_ratio}"
        )
    _check_protocols(cfg)
    if g.min_batch_es is not None and not 0 <= g.min_batch_es <= 100:
        raise ConfigError(f"guard.min_batch_es: a percentage in [0, 100], got {g.min_batch_es}")
    return cfg


#: (field, the least value it takes) of every integer or number with a lower bound
_LOWER_BOUNDS = (
    ("seed", 0),
    ("dataset.sample", 0),
    ("dataset.offset", 0),
    ("scoring.batch_size", 1),
    ("scoring.generation_per_record", 1),
    ("scoring.generation_max_len", 1),
    ("scoring.ppl_offset", 0),
    ("scoring.ppl_texts", 1),
    ("scoring.ppl_max_len", 2),
    ("scoring.gen_max_new_tokens", 1),
    ("scoring.gen_batch_size", 1),
    ("scoring.probe_every", 0),
    ("scoring.probe_items", 1),
)
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def _looks_local(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~")) or source.endswith(".gguf") or not _HUB_ID.match(source)


def _check_fields(cfg: TrialConfig) -> None:
    """The bounds, choices and local paths of the trial config, each error naming the field as written."""
    for name, least in _LOWER_BOUNDS:
        head, _, leaf = name.partition(".")
        value = getattr(getattr(cfg, head), leaf) if leaf else getattr(cfg, head)
        if value < least:
            raise ConfigError(f"{name}: must be >= {least}, got {value}")
    m = cfg.model
    try:
        parse_dtype(m.dtype)
    except ValueError as e:
        raise ConfigError(f"model.{e}") from None
    if not _DEVICE.match(m.device):
        raise ConfigError(f"model.device: {m.device!r} is not one of auto, cpu, cuda, cuda:<n>, mps")
    if m.source is not None and _looks_local(m.source) and not Path(m.source).expanduser().exists():
        raise ConfigError(
            f"model.source: {m.source!r} does not exist here (give a hub id such as meta-llama/Meta-Llama-3-8B, "
            "a folder saved with save_pretrained, a .gguf file, or null for the embedded SmolLM2; on a cluster "
            "the driver plans from the folder's config.json and keys the stores on its files, so the folder "
            "must be on the driver's node too, at the same path)"
        )
    if m.gguf_file is not None and m.source is None:
        raise ConfigError("model.gguf_file: needs model.source (the folder or repository that holds it)")
    corpus = cfg.stats.corpus
    if ":" not in corpus.split("/")[0] and not Path(corpus).expanduser().exists():
        raise ConfigError(
            f"stats.corpus: {corpus!r} does not exist (give a text file, a folder of .txt/.utf8 files, "
            f"'{EMBEDDED_WIKI}', or 'hf:<dataset>[:<config>][:<split>]')"
        )
    check_location("stats.store", cfg.stats.store)
    _check_mirror(m)
    if cfg.dataset.case_ids is not None and len(set(cfg.dataset.case_ids)) != len(cfg.dataset.case_ids):
        raise ConfigError("dataset.case_ids: every case id at most once")


def _check_protocols(cfg: TrialConfig) -> None:
    """The dataset's target setting, the generation-based protocol and the probes."""
    d, sc = cfg.dataset, cfg.scoring
    if d.target == "alt" and d.name != "zsre":
        raise ConfigError(f"dataset.target: 'alt' is ZsRE's EasyEdit target; {d.name} has one target (use 'answers')")
    if d.source == "demo" and d.name != "counterfact":
        raise ConfigError(f"dataset.source: the demo set is CounterFact; give a {d.name} file or URL")
    if d.name == "mquake":
        if d.prompts is None or not Path(d.prompts).expanduser().is_dir():
            raise ConfigError(
                f"dataset.prompts: MQuAKE needs the folder of its prompt files (multihop-prompts.txt, "
                f"multihop-cot-prompts.txt from princeton-nlp/MQuAKE), got {d.prompts!r}"
            )
        for name in ("unique_subjects_seed", "sample_file", "order_seed"):
            if getattr(d, name) is not None:
                raise ConfigError(f"dataset.{name}: MQuAKE's rewrites are taken case by case, in file order")
        if cfg.mode == "batch" and cfg.batch_size < cfg.n_edits:
            raise ConfigError(
                "mode: MQuAKE's multi-hop questions need every rewrite of a case in one model; use "
                "sequential-batch (or batch with batch_size >= n_edits)"
            )
    if sc.generated and not sc.pre:
        raise ConfigError(
            "scoring.generated: needs scoring.pre=true (the unedited model's generations are the reference "
            "of the generated NS)"
        )
    if bad := [t for t in sc.probes if t not in PROBE_TASKS]:
        raise ConfigError(f"scoring.probes: unknown task(s) {bad}; choose from {list(PROBE_TASKS)}")
    if len(set(sc.probes)) != len(sc.probes):
        raise ConfigError("scoring.probes: every task at most once")
    if sc.probe_every and not sc.probes:
        raise ConfigError("scoring.probe_every: set scoring.probes too (e.g. [sst2, mrpc, cola, rte, nli, mmlu])")
    if sc.probe_data is not None and not Path(sc.probe_data).expanduser().is_dir():
        raise ConfigError(
            f"scoring.probe_data: {sc.probe_data!r} is not a folder (python -m sweep.evals.probes fetch --out DIR "
            "makes one; null fetches the authors' files once into the cache)"
        )


#: The URI schemes a store or a model mirror may name (pyarrow's file systems).
STORAGE_SCHEMES = ("s3", "gs", "gcs", "hdfs", "abfs", "abfss")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def is_uri(value: object) -> bool:
    """Whether ``value`` is a URI (``s3://``, ``gs://``, any pyarrow file system) rather than a local path."""
    return isinstance(value, str) and "://" in value


def check_location(name: str, value: Any) -> None:
    """A shared-work store is a folder on the driver's disk or a URI of cloud storage
    (sweep.shared.mirror: a local copy backed by the prefix); the error names ``name``."""
    if not is_uri(value):
        return
    scheme = value.split("://", 1)[0].lower()
    if scheme not in STORAGE_SCHEMES:
        raise ConfigError(
            f"{name}: {value!r} is neither a folder on the driver's disk nor a URI of cloud storage "
            f"({', '.join(s + '://' for s in STORAGE_SCHEMES)})"
        )


def _check_mirror(m: ModelConfig) -> None:
    """A mirrored model is a hub id at a commit, mirrored to cloud storage or an absolute folder."""
    if m.mirror is None:
        return
    check_location("model.mirror", m.mirror)
    if not is_uri(m.mirror) and not Path(m.mirror).is_absolute():
        raise ConfigError(f"model.mirror: {m.mirror!r}: an absolute folder every node mounts, or a URI (s3://...)")
    if m.source is None or _looks_local(m.source):
        raise ConfigError(
            f"model.mirror: mirrors models of the Hugging Face hub, but model.source is {m.source!r}, a local "
            "model; leave model.mirror unset"
        )
    if not _COMMIT.match(m.revision or ""):
        raise ConfigError(
            f"model.revision: {m.revision!r}; a mirror holds one commit of a model: give its 40-digit commit "
            f"hash (HfApi().model_info({m.source!r}).sha)"
        )


def load_config(path: str | None, overrides: list[str] = ()) -> TrialConfig:
    base = load_yaml(path) if path else {}
    return parse_config(merge(base, parse_overrides(overrides)))


def _resolve_hparams(cfg: TrialConfig) -> EditHParams:
    extra = dict(cfg.hp)
    if cfg.layers is not None:
        extra["layers"] = list(cfg.layers)
    try:
        return load_hparams(cfg.algorithm, cfg.hparams, **extra)
    except ConfigError as e:
        msg = str(e)
        if msg.startswith(("hparams", "algorithm")):
            raise
        # "<alg> hparams: <Class>HParams: v_lr: must be > 0" -> "hp.v_lr: must be > 0 (memit)"
        inner = re.sub(r"^\w+ hparams: (\w+HParams: )?", "", msg)
        field = inner.split(":", 1)[0]
        where = "layers" if field == "layers" and cfg.layers is not None else f"hp.{field}"
        raise ConfigError(
            f"{where}:{inner.split(':', 1)[1] if ':' in inner else ' ' + inner} ({cfg.algorithm})"
        ) from None


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


# ----------------------------------------------------------------------------------------------------
# A sweep


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
    gpu_memory_gb: float | None = None  # a worker's device memory for statistics passes (None: asked of a GPU node)


@dataclass(frozen=True)
class EstimateConfig:
    tflops: float = 200.0  # sustained bf16 TFLOP/s assumed for the time estimate (H100: ~200-400)
    bandwidth_gbs: float = 2000.0  # device memory GB/s for decoding steps (H100 SXM: ~3,350 peak)


#: The search spaces a ``grid`` value may be instead of a list (Tune's own: ``ray.tune.loguniform`` ...)
DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice")


@dataclass(frozen=True)
class Distribution:
    """A grid key's search space: ``{loguniform: [lo, hi]}`` or ``{uniform: [lo, hi]}`` (floats),
    ``{randint: [lo, hi]}`` (integers lo..hi-1: hi excluded, as Tune and numpy), ``{choice: [a, b, ...]}``."""

    kind: str
    args: tuple[Any, ...]

    def options(self) -> list[Any] | None:
        """Every value it can take when there are few (choice, a randint of at most 64), else None."""
        if self.kind == "choice":
            return list(self.args)
        if self.kind == "randint" and self.args[1] - self.args[0] <= 64:
            return list(range(self.args[0], self.args[1]))
        return None

    def extremes(self) -> list[Any]:
        """The values a trial config is validated at before anything runs: every option, or both bounds."""
        opts = self.options()
        if opts is not None:
            return opts
        return [self.args[0], self.args[1] - 1] if self.kind == "randint" else [self.args[0], self.args[1]]

    def middle(self) -> Any:
        """A value that stands for the space in plans and estimates (the geometric mean of a log space)."""
        lo, hi = self.args[0], self.args[-1]
        if self.kind == "choice":
            return self.args[0]
        if self.kind == "loguniform":
            return float((lo * hi) ** 0.5)
        return (lo + hi) // 2 if self.kind == "randint" else (lo + hi) / 2


def parse_distribution(key: str, value: Any, grid: str = "grid") -> Distribution | None:
    """The :class:`Distribution` a grid value spells (None: a plain list, a grid axis); a malformed one is a
    :class:`ConfigError` naming ``<grid>.<key>`` (``grid``, or a variant's ``variants.<name>.grid``)."""
    if isinstance(value, list):
        if not value:
            raise ConfigError(f"{grid}.{key}: expected a non-empty list of values")
        return None
    if not isinstance(value, dict) or len(value) != 1 or next(iter(value)) not in DISTRIBUTIONS:
        raise ConfigError(
            f"{grid}.{key}: expected a non-empty list of values or one distribution: {{loguniform: [lo, hi]}}, "
            f"{{uniform: [lo, hi]}}, {{randint: [lo, hi]}} or {{choice: [a, b, ...]}}; got {value!r}"
        )
    kind, args = next(iter(value.items()))
    where = f"{grid}.{key}.{kind}"
    if not isinstance(args, list) or not args:
        raise ConfigError(f"{where}: expected a list ([lo, hi] or the choices), got {args!r}")
    if kind == "choice":
        return Distribution(kind, tuple(args))
    if len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
        raise ConfigError(f"{where}: expected two numbers [lo, hi], got {args!r}")
    lo, hi = args
    if kind == "randint" and not (float(lo).is_integer() and float(hi).is_integer()):
        raise ConfigError(f"{where}: expected two integers [lo, hi], got {args!r}")
    if lo >= hi:
        raise ConfigError(f"{where}: lo must be < hi, got [{lo}, {hi}]")
    if kind == "loguniform" and lo <= 0:
        raise ConfigError(f"{where}: a log-uniform bound must be > 0, got [{lo}, {hi}]")
    if kind == "randint":
        return Distribution(kind, (int(lo), int(hi)))
    return Distribution(kind, (float(lo), float(hi)))


@dataclass(frozen=True)
class SearchConfig:
    """How the grid's distributions are searched (``algorithm``: ``grid`` runs the plain grid, today's
    behaviour; ``random`` and ``optuna`` run Tune's Optuna searcher with Optuna's random or TPE sampler),
    ``num_samples`` trials per cell (variant × grid point), each searching its own space."""

    algorithm: Literal["grid", "random", "optuna"] = "grid"
    metric: str | tuple[str, ...] | None = None  # a metric as MLflow shows it (final.s); several: a Pareto front
    mode: str | tuple[str, ...] = "max"  # or one per metric
    num_samples: int = 1  # trials per cell
    seed: int = 0
    # The search sees only the first dev_facts facts (a count, or a fraction of base.n_edits); the best
    # configuration of each cell is then run on the other facts (`repeats` times): the held-out results
    dev_facts: float | None = None

    @property
    def metrics(self) -> tuple[str, ...]:
        return () if self.metric is None else (self.metric,) if isinstance(self.metric, str) else tuple(self.metric)

    @property
    def modes(self) -> tuple[str, ...]:
        return (self.mode,) * len(self.metrics) if isinstance(self.mode, str) else tuple(self.mode)


@dataclass(frozen=True)
class SchedulerConfig:
    """Early stopping on the per-batch reports: Tune's ASHA with time = edits applied."""

    name: Literal["asha"] = "asha"
    metric: str = "at_edit.s"  # what the per-batch reports carry: at_edit.{s,es,ps,ns} (and gen_* when generated)
    mode: Literal["max", "min"] = "max"
    grace_edits: int = 1  # no trial is stopped before this many edits
    reduction_factor: float = 2.0


@dataclass(frozen=True)
class SweepConfig:
    """A whole study: a base trial, named ``variants`` of it (methods: each a dict of overrides, e.g.
    ``memit+nas: {algorithm: memit, hp: {nas: true}}``; its name becomes the trial's ``method``), and a
    ``grid`` over its keys crossed with every variant: a list is an axis, a :class:`Distribution` is
    searched (``search``); a variant's own ``grid`` (in its overrides) adds or replaces keys for it alone
    (AlphaEdit searching ``hp.L2`` where MEMIT searches ``hp.mom2_update_weight``); ``repeats`` runs every
    cell that many times with other seeds (and edit orders)."""

    name: str
    base: dict[str, Any] = field(default_factory=dict)
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)  # method name -> overrides of base
    grid: dict[str, Any] = field(default_factory=dict)  # dotted key -> list of values, or a distribution
    search: SearchConfig = field(default_factory=SearchConfig)
    scheduler: SchedulerConfig | None = None
    repeats: int = 1
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    retries: int = 1  # a failed trial is retried this many times
    storage: str = ".cache/ray_results"  # Tune's storage_path on the driver, or a URI (s3://, gs://)
    # The stores: folders on the driver's disk (it writes every store), or URIs (s3://lab/values): a local
    # copy backed by the prefix, read back by later clusters (sweep.shared.mirror)
    values_store: str = ".cache/values"  # target values
    scores_store: str = ".cache/scores"  # pre-edit scores, perplexities and probe points
    share_values: bool = True  # compute batch-mode values once for the sweep (off: each trial optimises its own)
    values_chunk: int = 256  # facts per value / pre-score task (each stored as it finishes)
    estimate: EstimateConfig = field(default_factory=EstimateConfig)


#: Config paths made absolute before the trials run (Tune moves trials into their own directories).
_PATHS = (
    "stats.store",
    "stats.corpus",
    "dataset.source",
    "dataset.sample_file",
    "model.source",
    "scoring.probe_data",
    "dataset.prompts",
)


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
        if isinstance(data.get(k), str) and not is_uri(data[k]):
            from pathlib import Path

            data[k] = str(Path(data[k]).expanduser().resolve())
    cfg = from_dict(SweepConfig, data)
    if not cfg.name or not all(c.isalnum() or c in "-_" for c in cfg.name):
        raise ConfigError(f"name: {cfg.name!r} must be letters, digits, '-' or '_'")
    for key, values in cfg.grid.items():
        parse_distribution(key, values)
    for vname, over in cfg.variants.items():
        if not isinstance(over, dict) or not vname or not all(c.isalnum() or c in "-_+." for c in vname):
            raise ConfigError(f"variants.{vname}: a name of letters, digits, '-_+.' mapping to a dict of overrides")
        vgrid = over.get("grid") or {}
        if not isinstance(vgrid, dict):
            raise ConfigError(f"variants.{vname}.grid: a mapping of grid keys to lists or distributions")
        for key, values in vgrid.items():
            parse_distribution(key, values, f"variants.{vname}.grid")
    if cfg.retries < 0:
        raise ConfigError("retries: must be >= 0")
    check_location("values_store", cfg.values_store)
    check_location("scores_store", cfg.scores_store)
    check_location("base.stats.store", (cfg.base.get("stats") or {}).get("store"))
    if cfg.values_chunk < 1:
        raise ConfigError(f"values_chunk: must be >= 1, got {cfg.values_chunk}")
    r = cfg.resources
    for name, value, ok, want in (
        ("resources.cpu", r.cpu, r.cpu > 0, "> 0"),
        ("resources.gpu", r.gpu, r.gpu >= 0, ">= 0"),
        ("resources.max_concurrent", r.max_concurrent, r.max_concurrent is None or r.max_concurrent > 0, "> 0 or null"),
        ("resources.prepass_gpu", r.prepass_gpu, r.prepass_gpu is None or r.prepass_gpu >= 0, ">= 0 or null"),
        ("resources.gpu_memory_gb", r.gpu_memory_gb, r.gpu_memory_gb is None or r.gpu_memory_gb > 0, "> 0 or null"),
        ("estimate.tflops", cfg.estimate.tflops, cfg.estimate.tflops > 0, "> 0"),
        ("estimate.bandwidth_gbs", cfg.estimate.bandwidth_gbs, cfg.estimate.bandwidth_gbs > 0, "> 0"),
    ):
        if not ok:
            raise ConfigError(f"{name}: must be {want}, got {value}")
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
