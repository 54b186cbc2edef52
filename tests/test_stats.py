"""etokit.stats: the bootstrap intervals checked against computations that do not use it (exact
binomial quantiles, the normal approximation), and the paired comparison's panel checks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from etokit.stats import Interval, PanelMismatchError, mean_ci, paired_diff
from tests.factories import exact_quantile_count


# 10k resamples: the count of resample means at or below a value is Binomial(10_000, cdf), whose sd
# is at most ~18 near cdf 0.025 / 0.975; a margin of 0.009 (90 resamples, 5 sd) keeps the empirical
# 2.5% / 97.5% quantiles on the exact value whatever the seed.
MARGIN = 0.009


def two_point_cases():
    cases = []
    for n in (10, 20, 25, 40, 50, 80):
        for k in range(1, n):
            p = k / n
            (lo, m_lo), (hi, m_hi) = exact_quantile_count(n, p, 0.025), exact_quantile_count(n, p, 0.975)
            if min(m_lo, m_hi) > MARGIN:
                cases.append((n, k, lo, hi))
    return cases


TWO_POINT = two_point_cases()


def test_enough_two_point_cases_are_far_from_a_quantile_boundary():
    assert len(TWO_POINT) >= 20, TWO_POINT


def test_all_equal_values_give_a_zero_width_interval():
    for x in (0.0, 1 / 3, 0.7, 12.3456789, -4.0):
        for n in (1, 2, 7, 50, 1001):
            ci = mean_ci([x] * n)
            assert ci.lo == ci.mean == ci.hi and ci.n == n
            assert ci.mean == pytest.approx(x)


@pytest.mark.parametrize("n,k,lo,hi", TWO_POINT[::3])
@pytest.mark.parametrize("low,high", [(0.0, 1.0), (2.0, 7.5)])
def test_two_point_interval_is_the_exact_binomial_quantile(n, k, lo, hi, low, high):
    # k values `high`, n - k values `low`: a resample of size n holds X ~ Binomial(n, k/n) highs,
    # so its mean is low + (high - low) * X / n and the percentile bounds are its exact quantiles.
    values = [high] * k + [low] * (n - k)
    np.random.default_rng(n * 100 + k).shuffle(values)
    ci = mean_ci(values, seed=k)
    assert ci.mean == pytest.approx(low + (high - low) * k / n)
    assert ci.lo == pytest.approx(low + (high - low) * lo / n, abs=1e-9)
    assert ci.hi == pytest.approx(low + (high - low) * hi / n, abs=1e-9)


def test_large_n_interval_matches_the_normal_approximation():
    # A symmetric population (no skew correction at n=4000): the bootstrap percentile bounds are
    # mean +- 1.96 * sd / sqrt(n) up to the Monte-Carlo error of a 2.5% quantile from 10k
    # resamples (~0.03 standard errors); the tolerance is 0.1 standard errors.
    values = np.random.default_rng(7).uniform(0, 100, size=4000)
    se = values.std() / math.sqrt(len(values))  # the bootstrap's plug-in (ddof=0) sd
    ci = mean_ci(values)
    assert ci.mean == pytest.approx(values.mean())
    assert ci.lo == pytest.approx(values.mean() - 1.959964 * se, abs=0.1 * se)
    assert ci.hi == pytest.approx(values.mean() + 1.959964 * se, abs=0.1 * se)
    # 99% is wider, by the ratio of the normal quantiles
    ci99 = mean_ci(values, confidence=0.99)
    assert (ci99.hi - ci99.lo) / (ci.hi - ci.lo) == pytest.approx(2.575829 / 1.959964, rel=0.06)


def test_deterministic_given_the_seed():
    values = np.random.default_rng(1).random(37)
    assert mean_ci(values, seed=3) == mean_ci(values, seed=3)
    assert mean_ci(values, seed=3) != mean_ci(values, seed=4)


def test_bad_input_is_refused_with_its_position():
    with pytest.raises(ValueError, match="no values"):
        mean_ci([])
    with pytest.raises(ValueError, match="value 2 is nan"):
        mean_ci([1.0, 2.0, float("nan")])
    with pytest.raises(ValueError, match="confidence"):
        mean_ci([1.0], confidence=95)


def test_interval_format_and_dict():
    ci = Interval(mean=0.125, lo=0.081, hi=0.17, n=40)
    assert ci.scaled(100).format() == "12.5 [8.1, 17.0]"
    assert str(ci.scaled(100)) == "12.5 [8.1, 17.0]"
    assert ci.to_dict() == {"mean": 0.125, "lo": 0.081, "hi": 0.17, "n": 40, "confidence": 0.95}
    assert Interval(2.0, -0.5, 4.0, 3).format(sign=True) == "+2.0 [-0.5, +4.0]"


# ---------------------------------------------------------------- paired difference


@pytest.mark.parametrize("n,k,lo,hi", TWO_POINT[1::4])
def test_paired_diff_resamples_tasks_not_models(n, k, lo, hi):
    # A's rewards spread widely over tasks; B gains exactly 1 on k tasks. The per-task difference
    # is two-point, so the paired-bootstrap bounds are exact binomial quantiles / n, however
    # spread A is (resampling A and B independently would give a far wider interval).
    rng = np.random.default_rng(n + k)
    tasks = [f"task-{i}" for i in range(n)]
    a = dict(zip(tasks, rng.uniform(0, 50, size=n)))
    gain = dict(zip(tasks, rng.permutation([1.0] * k + [0.0] * (n - k))))
    b = {t: a[t] + gain[t] for t in reversed(tasks)}  # order must not matter
    d = paired_diff(a, b, seed=k)
    assert d.diff.mean == pytest.approx(k / n)
    assert d.diff.lo == pytest.approx(lo / n, abs=1e-9)
    assert d.diff.hi == pytest.approx(hi / n, abs=1e-9)
    assert (d.up, d.down, d.same, d.n) == (k, 0, n - k, n)
    assert (d.mean, d.lo, d.hi) == (d.diff.mean, d.diff.lo, d.diff.hi)


def test_paired_diff_does_not_depend_on_the_order_of_the_tasks():
    rng = np.random.default_rng(5)
    a = {f"t{i}": float(x) for i, x in enumerate(rng.random(30))}
    b = {t: float(x) for t, x in zip(a, rng.random(30))}
    shuffled = dict(sorted(a.items(), key=lambda kv: kv[1]))
    assert paired_diff(a, b) == paired_diff(shuffled, b) == paired_diff(a, dict(reversed(b.items())))


def test_paired_diff_counts_and_sign():
    a = {"t1": 0.0, "t2": 1.0, "t3": 0.5, "t4": 0.2}
    b = {"t1": 1.0, "t2": 0.0, "t3": 0.5, "t4": 0.9}
    d = paired_diff(a, b)
    assert (d.up, d.down, d.same, d.n) == (2, 1, 1, 4)
    assert d.diff.mean == pytest.approx((1 - 1 + 0 + 0.7) / 4)
    assert d.diff.lo < d.diff.mean < d.diff.hi
    flipped = paired_diff(b, a)
    assert flipped.diff.mean == pytest.approx(-d.diff.mean)
    assert (flipped.up, flipped.down) == (1, 2)
    assert d.to_dict()["up"] == 2 and d.to_dict()["missing_in_a"] == []


def test_paired_diff_refuses_different_panels_naming_the_tasks():
    a = {"t1": 0.0, "t2": 1.0, "t3": 0.5}
    b = {"t1": 1.0, "t2": 0.0, "t9": 0.5}
    with pytest.raises(PanelMismatchError, match=r"1 task\(s\) only in bc: t3; 1 task\(s\) only in iter-1: t9"):
        paired_diff(a, b, names=("bc", "iter-1"))
    assert PanelMismatchError.exit_code == 2


def test_paired_diff_allowed_mismatch_uses_the_common_tasks_only():
    # B lacks most of A's tasks: the resample size is the number of common tasks (2), so the
    # difference, +1 on one task and 0 on the other, has bootstrap mean X/2 with X ~ Bin(2, 1/2):
    # exact quantiles 0 and 1 (P(X=0) = 0.25 > 0.025); resampling 10 (A's size) would give
    # Bin(10, 1/2) / 10 quantiles 0.2 / 0.8.
    a = {"t1": 0.0, "t2": 0.0} | {f"t{i}": 0.3 for i in range(3, 11)}
    b = {"t1": 1.0, "t2": 0.0, "t99": 0.0}
    d = paired_diff(a, b, allow_mismatch=True)
    assert (d.n, d.up, d.same) == (2, 1, 1)
    assert (d.diff.mean, d.diff.lo, d.diff.hi) == (0.5, 0.0, 1.0)
    assert d.missing_in_a == ("t99",) and d.missing_in_b == ("t10", "t3", "t4", "t5", "t6", "t7", "t8", "t9")
    with pytest.raises(PanelMismatchError, match="no task in common"):
        paired_diff({"x": 1.0}, {"y": 1.0}, allow_mismatch=True)
