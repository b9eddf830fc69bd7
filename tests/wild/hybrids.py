"""Attention of more CNN hybrids, written the way timm writes them, for pruning attention by its
head dims (tests/wild/attention.py has LeViT and EfficientViT).

FastViT (Vasu et al. 2023, "FastViT: A Fast Hybrid Vision Transformer using Structural
Reparameterization"), its attention stage:

- `Attention` on a [B, C, H, W] tensor: `B, C, H, W = x.shape`, tokens
  `x.flatten(2).transpose(-2, -1)`, one Linear writing q, k, v of every head (q, k, v outermost:
  `reshape(B, N, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)`, then `unbind(0)`), softmax
  attention, the heads merged with `transpose(1, 2).reshape(B, N, C)` (C read from the input's
  shape), a Linear projection and back to the image: `transpose(-2, -1).reshape(B, C, H, W)`;
- `AttentionBlock`: `x + layer_scale_1(attention(BatchNorm2d(x)))`, then
  `x + layer_scale_2(ConvMlp(x))` (a depthwise 7x7 ConvNorm, two 1x1 convs with GELU); the layer
  scales are `LayerScale2d`, gamma [C, 1, 1];
- the conditional position encoding `RepConditionalPosEnc` (a residual depthwise 7x7 conv) before
  the attention blocks; a conv stem and a conv, pool, Linear head.

Widths, resolution and depth are tiny; the structure is timm's. Departures, none of which changes
what is computed in eval mode: attention is the unfused path (`fused_attn=False`: explicit
`q @ k.transpose(-2, -1)`, softmax, `@ v`, not `F.scaled_dot_product_attention`); the stem is
plain conv, BN, GELU (timm's is reparameterizable MobileOne blocks, which fold to that).
"""

from __future__ import annotations

import torch
from torch import nn


class ConvNormAct(nn.Module):
    def __init__(self, c_in, c_out, kernel, stride=1, groups=1, act=True):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups,
                              bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.act = nn.GELU() if act else nn.Identity()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


# ---- FastViT ----

class Attention(nn.Module):
    def __init__(self, dim, head_dim=16):
        super().__init__()
        self.head_dim = head_dim
        self.num_heads = dim // head_dim
        self.scale = head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x):
        B, C, H, W = x.shape
        N = H * W
        x = x.flatten(2).transpose(-2, -1)
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q = q * self.scale
        attn = q @ k.transpose(-2, -1)
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = attn @ v
        x = x.transpose(1, 2).reshape(B, N, C)
        x = self.proj_drop(self.proj(x))
        return x.transpose(-2, -1).reshape(B, C, H, W)


class LayerScale2d(nn.Module):
    def __init__(self, dim, init_values=1e-5):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim, 1, 1))

    def forward(self, x):
        return x * self.gamma


class ConvMlp(nn.Module):
    def __init__(self, in_chs, hidden_channels):
        super().__init__()
        self.conv = ConvNormAct(in_chs, in_chs, 7, groups=in_chs, act=False)
        self.fc1 = nn.Conv2d(in_chs, hidden_channels, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden_channels, in_chs, 1)
        self.drop = nn.Dropout(0.0)

    def forward(self, x):
        x = self.act(self.fc1(self.conv(x)))
        return self.drop(self.fc2(self.drop(x)))


class AttentionBlock(nn.Module):
    def __init__(self, dim, mlp_ratio=4.0):
        super().__init__()
        self.norm = nn.BatchNorm2d(dim)
        self.token_mixer = Attention(dim)
        self.layer_scale_1 = LayerScale2d(dim)
        self.drop_path1 = nn.Identity()
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio))
        self.layer_scale_2 = LayerScale2d(dim)
        self.drop_path2 = nn.Identity()

    def forward(self, x):
        x = x + self.drop_path1(self.layer_scale_1(self.token_mixer(self.norm(x))))
        return x + self.drop_path2(self.layer_scale_2(self.mlp(x)))


class RepConditionalPosEnc(nn.Module):
    def __init__(self, dim, spatial_shape=(7, 7)):
        super().__init__()
        self.pos_enc = nn.Conv2d(dim, dim, spatial_shape, 1, spatial_shape[0] // 2, groups=dim)

    def forward(self, x):
        return self.pos_enc(x) + x


class FastVit(nn.Module):
    def __init__(self, dim=32, depth=2, num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(ConvNormAct(3, dim // 2, 3, 2), ConvNormAct(dim // 2, dim, 3, 2))
        self.pos_emb = RepConditionalPosEnc(dim)
        self.blocks = nn.Sequential(*(AttentionBlock(dim) for _ in range(depth)))
        self.final_conv = ConvNormAct(dim, 2 * dim, 1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1),
                                  nn.Linear(2 * dim, num_classes))

    def forward(self, x):
        x = self.blocks(self.pos_emb(self.stem(x)))
        return self.head(self.final_conv(x))


NETWORKS = {"fastvit": FastVit}
