"""Random primitives of design spaces: pycls' samplers over a closed range [l, h] quantized by q.

Every primitive draws arrays from a numpy `Generator` (PCG64, a versioned bit stream) and yields
values of q's type (integers when q is an integer). U(a, b) is uniform on [a, b):

- `uniform(l, h, q)`: f ~ U(l, h + q), value floor(f / q) q. Each of the (h - l) / q + 1 multiples
  of q in [l, h] has probability q / (h - l + q).
- `log_uniform(l, h, q)`: with q* = min(q, l / 2), ln f ~ U(ln(l - q*), ln h) (pycls draws
  f = exp(-U(-ln h, -ln(l - q*))), which puts f in (l - q*, h]); value ceil(f / q) q. With
  Z = ln(h / (l - q*)): P(l) = ln(l / (l - q*)) / Z and P(v) = ln(v / (v - q)) / Z for the other
  multiples v of q in (l, h].
- `power2(l, h, q)` (pycls `power2_uniform`): 2^floor(U(log2 l, log2 h + 1)), floored to a multiple
  of q: each of the n = log2(h / l) + 1 powers of 2 in [l, h] has probability 1 / n.
- `power2_or_log_uniform(l, h, q)`: p = power2(l, h, l); a p >= q is replaced by
  log_uniform(max(l, q), h, min(h, q)). Each power of 2 below q keeps probability 1 / n, the rest
  is log-uniform over (q / 2, h], so the CDF is log-linear over the whole range.
- `choice(values)`: each value with probability 1 / len(values).

`law(...)` gives the exact probability of every value (the formulas above); `non_decreasing` draws
a sequence of i.i.d. values conditioned on never decreasing, exactly, by the backward recursion
B_S(v) = 1, B_s(v) = sum_{u >= v} p(u) B_{s+1}(u), then x_1 ~ p B_2 and x_s ~ p B_{s+1}
restricted to values >= x_{s-1}: the law of i.i.d. sequences with the decreasing ones rejected,
without discarding 23 of every 24 four-stage draws.

Quantization is exact decimal arithmetic, as pycls' `Decimal(k) * Decimal(str(q))`: with
q = m * 10^-e, a value is the integer k * m divided by 10^e (both exact in float64, and IEEE
division rounds correctly), so 244 steps of 0.1 give 24.4, not 24.400000000000002. Given the
same numpy version the draws are identical on every machine; exp and log come from numpy's own
SIMD code or the platform's libm, whose last-bit differences could move a value lying exactly on a
quantization boundary.
"""

from __future__ import annotations

import math
from decimal import Decimal

import numpy as np

Number = int | float


def _decimal_parts(quantum: Number) -> tuple[int, int]:
    """(m, e) with quantum = m * 10^-e exactly in decimal."""
    sign, digits, exponent = Decimal(str(quantum)).normalize().as_tuple()
    mantissa = int("".join(map(str, digits)))
    return (mantissa * 10**exponent, 0) if exponent >= 0 else (mantissa, -exponent)


def quantized(steps: np.ndarray, quantum: Number) -> np.ndarray:
    """`steps` (whole numbers) times `quantum`, exactly, as int64 or float64."""
    steps = steps.astype(np.int64)
    if isinstance(quantum, int):
        return steps * quantum
    mantissa, exponent = _decimal_parts(quantum)
    return (steps * mantissa).astype(np.float64) / 10.0**exponent


def uniform(rng: np.random.Generator, low: Number, high: Number, quantum: Number,
            size) -> np.ndarray:
    return quantized(np.floor(rng.uniform(low, high + quantum, size) / quantum), quantum)


def log_uniform(rng: np.random.Generator, low: Number, high: Number, quantum: Number,
                size) -> np.ndarray:
    below = low - min(quantum, low / 2)
    values = np.exp(-rng.uniform(-math.log(high), -math.log(below), size))
    return quantized(np.ceil(values / quantum), quantum)


def power2(rng: np.random.Generator, low: Number, high: Number, quantum: Number,
           size) -> np.ndarray:
    exponents = np.floor(rng.uniform(math.log2(low), math.log2(high) + 1, size))
    return quantized(np.floor(np.exp2(exponents) / quantum), quantum)


def power2_or_log_uniform(rng: np.random.Generator, low: Number, high: Number, quantum: Number,
                          size) -> np.ndarray:
    values = power2(rng, low, high, low, size).astype(type(quantum))
    replaced = values >= quantum
    if replaced.any():
        values[replaced] = log_uniform(rng, max(low, quantum), high, min(high, quantum),
                                       int(replaced.sum()))
    return values


