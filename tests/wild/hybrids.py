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

MobileViT (Mehta and Rastegari 2022, "MobileViT: Light-weight, General-purpose, and
Mobile-friendly Vision Transformer"), its `MobileVitBlock`: a 3x3 ConvNormAct and a 1x1 conv to
the transformer's width; unfold into patches `reshape(B * C * n_h, p_h, n_w, p_w).transpose(1, 2)`
then `reshape(B, C, N, P).transpose(1, 3).reshape(B * P, N, -1)` (tokens of every patch
position); timm's ViT `Block`s (LayerNorm, `Attention` with the same [3, heads, d] split as
FastViT's, `B, N, C = x.shape` and `reshape(B, N, C)`, an MLP) and a LayerNorm; fold back by the
reverse reshapes; a 1x1 ConvNormAct projection and a 3x3 ConvNormAct fusing it with the block's
input (`cat((shortcut, x), dim=1)`); MobileNetV2 inverted residuals before it.

EfficientFormer (Li et al. 2022, "EfficientFormer: Vision Transformers at MobileNet Speed"): 4D
`MetaBlock2d`s (`pool(x) - x` token mixing with `AvgPool2d(3, 1, 1, count_include_pad=False)`,
a `ConvMlpWithNorm` of 1x1 convs with BN, `LayerScale2d` as `x * gamma.view(1, -1, 1, 1)`), a
strided ConvNorm downsampling, `Flat` (`x.flatten(2).transpose(1, 2)`), a `MetaBlock1d`
(LayerNorm, LeViT-style `Attention`: one Linear writing q, k, v of every head,
`reshape(B, N, num_heads, -1).permute(0, 2, 1, 3)`, `split([key_dim, key_dim, val_dim], dim=3)`,
attention biases, `reshape(B, N, val_attn_dim)`; a layer scale [C]; LayerNorm and a Linear MLP),
a LayerNorm and a Linear head on the mean token.

Widths, resolution and depth are tiny; the structure is timm's. Departures, none of which changes
what is computed in eval mode: attention is the unfused path (`fused_attn=False`: explicit
`q @ k.transpose(-2, -1)`, softmax, `@ v`, not `F.scaled_dot_product_attention`); FastViT's stem
is plain conv, BN, GELU (timm's is reparameterizable MobileOne blocks, which fold to that);
MobileViT's unfold has no interpolation branch (the resolution is a multiple of the patch size);
EfficientFormer's attention biases are indexed directly (timm caches them per device in eval
mode, which symbolic tracing cannot follow) and it has no distillation head.
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


# ---- MobileViT ----

class TokenAttention(nn.Module):
    """timm's vision_transformer `Attention` on tokens [B, N, C] (unfused path)."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class TransformerBlock(nn.Module):
    """timm's vision_transformer `Block`: pre-norm attention and MLP (SiLU, as MobileViT's)."""

    def __init__(self, dim, num_heads, mlp_ratio=2.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = TokenAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, int(dim * mlp_ratio)), nn.SiLU(),
                                 nn.Linear(int(dim * mlp_ratio), dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class MobileVitBlock(nn.Module):
    def __init__(self, in_chs, transformer_dim, num_heads=2, depth=1, patch_size=2):
        super().__init__()
        self.conv_kxk = ConvNormAct(in_chs, in_chs, 3)
        self.conv_1x1 = nn.Conv2d(in_chs, transformer_dim, 1, bias=False)
        self.transformer = nn.Sequential(*(TransformerBlock(transformer_dim, num_heads)
                                           for _ in range(depth)))
        self.norm = nn.LayerNorm(transformer_dim)
        self.conv_proj = ConvNormAct(transformer_dim, in_chs, 1)
        self.conv_fusion = ConvNormAct(2 * in_chs, in_chs, 3)
        self.patch_size = (patch_size, patch_size)
        self.patch_area = patch_size * patch_size

    def forward(self, x):
        shortcut = x
        x = self.conv_1x1(self.conv_kxk(x))
        patch_h, patch_w = self.patch_size
        B, C, H, W = x.shape
        num_patch_h, num_patch_w = H // patch_h, W // patch_w
        num_patches = num_patch_h * num_patch_w
        # unfold: [B, C, H, W] -> [B * C * n_h, n_w, p_h, p_w] -> [B * P, N, C]
        x = x.reshape(B * C * num_patch_h, patch_h, num_patch_w, patch_w).transpose(1, 2)
        x = x.reshape(B, C, num_patches, self.patch_area).transpose(1, 3).reshape(
            B * self.patch_area, num_patches, -1)
        x = self.norm(self.transformer(x))
        # fold: [B * P, N, C] -> [B, C, H, W]
        x = x.contiguous().view(B, self.patch_area, num_patches, -1)
        x = x.transpose(1, 3).reshape(B * C * num_patch_h, num_patch_w, patch_h, patch_w)
        x = x.transpose(1, 2).reshape(B, C, num_patch_h * patch_h, num_patch_w * patch_w)
        x = self.conv_proj(x)
        return self.conv_fusion(torch.cat((shortcut, x), dim=1))


class InvertedResidual(nn.Module):
    """MobileNetV2's block (timm's mobilevit stages use it before every MobileViT block)."""

    def __init__(self, c_in, c_out, stride=1, expand=4):
        super().__init__()
        mid = c_in * expand
        self.conv_pw = ConvNormAct(c_in, mid, 1)
        self.conv_dw = ConvNormAct(mid, mid, 3, stride, groups=mid)
        self.conv_pwl = ConvNormAct(mid, c_out, 1, act=False)
        self.has_skip = stride == 1 and c_in == c_out

    def forward(self, x):
        y = self.conv_pwl(self.conv_dw(self.conv_pw(x)))
        return x + y if self.has_skip else y


class MobileVit(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = ConvNormAct(3, 8, 3, 2)
        self.stages = nn.Sequential(InvertedResidual(8, 16, 2), InvertedResidual(16, 16),
                                    MobileVitBlock(16, 32))
        self.final_conv = ConvNormAct(16, 64, 1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1),
                                  nn.Linear(64, num_classes))

    def forward(self, x):
        return self.head(self.final_conv(self.stages(self.stem(x))))


# ---- EfficientFormer ----

class Pooling(nn.Module):
    def __init__(self):
        super().__init__()
        self.pool = nn.AvgPool2d(3, 1, 1, count_include_pad=False)

    def forward(self, x):
        return self.pool(x) - x


class ConvMlpWithNorm(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.norm1 = nn.Conv2d(dim, hidden, 1), nn.BatchNorm2d(hidden)
        self.act = nn.GELU()
        self.fc2, self.norm2 = nn.Conv2d(hidden, dim, 1), nn.BatchNorm2d(dim)
        self.drop = nn.Dropout(0.0)

    def forward(self, x):
        x = self.drop(self.act(self.norm1(self.fc1(x))))
        return self.drop(self.norm2(self.fc2(x)))


class EfficientFormerLayerScale2d(nn.Module):
    def __init__(self, dim, init_values=1e-5):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x):
        return x * self.gamma.view(1, -1, 1, 1)


class MetaBlock2d(nn.Module):
    def __init__(self, dim, mlp_ratio=4.0):
        super().__init__()
        self.token_mixer = Pooling()
        self.ls1 = EfficientFormerLayerScale2d(dim)
        self.mlp = ConvMlpWithNorm(dim, int(dim * mlp_ratio))
        self.ls2 = EfficientFormerLayerScale2d(dim)

    def forward(self, x):
        x = x + self.ls1(self.token_mixer(x))
        return x + self.ls2(self.mlp(x))


class FormerAttention(nn.Module):
    """timm's efficientformer `Attention` (LeViT's, with plain Linears)."""

    def __init__(self, dim, key_dim=8, num_heads=2, attn_ratio=2, resolution=4):
        super().__init__()
        self.num_heads = num_heads
        self.scale = key_dim ** -0.5
        self.key_dim = key_dim
        self.key_attn_dim = key_dim * num_heads
        self.val_dim = int(attn_ratio * key_dim)
        self.val_attn_dim = self.val_dim * num_heads
        self.qkv = nn.Linear(dim, self.key_attn_dim * 2 + self.val_attn_dim)
        self.proj = nn.Linear(self.val_attn_dim, dim)
        pos = torch.stack(torch.meshgrid(torch.arange(resolution), torch.arange(resolution),
                                         indexing="ij")).flatten(1)
        rel_pos = (pos[..., :, None] - pos[..., None, :]).abs()
        rel_pos = (rel_pos[0] * resolution) + rel_pos[1]
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, resolution * resolution))
        self.register_buffer("attention_bias_idxs", rel_pos)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x)
        qkv = qkv.reshape(B, N, self.num_heads, -1).permute(0, 2, 1, 3)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.val_dim], dim=3)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn + self.attention_biases[:, self.attention_bias_idxs]
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, self.val_attn_dim)
        return self.proj(x)


class LayerScale(nn.Module):
    def __init__(self, dim, init_values=1e-5):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class MetaBlock1d(nn.Module):
    def __init__(self, dim, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.token_mixer = FormerAttention(dim)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, int(dim * mlp_ratio)), nn.GELU(),
                                 nn.Linear(int(dim * mlp_ratio), dim))
        self.ls2 = LayerScale(dim)

    def forward(self, x):
        x = x + self.ls1(self.token_mixer(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class EfficientFormer(nn.Module):
    def __init__(self, widths=(16, 32), num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(ConvNormAct(3, widths[0] // 2, 3, 2),
                                  ConvNormAct(widths[0] // 2, widths[0], 3, 2))
        self.stage0 = MetaBlock2d(widths[0])
        self.downsample = ConvNormAct(widths[0], widths[1], 3, 2, act=False)
        self.stage1 = MetaBlock1d(widths[1])
        self.norm = nn.LayerNorm(widths[1])
        self.head = nn.Linear(widths[1], num_classes)

    def forward(self, x):
        x = self.downsample(self.stage0(self.stem(x)))
        x = self.stage1(x.flatten(2).transpose(1, 2))
        return self.head(self.norm(x).mean(1))


NETWORKS = {"fastvit": FastVit, "mobilevit": MobileVit, "efficientformer": EfficientFormer}
