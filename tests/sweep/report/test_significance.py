"""The statistics of the repeats and paired-comparison sections against hand computations and scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import special, stats

from sweep.report.significance import (
    PAIRED_METRICS,
    MeanCI,
    PairedDiff,
    SignTest,
    betainc,
    beyond_noise,
    compare_in_words,
    mean_ci,
    paired_bootstrap,
    sign_test,
    sign_test_scores,
    t_cdf,
    t_quantile,
)


def _same(x: np.ndarray | list[float]) -> dict[str, np.ndarray]:
    """ES given, PS and NS fixed at 100 (so S depends on ES alone)."""
    es = np.asarray(x, dtype=float)
    return {"es": es, "ps": np.full(es.shape, 100.0), "ns": np.full(es.shape, 100.0)}


# ----------------------------------------------------------------------------------------------------
# Student t


@pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 7, 10, 29, 30, 100, 1000])
def test_t_quantile_matches_scipy(df: int) -> None:
    for p in (0.975, 0.95, 0.995, 0.6, 0.025):
        assert t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-9, abs=1e-9)


def test_t_quantile_textbook_values() -> None:
    assert t_quantile(0.975, 1) == pytest.approx(12.7062, abs=1e-4)
    assert t_quantile(0.975, 2) == pytest.approx(4.3027, abs=1e-4)
    assert t_quantile(0.975, 10) == pytest.approx(2.2281, abs=1e-4)
    assert t_quantile(0.5, 3) == pytest.approx(0.0, abs=1e-10)


def test_betainc_and_t_cdf_match_scipy() -> None:
    for a, b, x in ((0.5, 0.5, 0.3), (2.0, 3.0, 0.9), (10.0, 0.5, 0.99), (1.0, 1.0, 0.42), (50.0, 50.0, 0.5)):
        assert betainc(a, b, x) == pytest.approx(special.betainc(a, b, x), rel=1e-10)
    for t in (-3.0, -0.5, 0.0, 1.2, 8.0):
        assert t_cdf(t, 4) == pytest.approx(stats.t.cdf(t, 4), rel=1e-10)
    with pytest.raises(ValueError):
        t_quantile(1.0, 3)


# ----------------------------------------------------------------------------------------------------
# A cell's repeats


def test_mean_ci_by_hand() -> None:
    """[1, 2, 3]: mean 2, s = 1, half-width t(0.975, 2) / √3 = 4.302653 / 1.732051 = 2.484138."""
    ci = mean_ci([1.0, 2.0, 3.0])
    assert (ci.mean, ci.n) == (2.0, 3)
    assert ci.half_width == pytest.approx(2.484138, abs=1e-6)
    assert (ci.low, ci.high) == pytest.approx((2.0 - 2.484138, 2.0 + 2.484138), abs=1e-6)
    assert ci.text() == "2.00 ± 2.48 (95% CI, n=3)"


def test_mean_ci_matches_scipy() -> None:
    x = np.array([71.2, 74.9, 69.3, 77.0, 72.5])
    ci = mean_ci(x)
    low, high = stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
    assert (ci.low, ci.high) == pytest.approx((low, high), rel=1e-9)
    ci90 = mean_ci(x, level=0.9)
    assert (ci90.low, ci90.high) == pytest.approx(stats.t.interval(0.9, 4, loc=x.mean(), scale=stats.sem(x)))


def test_one_repeat_has_no_interval() -> None:
    ci = mean_ci([76.2, float("nan")])  # a missing value is left out
    assert ci == MeanCI(76.2, 1, None, None)
    assert ci.half_width is None
    assert ci.text() == "76.20 (n=1: one repeat, no interval)"
    with pytest.raises(ValueError, match="no finite values"):
        mean_ci([float("nan")])


def test_equal_repeats_have_a_zero_width_interval() -> None:
    ci = mean_ci([50.0, 50.0, 50.0])
    assert (ci.low, ci.high) == (50.0, 50.0)


# ----------------------------------------------------------------------------------------------------
# Sign test


def test_sign_test_by_hand() -> None:
    assert sign_test(9, 1) == 22 / 1024  # 2 · (C(10,0) + C(10,1)) / 2¹⁰
    assert sign_test(1, 9) == 22 / 1024
    assert sign_test(10, 0) == 2 / 1024
    assert sign_test(3, 0) == 0.25  # 2 / 8
    assert sign_test(5, 5) == 1.0
    assert sign_test(0, 0) == 1.0
    with pytest.raises(ValueError):
        sign_test(-1, 2)


@pytest.mark.parametrize(("wins", "losses"), [(9, 1), (7, 3), (15, 4), (0, 6), (30, 12), (4, 5)])
def test_sign_test_matches_scipy(wins: int, losses: int) -> None:
    assert sign_test(wins, losses) == pytest.approx(stats.binomtest(wins, wins + losses, 0.5).pvalue, rel=1e-12)


def test_sign_test_scores_drops_ties_and_averages_repeats() -> None:
    t = sign_test_scores([100, 100, 100, 0, 50], [0, 0, 100, 100, 50])
    assert t == SignTest(wins=2, losses=1, ties=2, p=1.0)
    # fact "a" wins in one repeat and ties in the other: a win once averaged; "b" loses then wins: a tie
    t = sign_test_scores([100, 100, 0, 100], [0, 100, 100, 0], groups=["a", "a", "b", "b"])
    assert (t.wins, t.losses, t.ties) == (1, 0, 1)


# ----------------------------------------------------------------------------------------------------
# Paired bootstrap


def test_identical_methods_differ_by_nothing() -> None:
    rng = np.random.default_rng(3)
    a = {m: rng.uniform(0, 100, 50) for m in ("es", "ps", "ns")}
    out = paired_bootstrap(a, a, n_boot=500)
    assert list(out) == list(PAIRED_METRICS)
    for d in out.values():
        assert (d.diff, d.low, d.high, d.p) == (0.0, 0.0, 0.0, 1.0)
        assert not d.excludes_zero


def test_a_constant_shift_is_its_own_interval() -> None:
    """A scores 10 points more ES on every fact: every resample's difference is 10, and the p is the
    smallest the bootstrap gives, 2 / (n_boot + 1)."""
    rng = np.random.default_rng(4)
    b = _same(rng.uniform(0, 80, 30))
    a = _same(b["es"] + 10)
    d = paired_bootstrap(a, b, ["es"], n_boot=999)["es"]
    assert d.diff == pytest.approx(10.0)
    assert (d.low, d.high) == pytest.approx((10.0, 10.0))
    assert d.p == pytest.approx(2 / 1000)
    assert d.excludes_zero and d.n_facts == 30 and d.n_rows == 30


def test_s_is_the_harmonic_mean_of_the_means() -> None:
    """A: ES (100, 0), PS (100, 100), NS (50, 50): means 50, 100, 50, S = 3 / (1/50 + 1/100 + 1/50) = 60
    (the mean of per-fact harmonic means would be (75 + 0) / 2 = 37.5); B has ES 0 everywhere: S = 0."""
    a = {"es": [100.0, 0.0], "ps": [100.0, 100.0], "ns": [50.0, 50.0]}
    b = {"es": [0.0, 0.0], "ps": [100.0, 100.0], "ns": [50.0, 50.0]}
    out = paired_bootstrap(a, b, n_boot=200)
    assert out["s"].diff == pytest.approx(60.0)
    assert out["es"].diff == pytest.approx(50.0)
    assert out["ps"].diff == 0.0 and out["ns"].diff == 0.0
    # the resamples: both facts drawn (S 60), the first twice (ES 100: S 3/(1/100+1/100+1/50) = 75), the
    # second twice (ES 0: S 0); the interval spans them
    assert out["s"].low == pytest.approx(0.0) and out["s"].high == pytest.approx(75.0)


def test_interval_of_a_mean_difference_is_the_normal_one() -> None:
    """400 facts, per-fact differences ~ N(2, 10²): the percentile interval is close to the normal-theory
    mean ± 1.96 · sd / √n."""
    rng = np.random.default_rng(5)
    b = rng.uniform(20, 80, 400)
    a = b + rng.normal(2.0, 10.0, 400)
    d = paired_bootstrap(_same(a), _same(b), ["es"])["es"]
    diff = a - b
    half = 1.96 * diff.std(ddof=1) / math.sqrt(len(diff))
    assert d.diff == pytest.approx(diff.mean())
    assert d.low == pytest.approx(diff.mean() - half, abs=0.15)
    assert d.high == pytest.approx(diff.mean() + half, abs=0.15)
    assert d.p < 0.01  # the mean difference is ~4 standard errors from 0


def test_fixed_seed_and_symmetry() -> None:
    rng = np.random.default_rng(6)
    a, b = _same(rng.uniform(0, 100, 40)), _same(rng.uniform(0, 100, 40))
    one, two = paired_bootstrap(a, b), paired_bootstrap(a, b)
    assert one == two
    other = paired_bootstrap(a, b, seed=1)
    assert other["es"].diff == one["es"].diff and other["es"].low != one["es"].low
    flipped = paired_bootstrap(b, a)["es"]
    assert flipped.diff == pytest.approx(-one["es"].diff)
    assert (flipped.low, flipped.high) == pytest.approx((-one["es"].high, -one["es"].low))
    assert flipped.p == pytest.approx(one["es"].p)


def test_repeats_of_a_fact_are_drawn_together() -> None:
    """Each fact's two repeats scoring the same: the same draws of facts (zero-padded ids sort as the
    facts' order) give exactly the one-repeat result; drawing rows instead would narrow the interval."""
    rng = np.random.default_rng(7)
    a, b = _same(rng.uniform(0, 100, 25)), _same(rng.uniform(0, 100, 25))
    single = paired_bootstrap(a, b)
    twice = {m: np.repeat(v, 2) for m, v in a.items()}, {m: np.repeat(v, 2) for m, v in b.items()}
    groups = np.repeat([f"{i:03d}" for i in range(25)], 2)
    grouped = paired_bootstrap(*twice, groups=groups)
    for m in PAIRED_METRICS:
        assert grouped[m].diff == pytest.approx(single[m].diff)
        assert (grouped[m].low, grouped[m].high) == pytest.approx((single[m].low, single[m].high))
        assert grouped[m].n_facts == 25 and grouped[m].n_rows == 50
    rows = paired_bootstrap(*twice)["es"]
    assert rows.high - rows.low < grouped["es"].high - grouped["es"].low


