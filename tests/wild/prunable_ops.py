"""CNNs with the ops Torch-Pruning users ask about beyond conv/BN/Linear, written the way model
libraries write them, for `archc prune` on models archc did not build:

- `SuperResolution`: a Real-ESRGAN-style generator for scale 2 (`F.pixel_unshuffle` of the input
  image, residual dense blocks whose convs read concatenations of unequal width, a residual
  scaling `x5 * 0.2 + x`), an EDSR-style upsampler (conv to 4C, `nn.PixelShuffle(2)`), and a
  refinement conv that reads the input image concatenated to the features (a cat of a free and a
  fixed input);
- `GroupNormResNet`: a torchvision-style ResNet built with `norm_layer=GroupNorm` (as BiT and
  detection backbones do), downsample shortcuts normalized with another group count;
- `FaceNet`: a MobileFaceNet-style network: conv-BN-PReLU(C) units, inverted residual bottlenecks,
  one shared-slope `nn.PReLU()`, a global depthwise conv and a Linear embedding head;
- `MetaFormer`: a PoolFormer-style network in NCHW: a learned position embedding added after the
  stem, token mixing by `pool(x) - x`, MLPs of 1x1 convs and layer scales kept as bare
  `nn.Parameter` vectors, applied as `gamma.unsqueeze(-1).unsqueeze(-1) * y` (PoolFormer) and
  `y * gamma.view(1, -1, 1, 1)` (timm's LayerScale2d), plus a learned bias
  `nn.Parameter(torch.zeros(1, C, 1, 1))` added to a bias-free conv;
- `FeaturePyramidUNet`: an FPN top-down path and a UNet-style decoder joined by `F.interpolate`
  (nearest and bilinear), which a torch.export program spells `aten.upsample_*2d.vec`;
- `ClassConditional` (two inputs: the image and its class labels, not in `NETWORKS`): a
  label embedding added to a conv's features (`h + emb(y)[:, :, None, None]`) and a BigGAN-style
  class-conditional BatchNorm (`bn(h) * (1 + gain(y)[..]) + bias(y)[..]`, Brock et al. 2019).

Written from the papers' descriptions (Wang et al. 2021, Lim et al. 2017, Wu and He 2018, Chen et
al. 2018, Yu et al. 2022)."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


class ResidualDenseBlock(nn.Module):
    def __init__(self, features: int = 16, growth: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(features, growth, 3, 1, 1)
        self.conv2 = nn.Conv2d(features + growth, growth, 3, 1, 1)
        self.conv3 = nn.Conv2d(features + 2 * growth, features, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(negative_slope=0.2, inplace=True)

    def forward(self, x):
        x1 = self.lrelu(self.conv1(x))
        x2 = self.lrelu(self.conv2(torch.cat((x, x1), 1)))
        x3 = self.conv3(torch.cat((x, x1, x2), 1))
        return x3 * 0.2 + x


class SuperResolution(nn.Module):
    def __init__(self, in_channels: int = 3, features: int = 16, growth: int = 8, blocks: int = 2):
        super().__init__()
        self.conv_first = nn.Conv2d(in_channels * 4, features, 3, 1, 1)
        self.body = nn.Sequential(*[ResidualDenseBlock(features, growth) for _ in range(blocks)])
        self.conv_body = nn.Conv2d(features, features, 3, 1, 1)
        # EDSR-style upsampler, twice: back to the input's size, then x2
        self.upsample = nn.Sequential(nn.Conv2d(features, 4 * features, 3, 1, 1),
                                      nn.PixelShuffle(2), nn.LeakyReLU(0.2),
                                      nn.Conv2d(features, 4 * features, 3, 1, 1),
                                      nn.PixelShuffle(2), nn.PReLU(features))
        self.conv_hr = nn.Conv2d(features, features, 3, 1, 1)
        self.refine = nn.Conv2d(in_channels + features, in_channels, 3, 1, 1)

    def forward(self, x):
        feat = self.conv_first(F.pixel_unshuffle(x, downscale_factor=2))
        feat = feat + self.conv_body(self.body(feat))
        feat = F.leaky_relu(self.conv_hr(self.upsample(feat)), 0.2)
        image = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.refine(torch.cat([image, feat], dim=1))


class GNBasicBlock(nn.Module):
    def __init__(self, c_in: int, width: int, stride: int, norm_layer):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, width, 3, stride, 1, bias=False)
        self.bn1 = norm_layer(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = norm_layer(width)
        self.downsample = None
        if stride != 1 or c_in != width:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, width, 1, stride, bias=False),
                                            nn.GroupNorm(2, width))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class GroupNormResNet(nn.Module):
    def __init__(self, widths=(16, 32), num_classes: int = 10, groups: int = 4):
        super().__init__()
        norm_layer = functools.partial(nn.GroupNorm, groups)
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = norm_layer(widths[0])
        self.relu = nn.ReLU(inplace=True)
        layers, c_in = [], widths[0]
        for i, width in enumerate(widths):
            layers += [GNBasicBlock(c_in, width, 1 if i == 0 else 2, norm_layer),
                       GNBasicBlock(width, width, 1, norm_layer)]
            c_in = width
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x):
        x = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class ConvBlock(nn.Module):
    """MobileFaceNet's conv-BN-PReLU unit (linear: no PReLU)."""

    def __init__(self, c_in, c_out, kernel=1, stride=1, padding=0, groups=1, linear=False):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.prelu = None if linear else nn.PReLU(c_out)

    def forward(self, x):
        x = self.bn(self.conv(x))
        return x if self.prelu is None else self.prelu(x)


