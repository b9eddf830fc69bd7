"""Shipped specs against their reference implementations, with the same weights.

Each reference network is written below as library code in the style of the implementation the
spec names (torchvision's: `nn.Sequential` stacks of conv-norm-activation units, blocks with
`use_res_connect`, an SE module with its own gate; pycls' RegNet arithmetic; timm's SE-ResNet;
the MobileNetV1 paper's Table 1), from that implementation's own configuration tables and rules,
not from archc's blocks. The archc network is built eagerly with random weights and calibrated,
perturbed BN statistics (`init="random"`); every layer holding parameters or buffers is paired
with the reference's layer in registration order (same type and shapes, and for BatchNorm the
same eps and momentum, or the pairing fails) and its tensors copied; both run in float64 in eval
mode on one random batch and must agree within `TOLERANCE` relative error (max|Δ| / max|ref|).

References register the shortcut of a residual block before its residual branch, as archc does
(torchvision's ResNet registers `downsample` last): only the order of the weights, not the
computation. docs/models.md lists what is checked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import archc
from archc.ir.init import random_input
from archc.ir.verify import relative_error

TOLERANCE = 1e-5  # float64: the two computations differ only by summation order
SIDE = 64  # small, and every reference network still has a spatial extent before its pool


def make_divisible(value: float, divisor: int) -> int:
    """torchvision's rounding of widths: the nearest multiple of `divisor` (at least `divisor`),
    one multiple more when that lost over 10% of `value`."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


# ---------------------------------------------------------------------------------------------
# Shared layers (torchvision.ops.misc)


class ConvNormActivation(nn.Sequential):
    """conv -> [norm] -> [activation]; the conv has a bias only without a norm, padding
    (kernel - 1) // 2 unless given."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 3, stride: int = 1, groups: int = 1,
                 norm=nn.BatchNorm2d, activation=nn.ReLU, padding: int | None = None):
        padding = (kernel - 1) // 2 if padding is None else padding
        layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, kernel, stride, padding, groups=groups,
                                             bias=norm is None)]
        if norm is not None:
            layers.append(norm(c_out))
        if activation is not None:
            layers.append(activation())
        super().__init__(*layers)


class SqueezeExcitation(nn.Module):
    """x * gate(fc2(act(fc1(mean over the image of x)))), fc1 and fc2 1x1 convs with bias."""

    def __init__(self, channels: int, squeezed: int, activation=nn.ReLU, gate=nn.Sigmoid):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeezed, 1)
        self.fc2 = nn.Conv2d(squeezed, channels, 1)
        self.activation = activation()
        self.gate = gate()

    def forward(self, x: Tensor) -> Tensor:
        scale = self.gate(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return scale * x


class Classifier(nn.Module):
    """features -> global average pool -> flatten -> classifier, torchvision's common tail."""

    def __init__(self, features: nn.Module, classifier: nn.Module):
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = classifier

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


# ---------------------------------------------------------------------------------------------
# MobileNetV3 (torchvision's mobilenetv3.py; Howard et al. 2019, Tables 1 and 2)


@dataclass(frozen=True)
class BottleneckRow:
    """One row of the paper's table: input width, kernel, expanded width, output width, SE,
    activation ("RE" ReLU, "HS" hard-swish), stride."""

    c_in: int
    kernel: int
    expanded: int
    c_out: int
    use_se: bool
    activation: str
    stride: int


V3_LARGE = [BottleneckRow(*row) for row in (
    (16, 3, 16, 16, False, "RE", 1), (16, 3, 64, 24, False, "RE", 2),
    (24, 3, 72, 24, False, "RE", 1), (24, 5, 72, 40, True, "RE", 2),
    (40, 5, 120, 40, True, "RE", 1), (40, 5, 120, 40, True, "RE", 1),
    (40, 3, 240, 80, False, "HS", 2), (80, 3, 200, 80, False, "HS", 1),
    (80, 3, 184, 80, False, "HS", 1), (80, 3, 184, 80, False, "HS", 1),
    (80, 3, 480, 112, True, "HS", 1), (112, 3, 672, 112, True, "HS", 1),
    (112, 5, 672, 160, True, "HS", 2), (160, 5, 960, 160, True, "HS", 1),
    (160, 5, 960, 160, True, "HS", 1))]
