"""Merge consecutive linear convs into one conv (REWRITES.md R6, R7, R8), and the algebra of linear
chains that branch merging shares.

A chain of linear ops, nothing non-linear between and every intermediate tensor read once, is one
conv. Each op is written as a zero pad followed by an unpadded ("valid") conv, and the chain is
composed op by op into a single `conv(pad(x))`:

    affine  t (W ⋆ x + b) + u = (t W) ⋆ x + (t b + u)      BN, constant scales, constant biases
    R6      W2 ⋆ (W1 x + b1)  (W1 1x1):  W[o,i] = Σ_c W2[o,c] W1[c,i],  stride s1 s2, dilation s1 d2
    R7      W2 (W1 ⋆ x + b1)  (W2 1x1):  W[o]   = Σ_c W2[o,c] W1[c],    stride s1 s2, dilation d1
    R8      general:  W[p] = Σ_{q + f r = p} W2[r] W1[q],  kernel K1 + f (K2 - 1), dilation d1,
            f = s1 d2 / d1 (an integer: with dilation 1 it is s1)
    bias    b = b2 + Σ_{c,h,w} W2[o,c,h,w] b1_c
    pad     pad_p(W1 ⋆_{s1} x) = W1 ⋆_{s1} pad_{s1 p}(x)   only for a 1x1 W1 with zero bias: else
            the border reads b1 or real input after merging (the R6/R8 border trap)
    groups  g1 != g2: the conv with more groups is block-diagonalised to the other's (one divides
            the other)
    pool    avgpool_k(x) = (1/Πk) ⋆ x per channel (count_include_pad=True, ceil_mode=False)

`F.pad(y, p, value=v)` is `pad_0(y - v) + v`: a train graph that pads the intermediate with the
first conv's bias (DBB's BNAndPad) cancels that bias before the zero pad, which makes R6 exact.
"Zero" means zero up to rounding in the model's dtype (the graph computes v from the BN itself).

The pass `merge_sequential_convs` merges conv -> [affine / pad]* -> conv when the result is exact
and costs no more multiply-adds per output pixel than the convs it replaces (the first conv counted
at the second conv's output resolution): merging usually raises the cost (two 3x3 -> one 5x5:
18 C² -> 25 C²), so every decision is reported with both numbers.

A refusal reason starts with one of the constants below; details may follow after ": ".
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg

from archc import weight_algebra as wa
from archc.pipeline import PassContext, PassReport, PassResult, Refusal, op_kind, register_pass
from archc.rules import delete_if_unused, describe, module_uses, node_dtype, node_shape
from archc.rules import propagate_shapes as _propagate_shapes

BORDER = ("padding in the second conv (border): it zero-pads a tensor that is not zero at the "
          "border after merging (the first conv has a bias or a spatial kernel)")
COST = "cost rule: the merged conv needs more multiply-adds than the convs it replaces"
GROUPS_MISMATCH = "groups mismatch: neither conv's groups divide the other's"
OTHER_USERS = "the intermediate tensor has other users: they need the unmerged value"
SHARED_MODULE = ("shared module: the conv is used more than once; merging would untie its "
                 "weights")
DILATION = ("dilation: the first conv's dilation must divide stride1 * dilation2 on every axis "
            "with a spatial kernel in both convs")
NONLINEAR = "a non-linear op between the convs"
TRAINING = "training mode: BN without running statistics or in training uses batch statistics"
PADDING_MODE = "the conv pads with reflect/replicate/circular values: only zero padding merges"
SUBCLASS = ("a subclass of a torch conv/BN/pool type (its forward may differ): the merge algebra "
            "is not known to apply")
AVG_POOL = ("avg-pool with count_include_pad=False (and padding) or ceil_mode=True is not a conv "
            "at the border")
ASYMMETRIC = "the merged conv would need asymmetric padding"
CHANNELS = "channel counts do not chain (the graph cannot run)"
SHAPES_UNKNOWN = ("shapes unknown or not conv activations (N, C, *spatial): give example inputs")

MAX_SWEEPS = 100
# "zero up to rounding": |b| <= ZERO_BIAS_ULPS * eps(dtype) * (largest bias magnitude seen)
ZERO_BIAS_ULPS = 1e3

Pads = tuple[tuple[int, int], ...]  # zero padding (before, after) per spatial axis, first first

_CONVS = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_BNS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_BN_DIMS = {nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}  # BatchNorm1d: (N, C) or (N, C, L)
_POOLS = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}
_PAD_MODULES = {nn.ZeroPad1d: 1, nn.ZeroPad2d: 2, nn.ZeroPad3d: 3, nn.ConstantPad1d: 1,
                nn.ConstantPad2d: 2, nn.ConstantPad3d: 3}
_PASS_THROUGH_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_CONV_FUNCTIONS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
_POOL_FUNCTIONS = {F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3}
_CONV_PARAMS = (("input", None), ("weight", None), ("bias", None), ("stride", 1), ("padding", 0),
                ("dilation", 1), ("groups", 1))
_POOL_PARAMS = (("input", None), ("kernel_size", None), ("stride", None), ("padding", 0),
                ("ceil_mode", False), ("count_include_pad", True), ("divisor_override", None))
_PAD_PARAMS = (("input", None), ("pad", None), ("mode", "constant"), ("value", None))

# Binary arithmetic by target (call_function callables and call_method names).
_MUL = {operator.mul, torch.mul, "mul"}
_DIV = {operator.truediv, torch.div, "div"}
ADD_TARGETS = {operator.add, torch.add, "add"}
SUB_TARGETS = {operator.sub, torch.sub, "sub"}
_NEG = {operator.neg, torch.neg, "neg"}
_PASS_THROUGH_METHODS = {"contiguous"}
# Pure ops evaluated when all their inputs are constants (a layer-scale's gamma.view(1, -1, 1, 1)).
_PURE_FUNCTIONS = {operator.add, operator.sub, operator.mul, operator.truediv, operator.neg,
                   torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.sqrt, torch.rsqrt,
                   torch.reciprocal, torch.reshape, torch.flatten, torch.unsqueeze, torch.squeeze,
                   torch.exp, torch.abs}
_PURE_METHODS = {"add", "sub", "mul", "div", "neg", "sqrt", "rsqrt", "reciprocal", "reshape",
                 "view", "flatten", "unsqueeze", "squeeze", "contiguous", "detach", "exp", "abs"}


class Unmergeable(Exception):
    """A chain or a set of branches that cannot become one conv; `reason` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# ---- the elements of a linear chain ----

