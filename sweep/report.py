"""Tables and figures of one sweep, read back from MLflow: ``python -m sweep.report``.

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

One line per algorithm, and per value of anything else that varies within it (an ``hp.*`` such as λ,
``n_edits``, the edited layers), so no point averages different settings; repeated trials of the same
setting are averaged (``n_trials``). Every file is written atomically (temporary file + ``os.replace``).
Only FINISHED trials enter the sections; ``runs.csv`` lists every trial with its status.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullLocator

from editors.store import atomic_write

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "model-editing"
STAGES = ("pre", "at_edit", "final")
SCORES = ("es", "ps", "ns", "s", "em", "pm", "nm", "es_acc", "ps_acc", "ns_acc", "ge", "ppl")
TIME_STAGES = tuple(f"time.{s}" for s in ("load", "shared", "statistics", "keys", "values", "solve", "score"))
TIMINGS = (*TIME_STAGES, "time.total")
MEMORY = ("memory.cpu_rss_peak_mb", "memory.gpu_peak_mb")
#: mean Frobenius norm of each batch's update (summed over the edited layers)
UPDATE_NORM = "update_norm.mean"
METRIC_COLUMNS = (*(f"{st}.{m}" for st in STAGES for m in SCORES), UPDATE_NORM, *TIMINGS, *MEMORY)
CURVES = ("curve.at_edit_es", "curve.at_edit_ps", "curve.at_edit_ns", "curve.at_edit_s", "curve.update_norm")
PARAMS = ("algorithm", "layers", "layer", "batch_size", "mode", "n_edits", "model", "hparams")
#: params that are swept settings: hyperparameters and statistics settings (``stats.max_tokens``...)
SETTINGS = ("hp.", "stats.")
INT_PARAMS = ("layer", "batch_size", "n_edits")
ALGORITHM_ORDER = ("rome", "memit", "emmet", "alphaedit")
SEQUENTIAL_MODES = ("sequential-batch", "sequential")
#: optional columns added to the section tables when any trial of the section has them
EXTRA_COLUMNS = ("at_edit.ge", "final.ge", "pre.ppl", "final.ppl", UPDATE_NORM)
LABELS = {"s": "S (score)", "es": "ES (efficacy)", "ps": "PS (paraphrase)", "ns": "NS (neighbourhood)"}
#: every file a report may write, per section (files not written this time are removed from --out)
SECTION_FILES = {
    "runs": ("runs.csv",),
    "layer_search": ("layer_search.csv", "layer_search.md", "fig_layer_search.png"),
    "batch": ("batch.csv", "batch.md", "fig_batch.png"),
    "sequential": ("sequential.csv", "sequential.md", "fig_sequential.png"),
    "timings": ("timings.csv", "timings.md", "fig_timings.png"),
    "curves": ("curves.csv", "fig_curves.png"),
    "report": ("report.md",),
}
#: the files of the per-hyperparameter sections (``hparam_<name>``); stale ones are removed from --out
HPARAM_FILES = ("hparam_*.csv", "hparam_*.md", "fig_hparam_*.png")
#: settings that make separate lines in a hyperparameter figure
HPARAM_DIMS = ("mode", "batch_size", "layers", "n_edits", "model", "hparams")
_RUN_ID = re.compile(r"^[0-9a-zA-Z_-]+$")


class ReportError(Exception):
    """The sweep cannot be reported (no store, no such sweep, no trials)."""


@dataclass(frozen=True)
class Sweep:
    """The parent run of one sweep."""

    parent_run_id: str
    experiment_id: str
    name: str
    sweep_id: str | None


@dataclass
class Section:
    """What one report section wrote, for the summary and ``report.md``."""

    name: str
    title: str
    paths: dict[str, Path] = field(default_factory=dict)
    table: pd.DataFrame | None = None
    notes: list[str] = field(default_factory=list)


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


def _check_store(uri: str) -> None:
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
        if not _RUN_ID.match(parent_run_id):
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


def trials_frame(runs: Sequence[Any]) -> pd.DataFrame:
    """One row per trial: ids, status, the contract's params (typed), ``hp.*`` and the scalar metrics."""
    rows = []
    for r in runs:
        row: dict[str, Any] = {
            "run_id": r.info.run_id,
            "run_name": r.info.run_name,
            "status": r.info.status,
            "trial.key": r.data.tags.get("trial.key"),
        }
        params = r.data.params
        row.update({p: params.get(p) for p in PARAMS})
        row.update({k: v for k, v in params.items() if k.startswith(SETTINGS)})
        row.update({k: v for k, v in r.data.metrics.items() if k in METRIC_COLUMNS})
        rows.append(row)
    df = pd.DataFrame(rows)
    hp_cols = sorted(c for c in df.columns if c.startswith(SETTINGS))
    metric_cols = [c for c in METRIC_COLUMNS if c in df.columns]
    for c in PARAMS:
        if c not in df.columns:
            df[c] = None
    missing_layer = df["layer"].isna()
    df.loc[missing_layer, "layer"] = df.loc[missing_layer, "layers"].map(_first_int)
    for c in INT_PARAMS:
        df[c] = pd.to_numeric(df[c], errors="coerce").astype("Int64")
    for c in hp_cols:
        df[c] = _maybe_numeric(df[c])
    df = df[["run_id", "run_name", "status", "trial.key", *PARAMS, *hp_cols, *metric_cols]]
    order = {a: i for i, a in enumerate(ALGORITHM_ORDER)}
    df = df.assign(_alg=df["algorithm"].map(lambda a: order.get(a, len(order))))
    return df.sort_values(["_alg", "algorithm", "mode", "layer", "batch_size"], kind="stable").drop(columns="_alg")