V3_SMALL = [BottleneckRow(*row) for row in (
    (16, 3, 16, 16, True, "RE", 2), (16, 3, 72, 24, False, "RE", 2),
    (24, 3, 88, 24, False, "RE", 1), (24, 5, 96, 40, True, "HS", 2),
    (40, 5, 240, 40, True, "HS", 1), (40, 5, 240, 40, True, "HS", 1),
    (40, 5, 120, 48, True, "HS", 1), (48, 5, 144, 48, True, "HS", 1),
    (48, 5, 288, 96, True, "HS", 2), (96, 5, 576, 96, True, "HS", 1),
    (96, 5, 576, 96, True, "HS", 1))]
V3_NORM = partial(nn.BatchNorm2d, eps=0.001, momentum=0.01)


class MobileNetV3Block(nn.Module):
    """[1x1 expand] -> kxk depthwise -> [SE on the expanded width, a quarter made divisible by 8,
    hard-sigmoid gate] -> linear 1x1 projection; the input is added when shapes allow."""

    def __init__(self, row: BottleneckRow, norm=V3_NORM):
        super().__init__()
        self.use_res_connect = row.stride == 1 and row.c_in == row.c_out
        activation = nn.Hardswish if row.activation == "HS" else nn.ReLU
        layers: list[nn.Module] = []
        if row.expanded != row.c_in:
            layers.append(ConvNormActivation(row.c_in, row.expanded, 1, norm=norm,
                                             activation=activation))
        layers.append(ConvNormActivation(row.expanded, row.expanded, row.kernel, row.stride,
                                         groups=row.expanded, norm=norm, activation=activation))
        if row.use_se:
            layers.append(SqueezeExcitation(row.expanded, make_divisible(row.expanded // 4, 8),
                                            gate=nn.Hardsigmoid))
        layers.append(ConvNormActivation(row.expanded, row.c_out, 1, norm=norm, activation=None))
        self.block = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        y = self.block(x)
        return x + y if self.use_res_connect else y


def mobilenet_v3(rows: list[BottleneckRow], last_channel: int, norm=V3_NORM) -> nn.Module:
    """Stem 3x3 stride 2 + hard-swish, the rows, a 1x1 conv to 6x the last width + hard-swish;
    pool; Linear to `last_channel` + hard-swish, dropout 0.2, Linear to the classes."""
    last_in = rows[-1].c_out
    features = nn.Sequential(
        ConvNormActivation(3, rows[0].c_in, 3, 2, norm=norm, activation=nn.Hardswish),
        *(MobileNetV3Block(row, norm) for row in rows),
        ConvNormActivation(last_in, 6 * last_in, 1, norm=norm, activation=nn.Hardswish))
    classifier = nn.Sequential(nn.Linear(6 * last_in, last_channel), nn.Hardswish(),
                               nn.Dropout(0.2), nn.Linear(last_channel, 1000))
    return Classifier(features, classifier)


# ---------------------------------------------------------------------------------------------
# MobileNetV2 (torchvision's mobilenetv2.py) and EfficientNet-B0 (torchvision's efficientnet.py)


class MobileNetV2Block(nn.Module):
    """[1x1 expand ReLU6] -> 3x3 depthwise ReLU6 -> 1x1 conv + BN (linear bottleneck)."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = int(round(c_in * expand_ratio))
        self.use_res_connect = stride == 1 and c_in == c_out
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvNormActivation(c_in, hidden, 1, activation=nn.ReLU6))
        layers += [ConvNormActivation(hidden, hidden, 3, stride, groups=hidden,
                                      activation=nn.ReLU6),
                   nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


def mobilenet_v2() -> nn.Module:
    """The paper's Table 2 rows (t, c, n, s), stem 32, last conv 1280, dropout 0.2."""
    rows = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
            (6, 160, 3, 2), (6, 320, 1, 1)]
    layers: list[nn.Module] = [ConvNormActivation(3, 32, 3, 2, activation=nn.ReLU6)]
    width = 32
    for t, c, n, s in rows:
        for index in range(n):
            layers.append(MobileNetV2Block(width, c, s if index == 0 else 1, t))
            width = c
    layers.append(ConvNormActivation(width, 1280, 1, activation=nn.ReLU6))
    return Classifier(nn.Sequential(*layers), nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, 1000)))


