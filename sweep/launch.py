"""Run a whole sweep on Ray Tune, with shared statistics and values, tracked in MLflow.

    python -m sweep.launch --config sweep/configs/demo.yaml --local          # laptop / CI: local Ray
    python -m sweep.launch --config sweep/configs/paper-batch.yaml --local --num-gpus 1
    python -m sweep.launch --config sweep/configs/paper-batch.yaml           # on a cluster (address=auto)
    python -m sweep.launch --config ... --dry-run                            # the plan, no model loaded
    python -m sweep.launch --config ... --resume                             # continue a stopped sweep

Before any trial starts, the pre-pass (:mod:`sweep.prepass`) computes the shared work the stores lack:
statistics in passes that fit a worker's memory, batch-mode target values and pre-edit scores once per
fact, each stored as it finishes and put in the object store once; trials receive references (no
per-trial copy; same-node reads are zero-copy).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from editors.config import ConfigError, to_dict
from editors.store import write_json_atomic

from .config import SweepConfig, load_sweep, method_name, sweep_id, trial_hparams
from .plan import Plan, format_plan, make_plan
from .prepass import SharedPlan, plan_shared
from .shared import PplKey, ScoresStore, ValuesStore
from .worker import TrialRefs, ppl_task, scores_task, stats_pass_task, values_task

log = logging.getLogger("sweep.launch")

#: Environment variables forwarded to the Ray workers.
PASSTHROUGH = ("HF_TOKEN", "HF_HOME", "HF_HUB_OFFLINE", "MLFLOW_TRACKING_URI", "MODEL_EDITING_CACHE")


def init_ray(args: argparse.Namespace) -> None:
    import ray

    env_vars = {"RAY_CHDIR_TO_TRIAL_DIR": "0", "TOKENIZERS_PARALLELISM": "false"}
    # Secrets and locations travel from the launching shell to every worker, never through a file.
    env_vars.update({k: os.environ[k] for k in PASSTHROUGH if k in os.environ})
    env = {"env_vars": env_vars}
    if args.local:
        # address="local" always starts a fresh instance (a stale /tmp/ray session would otherwise be joined)
        ray.init(
            address="local",
            num_cpus=args.num_cpus,
            num_gpus=args.num_gpus,
            include_dashboard=False,
            runtime_env=env,
            log_to_driver=args.verbose,
        )
    else:
        ray.init(address=args.address, runtime_env=env, log_to_driver=args.verbose)


# ----------------------------------------------------------------------------------------------------
# The pre-pass on Ray (plan: sweep.prepass.plan_shared; task bodies: sweep.worker)


#: Set to N to make the launcher SIGKILL itself once N value/score chunks are stored (fault injection).
CHAOS_KILL_ENV = "MODEL_EDITING_CHAOS_KILL_LAUNCHER_AFTER"


def _chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _chaos_after() -> int | None:
    v = os.environ.get(CHAOS_KILL_ENV)
    return int(v) if v else None


@dataclass
class _Submitted:
    """What the pre-pass has in flight or in the object store, by what trials ask for."""

    layer_refs: dict[tuple[str, int], Any] = field(default_factory=dict)  # (group, layer) -> C
    meta_refs: dict[tuple[str, int], Any] = field(default_factory=dict)  # (group, layer) -> its pass's meta
    fact_refs: dict[tuple[Any, str], Any] = field(default_factory=dict)  # (key, digest) -> (chunk digests, ref)
    ppl_refs: dict[PplKey, Any] = field(default_factory=dict)
    pending: dict[Any, str] = field(default_factory=dict)  # ref to wait on -> kind
    chunk_sizes: dict[Any, int] = field(default_factory=dict)  # a chunk's seconds ref -> its facts


def run_prepass(cfg: SweepConfig, shared: SharedPlan) -> tuple[dict[str, TrialRefs], dict[str, Any]]:
    """Compute what ``shared`` lacks on Ray, store it as it finishes, and hand every trial its refs.

    Returns (trial key -> :class:`TrialRefs`, work counters).
    """
    gpu = cfg.resources.prepass_gpu if cfg.resources.prepass_gpu is not None else cfg.resources.gpu
    opts = {"num_cpus": cfg.resources.cpu, "num_gpus": gpu, "max_retries": cfg.retries}
    t0 = time.perf_counter()
    counts = shared.counts()
    work: dict[str, Any] = {
        "stats_layers_computed": 0,
        "stats_layers_cached": counts["statistics_cached"],
        "stats_passes": 0,
        "values_optimised": 0,
        "values_cached": counts["values_cached"],
        "scores_computed": 0,
        "scores_cached": counts["scores_cached"],
        "stats_task_s": 0.0,  # seconds the tasks of each kind ran, summed over workers
        "values_task_s": 0.0,
        "scores_task_s": 0.0,
    }
    sub = _Submitted()
    _submit_stats(cfg, shared, opts, sub)
    _submit_facts(cfg, shared, opts, sub)
    _submit_ppl(cfg, shared, opts, sub)
    log.info(
        "pre-pass: %d statistics pass(es) for %d layer(s) (%d read from the store), %d target values and "
        "%d pre-edit scores in %d chunk(s) (%d values, %d scores stored)",
        counts["statistics_passes"],
        counts["statistics_to_compute"],
        counts["statistics_cached"],
        counts["values_to_optimise_shared"],
        counts["scores_to_compute"],
        len(sub.chunk_sizes),
        counts["values_cached"],
        counts["scores_cached"],
    )
    _wait_all(sub, counts, work, t0)
    work["prepass_s"] = time.perf_counter() - t0
    log.info("shared work: %s", work)
    return _hand_out(shared, sub), work


def _submit_stats(cfg: SweepConfig, shared: SharedPlan, opts: dict[str, Any], sub: _Submitted) -> None:
    """One task per statistics pass; a layer's matrix is in the object store when its pass ends."""
    import ray

    for p in shared.passes:
        o = {**opts, "num_gpus": 0, "num_cpus": min(1.0, cfg.resources.cpu)} if p.read_only else opts
        task = ray.remote(stats_pass_task).options(num_returns=len(p.layers) + 1, **o)
        refs = task.remote(to_dict(p.trial), list(p.layers))
        for layer, ref in zip(p.layers, refs[:-1]):
            sub.layer_refs[(p.group, layer)] = ref
            sub.meta_refs[(p.group, layer)] = refs[-1]
        sub.pending[refs[-1]] = "stats"