def curves_frame(client: Any, runs: Sequence[Any], trials: pd.DataFrame) -> pd.DataFrame:
    """Every curve.* metric history of the given runs, long format (run_id, algorithm, ..., key, step, value)."""
    info = trials.set_index("run_id")
    order = {rid: i for i, rid in enumerate(trials["run_id"])}
    rows = []
    for r in sorted(runs, key=lambda r: order.get(r.info.run_id, len(order))):
        for key in CURVES:
            if key not in r.data.metrics:
                continue
            t = info.loc[r.info.run_id]
            for m in sorted(client.get_metric_history(r.info.run_id, key), key=lambda m: (m.step, m.timestamp)):
                rows.append(
                    {
                        "run_id": r.info.run_id,
                        "algorithm": t["algorithm"],
                        "layers": t["layers"],
                        "batch_size": t["batch_size"],
                        "mode": t["mode"],
                        "key": key,
                        "step": m.step,
                        "value": m.value,
                    }
                )
    cols = ["run_id", "algorithm", "layers", "batch_size", "mode", "key", "step", "value"]
    return pd.DataFrame(rows, columns=cols)


# ----------------------------------------------------------------------------------------------------
# Writing files


def write_text(path: Path, text: str) -> Path:
    """Write ``text`` (UTF-8) atomically."""
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def write_csv(path: Path, df: pd.DataFrame) -> Path:
    """Write ``df`` as CSV (full precision, no index) atomically."""
    return atomic_write(path, lambda p: df.to_csv(p, index=False))


def write_figure(path: Path, fig: Figure, dpi: int = 120) -> Path:
    """Render ``fig`` with the Agg canvas to PNG atomically."""
    FigureCanvasAgg(fig)
    return atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=dpi))


def _cell(value: Any, floatfmt: str) -> str:
    """One markdown cell: blanks for missing values, floats formatted, pipes escaped."""
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return ""
    if isinstance(value, float):
        return format(value, floatfmt)
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(df: pd.DataFrame, floatfmt: str = ".2f") -> str:
    """A GitHub-flavoured markdown table of ``df`` (numbers right-aligned), without ``tabulate``."""
    cols = [str(c) for c in df.columns]
    numeric = [pd.api.types.is_numeric_dtype(df[c]) for c in df.columns]
    lines = [
        "| " + " | ".join(c.replace("|", "\\|") for c in cols) + " |",
        "|" + "|".join("---:" if n else ":---" for n in numeric) + "|",
    ]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(_cell(v, floatfmt) for v in row) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------
# Aggregation into series


def _varying_dims(df: pd.DataFrame, x: str, candidates: Sequence[str]) -> list[str]:
    """Candidate columns that vary within ``df`` and are not a function of ``x`` (e.g. hp.layers vs layer)."""
    dims = []
    for c in candidates:
        if c not in df.columns or df[c].nunique(dropna=True) <= 1:
            continue
        if (df.groupby(x)[c].nunique(dropna=True) <= 1).all():
            continue
        dims.append(c)
    return dims


