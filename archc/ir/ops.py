"""One table of op kinds: how archc reads what a graph node computes, whatever spelling the
graph uses (an nn.Module call, a torch function, an aten overload from torch.export)."""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F

_ATEN = torch.ops.aten

# aten overloads of a torch.export program -> the torch functions an FX trace would have called
ATEN_TO_TORCH = {
    _ATEN.add.Tensor: torch.add, _ATEN.sub.Tensor: torch.sub, _ATEN.mul.Tensor: operator.mul,
    _ATEN.div.Tensor: operator.truediv, _ATEN.neg.default: operator.neg,
    _ATEN.relu.default: torch.relu, _ATEN.sigmoid.default: torch.sigmoid,
    _ATEN.tanh.default: torch.tanh, _ATEN.gelu.default: F.gelu, _ATEN.silu.default: F.silu,
    _ATEN.hardswish.default: F.hardswish, _ATEN.hardsigmoid.default: F.hardsigmoid,
    _ATEN.hardtanh.default: F.hardtanh, _ATEN.leaky_relu.default: F.leaky_relu,
    _ATEN.dropout.default: torch.dropout, _ATEN.clone.default: torch.clone,
    _ATEN.cat.default: torch.cat, _ATEN.mean.dim: torch.mean, _ATEN.flatten.using_ints:
    torch.flatten, _ATEN.view.default: torch.reshape, _ATEN.reshape.default: torch.reshape,
    _ATEN.transpose.int: torch.transpose, _ATEN.permute.default: torch.permute,
    _ATEN.channel_shuffle.default: torch.channel_shuffle, _ATEN.chunk.default: torch.chunk,
    _ATEN.split.Tensor: torch.split, _ATEN.unsqueeze.default: torch.unsqueeze,
    _ATEN.squeeze.dim: torch.squeeze, _ATEN.adaptive_avg_pool2d.default: F.adaptive_avg_pool2d,
    _ATEN.avg_pool2d.default: F.avg_pool2d, _ATEN.max_pool2d.default: F.max_pool2d,
}
