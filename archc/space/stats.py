"""Statistics of sweeps (Radosavovic et al. 2019, "On Network Design Spaces for Visual
Recognition"; 2020, "Designing Network Design Spaces"). Pure numpy.

- Error EDF of n models with errors e_i and weights w_i (1/n each unless normalized):
  F(e) = sum_i w_i 1[e_i < e], the fraction of models with error below e. Plotted as the sorted
  errors against the running sum of their weights (as pycls).
- Complexity-normalized EDF (2019, its "normalized comparison"): spaces whose models differ
  in complexity are compared by reweighting each space's models so that all compared spaces have
  the same complexity distribution, uniform over the bins they share. The complexity range of all
  compared spaces is cut into k log-spaced bins; the common bins are those every space occupies,
  k_c of them. Each of the m_j models of a space in common bin j gets weight 1 / (k_c m_j), so
  every common bin holds 1 / k_c of each space's weight and each space's weights sum to 1; a
  model in a bin that is not common gets weight 0: it is dropped from the normalized EDF (with
  no common bin, the spaces cannot be compared this way). One space alone: its occupied bins.
- Two-sample Kolmogorov-Smirnov test of two EDFs: D = sup_x |F_a(x) - F_b(x)|. Unweighted, with
  n and m models, the exact p-value P(D >= d) under H0 (both samples i.i.d. from one continuous
  distribution): every interleaving of the two sorted samples is equally likely, one of
  C(n + m, n) monotone lattice paths from (0, 0) to (n, m) (step i + 1 for a model of the first
  sample, j + 1 for one of the second), and D = max over the path of |i m - j n| / (n m); the
  probability mass of the paths that reach |i m - j n| >= d n m is summed exactly by dynamic
  programming over the anti-diagonals i + j = s, a path at (i, j) stepping to (i + 1, j) with
  probability (n - i) / (n + m - i - j) (Hodges 1958; scipy's `ks_2samp(method="exact")`). With
  ties (errors rounded to 0.01) the test is conservative: p is at least the exact one.
- Normalized EDFs: D with the weights above, and its p-value by a stratified permutation test: under
  H0 (within each common bin the two spaces' errors are exchangeable), the pooled errors of each
  common bin are reassigned at random to the two spaces, keeping each space's count in the bin and
  so its weights; p = (1 + #{D_perm >= D}) / (1 + B) over B permutations (a valid p-value for
  any B; its resolution is 1 / (B + 1)).
- Empirical bootstrap of the best value of a parameter (2020, as pycls' `get_filters`): B times,
  draw max(1, floor(f n)) of the n (value, error) pairs with replacement (f = 25%) and keep the
  value of the pair with the lowest error; the 2.5, 50 and 97.5 percentiles of the B kept values
  (numpy's linear interpolation) are the 95% interval and the median of the best value. The same
  B resamples serve every parameter. pycls uses B = 2,500, the paper 10^4.
- Distribution-free 95% interval of a space's median error (the order-statistic interval): with
  the n errors sorted, x_(1) <= ... <= x_(n), the interval [x_(j), x_(n+1-j)] holds the median
  of the distribution the models were drawn from with probability 1 - 2 P(X <= j - 1),
  X ~ Binomial(n, 1/2), whatever that distribution; j is the largest with that probability at
  least 95% (n = 24: the 7th and 18th errors, 97.7%). No interval exists for n < 6.
"""

from __future__ import annotations

import numpy as np

from archc.common.accuracy_stats import binomial_half_tail

PERCENTILES = (2.5, 50.0, 97.5)


