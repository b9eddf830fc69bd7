"""The quantized linear fit of Radosavovic et al. (2020, Sec. 3.3): per-block widths -> RegNet.

Given the widths w_j of the d blocks of a network (j = 0..d-1, e.g. an AnyNet spec's stages
unrolled), find the RegNet parameters (w0, wa, wm) whose per-block widths ŵ_j
(`archc.frontend.regnet`: u_j = w0 + wa j, k_j = round(ln(u_j / w0) / ln wm), quantized widths
round(w0 wm^k_j / q) q, then block compatibility for the bottleneck b and group width g) minimize
the fit error, the mean log-ratio

    e_fit = (1/d) sum_j |ln w_j - ln ŵ_j|.

d, q, b and g are fixed (b and g: the value the stages share, else the most frequent one), and
so is the number of stages S: a RegNet has one stride-2 stage per exponent, so only fits with
exactly S stages (every exponent 0..S-1 used, distinct quantized widths) keep the network's
downsampling; the fitted spec is then a valid RegNet (pycls' rule) of the same depth and stages.

Search. w0 is ŵ_0 before compatibility, a multiple of q: every multiple in [w_0 / 2, 2 w_0] is
tried. For each w0, wm runs over a log-spaced grid plus, where the widths fall into stages, the
wm intervals in which every stage width W_k = round(w0 wm^k / q) q maps onto the target's
(sampled at several points each). For fixed (w0, wm) the widths depend on wa only through the
block -> stage assignment k_j, which steps at r = wa / w0 = (wm^(k+1/2) - 1) / j; e_fit is constant
between consecutive steps, so one r per interval finds the best wa exactly. The search evaluates
the generator's formulas on whole grids with numpy; the best few candidates are then recomputed
with `archc.frontend.regnet` itself, and that is the e_fit reported. wa and wm are rounded to the
fewest decimals that keep the same widths.

What the fit changes (`fit_changes`). A RegNet has one block type, one b, one g and one SE ratio
for every stage, stride 2 in every stage, and every other stage field (kernel, expansion,
activation, ...) at its default; its depths and widths are the fit's. A spec that is not a RegNet
therefore comes back as a different network, and `fit_changes` says how: per stage, each field
before -> after, and flops, params and acts before -> after with the relative change
(after - before) / before. The fit is called a different network when |relative change| of flops
or params exceeds LARGE_CHANGE, or when the RegNet form cannot express the source (several block
types, strides other than 2, stage fields it cannot carry). A dense source (every stage's
grouped conv has one group) is fitted with a group width no stage's bottleneck exceeds, so the
RegNet stays dense (pycls clamps g to the bottleneck width), instead of taking the first stage's
bottleneck width as g and grouping the later, wider stages.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from archc.frontend.regnet import adjust_block_compatibility, generate_widths

GRID_POINTS = 400  # log-spaced wm values per w0
INTERVAL_POINTS = 7  # wm values tried inside each interval that reproduces the stage widths
VERIFIED = 8  # best grid candidates recomputed with archc.frontend.regnet
DENSE_GROUP_WIDTH = 2**30  # the fit's g for a dense source: above every bottleneck width
LARGE_CHANGE = 0.25  # |relative change| of flops or params that makes the fit a different network
# stage fields a RegNet sets (`regnet_stage_fields`, and the bottleneck's two spellings)
REGNET_STAGE_FIELDS = ("block", "depth", "width", "stride", "group_width", "groups",
                       "bottleneck_ratio", "bottleneck_multiplier", "se_ratio")


@dataclass(frozen=True)
class Fit:
    w0: int
    wa: float
    wm: float
    e_fit: float
    widths: list[int]  # fitted per-block widths ŵ_j
    stage_widths: list[int]
    stage_depths: list[int]
    group_widths: list[int]


def e_fit(widths: list[int], fitted: list[int]) -> float:
    return float(np.mean(np.abs(np.log(np.asarray(widths, float))
                                - np.log(np.asarray(fitted, float)))))


def regnet_widths(depth: int, w0: int, wa: float, wm: float, q: int, bottleneck: float,
                  group_width: int) -> tuple[list[int], list[int], list[int], list[int]]:
    """(per-block widths, stage widths, stage depths, group widths) by `archc.frontend.regnet`."""
    generated = generate_widths(depth, w0, wa, wm, q)
    widths, groups = adjust_block_compatibility(generated.widths, bottleneck, group_width)
    per_block = [w for w, d in zip(widths, generated.depths) for _ in range(d)]
    return per_block, widths, generated.depths, groups


def fit_stages(stage_widths: list[int], stage_depths: list[int], bottleneck: float = 1.0,
               group_width: int = 8, q: int = 8) -> Fit | None:
    """The (w0, wa, wm) minimizing e_fit for the stages' per-block widths with as many stages
    (module docstring); None if no RegNet of that depth has that many stages."""
    widths = [w for w, d in zip(stage_widths, stage_depths) for _ in range(d)]
    target = np.asarray(widths, dtype=np.float64)
    stage_targets, stages = list(stage_widths), len(stage_widths)
    first = widths[0]
    candidates: list[tuple[float, int, float, float]] = []  # (e, w0, wm, r)
    for w0 in range(max(q, (first // 2) // q * q), 2 * first + q, q):
        wms = np.unique(np.concatenate([
            _wm_grid(widths, stage_targets),
            _wm_matching_stages(w0, stage_targets, bottleneck, group_width, q)]))
        errors, rs = _best_r(np.log(target), w0, wms, stages, bottleneck, group_width, q)
        for index in np.argsort(errors)[:VERIFIED]:
            if np.isfinite(errors[index]):
                candidates.append((float(errors[index]), w0, float(wms[index]),
                                   float(rs[index])))
    candidates.sort()
    best: Fit | None = None
    for _, w0, wm, r in candidates[:VERIFIED]:
        fit = _verified(widths, w0, wm, r, bottleneck, group_width, q)
        if len(fit.stage_widths) != stages:
            continue  # rounding at a float boundary the grid formulas saw differently
        if best is None or fit.e_fit < best.e_fit - 1e-12:
            best = fit
    return best


def _wm_grid(widths: list[int], stage_targets: list[int]) -> np.ndarray:
    spread = max(widths) / widths[0]
    top = max(3.0, 2.0 * spread ** (1 / max(1, len(stage_targets) - 1)))
    return np.geomspace(1.01, top, GRID_POINTS)


def _wm_matching_stages(w0: int, stage_targets: list[int], bottleneck: float, group_width: int,
                        q: int) -> np.ndarray:
    """wm values inside the intervals where every stage width W_k, k >= 1, maps onto the
    target's k-th stage width after block compatibility."""
    if adjust_block_compatibility([w0], bottleneck, group_width)[0][0] != stage_targets[0]:
        return np.empty(0)
    intervals = [(1.0 + 1e-9, math.inf)]
    for k, width in enumerate(stage_targets[1:], start=1):
        pieces = []
        for v in range(max(q, width // 2 // q * q), 2 * width + q, q):
            if adjust_block_compatibility([v], bottleneck, group_width)[0][0] == width:
                low = ((v - q / 2) / w0) ** (1 / k)
                high = ((v + q / 2) / w0) ** (1 / k)
                pieces.extend((max(a, low), min(b, high)) for a, b in intervals
                              if max(a, low) < min(b, high))
        intervals = pieces
        if not intervals:
            return np.empty(0)
    points = [np.linspace(low, min(high, low * 4), INTERVAL_POINTS + 2)[1:-1]
              for low, high in intervals]
    return np.concatenate(points)


def _adjusted(widths: np.ndarray, bottleneck: float, group_width: int) -> np.ndarray:
    """`archc.frontend.regnet.adjust_block_compatibility` on an array of widths."""
    v = np.floor(np.maximum(1, widths * bottleneck))
    g = np.minimum(group_width, v)
    m = np.lcm(g.astype(np.int64), int(bottleneck)).astype(np.float64) if bottleneck > 1 else g
    v = np.maximum(m, np.round(v / m) * m)
    return np.floor(v / bottleneck)


def _best_r(log_target: np.ndarray, w0: int, wms: np.ndarray, stages: int, bottleneck: float,
            group_width: int, q: int) -> tuple[np.ndarray, np.ndarray]:
    """Per wm: the least e_fit over r = wa / w0 among assignments with exactly `stages` stages,
    and an r achieving it (inf where none has)."""
    depth = len(log_target)
    k = np.arange(stages)
    quantized = np.round(w0 * wms[:, None] ** k[None, :] / q) * q  # (G, K)
    distinct = (np.diff(quantized, axis=1) > 0).all(axis=1)  # else np.unique merges stages
    stage_widths = _adjusted(quantized, bottleneck, group_width)
    j = np.arange(1, depth)
    steps = (wms[:, None, None] ** (k[None, :-1, None] + 0.5) - 1) / j[None, None, :]
    steps = np.sort(steps.reshape(len(wms), -1), axis=1)  # (G, (K-1)(d-1))
    rs = np.concatenate([np.zeros((len(wms), 1)), (steps[:, :-1] + steps[:, 1:]) / 2,
                         steps[:, -1:] * 1.5], axis=1)  # one r per interval, (G, C)
    exponents = np.log1p(rs[:, :, None] * np.arange(depth)[None, None, :]) / np.log(
        wms)[:, None, None]
    assigned = np.round(exponents).astype(np.int64)  # (G, C, d), non-decreasing in j
    valid = ((assigned[:, :, -1] == stages - 1) & (np.diff(assigned, axis=2) <= 1).all(axis=2)
             & distinct[:, None])
    fitted = np.take_along_axis(stage_widths[:, None, :].repeat(rs.shape[1], axis=1),
                                np.minimum(assigned, stages - 1), axis=2)
    errors = np.abs(np.log(fitted) - log_target).mean(axis=2)
    errors[~valid] = np.inf
    best = errors.argmin(axis=1)
    rows = np.arange(len(wms))
    return errors[rows, best], rs[rows, best]


def _verified(widths: list[int], w0: int, wm: float, r: float, bottleneck: float,
              group_width: int, q: int) -> Fit:
    """The candidate recomputed by `archc.frontend.regnet`, with wa and wm rounded as far as the
    widths stay the same."""
    depth = len(widths)
    reference = regnet_widths(depth, w0, r * w0, wm, q, bottleneck, group_width)[0]
    wa = r * w0
    for decimals in range(0, 7):
        rounded = round(wa, decimals)
        if regnet_widths(depth, w0, rounded, wm, q, bottleneck, group_width)[0] == reference:
            wa = rounded
            break
    for decimals in range(1, 7):
        rounded = round(wm, decimals)
        if rounded > 1 and regnet_widths(depth, w0, wa, rounded, q, bottleneck,
                                         group_width)[0] == reference:
            wm = rounded
            break
    per_block, stage_widths, depths, groups = regnet_widths(depth, w0, wa, wm, q, bottleneck,
                                                            group_width)
    return Fit(w0, float(wa), float(wm), e_fit(widths, per_block), per_block, stage_widths,
               depths, groups)


def shared_value(values: list[Any]) -> Any:
    """The value every stage shares, else the most frequent one (ties: the smallest)."""
    counts = Counter(values)
    top = max(counts.values())
    return min(value for value, count in counts.items() if count == top)


def fit_spec(spec: Any) -> tuple[Fit | None, dict[str, Any]]:
    """Fit the widths of `spec` (any body) and return (fit, the RegNet spec mapping or {}).

    The RegNet keeps the spec's fields other than its name and body (input, classes, stem,
    head, ...), and takes the block type, the bottleneck, the group width and the SE ratio its
    stages share (else the most frequent); a dense source stays dense (module docstring)."""
    stages = spec.stages()
    bottleneck = shared_value([stage.bottleneck for stage in stages])
    dense = all(_groups(stage) == 1 for stage in stages)
    group_width = DENSE_GROUP_WIDTH if dense else shared_value(
        [_group_width(stage) for stage in stages])
    fit = fit_stages([s.width for s in stages], [s.depth for s in stages], bottleneck,
                     group_width, spec.body.q if hasattr(spec.body, "q") else 8)
    if fit is None:
        return None, {}
    if dense:  # g clamps to each stage's bottleneck width: the widest keeps every stage dense
        group_width = max(fit.group_widths)
    source = spec.to_dict()
    ratio = 1 / bottleneck
    body = {"type": "regnet", "block": shared_value([stage.block for stage in stages]),
            "depth": len(fit.widths), "w0": fit.w0, "wa": fit.wa, "wm": fit.wm,
            "group_width": group_width, "num_stages": len(stages),
            "se_ratio": shared_value([stage.se_ratio for stage in stages])}
    if float(ratio).is_integer():
        body["bottleneck_ratio"] = float(ratio)
    else:
        body["bottleneck_multiplier"] = bottleneck
    if "q" in source["body"]:
        body["q"] = source["body"]["q"]
    fitted = {"name": f"{spec.name}_fit",
              **{key: value for key, value in source.items() if key not in ("name", "body")},
              "body": body}
    return fit, fitted


def _bottleneck_width(stage: Any) -> int:
    return int(round(stage.width * stage.bottleneck))


def _group_width(stage: Any) -> int:
    """Channels per group of a stage's grouped conv (the whole bottleneck when dense)."""
    if stage.group_width:
        return stage.group_width
    return _bottleneck_width(stage) // stage.groups if stage.groups else _bottleneck_width(stage)


def _groups(stage: Any) -> int:
    """Groups of a stage's grouped conv: bottleneck width / group width (1: dense)."""
    return max(1, _bottleneck_width(stage) // _group_width(stage))


def regnet_stage_fields(stage: Any) -> dict[str, Any]:
    """A stage in the terms of a RegNet: block, depth d_i, width w_i, stride, group width g_i
    (None: dense, one group), groups, bottleneck ratio b_i and SE ratio."""
    groups = _groups(stage)
    return {"block": stage.block, "depth": stage.depth, "width": stage.width,
            "stride": stage.stride, "group_width": _group_width(stage) if groups > 1 else None,
            "groups": groups, "bottleneck_ratio": 1 / stage.bottleneck,
            "se_ratio": stage.se_ratio}


def relative_change(before: float, after: float) -> float:
    """(after - before) / before."""
    return (after - before) / before


def fit_changes(source: Any, fitted: Any) -> dict[str, Any]:
    """What the fitted RegNet spec `fitted` changes of the spec `source` (module docstring):

    - `stages`: per field that differs in some stage, its per-stage values `before` and `after`
      (the RegNet fields of `regnet_stage_fields`, then every other stage field);
    - `complexity`: flops, params and acts `before`, `after` and their `relative` change;
    - `large`: the reasons the fit is a different network, one phrase each (empty: none)."""
    from archc.frontend.analytic_complexity import spec_complexity

    source_stages, fitted_stages = source.stages(), fitted.stages()
    stages: dict[str, dict[str, list[Any]]] = {}
    summaries = ([regnet_stage_fields(s) for s in source_stages],
                 [regnet_stage_fields(s) for s in fitted_stages])
    for name in summaries[0][0]:
        before, after = ([summary[name] for summary in side] for side in summaries)
        if before != after:
            stages[name] = {"before": before, "after": after}
    dumps = ([s.model_dump(mode="json") for s in source_stages],
             [s.model_dump(mode="json") for s in fitted_stages])
    dropped = []
    for name in dumps[0][0]:
        if name in REGNET_STAGE_FIELDS:
            continue
        before, after = ([dump[name] for dump in side] for side in dumps)
        if before != after:
            stages[name] = {"before": before, "after": after}
            dropped.append(name)
    complexity = {}
    for name, before, after in zip(("flops", "params", "acts"), spec_complexity(source),
                                   spec_complexity(fitted)):
        complexity[name] = {"before": before, "after": after,
                            "relative": relative_change(before, after)}
    large = [f"{name} {complexity[name]['relative']:+.1%} (beyond ±{LARGE_CHANGE:.0%})"
             for name in ("flops", "params")
             if abs(complexity[name]["relative"]) > LARGE_CHANGE]
    blocks = sorted({stage.block for stage in source_stages})
    if len(blocks) > 1:
        large.append(f"one block type, {fitted_stages[0].block}, for stages of "
                     f"{', '.join(blocks)}")
    if "stride" in stages:
        large.append(f"stride 2 in every stage, not {stages['stride']['before']}")
    if dropped:
        large.append(f"{', '.join(dropped)} at a RegNet's default")
    return {"stages": stages, "complexity": complexity, "large": large}