@dataclass(frozen=True)
class Affine:
    """`scale * x + shift` per channel; 0-d tensors broadcast over the channels."""

    scale: Tensor
    shift: Tensor


@dataclass(frozen=True)
class Pad:
    """Zero padding of the last `len(pads)` spatial axes."""

    pads: Pads


@dataclass(frozen=True)
class Pool:
    """Average pooling, unpadded (its padding is a `Pad` before it)."""

    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    divisor: int | None  # divisor_override


@dataclass(frozen=True)
class Conv:
    """An unpadded conv (its padding is a `Pad` before it); float64 once composed."""

    weight: Tensor  # [O, C/g, *k]
    bias: Tensor  # [O]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int

    @property
    def kernel(self) -> tuple[int, ...]:
        return tuple(self.weight.shape[2:])

    @property
    def pointwise(self) -> bool:
        return all(k == 1 for k in self.kernel)


Element = Affine | Pad | Pool | Conv


@dataclass(frozen=True)
class LinearOp:
    """A node that computes `elements` (applied in order) of its tensor input `input`."""

    input: Node
    elements: tuple[Element, ...]


@dataclass(frozen=True)
class NotLinear:
    """A node that is no mergeable linear op; `reason` when it looks like one but cannot merge."""

    reason: str | None = None


# ---- a composed chain: x -> conv(pad(x)) ----

