"""Tables and figures of one sweep, read back from MLflow: ``python -m sweep.report``.

One module per concern: :mod:`.schema` (columns and typed objects), :mod:`.runs` (reading MLflow),
:mod:`.aggregate` (series), :mod:`.figures`, :mod:`.files` (atomic writes), :mod:`.sections`,
:mod:`.lifelong`, :mod:`.search` and :mod:`.repeats` (the sections), :mod:`.significance` (the statistics
under repeats and comparisons), :mod:`.build` (one report, the command line).

    python -m sweep.report --sweep demo                      # latest parent run tagged sweep.name=demo
    python -m sweep.report --parent-run-id 3f2a... --out reports/x --tracking-uri sqlite:////abs/mlflow.db

Reproduces the figures of arXiv 2405.00664 from the trial runs (children of the sweep's parent run):

- ``layer_search``: batch mode at batch size 1 (else the smallest batch size of each algorithm),
  S/ES/PS/NS at edit vs the (first) edited layer (paper Fig. 1), and the layer maximising S (only
  when two or more layers were edited);
- ``batch``: batch mode, ES/PS/NS/S vs batch size (Figs. 2-3; in batch mode final = at_edit; only when
  a setting has two or more batch sizes);
- ``sequential``: sequential-batch and sequential modes, at edit (solid) and final (dashed) vs batch
  size (Figs. 4-5);
- ``timings``: the time.* stages of every trial as stacked bars, with peak memory in the table;
- ``curves``: the per-batch curves of the sequential trials (at-edit S and update norm vs edits);
- ``hparam_<name>``: one per numeric ``hp.*`` swept within an algorithm (MEMIT's λ, EMMET's μ, ...), ES/PS/
  NS/S, held-out perplexity and update norm vs its value (log axis), one line per setting swept over it:
  the λ tuning of the paper's App. A.1 (Tables 3-4).
- ``forgetting`` and ``health`` (:mod:`.lifelong`): the lifelong-editing curves;
- ``protocols`` (:mod:`.protocols`): per dataset and method, the final ES/PS/NS/S teacher-forced beside the
  generated (WILD, arXiv 2502.11177) ``gen_*``, the drop between them, the ranks under either protocol and
  whether the ranking changes, in words;
- ``probes`` (:mod:`.probes`): the capability probes (``probe_<task>_<metric>``) from the unedited model
  through every probe point to the final one, a panel per task with its chance level
  (:data:`.schema.CHANCE`), and the held-out perplexity beside them.

A study's sections come first, where the sweep has their params (``phase``, ``repeat``, ``cell``,
``search.index``; an older sweep has none and its report is unchanged):

- ``search`` (:mod:`.search`): per method, the best configuration a search found on the dev facts (or its
  Pareto set), with its held-out runs' mean ± 95% CI, and ``fig_search_<method>.png``: the metric against
  the order of the search with the running best, and against each sampled setting; trials ASHA or the
  collapse guard stopped are marked. The search's dev trials enter no other section;
- ``repeats`` (:mod:`.repeats`): each cell's mean ± 95% Student-t interval of the final S/ES/PS/NS over
  its repeats (held-out runs if any, else the grid's); one repeat gives no interval;
- ``paired`` (:mod:`.repeats`): for each pair of methods on the same facts, the paired bootstrap over facts
  of ES/PS/NS/S and the exact sign test on per-fact efficacy, from the runs' ``per_record.csv``, merged
  over the repeats, each said in words (:mod:`.significance`).

Datasets are kept apart: ES/PS/NS/S mean different things on CounterFact and on ZsRE/QAEdit
(:func:`sweep.evals.registry.label`). A sweep over one dataset (``dataset.name``; a run without it is
CounterFact's) writes every section into ``--out``; over several, each dataset's sections go into
``<out>/<dataset>/`` with its own ``report.md``, and ``<out>`` holds ``protocols``, ``probes`` (a row,
panel or line per dataset) and a ``report.md`` linking the datasets'.

One line per algorithm, and per value of anything else that varies within it (an ``hp.*`` such as λ,
``n_edits``, the edited layers), so no point averages different settings; repeated trials of the same
setting are averaged (``n_trials``). Every file is written atomically (temporary file + ``os.replace``).
Only FINISHED trials enter the sections; ``runs.csv`` lists every trial with its status.
"""

from .build import build_report, main, parse_args
from .files import markdown_table
from .runs import curves_frame, fetch_trials, find_sweep, resolve_tracking_uri, trials_frame
from .schema import ReportError, Section, Sweep

__all__ = [
    "ReportError",
    "Section",
    "Sweep",
    "build_report",
    "curves_frame",
    "fetch_trials",
    "find_sweep",
    "main",
    "markdown_table",
    "parse_args",
    "resolve_tracking_uri",
    "trials_frame",
]
