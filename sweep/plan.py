"""The plan of a sweep: which trials run, what they share, what it will cost (``--dry-run`` prints it).

The plan expands the sweep config's grid (:mod:`sweep.config`), validates every trial against its
model's shape before anything starts, hands the shared work to :func:`sweep.shared.needs.plan_shared`
(statistics passes under a memory budget, target values and pre-edit scores once per fact), and
estimates each trial's device memory and time from shapes alone.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from editors import traits
from editors.config import ConfigError
from editors.templates import N_TEMPLATES

from .cells import Cells, PlannedTrial, check_search
from .config import SweepConfig, TrialConfig, sweep_id
from .shared.keys import stats_dtype
from .shared.mirror import prepare
from .shared.needs import (
    Shape,
    SharedPlan,
    pass_parts,
    plan_shared,
    score_seconds,
    shape_of,
    stats_wall_seconds,
    stats_workers,
    value_seconds,
)

log = logging.getLogger(__name__)

#: Ray spills objects to disk once a node's object store is this full (object_spilling_threshold): the
#: head must hold the sweep's shared work below it.
SPILL_SHARE = 0.8


@dataclass
class Plan:
    """The trials (a grid's, or a search's stand-ins: :meth:`sweep.cells.Cells.stand_ins`), each resolved
    once (``planned``), their shared work and their cost."""

    planned: list[PlannedTrial]
    cells: Cells
    shared: SharedPlan
    estimates: list[dict[str, float]]  # one per planned trial
    shared_seconds: dict[str, float]  # "statistics", "values", "scores": estimated pre-pass time

    @property
    def trials(self) -> list[TrialConfig]:
        return [p.config for p in self.planned]

    @property
    def keys(self) -> list[str]:
        return [p.key for p in self.planned]

    def summary(self) -> dict[str, Any]:
        return {"trials": len(self.trials), **self.shared.counts()}

    def trial_seconds(self, cfg: SweepConfig) -> tuple[float, int]:
        """(estimated seconds, trials) of the trials the sweep will run: a grid's planned trials; a search's
        ``num_samples`` per cell at the mean estimate of the cell's stand-ins, and its held-out runs
        (``repeats`` per cell, scaled from the dev facts to the held-out ones), before any early stop."""
        if not self.cells.searching:
            return sum(e["time_s"] for e in self.estimates), len(self.trials)
        per_cell: dict[int, list[float]] = {}
        for p, e in zip(self.planned, self.estimates):
            per_cell.setdefault(p.cell_index, []).append(e["time_s"])
        n = cfg.search.num_samples
        held = self.cells.split[1] / self.cells.split[0] * cfg.repeats if self.cells.split else 0.0
        seconds = sum(sum(ts) / len(ts) * (n + held) for ts in per_cell.values())
        return seconds, len(per_cell) * (n + (cfg.repeats if self.cells.split else 0))


def make_plan(cfg: SweepConfig, dry_run: bool = False, budget_gb: float | None = None) -> Plan:
    """Expand, validate against the models' shapes, and plan the shared work (no model is loaded;
    ``dry_run``, ``budget_gb``: see :func:`sweep.shared.needs.plan_shared`; the launcher's
    :func:`sweep.launch.gpu_budget` says the budget)."""
    from editors.model import check_layer

    cells = Cells(cfg)
    check_search(cfg, cells)  # the search's own fields first, then its trials
    planned = cells.stand_ins() if cells.searching else cells.grid_trials()
    check_search(cfg, cells, planned)
    trials = [p.config for p in planned]
    keys = [p.key for p in planned]
    if not dry_run:
        prepare(cfg, trials)  # stores under a URI writable, mirrored models in their mirror (and here)
    for t in trials:
        shape = shape_of(t.model)
        for layer in t.edit_hparams.layers:
            try:
                check_layer(layer, shape.n_layers, "layers")
            except ValueError as e:
                raise ConfigError(f"trial {t.algorithm} {list(t.edit_hparams.layers)}: {e}") from None
    for t in trials:
        st, sc = t.stats, t.scoring
        if sc.ppl and st.max_tokens is None and (st.max_texts is None or st.max_texts > sc.ppl_offset):
            log.warning(
                "stats.max_tokens is null: the statistics may read texts %d-%d of %s, the perplexity's "
                "held-out slice (scoring.ppl_offset); cap stats.max_tokens or stats.max_texts to keep it out",
                sc.ppl_offset,
                sc.ppl_offset + sc.ppl_texts - 1,
                st.corpus,
            )
            break
    shared = plan_shared(
        cfg, trials, keys, dry_run, budget_gb if budget_gb is not None else cfg.resources.gpu_memory_gb
    )
    tflops = cfg.estimate.tflops
    estimates = [
        estimate(
            t,
            shape_of(t.model),
            tflops,
            shared.needs[k],
            cfg.estimate.bandwidth_gbs,
        )
        for k, t in zip(keys, trials)
    ]
    seconds = {"statistics": sum(p.seconds for p in shared.passes if not p.read_only)}
    seconds["values"] = sum(
        value_seconds(j.trial, _shape(j.trial), tflops, len(j.missing())) for j in shared.values.values()
    )
    seconds["scores"] = sum(
        _pre_score_seconds(j.trial, len(j.missing()), tflops, cfg.estimate.bandwidth_gbs)
        for j in shared.scores.values()
    )
    return Plan(planned, cells, shared, estimates, seconds)


def _pre_score_seconds(t: TrialConfig, n: int, tflops: float, bandwidth: float) -> float:
    """The unedited model's scores of ``n`` facts: teacher-forced, and generated when configured."""
    shape, sc = _shape(t), t.scoring
    out = score_seconds(shape, n, tflops)
    if sc.generated:
        bytes_w = 2 if t.model.dtype in ("bfloat16", "bf16", "float16", "fp16") else 4
        out += generation_seconds(shape, 3 * n, sc.gen_max_new_tokens, sc.gen_batch_size, tflops, bandwidth, bytes_w)
    return out


