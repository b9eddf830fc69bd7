"""Train-form re-parameterization families as popular libraries write them, each with the
authors' kind of hand-written `reparameterize()` (the baseline archc's deploy form must match or
beat in conv count): RepVGG (Ding et al. 2021), MobileOne (Vasu et al. 2023), RepViT (Wang et al.
2023), FastViT (Vasu et al. 2023), RepGhost (Chen et al. 2022), LeViT-style BN around linears.

The messy parts are on purpose: BN subclasses with activation/dropout tails and rank checks
(`layers.BatchNormAct2d`), `nn.Identity` attention slots, DropPath, branch lists
(`nn.ModuleList`) summed in Python loops starting from `0`, in-place `+=`, layer scales,
distillation heads averaged in eval. The networks (`NETWORKS`) are small, so tests stay cheap.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tests.wild.layers import (
    BatchNormAct2d,
    ConvNormAct,
    DropPath,
    LayerScale2d,
    SqueezeExcite,
    deploy_conv,
    fuse_conv_bn,
    fused_like,
    identity_kernel,
)


def _branch_kernel(branch: nn.Module, kernel: int, groups: int) -> tuple[torch.Tensor, ...]:
    """A conv-BN branch (ConvNormAct) or a BN-only identity branch, as one kxk kernel and bias."""
    if isinstance(branch, ConvNormAct):
        weight, bias = fuse_conv_bn(branch.conv.weight, branch.bn)
        pad = (kernel - weight.shape[-1]) // 2
        return F.pad(weight, [pad] * 4), bias
    channels = branch.num_features
    return fuse_conv_bn(identity_kernel(channels, groups, kernel, branch.weight), branch)


class RepVggBlock(nn.Module):
    """act(attn(conv_1x1(x) + conv_kxk(x) [+ identity BN(x)])), the identity added in place."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, groups: int = 1,
                 drop_path: float = 0.0, dilation: int = 1):
        super().__init__()
        self.groups = groups
        identity = c_in == c_out and stride == 1
        self.identity = BatchNormAct2d(c_out) if identity else None
        self.conv_kxk = ConvNormAct(c_in, c_out, 3, stride, groups, dilation=dilation)
        self.conv_1x1 = ConvNormAct(c_in, c_out, 1, stride, groups)
        self.drop_path = DropPath(drop_path) if drop_path > 0 and identity else nn.Identity()
        self.attn = nn.Identity()
        self.act = nn.ReLU(inplace=True)
        self.reparam_conv = None

    def forward(self, x):
        if self.reparam_conv is not None:
            return self.act(self.attn(self.reparam_conv(x)))
        if self.identity is None:
            x = self.conv_1x1(x) + self.conv_kxk(x)
        else:
            identity = self.identity(x)
            x = self.conv_1x1(x) + self.conv_kxk(x)
            x = self.drop_path(x)
            x += identity
        return self.act(self.attn(x))

    def reparameterize(self):
        if self.reparam_conv is not None or self.conv_kxk.conv.dilation != (1, 1):
            return  # the authors' code cannot embed a 1x1 into a dilated 3x3: it stays
        branches = [self.conv_kxk, self.conv_1x1] + ([self.identity] if self.identity else [])
        parts = [_branch_kernel(b, 3, self.groups) for b in branches]
        self.reparam_conv = fused_like(self.conv_kxk.conv, sum(w for w, _ in parts),
                                       sum(b for _, b in parts))
        del self.conv_kxk, self.conv_1x1, self.identity, self.drop_path


