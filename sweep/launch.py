"""Run a whole sweep on Ray Tune, with shared statistics and values, tracked in MLflow.

    python -m sweep.launch --config sweep/configs/demo.yaml --local          # laptop / CI: local Ray
    python -m sweep.launch --config sweep/configs/paper-batch.yaml --local --num-gpus 1
    python -m sweep.launch --config sweep/configs/paper-batch.yaml           # on a cluster (address=auto)
    python -m sweep.launch --config ... --dry-run                            # the plan, no model loaded
    python -m sweep.launch --config ... --resume                             # continue a stopped sweep

The chain: config -> plan (:mod:`sweep.cells`, :mod:`sweep.plan`, :mod:`sweep.shared.needs`: the trials, each
resolved once, shared work, memory and cost, with a worker's GPU memory from the config or the cluster) ->
shared work: a grid's fulfilled before its trials start (:func:`sweep.shared.fulfil.fulfil_ray`: statistics passes
split over the workers, target values and pre-edit scores computed once as Ray tasks, written by this
process to the stores on its disk, handed on as copies it owns), a search's on demand as its trials ask
(:mod:`sweep.shared.service`, which every trial asks) -> the trials on Ray Tune (:mod:`sweep.shared.tasks`; a search's
suggested by :mod:`sweep.tune.search`, then each method's best on the held-out facts), each reporting its whole
result through Ray -> MLflow (:mod:`sweep.tune.tracking`) -> the summary next to Tune's storage (a local path or
a URI such as ``s3://bucket/sweeps``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from editors.config import ConfigError, to_dict
from editors.store import write_json_atomic

from .cells import Cells, PlannedTrial, planned_of, space_name
from .config import SweepConfig, is_uri, load_sweep, sweep_id
from .evals.probes import check_probe_data
from .plan import SPILL_SHARE, Plan, format_plan, make_plan
from .shared.fulfil import Feed, WorkCounts
from .shared.needs import HeadNeeds, SharedPlan, plan_shared
from .tune.search import Best, CellSearch, ReadyFirst, best_of, per_method, scheduler

log = logging.getLogger("sweep.launch")

#: Environment variables forwarded to the Ray workers.
PASSTHROUGH = ("HF_TOKEN", "HF_HOME", "HF_HUB_OFFLINE", "MLFLOW_TRACKING_URI", "MODEL_EDITING_CACHE")
#: Set by Ray's job server in a submitted job's driver: the job's config, with its runtime env.
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def job_env_vars() -> dict[str, str]:
    """The ``env_vars`` of the runtime env this driver was submitted with (``ray job submit
    --runtime-env-json``), empty for a driver started by hand."""
    raw = os.environ.get(JOB_CONFIG_ENV)
    if not raw:
        return {}
    try:
        env = (json.loads(raw).get("runtime_env") or {}).get("env_vars") or {}
    except (ValueError, AttributeError):
        return {}
    return dict(env) if isinstance(env, dict) else {}


def runtime_env() -> dict[str, Any]:
    """The runtime env the launcher adds for the workers: its fixed settings and the
    :data:`PASSTHROUGH` variables of this shell, minus every variable a submitted job's runtime env
    already sets (Ray refuses to merge two runtime envs that set the same variable, and the job's own
    value reaches every worker anyway)."""
    env_vars = {"RAY_CHDIR_TO_TRIAL_DIR": "0", "TOKENIZERS_PARALLELISM": "false"}
    # Secrets and locations travel from the launching shell to every worker, never through a file.
    env_vars.update({k: os.environ[k] for k in PASSTHROUGH if k in os.environ})
    taken = job_env_vars()
    return {"env_vars": {k: v for k, v in env_vars.items() if k not in taken}}


def init_ray(args: argparse.Namespace) -> None:
    import ray

    env = runtime_env()
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


def storage_path(cfg: SweepConfig) -> str:
    """Tune's ``storage_path``: a URI unchanged (``Path`` would turn ``s3://b/x`` into a local folder
    ``s3:/b/x``), a local path made absolute."""
    return cfg.storage if is_uri(cfg.storage) else str(Path(cfg.storage).expanduser().resolve())


def write_summary(cfg: SweepConfig, summary: dict[str, Any]) -> str:
    """Write the sweep's summary JSON next to Tune's experiment (a URI through pyarrow); returns where."""
    name = f"{cfg.name}-{sweep_id(cfg)}-summary.json"
    root = storage_path(cfg)
    if not is_uri(root):
        return str(write_json_atomic(Path(root) / name, summary))
    from pyarrow import fs

    filesystem, base = fs.FileSystem.from_uri(root)
    filesystem.create_dir(base, recursive=True)
    with filesystem.open_output_stream(f"{base}/{name}") as f:
        f.write(json.dumps(summary, indent=1, default=str).encode())
    return f"{root.rstrip('/')}/{name}"


# ----------------------------------------------------------------------------------------------------
# Planning from the cluster


#: How long planning waits for a GPU node to answer (an autoscaler may have to start one first).
GPU_PROBE_TIMEOUT_S = 900.0


def needs_gpu_budget(cfg: SweepConfig) -> bool:
    """Whether planning needs a worker's device memory: trials on GPUs and no ``resources.gpu_memory_gb``."""
    return cfg.resources.gpu > 0 and cfg.resources.gpu_memory_gb is None


