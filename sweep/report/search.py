"""The search section: per method, the configuration a search found (its best trial, or the Pareto set
of a search over several metrics) and the search's history.

A searched sweep's trials carry the param ``phase``: ``search`` for a trial a search algorithm suggested
(on the dev facts; ``search.index`` is the order it was suggested in) and ``heldout`` for a best
configuration re-run on the held-out facts. The parent run names the search's metrics and modes and, in
``search.json``, the best trial or Pareto set per method (:class:`.schema.SearchSpec`); without it they are
found from the trials. A trial stopped early (tag ``stop.reason``: ``asha`` or ``collapse``) is one of the
search's results: it keeps its at-edit metrics and curves, perhaps not its final ones.

Writes ``search.csv``/``.md`` (one row per method and point: its dev metrics, its configuration and, when
the sweep has them, the held-out runs of that configuration as mean ± 95% CI), ``search_trials.csv``
(every search trial with the running best) and ``fig_search_<method>.png``: each metric against the
order of the search with the running best, and against each sampled hyperparameter (a log axis for a
positive one spanning more than two decades), trials stopped early marked.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullLocator

from ..colors import method_color
from .files import markdown_table, write_csv, write_figure, write_text
from .schema import (
    METHOD_ORDER,
    PHASE,
    SEARCH_INDEX,
    SETTINGS,
    STOP_REASON,
    STOPPED_AT,
    SearchSpec,
    Section,
)
from .significance import mean_ci

log = logging.getLogger(__name__)

#: the search's default objective when the parent run names none (a sweep whose parent lacks ``search.*``)
DEFAULT_METRIC = ("final.s", "max")
#: a positive hyperparameter whose values span more than this ratio gets a log axis (two decades)
LOG_SPAN = 100.0
#: fixed settings that split one method's search into several (a grid axis beside the sampled ones)
GROUP_DIMS = ("model", "hparams", "n_edits", "mode", "batch_size")
#: how a trial stopped early is drawn: (marker, colour, legend)
STOP_MARKS = {
    "asha": ("x", "black", "stopped by ASHA"),
    "collapse": ("v", "#8b0000", "stopped by the collapse guard"),
}


def method_order(methods: Sequence[str]) -> list[str]:
    """The distinct methods in the report's order (:data:`.schema.METHOD_ORDER`, then by name)."""
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    return sorted(dict.fromkeys(methods), key=lambda m: (order.get(m, len(order)), m))


def search_trials(trials: pd.DataFrame) -> pd.DataFrame:
    """The search phase's results: trials with ``phase`` = search that FINISHED or were stopped early
    (a ``stop.reason``, whatever their status); empty for a sweep without a search."""
    if PHASE not in trials.columns:
        return trials.iloc[0:0]
    stopped = trials[STOP_REASON].notna() if STOP_REASON in trials.columns else False
    return trials[(trials[PHASE] == "search") & ((trials["status"] == "FINISHED") | stopped)]


def search_groups(sel: pd.DataFrame) -> list[tuple[str, str, pd.DataFrame]]:
    """The searches of ``sel``: (label, method, its trials in the search's order), one per method and per
    value of a fixed setting (:data:`GROUP_DIMS`) that varies within it ("memit, batch_size=16")."""
    out = []
    for method in method_order(sel["method"]):
        sub = sel[sel["method"] == method]
        dims = [d for d in GROUP_DIMS if d in sub.columns and sub[d].map(str).nunique() > 1]
        if not dims:
            out.append((method, method, _order(sub)))
            continue
        for values, part in sub.groupby(dims, sort=True, dropna=False):
            values = values if isinstance(values, tuple) else (values,)
            text = ", ".join(f"{d}={v}" for d, v in zip(dims, values))
            out.append((f"{method}, {text}", method, _order(part)))
    return out


