"""CNN-hybrid attention written the way timm writes LeViT (Graham et al. 2021, "LeViT: a Vision
Transformer in ConvNet's Clothing"), for pruning attention by its head dims:

- a conv stem of `ConvNorm` (conv + BN) with Hardswish, flattened to tokens
  `x.flatten(2).transpose(1, 2)`;
- `LinearNorm`: a Linear whose BatchNorm1d runs on `x.flatten(0, 1)` and is reshaped back with
  `reshape_as`;
- `Attention`: one `LinearNorm` writes q, k and v of every head, head-major; the program splits
  them with `view(B, N, num_heads, -1).split([key_dim, key_dim, val_dim], dim=3)`, permutes,
  adds learned attention biases indexed by relative position, and merges the heads with
  `reshape(B, N, val_attn_dim)` before the projection (an activation and a `LinearNorm`);
- residual MLPs of two `LinearNorm`, a mean over the tokens, a BN + Linear head.

Widths, resolution and depth are tiny; the structure is the library's. The attention biases are
indexed directly (LeViT caches them per device in eval mode, which symbolic tracing cannot
follow; the arithmetic is the same).
"""

from __future__ import annotations

import itertools

import torch
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
    def __init__(self, dim=16, key_dim=4, num_heads=2, depth=2, img_size=32, num_classes=10):
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


NETWORKS = {"levit": Levit}
