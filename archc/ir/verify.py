"""Numerical verification: how far two computations are apart, and how far rounding alone goes.

Distance. Over every output tensor of a model (NaN where the reference is finite, or a change of
structure or shape, counts as infinitely far):

    relative_error = max|y - y_ref| / max|y_ref|        (max|y - y_ref| if y_ref is all zero)

Exactness is judged in float64. A function-preserving rewrite run on a float64 copy of a model
agrees with it to ~1e-15 (rounding of 53-bit arithmetic, amplified by depth), while a wrong
identity (a wrong ε, a misplaced pad, a swapped channel) shows at 1e-3 or more, so a float64
tolerance of `FLOAT64_RTOL` = 1e-9 separates the two by orders of magnitude on both sides.

An artifact in float32 is judged against the model's own rounding. `rounding_noise` is the
distance of the model run in its own dtype from the same model run in float64: what float32
arithmetic alone costs (1e-7 on shallow nets, above 1e-5 on deep ones with widely spread BN
statistics). The artifact (the rewritten graph cast back to float32, or an exported file) then
passes if its distance from the float64 reference is within

    artifact_tolerance = max(rtol, NOISE_FACTOR * rounding_noise)

so `--rtol` keeps its meaning on shallow nets and a deep net is not refused for rounding: a
rewritten graph rounds differently from its source, not worse than a small multiple of it.

A reduced-precision deploy form (fp16, bf16) is judged the same way, against the rounding the
model itself suffers in that format: `rounding_noise` of the model before the passes, cast to the
format, against the same model in float32. The cast result may differ from float32 by
`artifact_tolerance(format_rtol, noise)`, format_rtol being 10 units of the format's rounding.
A correct rewrite therefore cannot fail for the format alone: with pycls' initialisation a deep
MobileNet's logits are about 1e-9, below fp16's smallest normal number (6.1e-5), so fp16 flushes
them to zero and the model's own fp16 rounding is a relative error of 1; `below_normal` says so.
A cast that loses more than the model's own rounding (folded weights beyond the format's range,
say) still fails.

A few rewrites are exact only up to the rounding of constants the model computed in its own
dtype (DBB's BNAndPad cancels a bias with a float32 copy of it): in float64 they differ from the
graph by that rounding, so such a pass is held to `rounding_tolerance(dtype)` = 100 units of the
dtype's rounding (1.2e-5 for float32) instead, and its report says so.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.fx import GraphModule
from torch.utils._pytree import tree_leaves

from archc.ir.graph import copy_module
from archc.ir.shapes import run_recording_shapes

FLOAT64_RTOL = 1e-9
NOISE_FACTOR = 10.0
ROUNDING_ULPS = 100

Outputs = Tensor | Sequence[Tensor]


def outputs(model: nn.Module, inputs: Sequence[Tensor]) -> list[Tensor]:
    """Every tensor the model returns (any pytree), computed without autograd."""
    with torch.no_grad():
        return [t for t in tree_leaves(model(*inputs)) if isinstance(t, Tensor)]


def _as_list(value: Outputs) -> list[Tensor]:
    return [value] if isinstance(value, Tensor) else list(value)


def relative_error(reference: Outputs, candidate: Outputs) -> float:
    """max|Δ| / max|reference| over all tensors (see the module docstring)."""
    delta, scale = _distance(_as_list(reference), _as_list(candidate))
    return delta / scale if scale > 0 else delta


def max_abs_error(reference: Outputs, candidate: Outputs) -> float:
    """max|Δ| over all tensors (inf for a change of structure, shape or a new NaN)."""
    return _distance(_as_list(reference), _as_list(candidate))[0]


def _distance(reference: list[Tensor], candidate: list[Tensor]) -> tuple[float, float]:
    if len(reference) != len(candidate) or any(r.shape != c.shape
                                               for r, c in zip(reference, candidate)):
        return float("inf"), 1.0
    delta = scale = 0.0
    for ref, out in zip(reference, candidate):
        ref, out = ref.detach().double(), out.detach().double()
        diff = (out - ref).abs()
        # a new NaN or an overflow is infinitely far (nan_to_num's default is float64's max)
        diff = torch.where(ref.isnan() & out.isnan(), 0.0,
                           diff.nan_to_num(nan=math.inf, posinf=math.inf))
        if diff.numel():
            delta = max(delta, diff.max().item())
            scale = max(scale, ref.nan_to_num(nan=0.0).abs().max().item())
    return delta, scale


def in_float64(inputs: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """The inputs with floating tensors cast to float64."""
    return tuple(x.double() if isinstance(x, Tensor) and x.is_floating_point() else x
                 for x in inputs)


def float64_reference(model: nn.Module, inputs: Sequence[Tensor]
                      ) -> tuple[nn.Module, list[Tensor]] | str:
    """A float64 copy of `model` and its outputs on `inputs`, or why the model does not run in
    float64 (it casts explicitly, say). A graph module's copy keeps the shapes of that run
    (`archc.ir.shapes.run_recording_shapes`), so nobody needs to run it again for them."""
    try:
        copy = copy_module(model, torch.float64)
        if isinstance(copy, GraphModule):
            result = run_recording_shapes(copy, in_float64(inputs))
            return copy, [t for t in tree_leaves(result) if isinstance(t, Tensor)]
        return copy, outputs(copy, in_float64(inputs))
    except Exception as exc:  # any op may insist on its dtype
        lines = str(exc).strip().splitlines()
        return f"{type(exc).__name__}: {lines[0][:120]}" if lines else type(exc).__name__


def float64_function(model: nn.Module, example_input: Tensor
                     ) -> tuple[Callable[[Tensor], Tensor], str]:
    """What a runtime's output is judged against, and its name for reports: `model` run in
    float64 (its output on `example_input` computed once, here), or, for a model that does not
    run in float64, in its own dtype."""
    found = float64_reference(model, (example_input,))
    if isinstance(found, str):
        return model, f"eager PyTorch (no float64 run: {found})"
    copy, (example_output, *_) = found

    def run(x: Tensor) -> Tensor:
        if x is example_input:
            return example_output
        with torch.no_grad():
            return copy(x.double())

    return run, "float64 PyTorch"


def rounding_noise(model: nn.Module, inputs: Sequence[Tensor],
                   reference: list[Tensor] | None = None) -> float | None:
    """The model's own rounding: its outputs in its dtype against float64 (`reference`, or a
    float64 copy run here); None if it does not run in float64."""
    if reference is None:
        found = float64_reference(model, inputs)
        if isinstance(found, str):
            return None
        reference = found[1]
    return relative_error(reference, outputs(model, inputs))


def artifact_tolerance(rtol: float, noise: float | None) -> float:
    """What an artifact in the model's dtype may differ from float64 by (module docstring)."""
    return rtol if noise is None else max(rtol, NOISE_FACTOR * noise)


def below_normal(reference: Outputs, dtype: torch.dtype) -> str:
    """Why `dtype` cannot represent the outputs `reference`: their largest magnitude is below its
    smallest normal number (they flush to zero or keep only a few bits); "" if it is not."""
    largest = max((t.detach().double().nan_to_num(nan=0.0).abs().max().item()
                   for t in _as_list(reference) if t.numel()), default=0.0)
    tiny = torch.finfo(dtype).tiny
    if largest >= tiny:
        return ""
    name = str(dtype).removeprefix("torch.")
    return (f"its outputs, at most {largest:.1e} in magnitude, are below {name}'s smallest normal "
            f"number {tiny:.1e}")


def rounding_tolerance(dtype: torch.dtype) -> float:
    """What a rewrite exact up to the rounding of `dtype` constants may differ by in float64."""
    return max(FLOAT64_RTOL, ROUNDING_ULPS * torch.finfo(dtype).eps)
