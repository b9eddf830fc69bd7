"""Convolutional blocks of hybrid (ViT-inspired) networks: FastViT's RepMixer and RepViT's block,
token mixer + feed-forward network, both re-parameterizable; each with its analytic twin.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

from archc.frontend.blocks.counting import Cx, branch_cx, conv2d_cx, norm2d_cx
from archc.frontend.blocks.layers import (
    ACTIVATIONS,
    conv_bn,
    conv_bn_cx,
    squeeze_excitation,
    squeeze_excitation_cx,
)
from archc.frontend.blocks.registry import SE_FIELDS, Block, register_block
from archc.frontend.blocks.reparam import MobileOneUnit
from archc.frontend.spec import StageSpec
from archc.ir.modules import LayerScale


class PatchEmbed(nn.Module):
    """FastViT's downsampling (Vasu et al. 2023): `pointwise(large(x) + small(x))`, large = 7x7
    and small = 3x3 conv + BN stride s with one input channel per group (w_in groups), then a
    1x1 MobileOne unit with act."""

    def __init__(self, w_in: int, w_out: int, stride: int, act: str):
        super().__init__()
        self.large = conv_bn(w_in, w_out, 7, stride, w_in, act=None)
        self.small = conv_bn(w_in, w_out, 3, stride, w_in, act=None)
        self.pointwise = MobileOneUnit(w_out, w_out, 1, 1, 1, 1, act)

    def forward(self, x: Tensor) -> Tensor:
        return self.pointwise(self.large(x) + self.small(x))

    @staticmethod
    def complexity(cx: Cx, w_in: int, w_out: int, stride: int) -> Cx:
        """The 7x7 branch, the 3x3 conv + BN, the 1x1 MobileOne unit."""
        branch_cx(cx, lambda side: conv_bn_cx(side, w_in, w_out, 7, stride, w_in))
        conv_bn_cx(cx, w_in, w_out, 3, stride, w_in)
        return MobileOneUnit.complexity(cx, w_out, w_out, 1, 1, 1, 1)


@register_block
class RepMixer(Block):
    """FastViT's RepMixer block (Vasu et al. 2023), with w = w_out:

        y = x + γ1 · (mixer(x) - norm(x))        mixer: depthwise kxk MobileOne unit, no act
        out = y + γ2 · ffn(y)                    ffn: dw 7x7 + BN, 1x1 w -> t w, act, 1x1 -> w

    norm is a BN (the identity branch of a MobileOne unit without conv branches), the 1x1 convs
    of the ConvFFN have bias, γ1, γ2 are `LayerScale`s (absent when `layer_scale` is None). The
    first block of a strided stage (or one that changes the width) starts with a `PatchEmbed`.
    Deploy form: the token mixer is one depthwise kxk conv with bias (R1, R3, R4, R5 with the
    layer scale as a constant factor)."""

    name = "repmixer"
    uses = frozenset({"kernel", "expansion", "layer_scale", "activation"})

    @classmethod
    def check(cls, stage, w_in):
        if (stage.stride > 1 or w_in != stage.width) and stage.width % w_in:
            return "width", (f"a patch embedding has one input channel per group: width "
                             f"{stage.width} is not a multiple of the input width {w_in}")
        if int(stage.width * stage.expansion) < 1:
            return "expansion", f"ConvFFN width int({stage.width} * {stage.expansion:g}) is 0"
        return None

    @staticmethod
    def complexity(cx: Cx, w_in: int, w_out: int, stride: int, stage: StageSpec) -> Cx:
        """[PatchEmbed], the depthwise kxk mixer unit, the BN subtracted, the ConvFFN (dw 7x7 +
        BN, two 1x1 with bias), two layer scales of w_out params each."""
        if stride > 1 or w_in != w_out:
            PatchEmbed.complexity(cx, w_in, w_out, stride)
        MobileOneUnit.complexity(cx, w_out, w_out, stage.kernel, 1, w_out, 1)
        norm2d_cx(cx, w_out)
        hidden = int(w_out * stage.expansion)
        conv_bn_cx(cx, w_out, w_out, 7, 1, w_out)
        conv2d_cx(cx, w_out, hidden, 1, bias=True)
        conv2d_cx(cx, hidden, w_out, 1, bias=True)
        if stage.layer_scale is not None:
            cx.params += 2 * w_out
        return cx

    def __init__(self, w_in: int, w_out: int, stride: int, stage: StageSpec):
        super().__init__()
        act = stage.activation
        self.embed = PatchEmbed(w_in, w_out, stride, act) if stride > 1 or w_in != w_out else None
        self.mixer = MobileOneUnit(w_out, w_out, stage.kernel, 1, w_out, 1, act=None)
        self.norm = nn.BatchNorm2d(w_out)
        hidden = int(w_out * stage.expansion)
        self.ffn = nn.Sequential(OrderedDict(
            conv=conv_bn(w_out, w_out, 7, 1, w_out, act=None),
            fc1=nn.Conv2d(w_out, hidden, 1, bias=True),
            act=ACTIVATIONS[act](),
            fc2=nn.Conv2d(hidden, w_out, 1, bias=True),
        ))
        scale = stage.layer_scale
        self.mixer_scale = None if scale is None else LayerScale(w_out, scale)
        self.ffn_scale = None if scale is None else LayerScale(w_out, scale)

    def forward(self, x: Tensor) -> Tensor:
        if self.embed is not None:
            x = self.embed(x)
        mixed = self.mixer(x) - self.norm(x)
        x = x + (mixed if self.mixer_scale is None else self.mixer_scale(mixed))
        y = self.ffn(x)
        return x + (y if self.ffn_scale is None else self.ffn_scale(y))


class RepVGGDepthwise(nn.Module):
    """RepViT's token mixer: BN(BN(dw kxk x) + dw1x1(x) + x), the 1x1 with bias and no BN of its
    own, one BN after the sum."""

    def __init__(self, width: int, kernel: int):
        super().__init__()
        self.conv = conv_bn(width, width, kernel, 1, width, act=None)
        self.pointwise = nn.Conv2d(width, width, 1, groups=width, bias=True)
        self.bn = nn.BatchNorm2d(width)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x) + self.pointwise(x) + x)

    @staticmethod
    def complexity(cx: Cx, width: int, kernel: int) -> Cx:
        """The dw 1x1 with bias (a side branch), the dw kxk + BN, the BN after the sum."""
        branch_cx(cx, lambda side: conv2d_cx(side, width, width, 1, groups=width, bias=True))
        conv_bn_cx(cx, width, width, kernel, 1, width)
        return norm2d_cx(cx, width)


def _repvit_ffn(width: int, hidden: int, act: str) -> nn.Sequential:
    """y + conv2(act(conv1(y))) without the residual: 1x1 + BN, act, 1x1 + BN."""
    return nn.Sequential(OrderedDict(
        conv1=conv_bn(width, hidden, 1, act=act), conv2=conv_bn(hidden, width, 1, act=None)))


def _repvit_ffn_cx(cx: Cx, width: int, hidden: int) -> Cx:
    """`_repvit_ffn`: 1x1 + BN to `hidden`, 1x1 + BN back."""
    conv_bn_cx(cx, width, hidden, 1)
    return conv_bn_cx(cx, hidden, width, 1)


@register_block
class RepViT(Block):
    """RepViT block (Wang et al. 2024), t = expansion, k = kernel:

        stride 1:  y = se(mixer(x));  out = y + ffn(y)     mixer: `RepVGGDepthwise`
        stride 2:  y = channel(spatial(pre(x)));  out = y + ffn(y)

    ffn = 1x1 + BN w -> t w, act, 1x1 + BN; pre is a stride-1 RepViT block on w_in without SE,
    spatial a depthwise kxk stride-2 conv + BN, channel a 1x1 conv + BN to w_out (the paper's
    downsampling layer). SE (`se_ratio`) sits in alternate blocks: the 1st, 3rd, ... of the
    stage's stride-1 blocks. Deploy form: the mixer is one depthwise kxk conv with bias (R3, R4,
    R5, then the BN after the sum, R1)."""

    name = "repvit"
    uses = SE_FIELDS | {"kernel", "expansion", "activation"}

    @classmethod
    def check(cls, stage, w_in):
        if stage.stride == 1 and w_in != stage.width:
            return "width", (f"a stride-1 repvit block adds its input: width {stage.width} must "
                             f"equal the input width {w_in}")
        return None

    @classmethod
    def stage_at(cls, stage, index):
        """SE kept in the 1st, 3rd, ... of the stage's stride-1 blocks (a strided stage's first
        block has none)."""
        position = index - 1 if stage.stride > 1 else index  # among the stride-1 blocks
        return stage if position % 2 == 0 else stage.model_copy(update={"se_ratio": 0.0})

    @staticmethod
    def complexity(cx: Cx, w_in: int, w_out: int, stride: int, stage: StageSpec) -> Cx:
        """Stride 1 (w_in = w_out): mixer, SE, FFN; stride 2: a stride-1 block on w_in without
        SE, dw kxk stride-2 conv + BN, 1x1 conv + BN to w_out, FFN."""
        if stride == 1:
            RepVGGDepthwise.complexity(cx, w_out, stage.kernel)
            squeeze_excitation_cx(cx, stage, w_in, w_out)
        else:
            plain = stage.model_copy(update={"se_ratio": 0.0, "stride": 1, "width": w_in})
            RepViT.complexity(cx, w_in, w_in, 1, plain)
            conv_bn_cx(cx, w_in, w_in, stage.kernel, stride, w_in)
            conv_bn_cx(cx, w_in, w_out, 1)
        return _repvit_ffn_cx(cx, w_out, int(w_out * stage.expansion))

    def __init__(self, w_in: int, w_out: int, stride: int, stage: StageSpec):
        super().__init__()
        act, kernel = stage.activation, stage.kernel
        if stride == 1:
            self.mixer = RepVGGDepthwise(w_out, kernel)
            self.se = squeeze_excitation(stage, w_in, w_out)
        else:
            plain = stage.model_copy(update={"se_ratio": 0.0, "stride": 1, "width": w_in})
            self.pre = RepViT(w_in, w_in, 1, plain)
            self.spatial = conv_bn(w_in, w_in, kernel, stride, w_in, act=None)
            self.channel = conv_bn(w_in, w_out, 1, act=None)
        self.ffn = _repvit_ffn(w_out, int(w_out * stage.expansion), act)
        self.downsample = stride > 1

    def forward(self, x: Tensor) -> Tensor:
        if self.downsample:
            y = self.channel(self.spatial(self.pre(x)))
        else:
            y = self.mixer(x)
            if self.se is not None:
                y = self.se(y)
        return y + self.ffn(y)