def _submit_facts(cfg: SweepConfig, shared: SharedPlan, opts: dict[str, Any], sub: _Submitted) -> None:
    """Values and pre-edit scores: stored parts read here and put once; one task per missing chunk."""
    import ray

    for kind, jobs, task_fn, store_cls, root in (
        ("values", shared.values, values_task, ValuesStore, cfg.values_store),
        ("scores", shared.scores, scores_task, ScoresStore, cfg.scores_store),
    ):
        for key, job in jobs.items():
            if job.cached:
                stored = store_cls(root).get(key, job.cached)
                ds = tuple(stored)
                if kind == "values":
                    ref = ray.put(torch.stack([stored[d] for d in ds]).numpy())
                else:
                    ref = ray.put([stored[d] for d in ds])
                for d in ds:
                    sub.fact_refs[(key, d)] = (ds, ref)
            for chunk in _chunks(job.missing(), cfg.values_chunk):
                ids = [r.case_id for r, _ in chunk]
                ds = tuple(d for _, d in chunk)
                ref, secs = ray.remote(task_fn).options(num_returns=2, **opts).remote(to_dict(job.trial), ids, root)
                for d in ds:
                    sub.fact_refs[(key, d)] = (ds, ref)
                sub.chunk_sizes[secs] = len(ds)
                sub.pending[secs] = kind


def _submit_ppl(cfg: SweepConfig, shared: SharedPlan, opts: dict[str, Any], sub: _Submitted) -> None:
    """The unedited perplexities the store lacks (stored ones are handed over as numbers)."""
    import ray

    for pk, t in shared.ppl.items():
        if pk in shared.ppl_cached:
            sub.ppl_refs[pk] = shared.ppl_cached[pk]
        else:
            sub.ppl_refs[pk] = ray.remote(ppl_task).options(**opts).remote(to_dict(t), cfg.scores_store)
            sub.pending[sub.ppl_refs[pk]] = "ppl"