@dataclass(frozen=True)
class Linear:
    """`x -> conv(pad(x))`: zero padding, then an unpadded conv (`conv` None: the identity)."""

    in_channels: int
    pads: Pads
    conv: Conv | None
    dtype: torch.dtype  # the model's dtype: decides what "zero up to rounding" means
    bias_scale: float = 0.0  # the largest bias magnitude seen while composing
    costs: tuple[tuple[int, tuple[int, ...]], ...] = ()  # (MACs per own output pixel, stride)

    @classmethod
    def identity(cls, channels: int, spatial_dims: int, dtype: torch.dtype) -> Linear:
        return cls(channels, ((0, 0),) * spatial_dims, None, dtype)

    @property
    def spatial_dims(self) -> int:
        return len(self.pads)

    @property
    def out_channels(self) -> int:
        return self.in_channels if self.conv is None else self.conv.weight.shape[0]

    def macs(self) -> int:
        """Multiply-adds of the unmerged ops per output pixel of the chain."""
        total, pixels = 0, 1
        for macs, stride in reversed(self.costs):
            total += macs * pixels
            pixels *= math.prod(stride)
        return total

    def then_all(self, elements: Sequence[Element]) -> Linear:
        state = self
        for element in elements:
            state = state.then(element)
        return state

    def then(self, element: Element) -> Linear:
        """This chain followed by `element`; raises `Unmergeable`."""
        if isinstance(element, Affine):
            return self._then_affine(element)
        if isinstance(element, Pad):
            return self._then_pad(element.pads)
        if isinstance(element, Pool):
            return self._then_pool(element)
        return self._then_conv(element)

    def _channel_vector(self, value: Tensor) -> Tensor:
        channels = self.out_channels
        if value.ndim == 0:
            return value.expand(channels)
        if value.shape != (channels,):
            raise Unmergeable(CHANNELS)
        return value

    def _current_conv(self) -> Conv:
        """The conv of the chain, the identity as a depthwise 1x1 conv (R3) if there is none."""
        if self.conv is not None:
            return self.conv
        n, channels = self.spatial_dims, self.in_channels
        weight = wa.identity_kernel(channels, channels, (1,) * n, torch.float64)
        return Conv(weight, weight.new_zeros(channels), (1,) * n, (1,) * n, channels)

    def _then_affine(self, affine: Affine) -> Linear:
        conv = self._current_conv()
        scale, shift = self._channel_vector(affine.scale), self._channel_vector(affine.shift)
        weight, bias = wa.fold_bn_after(conv.weight, conv.bias, scale, shift)
        scale_seen = max(self.bias_scale, _max_abs(conv.bias), _max_abs(shift), _max_abs(bias))
        return replace(self, conv=replace(conv, weight=weight, bias=bias), bias_scale=scale_seen,
                       costs=(*self.costs, (self.out_channels, (1,) * self.spatial_dims)))

    def _bias_is_zero(self) -> bool:
        tolerance = ZERO_BIAS_ULPS * torch.finfo(self.dtype).eps * self.bias_scale
        return _max_abs(self.conv.bias) <= tolerance

    def _then_pad(self, pads: Pads) -> Linear:
        if len(pads) > self.spatial_dims:
            raise Unmergeable(SHAPES_UNKNOWN)
        pads = ((0, 0),) * (self.spatial_dims - len(pads)) + tuple(pads)
        if not any(before or after for before, after in pads):
            return self
        if self.conv is None:
            moved = pads
        elif self.conv.pointwise and self._bias_is_zero():  # pad_p(W x) = W pad_{s p}(x)
            moved = tuple((b * s, a * s) for (b, a), s in zip(pads, self.conv.stride))
        else:
            raise Unmergeable(BORDER)
        summed = tuple((b0 + b1, a0 + a1) for (b0, a0), (b1, a1) in zip(self.pads, moved))
        return replace(self, pads=summed)

    def _then_pool(self, pool: Pool) -> Linear:
        channels = self.out_channels
        weight = wa.avg_pool_kernel(channels, channels, pool.kernel, torch.float64)
        if pool.divisor is not None:
            weight = weight * (math.prod(pool.kernel) / pool.divisor)
        n = self.spatial_dims
        return self._then_conv(Conv(weight, weight.new_zeros(channels), pool.stride, (1,) * n,
                                    channels))

    def _then_conv(self, conv: Conv) -> Linear:
        conv = replace(conv, weight=conv.weight.double(), bias=conv.bias.double())
        if conv.weight.ndim - 2 != self.spatial_dims:
            raise Unmergeable(SHAPES_UNKNOWN)
        if conv.weight.shape[1] * conv.groups != self.out_channels:
            raise Unmergeable(CHANNELS)
        merged = conv if self.conv is None else chain_convs(self.conv, conv)
        scale_seen = max(self.bias_scale, _max_abs(conv.bias), _max_abs(merged.bias))
        return replace(self, conv=merged, bias_scale=scale_seen,
                       costs=(*self.costs, (conv.weight.numel(), conv.stride)))

    def padding(self) -> tuple[int, ...]:
        """The symmetric padding of the composed conv; raises `Unmergeable(ASYMMETRIC)`."""
        if any(before != after for before, after in self.pads):
            raise Unmergeable(ASYMMETRIC)
        return tuple(before for before, _ in self.pads)


def _max_abs(tensor: Tensor) -> float:
    return tensor.abs().max().item() if tensor.numel() else 0.0


