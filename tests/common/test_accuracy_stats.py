"""The accuracy interval and the paired test of archc.common.accuracy_stats, against scipy and
hand-computed cases."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats

from archc.common.accuracy_stats import (
    accuracy_with_interval,
    binomial_half_tail,
    compare_paired,
    mcnemar_exact,
    wilson_interval,
)


@pytest.mark.parametrize("correct, n", [(358, 360), (360, 360), (0, 360), (177, 360), (1, 1),
                                        (0, 1), (7, 10), (49_950, 50_000)])
def test_wilson_interval_matches_scipy(correct, n):
    expected = stats.binomtest(correct, n).proportion_ci(0.95, method="wilson")
    assert wilson_interval(correct, n) == pytest.approx((expected.low, expected.high), abs=1e-12)


def test_wilson_interval_by_hand():
    # 358 of 360: p = 0.99444, z^2 = 3.8415; centre (p + z^2/720) / (1 + z^2/360) = 0.98922,
    # half-width 1.95996 sqrt(p q / 360 + z^2 / 518400) / (1 + z^2/360) = 0.00925
    low, high = wilson_interval(358, 360)
    assert (low, high) == pytest.approx((0.98922 - 0.00925, 0.98922 + 0.00925), abs=1e-5)
    # k = n: the interval still has width (the Wald interval would be the point 1)
    assert wilson_interval(360, 360)[0] == pytest.approx(1 / (1 + 1.959963984540054 ** 2 / 360))


@pytest.mark.parametrize("correct, n", [(-1, 10), (11, 10), (0, 0)])
def test_wilson_interval_refuses_impossible_counts(correct, n):
    with pytest.raises(ValueError, match="0 <= correct <= n"):
        wilson_interval(correct, n)


@given(n=st.integers(1, 5000), data=st.data())
def test_wilson_interval_is_inside_0_1_and_holds_the_estimate(n, data):
    correct = data.draw(st.integers(0, n))
    low, high = wilson_interval(correct, n)
    assert 0 <= low <= correct / n <= high <= 1
    assert low < high
    # symmetric: the interval of the wrong ones mirrors the interval of the right ones
    mirror = wilson_interval(n - correct, n)
    assert (1 - mirror[1], 1 - mirror[0]) == pytest.approx((low, high), abs=1e-12)


@pytest.mark.parametrize("only_a, only_b", [(0, 0), (1, 0), (0, 6), (2, 6), (3, 3), (10, 30),
                                            (0, 5), (600, 700), (5_000, 5_200)])
def test_mcnemar_exact_matches_scipy_binomtest(only_a, only_b):
    n = only_a + only_b
    expected = 1.0 if n == 0 else stats.binomtest(only_a, n, 0.5).pvalue
    assert mcnemar_exact(only_a, only_b) == pytest.approx(expected, rel=1e-9)


def test_mcnemar_exact_by_hand():
    # 0 against 5 discordant examples: 2 * (1/2)^5 = 0.0625, not below 0.05
    assert mcnemar_exact(0, 5) == pytest.approx(0.0625)
    # 0 against 6: 2 / 64 = 0.03125
    assert mcnemar_exact(6, 0) == pytest.approx(0.03125)
    # 2 against 6: 2 * (1 + 8 + 28) / 256
    assert mcnemar_exact(2, 6) == pytest.approx(74 / 256)
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(4, 4) == 1.0


def test_mcnemar_exact_refuses_negative_counts():
    with pytest.raises(ValueError, match=">= 0"):
        mcnemar_exact(-1, 3)


@given(st.integers(0, 400), st.integers(0, 400))
def test_mcnemar_is_a_symmetric_probability(only_a, only_b):
    p = mcnemar_exact(only_a, only_b)
    assert 0 < p <= 1
    assert p == mcnemar_exact(only_b, only_a)
    # one more example on the side that already leads makes the difference no less significant
    if only_a >= only_b:
        assert mcnemar_exact(only_a + 1, only_b) <= p + 1e-12


@given(st.integers(0, 300), st.data())
def test_binomial_half_tail_is_a_cdf(n, data):
    k = data.draw(st.integers(-1, n + 1))
    value = binomial_half_tail(k, n)
    expected = sum(math.comb(n, i) for i in range(0, min(k, n) + 1)) / 2 ** n if k >= 0 else 0
    assert value == pytest.approx(expected, rel=1e-9, abs=1e-300)


def test_compare_paired_counts_the_discordant_examples():
    a = [True, True, True, False, False, True]
    b = [True, False, False, True, False, True]
    paired = compare_paired(a, b)
    assert (paired.n, paired.correct_a, paired.correct_b) == (6, 4, 3)
    assert (paired.only_a, paired.only_b) == (2, 1)
    assert paired.p_value == pytest.approx(1.0) and not paired.different
    assert paired.verdict() == "no detectable difference at n = 6 (p = 1)"
    assert paired.document()["test"] == "exact McNemar"
    assert paired.difference() == "-16.67 (1:2, p = 1)"


def test_compare_paired_calls_a_clear_difference_one():
    a = [True] * 40
    b = [True] * 30 + [False] * 10  # ten images only A gets right: p = 2 / 1024
    paired = compare_paired(a, b)
    assert paired.different and paired.p_value == pytest.approx(2 / 1024)
    assert paired.verdict("fp32", "int8") == "fp32 better (p = 0.002)"


@pytest.mark.parametrize("a, b", [([True], [True, False]), ([], [])])
def test_compare_paired_refuses_vectors_that_do_not_pair(a, b):
    with pytest.raises(ValueError, match="one length"):
        compare_paired(a, b)


def test_accuracy_with_interval_text():
    assert accuracy_with_interval(358, 360) == "99.44% [98.0, 99.8] (358/360)"
    assert accuracy_with_interval(360, 360, counts=False) == "100.00% [98.9, 100.0]"
