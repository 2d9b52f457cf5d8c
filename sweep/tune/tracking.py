"""MLflow tracking of a sweep: one parent run per sweep, one child run per trial.

All MLflow calls happen in the driver (SQLite stores do not like many writers), through an
``MlflowClient`` bound to an explicit absolute URI (Tune changes the trials' working directory, and
``MLflowLoggerCallback``'s URI does not reach trial processes: ray#36257). The run schema, which
:mod:`sweep.report` reads:

- parent: tags ``sweep.name``, ``sweep.id``, ``sweep.role=parent``; params of the sweep; artifacts
  ``sweep.yaml``, ``plan.json``, ``statistics.json`` (provenance); metrics ``work.*`` and wall time; a
  search adds params ``search.{algorithm,metric,mode}`` and ``search.json`` (per method its best
  configuration or Pareto set, with the run that found it).
- child: tags ``mlflow.parentRunId``, ``sweep.id``, ``sweep.role=trial``, ``trial.key``; params
  ``algorithm layers layer batch_size mode n_edits model hparams hp.<name>``; metrics ``{pre,at_edit,
  final}.{es,ps,ns,s,em,pm,nm,es_acc,ps_acc,ns_acc,ge,ppl}``, ``time.*``, ``memory.*``, ``work.*``,
  ``update_norm.*``, ``stats.tokens.L<layer>`` (tokens in C), ``collapsed_at`` (edits, with the tag
  ``collapse.reason``, when the collapse guard stopped the trial), ``stopped_at`` (edits, with the tag
  ``stop.reason``: ``asha`` or ``collapse``, for a trial that stopped early), params ``method``, ``phase``
  (grid, search, heldout), ``repeat``, ``cell`` (the config without its seeds) and ``search.index``,
  ``config.layer``/``config.batch_size`` (numeric copies for parallel-coordinates
  charts) and curves ``curve.*`` with step = edits applied (``curve.forget_{all,first}_{es,ps,ns,s}``:
  the forgetting curves; ``curve.health_{drift,sigma_max,cond,delta_sigma_max,ppl}``); artifacts ``config.yaml``,
  ``per_record.csv``, ``trial.json``.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from editors.config import to_dict

from ..cells import planned_of
from ..colors import method_color
from ..evals.registry import QA_NAMES, RECORD_FIELDS, STAGES
from ..result import REPORT_KEY, TrialResult

if TYPE_CHECKING:
    from ..cells import PlannedTrial

log = logging.getLogger(__name__)


def tracking_uri(configured: str | None) -> str:
    """The configured URI, else ``$MLFLOW_TRACKING_URI``, else an absolute ``sqlite:///<cwd>/mlflow.db``."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri[len('sqlite:///') :]).resolve()}"  # absolute: trials change their cwd
    return uri


class TrackingUnavailable(Exception):
    """The MLflow tracking server does not answer (reported at launch, before any work)."""


#: How long a check of the tracking server waits, and how an MLflow HTTP call retries once the sweep runs
#: (MLflow's own defaults retry for about five minutes before an error).
CHECK_TIMEOUT_S = 5.0
HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


def check_server(uri: str, timeout_s: float = CHECK_TIMEOUT_S) -> None:
    """Raise :class:`TrackingUnavailable` naming ``uri`` when an http(s) tracking server does not answer
    its ``/health`` within ``timeout_s``; file and SQLite stores need no server. Also makes the
    driver's later MLflow HTTP calls fail within seconds instead of retrying for minutes."""
    for k, v in HTTP_ENV.items():
        os.environ.setdefault(k, v)
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s) as r:
            if r.status >= 400:
                raise TrackingUnavailable(f"HTTP {r.status}")
    except (OSError, urllib.error.URLError, TrackingUnavailable) as e:
        raise TrackingUnavailable(
            f"mlflow.tracking_uri: {uri} does not answer ({getattr(e, 'reason', e)}); start it "
            f"(mlflow server --host 127.0.0.1 --port <port>), or point mlflow.tracking_uri / MLFLOW_TRACKING_URI "
            "at a reachable server or a sqlite:/// file"
        ) from None


