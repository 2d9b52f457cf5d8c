"""The statistics under the repeats and paired-comparison sections: pure functions on numbers, no MLflow.

- :func:`mean_ci`: the mean of one cell's repeats and its Student-t interval (n − 1 degrees of freedom);
  a single repeat has no interval, and says so (:attr:`MeanCI.low` is None) rather than inventing one.
- :func:`paired_bootstrap`: two methods' per-fact scores on the same facts, resampled together (the same
  facts drawn for both) with a fixed seed: the observed difference of ES/PS/NS (a difference of means)
  and of S, its 95% percentile interval and a two-sided p. S is not a per-fact mean: it is the harmonic
  mean of the mean ES, PS and NS (0 when any is 0; :func:`sweep.evals.metrics.aggregate`), so each resample
  recomputes it from the resampled means. Facts repeated over several runs (repeats of a cell) are
  resampled as clusters: a drawn fact brings all its rows.
- :func:`sign_test`: the exact two-sided sign test of wins against losses (ties dropped), binomial(n, 1/2).
- :func:`compare_in_words`: whether method A beats B beyond noise, in one sentence.

The t quantile is computed here (the regularised incomplete beta function by its continued fraction), so
reports need no scipy; the tests check it against scipy.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

#: the scores a paired comparison reads per fact (S is computed from them)
PARTS = ("es", "ps", "ns")
#: the metrics a paired comparison reports, in order
PAIRED_METRICS = (*PARTS, "s")
#: the default number of bootstrap resamples and the fixed seed
N_BOOT = 2000
SEED = 0

# ----------------------------------------------------------------------------------------------------
# Student t


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the regularised incomplete beta function (modified Lentz; Numerical
    Recipes §6.4), converging for x < (a + 1) / (a + b + 2)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b), for a, b > 0 and 0 <= x <= 1."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc: x must be in [0, 1], got {x}")
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"t_cdf: degrees of freedom must be positive, got {df}")
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (bisection on :func:`t_cdf`,
    to 1e-12)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_quantile: p must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2.0
    while hi - lo > 1e-12 * max(1.0, hi):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return 0.5 * (lo + hi)


# ----------------------------------------------------------------------------------------------------
# A cell's repeats


@dataclass(frozen=True)
class MeanCI:
    """The mean of ``n`` repeats and its two-sided ``level`` interval (None, None when n = 1: one repeat
    measures no spread)."""

    mean: float
    n: int
    low: float | None
    high: float | None
    level: float = 0.95

    @property
    def half_width(self) -> float | None:
        """Half the interval's width (the "±"), None without an interval."""
        return None if self.low is None or self.high is None else (self.high - self.low) / 2.0

    def text(self, digits: int = 2) -> str:
        """In words: "76.20 ± 3.10 (95% CI, n=3)", or "76.20 (n=1: one repeat, no interval)"."""
        mean = f"{self.mean:.{digits}f}"
        if self.half_width is None:
            return f"{mean} (n={self.n}: one repeat, no interval)"
        return f"{mean} ± {self.half_width:.{digits}f} ({self.level:.0%} CI, n={self.n})"


def mean_ci(values: Sequence[float] | np.ndarray, level: float = 0.95) -> MeanCI:
    """The mean of a cell's repeats and its Student-t interval: mean ± t_{(1+level)/2, n−1} · s / √n,
    with s the sample standard deviation (ddof = 1). Missing values (NaN) are left out; one value gives
    the mean without an interval; none is a ValueError."""
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    if x.size == 0:
        raise ValueError("mean_ci: no finite values")
    mean = float(x.mean())
    if x.size == 1:
        return MeanCI(mean, 1, None, None, level)
    half = t_quantile((1.0 + level) / 2.0, x.size - 1) * float(x.std(ddof=1)) / math.sqrt(x.size)
    return MeanCI(mean, int(x.size), mean - half, mean + half, level)


# ----------------------------------------------------------------------------------------------------
# Two methods on the same facts


@dataclass(frozen=True)
class PairedDiff:
    """A minus B on one metric over the same facts: the observed difference, its percentile interval
    over the bootstrap resamples, and the two-sided bootstrap p."""

    metric: str
    diff: float
    low: float
    high: float
    p: float
    n_facts: int
    n_rows: int
    n_boot: int
    seed: int
    level: float = 0.95

    @property
    def excludes_zero(self) -> bool:
        """Whether the interval lies wholly on one side of 0."""
        return self.low > 0 or self.high < 0


@dataclass(frozen=True)
class SignTest:
    """The exact two-sided sign test of per-fact wins of A against B (ties dropped)."""

    wins: int
    losses: int
    ties: int
    p: float