def gpu_budget(cfg: SweepConfig, args: argparse.Namespace) -> float | None:
    """A worker's device memory for the statistics passes (GB): ``resources.gpu_memory_gb``; else, for
    ``--local``, this machine's first GPU; else asked of one of the cluster's GPU nodes (a small task
    there); never this machine's card for a cluster (the driver's node may have none, or another one).
    None when trials run on CPUs. Raises :class:`ConfigError` when nobody can say."""
    r = cfg.resources
    if r.gpu_memory_gb is not None:
        return r.gpu_memory_gb
    if r.gpu <= 0:
        return None
    if args.dry_run:
        raise ConfigError(
            "resources.gpu_memory_gb: a dry run asks no cluster, so the statistics passes cannot be sized; "
            "set it to the workers' GPU memory in GB (48 for an L40S)"
        )
    if args.local:
        if not torch.cuda.is_available():
            raise ConfigError(
                "resources.gpu_memory_gb: --local with resources.gpu > 0 but this machine has no CUDA device; "
                "set resources.gpu: 0, or resources.gpu_memory_gb for fake GPUs (--num-gpus)"
            )
        return torch.cuda.get_device_properties(0).total_memory / 1e9
    return _ask_cluster_gpu()


def _ask_cluster_gpu() -> float:
    import ray

    from .shared.tasks import gpu_memory_task

    if not ray.is_initialized():
        raise RuntimeError("gpu budget: join the cluster first (init_ray)")
    log.info("planning: asking a GPU node for its device memory (an autoscaler may start one first)")
    # max_calls=1: the process that opened a CUDA context to read the card exits after it (Ray sets this for
    # GPU functions only in the decorator form; .options(num_gpus=...) would keep the process and its context)
    probe = ray.remote(num_gpus=1, num_cpus=0, max_retries=0, max_calls=1)(gpu_memory_task)
    ref = probe.remote()
    try:
        got = ray.get(ref, timeout=GPU_PROBE_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        ray.cancel(ref, force=True)
        raise ConfigError(
            f"resources.gpu_memory_gb: no GPU node of the cluster answered within {GPU_PROBE_TIMEOUT_S:.0f} s "
            "(none yet, or none can start); set it to the workers' GPU memory in GB"
        ) from None
    log.info("planning: node %s has a %s with %.1f GB", got["node"], got["name"], got["total_gb"])
    return float(got["total_gb"])


def check_head(need: HeadNeeds) -> None:
    """Refuse a driver's node whose object store cannot hold the sweep's shared work below Ray's spilling
    threshold (:data:`sweep.plan.SPILL_SHARE`): the service keeps a copy of every statistic and value the
    trials read there (:class:`sweep.shared.needs.HeadNeeds`); past the threshold Ray spills them to the
    head's disk and every trial's read waits on it. Raises :class:`ConfigError` naming the sizes and fixes."""
    import ray

    here = ray.get_runtime_context().get_node_id()
    have = next((n["Resources"].get("object_store_memory", 0.0) for n in ray.nodes() if n["NodeID"] == here), 0.0)
    if have and need.object_store_bytes > SPILL_SHARE * have:
        raise ConfigError(
            f"resources: the sweep's shared work is {need.object_store_bytes / 1e9:.1f} GB (statistics "
            f"{need.stats_bytes / 1e9:.1f} GB, values {need.values_bytes / 1e9:.1f} GB), held in the object store "
            f"of the driver's node, which has {have / 1e9:.1f} GB ({SPILL_SHARE:.0%} before Ray spills to disk); "
            f"start the head with ray start --object-store-memory={int(need.object_store_bytes / SPILL_SHARE) + 1} "
            "(and a /dev/shm as large: cluster.yaml's head_run_options --shm-size) on a head with that much "
            "memory, or split the sweep (fewer layers or facts per launch)"
        )
    log.info("head: %.1f GB of shared work in an object store of %.1f GB", need.object_store_bytes / 1e9, have / 1e9)


def run(cfg: SweepConfig, plan: Plan, args: argparse.Namespace) -> dict[str, Any]:
    """Start (or resume) the sweep; returns a summary with the parent run id and work counters.

    A grid sweep's shared work is fulfilled up front (:func:`sweep.shared.fulfil.fulfil_ray`) and handed to the
    sweep's service (:mod:`sweep.shared.service`), which every trial asks for its inputs; a search's is
    fulfilled on demand through the same service, as its trials ask. A search with held-out facts then
    runs each cell's best configuration on them (``phase: heldout``)."""
    import ray

    from .shared.service import start as start_service
    from .tune import tracking

    t_start = time.perf_counter()
    sid = sweep_id(cfg)
    uri = tracking.tracking_uri(cfg.mlflow.tracking_uri)
    tracking.check_server(uri)  # within seconds, before the pre-pass spends anything
    if not ray.is_initialized():
        init_ray(args)
    check_head(plan.shared.head())  # before a run is opened or anything computed
    c = tracking.client(uri)
    exp = tracking.experiment_id(c, cfg.mlflow.experiment)
    print(f"MLflow: {uri}; the runs as they finish: {tracking.runs_url(uri, exp)}")
    parent, reused = tracking.start_parent(c, exp, cfg.name, sid, args.resume)
    if not reused:
        _log_sweep(c, parent, cfg, plan)
    cells = plan.cells
    if args.resume and not cells.searching and (n := _recover(cfg, c, exp, parent, sid)):
        log.info("resumed: %d trial result(s) from the stopped sweep's Tune state logged to MLflow", n)
    known = tracking.child_runs(c, exp, parent)  # the one search of the trial runs until the sweep ends
    done = known.finished
    summary: dict[str, Any] = {"parent_run_id": parent, "tracking_uri": uri}
    todo = [p for p in plan.planned if p.key not in done]
    feed = None
    if not cells.searching:
        if args.resume and not todo:
            log.info("every trial of %s is already in MLflow: nothing to run", cfg.name)
            c.set_terminated(parent, "FINISHED")
            work = {**WorkCounts().as_dict(), "trials_run": 0}
            return {
                **summary,
                "work": work,
                "trials": len(plan.trials),
                "errors": 0,
                "wall_s": time.perf_counter() - t_start,
            }
    # a search's suggestions can reach every layer set of its stand-ins: their statistics in shared passes
    reach = sorted({tuple(p.layers) for p in plan.planned}) if cells.searching else []
    service = start_service(cfg, plan.shared.budget_gb, reach)
    if not cells.searching:
        shared = plan.shared
        if len(todo) < len(plan.planned):  # resumed: the shared work of the trials still to run, stores re-read
            shared = plan_shared(cfg, [p.config for p in todo], [p.key for p in todo], budget_gb=plan.shared.budget_gb)
        from .shared import tasks

        # fulfilled beside the trials: each trial starts once its own inputs exist (ReadyFirst, in _tuner)
        feed = Feed(shared, cfg, tasks, service)
        _log_statistics(c, parent, shared)
    callback = tracking.MlflowTrials(uri, exp, parent, sid, known)
    if cells.searching:
        max_edits = max(p.config.n_edits for p in plan.planned)  # the stand-ins: every cell's search trials
        grid = _tuner(cfg, cells, service, callback, args, None, max_edits).fit()
        results = _resolved(grid)
        errors = grid.num_errors
        best = best_of(cfg, [(p, r.metrics or {}) for p, r in results if p is not None])
        summary["best"] = _log_search(c, exp, parent, cfg, best)
        if cells.split is not None and best:
            heldout = [
                cells.trial(cell, "heldout", r, b.sampled)
                for cell, bs in sorted(best.items())
                for b in bs
                for r in range(cfg.repeats)
            ]
            if held_todo := [p for p in heldout if p.key not in done]:  # resumed: MLflow's finished runs kept
                held = _tuner(cfg, cells, service, callback, args, held_todo, None, suffix="-heldout").fit()
                results += _resolved(held)
                errors += held.num_errors
    else:
        max_edits = max((p.config.n_edits for p in todo), default=1)
        grid = _tuner(cfg, cells, service, callback, args, todo, max_edits, feed=feed).fit()
        results, errors = _resolved(grid), grid.num_errors
    counts = feed.join() if feed is not None else WorkCounts()
    log.info("shared work fulfilled up front: %s", counts.as_dict())
    work: dict[str, Any] = counts.as_dict()
    for k, v in ray.get(service.counts.remote()).items():  # what the trials computed on demand
        work[k] = work.get(k, 0) + v if k != "fulfil_s" else work.get(k, 0)
    work["trials_run"] = len(results)
    wall = time.perf_counter() - t_start
    _close_parent(c, exp, parent, sid, results, work, wall, errors)
    _print_summary(cfg, cells, [_row(p, r) for p, r in results], errors, wall, work, uri, parent, exp)
    ray.kill(service)
    return {**summary, "work": work, "trials": len(results), "errors": errors, "wall_s": wall}


def _log_search(c: Any, exp: str, parent: str, cfg: SweepConfig, best: dict[int, list[Best]]) -> dict[str, Any]:
    """The search's outcome on the parent run: params ``search.*`` and ``search.json`` (per method its best
    configuration, or its Pareto set, with the run that found it); returned for the summary."""
    from .tune import tracking

    runs = tracking.child_runs(c, exp, parent).finished
    s = cfg.search
    out: dict[str, Any] = {"metric": list(s.metrics), "mode": list(s.modes), "best": {}, "pareto": {}}
    for method, bs in per_method(cfg, best).items():
        entries = [b.as_dict(runs.get(b.key)) for b in bs]
        if len(s.metrics) == 1:
            out["best"][method] = entries[0]
        else:
            out["pareto"][method] = entries
    params = {"search.algorithm": s.algorithm, "search.metric": ",".join(s.metrics), "search.mode": ",".join(s.modes)}
    try:
        c.log_batch(parent, params=[_param(k, v) for k, v in params.items()])
        c.log_dict(parent, out, "search.json")
    except Exception as e:
        log.warning("MLflow did not take the search's outcome (%s); it is in the summary", e)
    for method, e in out["best"].items():
        print(f"best {method}: {e['config']} -> {e['values']}")
    for method, es in out["pareto"].items():
        print(f"Pareto set of {method}: " + "; ".join(f"{e['config']} -> {e['values']}" for e in es))
    return out


def _close_parent(
    c: Any,
    exp: str,
    parent: str,
    sid: str,
    results: list[tuple[PlannedTrial | None, Any]],
    work: dict[str, Any],
    wall: float,
    errors: int,
) -> None:
    """Log what MLflow lacks (trials that ended while the server was away, from Tune's results) and the
    sweep's totals, and close the parent run; an unreachable server leaves it for ``--resume``."""
    from mlflow.entities import Metric

    from .tune import tracking

    reports = {p.key: r.metrics for p, r in results if r.metrics and p is not None}
    try:
        if n := tracking.log_missing(c, exp, parent, sid, reports):
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
    cfg: SweepConfig,
    cells: Cells,
    service: Any,
    callback: Any,
    args: argparse.Namespace,
    trials: list[PlannedTrial] | None,
    max_edits: int | None,
    suffix: str = "",
    feed: Feed | None = None,
) -> Any:
    """A Tune run: over ``trials`` (a grid's, or the held-out runs: each started once what it needs exists,
    :class:`sweep.tune.search.ReadyFirst`; ``feed``: the grid's shared work, whose failure stops them), or,
    when None, the search's suggestions (:class:`sweep.tune.search.CellSearch`, restored when resuming);
    with the sweep's scheduler, if any, whose time runs to ``max_edits`` (None: no scheduler, as for the
    held-out runs: they are the results, and ASHA would stop a cell's later repeats against its first)."""
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    from .tune import trainable

    fn = tune.with_parameters(trainable.trainable, service=service, scheduled=cfg.scheduler is not None)
    fn = tune.with_resources(fn, {"cpu": cfg.resources.cpu, "gpu": cfg.resources.gpu})
    storage = storage_path(cfg)
    name = f"{cfg.name}-{sweep_id(cfg)}{suffix}"
    # A compact progress table (trial, method, layers, B, mode, sampled values | edits so far, S/ES/PS/NS at
    # edit) instead of the new output engine's box per result; CLIReporter is honoured only with
    # RAY_AIR_NEW_OUTPUT=0.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # A search's metric (final.s) is in a trial's last report only, not in its per-batch ones
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    # MLflow holds every result: no CSV/JSON/TensorBoard copies of each report (with its planned trial), so
    # the result grid has no per-trial dataframe to read (its warning says so for every trial)
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    columns = {"point/method": "method", "point/layers": "layers", "point/batch_size": "B", "point/mode": "mode"}
    columns.update({f"point/sampled/{space_name(k)}": k.removeprefix("hp.") for k in cells.spaces})
    reporter = tune.CLIReporter(
        parameter_columns=columns,
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
    path = f"{storage.rstrip('/')}/{name}"
    if trials is None and args.resume and tune.Tuner.can_restore(path):
        restored = tune.Tuner.restore(path, trainable=fn, resume_errored=True)
        # Tune restores the stopped launch's RunConfig (tuner.pkl), whose callback logs to the old tracking
        # target and parent run: this launch's callback replaces it (RunConfig has no public setter)
        restored._local_tuner.get_run_config().callbacks = [callback]
        return restored
    tune_config = tune.TuneConfig(
        trial_dirname_creator=lambda trial: trial.trial_id,  # the config (a planned trial) names no folder
        reuse_actors=True,
        max_concurrent_trials=cfg.resources.max_concurrent,
        scheduler=scheduler(cfg, max_edits) if max_edits is not None else None,
    )
    if trials is None:
        tune_config.search_alg = CellSearch(cfg, cells)
        tune_config.num_samples = cfg.search.num_samples * len(cells.cells)
    else:  # planned trials (a grid's still to run, or the held-out runs): a fresh Tune run over them, also
        # when resuming (MLflow says which are done, _recover), each started when its inputs exist
        import ray

        ready = ReadyFirst(
            trials,
            lambda ts: ray.get(service.startable.remote(ts)),
            lambda: feed is not None and feed.error is not None,
        )
        # as many trials pending as can run (Tune keeps one pending for a searcher of its own otherwise, and
        # a cluster would then place them one by one)
        tune_config.search_alg = ready if cfg.resources.max_concurrent else ConcurrencyLimiter(ready, len(trials))
        tune_config.num_samples = len(trials)
    return tune.Tuner(fn, param_space={}, run_config=run_config, tune_config=tune_config)


def _recover(cfg: SweepConfig, c: Any, exp: str, parent: str, sid: str) -> int:
    """Log to MLflow the results a stopped grid sweep's Tune state holds and MLflow lacks (trials that ended
    while the server was away); returns how many. The state is only read: the resumed sweep is a fresh
    Tune run over the trials MLflow has no finished run of."""
    from ray import tune

    from .tune import tracking

    path = f"{storage_path(cfg).rstrip('/')}/{cfg.name}-{sweep_id(cfg)}"
    if not tune.Tuner.can_restore(path):
        return 0
    old = tune.ExperimentAnalysis(path).trials
    reports = {planned_of(t.config).key: t.last_result for t in old if t.status == "TERMINATED" and t.last_result}
    return tracking.log_missing(c, exp, parent, sid, reports)


def _resolved(grid: Any) -> list[tuple[PlannedTrial | None, Any]]:
    """Each Tune result with the planned trial its config carries (None for a result without a config)."""
    return [(planned_of(r.config) if r.config else None, r) for r in grid]


def _row(p: PlannedTrial | None, r: Any) -> tuple:
    """(method, phase, layers, B, mode, sampled values, S final, S at edit) of one Tune result."""
    m = r.metrics or {}
    if p is None:
        return ("?", "", "", "", "", "", None, None)
    sampled = ", ".join(f"{k.removeprefix('hp.')}={_short(v)}" for k, v in p.sampled.items())
    c = p.config
    return (p.method, p.phase, p.layers, c.batch_size, c.mode, sampled, m.get("final.s"), m.get("at_edit.s"))


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _print_summary(
    cfg: SweepConfig,
    cells: Cells,
    rows: list[tuple],
    errors: int,
    wall: float,
    work: dict[str, Any],
    uri: str,
    parent: str,
    exp: str,
) -> None:
    """The sweep's printed result: one line per trial, the shared work and where to look."""
    wm = max([13, *(len(str(r[0])) for r in rows)])  # as wide as the longest method name
    head = f"{'phase':<8} {'layers':<8} {'B':>5} {'mode':<17} {'S final':>8} {'S at edit':>9}  sampled"
    print(f"\n{'method':<{wm}} {head}")
    for a, ph, ly, b, mo, sa_, sf, sa in sorted(rows, key=lambda r: str(r)):
        print(f"{a!s:<{wm}} {ph:<8} {ly!s:<8} {b!s:>5} {mo!s:<17} {_fmt(sf):>8} {_fmt(sa):>9}  {sa_}")
    print(f"\nsweep {cfg.name}: {len(rows)} trials run, {errors} failed, {wall:.0f}s; shared work {work}")
    print(f"MLflow: {uri} (experiment {cfg.mlflow.experiment!r}, parent run {parent})")
    if not uri.startswith(("http://", "https://")):
        print(f"  view:   mlflow ui --backend-store-uri {uri}")
    from .tune.tracking import runs_url

    print(f"  runs:   {runs_url(uri, exp)}")
    print(f"  report: python -m sweep.report --sweep {cfg.name} --tracking-uri {uri}")


def _param(k: str, v: Any):
    from mlflow.entities import Param

    return Param(k, str(v)[:6000])


def _fmt(x: Any) -> str:
    return f"{x:.2f}" if isinstance(x, (int, float)) else "-"


def parser() -> argparse.ArgumentParser:
    """The launcher's command line (also what tests build their arguments with)."""
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
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from .tune.tracking import TrackingUnavailable

    try:
        cfg = load_sweep(args.config, args.overrides)
        if needs_gpu_budget(cfg) and not (args.dry_run or args.local):
            init_ray(args)  # the cluster's GPU nodes size the statistics passes
        plan = make_plan(cfg, dry_run=args.dry_run, budget_gb=gpu_budget(cfg, args))
        print(format_plan(cfg, plan))
        if args.dry_run:
            return 0
        check_probe_data(plan.trials)  # before any work: probe files given or fetchable
        summary = run(cfg, plan, args)
    except (ConfigError, ValueError, FileNotFoundError, TrackingUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        cause = _no_gpu(e)
        if cause is None:
            raise
        print(f"error: {cause}", file=sys.stderr)
        return 2
    log.info("summary: %s", write_summary(cfg, summary))
    return 0 if summary["errors"] == 0 else 1


def _no_gpu(e: BaseException) -> BaseException | None:
    """The :class:`~sweep.shared.tasks.NoGPU` behind ``e`` (a Ray task error wraps it as its cause), or None."""
    from .shared.tasks import NoGPU

    seen: BaseException | None = e
    while seen is not None:
        cause = getattr(seen, "cause", None)  # a RayTaskError's original exception
        if isinstance(cause, NoGPU):
            return cause
        if isinstance(seen, NoGPU) and cause is None:
            return seen
        seen = cause or seen.__cause__
    return None


if __name__ == "__main__":
    sys.exit(main())