def layer_list(value: Any) -> tuple[int, ...] | None:
    """The edited layers of a ``layers`` param or config value ("[1, 2]", [1, 2], 2) as a tuple; None
    when there are none."""
    if value is None or (not isinstance(value, (list, tuple, str)) and pd.isna(value)):
        return None
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    found = re.findall(r"-?\d+", str(value))
    return tuple(int(v) for v in found) if found else None


def sampled_params(sub: pd.DataFrame) -> list[str]:
    """The settings one method's search sampled: each ``hp.*``/``stats.*`` with two or more values, then
    ``layers`` when it took two or more."""
    found = [c for c in sorted(sub.columns) if c.startswith(SETTINGS) and sub[c].nunique(dropna=True) >= 2]
    if "layers" in sub.columns and sub["layers"].map(layer_list).nunique(dropna=True) >= 2:
        found.append("layers")
    return found


def _same(a: Any, b: Any) -> bool:
    """Whether a config value and a logged param are the same setting (numbers to 1e-9, layers as lists)."""
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
    except (TypeError, ValueError):
        return str(a) == str(b)


def matches(trials: pd.DataFrame, config: dict[str, Any]) -> pd.Series:
    """Which rows of ``trials`` have the configuration ``config`` ({``hp.<name>``: value, ``layers``: [...]});
    a key the trials lack matches nothing."""
    ok = pd.Series(True, index=trials.index)
    for key, want in config.items():
        if key not in trials.columns:
            return pd.Series(False, index=trials.index)
        if key == "layers":
            ok &= trials[key].map(layer_list) == layer_list(want)
        else:
            ok &= trials[key].map(lambda v, w=want: _same(v, w))
    return ok


def config_text(config: dict[str, Any]) -> str:
    """A configuration in words: "hp.mom2_update_weight=312.5, layers [2]"."""
    parts = []
    for k, v in config.items():
        if k == "layers":
            parts.append(f"layers {list(layer_list(v) or ())}")
        else:
            parts.append(f"{k}={format(v, '.4g') if isinstance(v, float) else v}")
    return ", ".join(parts)


def _better(values: pd.Series, mode: str) -> pd.Series:
    """Values signed so that higher is better (``mode`` max or min)."""
    return values if mode == "max" else -values


def pareto_rows(sub: pd.DataFrame, metrics: Sequence[str], modes: Sequence[str]) -> pd.DataFrame:
    """The rows no other row dominates (at least as good on every metric, better on one), among those
    with every metric; in the order of the search."""
    have = sub.dropna(subset=list(metrics))
    if have.empty:
        return have
    score = np.column_stack([_better(have[m].astype(float), mode).to_numpy() for m, mode in zip(metrics, modes)])
    keep = [
        not any((score[j] >= score[i]).all() and (score[j] > score[i]).any() for j in range(len(score)) if j != i)
        for i in range(len(score))
    ]
    return have[keep]


def _point_from_row(row: pd.Series, metrics: Sequence[str], params: Sequence[str]) -> dict[str, Any]:
    """A search point (as ``search.json`` writes one) from a trial's row."""
    config = {p: (list(layer_list(row[p]) or ()) if p == "layers" else row[p]) for p in params}
    return {"run_id": row["run_id"], "values": {m: row.get(m) for m in metrics}, "config": config}


def search_points(
    sub: pd.DataFrame, method: str, spec: SearchSpec | None, metrics: Sequence[str], modes: Sequence[str]
) -> tuple[list[dict[str, Any]], str]:
    """The method's result: (points, where from). Several metrics: its Pareto set, one metric: its best
    trial; from ``search.json`` when the parent run logged it, else found from the trials."""
    if spec is not None and len(metrics) > 1 and spec.pareto.get(method):
        return list(spec.pareto[method]), "search.json"
    if spec is not None and len(metrics) == 1 and spec.best.get(method):
        return [spec.best[method]], "search.json"
    params = sampled_params(sub)
    if len(metrics) > 1:
        rows = pareto_rows(sub, metrics, modes)
    else:
        have = sub.dropna(subset=[metrics[0]])
        if have.empty:
            return [], "trials"
        best = _better(have[metrics[0]].astype(float), modes[0]).idxmax()
        rows = have.loc[[best]]
    return [_point_from_row(r, metrics, params) for _, r in rows.iterrows()], "trials"