def _hmean_rows(parts: np.ndarray) -> np.ndarray:
    """The harmonic mean over the last axis (0 where any part is <= 0), as :func:`sweep.evals.metrics.hmean`."""
    ok = (parts > 0).all(axis=-1)
    safe = np.where(parts > 0, parts, 1.0)
    return np.where(ok, parts.shape[-1] / (1.0 / safe).sum(axis=-1), 0.0)


def _stack(scores: Mapping[str, Sequence[float] | np.ndarray], n: int | None, who: str) -> np.ndarray:
    """The per-row ES/PS/NS of one method as an [n, 3] array (finite, equal lengths)."""
    missing = [m for m in PARTS if m not in scores]
    if missing:
        raise ValueError(f"paired_bootstrap: {who} lacks {', '.join(missing)}")
    arr = np.column_stack([np.asarray(scores[m], dtype=float) for m in PARTS])
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"paired_bootstrap: {who} has {arr.shape[0]} rows, the other {n}: not paired")
    if not np.isfinite(arr).all():
        raise ValueError(f"paired_bootstrap: {who} has missing or infinite scores (drop those facts first)")
    return arr


def _statistic(sums: np.ndarray, counts: np.ndarray, metrics: Sequence[str]) -> np.ndarray:
    """Each metric from the ES/PS/NS sums over the drawn rows [..., 3] and their number [...]: the means
    of ES/PS/NS and S = their harmonic mean; returns [..., len(metrics)]."""
    means = sums / counts[..., None]
    cols = {m: means[..., i] for i, m in enumerate(PARTS)}
    cols["s"] = _hmean_rows(means)
    return np.stack([cols[m] for m in metrics], axis=-1)


def paired_bootstrap(
    a: Mapping[str, Sequence[float] | np.ndarray],
    b: Mapping[str, Sequence[float] | np.ndarray],
    metrics: Sequence[str] = PAIRED_METRICS,
    groups: Sequence[object] | np.ndarray | None = None,
    n_boot: int = N_BOOT,
    seed: int = SEED,
    level: float = 0.95,
) -> dict[str, PairedDiff]:
    """A minus B on each of ``metrics`` (es ps ns s), paired over facts, by the bootstrap.

    ``a`` and ``b`` map es, ps and ns to one score per row, row i of both being the same fact (same run
    of the same repeat). ``groups`` names each row's fact: rows of one fact (its repeats) are drawn
    together; None: every row is its own fact. Each of ``n_boot`` resamples draws as many facts as there
    are, with replacement (``numpy.random.default_rng(seed)``, the same draws for every metric), and
    recomputes each metric for both methods on those facts' rows: ES/PS/NS as means, S as the harmonic
    mean of the three means.

    Returns, per metric, the observed difference (on all rows), the percentile interval of the resampled
    differences (``level``, two-sided) and the two-sided p = min(1, 2 (1 + k) / (n_boot + 1)), k the
    number of resampled differences on the far side of 0 from the observed one (0 included): small when
    nearly every resample keeps the observed sign, 1 when A and B are equal on every fact.
    """
    unknown = [m for m in metrics if m not in PAIRED_METRICS]
    if unknown or not metrics:
        raise ValueError(f"paired_bootstrap: metrics must be among {', '.join(PAIRED_METRICS)}, got {metrics}")
    if n_boot < 1:
        raise ValueError(f"paired_bootstrap: n_boot must be >= 1, got {n_boot}")
    xa = _stack(a, None, "A")
    xb = _stack(b, xa.shape[0], "B")
    n_rows = xa.shape[0]
    if n_rows == 0:
        raise ValueError("paired_bootstrap: no facts")
    if groups is None:
        codes = np.arange(n_rows)
    else:
        if len(groups) != n_rows:
            raise ValueError(f"paired_bootstrap: {len(groups)} groups for {n_rows} rows")
        codes = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)[1].reshape(-1)
    n_groups = int(codes.max()) + 1
    counts = np.bincount(codes, minlength=n_groups).astype(float)
    sums_a = np.stack([np.bincount(codes, xa[:, i], n_groups) for i in range(3)], axis=-1)
    sums_b = np.stack([np.bincount(codes, xb[:, i], n_groups) for i in range(3)], axis=-1)
    total = np.array(float(n_rows))
    observed = _statistic(sums_a.sum(0), total, metrics) - _statistic(sums_b.sum(0), total, metrics)
    rng = np.random.default_rng(seed)
    diffs = np.empty((n_boot, len(metrics)))
    chunk = max(1, min(n_boot, 4_000_000 // max(n_groups, 1)))
    for start in range(0, n_boot, chunk):
        k = min(chunk, n_boot - start)
        draws = rng.integers(0, n_groups, size=(k, n_groups))
        flat = (np.arange(k)[:, None] * n_groups + draws).reshape(-1)
        weights = np.bincount(flat, minlength=k * n_groups).reshape(k, n_groups).astype(float)
        n_drawn = weights @ counts
        stat_a = _statistic(weights @ sums_a, n_drawn, metrics)
        diffs[start : start + k] = stat_a - _statistic(weights @ sums_b, n_drawn, metrics)
    tail = (1.0 - level) / 2.0
    out = {}
    for j, m in enumerate(metrics):
        d = diffs[:, j]
        lo, hi = np.quantile(d, [tail, 1.0 - tail])
        far = int((d <= 0).sum()) if observed[j] > 0 else int((d >= 0).sum()) if observed[j] < 0 else n_boot
        p = min(1.0, 2.0 * (1 + far) / (n_boot + 1))
        out[m] = PairedDiff(m, float(observed[j]), float(lo), float(hi), p, n_groups, n_rows, n_boot, seed, level)
    return out


def sign_test(wins: int, losses: int) -> float:
    """The exact two-sided sign test: P(a split at least as uneven as ``wins``:``losses``) under
    binomial(wins + losses, 1/2), i.e. min(1, 2 · Σ_{k <= min(wins, losses)} C(n, k) / 2ⁿ); 1 when n = 0.
    9 wins and 1 loss: 2 · (1 + 10) / 1024 = 22/1024."""
    if wins < 0 or losses < 0:
        raise ValueError(f"sign_test: counts must be >= 0, got {wins} wins, {losses} losses")
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1))
    return min(1.0, 2.0 * tail / 2.0**n)


