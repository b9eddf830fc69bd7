"""The samplers of design spaces match their definitions (archc.space.distributions): seeded
goodness-of-fit tests against the probabilities of the module docstring and against the
continuous laws they quantize, exact decimal quantization, and property tests of the ranges."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from archc.space import distributions

DRAWS = 40_000
P_MIN = 1e-3  # seeded draws, so each test is deterministic; a real mismatch gives p ~ 0

CASES = [
    ("uniform", 12, 28, 1),  # pycls DEPTH
    ("uniform", -0.5, 0.5, 0.1),
    ("log_uniform", 8, 256, 8),  # pycls W0
    ("log_uniform", 8.0, 256.0, 0.1),  # pycls WA
    ("log_uniform", 2.0, 3.0, 0.001),  # pycls WM
    ("log_uniform", 1, 16, 1),  # AnyNetX d_i
    ("power2", 1, 32, 1),  # AnyNetX g_i
    ("power2", 0.25, 8.0, 0.25),
    ("power2_or_log_uniform", 8, 128, 8),  # pycls GROUP_W
    ("power2_or_log_uniform", 1, 128, 4),
    ("power2_or_log_uniform", 0.25, 4.0, 4.0),
]


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(seed))


def chi_square_p(observed: np.ndarray, values: np.ndarray, probabilities: np.ndarray) -> float:
    """p-value of observed draws against a discrete law, rare values pooled (expected >= 5)."""
    index = {value: i for i, value in enumerate(values.tolist())}
    counts = np.bincount([index[v] for v in observed.tolist()], minlength=len(values))
    expected = probabilities * len(observed)
    order = np.argsort(expected)
    pooled_obs, pooled_exp, acc_o, acc_e = [], [], 0, 0.0
    for i in order:
        acc_o, acc_e = acc_o + counts[i], acc_e + expected[i]
        if acc_e >= 5:
            pooled_obs.append(acc_o)
            pooled_exp.append(acc_e)
            acc_o, acc_e = 0, 0.0
    if acc_e > 0:
        pooled_obs[-1] += acc_o
        pooled_exp[-1] += acc_e
    return stats.chisquare(pooled_obs, pooled_exp).pvalue


@pytest.mark.parametrize("kind, low, high, quantum", CASES)
def test_draws_follow_the_stated_probabilities(kind, low, high, quantum):
    values, probabilities = distributions.law(kind, low, high, quantum)
    assert probabilities.sum() == pytest.approx(1.0, abs=1e-9)
    assert values[0] >= low and values[-1] <= high
    draws = distributions.DRAW[kind](rng(1), low, high, quantum, DRAWS)
    assert set(np.unique(draws).tolist()) <= set(values.tolist())
    assert chi_square_p(draws, values, probabilities) > P_MIN


def test_probabilities_match_independent_formulas():
    values, p = distributions.law("uniform", 12, 28, 1)
    assert values.tolist() == list(range(12, 29)) and np.allclose(p, 1 / 17)
    # log_uniform(8, 256, 8): ln f uniform on (ln 4, ln 256], ceiled to multiples of 8
    values, p = distributions.law("log_uniform", 8, 256, 8)
    assert values.tolist() == list(range(8, 257, 8))
    assert p[0] == pytest.approx(math.log(8 / 4) / math.log(256 / 4))
    assert p[1] == pytest.approx(math.log(16 / 8) / math.log(64))
    assert p[-1] == pytest.approx(math.log(256 / 248) / math.log(64))
    values, p = distributions.law("power2", 1, 32, 1)
    assert values.tolist() == [1, 2, 4, 8, 16, 32] and np.allclose(p, 1 / 6)
    # power2_or_log_uniform(1, 128, 4): 1 and 2 keep 1/8 each, the rest log-uniform on (2, 128]
    values, p = distributions.law("power2_or_log_uniform", 1, 128, 4)
    assert values[:3].tolist() == [1, 2, 4] and np.allclose(p[:2], 1 / 8)
    assert p[2] == pytest.approx(6 / 8 * math.log(4 / 2) / math.log(128 / 2))


@pytest.mark.parametrize("kind, low, high", [("uniform", 3.0, 9.0), ("log_uniform", 8.0, 256.0)])
def test_fine_quanta_follow_the_continuous_law(kind, low, high):
    """With a tiny quantum the values follow U(l, h) or log-uniform on [l, h] (KS test)."""
    draws = distributions.DRAW[kind](rng(2), low, high, 1e-6, DRAWS)
    if kind == "uniform":
        p = stats.kstest(draws, stats.uniform(low, high - low).cdf).pvalue
    else:
        p = stats.kstest(np.log(draws), stats.uniform(np.log(low), np.log(high / low)).cdf).pvalue
    assert p > P_MIN


def test_quantization_is_exact_decimal():
    steps = np.array([244, 3, 1, 2481])
    assert distributions.quantized(steps, 0.1).tolist() == [24.4, 0.3, 0.1, 248.1]
    assert distributions.quantized(np.array([256]), 0.0078125).tolist() == [2.0]
    assert distributions.quantized(np.array([7]), 8).dtype == np.int64


def test_non_decreasing_is_the_conditioned_iid_law():
    """Sequences of power2(1, 4) over 3 stages, conditioned on x1 <= x2 <= x3: the recursion's
    draws against the exact conditional law by enumeration."""
    values, p = distributions.law("power2", 1, 4, 1)
    tuples = [t for t in itertools.product(range(len(values)), repeat=3) if list(t) == sorted(t)]
    weights = np.array([np.prod(p[list(t)]) for t in tuples])
    drawn = distributions.non_decreasing(rng(3), p, DRAWS, 3)
    assert (np.diff(drawn, axis=1) >= 0).all()
    observed = np.array([tuples.index(tuple(row)) for row in drawn.tolist()])
    assert chi_square_p(observed, np.arange(len(tuples)), weights / weights.sum()) > P_MIN


def test_non_decreasing_matches_rejection_of_a_skewed_law():
    """log_uniform(1, 16) depths over 4 stages (AnyNetX_E): the exact conditional joint law by
    enumeration, and each stage's marginal against i.i.d. draws with decreasing ones rejected
    (two-sample chi-square)."""
    values, p = distributions.law("log_uniform", 1, 16, 1)
    drawn = distributions.non_decreasing(rng(5), p, DRAWS, 4)
    tuples = list(itertools.combinations_with_replacement(range(len(values)), 4))
    weights = np.array([np.prod(p[list(t)]) for t in tuples])
    position = {t: i for i, t in enumerate(tuples)}
    observed = np.array([position[tuple(row)] for row in drawn.tolist()])
    assert chi_square_p(observed, np.arange(len(tuples)), weights / weights.sum()) > P_MIN
    iid = rng(4).choice(len(values), size=(400_000, 4), p=p)
    kept = iid[(np.diff(iid, axis=1) >= 0).all(axis=1)]
    for stage in range(4):
        table = np.array([np.bincount(drawn[:, stage], minlength=len(values)),
                          np.bincount(kept[:, stage], minlength=len(values))])
        table = table[:, table.min(axis=0) >= 5]  # categories both samples populate
        assert stats.chi2_contingency(table).pvalue > P_MIN


@st.composite
def valid_ranges(draw):
    kind = draw(st.sampled_from(["uniform", "log_uniform", "power2", "power2_or_log_uniform"]))
    if kind.startswith("power2"):
        low = 2 ** draw(st.integers(-3, 6))
        high = low * 2 ** draw(st.integers(0, 5))
        quantum = 2 ** draw(st.integers(-4, 8)) if kind != "power2" else low / 2 ** draw(
            st.integers(0, 3))
        if quantum >= 1 and low >= 1 and float(quantum).is_integer():
            low, high, quantum = int(low), int(high), int(quantum)
        return kind, low, high, quantum
    quantum = draw(st.sampled_from([1, 8, 0.1, 0.001, 0.25]))
    low_steps = draw(st.integers(1 if kind == "log_uniform" else -50, 500))
    high_steps = low_steps + draw(st.integers(0, 500))
    if isinstance(quantum, int):
        return kind, low_steps * quantum, high_steps * quantum, quantum
    low = float(distributions.quantized(np.array([low_steps]), quantum)[0])
    high = float(distributions.quantized(np.array([high_steps]), quantum)[0])
    return kind, low, high, quantum


@settings(max_examples=60, deadline=None)
@given(valid_ranges(), st.integers(0, 2**32 - 1))
def test_every_draw_lies_in_the_law(case, seed):
    kind, low, high, quantum = case
    if distributions.range_problem(kind, low, high, quantum) is not None:
        return
    values, probabilities = distributions.law(kind, low, high, quantum)
    draws = distributions.DRAW[kind](rng(seed), low, high, quantum, 200)
    assert draws.min() >= low and draws.max() <= high
    assert set(draws.tolist()) <= set(values.tolist())
    assert probabilities.sum() == pytest.approx(1.0, abs=1e-9)
    assert (probabilities >= 0).all()


@pytest.mark.parametrize("kind, low, high, quantum, field", [
    ("uniform", 5, 3, 1, "high"),
    ("log_uniform", 0, 8, 1, "low"),
    ("log_uniform", 12, 256, 8, "low"),
    ("power2", 3, 32, 1, "low"),
    ("power2", 1, 32, 2, "quantum"),
    ("uniform", 1.5, 3, 1, "low"),
    ("uniform", 1, 3, -1, "quantum"),
])
def test_invalid_ranges_are_named(kind, low, high, quantum, field):
    assert distributions.range_problem(kind, low, high, quantum)[0] == field