def runs_url(uri: str, exp_id: str) -> str:
    """The UI page of the experiment's runs table (MLflow 3 opens an experiment on its GenAI overview
    unless ``workflowType=machine_learning`` is asked for); a local store's UI is ``mlflow ui``'s."""
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{exp_id}/runs?workflowType=machine_learning"


def result_of(report: dict[str, Any] | None) -> TrialResult | None:
    """The :class:`TrialResult` a trial's last Tune report carries (None: the trial did not finish).

    The result travels inside the report, through Ray, not as a checkpoint on the worker's disk: a
    checkpoint needs storage every node shares, and on a cluster without it Tune fails the trial at
    its very end (``Unable to set up cluster storage``, docs/CLUSTER.md)."""
    packed = (report or {}).get(REPORT_KEY)
    return TrialResult.unpack(packed) if isinstance(packed, str) else None


def log_missing(c: Any, exp_id: str, parent: str, sid: str, reports: dict[str, dict[str, Any]]) -> int:
    """Log every finished trial (key -> its last Tune report) that MLflow does not hold yet (a server
    that was down when the trial ended), unpacking only those results; returns how many were logged."""
    kids = child_runs(c, exp_id, parent)
    n = 0
    for key, report in reports.items():
        result = result_of(report) if key not in kids.finished else None
        if result is not None:
            log_trial(c, exp_id, parent, sid, result, kids.running.get(key))
            n += 1
    return n


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def experiment_id(c: Any, name: str) -> str:
    exp = c.get_experiment_by_name(name)
    return exp.experiment_id if exp is not None else c.create_experiment(name)


