"""MLflow tracking of a sweep: one parent run per sweep, one child run per trial.

All MLflow calls happen in the driver (SQLite stores do not like many writers), through an
``MlflowClient`` bound to an explicit absolute URI (Tune changes the trials' working directory, and
``MLflowLoggerCallback``'s URI does not reach trial processes: ray#36257). The run schema, which
:mod:`sweep.report` reads:

- parent: tags ``sweep.name``, ``sweep.id``, ``sweep.role=parent``; params of the sweep; artifacts
  ``sweep.yaml``, ``plan.json``, ``statistics.json`` (provenance); metrics ``work.*`` and wall time.
- child: tags ``mlflow.parentRunId``, ``sweep.id``, ``sweep.role=trial``, ``trial.key``; params
  ``algorithm layers layer batch_size mode n_edits model hparams hp.<name>``; metrics ``{pre,at_edit,
  final}.{es,ps,ns,s,em,pm,nm,es_acc,ps_acc,ns_acc,ge,ppl}``, ``time.*``, ``memory.*``, ``work.*``,
  ``update_norm.*``, ``stats.tokens.L<layer>`` (tokens in C), ``collapsed_at`` (edits, with the tag
  ``collapse.reason``, when the collapse guard stopped the trial), param ``method``,
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
import time
from pathlib import Path
from typing import Any

import yaml

from .result import TrialResult

log = logging.getLogger(__name__)


def tracking_uri(configured: str | None) -> str:
    """The configured URI, else ``$MLFLOW_TRACKING_URI``, else an absolute ``sqlite:///<cwd>/mlflow.db``."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri[len('sqlite:///') :]).resolve()}"  # absolute: trials change their cwd
    return uri


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


def trial_runs(c: Any, exp_id: str, parent: str) -> dict[str, Any]:
    """trial.key -> run of the FINISHED child runs under ``parent``."""
    runs = c.search_runs([exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'", max_results=50_000)
    return {r.data.tags.get("trial.key"): r for r in runs if r.info.status == "FINISHED"}


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def log_trial(c: Any, exp_id: str, parent: str, sid: str, result: TrialResult) -> str:
    """Write one trial's result as a FINISHED child run; returns its run id."""
    from mlflow.entities import Metric, Param

    cfg, hp = result.config, result.hparams
    key = result.trial_key
    layers = result.layers
    method = result.method or cfg["algorithm"]
    name = f"{method}-L{'_'.join(map(str, layers))}-B{cfg['batch_size']}-{cfg['mode']}-{key[:6]}"
    run = c.create_run(
        exp_id,
        run_name=name,
        tags={
            "mlflow.parentRunId": parent,
            "sweep.id": sid,
            "sweep.role": "trial",
            "trial.key": key,
            **({"collapse.reason": result.collapse_reason} if result.collapse_reason else {}),
        },
    )
    rid = run.info.run_id
    params = {
        "algorithm": cfg["algorithm"],
        "method": method,
        "layers": str(layers),
        "layer": layers[0],
        "batch_size": cfg["batch_size"],
        "mode": cfg["mode"],
        "n_edits": cfg["n_edits"],
        "model": cfg["model"]["source"] or "smollm2-135m (embedded)",
        "hparams": cfg["hparams"],
        "dataset": cfg["dataset"]["source"],
        "stats.max_tokens": cfg["stats"]["max_tokens"],
        "stats.tolerance": cfg["stats"].get("tolerance"),
        **{f"hp.{k}": v for k, v in hp.items() if k != "layers"},
    }
    now = int(time.time() * 1000)
    metrics = [Metric(k, float(v), now, 0) for k, v in result.flat_metrics().items() if _finite(v)]
    for prefix, group in (("time", result.timings), ("memory", result.memory), ("work", result.work)):
        metrics += [Metric(f"{prefix}.{k}", float(v), now, 0) for k, v in group.items() if _finite(v)]
    if result.update_norms.mean is not None:
        metrics.append(Metric("update_norm.mean", result.update_norms.mean, now, 0))
    for k, v in result.update_norms.final_weight_change.items():
        metrics.append(Metric(f"update_norm.final.{k}", float(v), now, 0))
    metrics += [Metric(f"stats.tokens.L{k}", float(v), now, 0) for k, v in result.stats_tokens.items()]
    metrics += [
        Metric("config.layer", float(layers[0]), now, 0),
        Metric("config.batch_size", float(cfg["batch_size"]), now, 0),
        Metric("solver_fallbacks", float(result.solver_fallbacks), now, 0),
    ]
    if result.collapsed_at is not None:  # the collapse guard stopped it (the reason is a tag)
        metrics.append(Metric("collapsed_at", float(result.collapsed_at), now, 0))
    for point in result.curves:
        step = int(point["edits"])
        metrics += [
            Metric(f"curve.{k}", float(v), now, step)
            for k, v in point.items()
            if k not in ("batch", "edits") and _finite(v)
        ]
    plist = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, max(len(metrics), 1), 900):  # log_batch takes at most 1000 entries
        c.log_batch(rid, metrics=metrics[i : i + 900], params=plist if i == 0 else [])
    c.log_text(rid, yaml.safe_dump(cfg, sort_keys=False), "config.yaml")
    c.log_text(rid, _per_record_csv(result.per_record), "per_record.csv")
    c.log_text(rid, json.dumps(result.to_dict(), indent=1, default=str), "trial.json")
    c.set_terminated(rid, "FINISHED")
    return rid


def log_failed_trial(c: Any, exp_id: str, parent: str, sid: str, key: str, config: dict[str, Any], error: str) -> str:
    run = c.create_run(
        exp_id,
        run_name=f"{config.get('algorithm')}-failed-{key[:6]}",
        tags={
            "mlflow.parentRunId": parent,
            "sweep.id": sid,
            "sweep.role": "trial",
            "trial.key": key,
        },
    )
    c.log_text(run.info.run_id, error, "error.txt")
    c.set_terminated(run.info.run_id, "FAILED")
    return run.info.run_id


def _per_record_csv(rows: list[dict[str, Any]]) -> str:
    import csv

    cols = sorted({k for r in rows for k in r}, key=lambda k: (k != "case_id", k))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def make_callback(uri: str, exp_id: str, parent: str, sid: str):
    """A Tune callback that logs every trial as a child run when it completes (or finally fails), once."""
    from ray import tune

    class MlflowTrials(tune.Callback):
        def __init__(self) -> None:
            self.logged: set[str] = set()

        def _c(self):
            return client(uri)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            key = trial.config["point"]["key"]
            ckpt = trial.checkpoint
            if ckpt is None:
                log.warning("trial %s finished without a result checkpoint; not logged", key)
                return
            with ckpt.as_directory() as d:
                result = TrialResult.from_dict(json.loads(Path(d, "result.json").read_text()))
            c = self._c()
            if key in self.logged or key in trial_runs(c, exp_id, parent):
                return  # resumed sweep: already in MLflow
            log_trial(c, exp_id, parent, sid, result)
            self.logged.add(key)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            key = trial.config["point"]["key"]
            c = self._c()
            if key in self.logged or key in trial_runs(c, exp_id, parent):
                return
            err = str(getattr(trial, "error_file", "") or "trial failed")
            log_failed_trial(c, exp_id, parent, sid, key, trial.config["point"], err)
            self.logged.add(key)

    return MlflowTrials()