class DepthWise(nn.Module):
    def __init__(self, c_in, c_out, hidden, stride=1, residual=False):
        super().__init__()
        self.conv = ConvBlock(c_in, hidden)
        self.conv_dw = ConvBlock(hidden, hidden, 3, stride, 1, groups=hidden)
        self.project = ConvBlock(hidden, c_out, linear=True)
        self.residual = residual

    def forward(self, x):
        short_cut = x
        x = self.project(self.conv_dw(self.conv(x)))
        return short_cut + x if self.residual else x


class FaceNet(nn.Module):
    def __init__(self, embedding: int = 16, size: int = 16):
        super().__init__()
        self.conv1 = ConvBlock(3, 16, 3, 2, 1)
        self.conv2_dw = ConvBlock(16, 16, 3, 1, 1, groups=16)
        self.conv_23 = DepthWise(16, 24, 32, stride=2)
        self.conv_3 = DepthWise(24, 24, 48, residual=True)
        self.conv_4 = nn.Sequential(nn.Conv2d(24, 32, 1, bias=False), nn.BatchNorm2d(32),
                                    nn.PReLU())
        self.conv_gdc = ConvBlock(32, 32, size // 4, 1, 0, groups=32, linear=True)  # global
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(32, embedding, bias=False)
        self.bn = nn.BatchNorm1d(embedding)

    def forward(self, x):
        x = self.conv_23(self.conv2_dw(self.conv1(x)))
        x = self.conv_gdc(self.conv_4(self.conv_3(x)))
        return self.bn(self.linear(self.flatten(x)))


class PoolFormerBlock(nn.Module):
    def __init__(self, dim: int, hidden: int, norm_layer, layer_scale_init: float = 1e-5,
                 timm_scale: bool = False):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.pool = nn.AvgPool2d(3, 1, 1, count_include_pad=False)
        self.norm2 = norm_layer(dim)
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)
        self.layer_scale_1 = nn.Parameter(layer_scale_init * torch.ones(dim))
        self.layer_scale_2 = nn.Parameter(layer_scale_init * torch.ones(dim))
        self.timm_scale = timm_scale

    def forward(self, x):
        y = self.norm1(x)
        x = x + self.layer_scale_1.unsqueeze(-1).unsqueeze(-1) * (self.pool(y) - y)
        y = self.fc2(self.act(self.fc1(self.norm2(x))))
        if self.timm_scale:
            return x + y * self.layer_scale_2.view(1, -1, 1, 1)
        return x + self.layer_scale_2.unsqueeze(-1).unsqueeze(-1) * y