class MobileOneBlock(nn.Module):
    """act(attn(scale(x) + Σ_k conv_k(x) + identity BN(x))) with k branches in a ModuleList,
    accumulated in place from `0`."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 3, stride: int = 1,
                 groups: int = 1, branches: int = 2, act: bool = True, scale: bool = True):
        super().__init__()
        self.kernel, self.stride, self.groups = kernel, stride, groups
        self.identity = BatchNormAct2d(c_out) if c_in == c_out and stride == 1 else None
        self.conv_kxk = (nn.ModuleList(ConvNormAct(c_in, c_out, kernel, stride, groups)
                                       for _ in range(branches)) if branches else None)
        self.conv_scale = ConvNormAct(c_in, c_out, 1, stride, groups) if kernel > 1 and scale \
            else None
        self.attn = nn.Identity()
        self.act = nn.ReLU(inplace=True) if act else nn.Identity()
        self.reparam_conv = None

    def forward(self, x):
        if self.reparam_conv is not None:
            return self.act(self.attn(self.reparam_conv(x)))
        identity_out = 0
        if self.identity is not None:
            identity_out = self.identity(x)
        scale_out = 0
        if self.conv_scale is not None:
            scale_out = self.conv_scale(x)
        out = scale_out + identity_out
        if self.conv_kxk is not None:
            for branch in self.conv_kxk:
                out += branch(x)
        return self.act(self.attn(out))

    def kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.reparam_conv is not None:
            return self.reparam_conv.weight, self.reparam_conv.bias
        branches = [*(self.conv_kxk or []), *([self.conv_scale] if self.conv_scale else []),
                    *([self.identity] if self.identity else [])]
        parts = [_branch_kernel(b, self.kernel, self.groups) for b in branches]
        return sum(w for w, _ in parts), sum(b for _, b in parts)

    def reparameterize(self):
        if self.reparam_conv is not None:
            return
        self.reparam_conv = deploy_conv(*self.kernel_bias(), self.stride, 1, self.groups)
        del self.conv_kxk, self.conv_scale, self.identity


class RepVggDw(nn.Module):
    """RepViT's token mixer: BN(dw kxk conv-BN(x) + dw 1x1 conv with bias(x) + x)."""

    def __init__(self, channels: int, kernel: int = 3):
        super().__init__()
        self.conv = nn.Sequential()
        self.conv.add_module("c", nn.Conv2d(channels, channels, kernel, 1, kernel // 2,
                                            groups=channels, bias=False))
        self.conv.add_module("bn", nn.BatchNorm2d(channels))
        self.conv1 = nn.Conv2d(channels, channels, 1, groups=channels)
        self.bn = nn.BatchNorm2d(channels)
        self.fused = None

    def forward(self, x):
        if self.fused is not None:
            return self.fused(x)
        return self.bn(self.conv(x) + self.conv1(x) + x)

    def reparameterize(self):
        if self.fused is not None:
            return
        c, channels = self.conv.c, self.conv.c.out_channels
        weight, bias = fuse_conv_bn(c.weight, self.conv.bn)
        weight = weight + F.pad(self.conv1.weight, [1, 1, 1, 1])
        weight = weight + identity_kernel(channels, channels, 3, weight)
        bias = bias + self.conv1.bias
        weight, bias = (weight * (self.bn.weight / (self.bn.running_var + self.bn.eps).sqrt())
                        .reshape(-1, 1, 1, 1),
                        self.bn.bias + (bias - self.bn.running_mean) * self.bn.weight
                        / (self.bn.running_var + self.bn.eps).sqrt())
        self.fused = fused_like(c, weight, bias)
        del self.conv, self.conv1, self.bn


class ConvBN(nn.Sequential):
    """RepViT's conv-BN pair (`c`, `bn`), fused by its own method."""

    def __init__(self, c_in, c_out, kernel=1, stride=1, groups=1):
        super().__init__()
        self.add_module("c", nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups,
                                       bias=False))
        self.add_module("bn", nn.BatchNorm2d(c_out))

    def fuse(self) -> nn.Conv2d:
        return fused_like(self.c, *fuse_conv_bn(self.c.weight, self.bn))


