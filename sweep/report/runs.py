"""Reading one sweep's trial runs from MLflow into frames (one row per trial; curves long)."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from ..evals.registry import STAGES
from .schema import (
    CP_PREFIX,
    CURVES,
    DATASET,
    DEFAULT_DATASET,
    INT_PARAMS,
    INT_STUDY_PARAMS,
    METHOD_ORDER,
    METRIC_COLUMNS,
    PARAMS,
    PROBE_CURVE_PREFIX,
    PROBE_PREFIX,
    RETENTION_PREFIX,
    RUN_ID,
    SETTINGS,
    STOP_REASON,
    STUDY_PARAMS,
    ReportError,
    SearchSpec,
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


#: metrics kept by prefix, their names varying with what ran: the probes of every stage
#: (``pre.probe_sst2_f1``...) and the collapse points (``collapse.cp60.batch_es``...)
_PREFIXED_METRICS = (*(f"{st}.{PROBE_PREFIX}" for st in STAGES), CP_PREFIX)


def trials_frame(runs: Sequence[Any]) -> pd.DataFrame:
    """One row per trial: ids, status, the contract's params (typed), ``hp.*`` and the scalar metrics
    (the probes' after the declared ones, by name); a run without ``dataset.name`` is CounterFact's.

    A study's params (:data:`.schema.STUDY_PARAMS`: phase, repeat, cell, search.index) and the tag
    ``stop.reason`` are columns only when some run has them, so an older sweep's frame is unchanged."""
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
        row.update({p: params[p] for p in STUDY_PARAMS if p in params})
        if STOP_REASON in r.data.tags:
            row[STOP_REASON] = r.data.tags[STOP_REASON]
        row.update({k: v for k, v in params.items() if k.startswith(SETTINGS)})
        row.update({k: v for k, v in r.data.metrics.items() if k in METRIC_COLUMNS or k.startswith(_PREFIXED_METRICS)})
        rows.append(row)
    df = pd.DataFrame(rows)
    hp_cols = sorted(c for c in df.columns if c.startswith(SETTINGS))
    metric_cols = [c for c in METRIC_COLUMNS if c in df.columns]
    metric_cols += sorted(c for c in df.columns if c.startswith(_PREFIXED_METRICS) and c not in metric_cols)
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
    study = [c for c in STUDY_PARAMS if c in df.columns]
    for c in INT_STUDY_PARAMS:
        if c in df.columns:
            df[c] = pd.to_numeric(df[c], errors="coerce").astype("Int64")
    stop = [STOP_REASON] if STOP_REASON in df.columns else []
    df = df[
        ["run_id", "run_name", "status", "trial.key", *PARAMS, *study, *hp_cols, *metric_cols, "collapse.reason", *stop]
    ]
    order = {a: i for i, a in enumerate(METHOD_ORDER)}
    df = df.assign(_alg=df["method"].map(lambda a: order.get(a, len(order))))
    return df.sort_values(["_alg", "method", "mode", "layer", "batch_size"], kind="stable").drop(columns="_alg")


def curve_keys(run: Any) -> list[str]:
    """The curve keys a run has: the declared ones (:data:`.schema.CURVES`) in order, then its probes'
    (``curve.probe_<task>_<metric>``, named by the tasks it ran; not ``probe_seconds``) by name.
    ``run.data.metrics`` holds each key's latest value, so only histories that exist are fetched."""
    have = run.data.metrics
    probes = sorted(k for k in have if k.startswith(PROBE_CURVE_PREFIX) and is_probe_score(k))
    cohorts = sorted((k for k in have if k.startswith(RETENTION_PREFIX)), key=_cohort_order)
    return [*(k for k in CURVES if k in have), *probes, *cohorts]


def _cohort_order(key: str) -> tuple[int, str]:
    """``curve.forget_c<j>_<m>`` in cohort order (c10 after c9)."""
    j, _, m = key.removeprefix(RETENTION_PREFIX).partition("_")
    return (int(j) if j.isdigit() else -1, m)


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


# ----------------------------------------------------------------------------------------------------
# A study's artifacts: the parent's search, the trials' per-fact scores


@contextlib.contextmanager
def _quiet_downloads() -> Iterator[None]:
    """MLflow's artifact progress bars off (one per file, on stderr) unless the user set them."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(key)
    if before is None:
        os.environ[key] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)


def _split(text: str | None) -> tuple[str, ...]:
    """A comma-joined param as its parts ("final.s, final.ppl" -> ("final.s", "final.ppl"))."""
    return tuple(p.strip() for p in (text or "").split(",") if p.strip())


def fetch_search(client: Any, sweep: Sweep) -> SearchSpec | None:
    """The parent run's search (:class:`.schema.SearchSpec`): params ``search.*`` and, when logged, the
    artifact ``search.json``; None for a sweep without a search (no ``search.metric`` param nor artifact)."""
    import json
    import tempfile

    params = client.get_run(sweep.parent_run_id).data.params
    doc: dict[str, Any] = {}
    text = None
    with tempfile.TemporaryDirectory() as tmp, _quiet_downloads():
        try:
            text = Path(client.download_artifacts(sweep.parent_run_id, "search.json", tmp)).read_text(encoding="utf-8")
        except Exception as e:  # MlflowException / OSError: no such artifact (a grid sweep)
            log.debug("parent run %s has no search.json: %s", sweep.parent_run_id, e)
    if text is not None:
        try:
            doc = json.loads(text)
        except ValueError as e:
            log.warning("parent run %s: search.json is not JSON (%s); using its params only", sweep.parent_run_id, e)
    metrics = _split(params.get("search.metric")) or tuple(doc.get("metric") or ())
    if not metrics:
        return None
    modes = _split(params.get("search.mode")) or tuple(doc.get("mode") or ())
    if len(modes) != len(metrics):
        log.warning(
            "search: %d modes for %d metrics (%s); reading every metric as max", len(modes), len(metrics), modes
        )
        modes = ("max",) * len(metrics)
    return SearchSpec(
        algorithm=params.get("search.algorithm"),
        metrics=metrics,
        modes=modes,
        best=dict(doc.get("best") or {}),
        pareto={k: list(v) for k, v in (doc.get("pareto") or {}).items()},
    )


def fetch_per_record(client: Any, run_ids: Sequence[str]) -> dict[str, pd.DataFrame]:
    """Each run's artifact ``per_record.csv`` (one row per fact: ``case_id`` ..., then ``<stage>_<metric>``
    ×100; :func:`sweep.tune.tracking._per_record_csv`), by run id; a run without one is left out (logged)."""
    import tempfile

    out: dict[str, pd.DataFrame] = {}
    with tempfile.TemporaryDirectory() as tmp, _quiet_downloads():
        for i, rid in enumerate(dict.fromkeys(run_ids)):
            try:
                path = client.download_artifacts(rid, "per_record.csv", str(Path(tmp) / str(i)))
                out[rid] = pd.read_csv(path)
            except Exception as e:  # MlflowException / OSError / pandas' ParserError
                log.warning("run %s: no readable per_record.csv (%s); left out of the paired comparisons", rid, e)
    log.info("read per_record.csv of %d runs", len(out))
    return out
