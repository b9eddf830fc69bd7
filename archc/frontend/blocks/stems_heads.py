"""Registered stem and head types (`archc.frontend.spec.StemSpec` and `HeadSpec` state each), each
with its analytic twin beside its build.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import ClassVar

from torch import Tensor, nn

from archc.frontend.blocks.counting import Cx, conv2d_cx, linear_cx, norm2d_cx, pool2d_cx
from archc.frontend.blocks.layers import ACTIVATIONS, conv_bn, conv_bn_cx
from archc.frontend.blocks.registry import Head, Stem, register_head, register_stem
from archc.frontend.blocks.reparam import MobileOneUnit
from archc.frontend.blocks.vanillanet import (
    ActivationSeries,
    DeepTrainingActivation,
    conv_bias_bn,
    conv_bias_bn_cx,
)
from archc.frontend.spec import HeadSpec, StemSpec

# ---------------------------------------------------------------------------------------------
# Stems


@register_stem
class NoStem(Stem):
    """`none`: no stem, the first stage reads the input (RepVGG's stem is its first block)."""

    name = "none"
    has_batch_norm = False

    @staticmethod
    def build(stem: StemSpec, w_in: int) -> None:
        return None

    @staticmethod
    def complexity(cx: Cx, stem: StemSpec, w_in: int) -> Cx:
        return cx


class ConvStem(Stem):
    """A `kernel` x `kernel` conv + BN + act of stride `stride` (`conv`, `bn`, `act`), then a
    3x3 max-pool of stride 2 (`pool`) if `pool`."""

    kernel: ClassVar[int] = 3
    pool: ClassVar[bool] = False

    @classmethod
    def build(cls, stem: StemSpec, w_in: int) -> nn.Module:
        layers = conv_bn(w_in, stem.channels, cls.kernel, stem.stride, act=stem.activation)
        if cls.pool:
            layers.add_module("pool", nn.MaxPool2d(3, stride=2, padding=1))
        return layers

    @classmethod
    def complexity(cls, cx: Cx, stem: StemSpec, w_in: int) -> Cx:
        conv_bn_cx(cx, w_in, stem.channels, cls.kernel, stem.stride)
        return pool2d_cx(cx, stem.channels, 3, 2, 1) if cls.pool else cx


@register_stem
class SimpleStem(ConvStem):
    """pycls' SimpleStem: 3x3 conv + BN + act."""

    name = "simple"


@register_stem
class SimplePoolStem(ConvStem):
    """ShuffleNet's stem: 3x3 conv + BN + act, 3x3 max-pool stride 2."""

    name = "simple_pool"
    pool = True


@register_stem
class ResNetStem(ConvStem):
    """ResNet's stem: 7x7 conv + BN + act, 3x3 max-pool stride 2."""

    name = "resnet"
    kernel = 7
    pool = True


@register_stem
class FastViTStem(Stem):
    """Three MobileOne units: 3x3 stride 2 (`conv`), depthwise 3x3 stride 2 (`depthwise`), 1x1
    (`pointwise`)."""

    name = "fastvit"

    @staticmethod
    def build(stem: StemSpec, w_in: int) -> nn.Module:
        width, act = stem.channels, stem.activation
        return nn.Sequential(OrderedDict(
            conv=MobileOneUnit(w_in, width, 3, 2, 1, 1, act),
            depthwise=MobileOneUnit(width, width, 3, 2, width, 1, act),
            pointwise=MobileOneUnit(width, width, 1, 1, 1, 1, act),
        ))

    @staticmethod
    def complexity(cx: Cx, stem: StemSpec, w_in: int) -> Cx:
        width = stem.channels
        MobileOneUnit.complexity(cx, w_in, width, 3, 2, 1, 1)
        MobileOneUnit.complexity(cx, width, width, 3, 2, width, 1)
        return MobileOneUnit.complexity(cx, width, width, 1, 1, 1, 1)


@register_stem
class RepViTStem(Stem):
    """3x3 stride-2 conv to width / 2 + BN + act (`conv1`), 3x3 stride-2 conv + BN (`conv2`)."""

    name = "repvit"

    @staticmethod
    def build(stem: StemSpec, w_in: int) -> nn.Module:
        width = stem.channels
        return nn.Sequential(OrderedDict(
            conv1=conv_bn(w_in, width // 2, 3, 2, act=stem.activation),
            conv2=conv_bn(width // 2, width, 3, 2, act=None),
        ))

    @staticmethod
    def complexity(cx: Cx, stem: StemSpec, w_in: int) -> Cx:
        width = stem.channels
        conv_bn_cx(cx, w_in, width // 2, 3, 2)
        return conv_bn_cx(cx, width // 2, width, 3, 2)


@register_stem
class VanillaNetStem(Stem):
    """Patchify conv with bias (kernel = stride) + BN (`a`), the deep-training activation, 1x1
    conv with bias + BN (`b`), the activation series."""

    name = "vanillanet"

    @staticmethod
    def build(stem: StemSpec, w_in: int) -> nn.Module:
        width = stem.channels
        return nn.Sequential(OrderedDict(
            a=conv_bias_bn(w_in, width, stem.stride, stem.stride),
            deep_act=DeepTrainingActivation(),
            b=conv_bias_bn(width, width),
            series=ActivationSeries(width),
        ))

    @staticmethod
    def complexity(cx: Cx, stem: StemSpec, w_in: int) -> Cx:
        width = stem.channels
        conv_bias_bn_cx(cx, w_in, width, stem.stride, stem.stride)
        conv_bias_bn_cx(cx, width, width)
        return ActivationSeries.complexity(cx, width)


# ---------------------------------------------------------------------------------------------
# Heads (adaptive average pools count nothing)


def _dropout(p: float) -> nn.Dropout | None:
    return nn.Dropout(p) if p > 0 else None


@register_head
class ClassifierHead(Head):
    """Optional 1x1 conv + BN + act (`pre`), average pool to `pool_size`, flatten, per hidden
    width [dropout] Linear + act (`hidden.i`), [dropout], [BN1d] Linear with bias (`fc`); with
    `distillation` a second [BN1d] Linear (`dist_fc`) and the mean of both (DeiT's eval mode)."""

    name = "classifier"

    @staticmethod
    def has_batch_norm(head: HeadSpec) -> bool:
        return head.width is not None or head.batch_norm

    @staticmethod
    def complexity(cx: Cx, head: HeadSpec, w_in: int, num_classes: int) -> Cx:
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

    def __init__(self, head: HeadSpec, w_in: int, num_classes: int):
        super().__init__()
        self.pre = None
        if head.width is not None:
            self.pre = conv_bn(w_in, head.width, 1, act=head.activation)
            w_in = head.width
        self.pool = nn.AdaptiveAvgPool2d(head.pool_size)
        self.flatten = nn.Flatten(1)
        w_in *= head.pool_size**2
        self.hidden = None
        if head.hidden:
            layers: OrderedDict[str, nn.Module] = OrderedDict()
            for index, width in enumerate(head.hidden, start=1):
                layer: OrderedDict[str, nn.Module] = OrderedDict()
                if head.hidden_dropout > 0:
                    layer["dropout"] = nn.Dropout(head.hidden_dropout)
                layer["fc"] = nn.Linear(w_in, width, bias=True)
                layer["act"] = ACTIVATIONS[head.activation]()
                layers[str(index)] = nn.Sequential(layer)
                w_in = width
            self.hidden = nn.Sequential(layers)
        self.dropout = _dropout(head.dropout)
        self.fc_norm = nn.BatchNorm1d(w_in) if head.batch_norm else None
        self.fc = nn.Linear(w_in, num_classes, bias=True)
        self.dist_norm = nn.BatchNorm1d(w_in) if head.batch_norm and head.distillation else None
        self.dist_fc = nn.Linear(w_in, num_classes, bias=True) if head.distillation else None

    def forward(self, x: Tensor) -> Tensor:
        if self.pre is not None:
            x = self.pre(x)
        x = self.flatten(self.pool(x))
        if self.hidden is not None:
            x = self.hidden(x)
        if self.dropout is not None:
            x = self.dropout(x)
        logits = self.fc(x if self.fc_norm is None else self.fc_norm(x))
        if self.dist_fc is None:
            return logits
        distilled = self.dist_fc(x if self.dist_norm is None else self.dist_norm(x))
        return (logits + distilled) / 2


@register_head
class ConvClassifierHead(Head):
    """SqueezeNet's head: [dropout], 1x1 conv with bias to the classes, ReLU, global average
    pool, flatten."""

    name = "conv_classifier"

    @staticmethod
    def has_batch_norm(head: HeadSpec) -> bool:
        return False

    @staticmethod
    def complexity(cx: Cx, head: HeadSpec, w_in: int, num_classes: int) -> Cx:
        return conv2d_cx(cx, w_in, num_classes, 1, bias=True)

    def __init__(self, head: HeadSpec, w_in: int, num_classes: int):
        super().__init__()
        self.dropout = _dropout(head.dropout)
        self.conv = nn.Conv2d(w_in, num_classes, 1, bias=True)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        if self.dropout is not None:
            x = self.dropout(x)
        return self.flatten(self.pool(self.act(self.conv(x))))


@register_head
class VanillaNetHead(Head):
    """VanillaNet's head: global average pool, [dropout], 1x1 conv + BN to the classes (`a`), the
    deep-training activation, 1x1 conv with bias (`b`), flatten. At λ = 1 `a` and `b` merge."""

    name = "vanillanet"

    @staticmethod
    def complexity(cx: Cx, head: HeadSpec, w_in: int, num_classes: int) -> Cx:
        cx.h = cx.w = 1
        conv_bias_bn_cx(cx, w_in, num_classes)
        return conv2d_cx(cx, num_classes, num_classes, 1, bias=True)

    def __init__(self, head: HeadSpec, w_in: int, num_classes: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = _dropout(head.dropout)
        self.a = conv_bias_bn(w_in, num_classes)
        self.deep_act = DeepTrainingActivation()
        self.b = nn.Conv2d(num_classes, num_classes, 1, bias=True)
        self.flatten = nn.Flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(x)
        if self.dropout is not None:
            x = self.dropout(x)
        return self.flatten(self.b(self.deep_act(self.a(x))))
