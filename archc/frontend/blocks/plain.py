"""Blocks without BatchNorm, convs with bias (AlexNet, SqueezeNet); each with its analytic twin.

- `conv`: `act(conv(x))`, one kxk conv with bias (padding `padding` or (k - 1) // 2).
- `fire`: `cat(e1(s(x)), e3(s(x)))`, SqueezeNet's fire module.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

from archc.frontend.blocks.counting import Cx, branch_cx, conv2d_cx
from archc.frontend.blocks.layers import ACTIVATIONS
from archc.frontend.blocks.registry import BOTTLENECK_FIELDS, Block, register_block
from archc.frontend.spec import StageSpec


def conv_act(w_in: int, w_out: int, kernel: int, stride: int = 1, padding: int | None = None,
             groups: int = 1, act: str = "relu") -> nn.Sequential:
    """conv with bias (padding (k-1)//2 unless given) -> activation, named conv/act."""
    padding = (kernel - 1) // 2 if padding is None else padding
    return nn.Sequential(OrderedDict(
        conv=nn.Conv2d(w_in, w_out, kernel, stride, padding, groups=groups, bias=True),
        act=ACTIVATIONS[act](),
    ))


@register_block
class Conv(Block):
    """A plain conv layer, `act(conv(x))`, kernel x kernel with bias, no BN (AlexNet: Krizhevsky
    et al. 2012, groups 2 for the paper's two towers; SqueezeNet's first conv)."""

    name = "conv"
    uses = frozenset({"kernel", "padding", "groups", "activation"})
    has_batch_norm = False

    @classmethod
    def check(cls, stage, w_in):
        groups = stage.groups or 1
        for width, what in ((w_in, "input width"), (stage.width, "width")):
            if width % groups:
                return "groups", f"{what} {width} is not divisible by groups {groups}"
        if stage.padding is not None and stage.padding > stage.kernel // 2:
            return "padding", f"padding {stage.padding} is more than half the kernel {stage.kernel}"
        return None

    @staticmethod
    def complexity(cx: Cx, w_in: int, w_out: int, stride: int, stage: StageSpec) -> Cx:
        return conv2d_cx(cx, w_in, w_out, stage.kernel, stride, stage.groups or 1, bias=True,
                         padding=stage.padding)

    def __init__(self, w_in: int, w_out: int, stride: int, stage: StageSpec):
        super().__init__()
        layer = conv_act(w_in, w_out, stage.kernel, stride, stage.padding, stage.groups or 1,
                         stage.activation)
        self.conv, self.act = layer.conv, layer.act

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.conv(x))


@register_block
class Fire(Block):
    """SqueezeNet's fire module (Iandola et al. 2016): `cat(e1(s(x)), e3(s(x)))`, squeeze s = 1x1
    w_in -> w_s ReLU with w_s = round(width * bottleneck_multiplier) (1/8 in SqueezeNet), expand
    e1 = 1x1 and e3 = 3x3 (padding 1), each w_s -> width / 2 ReLU; every conv with bias, no BN.
    Stride 1: SqueezeNet downsamples with the stages' pools."""

    name = "fire"
    has_batch_norm = False
    uses = BOTTLENECK_FIELDS

    @classmethod
    def check(cls, stage, w_in):
        if stage.stride != 1:
            return "stride", "a fire module has stride 1: downsample with the stage's pool"
        if stage.width % 2:
            return "width", (f"a fire module concatenates two equal expand convs: width "
                             f"{stage.width} is odd")
        if int(round(stage.width * stage.bottleneck)) < 1:
            return "bottleneck_multiplier", (
                f"squeeze width round({stage.width} * {stage.bottleneck:g}) is 0")
        return None

    @staticmethod
    def complexity(cx: Cx, w_in: int, w_out: int, stride: int, stage: StageSpec) -> Cx:
        squeeze = int(round(w_out * stage.bottleneck))
        conv2d_cx(cx, w_in, squeeze, 1, bias=True)
        branch_cx(cx, lambda side: conv2d_cx(side, squeeze, w_out // 2, 1, bias=True))
        return conv2d_cx(cx, squeeze, w_out // 2, 3, bias=True)

    def __init__(self, w_in: int, w_out: int, stride: int, stage: StageSpec):
        super().__init__()
        squeeze = int(round(w_out * stage.bottleneck))
        self.squeeze = conv_act(w_in, squeeze, 1)
        self.expand1x1 = conv_act(squeeze, w_out // 2, 1)
        self.expand3x3 = conv_act(squeeze, w_out // 2, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = self.squeeze(x)
        return torch.cat([self.expand1x1(x), self.expand3x3(x)], 1)
