"""Statistics of sweeps (Radosavovic et al. 2019, "On Network Design Spaces for Visual
Recognition"; 2020, "Designing Network Design Spaces"). Pure numpy.

- Error EDF of n models with errors e_i and weights w_i (1/n each unless normalized):
  F(e) = sum_i w_i 1[e_i < e], the fraction of models with error below e. Plotted as the sorted
  errors against the running sum of their weights (as pycls).
- Complexity-normalized EDF (2019): spaces whose models differ in complexity are compared fairly
  by weighting each space's models so that its complexity distribution is uniform: the complexity
  range of all compared spaces is cut into k log-spaced bins, and each of the m_j models of a
  space in bin j gets weight 1 / (k' m_j), k' being the number of bins the space occupies (so the
  weights sum to 1).
- Empirical bootstrap of the best value of a parameter (2020, as pycls' `get_filters`): B times,
  draw max(1, floor(f n)) of the n (value, error) pairs with replacement (f = 25%) and keep the
  value of the pair with the lowest error; the 2.5, 50 and 97.5 percentiles of the B kept values
  (numpy's linear interpolation) are the 95% interval and the median of the best value. The same
  B resamples serve every parameter. pycls uses B = 2,500, the paper 10^4.
"""

from __future__ import annotations

import numpy as np

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


def normalized_weights(complexity: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Weights 1 / (k' m_j) making the complexity distribution uniform over the bins."""
    complexity = np.asarray(complexity, dtype=np.float64)
    bin_of = np.clip(np.searchsorted(edges, complexity, side="right") - 1, 0, len(edges) - 2)
    counts = np.bincount(bin_of, minlength=len(edges) - 1)
    occupied = int((counts > 0).sum())
    return 1.0 / (occupied * counts[bin_of])


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