def chain_convs(first: Conv, second: Conv) -> Conv:
    """`second(first(x))` for unpadded convs as one unpadded conv (R6, R7, R8); raises
    `Unmergeable`."""
    groups = min(first.groups, second.groups)
    if max(first.groups, second.groups) % groups:
        raise Unmergeable(GROUPS_MISMATCH)
    w1 = wa.grouped_to_dense(first.weight, first.groups, groups)
    w2 = wa.grouped_to_dense(second.weight, second.groups, groups)
    stride = tuple(s1 * s2 for s1, s2 in zip(first.stride, second.stride))
    if first.pointwise:  # R6: the 1x1's stride spreads the KxK's taps
        weight, bias = wa.merge_1x1_then_kxk(w1, first.bias, w2, second.bias, groups)
        dilation = tuple(s1 * d2 for s1, d2 in zip(first.stride, second.dilation))
    elif second.pointwise:  # R7
        weight, bias = wa.merge_kxk_then_1x1(w1, first.bias, w2, second.bias, groups)
        dilation = first.dilation
    else:  # R8, axis by axis: tap q of W1 and tap r of W2 read input offset d1 q + s1 d2 r
        factors, dilation = [], []
        for k1, k2, s1, d1, d2 in zip(first.kernel, second.kernel, first.stride, first.dilation,
                                      second.dilation):
            if k1 == 1:
                factor, dil = 1, s1 * d2
            elif k2 == 1:
                factor, dil = 1, d1
            elif (s1 * d2) % d1:
                raise Unmergeable(DILATION)
            else:
                factor, dil = s1 * d2 // d1, d1
            factors.append(factor)
            dilation.append(dil)
        weight, bias = merge_sequential_grouped(w1, first.bias, factors, w2, second.bias, groups)
        dilation = tuple(dilation)
    return Conv(weight, bias, stride, dilation, groups)


def merge_sequential_grouped(w1: Tensor, b1: Tensor | None, factor: int | Sequence[int],
                             w2: Tensor, b2: Tensor | None, groups: int
                             ) -> tuple[Tensor, Tensor]:
    """R8 for two convs with the same `groups`: `weight_algebra.merge_sequential` (groups 1) on
    each group's slices, concatenated. `factor` spaces W2's taps on W1's grid (s1 for dilation 1,
    s1 d2 / d1 in general)."""
    if groups < 1 or w1.shape[0] % groups or w2.shape[0] % groups:
        raise ValueError(f"merge_sequential_grouped: {groups} groups do not divide the outputs")
    mid, out = w1.shape[0] // groups, w2.shape[0] // groups
    b1 = w1.new_zeros(w1.shape[0]) if b1 is None else b1
    b2 = w2.new_zeros(w2.shape[0]) if b2 is None else b2
    parts = [wa.merge_sequential(w1[g * mid:(g + 1) * mid], b1[g * mid:(g + 1) * mid], factor,
                                 w2[g * out:(g + 1) * out], b2[g * out:(g + 1) * out])
             for g in range(groups)]
    return torch.cat([w for w, _ in parts]), torch.cat([b for _, b in parts])


def conv_module(state: Linear, like: Tensor | None) -> nn.Module:
    """The composed chain as an eval-mode `nn.ConvNd` in `state.dtype` (on `like`'s device)."""
    conv = state.conv
    padding = state.padding()
    cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[state.spatial_dims]
    device = like.device if like is not None else None
    module = cls(state.in_channels, state.out_channels, conv.kernel, stride=conv.stride,
                 padding=padding, dilation=conv.dilation, groups=conv.groups, bias=True,
                 device=device, dtype=state.dtype)
    grad = like.requires_grad if like is not None else True
    module.weight = nn.Parameter(conv.weight.to(module.weight), requires_grad=grad)
    module.bias = nn.Parameter(conv.bias.to(module.weight), requires_grad=grad)
    return module.train(False)


def conv_label(conv: Conv, padding: Sequence[int]) -> str:
    """`3x3 s1 p1 d1 g1` style summary of a composed conv."""
    def axes(values: Sequence[int]) -> str:
        return "x".join(map(str, values)) if len(set(values)) > 1 else str(values[0])

    return (f"{'x'.join(map(str, conv.kernel))} s{axes(conv.stride)} p{axes(padding)} "
            f"d{axes(conv.dilation)} g{conv.groups}")


# ---- recognising linear ops in an FX graph ----