class RepViTBlock(nn.Module):
    def __init__(self, channels: int, use_se: bool):
        super().__init__()
        self.token_mixer = RepVggDw(channels)
        self.se = SqueezeExcite(channels) if use_se else nn.Identity()
        self.conv1 = ConvBN(channels, 2 * channels)
        self.act = nn.GELU()
        self.conv2 = ConvBN(2 * channels, channels)

    def forward(self, x):
        x = self.se(self.token_mixer(x))
        return x + self.conv2(self.act(self.conv1(x)))

    def reparameterize(self):
        for name in ("conv1", "conv2"):
            if isinstance(getattr(self, name), ConvBN):
                setattr(self, name, getattr(self, name).fuse())


class NormLinear(nn.Sequential):
    """BatchNorm1d then Linear (RepViT's, LeViT's head)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.add_module("bn", nn.BatchNorm1d(c_in))
        self.add_module("l", nn.Linear(c_in, c_out))

    def fused(self) -> tuple[torch.Tensor, torch.Tensor]:
        bn, linear = self.bn, self.l
        t = bn.weight / (bn.running_var + bn.eps).sqrt()
        u = bn.bias - bn.running_mean * t
        return linear.weight * t[None, :], linear.weight @ u + linear.bias


class DistilledHead(nn.Module):
    """Two NormLinear heads, averaged in eval mode (the distillation head)."""

    def __init__(self, c_in: int, classes: int):
        super().__init__()
        self.head, self.head_dist = NormLinear(c_in, classes), NormLinear(c_in, classes)
        self.fused = None

    def forward(self, x):
        if self.fused is not None:
            return self.fused(x)
        x1, x2 = self.head(x), self.head_dist(x)
        if self.training:
            return x1, x2
        return (x1 + x2) / 2

    def reparameterize(self):
        if self.fused is not None:
            return
        (w1, b1), (w2, b2) = self.head.fused(), self.head_dist.fused()
        self.fused = nn.Linear(w1.shape[1], w1.shape[0])
        self.fused.weight.data, self.fused.bias.data = (w1 + w2) / 2, (b1 + b2) / 2
        del self.head, self.head_dist


class RepMixer(nn.Module):
    """FastViT's token mixer: x + layer_scale(mixer(x) - norm(x)), mixer a depthwise MobileOne
    block without activation, norm a BN-only MobileOne block."""

    def __init__(self, channels: int, kernel: int = 3):
        super().__init__()
        self.norm = MobileOneBlock(channels, channels, kernel, groups=channels, branches=0,
                                   act=False, scale=False)
        self.mixer = MobileOneBlock(channels, channels, kernel, groups=channels, branches=1,
                                    act=False)
        self.layer_scale = LayerScale2d(channels, 1e-2)
        self.kernel, self.fused = kernel, None

    def forward(self, x):
        if self.fused is not None:
            return self.fused(x)
        return x + self.layer_scale(self.mixer(x) - self.norm(x))

    def reparameterize(self):
        if self.fused is not None:
            return
        (wm, bm), (wn, bn) = self.mixer.kernel_bias(), self.norm.kernel_bias()
        channels = wm.shape[0]
        gamma = self.layer_scale.gamma
        weight = identity_kernel(channels, channels, self.kernel, wm) + gamma.unsqueeze(-1) * (
            wm - wn)
        bias = gamma.squeeze() * (bm - bn)
        self.fused = deploy_conv(weight, bias, groups=channels)
        del self.norm, self.mixer, self.layer_scale


class RepConditionalPosEnc(nn.Module):
    """FastViT's positional encoding: x + dwconv7x7(x)."""

    def __init__(self, channels: int):
        super().__init__()
        self.pos_enc = nn.Conv2d(channels, channels, 7, 1, 3, groups=channels)
        self.fused = None

    def forward(self, x):
        return self.fused(x) if self.fused is not None else self.pos_enc(x) + x

    def reparameterize(self):
        if self.fused is None:
            channels = self.pos_enc.out_channels
            weight = self.pos_enc.weight + identity_kernel(channels, channels, 7,
                                                           self.pos_enc.weight)
            self.fused = fused_like(self.pos_enc, weight, self.pos_enc.bias)
            del self.pos_enc