def test_bootstrap_refuses_unpaired_or_missing_scores() -> None:
    with pytest.raises(ValueError, match="not paired"):
        paired_bootstrap(_same([1.0, 2.0]), _same([1.0]))
    with pytest.raises(ValueError, match="missing"):
        paired_bootstrap(_same([1.0, float("nan")]), _same([1.0, 2.0]))
    with pytest.raises(ValueError, match="lacks ps"):
        paired_bootstrap({"es": [1.0], "ns": [1.0]}, _same([1.0]))
    with pytest.raises(ValueError, match="metrics"):
        paired_bootstrap(_same([1.0]), _same([1.0]), ["em"])


# ----------------------------------------------------------------------------------------------------
# In words


def _diff(diff: float, low: float, high: float, p: float = 0.01, n: int = 10) -> PairedDiff:
    return PairedDiff("es", diff, low, high, p, n, n, 2000, 0)


def test_nine_wins_one_loss_is_beyond_noise() -> None:
    """10 facts, A's ES 100 and B's 0 on 9 of them, the reverse on one: +80 points, sign test p = 22/1024;
    the bootstrap's resamples stay above 0 unless the lost fact is drawn 5 times of 10 (P ≈ 0.0016)."""
    a, b = _same([100.0] * 9 + [0.0]), _same([0.0] * 9 + [100.0])
    d = paired_bootstrap(a, b, ["es"])["es"]
    sign = sign_test_scores(a["es"], b["es"])
    assert (sign.wins, sign.losses, sign.p) == (9, 1, 22 / 1024)
    assert d.diff == pytest.approx(80.0) and d.low > 0
    text = compare_in_words("memit", "emmet", "final ES", d, sign)
    assert text.startswith("memit > emmet on final ES beyond noise (+80.00 points, paired bootstrap 95% CI [")
    assert "sign test 9 wins, 1 loss, 0 ties, p=0.0215; 10 facts)" in text
    # the same facts the other way round: emmet is named first, with the difference it wins by
    text = compare_in_words(
        "emmet", "memit", "final ES", paired_bootstrap(b, a, ["es"])["es"], sign_test_scores(b["es"], a["es"])
    )
    assert text.startswith("memit > emmet on final ES beyond noise (+80.00 points")