def _metrics(sel: pd.DataFrame, spec: SearchSpec | None) -> tuple[list[str], list[str]]:
    """The search's metrics and modes (the parent's, else :data:`DEFAULT_METRIC`) that the trials have."""
    metrics, modes = (list(spec.metrics), list(spec.modes)) if spec is not None else ([DEFAULT_METRIC[0]], ["max"])
    kept = [(m, mode) for m, mode in zip(metrics, modes) if m in sel.columns]
    for m in metrics:
        if m not in sel.columns:
            log.warning("search: the trials have no metric %s (the search's objective); left out", m)
    return [m for m, _ in kept], [mode for _, mode in kept]


def _order(sub: pd.DataFrame) -> pd.DataFrame:
    """One method's trials in the search's order (``search.index``; rows without one after, as logged)."""
    idx = sub[SEARCH_INDEX] if SEARCH_INDEX in sub.columns else pd.Series(pd.NA, index=sub.index)
    sub = sub.assign(_i=pd.to_numeric(idx, errors="coerce")).sort_values("_i", kind="stable", na_position="last")
    start = 0 if sub["_i"].notna().sum() == 0 else int(sub["_i"].max()) + 1
    fill = pd.Series(range(start, start + int(sub["_i"].isna().sum())), index=sub.index[sub["_i"].isna()])
    return sub.assign(**{SEARCH_INDEX: sub["_i"].fillna(fill).astype(int)}).drop(columns="_i")


def running_best(values: pd.Series, mode: str) -> pd.Series:
    """The best value so far at each trial (``mode`` max or min), missing values skipped."""
    v = values.astype(float)
    best = v.cummax() if mode == "max" else v.cummin()
    return best.ffill()


def _history_table(sel: pd.DataFrame, metrics: Sequence[str], modes: Sequence[str]) -> pd.DataFrame:
    """Every search trial in order per method, its metrics, the running best of each and its sampled settings."""
    parts = []
    for name, _method, sub in search_groups(sel):
        cols = ["method", SEARCH_INDEX, "run_id", "status"]
        cols += [c for c in (STOP_REASON, STOPPED_AT) if c in sub.columns]
        part = sub[[*cols, *metrics]].copy()
        part.insert(1, "search", name)
        for m, mode in zip(metrics, modes):
            part[f"best {m}"] = running_best(sub[m], mode).to_numpy()
        for p in sampled_params(sub):
            part[p] = sub[p].to_numpy()
        parts.append(part)
    return pd.concat(parts, ignore_index=True)


def _heldout(trials: pd.DataFrame, method: str, config: dict[str, Any], metrics: Sequence[str]) -> dict[str, Any]:
    """The held-out runs of one configuration: their number and each metric's mean and 95% half-width."""
    if PHASE not in trials.columns or not config:
        return {}
    held = trials[(trials[PHASE] == "heldout") & (trials["status"] == "FINISHED") & (trials["method"] == method)]
    held = held[matches(held, config)]
    if held.empty:
        return {}
    out: dict[str, Any] = {"heldout n": len(held)}
    for m in metrics:
        if m in held.columns and held[m].notna().any():
            ci = mean_ci(held[m])
            out[f"heldout {m}"] = ci.mean
            out[f"heldout {m} ±"] = ci.half_width
    return out


