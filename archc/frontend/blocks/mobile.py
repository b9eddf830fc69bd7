"""Lightweight blocks built on depthwise convs and channel shuffles: MobileNetV1's depthwise
separable block, the inverted residual (MobileNetV2/V3, EfficientNet's MBConv, DepthShrinker) and
ShuffleNet's units; each with its analytic twin.

Notation: s = stride, act = the stage's activation, BN after every conv, convs without bias and
with padding (k-1)//2, k = the stage's `kernel`.

- `dw_separable`: `pw(se(dw(x)))`, dw = 3x3 depthwise stride s act, pw = 1x1 act.
- `inverted_residual`: `[x +] project(se(dw(expand(x))))`, h = round(t * w_in), expand = 1x1
  w_in->h act (absent when t = 1), dw = kxk depthwise stride s act, project = 1x1 h->w_out with
  no activation (linear bottleneck); the residual only when s = 1 and w_in = w_out (with
  stochastic depth in training); `remove_activations`: DepthShrinker.
- `shufflenet_v1`: f = c(b(shuffle_g(a(x)))), a = 1x1 w_in->m with g groups act, b = 3x3
  depthwise stride s, c = 1x1 m->w_f with g groups, m = round(w_out * bottleneck_multiplier).
  s = 1: `act(x + f(x))`, w_f = w_out; s > 1: `act(cat(avgpool3x3_s(x), f(x)))`, w_f = w_out - w_in.
- `shufflenet_v2`, h = w_out / 2: s = 1: `shuffle_2(cat(x1, f(x2)))` with (x1, x2) the channel
  halves of x; s > 1: `shuffle_2(cat(g(x), f(x)))`; f = 1x1 ->h act, 3x3 depthwise stride s,
  1x1 h->h act; g = 3x3 depthwise stride s, 1x1 w_in->h act.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

from archc.frontend.blocks.counting import Cx, branch_cx, pool2d_cx
from archc.frontend.blocks.layers import (
    ACTIVATIONS,
    StochasticDepth,
    channel_shuffle,
    conv_bn,
    conv_bn_cx,
    squeeze_excitation,
    squeeze_excitation_cx,
    with_se,
)
from archc.frontend.blocks.registry import BOTTLENECK_FIELDS, SE_FIELDS, Block, register_block
from archc.frontend.spec import StageSpec


@register_block
class DepthwiseSeparable(Block):
    """MobileNetV1 (Howard et al. 2017): `pw(se(dw(x)))`."""

    name = "dw_separable"
    uses = SE_FIELDS | {"activation"}

    @staticmethod
    def complexity(cx: Cx, w_in: int, w_out: int, stride: int, stage: StageSpec) -> Cx:
        conv_bn_cx(cx, w_in, w_in, 3, stride, w_in)
        squeeze_excitation_cx(cx, stage, w_in, w_in)
        return conv_bn_cx(cx, w_in, w_out, 1)

    def __init__(self, w_in: int, w_out: int, stride: int, stage: StageSpec):
        super().__init__()
        self.dw = conv_bn(w_in, w_in, 3, stride, w_in, stage.activation)
        self.se = squeeze_excitation(stage, w_in, w_in)
        self.pw = conv_bn(w_in, w_out, 1, act=stage.activation)

    def forward(self, x: Tensor) -> Tensor:
        x = self.dw(x)
        if self.se is not None:
            x = self.se(x)
        return self.pw(x)


@register_block
class InvertedResidual(Block):
    """MobileNetV2 (Sandler et al. 2018), MobileNetV3's and EfficientNet's MBConv:
    `[x +] project(se(dw(expand(x))))`, as torchvision: h = int(round(t * w_in)), no expand conv
    exactly when t = 1, a `kernel` x `kernel` depthwise conv.

    With `remove_activations` (DepthShrinker, Fu et al. 2022) the block has no activation and is
    linear, `[x +] project(dw(expand(x)))`; its expand conv zero-pads by (k - 1) / 2 and the
    depthwise conv does not pad, so the block is exactly one dense k x k conv of x (zero-padded
    by (k - 1) / 2), border included, which `archc fuse` can merge it into (R6, R7). Without
    that move the border would read the expand conv's bias instead of 0 (docs/rewrites.md, R6)."""

    name = "inverted_residual"
    uses = SE_FIELDS | {"expansion", "activation", "kernel", "remove_activations"}
    stochastic_depth = True

    @classmethod
    def check(cls, stage, w_in):
        for width in (w_in, stage.width):
            if int(round(stage.expansion * width)) < 1:
                return "expansion", f"hidden width round({stage.expansion:g} * {width}) is 0"
        if stage.remove_activations and stage.se_ratio:
            return "remove_activations", (
                "a block with squeeze-excitation is not linear without its activations: "
                "set se_ratio to 0")
        return None

    @staticmethod
    def complexity(cx: Cx, w_in: int, w_out: int, stride: int, stage: StageSpec) -> Cx:
        hidden = int(round(stage.expansion * w_in))
        moved = stage.remove_activations and stage.expansion != 1  # the expand conv pads
        pad = (stage.kernel - 1) // 2
        if stage.expansion != 1:
            conv_bn_cx(cx, w_in, hidden, 1, padding=pad if moved else 0)
        conv_bn_cx(cx, hidden, hidden, stage.kernel, stride, hidden, padding=0 if moved else pad)
        squeeze_excitation_cx(cx, stage, w_in, hidden)
        return conv_bn_cx(cx, hidden, w_out, 1)

    def __init__(self, w_in: int, w_out: int, stride: int, stage: StageSpec):
        super().__init__()
        hidden = int(round(stage.expansion * w_in))
        act = None if stage.remove_activations else stage.activation
        moved = stage.remove_activations and stage.expansion != 1  # the expand conv pads
        pad = (stage.kernel - 1) // 2
        f: OrderedDict[str, nn.Module] = OrderedDict()
        if stage.expansion != 1:
            f["expand"] = conv_bn(w_in, hidden, 1, act=act, padding=pad if moved else 0)
        f["dw"] = conv_bn(hidden, hidden, stage.kernel, stride, hidden, act,
                          padding=0 if moved else pad)
        with_se(f, stage, w_in, hidden)
        f["project"] = conv_bn(hidden, w_out, 1, act=None)
        self.f = nn.Sequential(f)
        self.residual = stride == 1 and w_in == w_out
        self.drop_path: StochasticDepth | None = None  # set by the network (drop_path_rate)

    def forward(self, x: Tensor) -> Tensor:
        if not self.residual:
            return self.f(x)
        y = self.f(x)
        if self.drop_path is not None:
            y = self.drop_path(y)
        return x + y