def _wait_all(sub: _Submitted, counts: dict[str, int], work: dict[str, Any], t0: float) -> None:
    """Wait on every task at once, counting and logging each as it finishes, in any order."""
    import ray

    chaos = _chaos_after()
    chunks_done = 0
    left = list(sub.pending)
    while left:
        ready, left = ray.wait(left, num_returns=1)
        ref = ready[0]
        kind = sub.pending[ref]
        el = time.perf_counter() - t0
        if kind == "stats":
            meta = ray.get(ref)
            work["stats_task_s"] += meta["seconds"]
            work["stats_done_s"] = el
            if meta["computed"]:
                work["stats_passes"] += 1
                work["stats_layers_computed"] += len(meta["computed"])
                log.info(
                    "pre-pass: statistics of layers %s ready, %s tokens (%.0f s)", meta["computed"], meta["tokens"], el
                )
        elif kind in ("values", "scores"):
            work[f"{kind}_task_s"] += ray.get(ref)  # the chunk's seconds; raises the task's error, if any
            work[f"{kind}_done_s"] = el
            work["values_optimised" if kind == "values" else "scores_computed"] += sub.chunk_sizes[ref]
            chunks_done += 1
            log.info(
                "pre-pass: %d/%d target values, %d/%d pre-edit scores (%.0f s)",
                work["values_optimised"],
                counts["values_to_optimise_shared"],
                work["scores_computed"],
                counts["scores_to_compute"],
                el,
            )
            if chaos is not None and chunks_done >= chaos:
                Path(os.environ.get(CHAOS_KILL_ENV + "_MARK", "/dev/null")).write_text(str(chunks_done))
                os.kill(os.getpid(), signal.SIGKILL)


def _hand_out(shared: SharedPlan, sub: _Submitted) -> dict[str, TrialRefs]:
    """Each trial's references: its layers' C, the chunks holding its facts' values and scores."""
    refs: dict[str, TrialRefs] = {}
    for tkey, need in shared.needs.items():
        tr = TrialRefs()
        if need.stats_group is not None:
            tr.stats = {layer: sub.layer_refs[(need.stats_group, layer)] for layer in need.layers}
            tr.stats_meta = {layer: sub.meta_refs[(need.stats_group, layer)] for layer in need.layers}
        if need.values is not None:
            tr.values = _dedupe([sub.fact_refs[(need.values, d)] for d in need.value_digests])
        if need.scores is not None:
            tr.scores = _dedupe([sub.fact_refs[(need.scores, d)] for d in need.score_digests])
        if need.ppl is not None:
            tr.ppl = sub.ppl_refs[need.ppl]
        refs[tkey] = tr
    return refs


def _dedupe(items: Iterable[tuple[tuple[str, ...], Any]]) -> list[tuple[tuple[str, ...], Any]]:
    seen: dict[int, tuple[tuple[str, ...], Any]] = {}
    for ds, ref in items:
        seen.setdefault(id(ref), (ds, ref))
    return list(seen.values())


def run(cfg: SweepConfig, plan: Plan, args: argparse.Namespace) -> dict[str, Any]:
    """Start (or resume) the sweep; returns a summary with the parent run id and work counters."""
    from . import tracking

    t_start = time.perf_counter()
    sid = sweep_id(cfg)
    uri = tracking.tracking_uri(cfg.mlflow.tracking_uri)
    tracking.check_server(uri)  # within seconds, before the pre-pass spends anything
    c = tracking.client(uri)
    exp = tracking.experiment_id(c, cfg.mlflow.experiment)
    print(f"MLflow: {uri}; the runs as they finish: {tracking.runs_url(uri, exp)}")
    parent, reused = tracking.start_parent(c, exp, cfg.name, sid, args.resume)
    if not reused:
        _log_sweep(c, parent, cfg, plan)
    done = tracking.trial_runs(c, exp, parent)
    init_ray(args)
    todo = [k for k in plan.keys if k not in done]
    summary = {"parent_run_id": parent, "tracking_uri": uri}
    if args.resume and not todo:
        log.info("every trial of %s is already in MLflow: nothing to run", cfg.name)
        c.set_terminated(parent, "FINISHED")
        work = {"stats_layers_computed": 0, "values_optimised": 0, "trials_run": 0}
        return {
            **summary,
            "work": work,
            "trials": len(plan.trials),
            "errors": 0,
            "wall_s": time.perf_counter() - t_start,
        }
    shared = plan.shared
    if len(todo) < len(plan.keys):  # resumed: the shared work of the trials still to run, stores re-read
        left = [(k, t) for k, t in zip(plan.keys, plan.trials) if k in todo]
        shared = plan_shared(cfg, [t for _, t in left], [k for k, _ in left])
    refs, work = run_prepass(cfg, shared)
    _log_statistics(c, parent, shared)
    callback = tracking.make_callback(uri, exp, parent, sid, {k: to_dict(t) for k, t in zip(plan.keys, plan.trials)})
    grid = _tuner(cfg, plan, todo, refs, callback, args).fit()
    errors = grid.num_errors
    rows = [_row(r) for r in grid]
    work["trials_run"] = len(rows)
    wall = time.perf_counter() - t_start
    _close_parent(c, exp, parent, sid, grid, work, wall, errors)
    _print_summary(cfg, rows, errors, wall, work, uri, parent, exp)
    return {**summary, "work": work, "trials": len(rows), "errors": errors, "wall_s": wall}