def _main_layers(df: pd.DataFrame, x: str, section: str) -> pd.DataFrame:
    """Within one algorithm, the ``layers`` settings swept over ``x`` (>= 2 values), dropping one-off settings.

    Keeps the layer-search trials (batch size 1 at many layers) out of the batch-size lines. When no
    setting has two ``x`` values, the setting with the most trials is kept.
    """
    if df["layers"].nunique(dropna=True) <= 1:
        return df
    spread = df.groupby("layers")[x].nunique()
    keep = list(spread[spread >= 2].index)
    if not keep:
        keep = [df["layers"].value_counts().idxmax()]
    dropped = sorted(set(df["layers"].dropna()) - set(keep))
    if dropped:
        log.info(
            "%s: %s uses layers %s; left out %d trials at layers %s",
            section,
            df["algorithm"].iloc[0],
            ", ".join(keep),
            int(df["layers"].isin(dropped).sum()),
            ", ".join(dropped),
        )
    return df[df["layers"].isin(keep)]


def _label_value(v: Any) -> str:
    """A compact text for a series label."""
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return format(v, "g") if isinstance(v, float) else str(v)


def aggregate_series(
    df: pd.DataFrame,
    x: str,
    metrics: Sequence[str],
    section: str,
    keep_main_layers: bool = False,
    extra_dims: Sequence[str] = (),
) -> pd.DataFrame:
    """Mean of ``metrics`` per (algorithm, varying settings, x): columns algorithm, series, dims, x, n_trials, metrics.

    ``series`` names the line: the algorithm plus ``name=value`` for every setting that varies within it
    (model, hparams, n_edits, layers, every ``hp.*``, and ``extra_dims``).
    """
    candidates = [
        *extra_dims,
        "model",
        "hparams",
        "n_edits",
        "layers",
        *sorted(c for c in df.columns if c.startswith(SETTINGS)),
    ]
    parts = []
    all_dims: list[str] = []
    order = {a: i for i, a in enumerate(ALGORITHM_ORDER)}
    for alg in sorted(df["algorithm"].dropna().unique(), key=lambda a: (order.get(a, len(order)), a)):
        sub = df[(df["algorithm"] == alg) & df[x].notna()]
        if keep_main_layers:
            sub = _main_layers(sub, x, section)
        if sub.empty:
            continue
        dims = _varying_dims(sub, x, [c for c in candidates if c != x])
        all_dims += [d for d in dims if d not in all_dims]
        keys = [*dims, x]
        agg = sub.groupby(keys, dropna=False)[list(metrics)].mean().reset_index()
        agg["n_trials"] = sub.groupby(keys, dropna=False).size().to_numpy()
        agg["algorithm"] = alg
        agg["series"] = [
            ", ".join([alg, *(f"{d}={_label_value(v)}" for d, v in zip(dims, vals))])
            for vals in agg[dims].itertuples(index=False)
        ]
        parts.append(agg)
    if not parts:
        return pd.DataFrame(columns=["algorithm", "series", x, "n_trials", *metrics])
    out = pd.concat(parts, ignore_index=True)
    out = out[["algorithm", "series", *all_dims, x, "n_trials", *metrics]]
    return out.sort_values(["series", x], kind="stable", key=_series_sort_key(out)).reset_index(drop=True)


def _series_sort_key(df: pd.DataFrame) -> Callable[[pd.Series], pd.Series]:
    """Sort series in algorithm order (rome, memit, emmet, alphaedit), then by name; x numerically."""
    first = {s: df.loc[df["series"] == s, "algorithm"].iloc[0] for s in df["series"].unique()}
    order = {a: i for i, a in enumerate(ALGORITHM_ORDER)}

    def key(col: pd.Series) -> pd.Series:
        if col.name == "series":
            return col.map(lambda s: f"{order.get(first[s], len(order)):02d} {s}")
        return col

    return key


def _present(df: pd.DataFrame, cols: Sequence[str]) -> list[str]:
    """The columns of ``cols`` that ``df`` has with at least one value."""
    return [c for c in cols if c in df.columns and df[c].notna().any()]


def _stage_metric(df: pd.DataFrame, m: str, stages: Sequence[str]) -> str | None:
    """The first ``{stage}.{m}`` column with values, in the order of ``stages``."""
    for st in stages:
        if f"{st}.{m}" in df.columns and df[f"{st}.{m}"].notna().any():
            return f"{st}.{m}"
    return None


# ----------------------------------------------------------------------------------------------------
# Figures


