"""Reading one sweep's trial runs from MLflow into frames (one row per trial; curves long)."""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from ..registry import STAGES
from .schema import (
    CURVES,
    DATASET,
    DEFAULT_DATASET,
    INT_PARAMS,
    METHOD_ORDER,
    METRIC_COLUMNS,
    PARAMS,
    PROBE_CURVE_PREFIX,
    PROBE_PREFIX,
    RUN_ID,
    SETTINGS,
    ReportError,
    Sweep,
    is_probe_score,
)

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------
# Reading MLflow


def resolve_tracking_uri(uri: str | None) -> str:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else ``sqlite:///<cwd>/mlflow.db``; sqlite paths made absolute."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///") :])
        if not path.is_absolute():
            path = Path.cwd() / path
        uri = f"sqlite:///{path.resolve()}"
    elif "://" not in uri:  # a bare folder (a file store)
        uri = str(Path(uri).resolve())
    return uri


def check_store(uri: str) -> None:
    """Refuse a sqlite URI whose file does not exist (MLflow would create an empty store)."""
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///") :])
        if not path.is_file():
            raise ReportError(f"no MLflow store at {path} (pass --tracking-uri or set MLFLOW_TRACKING_URI)")


def _search_all(client: Any, experiment_ids: list[str], filter_string: str, order_by: list[str] | None = None) -> list:
    """Every run matching the filter, following page tokens."""
    runs: list = []
    token: str | None = None
    while True:
        page = client.search_runs(
            experiment_ids, filter_string=filter_string, max_results=1000, order_by=order_by, page_token=token
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def find_sweep(client: Any, experiment: str, sweep: str | None, parent_run_id: str | None) -> Sweep:
    """The parent run: by id, else the latest parent tagged ``sweep.name`` = sweep, else the latest parent."""
    if parent_run_id:
        if not RUN_ID.match(parent_run_id):
            raise ReportError(f"not a run id: {parent_run_id!r}")
        try:
            run = client.get_run(parent_run_id)
        except Exception as e:  # MlflowException: RESOURCE_DOES_NOT_EXIST
            raise ReportError(f"no run {parent_run_id}: {e}") from e
    else:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise ReportError(f"no experiment {experiment!r} in this store")
        parents = _search_all(
            client, [exp.experiment_id], "tags.`sweep.role` = 'parent'", order_by=["attributes.start_time DESC"]
        )
        if sweep is not None:
            parents = [r for r in parents if r.data.tags.get("sweep.name") == sweep]
        if not parents:
            what = f"sweep {sweep!r}" if sweep is not None else "sweep parent run"
            raise ReportError(f"no {what} in experiment {experiment!r}")
        run = max(parents, key=lambda r: r.info.start_time or 0)
        if sweep is None:
            log.info("no --sweep given: using the latest sweep, %s", run.data.tags.get("sweep.name"))
    tags = run.data.tags
    return Sweep(
        parent_run_id=run.info.run_id,
        experiment_id=run.info.experiment_id,
        name=tags.get("sweep.name") or run.info.run_id,
        sweep_id=tags.get("sweep.id"),
    )


def fetch_trials(client: Any, sweep: Sweep) -> list:
    """The trial runs (children of the parent run; a child tagged sweep.role other than 'trial' is left out)."""
    runs = _search_all(client, [sweep.experiment_id], f"tags.mlflow.parentRunId = '{sweep.parent_run_id}'")
    trials = [r for r in runs if r.data.tags.get("sweep.role", "trial") == "trial"]
    if len(trials) < len(runs):
        log.info("%d child runs are not trials (sweep.role) and are left out", len(runs) - len(trials))
    return trials


def _first_int(text: Any) -> float:
    """The first integer in ``text`` ("[1, 2]" -> 1), NaN when there is none."""
    found = re.search(r"-?\d+", str(text)) if isinstance(text, str) else None
    return float(found.group()) if found else math.nan


def _maybe_numeric(col: pd.Series) -> pd.Series:
    """The column as numbers when every non-missing value parses as one, else unchanged."""
    num = pd.to_numeric(col, errors="coerce")
    return num if num.notna().sum() == col.notna().sum() else col


#: the stage metrics of the capability probes (``pre.probe_sst2_f1``...): their names vary with the tasks
_PROBE_METRICS = tuple(f"{st}.{PROBE_PREFIX}" for st in STAGES)


def trials_frame(runs: Sequence[Any]) -> pd.DataFrame:
    """One row per trial: ids, status, the contract's params (typed), ``hp.*`` and the scalar metrics
    (the probes' after the declared ones, by name); a run without ``dataset.name`` is CounterFact's."""
    rows = []
    for r in runs:
        row: dict[str, Any] = {
            "run_id": r.info.run_id,
            "run_name": r.info.run_name,
            "status": r.info.status,
            "trial.key": r.data.tags.get("trial.key"),
            "collapse.reason": r.data.tags.get("collapse.reason"),
        }
        params = r.data.params
        row.update({p: params.get(p) for p in PARAMS})
        row.update({k: v for k, v in params.items() if k.startswith(SETTINGS)})
        row.update({k: v for k, v in r.data.metrics.items() if k in METRIC_COLUMNS or k.startswith(_PROBE_METRICS)})
        rows.append(row)
    df = pd.DataFrame(rows)
    hp_cols = sorted(c for c in df.columns if c.startswith(SETTINGS))
    metric_cols = [c for c in METRIC_COLUMNS if c in df.columns]
    metric_cols += sorted(c for c in df.columns if c.startswith(_PROBE_METRICS) and c not in metric_cols)
    for c in PARAMS:
        if c not in df.columns:
            df[c] = None
    df["method"] = df["method"].fillna(df["algorithm"])  # runs logged before methods had names
    df[DATASET] = df[DATASET].fillna(DEFAULT_DATASET)  # runs logged before datasets had names
    missing_layer = df["layer"].isna()
    df.loc[missing_layer, "layer"] = df.loc[missing_layer, "layers"].map(_first_int)
    for c in INT_PARAMS:
        df[c] = pd.to_numeric(df[c], errors="coerce").astype("Int64")
    for c in hp_cols:
        df[c] = _maybe_numeric(df[c])
    df = df[["run_id", "run_name", "status", "trial.key", *PARAMS, *hp_cols, *metric_cols, "collapse.reason"]]
    order = {a: i for i, a in enumerate(METHOD_ORDER)}
    df = df.assign(_alg=df["method"].map(lambda a: order.get(a, len(order))))
    return df.sort_values(["_alg", "method", "mode", "layer", "batch_size"], kind="stable").drop(columns="_alg")


def curve_keys(run: Any) -> list[str]:
    """The curve keys a run has: the declared ones (:data:`.schema.CURVES`) in order, then its probes'
    (``curve.probe_<task>_<metric>``, named by the tasks it ran; not ``probe_seconds``) by name.
    ``run.data.metrics`` holds each key's latest value, so only histories that exist are fetched."""
    have = run.data.metrics
    probes = sorted(k for k in have if k.startswith(PROBE_CURVE_PREFIX) and is_probe_score(k))
    return [*(k for k in CURVES if k in have), *probes]


def curves_frame(client: Any, runs: Sequence[Any], trials: pd.DataFrame) -> pd.DataFrame:
    """Every curve.* metric history of the given runs, long format (run_id, algorithm, ..., key, step, value)."""
    info = trials.set_index("run_id")
    order = {rid: i for i, rid in enumerate(trials["run_id"])}
    rows = []
    for r in sorted(runs, key=lambda r: order.get(r.info.run_id, len(order))):
        t = info.loc[r.info.run_id]
        for key in curve_keys(r):
            for m in sorted(client.get_metric_history(r.info.run_id, key), key=lambda m: (m.step, m.timestamp)):
                rows.append(
                    {
                        "run_id": r.info.run_id,
                        "method": t["method"],
                        "algorithm": t["algorithm"],
                        "layers": t["layers"],
                        "batch_size": t["batch_size"],
                        "mode": t["mode"],
                        "key": key,
                        "step": m.step,
                        "value": m.value,
                    }
                )
    # A retried attempt streams its points again: keep the last value logged at each step.
    cols = ["run_id", "method", "algorithm", "layers", "batch_size", "mode", "key", "step", "value"]
    df = pd.DataFrame(rows, columns=cols)
    return df.drop_duplicates(["run_id", "key", "step"], keep="last").reset_index(drop=True)
