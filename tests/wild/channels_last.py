"""ConvNeXt-style networks written the way torchvision and timm write them, for pruning models
whose blocks work channels last (Liu et al. 2022, "A ConvNet for the 2020s"):

- torchvision's `CNBlock`: depthwise 7x7 conv, then a Sequential of `Permute([0, 2, 3, 1])`,
  `nn.LayerNorm`, two `nn.Linear` with a GELU between them and `Permute([0, 3, 1, 2])`; a layer
  scale parameter of shape (C, 1, 1) multiplied in front, stochastic depth, `result += input`.
  Its stem, downsampling layers and head normalize NCHW tensors with `LayerNorm2d`, an
  `nn.LayerNorm` subclass whose forward permutes around `F.layer_norm`.
- timm's `ConvNeXtBlock`: `conv_mlp=False` permutes, runs timm's `LayerNorm` (a subclass calling
  `F.layer_norm`) and an `Mlp` of Linears and permutes back; `conv_mlp=True` stays NCHW with
  `LayerNorm2d` and an `Mlp` of 1x1 convs. Both scale with `x.mul(gamma.reshape(1, -1, 1, 1))`,
  gamma of shape (C,), and add the shortcut after drop path. The head pools, then normalizes
  ("NormMlpClassifierHead").

Widths and depths are tiny; the structure is the libraries'.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tests.wild.layers import DropPath


class Permute(nn.Module):
    def __init__(self, dims: list[int]):
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return torch.permute(x, self.dims)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ChannelsLastLayerNorm(nn.LayerNorm):
    """timm's `LayerNorm`: over the last dim, through `F.layer_norm`."""

    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


# ---- torchvision ----

class CNBlock(nn.Module):
    def __init__(self, dim: int, layer_scale: float, drop: float):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim, bias=True),
            Permute([0, 2, 3, 1]),
            nn.LayerNorm(dim, eps=1e-6),
            nn.Linear(dim, 4 * dim),
            nn.GELU(),
            nn.Linear(4 * dim, dim),
            Permute([0, 3, 1, 2]),
        )
        self.layer_scale = nn.Parameter(torch.ones(dim, 1, 1) * layer_scale)
        self.stochastic_depth = DropPath(drop)

    def forward(self, input):
        result = self.layer_scale * self.block(input)
        result = self.stochastic_depth(result)
        result += input
        return result


class TorchvisionConvNeXt(nn.Module):
    def __init__(self, setting=((16, 32, 1), (32, None, 1)), num_classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = [nn.Sequential(
            nn.Conv2d(3, setting[0][0], kernel_size=4, stride=4, bias=True),
            LayerNorm2d(setting[0][0], eps=1e-6))]
        for c_in, c_out, depth in setting:
            layers.append(nn.Sequential(*(CNBlock(c_in, 0.5, 0.1) for _ in range(depth))))
            if c_out is not None:
                layers.append(nn.Sequential(LayerNorm2d(c_in, eps=1e-6),
                                            nn.Conv2d(c_in, c_out, kernel_size=2, stride=2)))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        last = setting[-1][1] or setting[-1][0]
        self.classifier = nn.Sequential(LayerNorm2d(last, eps=1e-6), nn.Flatten(1),
                                        nn.Linear(last, num_classes))

    def forward(self, x):
        return self.classifier(self.avgpool(self.features(x)))


# ---- timm ----

class Mlp(nn.Module):
    def __init__(self, c_in: int, hidden: int, use_conv: bool = False):
        super().__init__()
        layer = (lambda a, b: nn.Conv2d(a, b, kernel_size=1)) if use_conv else nn.Linear
        self.fc1 = layer(c_in, hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(0.0)
        self.norm = nn.Identity()
        self.fc2 = layer(hidden, c_in)
        self.drop2 = nn.Dropout(0.0)

    def forward(self, x):
        x = self.drop1(self.act(self.fc1(x)))
        return self.drop2(self.fc2(self.norm(x)))


class ConvNeXtBlock(nn.Module):
    def __init__(self, chs: int, conv_mlp: bool = False, ls_init_value: float = 0.5,
                 drop_path: float = 0.1):
        super().__init__()
        self.use_conv_mlp = conv_mlp
        self.conv_dw = nn.Conv2d(chs, chs, 7, padding=3, groups=chs, bias=True)
        self.norm = (LayerNorm2d if conv_mlp else ChannelsLastLayerNorm)(chs)
        self.mlp = Mlp(chs, 4 * chs, use_conv=conv_mlp)
        self.gamma = nn.Parameter(ls_init_value * torch.ones(chs))
        self.shortcut = nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x):
        shortcut = x
        x = self.conv_dw(x)
        if self.use_conv_mlp:
            x = self.norm(x)
            x = self.mlp(x)
        else:
            x = x.permute(0, 2, 3, 1)
            x = self.norm(x)
            x = self.mlp(x)
            x = x.permute(0, 3, 1, 2)
        if self.gamma is not None:
            x = x.mul(self.gamma.reshape(1, -1, 1, 1))
        return self.drop_path(x) + self.shortcut(shortcut)


class ConvNeXtStage(nn.Module):
    def __init__(self, c_in: int, c_out: int, depth: int, conv_mlp: bool):
        super().__init__()
        if c_in != c_out:
            self.downsample = nn.Sequential(LayerNorm2d(c_in),
                                            nn.Conv2d(c_in, c_out, kernel_size=2, stride=2))
        else:
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(*(ConvNeXtBlock(c_out, conv_mlp) for _ in range(depth)))

    def forward(self, x):
        return self.blocks(self.downsample(x))


class TimmConvNeXt(nn.Module):
    def __init__(self, dims=(16, 32), depths=(1, 1), conv_mlp: bool = False,
                 num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], kernel_size=4, stride=4),
                                  LayerNorm2d(dims[0]))
        stages, previous = [], dims[0]
        for dim, depth in zip(dims, depths):
            stages.append(ConvNeXtStage(previous, dim, depth, conv_mlp))
            previous = dim
        self.stages = nn.Sequential(*stages)
        self.head = nn.ModuleDict({"global_pool": nn.AdaptiveAvgPool2d(1),
                                   "norm": LayerNorm2d(previous), "flatten": nn.Flatten(1),
                                   "drop": nn.Dropout(0.0),
                                   "fc": nn.Linear(previous, num_classes)})

    def forward(self, x):
        x = self.stages(self.stem(x))
        head = self.head
        x = head["flatten"](head["norm"](head["global_pool"](x)))
        return head["fc"](head["drop"](x))