def _close_parent(
    c: Any, exp: str, parent: str, sid: str, grid: Any, work: dict[str, Any], wall: float, errors: int
) -> None:
    """Log what MLflow lacks (trials that ended while the server was away, from Tune's results) and the
    sweep's totals, and close the parent run; an unreachable server leaves it for ``--resume``."""
    from mlflow.entities import Metric

    from . import tracking

    checkpoints = {r.config["point"]["key"]: r.checkpoint for r in grid if r.checkpoint is not None}
    try:
        if n := tracking.log_missing(c, exp, parent, sid, checkpoints):
            log.info("logged %d trial(s) that MLflow lacked", n)
        if n := tracking.close_running(c, exp, parent):
            log.info("closed %d unfinished trial run(s) as KILLED", n)
        now = int(time.time() * 1000)
        c.log_batch(
            parent,
            metrics=[Metric(f"work.{k}", float(v), now, 0) for k, v in work.items()]
            + [Metric("wall_s", wall, now, 0), Metric("errors", float(errors), now, 0)],
        )
        c.set_terminated(parent, "FINISHED" if errors == 0 else "FAILED")
    except Exception as e:
        log.warning("MLflow is not reachable (%s): the results stay in Tune's storage; run again with --resume", e)


def _log_sweep(c: Any, parent: str, cfg: SweepConfig, plan: Plan) -> None:
    """The parent run's params and provenance artifacts (config, plan)."""
    params = {
        "sweep": cfg.name,
        "trials": len(plan.trials),
        "grid": json.dumps(cfg.grid),
        "models": json.dumps(sorted({t.model.source or "smollm2-135m (embedded)" for t in plan.trials})),
    }
    c.log_batch(parent, params=[_param(k, v) for k, v in params.items()])
    c.log_dict(parent, to_dict(cfg), "sweep.yaml")
    c.log_dict(
        parent,
        {"summary": plan.summary(), "trials": [to_dict(t) for t in plan.trials], "estimates": plan.estimates},
        "plan.json",
    )


def _log_statistics(c: Any, parent: str, shared: SharedPlan) -> None:
    """Provenance of the statistics: every pass, its layers, memory, model and settings."""
    passes = [
        {
            "layers": list(p.layers),
            "read_from_store": p.read_only,
            "memory_gb": p.memory_gb,
            "model": to_dict(p.trial.model),
            "stats": to_dict(p.trial.stats),
        }
        for p in shared.passes
    ]
    c.log_dict(parent, {"passes": passes, "budget_gb": shared.budget_gb}, "statistics.json")