def test_within_noise() -> None:
    a, b = _same([100.0] * 6 + [0.0] * 4), _same([0.0] * 6 + [100.0] * 4)
    d = paired_bootstrap(a, b, ["es"])["es"]
    sign = sign_test_scores(a["es"], b["es"])
    assert sign.p == pytest.approx(stats.binomtest(6, 10).pvalue)
    assert d.low < 0 < d.high and not beyond_noise(d, sign)
    text = compare_in_words("memit", "emmet", "final ES", d, sign)
    assert text.startswith("memit vs emmet on final ES: within noise (+20.00 points, paired bootstrap 95% CI [")
    assert "does not agree" not in text


def test_tests_that_disagree_are_within_noise() -> None:
    """A far ahead on 3 facts and a point behind on 3: the bootstrap's interval excludes 0 (a resample with
    none of the 3 has probability 1/64 < 2.5%), the sign test (3 wins, 3 losses) does not."""
    b = np.array([40.0, 40.0, 40.0, 50.0, 50.0, 50.0])
    a = b + np.array([50.0, 50.0, 50.0, -1.0, -1.0, -1.0])
    d = paired_bootstrap(_same(a), _same(b), ["es"])["es"]
    sign = sign_test_scores(a, b)
    assert d.excludes_zero and sign.p == 1.0
    assert not beyond_noise(d, sign) and beyond_noise(d)
    text = compare_in_words("memit", "emmet", "final ES", d, sign)
    assert "within noise" in text and "the bootstrap interval excludes 0 but the sign test does not agree" in text


def test_words_without_a_sign_test() -> None:
    text = compare_in_words("a", "b", "final S", _diff(-3.0, -5.0, -1.0, p=0.004, n=200))
    assert (
        text == "b > a on final S beyond noise (+3.00 points, paired bootstrap 95% CI [1.00, 5.00], p=0.004; 200 facts)"
    )
    assert compare_in_words("a", "b", "final S", _diff(1.0, -0.5, 2.5, p=0.3)).startswith("a vs b on final S: within")
