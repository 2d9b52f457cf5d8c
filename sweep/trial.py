"""One trial without Ray or MLflow, and its command line.

    python -m sweep.trial                                   # the demo: SmolLM2, MEMIT, 8 demo facts
    python -m sweep.trial --config sweep/configs/trial/demo.yaml algorithm=emmet batch_size=4 --out r.json

:func:`trial_alone` plans the trial's shared work as a one-trial sweep, fulfils it in this process
(:func:`sweep.shared.fulfil.fulfil_local`) and runs the trial's stages (:func:`sweep.stages.run_trial`); it is
also the way to run a trial from a notebook.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any

from editors.config import ConfigError
from editors.store import write_json_atomic

from .config import SweepConfig, TrialConfig, load_config, trial_key
from .evals.registry import SUMMARY
from .result import TrialResult
from .shared.fulfil import fulfil_local
from .shared.mirror import prepare
from .shared.needs import plan_shared
from .stages import load_for_trial, load_records, run_trial

log = logging.getLogger(__name__)


def trial_alone(
    cfg: TrialConfig,
    *,
    model: Any = None,
    tok: Any = None,
    scores_store: str | None = None,
    progress: bool = True,
    **kwargs: Any,
) -> TrialResult:
    """One trial without Ray (``python -m sweep.trial``, notebooks): the model loaded (unless given), the
    trial's shared work planned as a one-trial sweep and fulfilled here (statistics through
    ``stats.store``; pre-edit scores through ``scores_store`` when given), then
    :func:`run_trial`. Where each fact's target value depends only on the unedited model (``batch``
    mode; for ROME, single edits) the values of all batches are optimised up front in chunks of
    ``value_batch`` requests, as a sweep's shared work does, and kept in memory (no store): a trial of
    single ROME edits optimises 32 at a time instead of one. ``kwargs`` go to ``run_trial``
    (``templates``, ``on_batch``). Returns its ``TrialResult``."""
    load_records(cfg)  # a bad dataset fails before any weights are loaded
    if cfg.scoring.probes:  # so do probe files that are neither given nor fetchable
        from .evals.probes import check_probe_data

        check_probe_data([cfg])
    sweep = SweepConfig(name="trial", values_store=None, scores_store=scores_store)  # type: ignore[arg-type]
    prepare(sweep, [cfg])  # stores under a URI writable, a mirrored model in its mirror (filled from the Hub once)
    model, tok, _, load_s = load_for_trial(cfg, cfg.edit_hparams, model, tok)
    key = trial_key(cfg)
    t0 = time.perf_counter()
    inputs, work = fulfil_local(plan_shared(sweep, [cfg], [key]), sweep, model, tok, progress)
    shared_s = time.perf_counter() - t0
    result = run_trial(cfg, inputs=inputs[key], model=model, tok=tok, **kwargs)
    # values optimised up front count as the trial's value time, not as shared work
    result.timings.update(load=load_s, shared=shared_s - work.values_s)
    result.timings["values"] = result.timings.get("values", 0.0) + work.values_s
    # what this trial's own fulfilment computed, rather than read from the stores
    result.work.update(stats_computed=work.stats_layers_computed, scores_computed=work.scores_computed)
    if work.values_optimised:  # optimised up front for the schedule, which reused them
        result.work.update(values_optimised=work.values_optimised)
    result.work.update(stats_reused=work.stats_layers_read, scores_reused=work.scores_read)
    return result


# ----------------------------------------------------------------------------------------------------
# CLI


def format_table(result: TrialResult) -> str:
    cols = [m for m in SUMMARY if any(m in v for v in result.metrics.values())]
    lines = ["          " + "".join(f"{c:>8}" for c in cols)]
    for name, vals in result.metrics.items():
        lines.append(f"{name:<10}" + "".join(f"{vals.get(c, float('nan')):>8.2f}" for c in cols))
    lines.append("timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in result.timings.items()))
    lines.append("work: " + ", ".join(f"{k} {v}" for k, v in result.work.items()))
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
        result = trial_alone(cfg, progress=not args.quiet)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"\n{cfg.algorithm} layers {result.layers}, {cfg.n_edits} edits, batch {cfg.batch_size}, {cfg.mode}")
    print(format_table(result))
    if args.out:
        write_json_atomic(args.out, result.to_dict())
        print(f"result: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
