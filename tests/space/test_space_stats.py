"""EDF, normalized EDF, the two-sample tests and bootstrap (archc.space.stats) against direct
numpy computations and scipy, property tests of the tests, and a simulation of the bootstrap
interval's coverage."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st

from archc.space.stats import (
    PERCENTILES,
    bin_index,
    bootstrap_best,
    common_bins,
    edf,
    ks_exact_p,
    ks_two_sample,
    log_bins,
    median_interval,
    normalized_weights,
    stratified_permutation_test,
    weighted_ks_statistic,
)


def rng(seed):
    return np.random.Generator(np.random.PCG64(seed))


def edf_at(errors, points, weights=None):
    """F(e) read off the EDF's steps: the cumulative weight of the errors below e."""
    x, cumulative = edf(errors, weights)
    below = np.searchsorted(x, points, side="left")
    return np.concatenate([[0.0], cumulative])[below]


def test_edf_is_the_fraction_below():
    errors = np.round(rng(0).uniform(20, 60, 300), 1)  # rounded: ties
    points = np.linspace(15, 65, 501)
    direct = np.array([(errors < e).mean() for e in points])
    assert np.allclose(edf_at(errors, points), direct)
    x, cumulative = edf(errors)
    assert (np.diff(x) >= 0).all() and cumulative[-1] == pytest.approx(1.0)
    assert np.allclose(cumulative, np.arange(1, 301) / 300)  # pycls: cumsum(ones(n) / n)


def test_weighted_edf_is_the_weight_below():
    errors = rng(1).uniform(0, 1, 50)
    weights = rng(2).uniform(0, 1, 50)
    weights /= weights.sum()
    points = rng(3).uniform(-0.1, 1.1, 200)
    direct = np.array([(weights * (errors < e)).sum() for e in points])
    assert np.allclose(edf_at(errors, points, weights), direct)


def test_normalized_weights_make_complexity_uniform():
    first = np.exp(rng(4).normal(np.log(4e8), 0.05, 400))  # concentrated complexities
    second = np.exp(rng(5).uniform(np.log(3e8), np.log(5e8), 150))
    edges = log_bins([first, second], 10)
    assert edges[0] == min(first.min(), second.min()) and edges[-1] == pytest.approx(
        max(first.max(), second.max()))
    assert np.allclose(np.diff(np.log(edges)), np.log(edges[-1] / edges[0]) / 10)
    for complexity in (first, second):
        weights = normalized_weights(complexity, edges)
        counts, _ = np.histogram(complexity, edges)  # numpy: [a, b) bins, the last [a, b]
        bin_of = np.digitize(complexity, edges[1:-1])
        direct = 1.0 / ((counts > 0).sum() * counts[bin_of])
        assert np.allclose(weights, direct)
        assert weights.sum() == pytest.approx(1.0)
        mass = np.bincount(bin_of, weights=weights, minlength=10)
        assert np.allclose(mass[counts > 0], 1 / (counts > 0).sum())


def test_normalized_weights_are_uniform_over_the_common_bins():
    """Three spaces over overlapping flops ranges: only the bins all three occupy count; in each,
    every space's weight is 1 / k_c, and models in the other bins get weight 0."""
    spaces = [np.exp(rng(11).uniform(np.log(1e8), np.log(4e8), 60)),
              np.exp(rng(12).uniform(np.log(2e8), np.log(8e8), 90)),
              np.exp(rng(13).normal(np.log(3e8), 0.3, 40))]
    edges = log_bins(spaces, 12)
    occupied = [np.histogram(c, edges)[0] > 0 for c in spaces]
    common = common_bins(spaces, edges)
    assert (common == (occupied[0] & occupied[1] & occupied[2])).all()
    assert 0 < common.sum() < 12  # some bins are not common: the test drops models
    for complexity in spaces:
        weights = normalized_weights(complexity, edges, common)
        bin_of = np.digitize(complexity, edges[1:-1])
        assert (weights[~common[bin_of]] == 0).all() and (~common[bin_of]).any()
        mass = np.bincount(bin_of, weights=weights, minlength=12)
        assert np.allclose(mass[common], 1 / common.sum()) and (mass[~common] == 0).all()
        assert weights.sum() == pytest.approx(1.0)
        counts = np.bincount(bin_of, minlength=12)
        kept = common[bin_of]
        assert np.allclose(weights[kept], 1 / (common.sum() * counts[bin_of[kept]]))
    assert (bin_index(spaces[0], edges) == np.digitize(spaces[0], edges[1:-1])).all()


