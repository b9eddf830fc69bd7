"""Layers written the way popular model libraries write them, messy parts included, for testing
that archc's rewrites fire on real-world code (not on look-alikes of archc's own blocks):

- `BatchNormAct2d`: a BatchNorm2d *subclass* whose forward re-implements BN with `F.batch_norm`,
  checks the input rank with `torch._assert(x.ndim == 4, ...)` and ends in a dropout and an
  activation (identities when unused), as libraries do to keep checkpoints of separate BN/act.
- `ConvNormAct`: conv, then that BN, named `conv` and `bn`.
- `DropPath`: stochastic depth, an identity in eval mode, written as a function of `training`.
- `LayerScale2d`: a learned per-channel scale `x * gamma` with gamma of shape (C, 1, 1), in place
  (`x.mul_(gamma)`) on request.
- `SqueezeExcite`: x * sigmoid(expand(relu(reduce(mean(x))))), non-linear: it never merges.

Written from the papers' descriptions; every block module beside this one carries the authors'
own kind of hand-written `reparameterize()`, the baseline archc's graph rewrites are compared to.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BatchNormAct2d(nn.BatchNorm2d):
    def __init__(self, channels: int, act: nn.Module | None = None, drop: nn.Module | None = None):
        super().__init__(channels)
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def forward(self, x):
        torch._assert(x.ndim == 4, f"expected a 4D input (got {x.ndim}D)")
        if self.training and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         use_batch_stats, 0.0 if self.momentum is None else self.momentum,
                         self.eps)
        return self.act(self.drop(x))


class ConvNormAct(nn.Module):
    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1,
                 act: nn.Module | None = None, dilation: int = 1):
        super().__init__()
        padding = dilation * (kernel - 1) // 2
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, padding, dilation, groups, bias=False)
        self.bn = BatchNormAct2d(c_out, act)

    def forward(self, x):
        return self.bn(self.conv(x))


def drop_path(x, probability: float, training: bool):
    if probability == 0.0 or not training:
        return x
    keep = 1 - probability
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class DropPath(nn.Module):
    def __init__(self, probability: float = 0.0):
        super().__init__()
        self.probability = probability

    def forward(self, x):
        return drop_path(x, self.probability, self.training)


class LayerScale2d(nn.Module):
    def __init__(self, channels: int, init: float = 1e-5, inplace: bool = False):
        super().__init__()
        self.inplace = inplace
        self.gamma = nn.Parameter(init * torch.ones(channels, 1, 1))

    def forward(self, x):
        return x.mul_(self.gamma) if self.inplace else x * self.gamma


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, ratio: float = 0.25):
        super().__init__()
        hidden = max(1, int(channels * ratio))
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x):
        scale = x.mean((2, 3), keepdim=True)
        return x * self.fc2(self.act(self.fc1(scale))).sigmoid()


# ---- the hand-written conversions' shared arithmetic, as every such repository has it ----

def fuse_conv_bn(weight: torch.Tensor, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(W t, β - μ t) with t = γ / sqrt(σ² + ε): a conv without bias followed by `bn`."""
    std = (bn.running_var + bn.eps).sqrt()
    t = bn.weight / std
    return weight * t.reshape(-1, *([1] * (weight.ndim - 1))), bn.bias - bn.running_mean * t


def identity_kernel(channels: int, groups: int, kernel: int, like: torch.Tensor) -> torch.Tensor:
    per_group = channels // groups
    value = torch.zeros(channels, per_group, kernel, kernel, dtype=like.dtype)
    for i in range(channels):
        value[i, i % per_group, kernel // 2, kernel // 2] = 1
    return value


def deploy_conv(weight: torch.Tensor, bias: torch.Tensor, stride=1, dilation=1, groups=1
                ) -> nn.Conv2d:
    """The inference conv of a fused kernel (padding `dilation (k - 1) / 2`)."""
    kernel = weight.shape[-1]
    conv = nn.Conv2d(weight.shape[1] * groups, weight.shape[0], kernel, stride,
                     dilation * (kernel - 1) // 2, dilation, groups, bias=True)
    conv.weight.data, conv.bias.data = weight.detach().clone(), bias.detach().clone()
    return conv


def fused_like(conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor) -> nn.Conv2d:
    return deploy_conv(weight, bias, conv.stride[0], conv.dilation[0], conv.groups)


def reparameterize(model: nn.Module) -> nn.Module:
    """Call every block's own `reparameterize()`, innermost first, as libraries' helpers do."""
    for module in list(model.modules())[::-1]:
        if hasattr(module, "reparameterize"):
            module.reparameterize()
    return model