def search_table(
    trials: pd.DataFrame, sel: pd.DataFrame, spec: SearchSpec | None, metrics: Sequence[str], modes: Sequence[str]
) -> tuple[pd.DataFrame, list[str], dict[str, list[str]]]:
    """One row per method and point (best, or Pareto 1..k), the sentences in words, and the run ids of
    each method's points."""
    rows, notes, chosen = [], [], {}
    groups = search_groups(sel)
    alone = {m for _, m, _ in groups if sum(g[1] == m for g in groups) == 1}
    for name, method, sub in groups:
        # search.json names a best per method: a method searched under several fixed settings is read from its trials
        points, source = search_points(sub, method, spec if method in alone else None, metrics, modes)
        stops = sub[STOP_REASON].value_counts().to_dict() if STOP_REASON in sub.columns else {}
        by_key = dict(zip(sub["trial.key"], sub["run_id"])) if "trial.key" in sub.columns else {}
        # a point's run: search.json's run_id, else the run of its trial_key (a run MLflow had not named yet)
        rids = [str(p.get("run_id") or by_key.get(p.get("trial_key"), "")) for p in points]
        chosen[name] = rids
        if not points:
            notes.append(f"{name}: {len(sub)} search trials, none with {', '.join(metrics)}: no best configuration.")
            continue
        index = sub.set_index("run_id")[SEARCH_INDEX]
        # the method's own count (search.index numbers the suggestions of every cell of the sweep)
        position = {r: n + 1 for n, r in enumerate(sub.sort_values(SEARCH_INDEX, kind="stable")["run_id"])}
        for i, (point, rid) in enumerate(zip(points, rids)):
            row: dict[str, Any] = {
                "method": method,
                "search": name,
                "point": "best" if len(metrics) == 1 else f"pareto {i + 1}",
                "run_id": rid,
                SEARCH_INDEX: int(index[rid]) if rid in index.index else None,
                "trials": len(sub),
                "found at": position.get(rid),
                **{f"stopped ({r})": int(n) for r, n in stops.items()},
            }
            values = point.get("values") or {}
            for m in metrics:
                row[m] = values.get(m, sub.set_index("run_id")[m].get(rid) if rid in index.index else None)
            config = dict(point.get("config") or {})
            row.update({k: (str(list(layer_list(v) or ())) if k == "layers" else v) for k, v in config.items()})
            row.update(_heldout(trials, method, config, metrics))
            rows.append(row)
            notes.append(_point_sentence(name, row, config, metrics, modes))
        what = "trials" if source == "trials" else f"the parent run's {source}"
        log.info("search: %s: %d points from %s", name, len(points), what)
    first = ["method", "search", "point", "run_id", SEARCH_INDEX, "trials", "found at"]
    table = pd.DataFrame(rows, columns=None if rows else [*first, *metrics])
    stop_cols = sorted(c for c in table.columns if c.startswith("stopped ("))
    lead = [*first, *stop_cols, *metrics]
    held = [c for c in table.columns if c.startswith("heldout ")]
    config_cols = [c for c in table.columns if c not in lead and c not in held]
    table = table[[*lead, *config_cols, *held]]
    if (table["search"] == table["method"]).all():
        table = table.drop(columns="search")
    return table, notes, chosen


def _point_sentence(
    method: str, row: dict[str, Any], config: dict[str, Any], metrics: Sequence[str], modes: Sequence[str]
) -> str:
    """One point in words: what it scored on the dev facts, where the search found it, and on the held-out facts."""
    values = ", ".join(
        f"{m} {float(row[m]):.2f}" if row.get(m) is not None and not pd.isna(row[m]) else f"{m} n/a" for m in metrics
    )
    stops = sum(int(v) for k, v in row.items() if k.startswith("stopped ("))
    found = row.get("found at")  # 1-based, among the method's trials
    where = f"trial {found} of {row['trials']}" if found is not None else f"{row['trials']} trials"
    text = f"{method}: {row['point']} {values} ({', '.join(f'{mo} {m}' for m, mo in zip(metrics, modes))}; {where}"
    text += f", {stops} stopped early)" if stops else ")"
    text += f" at {config_text(config)}" if config else ""
    held = [
        f"{m} {row[f'heldout {m}']:.2f}" + (f" ± {row[f'heldout {m} ±']:.2f}" if row.get(f"heldout {m} ±") else "")
        for m in metrics
        if f"heldout {m}" in row
    ]
    if held:
        text += f"; held out: {', '.join(held)} (n={row['heldout n']})"
    return text + "."