@register_block
class ShuffleNetV1(Block):
    """ShuffleNet unit (Zhang et al. 2018, Fig. 2 b/c). With `dense_first` the first 1x1 conv of
    the stage's first (strided) unit is dense and not followed by a shuffle (the paper's Stage 2,
    whose input has only 24 channels)."""

    name = "shufflenet_v1"
    uses = BOTTLENECK_FIELDS | {"groups", "dense_first", "activation"}

    @classmethod
    def check(cls, stage, w_in):
        g, width = stage.groups or 1, stage.width
        mid = int(round(width * stage.bottleneck))
        if stage.stride == 1 and w_in != width:
            return "width", (
                f"a stride-1 shufflenet_v1 unit adds its input: width {width} must equal the "
                f"input width {w_in}"
            )
        if stage.stride > 1 and width <= w_in:
            return "width", (
                f"a strided shufflenet_v1 unit concatenates its input: width {width} must exceed "
                f"the input width {w_in}"
            )
        if stage.dense_first and stage.stride == 1:
            return "dense_first", "dense_first applies to a strided stage's first unit"
        divisible = [(mid, "bottleneck width"), (width, "width")]
        if stage.stride > 1:  # then the input width is a multiple too, unless dense_first
            divisible.append((width - w_in, f"width - input width = {width} - {w_in} ="))
        for value, what in divisible:
            if value < 1 or value % g:
                return "groups", f"{what} {value} is not a positive multiple of groups {g}"
        return None

    @staticmethod
    def complexity(cx: Cx, w_in: int, w_out: int, stride: int, stage: StageSpec) -> Cx:
        groups = stage.groups or 1
        mid = int(round(w_out * stage.bottleneck))
        first_groups = 1 if stage.dense_first and stride > 1 else groups
        if stride > 1:
            branch_cx(cx, lambda side: pool2d_cx(side, w_in, 3, stride, 1))
        conv_bn_cx(cx, w_in, mid, 1, groups=first_groups)
        conv_bn_cx(cx, mid, mid, 3, stride, mid)
        return conv_bn_cx(cx, mid, w_out - w_in if stride > 1 else w_out, 1, groups=groups)

    def __init__(self, w_in: int, w_out: int, stride: int, stage: StageSpec):
        super().__init__()
        groups = stage.groups or 1
        mid = int(round(w_out * stage.bottleneck))
        self.shuffle_groups = 1 if stage.dense_first and stride > 1 else groups
        self.a = conv_bn(w_in, mid, 1, groups=self.shuffle_groups, act=stage.activation)
        self.b = conv_bn(mid, mid, 3, stride, mid, act=None)
        self.c = conv_bn(mid, w_out - w_in if stride > 1 else w_out, 1, groups=groups, act=None)
        self.pool = nn.AvgPool2d(3, stride, padding=1) if stride > 1 else None
        self.act = ACTIVATIONS[stage.activation]()

    def forward(self, x: Tensor) -> Tensor:
        y = self.a(x)
        if self.shuffle_groups > 1:
            y = channel_shuffle(y, self.shuffle_groups)
        y = self.c(self.b(y))
        if self.pool is None:
            return self.act(x + y)
        return self.act(torch.cat([self.pool(x), y], 1))


