"""The Tune trainable: one trial inside a Ray worker.

:func:`trainable` takes its :class:`~sweep.cells.PlannedTrial` from Tune's config (resolved once, in
planning or by the search that suggested it), asks the sweep's service for its inputs
(:func:`sweep.shared.service.obtain_ray`: computing, on its own model, any unit the service grants it) and
runs the trial's stages (:func:`sweep.stages.run_trial`), reporting each batch and, last, the whole result.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import torch

from ..cells import planned_of
from ..evals.registry import CORE
from ..result import REPORT_KEY, CurvePoint
from ..shared.service import obtain_ray
from ..shared.tasks import _cached_model
from ..stages import run_trial

#: Set to a file path to make the first trial that reaches its first batch kill its own worker
#: process (once: the file marks that it happened). Fault-injection for the retry test.
CHAOS_ENV = "MODEL_EDITING_CHAOS_KILL_ONCE"


def batch_report(point: CurvePoint) -> dict[str, Any]:
    """One batch's report to Tune: edits so far, the scores so far (``s es ps ns``: the progress table's
    columns, and as ``at_edit.<m>`` for a scheduler) and the curve point (``curve.*``, streamed to MLflow)."""
    flat = point.flat()
    return {
        "edits": point.edits,
        **point.at_edit,
        **{f"at_edit.{k}": v for k, v in point.at_edit.items()},
        **{f"curve.{k}": v for k, v in flat.items() if isinstance(v, (int, float))},
    }


def trainable(config: dict[str, Any], service: Any, scheduled: bool = False) -> None:
    """One Tune trial: ``config`` carries its :class:`~sweep.cells.PlannedTrial` (a grid point or a
    search's suggestion, resolved once when it was planned or suggested); its shared inputs come from the
    sweep's service (:mod:`sweep.shared.service`: found by what they are, or computed here on the way).
    ``scheduled``: a scheduler reads the per-batch reports, so the last batch's point rides in the final
    report instead (ASHA stops a trial that reaches its max_t).

    Reports one intermediate result per batch (:func:`batch_report`) and a final result with the trial's
    scalar metrics and the whole :class:`~sweep.result.TrialResult`, packed.
    """
    import ray
    from ray import tune

    planned = planned_of(config)
    cfg = planned.config
    model, tok, load_s = _cached_model(cfg.model)
    got = obtain_ray(service, cfg, model, tok)
    inputs = got.inputs

    chaos = os.environ.get(CHAOS_ENV)

    def on_batch(point: CurvePoint) -> None:
        if chaos and not Path(chaos).exists():
            Path(chaos).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        # Under a scheduler the last batch's point rides in the final report (tracking.log_trial): ASHA stops a
        # trial that reaches its max_t, which must be after the final result, not before it
        if point.edits < cfg.n_edits or not scheduled:
            tune.report(batch_report(point))

    result = run_trial(cfg, inputs=inputs, model=model, tok=tok, on_batch=on_batch)
    result.trial_key = planned.key
    result.timings["load"] = load_s  # 0 when an earlier trial of this worker loaded the model
    result.timings["shared"] = got.seconds  # shared work this trial computed for the sweep
    result.timings["wait_inputs"] = got.waited_s
    for kind, n in got.computed.items():
        result.work[f"{kind}_computed_for_sweep"] = n
    result.node = ray.get_runtime_context().get_node_id()
    result.pid = os.getpid()
    result.stats_zero_copy = inputs.zero_copy  # a read-only view of the object store, not a per-trial copy
    # The whole result rides in the last report, through Ray to the driver: no checkpoint, so no node
    # needs the driver's disk (tracking.result_of).
    tune.report(
        {
            "edits": cfg.n_edits,
            **{m: result.metrics["final"][m] for m in CORE},
            **result.flat_metrics(),
            REPORT_KEY: result.pack(),
        }
    )
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