def test_no_common_bin_drops_every_model():
    low, high = np.array([1e6, 1.1e6]), np.array([9e6, 1e7])
    edges = log_bins([low, high], 4)
    common = common_bins([low, high], edges)
    assert not common.any()
    assert (normalized_weights(low, edges, common) == 0).all()


@pytest.mark.parametrize("n, m, shift, decimals", [
    (1, 1, 0.0, None), (3, 3, 0.3, None), (5, 7, 0.5, None), (24, 24, 0.4, None),
    (30, 17, 0.0, None), (100, 120, 0.3, None), (24, 24, 0.2, 1), (60, 40, 0.3, 1)])
def test_ks_matches_scipy_exact(n, m, shift, decimals):
    """D and the exact p-value equal scipy's ks_2samp(method="exact"), ties included (errors
    rounded to one decimal: scipy, too, reads the tie-free formula at the D of the data)."""
    generator = rng(n * 1000 + m)
    a, b = generator.normal(0, 1, n), generator.normal(shift, 1, m)
    if decimals is not None:
        a, b = np.round(a, decimals), np.round(b, decimals)
    statistic, p = ks_two_sample(a, b)
    expected = scipy.stats.ks_2samp(a, b, method="exact")
    assert statistic == pytest.approx(expected.statistic, abs=1e-12)
    assert p == pytest.approx(expected.pvalue, rel=1e-9, abs=1e-15)


def test_ks_known_values():
    """Identical samples: D = 0, p = 1. Separated samples: D = 1, and only the two paths that
    take every step of one sample first reach it: p = 2 / C(n + m, n)."""
    sample = rng(14).uniform(0, 1, 20)
    assert ks_two_sample(sample, sample) == (0.0, 1.0)
    for n, m in ((5, 5), (10, 7), (24, 24)):
        statistic, p = ks_two_sample(np.arange(n), np.arange(m) + 100.0)
        assert statistic == 1.0 and p == pytest.approx(2 / math.comb(n + m, n), rel=1e-9)
    assert ks_exact_p(24, 24, 24 * 24) < 1e-13  # tiny, summed directly, not 1 - (1 - p)


samples = st.lists(st.integers(0, 30).map(float), min_size=1, max_size=25)


@settings(max_examples=60, deadline=None)
@given(samples, samples)
def test_ks_properties(a, b):
    """p in [0, 1], D in [0, 1], both symmetric in the two samples; D is a multiple of
    1 / (n m)."""
    statistic, p = ks_two_sample(np.array(a), np.array(b))
    assert 0.0 <= statistic <= 1.0 and 0.0 <= p <= 1.0
    assert ks_two_sample(np.array(b), np.array(a)) == pytest.approx((statistic, p), abs=1e-12)
    reach = statistic * len(a) * len(b)
    assert reach == pytest.approx(round(reach))


def test_weighted_ks_statistic_is_the_largest_gap():
    errors_a, errors_b = np.round(rng(15).uniform(0, 10, 30)), rng(16).uniform(0, 10, 20)
    weights_a, weights_b = rng(17).uniform(0, 1, 30), rng(18).uniform(0, 1, 20)
    weights_a, weights_b = weights_a / weights_a.sum(), weights_b / weights_b.sum()
    points = np.concatenate([errors_a, errors_b])
    direct = max(abs((weights_a * (errors_a <= x)).sum() - (weights_b * (errors_b <= x)).sum())
                 for x in points)
    assert weighted_ks_statistic(errors_a, weights_a, errors_b, weights_b) == pytest.approx(
        direct)