class ReparamLargeKernelConv(nn.Module):
    """A large-kernel conv-BN in parallel with a small-kernel conv-BN (FastViT's stem/patch
    embedding, after RepLKNet)."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 7, small: int = 3, stride: int = 2,
                 groups: int = 1):
        super().__init__()
        self.large_conv = ConvNormAct(c_in, c_out, kernel, stride, groups)
        self.small_conv = ConvNormAct(c_in, c_out, small, stride, groups)
        self.act = nn.GELU()
        self.kernel, self.fused = kernel, None

    def forward(self, x):
        if self.fused is not None:
            return self.act(self.fused(x))
        out = self.large_conv(x)
        out = out + self.small_conv(x)
        return self.act(out)

    def reparameterize(self):
        if self.fused is None:
            parts = [_branch_kernel(b, self.kernel, 1) for b in (self.large_conv,
                                                                 self.small_conv)]
            self.fused = fused_like(self.large_conv.conv, sum(w for w, _ in parts),
                                    sum(b for _, b in parts))
            del self.large_conv, self.small_conv


class ConvMlp(nn.Module):
    """FastViT's ConvFFN: dw 7x7 conv-BN, 1x1 up, GELU, 1x1 down (its authors leave the conv-BN
    unfused in deploy)."""

    def __init__(self, channels: int, ratio: int = 2):
        super().__init__()
        self.conv = ConvNormAct(channels, channels, 7, groups=channels)
        self.fc1 = nn.Conv2d(channels, ratio * channels, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(ratio * channels, channels, 1)
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(self.conv(x))))))


class RepMixerBlock(nn.Module):
    def __init__(self, channels: int, drop_path: float = 0.1):
        super().__init__()
        self.token_mixer = RepMixer(channels)
        self.mlp = ConvMlp(channels)
        self.layer_scale = LayerScale2d(channels, 1e-2, inplace=True)
        self.drop_path = DropPath(drop_path)

    def forward(self, x):
        x = self.token_mixer(x)
        return x + self.drop_path(self.layer_scale(self.mlp(x)))


class RepGhostModule(nn.Module):
    """RepGhost: relu(dw conv-BN(x1) + BN(x1)), x1 = primary conv-BN-ReLU(x); the BN-only branch
    is an `nn.Identity` "conv" followed by a BN, zipped from two Sequentials."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.primary_conv = nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False),
                                          nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))
        self.fusion_conv = nn.Sequential(nn.Identity())
        self.fusion_bn = nn.Sequential(nn.BatchNorm2d(c_out))
        self.cheap_operation = nn.Sequential(
            nn.Conv2d(c_out, c_out, 3, 1, 1, groups=c_out, bias=False), nn.BatchNorm2d(c_out))
        self.relu = nn.ReLU(inplace=False)
        self.fused = None

    def forward(self, x):
        x1 = self.primary_conv(x)
        if self.fused is not None:
            return self.relu(self.fused(x1))
        x2 = self.cheap_operation(x1)
        for conv, bn in zip(self.fusion_conv, self.fusion_bn):
            x2 = x2 + bn(conv(x1))
        return self.relu(x2)

    def reparameterize(self):
        if self.fused is not None:
            return
        conv, bn = self.cheap_operation
        weight, bias = fuse_conv_bn(conv.weight, bn)
        for norm in self.fusion_bn:
            w, b = fuse_conv_bn(identity_kernel(conv.out_channels, conv.out_channels, 3,
                                                weight), norm)
            weight, bias = weight + w, bias + b
        self.fused = fused_like(conv, weight, bias)
        del self.cheap_operation, self.fusion_conv, self.fusion_bn
        primary, primary_bn, act = self.primary_conv
        self.primary_conv = nn.Sequential(
            fused_like(primary, *fuse_conv_bn(primary.weight, primary_bn)), act)


