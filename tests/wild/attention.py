"""CNN-hybrid attention written the way timm writes LeViT (Graham et al. 2021, "LeViT: a Vision
Transformer in ConvNet's Clothing") and EfficientViT (Cai et al. 2023, "EfficientViT: Multi-Scale
Linear Attention"), for pruning attention by its head dims.

LeViT:

- a conv stem of `ConvNorm` (conv + BN) with Hardswish, flattened to tokens
  `x.flatten(2).transpose(1, 2)`;
- `LinearNorm`: a Linear whose BatchNorm1d runs on `x.flatten(0, 1)` and is reshaped back with
  `reshape_as`;
- `Attention`: one `LinearNorm` writes q, k and v of every head, head-major; the program splits
  them with `view(B, N, num_heads, -1).split([key_dim, key_dim, val_dim], dim=3)`, permutes,
  adds learned attention biases indexed by relative position, and merges the heads with
  `reshape(B, N, val_attn_dim)` before the projection (an activation and a `LinearNorm`);
- residual MLPs of two `LinearNorm`, a mean over the tokens, a BN + Linear head.

EfficientViT (MIT):
- `LiteMLA`: a 1x1 `ConvNormAct` writes q, k, v of every head (head-major, 3 dim channels a
  head); with multi-scale aggregation (`scales=(5,)`, `efficientvit_multiscale`) a depthwise 5x5
  conv over those 3 total_dim channels and a 1x1 conv with 3 heads groups (one of q, k or v of
  one head each) write as many more heads, concatenated after them;
  `reshape(B, -1, 3 * dim, H * W).transpose(-1, -2)`, `chunk(3, dim=-1)`, ReLU kernels on
  q and k, `F.pad(v, (0, 1), value=1.)` (a ones channel: the normalizer), `kv = k.T @ v`,
  `out = q @ kv`, `out[..., :-1] / (out[..., -1:] + eps)`, the heads merged back with
  `transpose(-1, -2).reshape(B, -1, H, W)` and a 1x1 `ConvNormAct` projection;
- `EfficientVitBlock`: a residual LiteMLA, then a residual `MBConv` (1x1, depthwise, 1x1);
- a stem conv with a residual `DSConv`, an MBConv downsampling stage, a pooled head.

Widths, resolution and depth are tiny; the structure is the libraries'. Departures, none of
which changes what is computed in eval mode: LeViT's attention biases are indexed directly
(LeViT caches them per device in eval mode, which symbolic tracing cannot follow);
`EfficientVit`'s LiteMLA has no multi-scale aggregation branch (`scales=()`;
`efficientvit_multiscale` has timm's), and no LiteMLA has float32 casts or autocast guard around
its products (timm marks the module not traceable because of them); the head is conv, pool,
Linear.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn


class ConvNorm(nn.Module):
    def __init__(self, c_in, c_out, kernel=1, stride=1, padding=0):
        super().__init__()
        self.linear = nn.Conv2d(c_in, c_out, kernel, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x):
        return self.bn(self.linear(x))


class LinearNorm(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.linear = nn.Linear(c_in, c_out, bias=False)
        self.bn = nn.BatchNorm1d(c_out)

    def forward(self, x):
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class NormLinear(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.bn = nn.BatchNorm1d(c_in)
        self.drop = nn.Dropout(0.0)
        self.linear = nn.Linear(c_in, c_out)

    def forward(self, x):
        return self.linear(self.drop(self.bn(x)))


class Attention(nn.Module):
    def __init__(self, dim, key_dim, num_heads, attn_ratio, resolution):
        super().__init__()
        self.num_heads = num_heads
        self.scale = key_dim ** -0.5
        self.key_dim = key_dim
        self.val_dim = int(attn_ratio * key_dim)
        self.val_attn_dim = self.val_dim * num_heads
        self.qkv = LinearNorm(dim, self.val_attn_dim + key_dim * num_heads * 2)
        self.proj = nn.Sequential(nn.Hardswish(), LinearNorm(self.val_attn_dim, dim))
        points = list(itertools.product(range(resolution), range(resolution)))
        offsets, idxs = {}, []
        for p1 in points:
            for p2 in points:
                offset = (abs(p1[0] - p2[0]), abs(p1[1] - p2[1]))
                idxs.append(offsets.setdefault(offset, len(offsets)))
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, len(offsets)))
        self.register_buffer("attention_bias_idxs",
                             torch.LongTensor(idxs).view(len(points), len(points)),
                             persistent=False)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, self.num_heads, -1).split(
            [self.key_dim, self.key_dim, self.val_dim], dim=3)
        q = q.permute(0, 2, 1, 3)
        k = k.permute(0, 2, 3, 1)
        v = v.permute(0, 2, 1, 3)
        attn = q @ k * self.scale + self.attention_biases[:, self.attention_bias_idxs]
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, self.val_attn_dim)
        return self.proj(x)


class LevitMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.ln1 = LinearNorm(dim, hidden)
        self.act = nn.Hardswish()
        self.drop = nn.Dropout(0.0)
        self.ln2 = LinearNorm(hidden, dim)

    def forward(self, x):
        return self.ln2(self.drop(self.act(self.ln1(x))))


class LevitBlock(nn.Module):
    def __init__(self, dim, key_dim, num_heads, resolution):
        super().__init__()
        self.attn = Attention(dim, key_dim, num_heads, 2.0, resolution)
        self.drop_path1 = nn.Identity()
        self.mlp = LevitMlp(dim, 2 * dim)
        self.drop_path2 = nn.Identity()

    def forward(self, x):
        x = x + self.drop_path1(self.attn(x))
        return x + self.drop_path2(self.mlp(x))


class Levit(nn.Module):
    def __init__(self, dim=32, key_dim=8, num_heads=2, depth=2, img_size=32, num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(ConvNorm(3, dim // 2, 3, 2, 1), nn.Hardswish(),
                                  ConvNorm(dim // 2, dim, 3, 2, 1))
        resolution = img_size // 4
        self.stages = nn.Sequential(*(LevitBlock(dim, key_dim, num_heads, resolution)
                                      for _ in range(depth)))
        self.head = NormLinear(dim, num_classes)

    def forward(self, x):
        x = self.stem(x).flatten(2).transpose(1, 2)
        x = self.stages(x)
        return self.head(x.mean(1))


# ---- EfficientViT (MIT) ----

class ConvNormAct(nn.Module):
    def __init__(self, c_in, c_out, kernel=3, stride=1, groups=1, bias=False,
                 norm_layer=nn.BatchNorm2d, act_layer=nn.ReLU):
        super().__init__()
        self.dropout = nn.Dropout(0.0, inplace=False)
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=bias)
        self.norm = norm_layer(num_features=c_out) if norm_layer else nn.Identity()
        self.act = act_layer(inplace=True) if act_layer is not None else nn.Identity()

    def forward(self, x):
        return self.act(self.norm(self.conv(self.dropout(x))))


class DSConv(nn.Module):
    def __init__(self, c_in, c_out, act_layer=nn.Hardswish):
        super().__init__()
        self.depth_conv = ConvNormAct(c_in, c_in, 3, groups=c_in, act_layer=act_layer)
        self.point_conv = ConvNormAct(c_in, c_out, 1, act_layer=None)

    def forward(self, x):
        return self.point_conv(self.depth_conv(x))


class MBConv(nn.Module):
    def __init__(self, c_in, c_out, stride=1, expand_ratio=4, act_layer=nn.Hardswish):
        super().__init__()
        mid = round(c_in * expand_ratio)
        self.inverted_conv = ConvNormAct(c_in, mid, 1, bias=True, norm_layer=None,
                                         act_layer=act_layer)
        self.depth_conv = ConvNormAct(mid, mid, 3, stride, groups=mid, bias=True,
                                      norm_layer=None, act_layer=act_layer)
        self.point_conv = ConvNormAct(mid, c_out, 1, act_layer=None)

    def forward(self, x):
        return self.point_conv(self.depth_conv(self.inverted_conv(x)))


class LiteMLA(nn.Module):
    def __init__(self, in_channels, out_channels, dim=4, eps=1e-5, scales=()):
        super().__init__()
        self.eps = eps
        heads = in_channels // dim
        total_dim = heads * dim
        self.dim = dim
        self.qkv = ConvNormAct(in_channels, 3 * total_dim, 1, norm_layer=None, act_layer=None)
        self.aggreg = nn.ModuleList([
            nn.Sequential(
                nn.Conv2d(3 * total_dim, 3 * total_dim, scale, padding=scale // 2,
                          groups=3 * total_dim, bias=False),
                nn.Conv2d(3 * total_dim, 3 * total_dim, 1, groups=3 * heads, bias=False))
            for scale in scales])
        self.kernel_func = nn.ReLU(inplace=False)
        self.proj = ConvNormAct(total_dim * (1 + len(scales)), out_channels, 1, act_layer=None)

    def _attn(self, q, k, v):
        kv = k.transpose(-1, -2) @ v
        out = q @ kv
        return out[..., :-1] / (out[..., -1:] + self.eps)

    def forward(self, x):
        B, _, H, W = x.shape
        qkv = self.qkv(x)
        multi_scale_qkv = [qkv]
        for op in self.aggreg:
            multi_scale_qkv.append(op(qkv))
        multi_scale_qkv = torch.cat(multi_scale_qkv, dim=1)
        multi_scale_qkv = multi_scale_qkv.reshape(B, -1, 3 * self.dim, H * W).transpose(-1, -2)
        q, k, v = multi_scale_qkv.chunk(3, dim=-1)
        q = self.kernel_func(q)
        k = self.kernel_func(k)
        v = F.pad(v, (0, 1), mode="constant", value=1.0)
        out = self._attn(q, k, v)
        out = out.transpose(-1, -2).reshape(B, -1, H, W)
        return self.proj(out)


class ResidualBlock(nn.Module):
    def __init__(self, main, shortcut=None):
        super().__init__()
        self.pre_norm = nn.Identity()
        self.main = main
        self.shortcut = shortcut

    def forward(self, x):
        res = self.main(self.pre_norm(x))
        if self.shortcut is not None:
            res = res + self.shortcut(x)
        return res


class EfficientVitBlock(nn.Module):
    def __init__(self, channels, head_dim=4, scales=()):
        super().__init__()
        self.context_module = ResidualBlock(LiteMLA(channels, channels, head_dim, scales=scales),
                                            nn.Identity())
        self.local_module = ResidualBlock(MBConv(channels, channels), nn.Identity())

    def forward(self, x):
        return self.local_module(self.context_module(x))


class EfficientVit(nn.Module):
    def __init__(self, widths=(8, 16), num_classes=10, scales=()):
        super().__init__()
        self.stem = nn.Sequential(ConvNormAct(3, widths[0], 3, 2, act_layer=nn.Hardswish),
                                  ResidualBlock(DSConv(widths[0], widths[0]), nn.Identity()))
        self.stages = nn.Sequential(ResidualBlock(MBConv(widths[0], widths[1], 2), None),
                                    EfficientVitBlock(widths[1], scales=scales))
        self.head = nn.Sequential(ConvNormAct(widths[1], 32, 1, act_layer=nn.Hardswish),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(1),
                                  nn.Linear(32, num_classes))

    def forward(self, x):
        return self.head(self.stages(self.stem(x)))


def efficientvit_multiscale():
    """EfficientViT with timm's default multi-scale aggregation, `scales=(5,)`."""
    return EfficientVit(scales=(5,))


NETWORKS = {"levit": Levit, "efficientvit": EfficientVit,
            "efficientvit_multiscale": efficientvit_multiscale}