def _colors(series: Sequence[str]) -> dict[str, Any]:
    """One colour per series (tab10, then tab20)."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(series) <= 10 else "tab20"]
    return {s: cmap(i % cmap.N) for i, s in enumerate(series)}


def _panels(n: int, title: str) -> tuple[Figure, list[Axes]]:
    """A 2x2 grid (n <= 4), else 2x3 (n <= 6), of axes on a fresh figure; unused cells are removed."""
    cols = 2 if n <= 4 else 3
    fig = Figure(figsize=(5.5 * cols, 8), layout="constrained")
    grid = list(fig.subplots(2, cols).flat)
    axes = grid[:n]
    for ax in grid[n:]:
        ax.remove()
    fig.suptitle(title)
    return fig, axes


def _int_ticks(ax: Axes, values: Sequence[float], log2: bool) -> None:
    """Ticks at the integer x values present (log2 axis for batch sizes)."""
    xs = sorted({float(v) for v in values if not pd.isna(v)})
    if log2:
        ax.set_xscale("log", base=2)
        ax.xaxis.set_minor_locator(NullLocator())
    if xs and len(xs) <= 16:
        ax.xaxis.set_major_locator(FixedLocator(xs))
    elif not log2:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))


def _hparam_axis(ax: Axes, values: Sequence[float]) -> None:
    """A hyperparameter's x axis: log10 when the positive values span 10x or more (symlog when 0 is among
    them), linear otherwise; ticks at the values present."""
    xs = sorted({float(v) for v in values if not pd.isna(v)})
    pos = [v for v in xs if v > 0]
    if len(pos) >= 2 and pos[-1] / pos[0] >= 10 and min(xs) >= 0:
        if xs[0] == 0:
            ax.set_xscale("symlog", linthresh=pos[0])
        else:
            ax.set_xscale("log")
        ax.xaxis.set_minor_locator(NullLocator())
    if len(xs) <= 16:
        ax.xaxis.set_major_locator(FixedLocator(xs))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))


def series_figure(
    table: pd.DataFrame,
    x: str,
    panels: Sequence[tuple[str, Sequence[tuple[str, str]]]],
    title: str,
    log2: bool,
    hparam_axis: bool = False,
) -> Figure:
    """Panels of metric vs ``x``, one colour per series; each panel lists (column, linestyle) pairs.

    The x axis is log2 (batch sizes), linear integers (layers), or a hyperparameter's (``hparam_axis``).
    """
    fig, axes = _panels(len(panels), title)
    series = list(dict.fromkeys(table["series"]))
    colors = _colors(series)
    for ax, (label, lines) in zip(axes, panels):
        for s in series:
            d = table[table["series"] == s].sort_values(x)
            for col, style in lines:
                if col not in d.columns or d[col].isna().all():
                    continue
                stage = col.split(".")[0]
                name = s if len(lines) == 1 else f"{s} ({stage})"
                ax.plot(d[x].astype(float), d[col], style, color=colors[s], marker="o", ms=4, label=name)
        ax.set_title(label)
        ax.set_xlabel("batch size" if x == "batch_size" else x.removeprefix("hp."))
        ax.grid(alpha=0.3)
        if hparam_axis:
            _hparam_axis(ax, table[x])
        else:
            _int_ticks(ax, table[x], log2)
    if axes:
        handles, labels = axes[0].get_legend_handles_labels()
        if handles:
            fig.legend(handles, labels, loc="outside lower center", ncol=min(4, len(labels)), fontsize="small")
    return fig


# ----------------------------------------------------------------------------------------------------
# Sections


def _write_table(out: Path, stem: str, table: pd.DataFrame, section: Section) -> None:
    """``<stem>.csv`` and ``<stem>.md``."""
    section.paths[f"{stem}.csv"] = write_csv(out / f"{stem}.csv", table)
    section.paths[f"{stem}.md"] = write_text(out / f"{stem}.md", markdown_table(table))
    section.table = table


def layer_search_section(trials: pd.DataFrame, out: Path) -> tuple[Section | None, dict[str, tuple[int, float, str]]]:
    """Paper Fig. 1: S/ES/PS/NS at edit vs layer, batch mode at batch size 1; returns the best layer per algorithm."""
    sec = Section("layer_search", "Layer search (batch mode, batch size 1, at edit)")
    batch = trials[(trials["mode"] == "batch") & trials["batch_size"].notna() & trials["layer"].notna()]
    picked = []
    for alg, sub in batch.groupby("algorithm"):
        bs = 1 if (sub["batch_size"] == 1).any() else int(sub["batch_size"].min())
        if bs != 1:
            note = f"{alg}: no batch-size-1 trials, layer search uses batch size {bs}"
            log.info("layer_search: %s", note)
            sec.notes.append(note)
        picked.append(sub[sub["batch_size"] == bs])
    if not picked:
        return None, {}
    sel = pd.concat(picked)
    sizes = sorted({int(b) for b in sel["batch_size"]})
    sec.title = f"Layer search (batch mode, batch size {'/'.join(map(str, sizes))}, at edit)"
    if sel["layer"].nunique() < 2:  # one layer (a batch or λ sweep's batch-size-1 trials) is no layer search
        return None, {}
    core = [c for m in ("s", "es", "ps", "ns") if (c := _stage_metric(sel, m, ("at_edit", "final")))]
    if not core:
        log.info("layer_search: the batch-mode trials have no at_edit metrics")
        return None, {}
    metrics = [*core, *(c for c in _present(sel, EXTRA_COLUMNS) if c not in core)]
    table = aggregate_series(sel, "layer", metrics, "layer_search")
    table.insert(
        table.columns.get_loc("layer") + 1,
        "batch_size",
        sel.groupby("algorithm")["batch_size"].min().reindex(table["algorithm"]).to_numpy(),
    )
    _write_table(out, "layer_search", table, sec)
    panels = [(LABELS[c.split(".")[1]], [(c, "-")]) for c in core]
    fig = series_figure(table, "layer", panels, sec.title, log2=False)
    sec.paths["fig_layer_search.png"] = write_figure(out / "fig_layer_search.png", fig)
    best: dict[str, tuple[int, float, str]] = {}
    s_col = core[0] if core[0].endswith(".s") else None
    if s_col is not None:
        for alg, sub in table.groupby("algorithm", sort=False):
            row = sub.loc[sub[s_col].idxmax()]
            best[str(alg)] = (int(row["layer"]), float(row[s_col]), str(row["series"]))
    return sec, best


def batch_section(trials: pd.DataFrame, out: Path) -> Section | None:
    """Paper Figs. 2-3: batch mode, ES/PS/NS/S vs batch size (log2), at edit (= final in batch mode)."""
    sec = Section("batch", "Batch editing (batch mode)")
    sel = trials[(trials["mode"] == "batch") & trials["batch_size"].notna()]
    core = [c for m in ("es", "ps", "ns", "s") if (c := _stage_metric(sel, m, ("at_edit", "final")))]
    if sel.empty or not core:
        return None
    metrics = [*core, *(c for c in _present(sel, EXTRA_COLUMNS) if c not in core)]
    table = aggregate_series(sel, "batch_size", metrics, "batch", keep_main_layers=True)
    if table.groupby("series")["batch_size"].nunique().max() < 2:  # no line, e.g. a λ sweep at one batch size
        log.info("batch: no setting has two batch sizes (%s)", ", ".join(map(str, table["batch_size"].unique())))
        return None
    _write_table(out, "batch", table, sec)
    panels = [(LABELS[c.split(".")[1]], [(c, "-")]) for c in core]
    fig = series_figure(table, "batch_size", panels, sec.title, log2=True)
    sec.paths["fig_batch.png"] = write_figure(out / "fig_batch.png", fig)
    return sec


def sequential_section(trials: pd.DataFrame, out: Path) -> Section | None:
    """Paper Figs. 4-5: sequential-batch / sequential modes, at edit (solid) and final (dashed) vs batch size."""
    sec = Section("sequential", "Sequential-batch editing (at edit solid, final dashed)")
    sel = trials[trials["mode"].isin(SEQUENTIAL_MODES) & trials["batch_size"].notna()]
    core = _present(sel, [f"{st}.{m}" for m in ("es", "ps", "ns", "s") for st in ("at_edit", "final")])
    if sel.empty or not core:
        return None
    metrics = [*core, *(c for c in _present(sel, EXTRA_COLUMNS) if c not in core)]
    table = aggregate_series(sel, "batch_size", metrics, "sequential", keep_main_layers=True)
    _write_table(out, "sequential", table, sec)
    panels = []
    for m in ("es", "ps", "ns", "s"):
        lines = [(c, style) for c, style in ((f"at_edit.{m}", "-"), (f"final.{m}", "--")) if c in core]
        if lines:
            panels.append((LABELS[m], lines))
    fig = series_figure(table, "batch_size", panels, sec.title, log2=True)
    sec.paths["fig_sequential.png"] = write_figure(out / "fig_sequential.png", fig)
    return sec


def swept_hparams(trials: pd.DataFrame) -> list[str]:
    """The numeric ``hp.*`` and ``stats.*`` columns that take two or more values within one (algorithm,
    hparams preset).

    A value that differs only between algorithms or presets (MEMIT's λ vs EMMET's) is not a sweep.
    """
    found = []
    for col in sorted(c for c in trials.columns if c.startswith(SETTINGS)):
        vals = pd.to_numeric(trials[col], errors="coerce")
        if vals.notna().sum() < 2:
            continue
        sub = trials.assign(_v=vals)[vals.notna()]
        if (sub.groupby(["algorithm", "hparams"], dropna=False)["_v"].nunique() >= 2).any():
            found.append(col)
    return found


def hparam_section(trials: pd.DataFrame, col: str, out: Path) -> Section | None:
    """arXiv 2405.00664 App. A.1 (Tables 3-4): ES/PS/NS/S and perplexity vs one swept ``hp.*`` (e.g. λ).

    One line per algorithm and setting (mode, batch size, layers, other hyperparameters) that has two or
    more values of ``col``; one-off settings are left out. At edit solid; in sequential modes also final
    (dashed). Writes ``hparam_<name>.csv``/``.md`` and ``fig_hparam_<name>.png``.
    """
    name = col.removeprefix("hp.")
    stem = "hparam_" + re.sub(r"[^\w.-]+", "_", name)
    sec = Section(stem, f"{name} sweep")
    sel = trials.assign(**{col: pd.to_numeric(trials[col], errors="coerce")})
    sel = sel[sel[col].notna()]
    others = [c for c in sel.columns if c.startswith(SETTINGS) and c != col]
    keys = ["algorithm", *(d for d in HPARAM_DIMS if d in sel.columns), *others]
    setting = sel[keys].map(str).agg("|".join, axis=1)  # map: NaN as text (astype keeps NA)
    sel = sel[sel.groupby(setting)[col].transform("nunique") >= 2]
    stages = ("at_edit", "final") if sel["mode"].isin(SEQUENTIAL_MODES).any() else ("at_edit",)
    sec.title += " (at edit solid, final dashed)" if len(stages) == 2 else " (at edit)"
    core = _present(sel, [f"{st}.{m}" for m in ("es", "ps", "ns", "s") for st in stages])
    if sel.empty or not core:
        return None
    metrics = [*core, *(c for c in _present(sel, EXTRA_COLUMNS) if c not in core)]
    dims = [d for d in ("mode", "batch_size") if d in sel.columns]
    table = aggregate_series(sel, col, metrics, sec.name, extra_dims=dims)
    _write_table(out, stem, table, sec)
    panels = []
    for m in ("es", "ps", "ns", "s"):
        lines = [(c, style) for c, style in ((f"at_edit.{m}", "-"), (f"final.{m}", "--")) if c in core]
        if lines:
            panels.append((LABELS[m], lines))
    if "final.ppl" in metrics:
        panels.append(("held-out perplexity (after editing)", [("final.ppl", "-")]))
    if UPDATE_NORM in metrics:
        panels.append(("update norm ‖Δ‖ (mean per batch)", [(UPDATE_NORM, "-")]))
    fig = series_figure(table, col, panels, sec.title, log2=False, hparam_axis=True)
    sec.paths[f"fig_{stem}.png"] = write_figure(out / f"fig_{stem}.png", fig)
    return sec


def _trial_labels(df: pd.DataFrame) -> list[str]:
    """Readable, unique trial names: 'memit L1 B16 batch', with the trial key (or run id) where names repeat."""
    names = [
        f"{r.algorithm} L{r.layers.strip('[]').replace(' ', '') if isinstance(r.layers, str) else r.layer}"
        f" B{r.batch_size} {r.mode}"
        for r in df.itertuples(index=False)
    ]
    counts = pd.Series(names).value_counts()
    keys = [k if isinstance(k, str) and k else rid[:8] for k, rid in zip(df["trial.key"], df["run_id"])]
    return [f"{n} [{k}]" if counts[n] > 1 else n for n, k in zip(names, keys)]


def timings_section(trials: pd.DataFrame, out: Path) -> Section | None:
    """time.* stages per trial (stacked bars) and peak memory."""
    sec = Section("timings", "Timings per trial (seconds)")
    stages = _present(trials, TIME_STAGES)
    if not stages and "time.total" not in trials.columns:
        return None
    cols = _present(trials, (*TIMINGS, *MEMORY))
    sel = trials[trials[cols].notna().any(axis=1)]
    if sel.empty:
        return None
    table = sel[["run_id", "trial.key", "algorithm", "layers", "batch_size", "mode", "n_edits"]].copy()
    table.insert(0, "trial", _trial_labels(sel))
    for c in cols:
        table[c] = sel[c].to_numpy()
    if stages and "time.total" in cols:
        rest = table["time.total"] - table[stages].fillna(0).sum(axis=1)
        table.insert(table.columns.get_loc("time.total"), "time.other", rest.clip(lower=0))
        stages = [*stages, "time.other"]
    _write_table(out, "timings", table, sec)
    bars = stages or ["time.total"]
    fig = Figure(figsize=(10, min(60.0, 1.5 + 0.3 * len(table))), layout="constrained")
    ax = fig.subplots()
    y = list(range(len(table)))
    left = pd.Series(0.0, index=table.index)
    colors = _colors(bars)
    for c in bars:
        vals = table[c].fillna(0.0)
        ax.barh(y, vals, left=left, color=colors[c], label=c.removeprefix("time."))
        left = left + vals
    ax.set_yticks(y, table["trial"], fontsize="small")
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.set_title(sec.title)
    fig.legend(loc="outside lower center", ncol=len(bars), fontsize="small")
    ax.grid(axis="x", alpha=0.3)
    sec.paths["fig_timings.png"] = write_figure(out / "fig_timings.png", fig)
    return sec


def curves_section(curves: pd.DataFrame, out: Path) -> Section | None:
    """The per-batch curves of the sequential trials: S at edit and the update norm vs edits applied."""
    sec = Section("curves", "Sequential editing curves (vs edits applied)")
    seq = curves[curves["mode"].isin(SEQUENTIAL_MODES)]
    if seq.empty:
        return None
    sec.paths["curves.csv"] = write_csv(out / "curves.csv", seq)
    keys = [k for k in ("curve.at_edit_s", "curve.update_norm") if (seq["key"] == k).any()]
    if not keys:
        keys = list(dict.fromkeys(seq["key"]))[:2]
    fig = Figure(figsize=(6 * len(keys), 4.5), layout="constrained")
    fig.suptitle(sec.title)
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    runs = list(dict.fromkeys(seq["run_id"]))
    algs = list(dict.fromkeys(seq["algorithm"]))
    colors = _colors(algs)
    styles = ("-", "--", ":", "-.")
    for ax, key in zip(axes, keys):
        d = seq[seq["key"] == key]
        for i, rid in enumerate(runs):
            r = d[d["run_id"] == rid].sort_values("step")
            if r.empty:
                continue
            alg, bs = r["algorithm"].iloc[0], r["batch_size"].iloc[0]
            marker = "o" if len(r) <= 4 else None  # a one-batch run is a single point: show it
            ax.plot(
                r["step"], r["value"], styles[i % len(styles)], color=colors[alg], marker=marker, label=f"{alg} B{bs}"
            )
        positive = d["value"][d["value"] > 0]
        if key == "curve.update_norm" and len(positive) and positive.max() / positive.min() > 100:
            ax.set_yscale("log")  # norms of a collapsing run are orders of magnitude above the rest
        ax.set_title(key.removeprefix("curve."))
        ax.set_xlabel("edits applied")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles and len(labels) <= 16:
        axes[0].legend(fontsize="small")
    sec.paths["fig_curves.png"] = write_figure(out / "fig_curves.png", fig)
    return sec


def report_markdown(sweep: Sweep, n_trials: int, sections: Sequence[Section], best_lines: Sequence[str]) -> str:
    """``report.md``: the sweep, the best layers, then every section's table and figure."""
    lines = [
        f"# Sweep {sweep.name}",
        "",
        f"- parent run: `{sweep.parent_run_id}` (experiment {sweep.experiment_id})",
        f"- sweep id: `{sweep.sweep_id}`" if sweep.sweep_id else "- sweep id: (none)",
        f"- trials: {n_trials} (`runs.csv`)",
        "",
    ]
    if best_lines:
        lines += ["## Best layer (max S, layer search)", "", *(f"- {b}" for b in best_lines), ""]
    for sec in sections:
        lines += [f"## {sec.title}", ""]
        lines += [f"> {n}" for n in sec.notes]
        figs = [p for p in sec.paths if p.endswith(".png")]
        lines += [f"![{sec.name}]({p})" for p in figs]
        lines += [""]
        if sec.table is not None:
            lines += [markdown_table(sec.table)]
    return "\n".join(lines) + "\n"