class LinearBN(nn.Module):
    """LeViT's Linear -> BatchNorm1d over (N, C) tokens."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.c, self.bn = nn.Linear(c_in, c_out, bias=False), nn.BatchNorm1d(c_out)

    def forward(self, x):
        return self.bn(self.c(x))


# ---- small networks, one per family ----

class Stem(nn.Module):
    def __init__(self, c_out: int):
        super().__init__()
        self.conv = ConvNormAct(3, c_out, 3, 2, act=nn.ReLU(inplace=True))

    def forward(self, x):
        return self.conv(x)


class Classifier(nn.Module):
    def __init__(self, c_in: int, classes: int = 10):
        super().__init__()
        self.fc = nn.Linear(c_in, classes)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class RepVggNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = Stem(16)
        self.stages = nn.Sequential(RepVggBlock(16, 16, drop_path=0.1), RepVggBlock(16, 32, 2),
                                    RepVggBlock(32, 32, groups=4), RepVggBlock(32, 32))
        self.head = Classifier(32)

    def forward(self, x):
        return self.head(self.stages(self.stem(x)))


class MobileOneNet(nn.Module):
    """Depthwise kxk then pointwise 1x1 MobileOne blocks, k = 4 branches (S0's)."""

    def __init__(self):
        super().__init__()
        self.stem = Stem(16)
        blocks = []
        for c_in, c_out, stride in ((16, 32, 2), (32, 32, 1)):
            blocks += [MobileOneBlock(c_in, c_in, 3, stride, groups=c_in, branches=4),
                       MobileOneBlock(c_in, c_out, 1, 1, branches=4)]
        self.stages = nn.Sequential(*blocks)
        self.head = Classifier(32)

    def forward(self, x):
        return self.head(self.stages(self.stem(x)))


class RepViTNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(ConvBN(3, 16, 3, 2), nn.GELU())
        self.blocks = nn.Sequential(RepViTBlock(16, True), RepViTBlock(16, False))
        self.head = DistilledHead(16, 10)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.head(x.mean((2, 3)))

    def reparameterize(self):
        self.stem[0] = self.stem[0].fuse()


class FastViTNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(ReparamLargeKernelConv(3, 16, 7, 3, 2),
                                  MobileOneBlock(16, 16, 1, branches=1))
        self.stages = nn.Sequential(RepMixerBlock(16), RepConditionalPosEnc(16), RepMixerBlock(16))
        self.head = Classifier(16)

    def forward(self, x):
        return self.head(self.stages(self.stem(x)))


class RepGhostNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = Stem(16)
        self.ghost = nn.Sequential(RepGhostModule(16, 24), RepGhostModule(24, 24))
        self.head = Classifier(24)

    def forward(self, x):
        return self.head(self.ghost(self.stem(x)))


class LeViTMlp(nn.Module):
    """Tokens (N, C): Linear-BN, GELU, then BN-Linear (both folds)."""

    def __init__(self):
        super().__init__()
        self.up = LinearBN(24, 48)
        self.act = nn.GELU()
        self.down = NormLinear(48, 10)

    def forward(self, x):
        return self.down(self.act(self.up(x)))

    def reparameterize(self):
        if isinstance(self.down, NormLinear):
            weight, bias = self.down.fused()
            self.down = nn.Linear(48, 10)
            self.down.weight.data, self.down.bias.data = weight, bias


NETWORKS = {  # family -> (network, input shape)
    "repvgg": (RepVggNet, (1, 3, 32, 32)),
    "mobileone": (MobileOneNet, (1, 3, 32, 32)),
    "repvit": (RepViTNet, (1, 3, 32, 32)),
    "fastvit": (FastViTNet, (1, 3, 32, 32)),
    "repghost": (RepGhostNet, (1, 3, 32, 32)),
    "levit_mlp": (LeViTMlp, (1, 24)),
}
