"""Plain CNNs written the way model libraries write them, for `archc prune` on models archc did not
build: a torchvision-style ResNet (basic and grouped bottleneck blocks, `downsample` Sequential,
in-place ReLU, `out += identity`, `torch.flatten`), a MobileNetV2-style network (a Sequential
subclass for conv-BN-act, blocks built as layer lists, `use_res_connect`), and a timm-style stage
(`ConvNormAct` with the `BatchNormAct2d` subclass that calls `F.batch_norm` behind a shape assert,
squeeze-excite, a layer scale, drop path). Written from the papers' descriptions (He et al. 2016,
Xie et al. 2017, Sandler et al. 2018)."""

from __future__ import annotations

import torch
from torch import nn

from tests.wild.layers import ConvNormAct, DropPath, LayerScale2d, SqueezeExcite


def _conv3x3(c_in: int, c_out: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride, 1, groups=groups, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, c_in: int, width: int, stride: int = 1, downsample=None, groups=1,
                 base_width=64):
        super().__init__()
        self.conv1 = _conv3x3(c_in, width, stride)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(width, width)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int = 1, downsample=None, groups=1,
                 base_width=64):
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride, groups)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """Stages `layer1`, `layer2`, ... (one per entry of `layers`); `resnet50()` is torchvision's
    ResNet-50 layout."""

    def __init__(self, block=BasicBlock, layers=(1, 1, 1), widths=(16, 32, 64), groups=1,
                 width_per_group=64, num_classes=10, stem=16):
        super().__init__()
        self.inplanes, self.groups, self.base_width = stem, groups, width_per_group
        self.conv1 = nn.Conv2d(3, self.inplanes, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.stages = len(layers)
        for i, (width, blocks) in enumerate(zip(widths, layers)):
            setattr(self, f"layer{i + 1}",
                    self._make_layer(block, width, blocks, stride=1 if i == 0 else 2))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[-1] * block.expansion, num_classes)

    def _make_layer(self, block, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample, self.groups, self.base_width)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, groups=self.groups, base_width=self.base_width)
                   for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.stages):
            x = getattr(self, f"layer{i + 1}")(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def resnet50(num_classes: int = 1000) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 6, 3), (64, 128, 256, 512), num_classes=num_classes,
                  stem=64)


def resnet18(num_classes: int = 1000) -> ResNet:
    return ResNet(BasicBlock, (2, 2, 2, 2), (64, 128, 256, 512), num_classes=num_classes,
                  stem=64)


class ConvBNActivation(nn.Sequential):
    def __init__(self, c_in, c_out, kernel=3, stride=1, groups=1, act=nn.ReLU6):
        padding = (kernel - 1) // 2
        super().__init__(nn.Conv2d(c_in, c_out, kernel, stride, padding, groups=groups,
                                   bias=False),
                         nn.BatchNorm2d(c_out), act(inplace=True))
        self.out_channels = c_out


class InvertedResidual(nn.Module):
    def __init__(self, c_in, c_out, stride, expand_ratio):
        super().__init__()
        hidden = int(round(c_in * expand_ratio))
        self.use_res_connect = stride == 1 and c_in == c_out
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNActivation(c_in, hidden, kernel=1))
        layers.extend([ConvBNActivation(hidden, hidden, stride=stride, groups=hidden),
                       nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out)])
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes=10, setting=((1, 8, 1, 1), (6, 12, 2, 2), (6, 16, 2, 2)),
                 last=64):
        super().__init__()
        features: list[nn.Module] = [ConvBNActivation(3, 16, stride=2)]
        c_in = 16
        for t, c, n, s in setting:
            for i in range(n):
                features.append(InvertedResidual(c_in, c, s if i == 0 else 1, t))
                c_in = c
        features.append(ConvBNActivation(c_in, last, kernel=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))

    def forward(self, x):
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, (1, 1))
        return self.classifier(torch.flatten(x, 1))


class TimmBlock(nn.Module):
    """x + drop_path(layer_scale(se(conv-BN-act -> depthwise conv-BN-act -> 1x1 conv-BN)))."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.conv_pw = ConvNormAct(width, hidden, 1, act=nn.SiLU())
        self.conv_dw = ConvNormAct(hidden, hidden, 3, groups=hidden, act=nn.SiLU())
        self.se = SqueezeExcite(hidden)
        self.conv_pwl = ConvNormAct(hidden, width, 1)
        self.layer_scale = LayerScale2d(width, 0.5)
        self.drop_path = DropPath(0.1)

    def forward(self, x):
        shortcut = x
        x = self.conv_pwl(self.se(self.conv_dw(self.conv_pw(x))))
        return shortcut + self.drop_path(self.layer_scale(x))


class TimmNet(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = ConvNormAct(3, 16, 3, stride=2, act=nn.ReLU())
        self.blocks = nn.Sequential(TimmBlock(16, 48), ConvNormAct(16, 32, 3, stride=2,
                                                                   act=nn.ReLU()),
                                    TimmBlock(32, 64))
        self.head = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.head(x.mean((2, 3)))


NETWORKS = {
    "resnet_basic": lambda: ResNet(BasicBlock, (2, 1, 1)),
    "resnext_bottleneck": lambda: ResNet(Bottleneck, (1, 2, 1), widths=(8, 16, 32), groups=4,
                                         width_per_group=16),
    "mobilenet_v2": MobileNetV2,
    "timm_style": TimmNet,
}
