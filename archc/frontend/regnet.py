"""RegNet: the compact (d, w0, wa, wm, g, b) parameterization lowered to explicit stages.

As pycls (`generate_regnet`, `adjust_block_compatibility`), all in float64 with round-half-to-even:

1. Linear widths `u_j = w0 + wa * j` for blocks j = 0..d-1; `k_j = round(log(u_j / w0) / log(wm))`;
   quantized widths `w_j = round(w0 * wm**k_j / q) * q`.
2. Stages are runs of equal `w_j`: widths `ws`, depths `ds`.
3. Per stage, with bottleneck multiplier `bm` and group width `g`: `v = int(max(1, w * bm))`;
   `g = int(min(g, v))` (a stage narrower than g gets one group); `m = lcm(g, int(bm))` if bm > 1
   else `g`; `v = max(m, int(round(v / m) * m))`; `w = int(v / bm)`.

Every stage has stride 2. pycls' zoo configs all use bm = 1 (the paper's b = 1). Pure arithmetic:
this module knows nothing of the spec schema (`archc.frontend.spec` builds the stage list from it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RegNetWidths:
    """The generator's output: per-stage widths and depths, and the per-block quantized widths."""

    widths: list[int]
    depths: list[int]
    block_widths: list[int]
    max_stages: int  # max(k_j) + 1


def generate_widths(depth: int, w0: int, wa: float, wm: float, q: int = 8) -> RegNetWidths:
    """Steps 1-2: quantized linear widths grouped into stages."""
    u = w0 + wa * np.arange(depth, dtype=np.float64)
    k = np.round(np.log(u / w0) / np.log(wm))
    block_widths = (np.round(w0 * np.power(wm, k) / q) * q).astype(np.int64)
    widths, depths = np.unique(block_widths, return_counts=True)
    return RegNetWidths(
        widths=[int(w) for w in widths],
        depths=[int(d) for d in depths],
        block_widths=[int(w) for w in block_widths],
        max_stages=int(k.max()) + 1,
    )


def adjust_block_compatibility(
    widths: list[int], bottleneck: float, group_width: int
) -> tuple[list[int], list[int]]:
    """Step 3: make each stage's bottleneck width divisible by its (clamped) group width."""
    adjusted_widths, group_widths = [], []
    for width in widths:
        v = int(max(1, width * bottleneck))
        g = int(min(group_width, v))
        m = math.lcm(g, int(bottleneck)) if bottleneck > 1 else g
        v = max(m, int(round(v / m) * m))
        adjusted_widths.append(int(v / bottleneck))
        group_widths.append(g)
    return adjusted_widths, group_widths
