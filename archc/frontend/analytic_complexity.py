"""Analytic complexity: flops, params and acts of a spec from its explicit stage list, no graph.

The twin of `archc.ir.analysis` (which counts the traced graph) in pycls' style: one `*_cx` function
per layer updates a running `Cx` (the spatial size h x w and the three totals), and every
registered block, stem type and head type has a twin that calls them for the layers its module
builds (`archc.frontend.blocks`, in the train form the spec builds). The design space sampler needs
this: counting a graph takes a traced model and shape propagation (~0.1-0.5 s), this takes
microseconds. Tests keep the two equal on every shipped spec, on random specs over every block
and on samples of every space.

Counting rules (pycls, as `archc.ir.analysis`), per sample:
- conv k_h x k_w, c_in -> c_out, g groups, output h' x w': flops `k_h k_w c_in c_out h' w' / g`
  (+ `c_out h' w'` with a bias), params `k_h k_w c_in c_out / g` (+ c_out), acts `c_out h' w'`;
  h' = (h + 2 p - k) // s + 1.
- BN (2d or 1d): params 2C (gamma, beta), no flops, no acts. Linear: flops = params =
  `c_in c_out + c_out`, acts c_out. A layer scale (`x * gamma`, gamma of shape (C, 1, 1)):
  params C.
- Max/avg pooling with a window: acts `C h' w'`, h' as a conv's, or with ceil_mode torch's
  `ceil((h + 2 p - k) / s) + 1`, less one if that window would start past h + p. Adaptive average
  pooling (global, or AlexNet's 6 x 6), activations, adds, the SE multiply, channel shuffles,
  dropout, stochastic depth (eval mode) and the deep-training activation count nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from archc.errors import SpecError
from archc.frontend.spec import HeadSpec, Spec, StageSpec, StemSpec, se_in_alternate_blocks


@dataclass
class Cx:
    h: int
    w: int
    flops: int = 0
    params: int = 0
    acts: int = 0

    def as_tuple(self) -> tuple[int, int, int]:
        return self.flops, self.params, self.acts


def _out_size(size: int, kernel: int, stride: int, padding: int, ceil_mode: bool = False) -> int:
    if not ceil_mode:
        return (size + 2 * padding - kernel) // stride + 1
    out = -(-(size + 2 * padding - kernel) // stride) + 1
    return out - 1 if (out - 1) * stride >= size + padding else out


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
    """`archc.frontend.blocks.conv_bn`: conv without bias, then BN."""
    return norm2d_cx(conv2d_cx(cx, w_in, w_out, kernel, stride, groups, padding=padding), w_out)


def pool2d_cx(cx: Cx, width: int, kernel: int, stride: int, padding: int,
              ceil_mode: bool = False) -> Cx:
    cx.h = _out_size(cx.h, kernel, stride, padding, ceil_mode)
    cx.w = _out_size(cx.w, kernel, stride, padding, ceil_mode)
    cx.acts += width * cx.h * cx.w
    return cx


def linear_cx(cx: Cx, w_in: int, w_out: int) -> Cx:
    """Linear with bias on a flattened input."""
    cx.flops += w_in * w_out + w_out
    cx.params += w_in * w_out + w_out
    cx.acts += w_out
    return cx


def _add(cx: Cx, other: Cx, times: int = 1) -> Cx:
    """Add `times` the totals of `other` to cx (its spatial size stays)."""
    cx.flops += times * other.flops
    cx.params += times * other.params
    cx.acts += times * other.acts
    return cx


def _branch(cx: Cx, layers: Callable[[Cx], Cx]) -> Cx:
    """Run `layers` from cx's spatial size, keep their totals, restore the size (a side branch)."""
    return _add(cx, layers(Cx(cx.h, cx.w)))


def se_cx(cx: Cx, stage: StageSpec, w_in: int, width: int) -> Cx:
    """`archc.frontend.blocks.squeeze_excitation`: two 1x1 convs with bias at 1x1 (pooled) size."""
    se_width = stage.se_width(w_in, width)
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