def edf(errors: np.ndarray, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(sorted errors, cumulative weight): the EDF's steps."""
    errors = np.asarray(errors, dtype=np.float64)
    weights = (np.full(len(errors), 1 / len(errors)) if weights is None
               else np.asarray(weights, dtype=np.float64))
    order = np.argsort(errors, kind="stable")
    return errors[order], np.cumsum(weights[order])


def log_bins(complexities: list[np.ndarray], bins: int) -> np.ndarray:
    """`bins` log-spaced bin edges over the range of all the given complexities."""
    values = np.concatenate([np.asarray(c, dtype=np.float64) for c in complexities])
    low, high = values.min(), values.max()
    if high <= low:
        high = low * (1 + 1e-9) + 1e-9
    return np.geomspace(low, high, bins + 1)


def bin_index(complexity: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """The bin of each complexity: j with edges[j] <= c < edges[j + 1], the last bin closed."""
    complexity = np.asarray(complexity, dtype=np.float64)
    return np.clip(np.searchsorted(edges, complexity, side="right") - 1, 0, len(edges) - 2)


def common_bins(complexities: list[np.ndarray], edges: np.ndarray) -> np.ndarray:
    """Whether each bin holds a model of every space (bool, one per bin)."""
    common = np.ones(len(edges) - 1, dtype=bool)
    for complexity in complexities:
        common &= np.bincount(bin_index(complexity, edges), minlength=len(edges) - 1) > 0
    return common


def normalized_weights(complexity: np.ndarray, edges: np.ndarray,
                       common: np.ndarray | None = None) -> np.ndarray:
    """Weights 1 / (k_c m_j) for the models in common bins, 0 for the others (module docstring);
    `common` None: every bin this space occupies."""
    bin_of = bin_index(complexity, edges)
    counts = np.bincount(bin_of, minlength=len(edges) - 1)
    common = counts > 0 if common is None else np.asarray(common, dtype=bool)
    kept = common[bin_of]
    weights = np.zeros(len(bin_of))
    weights[kept] = 1.0 / (int(common.sum()) * counts[bin_of[kept]])
    return weights


def _ks_rows(values: np.ndarray, signed_weights: np.ndarray) -> np.ndarray:
    """Per row of `values` (R, N): max_x |F_a(x) - F_b(x)|, where `signed_weights` (N,) are the
    first sample's weights and minus the second's: the running sum in sorted order, read after
    the last of each run of equal values."""
    order = np.argsort(values, axis=1, kind="stable")
    ordered = np.take_along_axis(values, order, axis=1)
    running = np.cumsum(signed_weights[order], axis=1)
    last_of_run = np.ones_like(ordered, dtype=bool)
    last_of_run[:, :-1] = ordered[:, :-1] != ordered[:, 1:]
    return np.where(last_of_run, np.abs(running), 0.0).max(axis=1)


def weighted_ks_statistic(errors_a: np.ndarray, weights_a: np.ndarray, errors_b: np.ndarray,
                          weights_b: np.ndarray) -> float:
    """D = sup_x |F_a(x) - F_b(x)| of two weighted EDFs (each sample's weights sum to 1)."""
    values = np.concatenate([errors_a, errors_b]).astype(np.float64)[None, :]
    signed = np.concatenate([np.asarray(weights_a, float), -np.asarray(weights_b, float)])
    return float(_ks_rows(values, signed)[0])


def ks_exact_p(n: int, m: int, reach: int) -> float:
    """P(max over the path of |i m - j n| >= reach) for a uniformly random lattice path from
    (0, 0) to (n, m) (module docstring): the exact two-sided p-value of D = reach / (n m)."""
    if reach <= 0:
        return 1.0
    i = np.arange(n + 1, dtype=np.int64)
    mass = np.zeros(n + 1)
    mass[0] = 1.0  # the path at (0, 0), inside since reach > 0
    left = 0.0  # mass of the paths that have reached |i m - j n| >= reach
    for s in range(1, n + m + 1):
        remaining = n + m - s + 1  # steps left from diagonal s - 1
        step_b = mass * np.maximum(m - (s - 1 - i), 0) / remaining  # (i, j) -> (i, j + 1)
        step_a = mass * (n - i) / remaining  # (i, j) -> (i + 1, j)
        mass = step_b
        mass[1:] += step_a[:-1]
        j = s - i
        outside = (j >= 0) & (j <= m) & (np.abs(i * m - j * n) >= reach)
        left += float(mass[outside].sum())
        mass[outside] = 0.0
    return min(1.0, left)


def ks_two_sample(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(D, exact p-value) of the two-sample Kolmogorov-Smirnov test (module docstring)."""
    a, b = np.sort(np.asarray(a, float)), np.sort(np.asarray(b, float))
    n, m = len(a), len(b)
    points = np.union1d(a, b)
    below_a = np.searchsorted(a, points, side="right").astype(np.int64)
    below_b = np.searchsorted(b, points, side="right").astype(np.int64)
    reach = int(np.abs(below_a * m - below_b * n).max())
    return reach / (n * m), ks_exact_p(n, m, reach)


def stratified_permutation_test(errors_a: np.ndarray, weights_a: np.ndarray, bins_a: np.ndarray,
                                errors_b: np.ndarray, weights_b: np.ndarray, bins_b: np.ndarray,
                                rng: np.random.Generator, permutations: int = 10_000,
                                chunk: int = 1_000) -> tuple[float, float]:
    """(D, p) of two weighted EDFs whose weights are constant per space within each bin (the
    normalized weights of the models kept): the stratified permutation test of the module
    docstring, B = `permutations`."""
    if not np.array_equal(np.unique(bins_a), np.unique(bins_b)):
        raise ValueError("the two samples must occupy the same bins (the common bins)")
    errors_a, errors_b = np.asarray(errors_a, float), np.asarray(errors_b, float)
    statistic = weighted_ks_statistic(errors_a, weights_a, errors_b, weights_b)
    strata = [(errors_a[bins_a == j], errors_b[bins_b == j]) for j in np.unique(bins_a)]
    counts_a = [len(a) for a, _ in strata]
    pooled = np.concatenate([np.concatenate([a, b]) for a, b in strata])
    bounds = np.cumsum([0] + [len(a) + len(b) for a, b in strata])
    slots_a = np.concatenate([np.arange(bounds[k], bounds[k] + counts_a[k])
                              for k in range(len(strata))])
    slots_b = np.setdiff1d(np.arange(len(pooled)), slots_a)
    signed = np.concatenate([np.concatenate([np.asarray(weights_a, float)[bins_a == j]
                                             for j in np.unique(bins_a)]),
                             -np.concatenate([np.asarray(weights_b, float)[bins_b == j]
                                              for j in np.unique(bins_a)])])
    at_least = 0
    for start in range(0, permutations, chunk):
        rows = np.tile(pooled, (min(chunk, permutations - start), 1))
        for k in range(len(strata)):
            rows[:, bounds[k]:bounds[k + 1]] = rng.permuted(rows[:, bounds[k]:bounds[k + 1]],
                                                            axis=1)
        values = np.concatenate([rows[:, slots_a], rows[:, slots_b]], axis=1)
        at_least += int((_ks_rows(values, signed) >= statistic - 1e-12).sum())
    return statistic, (1 + at_least) / (1 + permutations)


def bootstrap_best(values: dict[str, np.ndarray], errors: np.ndarray,
                   rng: np.random.Generator, fraction: float = 0.25,
                   resamples: int = 10_000) -> dict[str, tuple[float, float, float]]:
    """Per parameter: the (2.5%, median, 97.5%) of its best value over the resamples."""
    errors = np.asarray(errors, dtype=np.float64)
    n = len(errors)
    size = max(1, int(n * fraction))
    draws = rng.integers(0, n, size=(resamples, size))
    best = draws[np.arange(resamples), np.argmin(errors[draws], axis=1)]
    return {name: tuple(float(v) for v in np.percentile(np.asarray(column, float)[best],
                                                        PERCENTILES))
            for name, column in values.items()}


def median_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float, float] | None:
    """(low, high, coverage): the order-statistic interval of the median (module docstring), or
    None when n is too small for any interval to reach `level`."""
    ordered = np.sort(np.asarray(values, dtype=np.float64))
    n = len(ordered)
    best = None
    for j in range(1, n // 2 + 1):
        coverage = 1 - 2 * binomial_half_tail(j - 1, n)
        if coverage < level:
            break
        best = (float(ordered[j - 1]), float(ordered[n - j]), coverage)
    return best