class Analysis:
    """Per-sweep memo of a graph: constant values and the linear op each node computes."""

    def __init__(self, gm: GraphModule):
        self.gm = gm
        self._values: dict[Node, Tensor | None] = {}
        self._ops: dict[Node, LinearOp | NotLinear] = {}

    def value(self, arg) -> Tensor | float | None:
        """The value of a constant argument (a number, or a node computed from constants only)."""
        if isinstance(arg, bool):
            return None
        if isinstance(arg, (int, float)):
            return arg
        if not isinstance(arg, Node):
            return None
        if arg not in self._values:
            self._values[arg] = self._evaluate(arg)
        return self._values[arg]

    def is_tensor(self, arg) -> bool:
        """A node computing a non-constant value."""
        return isinstance(arg, Node) and self.value(arg) is None

    def _evaluate(self, node: Node) -> Tensor | None:
        if node.op == "get_attr":
            value = operator.attrgetter(node.target)(self.gm)
            return value if isinstance(value, Tensor) else None
        pure = ((node.op == "call_function" and node.target in _PURE_FUNCTIONS)
                or (node.op == "call_method" and node.target in _PURE_METHODS))
        inputs = node.all_input_nodes
        if not pure or not inputs or any(self.value(n) is None for n in inputs):
            return None
        args, kwargs = map_arg((node.args, node.kwargs), self.value)
        with torch.no_grad():
            if node.op == "call_method":
                value = getattr(args[0], node.target)(*args[1:], **kwargs)
            else:
                value = node.target(*args, **kwargs)
        return value if isinstance(value, Tensor) else None

    def forget(self, node: Node) -> None:
        """Drop what is known about `node` (its module was replaced)."""
        self._ops.pop(node, None)

    def op(self, node: Node) -> LinearOp | NotLinear:
        if node not in self._ops:
            self._ops[node] = _linear_op(self, node)
        return self._ops[node]