@register_block
class ShuffleNetV2(Block):
    """ShuffleNet V2 unit (Ma et al. 2018, Fig. 3 c/d), as torchvision's `InvertedResidual`."""

    name = "shufflenet_v2"
    uses = frozenset({"activation"})

    @classmethod
    def check(cls, stage, w_in):
        if stage.width % 2:
            return "width", f"shufflenet_v2 splits channels in halves: width {stage.width} is odd"
        if stage.stride == 1 and w_in != stage.width:
            return "width", (
                f"a stride-1 shufflenet_v2 unit splits its input: width {stage.width} must equal "
                f"the input width {w_in}"
            )
        return None

    @staticmethod
    def complexity(cx: Cx, w_in: int, w_out: int, stride: int, stage: StageSpec) -> Cx:
        half = w_out // 2
        if stride > 1:
            branch_cx(cx, lambda side: conv_bn_cx(
                conv_bn_cx(side, w_in, w_in, 3, stride, w_in), w_in, half, 1))
        conv_bn_cx(cx, w_in if stride > 1 else half, half, 1)
        conv_bn_cx(cx, half, half, 3, stride, half)
        return conv_bn_cx(cx, half, half, 1)

    def __init__(self, w_in: int, w_out: int, stride: int, stage: StageSpec):
        super().__init__()
        half, act = w_out // 2, stage.activation
        self.branch1 = None
        if stride > 1:
            self.branch1 = nn.Sequential(
                OrderedDict(
                    dw=conv_bn(w_in, w_in, 3, stride, w_in, act=None),
                    pw=conv_bn(w_in, half, 1, act=act),
                )
            )
        self.branch2 = nn.Sequential(
            OrderedDict(
                a=conv_bn(w_in if stride > 1 else half, half, 1, act=act),
                b=conv_bn(half, half, 3, stride, half, act=None),
                c=conv_bn(half, half, 1, act=act),
            )
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.branch1 is None:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat([x1, self.branch2(x2)], 1)
        else:
            out = torch.cat([self.branch1(x), self.branch2(x)], 1)
        return channel_shuffle(out, 2)
