"""Analytic complexity: flops, params and acts of a spec from its explicit stage list, no graph.

The twin of `archc.analysis` (which counts the traced graph) in pycls' style: one `*_cx` function
per layer updates a running `Cx` (the spatial size h x w and the three totals), and every registered
block has a twin that calls them in the order its module builds layers (`archc.blocks`). The design
space sampler needs this: counting a graph takes a traced model and shape propagation (~0.1-0.5 s),
this takes microseconds. Tests keep the two equal on every spec and on samples of every space.

Counting rules (pycls, as `archc.analysis`), per sample:
- conv k_h x k_w, c_in -> c_out, g groups, output h' x w': flops `k_h k_w c_in c_out h' w' / g`
  (+ `c_out h' w'` with a bias), params `k_h k_w c_in c_out / g` (+ c_out), acts `c_out h' w'`;
  h' = (h + 2 p - k) // s + 1.
- BN: params 2C. Linear: flops = params = `c_in c_out + c_out`, acts c_out.
- Max/avg pooling with a window: acts `C h' w'`; global average pooling, activations, adds, the SE
  multiply and channel shuffles count nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from archc.errors import SpecError
from archc.spec import Spec, StageSpec, make_divisible


@dataclass
class Cx:
    h: int
    w: int
    flops: int = 0
    params: int = 0
    acts: int = 0

    def as_tuple(self) -> tuple[int, int, int]:
        return self.flops, self.params, self.acts


def _out_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def conv2d_cx(
    cx: Cx,
    w_in: int,
    w_out: int,
    kernel: int | tuple[int, int],
    stride: int = 1,
    groups: int = 1,
    bias: bool = False,
    padding: int | tuple[int, int] | None = None,
) -> Cx:
    """A conv; padding defaults to (k - 1) // 2 per dimension."""
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    if padding is None:
        padding = ((kh - 1) // 2, (kw - 1) // 2)
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    cx.h, cx.w = _out_size(cx.h, kh, stride, ph), _out_size(cx.w, kw, stride, pw)
    weights = kh * kw * w_in * w_out // groups
    cx.flops += weights * cx.h * cx.w + (w_out * cx.h * cx.w if bias else 0)
    cx.params += weights + (w_out if bias else 0)
    cx.acts += w_out * cx.h * cx.w
    return cx


def norm2d_cx(cx: Cx, width: int) -> Cx:
    cx.params += 2 * width
    return cx


def conv_bn_cx(cx: Cx, w_in: int, w_out: int, kernel, stride: int = 1, groups: int = 1,
               padding=None) -> Cx:
    """`archc.blocks.conv_bn`: conv without bias, then BN."""
    return norm2d_cx(conv2d_cx(cx, w_in, w_out, kernel, stride, groups, padding=padding), w_out)


def pool2d_cx(cx: Cx, width: int, kernel: int, stride: int, padding: int) -> Cx:
    cx.h, cx.w = _out_size(cx.h, kernel, stride, padding), _out_size(cx.w, kernel, stride, padding)
    cx.acts += width * cx.h * cx.w
    return cx


def linear_cx(cx: Cx, w_in: int, w_out: int) -> Cx:
    """Linear with bias on a flattened input."""
    cx.flops += w_in * w_out + w_out
    cx.params += w_in * w_out + w_out
    cx.acts += w_out
    return cx


def _branch(cx: Cx, layers: Callable[[Cx], Cx]) -> Cx:
    """Run `layers` from cx's spatial size, keep their totals, restore the size (a side branch)."""
    side = layers(Cx(cx.h, cx.w))
    cx.flops += side.flops
    cx.params += side.params
    cx.acts += side.acts
    return cx


def se_cx(cx: Cx, stage: StageSpec, w_in: int, width: int) -> Cx:
    """`archc.blocks.squeeze_excitation`: two 1x1 convs with bias at 1x1 (pooled) size."""
    if stage.se_ratio == 0:
        return cx
    value = stage.se_ratio * (w_in if stage.se_base == "input" else width)
    se_width = (
        make_divisible(value, stage.se_divisor) if stage.se_divisor > 1 else int(round(value))
    )
    if se_width == 0:
        return cx

    def squeeze(side: Cx) -> Cx:
        side.h = side.w = 1
        conv2d_cx(side, width, se_width, 1, bias=True)
        return conv2d_cx(side, se_width, width, 1, bias=True)

    return _branch(cx, squeeze)


def _projection_cx(cx: Cx, w_in: int, w_out: int, stride: int) -> Cx:
    if w_in == w_out and stride == 1:
        return cx
    return _branch(cx, lambda side: conv_bn_cx(side, w_in, w_out, 1, stride))


# ---------------------------------------------------------------------------------------------
# Block twins: (cx, w_in, w_out, stride, stage) -> cx, in the order `archc.blocks` builds layers.


def res_bottleneck_cx(cx: Cx, w_in: int, w_out: int, stride: int, stage: StageSpec) -> Cx:
    w_b = int(round(stage.width * stage.bottleneck))
    groups = w_b // stage.group_width if stage.group_width else stage.groups or 1
    _projection_cx(cx, w_in, w_out, stride)
    conv_bn_cx(cx, w_in, w_b, 1)
    conv_bn_cx(cx, w_b, w_b, 3, stride, groups)
    se_cx(cx, stage, w_in, w_b)
    return conv_bn_cx(cx, w_b, w_out, 1)


def res_basic_cx(cx: Cx, w_in: int, w_out: int, stride: int, stage: StageSpec) -> Cx:
    _projection_cx(cx, w_in, w_out, stride)
    conv_bn_cx(cx, w_in, w_out, 3, stride)
    conv_bn_cx(cx, w_out, w_out, 3)
    return se_cx(cx, stage, w_in, w_out)


def vanilla_cx(cx: Cx, w_in: int, w_out: int, stride: int, stage: StageSpec) -> Cx:
    conv_bn_cx(cx, w_in, w_out, 3, stride)
    return conv_bn_cx(cx, w_out, w_out, 3)


def dw_separable_cx(cx: Cx, w_in: int, w_out: int, stride: int, stage: StageSpec) -> Cx:
    conv_bn_cx(cx, w_in, w_in, 3, stride, w_in)
    se_cx(cx, stage, w_in, w_in)
    return conv_bn_cx(cx, w_in, w_out, 1)


def inverted_residual_cx(cx: Cx, w_in: int, w_out: int, stride: int, stage: StageSpec) -> Cx:
    hidden = int(round(stage.expansion * w_in))
    if stage.expansion != 1:
        conv_bn_cx(cx, w_in, hidden, 1)
    conv_bn_cx(cx, hidden, hidden, 3, stride, hidden)
    se_cx(cx, stage, w_in, hidden)
    return conv_bn_cx(cx, hidden, w_out, 1)


def shufflenet_v1_cx(cx: Cx, w_in: int, w_out: int, stride: int, stage: StageSpec) -> Cx:
    groups = stage.groups or 1
    mid = int(round(w_out * stage.bottleneck))
    first_groups = 1 if stage.dense_first and stride > 1 else groups
    if stride > 1:
        _branch(cx, lambda side: pool2d_cx(side, w_in, 3, stride, 1))
    conv_bn_cx(cx, w_in, mid, 1, groups=first_groups)
    conv_bn_cx(cx, mid, mid, 3, stride, mid)
    return conv_bn_cx(cx, mid, w_out - w_in if stride > 1 else w_out, 1, groups=groups)


def shufflenet_v2_cx(cx: Cx, w_in: int, w_out: int, stride: int, stage: StageSpec) -> Cx:
    half = w_out // 2
    if stride > 1:
        _branch(cx, lambda side: conv_bn_cx(
            conv_bn_cx(side, w_in, w_in, 3, stride, w_in), w_in, half, 1))
    conv_bn_cx(cx, w_in if stride > 1 else half, half, 1)
    conv_bn_cx(cx, half, half, 3, stride, half)
    return conv_bn_cx(cx, half, half, 1)


def reducenet_cx(cx: Cx, w_in: int, w_out: int, stride: int, stage: StageSpec) -> Cx:
    if stage.phase == "train":
        expanded = int(round(stage.expansion * w_out))
        _branch(cx, lambda side: conv_bn_cx(
            conv_bn_cx(side, w_in, expanded, 3, stride), expanded, w_out, 1))
    _projection_cx(cx, w_in, w_out, stride)
    conv_bn_cx(cx, w_in, w_out, 3, stride)
    return conv_bn_cx(cx, w_out, w_out, 3)


def _train_form_groups(w_in: int, stage: StageSpec) -> int:
    """`archc.blocks._groups`: dense where the input width does not divide."""
    if not stage.group_width or w_in % stage.group_width:
        return 1
    return w_in // stage.group_width


def repvgg_cx(cx: Cx, w_in: int, w_out: int, stride: int, stage: StageSpec) -> Cx:
    groups = _train_form_groups(w_in, stage)
    _branch(cx, lambda side: conv_bn_cx(side, w_in, w_out, 1, stride, groups))
    if w_in == w_out and stride == 1:
        norm2d_cx(cx, w_out)
    return conv_bn_cx(cx, w_in, w_out, 3, stride, groups)


def acb_cx(cx: Cx, w_in: int, w_out: int, stride: int, stage: StageSpec) -> Cx:
    groups = _train_form_groups(w_in, stage)
    for kernel in ((1, 3), (3, 1)):
        _branch(cx, lambda side, k=kernel: conv_bn_cx(side, w_in, w_out, k, stride, groups))
    return conv_bn_cx(cx, w_in, w_out, 3, stride, groups)


def dbb_cx(cx: Cx, w_in: int, w_out: int, stride: int, stage: StageSpec) -> Cx:
    groups = _train_form_groups(w_in, stage)

    def average(side: Cx) -> Cx:
        conv_bn_cx(side, w_in, w_out, 1, groups=groups, padding=1)
        return norm2d_cx(pool2d_cx(side, w_out, 3, stride, 0), w_out)

    def pointwise_square(side: Cx) -> Cx:
        conv_bn_cx(side, w_in, w_in, 1, groups=groups, padding=1)
        return conv_bn_cx(side, w_in, w_out, 3, stride, groups, padding=0)

    _branch(cx, lambda side: conv_bn_cx(side, w_in, w_out, 1, stride, groups))
    _branch(cx, average)
    _branch(cx, pointwise_square)
    return conv_bn_cx(cx, w_in, w_out, 3, stride, groups)


def _mobileone_unit_cx(cx: Cx, w_in: int, w_out: int, kernel: int, stride: int, groups: int,
                       branches: int) -> Cx:
    if kernel > 1:
        _branch(cx, lambda side: conv_bn_cx(side, w_in, w_out, 1, stride, groups))
    if w_in == w_out and stride == 1:
        norm2d_cx(cx, w_out)
    for _ in range(branches - 1):
        _branch(cx, lambda side: conv_bn_cx(side, w_in, w_out, kernel, stride, groups))
    return conv_bn_cx(cx, w_in, w_out, kernel, stride, groups)


def mobileone_cx(cx: Cx, w_in: int, w_out: int, stride: int, stage: StageSpec) -> Cx:
    branches = stage.branches or 1
    _mobileone_unit_cx(cx, w_in, w_in, 3, stride, w_in, branches)
    return _mobileone_unit_cx(cx, w_in, w_out, 1, 1, 1, branches)


BLOCK_CX: dict[str, Callable[[Cx, int, int, int, StageSpec], Cx]] = {
    "res_bottleneck": res_bottleneck_cx,
    "res_basic": res_basic_cx,
    "vanilla": vanilla_cx,
    "dw_separable": dw_separable_cx,
    "inverted_residual": inverted_residual_cx,
    "shufflenet_v1": shufflenet_v1_cx,
    "shufflenet_v2": shufflenet_v2_cx,
    "reducenet": reducenet_cx,
    "repvgg": repvgg_cx,
    "acb": acb_cx,
    "dbb": dbb_cx,
    "mobileone": mobileone_cx,
}


def spec_complexity(
    spec: Spec, stages: list[StageSpec] | None = None, input_size: int | None = None
) -> tuple[int, int, int]:
    """(flops, params, acts) of `spec` for one square input (default: the spec's input size);
    `stages` is `spec.stages()` when the caller already has it.

    A stage's blocks after the first are identical (same widths, stride 1, same spatial size), so
    one of them is counted and multiplied by depth - 1."""
    side = input_size or spec.input.size
    cx = Cx(side, side)
    width = spec.input.channels
    if spec.stem.type != "none":
        kernel = 7 if spec.stem.type == "resnet" else 3
        conv_bn_cx(cx, width, spec.stem.channels, kernel, spec.stem.stride)
        width = spec.stem.channels
        if spec.stem.type in ("resnet", "simple_pool"):
            pool2d_cx(cx, width, 3, 2, 1)
    for index, stage in enumerate(spec.stages() if stages is None else stages):
        block_cx = BLOCK_CX.get(stage.block)
        if block_cx is None:
            raise SpecError(
                f"block {stage.block!r} has no analytic complexity twin "
                f"(archc.analytic_complexity.BLOCK_CX)",
                f"body.stages[{index}].block",
            )
        block_cx(cx, width, stage.width, stage.stride, stage)
        width = stage.width
        if stage.depth > 1:
            repeated = block_cx(Cx(cx.h, cx.w), width, width, 1, stage)
            cx.flops += (stage.depth - 1) * repeated.flops
            cx.params += (stage.depth - 1) * repeated.params
            cx.acts += (stage.depth - 1) * repeated.acts
    if spec.head.width is not None:
        conv_bn_cx(cx, width, spec.head.width, 1)
        width = spec.head.width
    linear_cx(cx, width, spec.num_classes)
    return cx.as_tuple()