def test_one_stratum_permutation_p_is_the_ks_p():
    """Equal weights in one bin: the permutation distribution of D is the KS null, so p
    approaches the exact p-value (B = 20,000: standard error below 0.004)."""
    a, b = rng(19).normal(0, 1, 30), rng(20).normal(0.6, 1, 25)
    statistic, p = stratified_permutation_test(
        a, np.full(30, 1 / 30), np.zeros(30, int), b, np.full(25, 1 / 25), np.zeros(25, int),
        rng(21), 20_000)
    exact_statistic, exact_p = ks_two_sample(a, b)
    assert statistic == pytest.approx(exact_statistic) and 0.005 < exact_p < 0.5
    assert p == pytest.approx(exact_p, abs=0.015)


def test_the_permutations_stay_within_bins():
    """Errors depend on the bin alone (bin 0: 10-19, bin 1: 50-59), and the spaces fill the bins
    in opposite proportions: the plain EDFs differ greatly, the normalized ones not at all."""
    low, high = np.arange(10.0, 20.0), np.arange(50.0, 60.0)
    errors_a = np.concatenate([np.tile(low, 4), high])
    errors_b = np.concatenate([low, np.tile(high, 4)])
    bins_a = np.repeat([0, 1], [40, 10])
    bins_b = np.repeat([0, 1], [10, 40])
    weights_a = np.where(bins_a == 0, 1 / 80, 1 / 20)
    weights_b = np.where(bins_b == 0, 1 / 20, 1 / 80)
    assert ks_two_sample(errors_a, errors_b)[1] < 1e-6
    statistic, p = stratified_permutation_test(errors_a, weights_a, bins_a, errors_b, weights_b,
                                               bins_b, rng(22), 500)
    assert statistic == pytest.approx(0.0, abs=1e-12) and p == 1.0


def test_the_permutation_test_needs_the_same_bins():
    one = np.array([1.0, 2.0])
    with pytest.raises(ValueError, match="same bins"):
        stratified_permutation_test(one, np.full(2, 0.5), np.array([0, 1]), one,
                                    np.full(2, 0.5), np.array([0, 0]), rng(0), 10)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 20)), min_size=1, max_size=20),
       st.lists(st.tuples(st.integers(0, 2), st.integers(0, 20)), min_size=1, max_size=20),
       st.integers(0, 2**32 - 1))
def test_permutation_test_properties(first, second, seed):
    """On the bins both samples occupy: p in [1 / (B + 1), 1]; D the weighted KS statistic,
    the same with the samples swapped; a sample against itself: D = 0, p = 1."""
    def normalized(sample, common):
        kept = [(b, float(e)) for b, e in sample if b in common]
        bins = np.array([b for b, _ in kept])
        counts = np.bincount(bins, minlength=3)
        return (np.array([e for _, e in kept]), 1 / (len(common) * counts[bins]), bins)

    common = sorted({b for b, _ in first} & {b for b, _ in second})
    if not common:
        return
    a, b = normalized(first, common), normalized(second, common)
    statistic, p = stratified_permutation_test(*a, *b, rng(seed), 200)
    assert 1 / 201 <= p <= 1.0
    assert statistic == pytest.approx(weighted_ks_statistic(a[0], a[1], b[0], b[1]))
    swapped, _ = stratified_permutation_test(*b, *a, rng(seed), 200)
    assert swapped == pytest.approx(statistic, abs=1e-12)
    assert stratified_permutation_test(*a, *a, rng(seed), 50) == (pytest.approx(0.0), 1.0)


def test_bootstrap_matches_a_direct_loop():
    values = {"d": rng(6).integers(12, 29, 80).astype(float), "wm": rng(7).uniform(2, 3, 80)}
    errors = rng(8).uniform(30, 50, 80)
    result = bootstrap_best(values, errors, rng(9), fraction=0.25, resamples=3000)
    generator, best = rng(9), []
    for _ in range(3000):  # pycls get_filters: a 25% resample, the value at the lowest error
        draw = generator.integers(0, 80, 20)
        best.append(draw[np.argmin(errors[draw])])
    for name, column in values.items():
        assert result[name] == pytest.approx(tuple(np.percentile(column[best], PERCENTILES)))


