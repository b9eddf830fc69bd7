"""pycls' AnyNet blocks: the residual bottleneck (RegNetX/Y, ResNet-50 v1.5, ResNeXt), the basic
residual block (ResNet-18/34) and the plain `vanilla` block; each with its analytic twin.

Notation: s = stride, act = the stage's activation, BN after every conv, convs without bias and
with padding (k-1)//2; proj = 1x1 conv stride s + BN, present only when w_in != w_out or s != 1.

- `res_bottleneck`: `act(proj(x) + c(se(b(a(x)))))`, a = 1x1 w_in->w_b act, b = 3x3 stride s
  (v1.5: the stride is on the 3x3) with w_b/g groups (or `groups`) act, c = 1x1 w_b->w_out;
  w_b = round(w_out * bottleneck_multiplier). `se_position: output` moves SE after c (SE-ResNet).
- `res_basic`: `act(proj(x) + se(b(a(x))))`, a = 3x3 stride s act, b = 3x3.
- `vanilla`: `b(a(x))`, a = 3x3 stride s act, b = 3x3 act.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

from archc.frontend.blocks.counting import Cx
from archc.frontend.blocks.layers import (
    ACTIVATIONS,
    conv_bn,
    conv_bn_cx,
    projection,
    projection_cx,
    squeeze_excitation_cx,
    with_se,
)
from archc.frontend.blocks.registry import BOTTLENECK_FIELDS, SE_FIELDS, Block, register_block
from archc.frontend.spec import StageSpec


class Residual(Block):
    """`act(proj(x) + f(x))`: subclasses build `proj` (None: the identity), `f` and `act`."""

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.proj is None else self.proj(x)
        return self.act(shortcut + self.f(x))


@register_block
class ResBottleneck(Residual):
    name = "res_bottleneck"
    uses = SE_FIELDS | BOTTLENECK_FIELDS | {"group_width", "groups", "activation", "se_position"}

    @staticmethod
    def bottleneck_width(stage: StageSpec) -> int:
        return int(round(stage.width * stage.bottleneck))

    @classmethod
    def check(cls, stage, w_in):
        w_b = cls.bottleneck_width(stage)
        if w_b < 1:
            return (
                "bottleneck_multiplier",
                f"bottleneck width round({stage.width} * {stage.bottleneck}) is 0",
            )
        which = "group_width" if stage.group_width is not None else "groups"
        divisor = stage.group_width or stage.groups
        if divisor is not None and w_b % divisor:
            return which, (
                f"bottleneck width {w_b} (width {stage.width} x bottleneck {stage.bottleneck:g}) "
                f"is not divisible by {which} {divisor}"
            )
        return None

    @staticmethod
    def complexity(cx: Cx, w_in: int, w_out: int, stride: int, stage: StageSpec) -> Cx:
        w_b = ResBottleneck.bottleneck_width(stage)
        groups = w_b // stage.group_width if stage.group_width else stage.groups or 1
        projection_cx(cx, w_in, w_out, stride)
        conv_bn_cx(cx, w_in, w_b, 1)
        conv_bn_cx(cx, w_b, w_b, 3, stride, groups)
        if stage.se_position == "inner":
            squeeze_excitation_cx(cx, stage, w_in, w_b)
        conv_bn_cx(cx, w_b, w_out, 1)
        if stage.se_position == "output":
            squeeze_excitation_cx(cx, stage, w_in, w_out)
        return cx

    def __init__(self, w_in: int, w_out: int, stride: int, stage: StageSpec):
        super().__init__()
        w_b = self.bottleneck_width(stage)
        groups = w_b // stage.group_width if stage.group_width else stage.groups or 1
        act = stage.activation
        self.proj = projection(w_in, w_out, stride)
        f: OrderedDict[str, nn.Module] = OrderedDict(
            a=conv_bn(w_in, w_b, 1, act=act), b=conv_bn(w_b, w_b, 3, stride, groups, act)
        )
        if stage.se_position == "inner":
            with_se(f, stage, w_in, w_b)
        f["c"] = conv_bn(w_b, w_out, 1, act=None)
        if stage.se_position == "output":
            with_se(f, stage, w_in, w_out)
        self.f = nn.Sequential(f)
        self.act = ACTIVATIONS[act]()


@register_block
class ResBasic(Residual):
    name = "res_basic"
    uses = SE_FIELDS | {"activation"}

    @staticmethod
    def complexity(cx: Cx, w_in: int, w_out: int, stride: int, stage: StageSpec) -> Cx:
        projection_cx(cx, w_in, w_out, stride)
        conv_bn_cx(cx, w_in, w_out, 3, stride)
        conv_bn_cx(cx, w_out, w_out, 3)
        return squeeze_excitation_cx(cx, stage, w_in, w_out)

    def __init__(self, w_in: int, w_out: int, stride: int, stage: StageSpec):
        super().__init__()
        act = stage.activation
        self.proj = projection(w_in, w_out, stride)
        f: OrderedDict[str, nn.Module] = OrderedDict(
            a=conv_bn(w_in, w_out, 3, stride, act=act), b=conv_bn(w_out, w_out, 3, act=None)
        )
        with_se(f, stage, w_in, w_out)
        self.f = nn.Sequential(f)
        self.act = ACTIVATIONS[act]()


@register_block
class Vanilla(Block):
    name = "vanilla"
    uses = frozenset({"activation"})

    @staticmethod
    def complexity(cx: Cx, w_in: int, w_out: int, stride: int, stage: StageSpec) -> Cx:
        conv_bn_cx(cx, w_in, w_out, 3, stride)
        return conv_bn_cx(cx, w_out, w_out, 3)

    def __init__(self, w_in: int, w_out: int, stride: int, stage: StageSpec):
        super().__init__()
        self.a = conv_bn(w_in, w_out, 3, stride, act=stage.activation)
        self.b = conv_bn(w_out, w_out, 3, act=stage.activation)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(self.a(x))
