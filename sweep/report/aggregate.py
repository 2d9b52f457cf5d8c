"""Aggregating trials into series: one line per method and per setting that varies within it."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import pandas as pd

from .schema import DATASET, METHOD_ORDER, setting_columns

log = logging.getLogger(__name__)

#: data and protocol settings that split a series when they vary within a method
DATA_DIMS = (DATASET, "dataset.target", "scoring.gen_context")

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
            df["method"].iloc[0],
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
    (model, hparams, n_edits, layers, every ``hp.*``, and ``extra_dims``; the dataset, its target and the
    generation context too, so no line averages two benchmarks or two protocols' settings).
    """
    candidates = [
        *extra_dims,
        *DATA_DIMS,
        "model",
        "hparams",
        "n_edits",
        "layers",
        *setting_columns(df),
    ]
    parts = []
    all_dims: list[str] = []
    order = {a: i for i, a in enumerate(METHOD_ORDER)}
    for alg in sorted(df["method"].dropna().unique(), key=lambda a: (order.get(a, len(order)), a)):
        sub = df[(df["method"] == alg) & df[x].notna()]
        if keep_main_layers:
            sub = _main_layers(sub, x, section)
        if sub.empty:
            continue
        dims = _varying_dims(sub, x, [c for c in candidates if c != x])
        all_dims += [d for d in dims if d not in all_dims]
        keys = [*dims, x]
        agg = sub.groupby(keys, dropna=False)[list(metrics)].mean().reset_index()
        agg["n_trials"] = sub.groupby(keys, dropna=False).size().to_numpy()
        agg["method"] = alg
        agg["series"] = [
            ", ".join([alg, *(f"{d}={_label_value(v)}" for d, v in zip(dims, vals))])
            for vals in agg[dims].itertuples(index=False)
        ]
        parts.append(agg)
    if not parts:
        return pd.DataFrame(columns=["method", "series", x, "n_trials", *metrics])
    out = pd.concat(parts, ignore_index=True)
    out = out[["method", "series", *all_dims, x, "n_trials", *metrics]]
    return out.sort_values(["series", x], kind="stable", key=_series_sort_key(out)).reset_index(drop=True)


def _series_sort_key(df: pd.DataFrame) -> Callable[[pd.Series], pd.Series]:
    """Sort series in algorithm order (rome, memit, emmet, alphaedit), then by name; x numerically."""
    first = {s: df.loc[df["series"] == s, "method"].iloc[0] for s in df["series"].unique()}
    order = {a: i for i, a in enumerate(METHOD_ORDER)}

    def key(col: pd.Series) -> pd.Series:
        if col.name == "series":
            return col.map(lambda s: f"{order.get(first[s], len(order)):02d} {s}")
        return col

    return key


def present(df: pd.DataFrame, cols: Sequence[str]) -> list[str]:
    """The columns of ``cols`` that ``df`` has with at least one value."""
    return [c for c in cols if c in df.columns and df[c].notna().any()]


def stage_metric(df: pd.DataFrame, m: str, stages: Sequence[str]) -> str | None:
    """The first ``{stage}.{m}`` column with values, in the order of ``stages``."""
    for st in stages:
        if f"{st}.{m}" in df.columns and df[f"{st}.{m}"].notna().any():
            return f"{st}.{m}"
    return None
