"""One table of op kinds: how archc reads what a graph node computes, whatever spelling the
graph uses (an nn.Module call, a torch function, a Tensor method, an aten overload from
torch.export).

Modules are matched by exact type where a rule relies on what the module computes (a subclass
may compute something else); `isinstance` where only the parameters matter. The readers below
the tables answer the questions several modules ask of a node: what it calls (`node_target`,
`op_kind`, `call_target`, `aten_name`), which sizes a reshape requests (`reshape_sizes`), how
much a conv pads (`conv_pads`).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node

_ATEN = torch.ops.aten

# ---- layers ----

CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_TRANSPOSE_MODULES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
CONV_FUNCTIONS = (F.conv1d, F.conv2d, F.conv3d)  # torch.conv2d is F.conv2d
LINEAR_FUNCTIONS = (F.linear,)  # F.linear is torch._C._nn.linear
BN_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
BN_FUNCTIONS = (F.batch_norm, torch.batch_norm)  # and aten's "batch_norm" (see `aten_name`)
AVG_POOL_MODULES = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
MAX_POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
AVG_POOL_FUNCTIONS = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)
# spatial dims of a layer type or function: the kernel's rank (BatchNorm1d also takes (N, C))
SPATIAL_DIMS = {
    **{kind: dims for dims, kind in enumerate(CONV_MODULES, 1)},
    **{kind: dims for dims, kind in enumerate(CONV_FUNCTIONS, 1)},
    **{kind: dims for dims, kind in enumerate(BN_MODULES, 1)},
    **{kind: dims for dims, kind in enumerate(AVG_POOL_MODULES, 1)},
    **{kind: dims for dims, kind in enumerate(AVG_POOL_FUNCTIONS, 1)},
}

# ---- activations: pointwise, y[i] = f(x[i]) for one scalar f, no per-channel parameters ----

ACTIVATION_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus,
)
ACTIVATION_FUNCTIONS = frozenset({
    F.relu, torch.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish,
    F.hardswish, F.hardsigmoid, F.hardtanh, F.sigmoid, torch.sigmoid, F.tanh, torch.tanh,
    F.softplus,
})
ACTIVATION_METHODS = frozenset({"relu", "sigmoid", "tanh"})  # x.relu(), ...

# ---- reshapes ----

RESHAPES = frozenset({torch.reshape, "view", "reshape"})  # request a whole new shape

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
    _ATEN.split_with_sizes.default: torch.split, _ATEN.matmul.default: torch.matmul,
    _ATEN.softmax.int: torch.softmax, _ATEN.reshape_as.default: torch.Tensor.reshape_as,
    _ATEN.constant_pad_nd.default: torch.constant_pad_nd, _ATEN.pad.default: F.pad,
    _ATEN.pixel_shuffle.default: F.pixel_shuffle, _ATEN.pixel_unshuffle.default:
    F.pixel_unshuffle, _ATEN.prelu.default: F.prelu, _ATEN.pow.Tensor_Scalar: torch.pow,
    _ATEN.sqrt.default: torch.sqrt, _ATEN.rsqrt.default: torch.rsqrt,
}


# ---- reading a node ----

def node_target(gm: GraphModule, node: Node):
    """What a call computes: its module's exact type, its function or its method name (the
    keys of the tables above); None for inputs, constants and the output."""
    if node.op == "call_module":
        return type(gm.get_submodule(node.target))
    return call_target(node)


def op_kind(gm: GraphModule, node: Node) -> str:
    """A readable name of what a node computes (the ops counts of pass reports): its module
    type's name, its function's name, `Tensor.method`, else its op (`placeholder`, ...)."""
    target = node_target(gm, node)
    if node.op == "call_method":
        return f"Tensor.{target}"
    if target is None:
        return node.op
    return getattr(target, "__name__", str(target))


def call_target(node: Node):
    """The function or method name a call computes (None for modules, inputs, constants)."""
    return node.target if node.op in ("call_function", "call_method") else None


def aten_name(node: Node) -> str | None:
    """The aten op an overload calls (`"batch_norm"` for `aten.batch_norm.default`), None for
    anything that is not an aten overload."""
    packet = getattr(node.target, "overloadpacket", None) if node.op == "call_function" else None
    return getattr(packet, "__name__", None)


def reshape_sizes(node: Node) -> tuple | None:
    """The sizes a reshape requests, as written (ints, -1, or nodes computing a size):
    `torch.reshape(x, sizes)` (also `shape=sizes`), `x.view(sizes)`, `x.view(*sizes)`; None for
    anything else."""
    if call_target(node) not in RESHAPES:
        return None
    sizes = node.args[1:]
    if not sizes and node.op == "call_function" and "shape" in node.kwargs:
        sizes = (node.kwargs["shape"],)
    if not sizes:
        return None
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list, torch.Size)):
        sizes = sizes[0]
    return tuple(sizes)


Pads = tuple[tuple[int, int], ...]  # zero padding (before, after) per spatial axis, first first


def conv_pads(padding, kernel: Sequence[int], dilation) -> Pads | None:
    """The zero padding a conv's `padding` argument adds on each spatial axis: ints (p, p),
    "valid" (0, 0), "same" a total of d (k - 1) with the extra one on the far side; None for an
    unknown string."""
    n = len(kernel)
    dilation = tuple(dilation) if isinstance(dilation, (tuple, list)) else (dilation,) * n
    if padding == "valid":
        return ((0, 0),) * n
    if padding == "same":
        totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
        return tuple((t // 2, t - t // 2) for t in totals)
    if isinstance(padding, str):
        return None
    padding = tuple(padding) if isinstance(padding, (tuple, list)) else (padding,) * n
    return tuple((p, p) for p in padding)