def build_report(client: Any, sweep: Sweep, out: Path) -> tuple[dict[str, Path], list[str]]:
    """Read the sweep's trials and write every section into ``out``; returns (paths by file name, best-layer lines)."""
    runs = fetch_trials(client, sweep)
    if not runs:
        raise ReportError(f"sweep {sweep.name!r} (parent run {sweep.parent_run_id}) has no trial runs")
    trials = trials_frame(runs)
    log.info("sweep %s: %d trials (parent run %s)", sweep.name, len(trials), sweep.parent_run_id)
    paths: dict[str, Path] = {"runs.csv": write_csv(out / "runs.csv", trials)}
    finished = trials[trials["status"] == "FINISHED"]
    if len(finished) < len(trials):
        statuses = trials.loc[trials["status"] != "FINISHED", "status"].value_counts().to_dict()
        log.warning("%d trials not FINISHED are left out of the sections: %s", len(trials) - len(finished), statuses)
    finished_runs = [r for r in runs if r.info.status == "FINISHED"]

    layer_sec, best = layer_search_section(finished, out)
    sections: dict[str, Section | None] = {
        "layer_search": layer_sec,
        "batch": batch_section(finished, out),
        "sequential": sequential_section(finished, out),
        "timings": timings_section(finished, out),
        "curves": curves_section(curves_frame(client, finished_runs, finished), out),
    }
    for col in swept_hparams(finished):
        sec = hparam_section(finished, col, out)
        if sec is not None:
            sections[sec.name] = sec
    for name, sec in sections.items():
        if sec is None:
            log.info("%s: no trials for this section, skipped", name)
    written = [sec for sec in sections.values() if sec is not None]
    for sec in written:
        paths.update(sec.paths)
    # Every report file this run did not write is left from an earlier report of another shape: remove it.
    current = {*paths, "report.md"}
    for pattern in (*(f for files in SECTION_FILES.values() for f in files), *HPARAM_FILES):
        for stale in out.glob(pattern):
            if stale.name not in current:
                log.info("removing %s from an earlier report", stale)
                stale.unlink()
    best_lines = [
        f"{alg}: layer {layer} (S {s:.2f}{'' if series == alg else f'; {series}'})"
        for alg, (layer, s, series) in best.items()
    ]
    paths["report.md"] = write_text(out / "report.md", report_markdown(sweep, len(trials), written, best_lines))
    return paths, best_lines