def _shape(t: TrialConfig) -> Shape:
    return shape_of(t.model)


def estimate(
    t: TrialConfig, shape: Shape, tflops: float, needs: Any = None, bandwidth: float = 2000.0
) -> dict[str, float]:
    """Rough GPU memory (GB) and time (s) of a trial, from shapes alone.

    Memory: weights in the model dtype + C of each edited layer (fp32) and its fp64 solve copy + the
    algorithm's d_key² fp64 state per layer (``TRAITS.state_matrices``) + the value
    optimisation's saved activations (rows × ~12 tokens after the cached prefix × layers above the edit
    × ~(10·d + 4·dk) values in the model dtype). Time: the value optimisation (none when the sweep shares
    the values) plus the scoring forwards (at edit and, in sequential modes, final; pre-edit scores
    only when the sweep does not share them), the generation-based scoring (:func:`generation_seconds`)
    and the probe points (:func:`probe_seconds`) when configured.
    """
    hp = t.edit_hparams
    bytes_w = 2 if t.model.dtype in ("bfloat16", "bf16", "float16", "fp16") else 4
    n_prompts = N_TEMPLATES[hp.context_templates] + 1
    rows = min(t.batch_size, hp.value_batch) * n_prompts
    above = shape.n_layers - hp.layers[-1]
    act = rows * 12 * above * (10 * shape.d_model + 4 * shape.d_key) * bytes_w
    tr = traits(t.algorithm)
    stats_mem = len(hp.layers) * shape.d_key**2 * (4 + 8) if tr.needs_stats(hp) else 0
    stats_mem += len(hp.layers) * shape.d_key**2 * 8 * tr.state_matrices  # P of AlphaEdit, P_t of RLSEdit
    mem = shape.params * bytes_w + stats_mem + act
    values_shared = needs is not None and needs.values is not None
    scores_shared = needs is not None and needs.scores is not None
    values = 0.0 if values_shared else value_seconds(t, shape, tflops, t.n_edits)
    rounds = (1 if t.mode == "batch" else 2) + (1 if t.scoring.pre and not scores_shared else 0)
    score = score_seconds(shape, t.n_edits, tflops) * rounds
    sc = t.scoring
    if sc.generated:  # rewrite and paraphrase prompts greedy to the stop or the cap; the neighbourhood
        # prompts checked against the unedited model's generations by one forward each (decodes_to)
        check = 2 * shape.params * t.n_edits * (20 + sc.gen_max_new_tokens) / (tflops * 1e12)
        gen = generation_seconds(
            shape, 2 * t.n_edits, sc.gen_max_new_tokens, sc.gen_batch_size, tflops, bandwidth, bytes_w
        )
        score += (gen + check) * rounds
    if sc.probes:  # before editing, every probe_every batches, after the last
        points = 2 + (t.n_batches // sc.probe_every if sc.probe_every else 0)
        score += points * probe_seconds(
            shape, len(sc.probes), sc.probe_items, sc.gen_batch_size, tflops, bandwidth, bytes_w
        )
    return {"gpu_memory_gb": mem / 1e9, "time_s": values + score, "value_steps": float(hp.v_num_grad_steps)}


def generation_seconds(
    shape: Shape, n_prompts: int, max_new: int, batch: int, tflops: float, bandwidth_gbs: float, bytes_w: int
) -> float:
    """Greedy generation of ``n_prompts`` prompts (~20 tokens) in batches of ``batch``, each batch run
    to ``max_new`` steps (the worst case: it stops when its last row does): the prompts' FLOPs, and per
    step one read of the weights at ``bandwidth_gbs`` (decoding is bound by memory, not compute)."""
    steps = -(-n_prompts // batch) * max_new
    flops = 2 * shape.params * n_prompts * (20 + max_new)
    return flops / (tflops * 1e12) + steps * shape.params * bytes_w / (bandwidth_gbs * 1e9)


#: mean prompt tokens of a probe item (AlphaEdit's glue_eval: SST-2 ~30, MRPC/RTE/NLI ~70-120, MMLU ~90)
PROBE_PROMPT_TOKENS = 80
#: new tokens each probe item generates (AlphaEdit's gen_len)
PROBE_GEN_TOKENS = 5


def probe_seconds(
    shape: Shape, n_tasks: int, items: int, batch: int, tflops: float, bandwidth_gbs: float, bytes_w: int
) -> float:
    """One probe point (:func:`sweep.evals.probes.predict`): every item's prompt prefilled once (the prefill
    the generation continues from also gives the label words' likelihoods), the tasks' items batched
    together, and :data:`PROBE_GEN_TOKENS` decoding steps per batch."""
    n = n_tasks * items
    flops = 2 * shape.params * n * (PROBE_PROMPT_TOKENS + PROBE_GEN_TOKENS)
    steps = -(-n // batch) * PROBE_GEN_TOKENS
    return flops / (tflops * 1e12) + steps * shape.params * bytes_w / (bandwidth_gbs * 1e9)


def _fmt_s(x: float) -> str:
    if math.isnan(x):
        return "?"
    if x < 10:
        return f"{x:.1f} s"
    return f"{x / 3600:.2f} h" if x >= 3600 else f"{x:.0f} s"


def format_plan(cfg: SweepConfig, plan: Plan) -> str:
    s = plan.summary()
    searching = plan.cells.searching
    what = "stand-in trial(s) of a search" if searching else "trials"
    lines = [f"sweep {cfg.name}: {s['trials']} {what} (id {sweep_id(cfg)})"]
    wm = max([13, *(len(t.method_name) for t in plan.trials)])  # columns as wide as their longest entry
    wd = max([11, *(len(t.dataset.name) for t in plan.trials)])
    wl = max([10, *(len(str(list(t.edit_hparams.layers))) for t in plan.trials)])
    lines.append(
        f"{'#':>3} {'method':<{wm}} {'data':<{wd}} {'layers':<{wl}} {'B':>5} {'mode':<17} {'n':>5} {'GPU GB':>7} "
        f"{'est. s':>8}  hp"
    )
    for i, (t, e) in enumerate(zip(plan.trials, plan.estimates)):
        hp = ", ".join(f"{k}={v}" for k, v in t.hp.items())
        lines.append(
            f"{i:>3} {t.method_name:<{wm}} {t.dataset.name:<{wd}} {list(t.edit_hparams.layers)!s:<{wl}} "
            f"{t.batch_size:>5} {t.mode:<17} {t.n_edits:>5} {e['gpu_memory_gb']:>7.1f} {e['time_s']:>8.0f}  {hp}"
        )
    if searching:
        lines += _search_lines(cfg, plan.cells)
    sh = plan.shared
    workers = stats_workers(cfg)  # resources.max_concurrent, else 1: a dry run asks no cluster
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
            k = len(pass_parts(p.trial, workers))
            lines.append(
                f"  pass: layers {_span(p.layers)} ({len(p.layers)}), {p.memory_gb:.1f} GB, "
                f"~{_fmt_s(p.seconds)} ({tok or 'whole corpus'}, weights {stats_dtype(p.trial)})"
                + (f", split over {k} workers" if k > 1 else "")
            )
    lines.append(
        f"target values: {s['values_to_optimise_shared']} to optimise, {s['values_cached']} stored "
        f"(instead of {s['values_without_sharing']} without sharing)"
    )
    lines.append(
        f"pre-edit scores: {s['scores_to_compute']} facts to score, {s['scores_cached']} stored "
        f"(instead of {s['scores_without_sharing']} without sharing)"
    )
    head = sh.head()
    lines.append(
        f"head (the driver's node): its object store holds {_gb(head.object_store_bytes)} for the trials "
        f"(statistics {_gb(head.stats_bytes)}, values {_gb(head.values_bytes)}; the launch refuses a head "
        f"with less than {_gb(head.object_store_bytes / SPILL_SHARE)}), its stores gain {_gb(head.store_bytes)}"
    )
    trials_s, n_trials = plan.trial_seconds(cfg)
    sec = plan.shared_seconds
    total = trials_s + sec["statistics"] + sec["values"] + sec["scores"]
    hint = "" if cfg.resources.max_concurrent else "; resources.max_concurrent sets more"
    wall = f"{_fmt_s(stats_wall_seconds(sh.passes, workers))} wall on {workers} worker{'s' * (workers > 1)}{hint}"
    lines.append(
        f"estimated time at {cfg.estimate.tflops:g} TFLOP/s sustained (rough): statistics "
        f"{_fmt_s(sec['statistics'])} ({wall}), "
        f"values {_fmt_s(sec['values'])}, pre-edit scores {_fmt_s(sec['scores'])}, "
        + (f"{n_trials} trials {_fmt_s(trials_s)} before early stops" if searching else f"trials {_fmt_s(trials_s)}")
        + f"; total {_fmt_s(total)} of device time"
    )
    return "\n".join(lines)


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _search_lines(cfg: SweepConfig, cells: Cells) -> list[str]:
    """What a search will run: its space, trials per cell, the dev and held-out facts."""
    s = cfg.search
    spaces: dict[str, list[str]] = {}  # each distinct space, with the cells that search it
    for c in cells.cells:
        text = ", ".join(f"{k} ~ {d.kind}{list(d.args)}" for k, d in c.spaces.items())
        spaces.setdefault(text, []).append(c.variant or "base")
    space = "; ".join(
        text + (f" ({', '.join(dict.fromkeys(v))})" if len(spaces) > 1 else "") for text, v in spaces.items()
    )
    goal = ", ".join(f"{m} ({mo})" for m, mo in zip(s.metrics, s.modes))
    out = [
        f"search: {s.algorithm} over {space}; {s.num_samples} trial(s) per cell x {len(cells.cells)} cell(s), "
        f"optimising {goal}" + (f"; {cfg.scheduler.name} on {cfg.scheduler.metric}" if cfg.scheduler else ""),
        "  the rows above stand for the search's trials (each cell at its spaces' options or middle); the shared "
        "work below is what they need, fulfilled on demand as trials ask (sweep.shared.service)",
    ]
    if cells.split is not None:
        n_dev, n_test = cells.split
        out.append(
            f"  dev facts: the first {n_dev}; then each cell's best configuration on the {n_test} held-out facts "
            f"x {cfg.repeats} repeat(s)"
        )
    return out


def _span(layers: tuple[int, ...]) -> str:
    ls = list(layers)
    if len(ls) > 2 and ls == list(range(ls[0], ls[-1] + 1)):
        return f"{ls[0]}-{ls[-1]}"
    return str(ls)