def _tuple(value, n: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


def _bind(node: Node, params: tuple[tuple[str, object], ...]) -> dict[str, object] | None:
    """Call arguments of a function node by parameter name, with defaults; None if unknown."""
    names = [name for name, _ in params]
    if len(node.args) > len(names) or any(k not in names for k in node.kwargs):
        return None
    bound = dict(params)
    bound.update(zip(names, node.args))
    bound.update(node.kwargs)
    return bound


def _conv_pads(padding, kernel: Sequence[int], dilation: Sequence[int]) -> Pads | None:
    if padding == "valid":
        return ((0, 0),) * len(kernel)
    if padding == "same":  # total d (k - 1), the extra one on the far side
        totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
        return tuple((t // 2, t - t // 2) for t in totals)
    if isinstance(padding, str):
        return None
    return tuple((p, p) for p in _tuple(padding, len(kernel)))


def _conv_elements(weight: Tensor, bias: Tensor | None, stride, padding, dilation,
                   groups: int) -> tuple[Element, ...] | None:
    n = weight.ndim - 2
    dilation = _tuple(dilation, n)
    pads = _conv_pads(padding, weight.shape[2:], dilation)
    if pads is None:
        return None
    weight = weight.detach()  # float64 copies only when composed (`Linear.then`)
    bias = weight.new_zeros(weight.shape[0]) if bias is None else bias.detach()
    return Pad(pads), Conv(weight, bias, _tuple(stride, n), dilation, groups)


def _pool_elements(n: int, kernel, stride, padding, ceil_mode: bool, count_include_pad: bool,
                   divisor) -> tuple[Element, ...] | NotLinear:
    padding = _tuple(padding, n)
    if ceil_mode or (not count_include_pad and any(padding) and divisor is None):
        return NotLinear(AVG_POOL)
    kernel = _tuple(kernel, n)
    stride = kernel if stride is None or stride == [] else _tuple(stride, n)
    return Pad(tuple((p, p) for p in padding)), Pool(kernel, stride, divisor)


def _pad_elements(pad: Sequence[int], value, spatial_dims: int | None
                  ) -> tuple[Element, ...] | NotLinear:
    """`F.pad(x, pad, value=v) = pad_0(x - v) + v`; `pad` lists (before, after) from the last
    axis."""
    pad = list(pad)
    if len(pad) % 2 or any(p < 0 for p in pad):
        return NotLinear()
    if spatial_dims is None or len(pad) // 2 > spatial_dims:
        return NotLinear(SHAPES_UNKNOWN)
    pads = Pad(tuple(reversed([(pad[i], pad[i + 1]) for i in range(0, len(pad), 2)])))
    if not value:
        return (pads,)
    value = torch.tensor(float(value), dtype=torch.float64)
    return Affine(value.new_ones(()), -value), pads, Affine(value.new_ones(()), value)


def _spatial_dims(node: Node) -> int | None:
    shape = node_shape(node)
    return len(shape) - 2 if shape is not None and len(shape) >= 3 else None


def _channel_constant(value, node: Node) -> Tensor | None:
    """`value` as a per-channel vector (0-d if it is a scalar) for the output of `node`, or None if
    it does not broadcast like one."""
    if isinstance(value, (int, float)):  # a Python scalar is exact in float64
        return torch.tensor(value, dtype=torch.float64)
    value = value.detach()
    if value.dtype == torch.bool or value.is_complex():
        return None
    value = value.double()
    shape = node_shape(node)
    if value.ndim == 0:
        return value
    if shape is None or len(shape) < 3 or value.ndim > len(shape):
        return None
    full = (1,) * (len(shape) - value.ndim) + tuple(value.shape)
    if any(size != 1 for axis, size in enumerate(full) if axis != 1):
        return None
    if full[1] == 1:
        return value.reshape(())
    return value.reshape(-1) if full[1] == shape[1] else None


def _same_dtype(node: Node, source: Node) -> bool:
    """False if shape propagation saw the op change the dtype (type promotion)."""
    out, src = node_dtype(node), node_dtype(source)
    return out is None or src is None or (out == src and out.is_floating_point)


def _arithmetic(analysis: Analysis, node: Node) -> LinearOp | NotLinear:
    """`x * c`, `x / c`, `x + c`, `c - x`, `-x`, ... with a constant `c` (scalar or per channel)."""
    target = node.target
    if target in _NEG and len(node.args) == 1 and not node.kwargs:
        x = node.args[0]
        if analysis.is_tensor(x):
            one = torch.ones((), dtype=torch.float64)
            return LinearOp(x, (Affine(-one, 0 * one),))
        return NotLinear()
    if len(node.args) != 2:
        return NotLinear()
    a, b = node.args
    if analysis.is_tensor(a) and analysis.value(b) is not None:
        x, constant, x_first = a, analysis.value(b), True
    elif analysis.is_tensor(b) and analysis.value(a) is not None:
        x, constant, x_first = b, analysis.value(a), False
    else:
        return NotLinear()
    alpha = node.kwargs.get("alpha", 1)
    extra = set(node.kwargs) - ({"alpha"} if target in ADD_TARGETS | SUB_TARGETS else set())
    if extra or isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        return NotLinear()
    if not _same_dtype(node, x):
        return NotLinear()
    constant = _channel_constant(constant, node)
    if constant is None:
        return NotLinear()
    one, zero = torch.ones((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    if target in _MUL:
        affine = Affine(constant, zero)
    elif target in _DIV and x_first:
        affine = Affine(1 / constant, zero)
    elif target in ADD_TARGETS:  # x + alpha c  or  c + alpha x
        affine = Affine(one, alpha * constant) if x_first else Affine(alpha * one, constant)
    elif target in SUB_TARGETS:  # x - alpha c  or  c - alpha x
        affine = Affine(one, -alpha * constant) if x_first else Affine(-alpha * one, constant)
    else:
        return NotLinear()
    return LinearOp(x, (affine,))


def _module_op(analysis: Analysis, node: Node) -> LinearOp | NotLinear:
    gm = analysis.gm
    module = gm.get_submodule(node.target)
    kind = type(module)
    if not node.args or not analysis.is_tensor(node.args[0]) or len(node.args) > 1 or node.kwargs:
        return NotLinear()
    x = node.args[0]
    if kind in _PASS_THROUGH_MODULES:
        return LinearOp(x, ()) if kind is nn.Identity or not module.training else NotLinear()
    if kind in _CONVS:
        if module.padding_mode != "zeros":
            return NotLinear(PADDING_MODE)
        if module_uses(gm, module) != 1:
            return NotLinear(SHARED_MODULE)
        elements = _conv_elements(module.weight, module.bias, module.stride, module.padding,
                                  module.dilation, module.groups)
        return NotLinear() if elements is None else LinearOp(x, elements)
    if kind in _BNS:
        if module.training or module.running_mean is None:
            return NotLinear(TRAINING)
        shape = node_shape(node)
        if shape is None and kind not in _BN_DIMS:  # BatchNorm1d also takes (N, C) tensors
            return NotLinear(SHAPES_UNKNOWN)
        if shape is not None and len(shape) < 3:
            return NotLinear()

        def double(t):
            return None if t is None else t.detach().double()

        scale, shift = wa.bn_affine(double(module.running_mean), double(module.running_var),
                                    double(module.weight), double(module.bias), module.eps)
        return LinearOp(x, (Affine(scale, shift),))
    if kind in _POOLS:
        elements = _pool_elements(_POOLS[kind], module.kernel_size, module.stride, module.padding,
                                  module.ceil_mode, module.count_include_pad,
                                  getattr(module, "divisor_override", None))
        return elements if isinstance(elements, NotLinear) else LinearOp(x, elements)
    if kind in _PAD_MODULES:
        pad = _tuple(module.padding, 2 * _PAD_MODULES[kind])
        elements = _pad_elements(pad, getattr(module, "value", 0), _spatial_dims(node))
        return elements if isinstance(elements, NotLinear) else LinearOp(x, elements)
    if isinstance(module, (*_CONVS, *_BNS, *_POOLS)):
        return NotLinear(SUBCLASS)
    return NotLinear()


def _function_op(analysis: Analysis, node: Node) -> LinearOp | NotLinear:
    target = node.target
    if target in _CONV_FUNCTIONS:
        args = _bind(node, _CONV_PARAMS)
        if args is None or not analysis.is_tensor(args["input"]):
            return NotLinear()
        weight, bias = analysis.value(args["weight"]), analysis.value(args["bias"])
        if not isinstance(weight, Tensor) or (args["bias"] is not None and bias is None):
            return NotLinear()
        elements = _conv_elements(weight, bias, args["stride"], args["padding"],
                                  args["dilation"], args["groups"])
        return NotLinear() if elements is None else LinearOp(args["input"], elements)
    if target in _POOL_FUNCTIONS:
        args = _bind(node, _POOL_PARAMS)
        if args is None or not analysis.is_tensor(args["input"]):
            return NotLinear()
        elements = _pool_elements(_POOL_FUNCTIONS[target], args["kernel_size"], args["stride"],
                                  args["padding"], args["ceil_mode"], args["count_include_pad"],
                                  args["divisor_override"])
        return elements if isinstance(elements, NotLinear) else LinearOp(args["input"], elements)
    if target is F.pad:
        args = _bind(node, _PAD_PARAMS)
        if args is None or args["mode"] != "constant" or not analysis.is_tensor(args["input"]):
            return NotLinear()
        value = args["value"]
        if value is not None and not isinstance(value, (int, float)):
            return NotLinear()
        elements = _pad_elements(args["pad"], value, _spatial_dims(node))
        return elements if isinstance(elements, NotLinear) else LinearOp(args["input"], elements)
    return _arithmetic(analysis, node)


def _linear_op(analysis: Analysis, node: Node) -> LinearOp | NotLinear:
    if node.op == "call_module":
        return _module_op(analysis, node)
    if analysis.value(node) is not None:  # a constant is no op on a tensor
        return NotLinear()
    if node.op == "call_function":
        return _function_op(analysis, node)
    if node.op == "call_method":
        if node.target in _PASS_THROUGH_METHODS and len(node.args) == 1 and not node.kwargs:
            return LinearOp(node.args[0], ()) if analysis.is_tensor(node.args[0]) else NotLinear()
        return _arithmetic(analysis, node)
    return NotLinear()


def model_dtype(gm: GraphModule, node: Node | None = None) -> torch.dtype:
    """The dtype of `node`'s tensor if shape propagation recorded it, else of the model's
    first floating parameter or buffer."""
    dtype = node_dtype(node) if node is not None else None
    if dtype is not None and dtype.is_floating_point:
        return dtype
    tensors = [*gm.parameters(), *gm.buffers()]
    return next((t.dtype for t in tensors if t.is_floating_point()), torch.float32)


def propagate_shapes(gm: GraphModule, inputs: tuple[Tensor, ...] | None) -> None:
    """Shapes and dtypes of every node (after `recompile`, so a rewritten graph runs its code)."""
    gm.recompile()
    _propagate_shapes(gm, inputs)


def erase_chain(gm: GraphModule, nodes: Sequence[Node], analysis: Analysis) -> None:
    """Erase `nodes` (consumers before producers) once unused, then the constant subexpressions
    only they read, then the modules nothing uses any more."""
    pending = list(nodes)
    erased: list[Node] = []
    while pending:
        node = pending.pop(0)
        if node.users or getattr(node, "_erased", False):
            continue
        inputs = node.all_input_nodes
        gm.graph.erase_node(node)
        erased.append(node)
        pending += [n for n in inputs if analysis.value(n) is not None]
    for node in erased:
        if node.op == "call_module":
            _delete_module_if_unused(gm, node.target)
        elif node.op == "get_attr" and "." in node.target:
            _delete_module_if_unused(gm, node.target.rpartition(".")[0])


def _delete_module_if_unused(gm: GraphModule, target: str) -> None:
    try:
        gm.get_submodule(target)
    except AttributeError:  # already deleted
        return
    delete_if_unused(gm, target)


# ---- the pass ----

def _is_conv_module(gm: GraphModule, node: Node) -> bool:
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target),
                                                   tuple(_CONVS))


@dataclass
class _Sweep:
    gm: GraphModule
    analysis: Analysis
    rewrites: list[str]
    refusals: list[Refusal]

    def refuse(self, nodes: Sequence[Node], reason: str) -> None:
        self.refusals.append(Refusal("conv_conv", tuple(map(describe, nodes)), reason))

    def try_merge(self, second: Node) -> bool:
        """Merge the conv feeding `second` (through affine/pad ops) into it; True if merged."""
        gm, analysis = self.gm, self.analysis
        if not _is_conv_module(gm, second) or not second.args:
            return False
        between: list[Node] = []  # consumer first
        node = second.args[0]
        while isinstance(node, Node):
            op = analysis.op(node)
            if _is_conv_module(gm, node):
                first = node
                break
            if isinstance(op, NotLinear) or any(isinstance(e, (Conv, Pool)) for e in op.elements):
                self._explain_stop(node, op, second)
                return False
            between.append(node)
            node = op.input
        else:
            return False
        chain = [first, *reversed(between), second]
        for op_node in (first, second):
            op = analysis.op(op_node)
            if isinstance(op, NotLinear):
                if op.reason:
                    self.refuse(chain, op.reason)
                return False
        if any(set(n.users) != {user} for n, user in zip(chain, chain[1:])):
            self.refuse(chain, OTHER_USERS)
            return False
        first_conv = next(e for e in analysis.op(first).elements if isinstance(e, Conv))
        channels = first_conv.weight.shape[1] * first_conv.groups
        start = Linear.identity(channels, first_conv.weight.ndim - 2,
                                gm.get_submodule(first.target).weight.dtype)
        try:
            state = start.then_all([e for n in chain for e in analysis.op(n).elements])
            padding = state.padding()
        except Unmergeable as refusal:
            self.refuse(chain, refusal.reason)
            return False
        merged, unmerged = state.conv.weight.numel(), state.macs()
        numbers = f"merged {merged} vs unmerged {unmerged} MACs per output pixel"
        if merged > unmerged:
            self.refuse(chain, f"{COST}: {numbers}")
            return False
        rule = _rule(first_conv, next(e for e in analysis.op(second).elements
                                      if isinstance(e, Conv)))
        like = gm.get_submodule(second.target).weight
        gm.add_submodule(second.target, conv_module(state, like))
        second.replace_input_with(second.args[0], first.args[0])
        analysis.forget(second)
        erase_chain(gm, [*between, first], analysis)
        self.rewrites.append(f"merged {' -> '.join(map(describe, chain))} into {second.target} "
                             f"({rule}; {conv_label(state.conv, padding)}; {numbers})")
        return True

    def _explain_stop(self, node: Node, op: LinearOp | NotLinear, second: Node) -> None:
        """Say why `node`, between a conv and `second`, blocks the merge (--explain)."""
        inputs = [n for n in node.all_input_nodes if self.analysis.is_tensor(n)]
        if len(inputs) != 1 or not _is_conv_module(self.gm, inputs[0]):
            return
        if isinstance(op, NotLinear) and op.reason:
            self.refuse([inputs[0], node, second], op.reason)
        elif isinstance(op, NotLinear):
            self.refuse([inputs[0], node, second], f"{NONLINEAR}: {op_kind(self.gm, node)}")


def _rule(first: Conv, second: Conv) -> str:
    if second.pointwise:
        return "R7 KxK -> 1x1"
    if first.pointwise:
        return "R6 1x1 -> KxK"
    return "R8 KxK -> KxK"


def merge_convs(gm: GraphModule, inputs: tuple[Tensor, ...] | None) -> PassResult:
    """Merge conv chains until none merges; report every merge and the final refusals."""
    rewrites: list[str] = []
    refusals: list[Refusal] = []
    for _ in range(MAX_SWEEPS):
        if sum(_is_conv_module(gm, n) for n in gm.graph.nodes) < 2:
            break
        propagate_shapes(gm, inputs)  # per-channel constants and pads need ranks
        sweep = _Sweep(gm, Analysis(gm), rewrites, [])
        changed = False
        for node in list(gm.graph.nodes):
            if not getattr(node, "_erased", False):
                changed |= sweep.try_merge(node)
        refusals = sweep.refusals
        if not changed:
            break
    else:
        raise RuntimeError("merge_sequential_convs did not reach a fixpoint")
    return PassResult(gm, bool(rewrites), PassReport(rewrites=rewrites, refusals=refusals))


@register_pass("merge_sequential_convs",
               "merge consecutive linear convs into one (R6 1x1->KxK, R7 KxK->1x1, R8) when exact "
               "and no costlier", True)
def merge_sequential_convs(gm: GraphModule, ctx: PassContext) -> PassResult:
    return merge_convs(gm, ctx.inputs(gm))