def conv_bias_bn_cx(cx: Cx, w_in: int, w_out: int, kernel: int = 1, stride: int = 1) -> Cx:
    """`archc.frontend.blocks._conv_bias_bn` (VanillaNet): conv with bias and no padding, then
    BN."""
    return norm2d_cx(conv2d_cx(cx, w_in, w_out, kernel, stride, bias=True, padding=0), w_out)


def activation_series_cx(cx: Cx, width: int) -> Cx:
    """`archc.frontend.blocks.ActivationSeries`: depthwise 7x7 conv (padding 3, no bias), then
    BN."""
    return norm2d_cx(conv2d_cx(cx, width, width, 7, groups=width), width)


def mobileone_unit_cx(cx: Cx, w_in: int, w_out: int, kernel: int, stride: int, groups: int,
                      branches: int, post_bn: bool = False) -> Cx:
    """`archc.frontend.blocks.MobileOneUnit` without its SE: `branches` kxk conv + BN, a 1x1 scale
    branch when k > 1 (conv + BN; a bare conv with `post_bn`), an identity BN when the shapes match
    (none with `post_bn`, which has one BN after the sum instead)."""
    if kernel > 1:
        scale = conv2d_cx if post_bn else conv_bn_cx
        _branch(cx, lambda side: scale(side, w_in, w_out, 1, stride, groups))
    if w_in == w_out and stride == 1 and not post_bn:
        norm2d_cx(cx, w_out)
    for _ in range(branches - 1):
        _branch(cx, lambda side: conv_bn_cx(side, w_in, w_out, kernel, stride, groups))
    conv_bn_cx(cx, w_in, w_out, kernel, stride, groups)
    return norm2d_cx(cx, w_out) if post_bn else cx


# ---------------------------------------------------------------------------------------------
# Block twins: (cx, w_in, w_out, stride, stage) -> cx, in the order `archc.frontend.blocks` builds
# layers.


def res_bottleneck_cx(cx: Cx, w_in: int, w_out: int, stride: int, stage: StageSpec) -> Cx:
    w_b = int(round(stage.width * stage.bottleneck))
    groups = w_b // stage.group_width if stage.group_width else stage.groups or 1
    _projection_cx(cx, w_in, w_out, stride)
    conv_bn_cx(cx, w_in, w_b, 1)
    conv_bn_cx(cx, w_b, w_b, 3, stride, groups)
    if stage.se_position == "inner":
        se_cx(cx, stage, w_in, w_b)
    conv_bn_cx(cx, w_b, w_out, 1)
    return se_cx(cx, stage, w_in, w_out) if stage.se_position == "output" else cx


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
    moved = stage.remove_activations and stage.expansion != 1  # the expand conv pads
    pad = (stage.kernel - 1) // 2
    if stage.expansion != 1:
        conv_bn_cx(cx, w_in, hidden, 1, padding=pad if moved else 0)
    conv_bn_cx(cx, hidden, hidden, stage.kernel, stride, hidden, padding=0 if moved else pad)
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


def conv_cx(cx: Cx, w_in: int, w_out: int, stride: int, stage: StageSpec) -> Cx:
    """`conv`: one kxk conv with bias, padding `padding` or (k - 1) // 2."""
    return conv2d_cx(cx, w_in, w_out, stage.kernel, stride, stage.groups or 1, bias=True,
                     padding=stage.padding)