DRAW = {
    "uniform": uniform,
    "log_uniform": log_uniform,
    "power2": power2,
    "power2_or_log_uniform": power2_or_log_uniform,
}


def _multiples(low: Number, high: Number, quantum: Number) -> np.ndarray:
    count = int(round((Decimal(str(high)) - Decimal(str(low))) / Decimal(str(quantum)))) + 1
    first = int(round(Decimal(str(low)) / Decimal(str(quantum))))
    return quantized(np.arange(first, first + count), quantum)


def _powers_of_two(low: Number, high: Number, kind: type) -> np.ndarray:
    exponents = np.arange(round(math.log2(low)), round(math.log2(high)) + 1)
    return np.exp2(exponents).astype(np.int64 if kind is int else np.float64)


def law(kind: str, low: Number, high: Number, quantum: Number) -> tuple[np.ndarray, np.ndarray]:
    """(values, probabilities) of a primitive: every value it can return, ascending."""
    if kind == "uniform":
        values = _multiples(low, high, quantum)
        return values, np.full(len(values), 1 / len(values))
    if kind == "log_uniform":
        values = _multiples(low, high, quantum)
        below = low - min(quantum, low / 2)
        lower = np.concatenate([[below], values[:-1]]).astype(np.float64)
        mass = np.log(values / lower)
        return values, mass / math.log(high / below)
    if kind == "power2":
        values = _powers_of_two(low, high, type(quantum))
        return values, np.full(len(values), 1 / len(values))
    if kind == "power2_or_log_uniform":
        powers = _powers_of_two(low, high, type(quantum))
        small = powers[powers < quantum]
        if len(small) == len(powers):
            return small, np.full(len(small), 1 / len(small))
        rest, rest_mass = law("log_uniform", max(low, quantum), high, min(high, quantum))
        values = np.concatenate([small.astype(rest.dtype), rest])
        masses = np.concatenate([np.full(len(small), 1 / len(powers)),
                                 rest_mass * (len(powers) - len(small)) / len(powers)])
        return values, masses
    raise ValueError(f"unknown distribution {kind!r}")


def non_decreasing(rng: np.random.Generator, probabilities: np.ndarray, batch: int,
                   length: int) -> np.ndarray:
    """(batch, length) indices into the law's values: i.i.d. draws conditioned on
    x_1 <= ... <= x_length (module docstring)."""
    weights = [np.asarray(probabilities, dtype=np.float64)]
    for _ in range(length - 1):  # weights[s] = p * B_{s+1}, built from the last stage back
        suffix = np.cumsum(weights[0][::-1])[::-1]
        weights.insert(0, probabilities * suffix)
    indices = np.zeros((batch, length), dtype=np.int64)
    floor = np.zeros(batch, dtype=np.int64)
    for stage in range(length):
        cumulative = np.concatenate([[0.0], np.cumsum(weights[stage])])
        start, total = cumulative[floor], cumulative[-1]
        targets = start + rng.uniform(0.0, 1.0, batch) * (total - start)
        chosen = np.searchsorted(cumulative, targets, side="right") - 1
        indices[:, stage] = floor = np.clip(chosen, floor, len(probabilities) - 1)
    return indices


def _is_power_of_two(value: Number) -> bool:
    return value > 0 and math.log2(value).is_integer()


def _is_multiple(value: Number, quantum: Number) -> bool:
    return Decimal(str(value)) % Decimal(str(quantum)) == 0


def range_problem(kind: str, low: Number, high: Number, quantum: Number) -> tuple[str, str] | None:
    """(field, why) if `kind(low, high, quantum)` breaks pycls' rules, else None."""
    if isinstance(quantum, int) and not (isinstance(low, int) and isinstance(high, int)):
        return "low", "an integer quantum needs integer low and high (the values are integers)"
    if not quantum > 0:
        return "quantum", f"quantum must be positive, got {quantum}"
    if low > high:
        return "high", f"high {high} is below low {low}"
    if kind != "uniform" and not low > 0:
        return "low", f"{kind} needs low > 0, got {low}"
    if kind in ("power2", "power2_or_log_uniform"):
        for field, value in (("low", low), ("high", high), ("quantum", quantum)):
            if not _is_power_of_two(value):
                return field, f"{kind} needs powers of 2, got {field} {value}"
        if kind == "power2" and quantum > low:
            return "quantum", f"quantum {quantum} exceeds low {low}: powers below it would vanish"
    else:
        for field, value in (("low", low), ("high", high)):
            if not _is_multiple(value, quantum):
                return field, f"{field} {value} is not a multiple of the quantum {quantum}"
    return None