# ----------------------------------------------------------------------------------------------------
# CLI


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    ap = argparse.ArgumentParser(
        prog="python -m sweep.report", description="Tables and figures of one sweep, read from MLflow."
    )
    pick = ap.add_mutually_exclusive_group()
    pick.add_argument("--sweep", help="sweep name (tag sweep.name); the latest parent run with it (default: latest)")
    pick.add_argument("--parent-run-id", help="the sweep's parent run id")
    ap.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="MLflow experiment (default: %(default)s)")
    ap.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db")
    ap.add_argument("--out", help="output folder (default: reports/<sweep name>)")
    ap.add_argument("--quiet", action="store_true", help="warnings only")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    """Write the report of one sweep; prints the output folder and the best layers; returns the written paths.

    Raises ``ReportError`` when the store, the sweep or its trials are missing.
    """
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(asctime)s %(name)s: %(message)s"
    )
    from mlflow.tracking import MlflowClient  # slow import, kept out of module import

    uri = resolve_tracking_uri(args.tracking_uri)
    _check_store(uri)
    client = MlflowClient(tracking_uri=uri)
    sweep = find_sweep(client, args.experiment, args.sweep, args.parent_run_id)
    out = Path(args.out) if args.out else Path("reports") / re.sub(r"[^\w.-]+", "_", sweep.name)
    paths, best_lines = build_report(client, sweep, out)
    print(f"report: {out} ({len(paths)} files)")
    for line in best_lines:
        print(f"best layer {line}")
    return paths


def _cli() -> int:
    """``python -m sweep.report``: exit 2 with one line on a ReportError."""
    try:
        main()
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_cli())
