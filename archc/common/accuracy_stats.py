"""How sure an accuracy measured on n test examples is, and whether two models that were scored
on the same examples differ. Pure Python (math only), so every layer may use it.

- 95% interval of an accuracy k/n: the Wilson score interval (Wilson 1927),
  (p + z^2/2n -/+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n), z = 1.95996 (the 97.5% normal
  quantile). Closed form, so nothing beyond the standard library is needed, and its coverage stays
  close to 95% down to small n and at p near 0 or 1 (Brown, Cai and DasGupta 2001 recommend it
  over the Wald interval, which collapses to a point at k = n, and over the exact Clopper-Pearson
  interval, which is conservative, i.e. wider than it needs to be). Accuracies of 99% on a few
  hundred images sit exactly where this matters.
- Two models scored on the same n examples: the exact McNemar test (McNemar 1947) on their paired
  correctness. Only the discordant examples tell them apart: b = right by A and wrong by B,
  c = wrong by A and right by B. Under H0 (both models equally accurate on this distribution) each
  of the b + c discordant examples goes either way with probability 1/2, so the two-sided p-value
  is P(X <= min(b, c)) + P(X >= max(b, c)) for X ~ Binomial(b + c, 1/2), at most 1 (b = c: p = 1;
  b + c = 0: p = 1, nothing to tell them apart). The difference is called one only when p < 0.05;
  otherwise "no detectable difference at n": the data are consistent with equal accuracy, not
  proof of it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

Z95 = 1.959963984540054  # the 97.5% quantile of the standard normal distribution
LEVEL = 0.05  # a comparison is called a difference when its p-value is below this


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of the proportion correct / n, as fractions in [0, 1]
    (module docstring); `z` = 1.96 gives the 95% interval."""
    if n <= 0 or not 0 <= correct <= n:
        raise ValueError(f"need 0 <= correct <= n and n > 0, got {correct} of {n}")
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # at k = 0 (k = n) the lower (upper) end is exactly 0 (1); say so rather than round to it
    return (0.0 if correct == 0 else centre - half), (1.0 if correct == n else centre + half)


def binomial_half_tail(k: int, n: int) -> float:
    """P(X <= k) for X ~ Binomial(n, 1/2), summed in log space (exact to float rounding for any
    n)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2)
            for i in range(k + 1)]
    top = max(logs)
    return min(1.0, math.exp(top) * math.fsum(math.exp(v - top) for v in logs))


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts: `only_a` examples right by A
    only, `only_b` right by B only (module docstring)."""
    if only_a < 0 or only_b < 0:
        raise ValueError(f"discordant counts must be >= 0, got {only_a} and {only_b}")
    n = only_a + only_b
    if n == 0:
        return 1.0
    return min(1.0, 2 * binomial_half_tail(min(only_a, only_b), n))


@dataclass(frozen=True)
class PairedComparison:
    """Two models' correctness on the same n examples."""

    n: int
    correct_a: int
    correct_b: int
    only_a: int  # right by A, wrong by B
    only_b: int  # wrong by A, right by B

    @property
    def p_value(self) -> float:
        return mcnemar_exact(self.only_a, self.only_b)

    @property
    def different(self) -> bool:
        return self.p_value < LEVEL

    def verdict(self, name_a: str = "A", name_b: str = "B") -> str:
        """'B better (p = 0.012)' or 'no detectable difference at n = 360 (p = 0.62)'."""
        p = f"p = {self.p_value:.2g}"
        if not self.different:
            return f"no detectable difference at n = {self.n} ({p})"
        return f"{name_a if self.only_a > self.only_b else name_b} better ({p})"

    def difference(self) -> str:
        """'-0.56 (2:4, p = 0.69)': B's accuracy minus A's in points, then the images only B gets
        right : the images only A gets right, and the McNemar p-value; the tables' cell."""
        points = 100 * (self.correct_b - self.correct_a) / self.n
        return f"{points:+.2f} ({self.only_b}:{self.only_a}, p = {self.p_value:.2g})"

    def document(self) -> dict:
        return {"n": self.n, "correct_a": self.correct_a, "correct_b": self.correct_b,
                "only_a": self.only_a, "only_b": self.only_b, "test": "exact McNemar",
                "p_value": self.p_value, "different": self.different}


def compare_paired(right_a: Sequence[bool], right_b: Sequence[bool]) -> PairedComparison:
    """The paired comparison of two per-example correctness vectors of equal length."""
    if len(right_a) != len(right_b) or len(right_a) == 0:
        raise ValueError(f"need two non-empty correctness vectors of one length, got "
                         f"{len(right_a)} and {len(right_b)}")
    pairs = [(bool(a), bool(b)) for a, b in zip(right_a, right_b, strict=True)]
    return PairedComparison(
        n=len(pairs), correct_a=sum(a for a, _ in pairs), correct_b=sum(b for _, b in pairs),
        only_a=sum(a and not b for a, b in pairs), only_b=sum(b and not a for a, b in pairs))


def accuracy_with_interval(correct: int, n: int, counts: bool = True) -> str:
    """'99.44% [98.0, 99.8] (358/360)': the accuracy in percent, its 95% Wilson interval and
    (with `counts`) the counts, as the docs' tables print it."""
    low, high = wilson_interval(correct, n)
    text = f"{100 * correct / n:.2f}% [{100 * low:.1f}, {100 * high:.1f}]"
    return f"{text} ({correct}/{n})" if counts else text