class MetaFormer(nn.Module):
    def __init__(self, dims=(16, 32), num_classes: int = 10, norm_layer=nn.BatchNorm2d,
                 size: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, dims[0], 3, 2, 1)
        self.pos_embed = nn.Parameter(torch.zeros(1, dims[0], size, size))
        self.stage1 = PoolFormerBlock(dims[0], 2 * dims[0], norm_layer)
        self.down = nn.Conv2d(dims[0], dims[1], 3, 2, 1, bias=False)
        self.down_bias = nn.Parameter(torch.zeros(1, dims[1], 1, 1))
        self.stage2 = PoolFormerBlock(dims[1], 2 * dims[1], norm_layer, timm_scale=True)
        self.norm = norm_layer(dims[1])
        self.head = nn.Linear(dims[1], num_classes)

    def forward(self, x):
        x = self.stage1(self.stem(x) + self.pos_embed)
        x = self.stage2(self.down(x) + self.down_bias)
        return self.head(self.norm(x).mean([-2, -1]))


def conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True))


class FeaturePyramidUNet(nn.Module):
    """An FPN top-down path (1x1 laterals plus the coarser level upsampled by
    `F.interpolate(scale_factor=2, mode="nearest")`, torchvision's FeaturePyramidNetwork) and a
    UNet-style decoder (the pyramid's finest level upsampled bilinearly to the encoder's first
    map, `size=c1.shape[-2:]`, concatenated with it), then a per-pixel classifier."""

    def __init__(self, widths=(16, 32, 32), pyramid: int = 16, classes: int = 4):
        super().__init__()
        self.enc = nn.ModuleList([conv_bn_relu(3, widths[0], 2)] + [
            conv_bn_relu(a, b, 2) for a, b in zip(widths, widths[1:])])
        self.lateral = nn.ModuleList(nn.Conv2d(w, pyramid, 1) for w in widths)
        self.smooth = conv_bn_relu(pyramid, pyramid)
        self.decode = conv_bn_relu(pyramid + widths[0], widths[0])
        self.classifier = nn.Conv2d(widths[0], classes, 1)

    def forward(self, x):
        features = []
        for layer in self.enc:
            x = layer(x)
            features.append(x)
        p = self.lateral[2](features[2])
        p = self.lateral[1](features[1]) + F.interpolate(p, scale_factor=2, mode="nearest")
        p = self.lateral[0](features[0]) + F.interpolate(p, scale_factor=2, mode="nearest")
        c1 = features[0]
        p = F.interpolate(self.smooth(p), size=c1.shape[-2:], mode="bilinear",
                          align_corners=False)
        return self.classifier(self.decode(torch.cat([p, c1], 1)))


class ClassConditional(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16),
                                  nn.ReLU())
        self.conv1 = nn.Conv2d(16, 32, 3, padding=1)
        self.label = nn.Embedding(classes, 32)
        self.conv2 = nn.Conv2d(32, 32, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(32)
        self.gain, self.bias = nn.Embedding(classes, 32), nn.Embedding(classes, 32)
        self.conv3 = nn.Conv2d(32, 16, 1)
        self.head = nn.Linear(16, classes)

    def forward(self, x, labels):
        h = F.relu(self.conv1(self.stem(x)) + self.label(labels)[:, :, None, None])
        h = self.bn(self.conv2(h))
        h = h * (1 + self.gain(labels)[:, :, None, None]) + self.bias(labels)[:, :, None, None]
        h = F.relu(self.conv3(F.relu(h)))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))


NETWORKS = {
    "super_resolution": SuperResolution,
    "group_norm_resnet": GroupNormResNet,
    "face_net": FaceNet,
    "metaformer": MetaFormer,
    "fpn_unet": FeaturePyramidUNet,
}