def _param_axis(ax: Axes, sub: pd.DataFrame, param: str) -> pd.Series:
    """The x values of ``param`` for the trials of ``sub``; sets the axis (log for a positive param spanning
    more than :data:`LOG_SPAN`, categories for multi-layer lists)."""
    if param == "layers":
        lists = sub[param].map(layer_list)
        if lists.map(lambda v: v is not None and len(v) == 1).all():
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            return lists.map(lambda v: float(v[0]))
        cats = sorted({v for v in lists if v is not None})
        pos = {v: float(i) for i, v in enumerate(cats)}
        ax.set_xticks(list(pos.values()), [str(list(v)) for v in cats], rotation=20, fontsize="small")
        return lists.map(lambda v: pos.get(v, math.nan))
    x = pd.to_numeric(sub[param], errors="coerce")
    if x.isna().all():  # a categorical setting (a string hp)
        cats = sorted(sub[param].dropna().astype(str).unique())
        pos = {v: float(i) for i, v in enumerate(cats)}
        ax.set_xticks(list(pos.values()), cats, rotation=20, fontsize="small")
        return sub[param].astype(str).map(lambda v: pos.get(v, math.nan))
    vals = x.dropna()
    if len(vals) and vals.min() > 0 and vals.max() / vals.min() > LOG_SPAN:
        ax.set_xscale("log")
    else:
        ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    return x.astype(float)


def _scatter(ax: Axes, sub: pd.DataFrame, x: pd.Series, metric: str, color: str, chosen: Sequence[str]) -> None:
    """The trials at (x, metric): finished ones in the method's colour, stopped ones marked by their reason
    (along the bottom of the panel when they lack the metric), the best / Pareto points ringed."""
    y = sub[metric].astype(float)
    reason = sub[STOP_REASON] if STOP_REASON in sub.columns else pd.Series(None, index=sub.index)
    done = reason.isna() & y.notna()
    if done.any():
        ax.scatter(x[done], y[done], color=color, s=22, label="trial", zorder=3)
    for r in dict.fromkeys(reason.dropna()):
        marker, c, words = STOP_MARKS.get(str(r), ("s", "grey", f"stopped ({r})"))
        kept, lost = (reason == r) & y.notna(), (reason == r) & y.isna()
        if kept.any():
            ax.scatter(x[kept], y[kept], marker=marker, color=c, s=30, label=words, zorder=4)
        if lost.any():  # x in data, y in axes coordinates: the x range must still take them in
            ax.scatter(
                x[lost],
                [0.03] * int(lost.sum()),
                marker=marker,
                color=c,
                s=30,
                transform=ax.get_xaxis_transform(),
                label=f"{words} (no {metric})",
                zorder=4,
            )
            xs = x[lost].dropna().astype(float).to_numpy()
            ax.update_datalim(np.column_stack([xs, np.zeros_like(xs)]), updatey=False)
            ax.autoscale_view()
    pick = sub["run_id"].isin(chosen) & y.notna()
    if pick.any():
        ax.scatter(
            x[pick], y[pick], s=130, facecolors="none", edgecolors="black", linewidths=1.5, label="chosen", zorder=5
        )