def _tuner(
    cfg: SweepConfig, plan: Plan, todo: list[str], refs: dict[str, TrialRefs], callback: Any, args: argparse.Namespace
) -> Any:
    """The Tune run of the trials still to do (restored when resuming), each handed its references."""
    from ray import tune

    from . import worker

    trials = {k: to_dict(t) for k, t in zip(plan.keys, plan.trials)}
    points = [
        {
            "key": k,
            "method": method_name(t),
            "algorithm": t.algorithm,
            "layers": list(trial_hparams(t).layers),
            "batch_size": t.batch_size,
            "mode": t.mode,
            **{f"hp.{a}": b for a, b in t.hp.items()},
        }
        for k, t in zip(plan.keys, plan.trials)
        if k in todo
    ]
    fn = tune.with_parameters(worker.trainable, refs=refs, trials=trials)
    fn = tune.with_resources(fn, {"cpu": cfg.resources.cpu, "gpu": cfg.resources.gpu})
    storage = str(Path(cfg.storage).resolve())
    name = f"{cfg.name}-{sweep_id(cfg)}"
    # A compact progress table (trial, method, layers, B, mode | edits so far, S/ES/PS/NS at edit) instead
    # of the new output engine's box per result; CLIReporter is honoured only with RAY_AIR_NEW_OUTPUT=0.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    reporter = tune.CLIReporter(
        parameter_columns={
            "point/method": "method",
            "point/layers": "layers",
            "point/batch_size": "B",
            "point/mode": "mode",
        },
        metric_columns={"edits": "edits", "s": "S", "es": "ES", "ps": "PS", "ns": "NS"},
        max_report_frequency=30,
    )
    run_config = tune.RunConfig(
        name=name,
        storage_path=storage,
        callbacks=[callback],
        verbose=0 if args.quiet else 1,
        progress_reporter=reporter,
        failure_config=tune.FailureConfig(max_failures=cfg.retries),
    )
    path = os.path.join(storage, name)
    if args.resume and tune.Tuner.can_restore(path):
        return tune.Tuner.restore(path, trainable=fn, resume_errored=True)
    return tune.Tuner(
        fn,
        param_space={"point": tune.grid_search(points)},
        run_config=run_config,
        tune_config=tune.TuneConfig(reuse_actors=True, max_concurrent_trials=cfg.resources.max_concurrent),
    )


def _row(r: Any) -> tuple:
    """(method, layers, B, mode, S final, S at edit) of one Tune result."""
    m = r.metrics or {}
    p = (r.config or {}).get("point", {})
    return (
        p.get("method") or p.get("algorithm"),
        p.get("layers"),
        p.get("batch_size"),
        p.get("mode"),
        m.get("final.s"),
        m.get("at_edit.s"),
    )


def _print_summary(
    cfg: SweepConfig,
    rows: list[tuple],
    errors: int,
    wall: float,
    work: dict[str, Any],
    uri: str,
    parent: str,
    exp: str,
) -> None:
    """The sweep's printed result: one line per trial, the shared work and where to look."""
    print(f"\n{'method':<13} {'layers':<8} {'B':>5} {'mode':<17} {'S final':>8} {'S at edit':>9}")
    for a, ly, b, mo, sf, sa in sorted(rows, key=lambda r: str(r)):
        print(f"{a!s:<13} {ly!s:<8} {b!s:>5} {mo!s:<17} {_fmt(sf):>8} {_fmt(sa):>9}")
    print(f"\nsweep {cfg.name}: {len(rows)} trials run, {errors} failed, {wall:.0f}s; shared work {work}")
    print(f"MLflow: {uri} (experiment {cfg.mlflow.experiment!r}, parent run {parent})")
    if not uri.startswith(("http://", "https://")):
        print(f"  view:   mlflow ui --backend-store-uri {uri}")
    from .tracking import runs_url

    print(f"  runs:   {runs_url(uri, exp)}")
    print(f"  report: python -m sweep.report --sweep {cfg.name} --tracking-uri {uri}")


def _param(k: str, v: Any):
    from mlflow.entities import Param

    return Param(k, str(v)[:6000])


def _fmt(x: Any) -> str:
    return f"{x:.2f}" if isinstance(x, (int, float)) else "-"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sweep.launch", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="sweep YAML (sweep/configs/*.yaml)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. base.n_edits=64 retries=2")
    ap.add_argument("--local", action="store_true", help="start a local Ray instead of joining a cluster")
    ap.add_argument("--address", default="auto", help="Ray address to join (default: auto)")
    ap.add_argument("--num-gpus", type=float, default=None, help="GPUs of the local Ray (fake ones are fine)")
    ap.add_argument("--num-cpus", type=float, default=None)
    ap.add_argument("--dry-run", action="store_true", help="print the plan and exit; no model is loaded")
    ap.add_argument("--resume", action="store_true", help="continue a stopped sweep; finished trials are kept")
    ap.add_argument("--verbose", action="store_true", help="forward the workers' logs to this console")
    ap.add_argument("--quiet", action="store_true", help="no Tune progress table")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        cfg = load_sweep(args.config, args.overrides)
        plan = make_plan(cfg, dry_run=args.dry_run)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_plan(cfg, plan))
    if args.dry_run:
        return 0
    from .tracking import TrackingUnavailable

    try:
        summary = run(cfg, plan, args)
    except TrackingUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_json_atomic(Path(cfg.storage) / f"{cfg.name}-{sweep_id(cfg)}-summary.json", summary)
    return 0 if summary["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