NETWORKS = {
    "torchvision_convnext": TorchvisionConvNeXt,
    "timm_convnext": TimmConvNeXt,
    "timm_convnext_conv_mlp": lambda: TimmConvNeXt(conv_mlp=True),
}


# ---- the original ConvNeXt (facebookresearch/ConvNeXt, models/convnext.py) ----

class OriginalLayerNorm(nn.Module):
    """ConvNeXt's own LayerNorm: `F.layer_norm` channels last; channels first written out by
    hand (mean and biased variance over dim 1, weight and bias [C] indexed onto [C, 1, 1])."""

    def __init__(self, normalized_shape: int, eps: float = 1e-6,
                 data_format: str = "channels_last"):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(normalized_shape))
        self.bias = nn.Parameter(torch.zeros(normalized_shape))
        self.eps = eps
        self.data_format = data_format
        self.normalized_shape = (normalized_shape,)

    def forward(self, x):
        if self.data_format == "channels_last":
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class OriginalBlock(nn.Module):
    def __init__(self, dim: int, drop_path: float = 0.0, layer_scale_init_value: float = 0.5):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = OriginalLayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(layer_scale_init_value * torch.ones(dim))
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x):
        input = x
        x = self.dwconv(x)
        x = x.permute(0, 2, 3, 1)
        x = self.norm(x)
        x = self.pwconv1(x)
        x = self.act(x)
        x = self.pwconv2(x)
        x = self.gamma * x
        x = x.permute(0, 3, 1, 2)
        return input + self.drop_path(x)


class OriginalConvNeXt(nn.Module):
    """Two stages of the original: stem and downsampling layers normalize channels first by
    hand, blocks channels last; the head pools with `x.mean([-2, -1])` and normalizes."""

    def __init__(self, dims=(16, 32), depths=(1, 1), num_classes: int = 10):
        super().__init__()
        self.downsample_layers = nn.ModuleList([nn.Sequential(
            nn.Conv2d(3, dims[0], kernel_size=4, stride=4),
            OriginalLayerNorm(dims[0], eps=1e-6, data_format="channels_first"))])
        for i in range(len(dims) - 1):
            self.downsample_layers.append(nn.Sequential(
                OriginalLayerNorm(dims[i], eps=1e-6, data_format="channels_first"),
                nn.Conv2d(dims[i], dims[i + 1], kernel_size=2, stride=2)))
        self.stages = nn.ModuleList(
            nn.Sequential(*(OriginalBlock(dim, 0.1) for _ in range(depth)))
            for dim, depth in zip(dims, depths))
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, x):
        for downsample, stage in zip(self.downsample_layers, self.stages):
            x = stage(downsample(x))
        return self.head(self.norm(x.mean([-2, -1])))


NETWORKS["original_convnext"] = OriginalConvNeXt