def search_figure(
    sub: pd.DataFrame, name: str, method: str, metrics: Sequence[str], modes: Sequence[str], chosen: Sequence[str]
) -> Figure:
    """One method's search: a row per metric (against the search's order with the running best, then
    against each sampled setting), and with several metrics the first two against each other."""
    params = sampled_params(sub)
    ncols = 1 + len(params)
    nrows = len(metrics) + (1 if len(metrics) >= 2 else 0)
    fig = Figure(figsize=(4.6 * ncols, 3.6 * nrows), layout="constrained")
    grid = fig.subplots(nrows, ncols, squeeze=False)
    color = method_color(method)
    fig.suptitle(f"{name}: search over {', '.join(p.removeprefix('hp.') for p in params) or 'its space'}")
    for r, (metric, mode) in enumerate(zip(metrics, modes)):
        ax = grid[r][0]
        # the method's own count, 1..n, in the order suggested (search.index numbers the whole sweep)
        order = sub[SEARCH_INDEX].astype(float).rank(method="first")
        _scatter(ax, sub, order, metric, color, chosen)
        ax.step(order, running_best(sub[metric], mode), where="post", color=color, alpha=0.6, label="running best")
        ax.set_xlabel("trial of the method (order suggested)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(f"{metric} ({mode})")
        for c, param in enumerate(params, start=1):
            ax = grid[r][c]
            _scatter(ax, sub, _param_axis(ax, sub, param), metric, color, chosen)
            ax.set_xlabel(param.removeprefix("hp."))
            ax.set_ylabel(metric)
    if len(metrics) >= 2:
        ax = grid[-1][0]
        _scatter(ax, sub, sub[metrics[0]].astype(float), metrics[1], color, chosen)
        ax.set_xlabel(f"{metrics[0]} ({modes[0]})")
        ax.set_ylabel(f"{metrics[1]} ({modes[1]})")
        ax.set_title("the objectives against each other (ringed: the Pareto set)", fontsize="small")
        for extra in grid[-1][1:]:
            extra.remove()
    for ax in fig.axes:
        ax.grid(alpha=0.3)
    handles: dict[str, Any] = {}
    for ax in fig.axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncol=6, fontsize="small")
    return fig


def _stem(name: str) -> str:
    """A search's figure name ("memit, batch_size=16" -> fig_search_memit_batch_size_16)."""
    return "fig_search_" + re.sub(r"[^\w.-]+", "_", name).strip("_")


def search_section(trials: pd.DataFrame, spec: SearchSpec | None, out: Path) -> Section | None:
    """``search.csv``/``.md``, ``search_trials.csv`` and ``fig_search_<method>.png`` of the search phase's
    trials of ``trials`` (every status: the stopped ones count); None for a sweep without a search."""
    sel = search_trials(trials)
    if sel.empty:
        return None
    metrics, modes = _metrics(sel, spec)
    if not metrics:
        return None
    algorithm = spec.algorithm if spec is not None and spec.algorithm else "a search"
    goal = ", ".join(f"{mode} {m}" for m, mode in zip(metrics, modes))
    sec = Section("search", f"Search ({algorithm}, {goal}; dev facts)")
    table, notes, chosen = search_table(trials, sel, spec, metrics, modes)
    history = _history_table(sel, metrics, modes)
    sec.paths["search.csv"] = write_csv(out / "search.csv", table)
    sec.paths["search_trials.csv"] = write_csv(out / "search_trials.csv", history)
    kind = "the Pareto set of each method" if len(metrics) > 1 else "each method's best trial"
    text = [f"# {sec.title}", "", f"Rows: {kind}; held-out columns: mean ± 95% CI of its held-out runs.", ""]
    text += [*(f"- {n}" for n in notes), "", markdown_table(table)]
    sec.paths["search.md"] = write_text(out / "search.md", "\n".join(text))
    for name, method, sub in search_groups(sel):
        fig = search_figure(sub, name, method, metrics, modes, chosen.get(name, []))
        stem = _stem(name)
        sec.paths[f"{stem}.png"] = write_figure(out / f"{stem}.png", fig)
    sec.table = table
    sec.notes += notes
    for note in notes:
        log.info("search: %s", note)
    return sec