def fire_cx(cx: Cx, w_in: int, w_out: int, stride: int, stage: StageSpec) -> Cx:
    squeeze = int(round(w_out * stage.bottleneck))
    conv2d_cx(cx, w_in, squeeze, 1, bias=True)
    _branch(cx, lambda side: conv2d_cx(side, squeeze, w_out // 2, 1, bias=True))
    return conv2d_cx(cx, squeeze, w_out // 2, 3, bias=True)


def repvgg_cx(cx: Cx, w_in: int, w_out: int, stride: int, stage: StageSpec) -> Cx:
    groups = stage.train_form_groups(w_in)
    _branch(cx, lambda side: conv_bn_cx(side, w_in, w_out, 1, stride, groups))
    if w_in == w_out and stride == 1:
        norm2d_cx(cx, w_out)
    return conv_bn_cx(cx, w_in, w_out, 3, stride, groups)


def qarepvgg_cx(cx: Cx, w_in: int, w_out: int, stride: int, stage: StageSpec) -> Cx:
    """3x3 conv + BN, a bare 1x1 conv, the identity (no params), one BN after the sum."""
    groups = stage.train_form_groups(w_in)
    _branch(cx, lambda side: conv2d_cx(side, w_in, w_out, 1, stride, groups))
    conv_bn_cx(cx, w_in, w_out, 3, stride, groups)
    return norm2d_cx(cx, w_out)


def acb_cx(cx: Cx, w_in: int, w_out: int, stride: int, stage: StageSpec) -> Cx:
    groups = stage.train_form_groups(w_in)
    for kernel in ((1, 3), (3, 1)):
        _branch(cx, lambda side, k=kernel: conv_bn_cx(side, w_in, w_out, k, stride, groups))
    return conv_bn_cx(cx, w_in, w_out, 3, stride, groups)


def dbb_cx(cx: Cx, w_in: int, w_out: int, stride: int, stage: StageSpec) -> Cx:
    groups = stage.train_form_groups(w_in)

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


def mobileone_cx(cx: Cx, w_in: int, w_out: int, stride: int, stage: StageSpec) -> Cx:
    branches = stage.branches or 1
    mobileone_unit_cx(cx, w_in, w_in, 3, stride, w_in, branches)
    return mobileone_unit_cx(cx, w_in, w_out, 1, 1, 1, branches)


def qamobileone_cx(cx: Cx, w_in: int, w_out: int, stride: int, stage: StageSpec) -> Cx:
    branches = stage.branches or 1
    mobileone_unit_cx(cx, w_in, w_in, 3, stride, w_in, branches, post_bn=True)
    return mobileone_unit_cx(cx, w_in, w_out, 1, 1, 1, branches, post_bn=True)


def mobileone_conv_cx(cx: Cx, w_in: int, w_out: int, stride: int, stage: StageSpec) -> Cx:
    """`mobileone_unit`: one MobileOne unit, then the stage's SE on w_out."""
    mobileone_unit_cx(cx, w_in, w_out, stage.kernel, stride, stage.unit_groups(w_in),
                      stage.branches or 1)
    return se_cx(cx, stage, w_in, w_out)


def repmixer_cx(cx: Cx, w_in: int, w_out: int, stride: int, stage: StageSpec) -> Cx:
    """[PatchEmbed: 7x7 and 3x3 one-channel-per-group conv + BN, a 1x1 MobileOne unit], the
    depthwise kxk mixer unit, the BN subtracted, the ConvFFN (dw 7x7 + BN, two 1x1 with bias),
    two layer scales of w_out params each."""
    if stride > 1 or w_in != w_out:
        _branch(cx, lambda side: conv_bn_cx(side, w_in, w_out, 7, stride, w_in))
        conv_bn_cx(cx, w_in, w_out, 3, stride, w_in)
        mobileone_unit_cx(cx, w_out, w_out, 1, 1, 1, 1)
    mobileone_unit_cx(cx, w_out, w_out, stage.kernel, 1, w_out, 1)
    norm2d_cx(cx, w_out)
    hidden = int(w_out * stage.expansion)
    conv_bn_cx(cx, w_out, w_out, 7, 1, w_out)
    conv2d_cx(cx, w_out, hidden, 1, bias=True)
    conv2d_cx(cx, hidden, w_out, 1, bias=True)
    if stage.layer_scale is not None:
        cx.params += 2 * w_out
    return cx


def _repvit_mixer_ffn_cx(cx: Cx, width: int, stage: StageSpec, se: StageSpec | None) -> Cx:
    """A stride-1 RepViT block on `width`: the `RepVGGDepthwise` mixer (dw kxk + BN, dw 1x1
    with bias, BN after the sum), [SE], the FFN (1x1 + BN to int(t w), 1x1 + BN back)."""
    _branch(cx, lambda side: conv2d_cx(side, width, width, 1, groups=width, bias=True))
    conv_bn_cx(cx, width, width, stage.kernel, 1, width)
    norm2d_cx(cx, width)
    if se is not None:
        se_cx(cx, se, width, width)
    hidden = int(width * stage.expansion)
    conv_bn_cx(cx, width, hidden, 1)
    return conv_bn_cx(cx, hidden, width, 1)


def repvit_cx(cx: Cx, w_in: int, w_out: int, stride: int, stage: StageSpec) -> Cx:
    """Stride 1 (w_in = w_out): mixer, SE, FFN; stride 2: a stride-1 block on w_in without SE,
    dw kxk stride-2 conv + BN, 1x1 conv + BN to w_out, FFN."""
    if stride == 1:
        return _repvit_mixer_ffn_cx(cx, w_out, stage, stage)
    _repvit_mixer_ffn_cx(cx, w_in, stage, None)
    conv_bn_cx(cx, w_in, w_in, stage.kernel, stride, w_in)
    conv_bn_cx(cx, w_in, w_out, 1)
    hidden = int(w_out * stage.expansion)
    conv_bn_cx(cx, w_out, hidden, 1)
    return conv_bn_cx(cx, hidden, w_out, 1)


def vanillanet_cx(cx: Cx, w_in: int, w_out: int, stride: int, stage: StageSpec) -> Cx:
    """1x1 conv with bias + BN w_in -> w_in and w_in -> w_out, [max-pool window = stride = s],
    the activation series. The deep-training activation counts nothing (at λ = 1 it is not in
    the graph at all)."""
    conv_bias_bn_cx(cx, w_in, w_in)
    conv_bias_bn_cx(cx, w_in, w_out)
    if stride > 1:
        pool2d_cx(cx, w_out, stride, stride, 0)
    return activation_series_cx(cx, w_out)


BLOCK_CX: dict[str, Callable[[Cx, int, int, int, StageSpec], Cx]] = {
    "res_bottleneck": res_bottleneck_cx,
    "res_basic": res_basic_cx,
    "vanilla": vanilla_cx,
    "dw_separable": dw_separable_cx,
    "inverted_residual": inverted_residual_cx,
    "shufflenet_v1": shufflenet_v1_cx,
    "shufflenet_v2": shufflenet_v2_cx,
    "reducenet": reducenet_cx,
    "conv": conv_cx,
    "fire": fire_cx,
    "repvgg": repvgg_cx,
    "qarepvgg": qarepvgg_cx,
    "acb": acb_cx,
    "dbb": dbb_cx,
    "mobileone": mobileone_cx,
    "qamobileone": qamobileone_cx,
    "mobileone_unit": mobileone_conv_cx,
    "repmixer": repmixer_cx,
    "repvit": repvit_cx,
    "vanillanet": vanillanet_cx,
}
# blocks whose fields vary along a stage (`Block.stage_at` in `archc.frontend.blocks`)
STAGE_AT: dict[str, Callable[[StageSpec, int], StageSpec]] = {
    "repvit": se_in_alternate_blocks,
}


# ---------------------------------------------------------------------------------------------
# Stems and heads (`archc.frontend.blocks.build_stem`, `build_head`)


def stem_cx(cx: Cx, stem: StemSpec, w_in: int) -> int:
    """Count the stem (as built: compound-scaled width); return the width leaving it."""
    width = stem.channels
    if stem.type == "none":
        return w_in
    if stem.type == "fastvit":
        mobileone_unit_cx(cx, w_in, width, 3, 2, 1, 1)
        mobileone_unit_cx(cx, width, width, 3, 2, width, 1)
        mobileone_unit_cx(cx, width, width, 1, 1, 1, 1)
    elif stem.type == "repvit":
        conv_bn_cx(cx, w_in, width // 2, 3, 2)
        conv_bn_cx(cx, width // 2, width, 3, 2)
    elif stem.type == "vanillanet":
        conv_bias_bn_cx(cx, w_in, width, stem.stride, stem.stride)
        conv_bias_bn_cx(cx, width, width)
        activation_series_cx(cx, width)
    else:
        conv_bn_cx(cx, w_in, width, 7 if stem.type == "resnet" else 3, stem.stride)
        if stem.type in ("resnet", "simple_pool"):
            pool2d_cx(cx, width, 3, 2, 1)
    return width


def head_cx(cx: Cx, head: HeadSpec, w_in: int, num_classes: int) -> Cx:
    """Count the head (as built); adaptive average pools count nothing."""
    if head.type == "conv_classifier":
        return conv2d_cx(cx, w_in, num_classes, 1, bias=True)
    if head.type == "vanillanet":
        cx.h = cx.w = 1
        conv_bias_bn_cx(cx, w_in, num_classes)
        return conv2d_cx(cx, num_classes, num_classes, 1, bias=True)
    width = w_in
    if head.width is not None:
        conv_bn_cx(cx, width, head.width, 1)
        width = head.width
    cx.h = cx.w = head.pool_size
    width *= head.pool_size**2
    for hidden in head.hidden:
        linear_cx(cx, width, hidden)
        width = hidden
    for _ in range(2 if head.distillation else 1):  # fc, and DeiT's dist_fc
        if head.batch_norm:
            norm2d_cx(cx, width)
        linear_cx(cx, width, num_classes)
    return cx


def _same_fields(stage: StageSpec, index: int) -> StageSpec:
    return stage


def _stage_cx(cx: Cx, stage: StageSpec, block_cx: Callable, w_in: int) -> Cx:
    """Count a stage's blocks and pool. Blocks after the first have the same fields (but where
    `STAGE_AT` varies them), widths and stride 1: a block that keeps the spatial size is counted
    once and multiplied; one that shrinks it (a `conv` with less than (k - 1) / 2 padding) is
    counted block by block."""
    fields_at = STAGE_AT.get(stage.block, _same_fields)
    block_cx(cx, w_in, stage.width, stage.stride, fields_at(stage, 0))
    repeated: dict[str, tuple[StageSpec, int]] = {}  # distinct fields -> (fields, block count)
    for index in range(1, stage.depth):
        fields = fields_at(stage, index)
        key = "" if fields is stage else fields.model_dump_json()
        count = repeated[key][1] if key in repeated else 0
        repeated[key] = (fields, count + 1)
    for fields, count in repeated.values():
        block = block_cx(Cx(cx.h, cx.w), stage.width, stage.width, 1, fields)
        if (block.h, block.w) == (cx.h, cx.w):
            _add(cx, block, count)
            continue
        for _ in range(count):
            block_cx(cx, stage.width, stage.width, 1, fields)
    if stage.pool is not None:
        pool = stage.pool
        pool2d_cx(cx, stage.width, pool.kernel, pool.stride, pool.padding, pool.ceil_mode)
    return cx


def spec_complexity(
    spec: Spec, stages: list[StageSpec] | None = None, input_size: int | None = None
) -> tuple[int, int, int]:
    """(flops, params, acts) of `spec` for one square input (default: the spec's input size);
    `stages` is `spec.stages()` when the caller already has it."""
    side = input_size or spec.input.size
    cx = Cx(side, side)
    width = stem_cx(cx, spec.built_stem(), spec.input.channels)
    for index, stage in enumerate(spec.stages() if stages is None else stages):
        block_cx = BLOCK_CX.get(stage.block)
        if block_cx is None:
            raise SpecError(
                f"block {stage.block!r} has no analytic complexity twin "
                f"(archc.frontend.analytic_complexity.BLOCK_CX)",
                f"body.stages[{index}].block",
            )
        _stage_cx(cx, stage, block_cx, width)
        width = stage.width
    return head_cx(cx, spec.built_head(), width, spec.num_classes).as_tuple()