def find_parent(c: Any, exp_id: str, sid: str) -> str | None:
    runs = c.search_runs(
        [exp_id],
        filter_string=f"tags.`sweep.id` = '{sid}' and tags.`sweep.role` = 'parent'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def start_parent(c: Any, exp_id: str, name: str, sid: str, resume: bool) -> tuple[str, bool]:
    """(run id, reused): the sweep's parent run; ``resume`` reuses the last one with the same sweep id."""
    if resume:
        rid = find_parent(c, exp_id, sid)
        if rid is not None:
            c.update_run(rid, status="RUNNING")
            return rid, True
    run = c.create_run(exp_id, run_name=name, tags={"sweep.name": name, "sweep.id": sid, "sweep.role": "parent"})
    return run.info.run_id, False


@dataclass(frozen=True)
class Children:
    """A sweep's trial runs (one search): trial key -> run id of those FINISHED (never run again) and of
    those a killed launcher left RUNNING (continued, or closed as KILLED)."""

    finished: dict[str, str] = field(default_factory=dict)
    running: dict[str, str] = field(default_factory=dict)


def child_runs(c: Any, exp_id: str, parent: str) -> Children:
    """The :class:`Children` of ``parent``, in one search."""
    runs = c.search_runs([exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'", max_results=50_000)
    by: dict[str, dict[str, str]] = {"FINISHED": {}, "RUNNING": {}}
    for r in runs:
        if r.info.status in by:
            by[r.info.status][r.data.tags.get("trial.key")] = r.info.run_id
    return Children(by["FINISHED"], by["RUNNING"])


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


#: the benchmarks' names in words
DATASET_NAMES = {"counterfact": "CounterFact", "mquake": "MQuAKE", **QA_NAMES}


def describe(result: TrialResult) -> str:
    """The run's description in words (the UI shows it on the run's page)."""
    cfg = result.config
    layers = ", ".join(map(str, result.layers))
    model = cfg["model"]["source"] or "SmolLM2-135M (embedded)"
    data = DATASET_NAMES.get(result.dataset, result.dataset)
    text = (
        f"{result.method or cfg['algorithm']} on {model}, layer(s) {layers}: {cfg['n_edits']} {data} edits "
        f"in batches of {cfg['batch_size']} ({cfg['mode']})."
    )
    final = result.metrics.get("final", {})
    if final:
        text += f" Final S {final.get('s', float('nan')):.1f} (ES {final.get('es', float('nan')):.1f}, "
        text += f"PS {final.get('ps', float('nan')):.1f}, NS {final.get('ns', float('nan')):.1f}; teacher-forced)."
    if "gen_s" in final:
        text += f" Generated (WILD): S {final['gen_s']:.1f} (ES {final['gen_es']:.1f}, PS {final['gen_ps']:.1f}, "
        text += f"NS {final['gen_ns']:.1f})."
    if result.collapsed_at is not None:
        text += f" Stopped by the collapse guard after {result.collapsed_at} edits: {result.collapse_reason}."
    return text


def run_name(method: str, layers: list[int], batch_size: int, mode: str, key: str) -> str:
    """``<method>-L<layers>-B<batch size>-<mode>-<key>``: the key's first 6 hex digits, and a search trial's
    index after its hash (``-3``)."""
    return f"{method}-L{'_'.join(map(str, layers))}-B{batch_size}-{mode}-{key[:6]}{key[16:]}"


def trial_params(config: dict[str, Any], hp: dict[str, Any], method: str) -> dict[str, Any]:
    """The child run's params, from the trial config and its resolved hyperparameters (both as plain
    data): the same at the trial's start and at its end."""
    layers = list(hp["layers"])
    return {
        "algorithm": config["algorithm"],
        "method": method,
        "layers": str(layers),
        "layer": layers[0],
        "batch_size": config["batch_size"],
        "mode": config["mode"],
        "n_edits": config["n_edits"],
        "model": config["model"]["source"] or "smollm2-135m (embedded)",
        "hparams": config["hparams"],
        "dataset": config["dataset"]["source"],
        "dataset.name": config["dataset"].get("name", "counterfact"),
        "dataset.target": config["dataset"].get("target", "answers"),
        "scoring.generated": config["scoring"].get("generated", False),
        "scoring.gen_context": config["scoring"].get("gen_context", "bare"),
        "scoring.probes": ",".join(config["scoring"].get("probes", ())),
        "stats.max_tokens": config["stats"]["max_tokens"],
        "stats.tolerance": config["stats"].get("tolerance"),
        **{f"hp.{k}": v for k, v in hp.items() if k != "layers"},
    }


def _tags(parent: str, sid: str, key: str, method: str) -> dict[str, str]:
    return {
        "mlflow.parentRunId": parent,
        "sweep.id": sid,
        "sweep.role": "trial",
        "trial.key": key,
        "mlflow.runColor": method_color(method),
    }


def start_trial_run(c: Any, exp_id: str, parent: str, sid: str, planned: PlannedTrial, left: str | None = None) -> str:
    """The trial's child run, RUNNING from the trial's start with its params (the config's, and where the
    trial sits in the sweep: :meth:`sweep.cells.PlannedTrial.params`; its curves stream into it as batches
    finish); ``left``: the run this sweep left RUNNING for the same trial (a killed launcher), continued."""
    from mlflow.entities import Param

    key, cfg, method = planned.key, planned.config, planned.method
    if left is not None:
        return left
    hp = cfg.edit_hparams
    run = c.create_run(
        exp_id,
        run_name=run_name(method, list(hp.layers), cfg.batch_size, cfg.mode, key),
        tags=_tags(parent, sid, key, method),
    )
    params = {**trial_params(to_dict(cfg), to_dict(hp), method), **planned.params()}
    c.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
    return run.info.run_id


def curve_metrics(point: dict[str, Any], now: int) -> list[Any]:
    """One batch's curve point as MLflow metrics ``curve.<name>`` at step = edits applied."""
    from mlflow.entities import Metric

    step = int(point["edits"])
    return [
        Metric(f"curve.{k}", round(float(v), ROUND), now, step)
        for k, v in point.items()
        if k not in ("batch", "edits") and _finite(v)
    ]


#: decimals kept in MLflow (the trial's JSON artifact keeps full precision)
ROUND = 4


def log_trial(
    c: Any,
    exp_id: str,
    parent: str,
    sid: str,
    result: TrialResult,
    run_id: str | None = None,
    streamed: int = 0,
    extra: dict[str, Any] | None = None,
) -> str:
    """Write one trial's result into its child run (``run_id``, created at its start; a new one when
    None; ``extra``: params beside the config's) and close it FINISHED; the first ``streamed`` curve
    points are already in it. Returns the id."""
    from mlflow.entities import Metric, Param

    cfg, hp = result.config, result.hparams
    key = result.trial_key
    layers = result.layers
    method = result.method or cfg["algorithm"]
    tags = {"mlflow.note.content": describe(result)}
    for m, info in result.metric_info.items():  # which protocol produced each number, on which data
        tags[f"metric.{m}"] = f"{info['protocol']} on {info['dataset']}: {info['label']}"
    if result.collapse_reason:
        tags["collapse.reason"] = result.collapse_reason
        tags["stop.reason"] = "collapse"
    if run_id is None:
        run_id = c.create_run(
            exp_id,
            run_name=run_name(method, layers, cfg["batch_size"], cfg["mode"], key),
            tags=_tags(parent, sid, key, method),
        ).info.run_id
    rid = run_id
    have = c.get_run(rid).data.params
    params = {k: v for k, v in {**trial_params(cfg, hp, method), **(extra or {})}.items() if k not in have}
    now = int(time.time() * 1000)
    r = ROUND
    metrics = [Metric(k, round(float(v), r), now, 0) for k, v in result.flat_metrics().items() if _finite(v)]
    for prefix, group in (("time", result.timings), ("memory", result.memory), ("work", result.work)):
        metrics += [Metric(f"{prefix}.{k}", round(float(v), r), now, 0) for k, v in group.items() if _finite(v)]
    if result.update_norms.mean is not None:
        metrics.append(Metric("update_norm.mean", round(result.update_norms.mean, r), now, 0))
    for k, v in result.update_norms.final_weight_change.items():
        metrics.append(Metric(f"update_norm.final.{k}", round(float(v), r), now, 0))
    metrics += [Metric(f"stats.tokens.L{k}", float(v), now, 0) for k, v in result.stats_tokens.items()]
    metrics += [
        Metric("config.layer", float(layers[0]), now, 0),
        Metric("config.batch_size", float(cfg["batch_size"]), now, 0),
        Metric("solver_fallbacks", float(result.solver_fallbacks), now, 0),
    ]
    if result.collapsed_at is not None:  # the collapse guard stopped it (the reason is a tag)
        metrics.append(Metric("collapsed_at", float(result.collapsed_at), now, 0))
        metrics.append(Metric("stopped_at", float(result.collapsed_at), now, 0))
    for name, edits in result.collapse_points.items():  # CP@60 reached (a measure that never fell: none)
        if edits is not None:
            metrics.append(Metric(f"collapse.cp60.{name}", float(edits), now, 0))
    for point in result.curves[streamed:]:
        metrics += curve_metrics(point, now)
    plist = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for k, v in tags.items():
        c.set_tag(rid, k, v)
    for i in range(0, max(len(metrics), 1), 900):  # log_batch takes at most 1000 entries
        c.log_batch(rid, metrics=metrics[i : i + 900], params=plist if i == 0 else [])
    c.log_text(rid, yaml.safe_dump(cfg, sort_keys=False), "config.yaml")
    c.log_text(rid, _per_record_csv(result.per_record), "per_record.csv")
    c.log_text(rid, json.dumps(result.to_dict(), indent=1, default=str), "trial.json")
    c.set_terminated(rid, "FINISHED", end_time=now)
    return rid


#: why a scheduler stopped a trial, in words (the ``stop.reason`` tag names the scheduler)
STOP_WORDS = {"asha": "Tune's ASHA scheduler stopped it: its scores so far were below its rung's cut"}


def log_stopped(c: Any, run_id: str, report: dict[str, Any], reason: str = "asha") -> None:
    """Close the run of a trial a scheduler stopped as a result (FINISHED): what it measured up to then
    (its last per-batch report's ``at_edit.*``; its curve points are in the run already), ``stopped_at``
    (edits applied) and the tag ``stop.reason``."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    edits = int(report.get("edits", 0))
    metrics = [
        Metric(k, round(float(v), ROUND), now, 0) for k, v in report.items() if k.startswith("at_edit.") and _finite(v)
    ]
    metrics.append(Metric("stopped_at", float(edits), now, 0))
    c.log_batch(run_id, metrics=metrics)
    c.set_tag(run_id, "stop.reason", reason)
    c.set_tag(run_id, "mlflow.note.content", f"Stopped after {edits} edits. {STOP_WORDS.get(reason, reason)}.")
    c.set_terminated(run_id, "FINISHED", end_time=now)


def log_failed_trial(
    c: Any, exp_id: str, parent: str, sid: str, key: str, config: dict[str, Any], error: str, run_id: str | None = None
) -> str:
    """Close the trial's run (or a new one) FAILED with its error as ``error.txt``."""
    if run_id is None:
        run_id = c.create_run(
            exp_id,
            run_name=f"{config.get('method') or config.get('algorithm')}-failed-{key[:6]}",
            tags={"mlflow.parentRunId": parent, "sweep.id": sid, "sweep.role": "trial", "trial.key": key},
        ).info.run_id
    c.log_text(run_id, error, "error.txt")
    c.set_terminated(run_id, "FAILED")
    return run_id


def _error_text(path: str | None) -> str:
    """A failed trial's error as Tune recorded it (its error file's text; the path if unreadable)."""
    path = path or ""
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace") if path else "trial failed"
    except OSError:
        return f"trial failed; Tune's error file: {path}"


def close_running(c: Any, exp_id: str, parent: str) -> int:
    """Close every child run still RUNNING as KILLED (a stopped sweep's unfinished trials)."""
    left = child_runs(c, exp_id, parent).running
    for rid in left.values():
        c.set_terminated(rid, "KILLED")
    return len(left)


#: per_record.csv: the fact's identity, then every score in protocol order (pre, at edit, final)
_FACT_COLUMNS = ("case_id", "subject", "prompt", "target_new", "target_true")


def _per_record_csv(rows: list[dict[str, Any]]) -> str:
    """One row per fact: ``case_id subject prompt target_new target_true`` then ``<stage>_<metric>`` in
    protocol order (pre, at_edit, final; ES PS NS EM PM NM and the accuracies), ×100 like the run's
    metrics."""
    import csv

    present = {k for r in rows for k in r}
    scores = [f"{st}_{m}" for st in STAGES for m in RECORD_FIELDS if f"{st}_{m}" in present]
    cols = [c for c in _FACT_COLUMNS if c in present] + scores
    cols += sorted(present - set(cols))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    for r in rows:
        w.writerow({k: (100 * v if k in scores and isinstance(v, (int, float)) else v) for k, v in r.items()})
    return buf.getvalue()


class Writer:
    """One thread that makes every MLflow call of the callback, in the order they were submitted, so
    Tune's loop (and with it every trial waiting in ``tune.report``) never waits for the server. A call
    that fails is logged and the next goes on; :meth:`flush` waits until every submitted call is done.

    Jobs submitted with :meth:`submit_many` are merged: consecutive ones with the same function that are
    waiting together run as one call on the list of their arguments (the callback's curve points: one
    ``log_batch`` per run for every point queued meanwhile), so the writer keeps up with as many reports
    as the server takes metrics, not requests."""

    #: the most jobs taken off the queue at once
    BATCH = 1000

    def __init__(self) -> None:
        self._q: queue.Queue[tuple[Callable[..., Any], tuple[Any, ...], bool]] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="mlflow-writer", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        self._q.put((fn, args, False))

    def submit_many(self, fn: Callable[[list[tuple[Any, ...]]], Any], *args: Any) -> None:
        """Queue ``fn([args])``, merged with the same ``fn``'s neighbours: ``fn([args1, args2, ...])``."""
        self._q.put((fn, args, True))

    def _run(self) -> None:
        while True:
            jobs = [self._q.get()]
            while len(jobs) < self.BATCH:
                try:
                    jobs.append(self._q.get_nowait())
                except queue.Empty:
                    break
            i = 0
            while i < len(jobs):
                fn, args, many = jobs[i]
                j = i + 1
                if many:
                    while j < len(jobs) and jobs[j][0] == fn and jobs[j][2]:
                        j += 1
                try:
                    fn([a for _, a, _ in jobs[i:j]]) if many else fn(*args)
                except Exception as e:  # each job logs its own failures: this is a last resort
                    log.warning("MLflow writer: %s failed (%s)", getattr(fn, "__name__", fn), e)
                i = j
            for _ in jobs:
                self._q.task_done()

    def flush(self) -> None:
        self._q.join()


def _callback_base() -> type:
    from ray import tune

    return tune.Callback


class MlflowTrials(_callback_base()):  # type: ignore[misc]
    """A Tune callback that keeps one child run per trial: RUNNING from its start with its params, each
    batch's curve point streamed as it is reported, closed FINISHED with the result (or, for a trial a
    scheduler stopped, with what it measured until then), or FAILED; each trial's run is named by the
    :class:`~sweep.cells.PlannedTrial` its Tune config carries. An unreachable server costs no result: it
    stays in Tune's storage for ``--resume`` to log.

    It keeps up with many trials: which trials have runs is read once at launch (``known``,
    :func:`child_runs`) and kept in memory, never searched again per trial; every MLflow call is made on
    one :class:`Writer` thread, in order, so Tune's loop only queues (``bench/driver.py``); the writer is
    flushed when an experiment ends."""

    def __init__(self, uri: str, exp_id: str, parent: str, sid: str, known: Children) -> None:
        self.uri, self.exp_id, self.parent, self.sid = uri, exp_id, parent, sid
        self.finished = set(known.finished)  # keys FINISHED in MLflow before this launch
        self.left = dict(known.running)  # key -> run a killed launcher left RUNNING
        self.started: set[str] = set()  # keys whose start was queued (Tune's loop)
        self.runs: dict[str, str] = {}  # key -> run id (the writer's)
        self.streamed: dict[str, int] = {}
        self.logged: set[str] = set()
        self.planned: dict[str, Any] = {}  # Tune's trial id -> PlannedTrial
        self._writer: Writer | None = None
        self._client: Any = None

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles its run config: no thread, no client
        return {**self.__dict__, "_writer": None, "_client": None}

    @property
    def writer(self) -> Writer:
        if self._writer is None:
            self._writer = Writer()
        return self._writer

    def _c(self):  # only ever called on the writer's thread
        if self._client is None:
            self._client = client(self.uri)
        return self._client

    def _plan(self, trial: Any) -> Any:
        if trial.trial_id not in self.planned:
            self.planned[trial.trial_id] = planned_of(trial.config)
        return self.planned[trial.trial_id]

    # Tune's loop: queue, never wait for the server

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        p = self._plan(trial)
        if p.key in self.started or p.key in self.finished:
            return  # a retried attempt continues the same run; a finished one is never reopened
        self.started.add(p.key)
        self.writer.submit(self._start, p)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        point = {k.removeprefix("curve."): v for k, v in result.items() if k.startswith("curve.")}
        if "edits" in point:
            self.writer.submit_many(self._curves, self._plan(trial).key, point, int(time.time() * 1000))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.writer.submit(self._complete, self._plan(trial), dict(trial.last_result or {}))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.writer.submit(self._error, self._plan(trial), getattr(trial, "error_file", None))

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if trials and all(t.status in ("TERMINATED", "ERROR") for t in trials):
            self.writer.flush()  # nothing runs: Tune may be about to write its last experiment state
        self._slim(trials)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.writer.flush()  # every run in MLflow before the launcher reads them back
        self._slim(trials)

    def _slim(self, trials: list) -> None:
        """Drop the packed result from the last report of each trial MLflow has taken (on Tune's loop,
        which writes the experiment state): the state keeps a few KB per trial instead of the whole
        result (~0.8 MB for 2,000 facts); a result MLflow has not taken stays for ``--resume``."""
        for t in trials:
            last = t.last_result
            if last and REPORT_KEY in last and self.planned.get(t.trial_id) is not None:
                if self.planned[t.trial_id].key in self.logged:
                    del last[REPORT_KEY]

    # The writer's thread: the MLflow calls

    def _start(self, p: Any) -> None:
        try:
            self.runs[p.key] = start_trial_run(
                self._c(), self.exp_id, self.parent, self.sid, p, self.left.pop(p.key, None)
            )
            self.streamed[p.key] = 0
        except Exception as e:
            log.warning("MLflow did not take the start of trial %s (%s); it is logged when it ends", p.key, e)

    def _curves(self, points: list[tuple[str, dict[str, Any], int]]) -> None:
        """Curve points queued together: one ``log_batch`` per run (at most 1000 metrics each)."""
        by_key: dict[str, list[tuple[dict[str, Any], int]]] = {}
        for key, point, now in points:
            by_key.setdefault(key, []).append((point, now))
        for key, pts in by_key.items():
            if key not in self.runs:
                continue
            try:
                metrics = [m for point, now in pts for m in curve_metrics(point, now)]
                for k in range(0, len(metrics), 1000):
                    self._c().log_batch(self.runs[key], metrics=metrics[k : k + 1000])
                self.streamed[key] += len(pts)
            except Exception as e:
                log.warning("MLflow did not take %d curve point(s) of trial %s (%s)", len(pts), key, e)

    def _complete(self, p: Any, last: dict[str, Any]) -> None:
        key = p.key
        if key in self.logged or key in self.finished:
            return  # resumed sweep: already in MLflow
        try:
            c = self._c()
            result = result_of(last)
            if result is None and "edits" in last and key in self.runs:
                log_stopped(c, self.runs[key], last)  # a scheduler stopped it
                self.logged.add(key)
                return
            if result is None:
                log.warning("trial %s finished without its result in the last report; not logged", key)
                return
            log_trial(
                c,
                self.exp_id,
                self.parent,
                self.sid,
                result,
                self.runs.get(key),
                self.streamed.get(key, 0),
                extra=p.params(),
            )
            self.logged.add(key)
        except Exception as e:  # the server went away: the result stays in Tune's storage
            log.warning("MLflow did not take trial %s (%s); its result is kept, --resume logs it", key, e)

    def _error(self, p: Any, error_file: str | None) -> None:
        key = p.key
        if key in self.logged or key in self.finished:
            return
        try:
            err = _error_text(error_file)
            log_failed_trial(
                self._c(), self.exp_id, self.parent, self.sid, key, p.point()["point"], err, self.runs.get(key)
            )
            self.logged.add(key)
        except Exception as e:
            log.warning("MLflow did not take the failure of trial %s (%s)", key, e)