class MBConv(nn.Module):
    """EfficientNet's block: [1x1 expand SiLU] -> kxk depthwise SiLU -> SE (a quarter of the
    block input, SiLU inside, sigmoid gate) -> linear 1x1 projection; stochastic depth on the
    residual branch is the identity in eval mode."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, expand_ratio: float):
        super().__init__()
        self.use_res_connect = stride == 1 and c_in == c_out
        expanded = make_divisible(c_in * expand_ratio, 8)
        layers: list[nn.Module] = []
        if expanded != c_in:
            layers.append(ConvNormActivation(c_in, expanded, 1, activation=nn.SiLU))
        layers += [
            ConvNormActivation(expanded, expanded, kernel, stride, groups=expanded,
                               activation=nn.SiLU),
            SqueezeExcitation(expanded, max(1, c_in // 4), activation=nn.SiLU),
            ConvNormActivation(expanded, c_out, 1, activation=None)]
        self.block = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        y = self.block(x)
        return x + y if self.use_res_connect else y


def efficientnet_b0() -> nn.Module:
    """Table 1 of Tan and Le (2019) as (expand ratio, kernel, stride, in, out, layers); stem
    32, last conv 4 x 320 = 1280, dropout 0.2; torchvision's B0 keeps nn.BatchNorm2d's defaults
    (its B5..B7 use eps 1e-3, momentum 0.01)."""
    rows = [(1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2),
            (6, 3, 2, 40, 80, 3), (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4),
            (6, 3, 1, 192, 320, 1)]
    layers: list[nn.Module] = [ConvNormActivation(3, 32, 3, 2, activation=nn.SiLU)]
    for t, k, s, c_in, c_out, n in rows:
        layers.append(nn.Sequential(*(
            MBConv(c_in if index == 0 else c_out, c_out, k, s if index == 0 else 1, t)
            for index in range(n))))
    layers.append(ConvNormActivation(320, 1280, 1, activation=nn.SiLU))
    return Classifier(nn.Sequential(*layers), nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, 1000)))


# ---------------------------------------------------------------------------------------------
# MobileNetV1 (Howard et al. 2017, Table 1: no torchvision model)


def mobilenet_v1() -> nn.Module:
    """3x3 stride-2 conv to 32, then 13 depthwise-separable layers (3x3 depthwise + BN + ReLU,
    1x1 + BN + ReLU) as Table 1 with its last stride 1, average pool, fully connected."""
    rows = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), *[(512, 1)] * 5,
            (1024, 2), (1024, 1)]
    layers: list[nn.Module] = [ConvNormActivation(3, 32, 3, 2)]
    width = 32
    for c_out, stride in rows:
        layers.append(nn.Sequential(ConvNormActivation(width, width, 3, stride, groups=width),
                                    ConvNormActivation(width, c_out, 1)))
        width = c_out
    return Classifier(nn.Sequential(*layers), nn.Linear(1024, 1000))


# ---------------------------------------------------------------------------------------------
# ResNet, ResNeXt (torchvision's resnet.py) and SE-ResNet (timm's resnet.py)


def se_width(channels: int) -> int:
    """timm's SE-ResNet squeeze width: channels / 16 rounded to a multiple of 8 (no 10% rule)."""
    return max(8, int(channels / 16 + 4) // 8 * 8)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int, downsample: nn.Module | None,
                 groups: int = 1, base_width: int = 64, se: bool = False):
        super().__init__()
        if groups != 1 or base_width != 64 or se:
            raise ValueError("BasicBlock has one group of 64 base channels and no SE")
        self.downsample = downsample
        self.conv1 = nn.Conv2d(c_in, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """ResNet v1.5 (the stride on the 3x3); ResNeXt: `groups` x `base_width`/64 channels per
    group; SE-ResNet: SE after bn3, before the addition."""

    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int, downsample: nn.Module | None,
                 groups: int = 1, base_width: int = 64, se: bool = False):
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        c_out = planes * self.expansion
        self.downsample = downsample
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.se = SqueezeExcitation(c_out, se_width(c_out)) if se else None
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.se is not None:
            out = self.se(out)
        return self.relu(out + identity)


class ResNet(nn.Module):
    def __init__(self, block, layers: list[int], groups: int = 1, width_per_group: int = 64,
                 se: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.inplanes = 64
        options = {"groups": groups, "base_width": width_per_group, "se": se}
        self.layer1 = self._make_layer(block, 64, layers[0], 1, options)
        self.layer2 = self._make_layer(block, 128, layers[1], 2, options)
        self.layer3 = self._make_layer(block, 256, layers[2], 2, options)
        self.layer4 = self._make_layer(block, 512, layers[3], 2, options)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * block.expansion, 1000)

    def _make_layer(self, block, planes: int, blocks: int, stride: int, options) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample, **options)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, 1, None, **options) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# ---------------------------------------------------------------------------------------------