def sign_test_scores(
    a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, groups: Sequence[object] | None = None
) -> SignTest:
    """The sign test of per-fact scores (efficacy): a fact is a win where A's score exceeds B's, a loss
    where it is below, a tie (dropped) where equal. With ``groups``, each fact's rows (its repeats) are
    first averaged, so a fact counts once."""
    xa, xb = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if xa.shape != xb.shape:
        raise ValueError(f"sign_test_scores: {xa.shape} vs {xb.shape}: not paired")
    if groups is not None:
        codes = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)[1].reshape(-1)
        n = np.bincount(codes)
        xa, xb = np.bincount(codes, xa) / n, np.bincount(codes, xb) / n
    d = xa - xb
    d = d[np.isfinite(d)]
    wins, losses = int((d > 0).sum()), int((d < 0).sum())
    return SignTest(wins, losses, int(d.size) - wins - losses, sign_test(wins, losses))


# ----------------------------------------------------------------------------------------------------
# In words


def beyond_noise(diff: PairedDiff, sign: SignTest | None = None, alpha: float = 0.05) -> bool:
    """Whether A and B differ beyond noise: the bootstrap interval excludes 0 and, when a sign test is
    given, it agrees (p < ``alpha``, more wins than losses on the side of the difference)."""
    if not diff.excludes_zero:
        return False
    if sign is None:
        return True
    return sign.p < alpha and (sign.wins - sign.losses) * diff.diff > 0


def _count(n: int, one: str, many: str) -> str:
    """A count with its noun: "1 loss", "3 losses"."""
    return f"{n} {one if n == 1 else many}"


def _p_text(p: float) -> str:
    """A p-value as text, three significant digits."""
    return f"{p:.3g}"


def compare_in_words(
    a: str, b: str, what: str, diff: PairedDiff, sign: SignTest | None = None, alpha: float = 0.05
) -> str:
    """One sentence: "memit > emmet on final ES beyond noise (+12.50 points, paired bootstrap 95% CI
    [5.00, 20.00], p=0.001; sign test 9 wins, 1 loss, 0 ties, p=0.0215; 10 facts)", the better method first, or
    "memit vs emmet on final S: within noise (...)". ``what`` names the metric ("final ES"); ``diff`` is
    A minus B, ``sign`` A's wins (efficacy only)."""
    better = beyond_noise(diff, sign, alpha)
    flip = better and diff.diff < 0
    first, second = (b, a) if flip else (a, b)
    d, lo, hi = (-diff.diff, -diff.high, -diff.low) if flip else (diff.diff, diff.low, diff.high)
    facts = f"{diff.n_facts} facts" + (f", {diff.n_rows} paired scores" if diff.n_rows != diff.n_facts else "")
    detail = f"{d:+.2f} points, paired bootstrap {diff.level:.0%} CI [{lo:.2f}, {hi:.2f}], p={_p_text(diff.p)}"
    if sign is not None:
        wins, losses = (sign.losses, sign.wins) if flip else (sign.wins, sign.losses)
        counts = [_count(wins, "win", "wins"), _count(losses, "loss", "losses"), _count(sign.ties, "tie", "ties")]
        detail += f"; sign test {', '.join(counts)}, p={_p_text(sign.p)}"
    if better:
        return f"{first} > {second} on {what} beyond noise ({detail}; {facts})"
    why = ""
    if diff.excludes_zero and sign is not None:
        why = "; the bootstrap interval excludes 0 but the sign test does not agree"
    return f"{first} vs {second} on {what}: within noise ({detail}; {facts}{why})"
