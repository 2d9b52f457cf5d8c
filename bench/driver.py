"""The driver's cost per report: simulated trials reporting through the MLflow callback into a real MLflow
server (``mlflow ui`` on SQLite), the previous callback (``before``) beside today's (``after``) in one run.

    python -m bench.driver                                  # 8, 16, 32, 64 trials x 100 batches
    python -m bench.driver --trials 8 64 --batches 20       # a quick look
    python -m bench.driver --write-results                  # ... and the table in bench/RESULTS.md

Each trial is what Tune hands the callback: a start, one report per batch (the trainable's per-batch
report: edits, S/ES/PS/NS so far and the curve point) and an end whose last report carries the packed
result (100 facts' per-record rows and a 100-point curve). The trials interleave as they do on a cluster:
all start, then batch by batch every trial reports. Timed: the callback's own time on Tune's loop per
report (what a trial waits for in ``tune.report``), and the wall time until every run is in MLflow;
counted: the MLflow client calls per trial (searches apart).

``before`` is the callback as it was: a search of the parent's child runs at every trial start and end
(O(N) each, so O(N²) over a sweep) and every write synchronous on Tune's loop. ``after``: the map from
trials to runs read once at launch and kept in memory, every write on one logging thread, in order.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from bench.ui_check import mlflow_ui
from sweep.cells import Cells
from sweep.config import SweepConfig
from sweep.result import REPORT_KEY, TrialResult, UpdateNorms
from sweep.tune import tracking

log = logging.getLogger("bench.driver")

#: the MLflow client calls counted (every one is a request to the server)
CALLS = (
    "create_run",
    "log_batch",
    "set_terminated",
    "log_text",
    "log_dict",
    "log_artifact",
    "log_artifacts",
    "set_tag",
    "update_run",
    "search_runs",
    "get_run",
)


# ----------------------------------------------------------------------------------------------------
# The previous callback, as it was (sweep/tune/tracking.py before the in-memory map and the writer)


def before_callback(uri: str, exp_id: str, parent: str, sid: str) -> Any:
    from ray import tune

    from sweep.cells import planned_of

    class Before(tune.Callback):
        def __init__(self) -> None:
            self.runs: dict[str, str] = {}
            self.streamed: dict[str, int] = {}
            self.logged: set[str] = set()

        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            p = planned_of(trial.config)
            c = tracking.client(uri)
            rid = tracking.child_runs(c, exp_id, parent).running.get(p.key)  # a search per trial start
            self.runs[p.key] = tracking.start_trial_run(c, exp_id, parent, sid, p, rid)
            self.streamed[p.key] = 0

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            key = planned_of(trial.config).key
            point = {k.removeprefix("curve."): v for k, v in result.items() if k.startswith("curve.")}
            tracking.client(uri).log_batch(
                self.runs[key], metrics=tracking.curve_metrics(point, int(time.time() * 1e3))
            )
            self.streamed[key] += 1

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            p = planned_of(trial.config)
            c = tracking.client(uri)
            if p.key in self.logged or p.key in tracking.child_runs(c, exp_id, parent).finished:  # a search per end
                return
            result = tracking.result_of(trial.last_result)
            tracking.log_trial(c, exp_id, parent, sid, result, self.runs[p.key], self.streamed[p.key], p.params())
            self.logged.add(p.key)

    return Before()


# ----------------------------------------------------------------------------------------------------
# Simulated trials


def planned_trials(n: int, root: Path) -> list[Any]:
    """``n`` planned trials of the demo model (a grid over the value optimisation's learning rate)."""
    lrs = [round(0.1 + 0.01 * i, 4) for i in range(n)]
    cfg = SweepConfig(
        name="driver",
        base={"n_edits": 100, "batch_size": 1, "mode": "sequential", "stats": {"store": str(root / "stats")}},
        grid={"hp.v_lr": lrs},
    )
    return Cells(cfg).grid_trials()


def fake_result(p: Any, n_facts: int, n_batches: int) -> TrialResult:
    """A result of the size a trial of ``n_facts`` facts and ``n_batches`` batches packs."""
    from editors.config import to_dict

    final = {"es": 90.0, "ps": 80.0, "ns": 70.0, "s": 79.0, "ppl": 20.0}
    rows = [
        {"case_id": i, **{f"{s}_{m}": 1.0 for s in ("pre", "at_edit", "final") for m in ("es", "ps", "ns")}}
        for i in range(n_facts)
    ]
    curve = [{"batch": b, "edits": b + 1, "update_norm": 1.0, "at_edit_s": 80.0} for b in range(n_batches)]
    return TrialResult(
        config=to_dict(p.config),
        hparams=to_dict(p.config.edit_hparams),
        metrics={"pre": dict(final), "at_edit": dict(final), "final": final},
        per_record=rows,
        curves=curve,
        update_norms=UpdateNorms([1.0] * n_batches, {}),
        solver_fallbacks=0,
        stats_tokens={2: 3000},
        timings={"total": 1.0},
        memory={"cpu_rss_peak_mb": 1.0},
        work={},
        versions={"torch": "x"},
        templates=[["{}"]],
        method=p.method,
        trial_key=p.key,
    )


def report(b: int) -> dict[str, Any]:
    """The trainable's per-batch report (:func:`sweep.tune.trainable.batch_report`) of batch ``b``."""
    scores = {"s": 80.0, "es": 90.0, "ps": 80.0, "ns": 70.0}
    curve = {"batch": b, "edits": b + 1, "applied": b + 1, "update_norm": 1.0, "drift": 1.0, "elapsed_s": 1.0}
    curve.update({f"at_edit_{k}": v for k, v in scores.items()})
    return {
        "edits": b + 1,
        **scores,
        **{f"at_edit.{k}": v for k, v in scores.items()},
        **{f"curve.{k}": v for k, v in curve.items()},
    }


@contextmanager
def counted() -> Any:
    """Count every MLflow client call made inside (by method)."""
    from mlflow.tracking import MlflowClient

    counts: Counter[str] = Counter()
    saved = {name: getattr(MlflowClient, name) for name in CALLS}

    def wrap(name: str, fn: Any) -> Any:
        def call(self: Any, *a: Any, **k: Any) -> Any:
            counts[name] += 1
            return fn(self, *a, **k)

        return call

    for name, fn in saved.items():
        setattr(MlflowClient, name, wrap(name, fn))
    try:
        yield counts
    finally:
        for name, fn in saved.items():
            setattr(MlflowClient, name, fn)


def run_one(side: str, uri: str, n: int, batches: int, root: Path) -> dict[str, Any]:
    """One sweep of ``n`` simulated trials through ``side``'s callback; its timings and call counts."""
    c = tracking.client(uri)
    exp = tracking.experiment_id(c, f"driver-{side}-{n}-{time.time_ns()}")
    sid = f"bench{n}"
    parent, _ = tracking.start_parent(c, exp, "driver", sid, resume=False)
    trials = planned_trials(n, root)
    packed = {p.key: fake_result(p, 100, batches).pack() for p in trials}
    with counted() as counts:
        t0 = time.perf_counter()
        if side == "before":
            cb = before_callback(uri, exp, parent, sid)
        else:
            cb = tracking.MlflowTrials(uri, exp, parent, sid, tracking.child_runs(c, exp, parent))
        fakes = [SimpleNamespace(trial_id=f"t{i}", config=p.point(), last_result={}) for i, p in enumerate(trials)]
        on_loop = 0.0
        for t in fakes:
            s = time.perf_counter()
            cb.on_trial_start(0, fakes, t)
            on_loop += time.perf_counter() - s
        per_report = []
        for b in range(batches):
            r = report(b)
            for t in fakes:
                s = time.perf_counter()
                cb.on_trial_result(0, fakes, t, r)
                per_report.append(time.perf_counter() - s)
        for t, p in zip(fakes, trials):
            t.last_result = {**report(batches - 1), REPORT_KEY: packed[p.key]}
            s = time.perf_counter()
            cb.on_trial_complete(0, fakes, t)
            on_loop += time.perf_counter() - s
        s = time.perf_counter()
        cb.on_experiment_end(fakes)  # waits for the writer (after); nothing to wait for (before)
        flush = time.perf_counter() - s
        wall = time.perf_counter() - t0
    done = tracking.child_runs(c, exp, parent).finished
    assert len(done) == n, f"{side}: {len(done)} of {n} runs FINISHED"
    per_report.sort()
    return {
        "side": side,
        "trials": n,
        "batches": batches,
        "report_ms_mean": 1e3 * sum(per_report) / len(per_report),
        "report_ms_p99": 1e3 * per_report[int(0.99 * (len(per_report) - 1))],
        "start_end_ms_per_trial": 1e3 * on_loop / n,
        "flush_s": flush,
        "wall_s": wall,
        "calls_per_trial": sum(v for k, v in counts.items() if k != "search_runs") / n,
        "searches": counts["search_runs"],
    }


def table(rows: list[dict[str, Any]]) -> str:
    out = [
        "| trials | side | per report, mean (p99) ms | start + end per trial, ms | until all in MLflow, s "
        "| MLflow calls per trial | searches |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| {r['trials']} | {r['side']} | {r['report_ms_mean']:.2f} ({r['report_ms_p99']:.2f}) | "
            f"{r['start_end_ms_per_trial']:.0f} | {r['wall_s']:.1f} | {r['calls_per_trial']:.0f} | {r['searches']} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--batches", type=int, default=100)
    ap.add_argument("--write-results", action="store_true", help="replace the table in bench/RESULTS.md")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    rows = []
    with tempfile.TemporaryDirectory() as tmp, mlflow_ui(f"sqlite:///{Path(tmp) / 'mlflow.db'}") as uri:
        for n in args.trials:
            for side in ("before", "after"):
                rows.append(run_one(side, uri, n, args.batches, Path(tmp)))
                print(table(rows[-1:]).split("\n")[-1], flush=True)
    text = table(rows)
    print(text)
    if args.write_results:
        path = Path(__file__).with_name("RESULTS.md")
        doc = path.read_text()
        start, end = "<!-- driver:start -->", "<!-- driver:end -->"
        if start in doc:
            doc = doc[: doc.index(start) + len(start)] + "\n" + text + "\n" + doc[doc.index(end) :]
            path.write_text(doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