# ShuffleNetV2 (torchvision's shufflenetv2.py)


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    batch, channels, height, width = x.shape
    x = x.view(batch, groups, channels // groups, height, width).transpose(1, 2).contiguous()
    return x.view(batch, channels, height, width)


class ShuffleUnit(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.stride = stride
        half = c_out // 2
        self.branch1 = nn.Sequential()
        if stride > 1:
            self.branch1 = nn.Sequential(
                nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in, bias=False),
                nn.BatchNorm2d(c_in),
                nn.Conv2d(c_in, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU())
        self.branch2 = nn.Sequential(
            nn.Conv2d(c_in if stride > 1 else half, half, 1, bias=False), nn.BatchNorm2d(half),
            nn.ReLU(),
            nn.Conv2d(half, half, 3, stride, 1, groups=half, bias=False), nn.BatchNorm2d(half),
            nn.Conv2d(half, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU())

    def forward(self, x: Tensor) -> Tensor:
        if self.stride == 1:
            kept, processed = x.chunk(2, dim=1)
            out = torch.cat((kept, self.branch2(processed)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    def __init__(self, repeats: list[int], widths: list[int]):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(3, widths[0], 3, 2, 1, bias=False),
                                   nn.BatchNorm2d(widths[0]), nn.ReLU())
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages, width = [], widths[0]
        for n, c_out in zip(repeats, widths[1:]):
            stages.append(nn.Sequential(*(ShuffleUnit(width if i == 0 else c_out, c_out,
                                                      2 if i == 0 else 1) for i in range(n))))
            width = c_out
        self.stages = nn.Sequential(*stages)
        self.conv5 = nn.Sequential(nn.Conv2d(width, widths[-1], 1, bias=False),
                                   nn.BatchNorm2d(widths[-1]), nn.ReLU())
        self.fc = nn.Linear(widths[-1], 1000)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv5(self.stages(self.maxpool(self.conv1(x))))
        return self.fc(x.mean([2, 3]))


# ---------------------------------------------------------------------------------------------
# SqueezeNet and AlexNet (torchvision's squeezenet.py, alexnet.py): no BatchNorm


class Fire(nn.Module):
    def __init__(self, c_in: int, squeeze: int, expand1x1: int, expand3x3: int):
        super().__init__()
        self.squeeze = nn.Conv2d(c_in, squeeze, 1)
        self.expand1x1 = nn.Conv2d(squeeze, expand1x1, 1)
        self.expand3x3 = nn.Conv2d(squeeze, expand3x3, 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.squeeze(x))
        return torch.cat([self.relu(self.expand1x1(x)), self.relu(self.expand3x3(x))], 1)


def squeezenet(version: str) -> nn.Module:
    pool = partial(nn.MaxPool2d, 3, 2, ceil_mode=True)
    if version == "1_0":
        features = nn.Sequential(
            nn.Conv2d(3, 96, 7, 2), nn.ReLU(), pool(),
            Fire(96, 16, 64, 64), Fire(128, 16, 64, 64), Fire(128, 32, 128, 128), pool(),
            Fire(256, 32, 128, 128), Fire(256, 48, 192, 192), Fire(384, 48, 192, 192),
            Fire(384, 64, 256, 256), pool(), Fire(512, 64, 256, 256))
    else:
        features = nn.Sequential(
            nn.Conv2d(3, 64, 3, 2), nn.ReLU(), pool(),
            Fire(64, 16, 64, 64), Fire(128, 16, 64, 64), pool(),
            Fire(128, 32, 128, 128), Fire(256, 32, 128, 128), pool(),
            Fire(256, 48, 192, 192), Fire(384, 48, 192, 192), Fire(384, 64, 256, 256),
            Fire(512, 64, 256, 256))
    classifier = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(512, 1000, 1), nn.ReLU(),
                               nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
    return nn.Sequential(features, classifier)


def alexnet() -> nn.Module:
    features = nn.Sequential(
        nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2))
    classifier = nn.Sequential(
        nn.Dropout(0.5), nn.Linear(256 * 6 * 6, 4096), nn.ReLU(),
        nn.Dropout(0.5), nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 1000))
    return nn.Sequential(features, nn.AdaptiveAvgPool2d(6), nn.Flatten(1), classifier)


# ---------------------------------------------------------------------------------------------
# RegNet (pycls: anynet.py's blocks, regnet.py's arithmetic)


def regnet_stages(depth: int, w0: int, wa: float, wm: float, group_width: int, q: int = 8,
                  bot_mul: float = 1.0) -> list[tuple[int, int, int]]:
    """pycls' generate_regnet and adjust_block_compatibility: (width, depth, group width) per
    stage."""
    continuous = np.arange(depth) * wa + w0
    steps = np.round(np.log(continuous / w0) / np.log(wm))
    widths = (np.round(w0 * np.power(wm, steps) / q) * q).astype(int)
    stage_widths, stage_depths = np.unique(widths, return_counts=True)
    bottlenecks = [int(max(1, w * bot_mul)) for w in stage_widths]
    groups = [int(min(group_width, v)) for v in bottlenecks]
    multiples = [math.lcm(g, int(bot_mul)) if bot_mul > 1 else g for g in groups]
    bottlenecks = [max(m, int(round(v / m) * m)) for v, m in zip(bottlenecks, multiples)]
    return [(int(v / bot_mul), int(d), g)
            for v, d, g in zip(bottlenecks, stage_depths, groups)]


class RegNetBlock(nn.Module):
    """relu(proj(x) + f(x)), f = 1x1, 3x3 grouped with the stride, [SE of round(se_ratio *
    block input width)], 1x1 without activation."""

    def __init__(self, w_in: int, w_out: int, stride: int, group_width: int, se_ratio: float):
        super().__init__()
        self.proj = None
        if w_in != w_out or stride != 1:
            self.proj = ConvNormActivation(w_in, w_out, 1, stride, activation=None)
        f = [ConvNormActivation(w_in, w_out, 1),
             ConvNormActivation(w_out, w_out, 3, stride, groups=w_out // group_width)]
        if se_ratio:
            f.append(SqueezeExcitation(w_out, int(round(se_ratio * w_in))))
        f.append(ConvNormActivation(w_out, w_out, 1, activation=None))
        self.f = nn.Sequential(*f)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.proj is None else self.proj(x)
        return self.relu(shortcut + self.f(x))


def regnet(depth: int, w0: int, wa: float, wm: float, group_width: int,
           se_ratio: float = 0.0) -> nn.Module:
    """Stem 3x3 stride 2 to 32, stages of stride 2 (bottleneck multiplier 1), pool, fc."""
    layers: list[nn.Module] = [ConvNormActivation(3, 32, 3, 2)]
    width = 32
    for w_out, d, g in regnet_stages(depth, w0, wa, wm, group_width):
        layers.append(nn.Sequential(*(
            RegNetBlock(width if i == 0 else w_out, w_out, 2 if i == 0 else 1, g, se_ratio)
            for i in range(d))))
        width = w_out
    return Classifier(nn.Sequential(*layers), nn.Linear(width, 1000))


# ---------------------------------------------------------------------------------------------
# The comparison

REFERENCES = {
    "mobilenet_v3_large": lambda: mobilenet_v3(V3_LARGE, 1280),
    "mobilenet_v3_small": lambda: mobilenet_v3(V3_SMALL, 1024),
    "mobilenet_v2": mobilenet_v2,
    "efficientnet_b0": efficientnet_b0,
    "mobilenet_v1": mobilenet_v1,
    "resnet18": lambda: ResNet(BasicBlock, [2, 2, 2, 2]),
    "resnet50": lambda: ResNet(Bottleneck, [3, 4, 6, 3]),
    "resnext50_32x4d": lambda: ResNet(Bottleneck, [3, 4, 6, 3], groups=32, width_per_group=4),
    "seresnet50": lambda: ResNet(Bottleneck, [3, 4, 6, 3], se=True),
    "shufflenet_v2_x0_5": lambda: ShuffleNetV2([4, 8, 4], [24, 48, 96, 192, 1024]),
    "shufflenet_v2_x1_0": lambda: ShuffleNetV2([4, 8, 4], [24, 116, 232, 464, 1024]),
    "squeezenet1_0": lambda: squeezenet("1_0"),
    "squeezenet1_1": lambda: squeezenet("1_1"),
    "alexnet": alexnet,
    # pycls' model zoo configs (d, w0, wa, wm, g); RegNetY adds SE 0.25
    "regnetx_200mf": lambda: regnet(13, 24, 36.44, 2.49, 8),
    "regnetx_400mf": lambda: regnet(22, 24, 24.48, 2.54, 16),
    "regnetx_600mf": lambda: regnet(16, 48, 36.97, 2.24, 24),
    "regnetx_800mf": lambda: regnet(16, 56, 35.73, 2.28, 16),
    "regnety_200mf": lambda: regnet(13, 24, 36.44, 2.49, 8, se_ratio=0.25),
    "regnety_400mf": lambda: regnet(16, 48, 27.89, 2.09, 8, se_ratio=0.25),
    "regnety_600mf": lambda: regnet(15, 48, 32.54, 2.32, 16, se_ratio=0.25),
    "regnety_800mf": lambda: regnet(14, 56, 38.84, 2.4, 16, se_ratio=0.25),
}
SLOW = {"alexnet"}  # over ~5 s (initialising 61M parameters); the others take 0.1-2.5 s


def weighted_layers(model: nn.Module) -> list[nn.Module]:
    """The modules that hold parameters or buffers themselves, in registration order."""
    return [module for module in model.modules()
            if any(True for _ in module.parameters(recurse=False))
            or any(True for _ in module.buffers(recurse=False))]


def copy_weights(source: nn.Module, target: nn.Module) -> None:
    """Copy every tensor of `source` into `target`, layer by layer in registration order; the
    layers must pair up by type, tensor names and shapes, and BatchNorms by eps and momentum."""
    sources, targets = weighted_layers(source), weighted_layers(target)
    assert len(sources) == len(targets), f"{len(sources)} layers, reference {len(targets)}"
    for index, (mine, theirs) in enumerate(zip(sources, targets)):
        where = f"layer {index}: {mine} against the reference's {theirs}"
        assert type(mine) is type(theirs), where
        state = mine.state_dict()
        assert {k: v.shape for k, v in state.items()} == {
            k: v.shape for k, v in theirs.state_dict().items()}, where
        if isinstance(mine, nn.modules.batchnorm._BatchNorm):
            assert (mine.eps, mine.momentum) == (theirs.eps, theirs.momentum), where
        theirs.load_state_dict(state)


def at_side(spec: archc.Spec) -> archc.Spec:
    """`spec` at SIDE x SIDE pixels, so that `init="random"` calibrates BN statistics there."""
    return spec.model_copy(update={"input": spec.input.model_copy(update={"size": SIDE})})


def reference_error(name: str, spec: archc.Spec | None = None) -> float:
    """Relative error of archc's network for `spec` (the shipped one by default) against the
    reference with archc's weights, float64, eval mode, batch 2 at SIDE x SIDE."""
    spec = at_side(spec or archc.load_spec(name))
    model = archc.build_module(spec, seed=0, init="random").double()
    reference = REFERENCES[name]()
    copy_weights(model, reference)
    reference.double().eval()
    x = random_input((2, 3, SIDE, SIDE), 1).double()
    with torch.no_grad():
        return relative_error(reference(x), model(x))


@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.slow) if name in SLOW
                                  else name for name in REFERENCES])
def test_spec_computes_its_reference(name):
    error = reference_error(name)
    assert error <= TOLERANCE, f"{name}: relative error {error:.3g} against its reference"


@pytest.mark.parametrize("name", ["mobilenet_v3_large", "mobilenet_v3_small"])
def test_mobilenet_v3_without_its_batch_norm_settings_is_another_function(name):
    """The spec without its `bn` (torch's eps 1e-5, momentum 0.1) is refused by the pairing, and
    it is numerically another function: equal to the reference given torch's defaults, more than
    10 x TOLERANCE away from torchvision's eps 1e-3."""
    data = archc.load_spec(name).to_dict()
    del data["bn"]
    spec = archc.load_spec(data)
    torch_default, torchvision = r"eps=1e-05, momentum=0\.1", r"eps=0\.001, momentum=0\.01"
    with pytest.raises(AssertionError, match=f"{torch_default}.*{torchvision}"):
        reference_error(name, spec)
    model = archc.build_module(at_side(spec), seed=0, init="random").double()
    reference = REFERENCES[name]()
    batch_norms = [layer for layer in reference.modules() if isinstance(layer, nn.BatchNorm2d)]
    for layer in batch_norms:
        layer.eps, layer.momentum = 1e-5, 0.1
    copy_weights(model, reference)
    reference.double().eval()
    x = random_input((2, 3, SIDE, SIDE), 1).double()
    with torch.no_grad():
        assert relative_error(reference(x), model(x)) <= TOLERANCE
        for layer in batch_norms:
            layer.eps = 1e-3
        assert relative_error(reference(x), model(x)) > 10 * TOLERANCE