def test_bootstrap_of_tiny_sweeps():
    result = bootstrap_best({"x": np.array([1.0, 2.0, 3.0])}, np.array([5.0, 1.0, 9.0]), rng(0),
                            fraction=0.25, resamples=500)
    low, median, high = result["x"]
    assert 1.0 <= low <= median <= high <= 3.0  # one model per resample: its value


def test_bootstrap_interval_coverage_by_simulation():
    """Sweeps of n = 100 models of a parameter x ~ U(0, 20) with error (x - 12)^2 / 10 + noise:
    the 95% interval of the best value covers the true best x* = 12 in >= 95% of 200 simulated
    sweeps, excludes a poor value (x = 4) in most, and its median lands near 12. It also covers
    the best value of fresh 25% subsets of the population in about 85% of them (measured here: the
    bootstrap with replacement under-represents that spread, so the interval is narrower than
    a 95% prediction interval; docs/design-spaces.md says so)."""
    generator = rng(10)
    covered, excluded, medians, predicted = 0, 0, [], []
    for _ in range(200):
        x = generator.uniform(0, 20, 100)
        errors = (x - 12) ** 2 / 10 + generator.normal(0, 1.0, 100)
        low, median, high = bootstrap_best({"x": x}, errors, generator, 0.25, 1000)["x"]
        covered += low <= 12 <= high
        excluded += not low <= 4 <= high
        medians.append(median)
        fresh = generator.uniform(0, 20, (400, 25))
        fresh_errors = (fresh - 12) ** 2 / 10 + generator.normal(0, 1.0, (400, 25))
        best = fresh[np.arange(400), fresh_errors.argmin(axis=1)]
        predicted.append(((low <= best) & (best <= high)).mean())
    assert covered / 200 >= 0.95
    assert excluded / 200 >= 0.9
    assert abs(np.median(medians) - 12) < 1.0
    assert 0.75 <= np.mean(predicted) <= 0.97


def test_median_interval_by_hand():
    # n = 24: P(X <= 6) = 0.0113 for X ~ Binomial(24, 1/2), P(X <= 7) = 0.0320 > 0.025
    low, high, coverage = median_interval(np.arange(24.0)[::-1])
    assert (low, high) == (6.0, 17.0)  # the 7th and 18th smallest
    assert coverage == pytest.approx(1 - 2 * scipy.stats.binom.cdf(6, 24, 0.5))
    assert median_interval(np.arange(5.0)) is None  # 1 - 2 / 32 < 95%: no interval
    assert median_interval(np.arange(6.0))[:2] == (0.0, 5.0)  # 1 - 2 / 64


@given(st.integers(6, 400))
def test_median_interval_is_the_narrowest_reaching_95(n):
    low, high, coverage = median_interval(np.arange(float(n)))
    j = int(low) + 1
    assert high == n - j and coverage >= 0.95
    assert coverage == pytest.approx(1 - 2 * scipy.stats.binom.cdf(j - 1, n, 0.5), abs=1e-9)
    if j + 1 <= n // 2:  # one order statistic further in would fall below 95%
        assert 1 - 2 * scipy.stats.binom.cdf(j, n, 0.5) < 0.95


def test_median_interval_covers_the_median_95_percent_of_the_time():
    """1,000 samples of 24 exponential errors: the true median ln 2 falls inside at least the
    nominal 97.7% of the time, up to sampling noise (3 standard errors)."""
    generator = rng(7)
    samples = generator.exponential(size=(1000, 24))
    inside = [low <= math.log(2) <= high for low, high, _ in map(median_interval, samples)]
    coverage = median_interval(samples[0])[2]
    assert np.mean(inside) >= coverage - 3 * math.sqrt(coverage * (1 - coverage) / 1000)
