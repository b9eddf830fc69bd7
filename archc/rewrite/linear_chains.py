"""Linear chains: reading FX nodes as linear steps, and composing a chain into one conv.

A chain of linear ops, nothing non-linear between and every intermediate tensor read once, is one
conv. Each op is read (`LinearReader.op`) as a sequence of steps of its tensor input: a per-channel
affine map (`ChannelAffine`: eval BN, constant scales and biases, negation), a zero pad
(`ZeroPad`), an average pool (`AvgPool`) or an unpadded conv (`UnpaddedConv`); a conv with
padding is a pad then an unpadded conv. `ComposedConv` composes steps one by one into a single
`x -> conv(pad(x))`, in float64:

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
"Zero" means zero up to rounding in the model's own dtype (`rounding`): the graph computes v from
the BN itself, in float32 for a float32 model, even when the passes work on a float64 copy. A
chain that relied on such a rounding-level zero says so (`rounded`), and so does its rewrite: it
is exact up to the rounding of the model's constants, not in float64.
The identities and their conditions are in `docs/rewrites.md`. Sequential merging composes one
chain; branch merging composes one chain per branch and sums or concatenates them.

A refusal reason starts with one of the constants below (or of `archc.rewrite.legality`); details
may follow after ": ".
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

from archc.ir.graph import PURE_FUNCTIONS, PURE_METHODS, attribute, bind, model_dtype, module_uses
from archc.ir.ops import (
    AVG_POOL_FUNCTIONS,
    AVG_POOL_MODULES,
    BN_MODULES,
    CONV_FUNCTIONS,
    CONV_MODULES,
    SPATIAL_DIMS,
    Pads,
    conv_pads,
)
from archc.ir.shapes import node_dtype, node_shape
from archc.rewrite import weight_algebra as wa
from archc.rewrite.legality import (
    NO_RUNNING_STATS,
    SHAPES_UNKNOWN,
    SHARED_MODULE,
    SUBCLASS,
    TRAINING,
)

BORDER = ("padding in the second conv (border): it zero-pads a tensor that is not zero at the "
          "border after merging (the first conv has a bias or a spatial kernel)")
GROUPS_MISMATCH = "groups mismatch: neither conv's groups divide the other's"
DILATION = ("dilation: the first conv's dilation must divide stride1 * dilation2 on every axis "
            "with a spatial kernel in both convs")
PADDING_MODE = "the conv pads with reflect/replicate/circular values: only zero padding merges"
AVG_POOL = ("avg-pool with count_include_pad=False (and padding) or ceil_mode=True is not a conv "
            "at the border")
ASYMMETRIC = "the merged conv would need asymmetric padding"
CHANNELS = "channel counts do not chain (the graph cannot run)"

# "zero up to rounding": |b| <= ZERO_BIAS_ULPS * eps(dtype) * (largest bias magnitude seen)
ZERO_BIAS_ULPS = 1e3

_PAD_MODULES = {nn.ZeroPad1d: 1, nn.ZeroPad2d: 2, nn.ZeroPad3d: 3, nn.ConstantPad1d: 1,
                nn.ConstantPad2d: 2, nn.ConstantPad3d: 3}
_PASS_THROUGH_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
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


class Unmergeable(Exception):
    """A chain or a set of branches that cannot become one conv; `reason` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# ---- the steps of a linear chain ----

@dataclass(frozen=True)
class ChannelAffine:
    """`scale * x + shift` per channel; 0-d tensors broadcast over the channels."""

    scale: Tensor
    shift: Tensor


@dataclass(frozen=True)
class ZeroPad:
    """Zero padding of the last `len(pads)` spatial axes."""

    pads: Pads


@dataclass(frozen=True)
class AvgPool:
    """Average pooling, unpadded (its padding is a `ZeroPad` before it)."""

    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    divisor: int | None  # divisor_override


@dataclass(frozen=True)
class UnpaddedConv:
    """An unpadded conv (its padding is a `ZeroPad` before it); float64 once composed."""

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


Step = ChannelAffine | ZeroPad | AvgPool | UnpaddedConv


@dataclass(frozen=True)
class LinearNode:
    """A node that computes `steps` (applied in order) of its tensor input `input`."""

    input: Node
    steps: tuple[Step, ...]


@dataclass(frozen=True)
class NotLinear:
    """A node that is no mergeable linear op; `reason` when it looks like one but cannot merge."""

    reason: str | None = None


# ---- a composed chain: x -> conv(pad(x)) ----

@dataclass(frozen=True)
class ComposedConv:
    """`x -> conv(pad(x))`: zero padding, then an unpadded conv (`conv` None: the identity)."""

    in_channels: int
    pads: Pads
    conv: UnpaddedConv | None
    dtype: torch.dtype  # the dtype of the conv module it becomes
    rounding: torch.dtype  # the model's own dtype: decides what "zero up to rounding" means
    bias_scale: float = 0.0  # the largest bias magnitude seen while composing
    costs: tuple[tuple[int, tuple[int, ...]], ...] = ()  # (MACs per own output pixel, stride)
    rounded: bool = False  # a bias that is zero only up to `rounding` was taken as zero

    @classmethod
    def identity(cls, channels: int, spatial_dims: int, dtype: torch.dtype,
                 rounding: torch.dtype | None = None) -> ComposedConv:
        return cls(channels, ((0, 0),) * spatial_dims, None, dtype, rounding or dtype)

    @property
    def spatial_dims(self) -> int:
        return len(self.pads)

    @property
    def out_channels(self) -> int:
        return self.in_channels if self.conv is None else self.conv.weight.shape[0]

    def macs(self) -> int:
        """Multiply-adds of the unmerged ops per output pixel of the chain."""
        return _unmerged_macs(self.costs)

    def then_all(self, steps: Sequence[Step]) -> ComposedConv:
        state = self
        for step in steps:
            state = state.then(step)
        return state

    def then(self, step: Step) -> ComposedConv:
        """This chain followed by `step`; raises `Unmergeable`."""
        if isinstance(step, ChannelAffine):
            return self._then_affine(step)
        if isinstance(step, ZeroPad):
            return self._then_pad(step.pads)
        if isinstance(step, AvgPool):
            return self._then_pool(step)
        return self._then_conv(step)

    def _channel_vector(self, value: Tensor) -> Tensor:
        channels = self.out_channels
        if value.ndim == 0:
            return value.expand(channels)
        if value.shape != (channels,):
            raise Unmergeable(CHANNELS)
        return value

    def _current_conv(self) -> UnpaddedConv:
        """The conv of the chain, the identity as a depthwise 1x1 conv (R3) if there is none."""
        if self.conv is not None:
            return self.conv
        n, channels = self.spatial_dims, self.in_channels
        weight = wa.identity_kernel(channels, channels, (1,) * n, torch.float64)
        return UnpaddedConv(weight, weight.new_zeros(channels), (1,) * n, (1,) * n, channels)

    def _then_affine(self, affine: ChannelAffine) -> ComposedConv:
        conv = self._current_conv()
        scale, shift = self._channel_vector(affine.scale), self._channel_vector(affine.shift)
        weight, bias = wa.fold_bn_after(conv.weight, conv.bias, scale, shift)
        scale_seen = max(self.bias_scale, _max_abs(conv.bias), _max_abs(shift), _max_abs(bias))
        return replace(self, conv=replace(conv, weight=weight, bias=bias), bias_scale=scale_seen,
                       costs=(*self.costs, (self.out_channels, (1,) * self.spatial_dims)))

    def _bias_is_zero(self) -> bool:
        tolerance = ZERO_BIAS_ULPS * torch.finfo(self.rounding).eps * self.bias_scale
        return _max_abs(self.conv.bias) <= tolerance

    def _then_pad(self, pads: Pads) -> ComposedConv:
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
        rounded = self.rounded or (self.conv is not None and _max_abs(self.conv.bias) > 0)
        return replace(self, pads=summed, rounded=rounded)

    def _then_pool(self, pool: AvgPool) -> ComposedConv:
        channels = self.out_channels
        weight = wa.avg_pool_kernel(channels, channels, pool.kernel, torch.float64)
        if pool.divisor is not None:
            weight = weight * (math.prod(pool.kernel) / pool.divisor)
        n = self.spatial_dims
        return self._then_conv(UnpaddedConv(weight, weight.new_zeros(channels), pool.stride,
                                            (1,) * n, channels))

    def _then_conv(self, conv: UnpaddedConv) -> ComposedConv:
        conv = replace(conv, weight=conv.weight.double(), bias=conv.bias.double())
        _check_chains(conv, self.spatial_dims, self.out_channels)
        merged = conv if self.conv is None else chain_convs(self.conv, conv)
        scale_seen = max(self.bias_scale, _max_abs(conv.bias), _max_abs(merged.bias))
        return replace(self, conv=merged, bias_scale=scale_seen,
                       costs=(*self.costs, (conv.weight.numel(), conv.stride)))

    def padding(self) -> tuple[int, ...]:
        """The symmetric padding of the composed conv; raises `Unmergeable(ASYMMETRIC)`."""
        if any(before != after for before, after in self.pads):
            raise Unmergeable(ASYMMETRIC)
        return tuple(before for before, _ in self.pads)


def _unmerged_macs(costs: Sequence[tuple[int, tuple[int, ...]]]) -> int:
    """Multiply-adds per output pixel of the last op, of ops costing `macs` per own output
    pixel with strides `stride`: an op before a stride-s op runs on s times the pixels."""
    total, pixels = 0, 1
    for macs, stride in reversed(costs):
        total += macs * pixels
        pixels *= math.prod(stride)
    return total


def _check_chains(conv: UnpaddedConv, spatial_dims: int, channels: int) -> None:
    """`conv` can read the `channels`-channel output of a chain over `spatial_dims` axes."""
    if conv.weight.ndim - 2 != spatial_dims:
        raise Unmergeable(SHAPES_UNKNOWN)
    if conv.weight.shape[1] * conv.groups != channels:
        raise Unmergeable(CHANNELS)


def chain_costs(in_channels: int, spatial_dims: int, steps: Sequence[Step]) -> tuple[int, int]:
    """(merged, unmerged): the multiply-adds per output pixel of the one conv that `steps` compose
    into and of the steps themselves, from the shapes alone. These are
    `ComposedConv.then_all(steps)`'s `conv.weight.numel()` and `macs()`, known before any weight
    is composed (a cost rule can refuse a 4096-channel chain without an hour of einsum). Raises
    `Unmergeable` where the shapes cannot chain."""
    n = spatial_dims
    ones = (1,) * n
    # the chain so far as one conv; the identity is a depthwise 1x1 (R3)
    out, groups, kernel, stride, dilation = in_channels, in_channels, ones, ones, ones
    costs: list[tuple[int, tuple[int, ...]]] = []
    for step in steps:
        if isinstance(step, ChannelAffine):
            for value in (step.scale, step.shift):
                if value.ndim and value.shape != (out,):
                    raise Unmergeable(CHANNELS)
            costs.append((out, ones))
            continue
        if isinstance(step, ZeroPad):
            if len(step.pads) > n:
                raise Unmergeable(SHAPES_UNKNOWN)
            continue
        if isinstance(step, AvgPool):
            step_out, step_groups, step_kernel, step_dilation = out, out, step.kernel, ones
            step_macs = out * math.prod(step.kernel)
        else:
            _check_chains(step, n, out)
            step_out, step_groups, step_kernel = step.weight.shape[0], step.groups, step.kernel
            step_dilation, step_macs = step.dilation, step.weight.numel()
        costs.append((step_macs, step.stride))
        merged_groups = min(groups, step_groups)
        if max(groups, step_groups) % merged_groups:
            raise Unmergeable(GROUPS_MISMATCH)
        axes = [merged_axis(k1, k2, s1, d1, d2) for k1, k2, s1, d1, d2
                in zip(kernel, step_kernel, stride, dilation, step_dilation)]
        kernel = tuple(k1 + factor * (k2 - 1)
                       for k1, k2, (factor, _) in zip(kernel, step_kernel, axes))
        dilation = tuple(dil for _, dil in axes)
        stride = tuple(s1 * s2 for s1, s2 in zip(stride, step.stride))
        out, groups = step_out, merged_groups
    return out * (in_channels // groups) * math.prod(kernel), _unmerged_macs(costs)


def merged_axis(k1: int, k2: int, s1: int, d1: int, d2: int) -> tuple[int, int]:
    """(f, dilation) of the merge of two convs on one axis (R8): tap q of the first kernel and
    tap r of the second read input offset d1 q + s1 d2 r, which is d1 (q + f r) with
    f = s1 d2 / d1 when both kernels are spatial; raises `Unmergeable(DILATION)`."""
    if k1 == 1:
        return 1, s1 * d2
    if k2 == 1:
        return 1, d1
    if (s1 * d2) % d1:
        raise Unmergeable(DILATION)
    return s1 * d2 // d1, d1


def _max_abs(tensor: Tensor) -> float:
    return tensor.abs().max().item() if tensor.numel() else 0.0


def chain_convs(first: UnpaddedConv, second: UnpaddedConv) -> UnpaddedConv:
    """`second(first(x))` for unpadded convs as one unpadded conv (R6, R7, R8); raises
    `Unmergeable`."""
    groups = min(first.groups, second.groups)
    if max(first.groups, second.groups) % groups:
        raise Unmergeable(GROUPS_MISMATCH)
    w1 = wa.grouped_to_dense(first.weight, first.groups, groups)
    w2 = wa.grouped_to_dense(second.weight, second.groups, groups)
    stride = tuple(s1 * s2 for s1, s2 in zip(first.stride, second.stride))
    axes = [merged_axis(*geometry) for geometry in zip(
        first.kernel, second.kernel, first.stride, first.dilation, second.dilation)]
    dilation = tuple(dil for _, dil in axes)
    if first.pointwise:  # R6: the 1x1's stride spreads the KxK's taps
        weight, bias = wa.merge_1x1_then_kxk(w1, first.bias, w2, second.bias, groups)
    elif second.pointwise:  # R7
        weight, bias = wa.merge_kxk_then_1x1(w1, first.bias, w2, second.bias, groups)
    else:  # R8
        factors = [factor for factor, _ in axes]
        weight, bias = wa.merge_sequential_grouped(w1, first.bias, factors, w2, second.bias, groups)
    return UnpaddedConv(weight, bias, stride, dilation, groups)


def conv_module(state: ComposedConv, like: Tensor | None) -> nn.Module:
    """The composed chain as an eval-mode `nn.ConvNd` in `state.dtype` (on `like`'s device), or
    an `nn.Linear` for a chain on (N, C) features (no spatial dims)."""
    conv = state.conv
    padding = state.padding()
    device = like.device if like is not None else None
    if state.spatial_dims == 0:
        module = nn.Linear(state.in_channels, state.out_channels, device=device,
                           dtype=state.dtype)
    else:
        cls = CONV_MODULES[state.spatial_dims - 1]
        module = cls(state.in_channels, state.out_channels, conv.kernel, stride=conv.stride,
                     padding=padding, dilation=conv.dilation, groups=conv.groups, bias=True,
                     device=device, dtype=state.dtype)
    grad = like.requires_grad if like is not None else True
    module.weight = nn.Parameter(conv.weight.to(module.weight), requires_grad=grad)
    module.bias = nn.Parameter(conv.bias.to(module.weight), requires_grad=grad)
    return module.train(False)


def conv_label(conv: UnpaddedConv, padding: Sequence[int]) -> str:
    """`3x3 s1 p1 d1 g1` style summary of a composed conv (`linear` on features)."""
    if not conv.kernel:
        return "linear"
    def axes(values: Sequence[int]) -> str:
        return "x".join(map(str, values)) if len(set(values)) > 1 else str(values[0])

    return (f"{'x'.join(map(str, conv.kernel))} s{axes(conv.stride)} p{axes(padding)} "
            f"d{axes(conv.dilation)} g{conv.groups}")


# ---- recognising linear ops in an FX graph ----

class LinearReader:
    """Reads the nodes of a graph as linear steps, memoizing constant values and ops. An entry
    stays valid while the node's target, arguments and module are the same objects, so a rewrite
    that rewires or replaces a node is seen at once (a sweep shares one reader among its rules)."""

    def __init__(self, gm: GraphModule):
        self.gm = gm
        self._values: dict[Node, Tensor | None] = {}
        self._ops: dict[Node, tuple[tuple, LinearNode | NotLinear]] = {}

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
            value = attribute(self.gm, node.target)
            return value if isinstance(value, Tensor) else None
        pure = ((node.op == "call_function" and node.target in PURE_FUNCTIONS)
                or (node.op == "call_method" and node.target in PURE_METHODS))
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

    def op(self, node: Node) -> LinearNode | NotLinear:
        """What `node` computes of its tensor input, or why it is no mergeable linear op."""
        key = self._key(node)
        known = self._ops.get(node)
        if known is None or known[0] != key:
            known = (key, _linear_op(self, node))
            self._ops[node] = known
        return known[1]

    def _key(self, node: Node) -> tuple:
        module = self.gm.get_submodule(node.target) if node.op == "call_module" else None
        return (node.target, node.args, tuple(node.kwargs.items()), id(module))


def _tuple(value, n: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


def _conv_steps(weight: Tensor, bias: Tensor | None, stride, padding, dilation,
                groups: int) -> tuple[Step, ...] | None:
    n = weight.ndim - 2
    dilation = _tuple(dilation, n)
    pads = conv_pads(padding, weight.shape[2:], dilation)
    if pads is None:
        return None
    weight = weight.detach()  # float64 copies only when composed (`ComposedConv.then`)
    bias = weight.new_zeros(weight.shape[0]) if bias is None else bias.detach()
    return ZeroPad(pads), UnpaddedConv(weight, bias, _tuple(stride, n), dilation, groups)


def _pool_steps(n: int, kernel, stride, padding, ceil_mode: bool, count_include_pad: bool,
                   divisor) -> tuple[Step, ...] | NotLinear:
    padding = _tuple(padding, n)
    if ceil_mode or (not count_include_pad and any(padding) and divisor is None):
        return NotLinear(AVG_POOL)
    kernel = _tuple(kernel, n)
    stride = kernel if stride is None or stride == [] else _tuple(stride, n)
    return ZeroPad(tuple((p, p) for p in padding)), AvgPool(kernel, stride, divisor)


def _pad_steps(pad: Sequence[int], value, spatial_dims: int | None
                  ) -> tuple[Step, ...] | NotLinear:
    """`F.pad(x, pad, value=v) = pad_0(x - v) + v`; `pad` lists (before, after) from the last
    axis."""
    pad = list(pad)
    if len(pad) % 2 or any(p < 0 for p in pad):
        return NotLinear()
    if spatial_dims is None or len(pad) // 2 > spatial_dims:
        return NotLinear(SHAPES_UNKNOWN)
    pads = ZeroPad(tuple(reversed([(pad[i], pad[i + 1]) for i in range(0, len(pad), 2)])))
    if not value:
        return (pads,)
    value = torch.tensor(float(value), dtype=torch.float64)
    return ChannelAffine(value.new_ones(()), -value), pads, ChannelAffine(value.new_ones(()), value)


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
    if shape is None or len(shape) < 2 or value.ndim > len(shape):
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


def _arithmetic(reader: LinearReader, node: Node) -> LinearNode | NotLinear:
    """`x * c`, `x / c`, `x + c`, `c - x`, `-x`, ... with a constant `c` (scalar or per channel)."""
    target = node.target
    if target in _NEG and len(node.args) == 1 and not node.kwargs:
        x = node.args[0]
        if reader.is_tensor(x):
            one = torch.ones((), dtype=torch.float64)
            return LinearNode(x, (ChannelAffine(-one, 0 * one),))
        return NotLinear()
    if len(node.args) != 2:
        return NotLinear()
    a, b = node.args
    if reader.is_tensor(a) and reader.value(b) is not None:
        x, constant, x_first = a, reader.value(b), True
    elif reader.is_tensor(b) and reader.value(a) is not None:
        x, constant, x_first = b, reader.value(a), False
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
        affine = ChannelAffine(constant, zero)
    elif target in _DIV and x_first:
        affine = ChannelAffine(1 / constant, zero)
    elif target in ADD_TARGETS:  # x + alpha c  or  c + alpha x
        affine = (ChannelAffine(one, alpha * constant) if x_first
                  else ChannelAffine(alpha * one, constant))
    elif target in SUB_TARGETS:  # x - alpha c  or  c - alpha x
        affine = (ChannelAffine(one, -alpha * constant) if x_first
                  else ChannelAffine(-alpha * one, constant))
    else:
        return NotLinear()
    return LinearNode(x, (affine,))


def _module_op(reader: LinearReader, node: Node) -> LinearNode | NotLinear:
    gm = reader.gm
    module = gm.get_submodule(node.target)
    kind = type(module)
    if not node.args or not reader.is_tensor(node.args[0]) or len(node.args) > 1 or node.kwargs:
        return NotLinear()
    x = node.args[0]
    if kind in _PASS_THROUGH_MODULES:
        return LinearNode(x, ()) if kind is nn.Identity or not module.training else NotLinear()
    if kind in CONV_MODULES:
        if module.padding_mode != "zeros":
            return NotLinear(PADDING_MODE)
        if module_uses(gm, node.target) != 1:
            return NotLinear(SHARED_MODULE)
        steps = _conv_steps(module.weight, module.bias, module.stride, module.padding,
                                  module.dilation, module.groups)
        return NotLinear() if steps is None else LinearNode(x, steps)
    if kind is nn.Linear:  # on (N, C) features: a conv without spatial dims
        shape = node_shape(x)
        if shape is None:
            return NotLinear(SHAPES_UNKNOWN)
        if len(shape) != 2:
            return NotLinear()  # it mixes the last dim, not the channels
        if module_uses(gm, node.target) != 1:
            return NotLinear(SHARED_MODULE)
        bias = module.bias if module.bias is not None else module.weight.new_zeros(
            module.out_features)
        return LinearNode(x, (UnpaddedConv(module.weight.detach(), bias.detach(), (), (), 1),))
    if kind in BN_MODULES:
        if module.training or module.running_mean is None:
            return NotLinear(TRAINING if module.training else NO_RUNNING_STATS)
        shape = node_shape(node)
        if shape is None and kind is nn.BatchNorm1d:  # it also takes (N, C) tensors
            return NotLinear(SHAPES_UNKNOWN)
        if shape is not None and len(shape) < 2:
            return NotLinear()

        def double(t):
            return None if t is None else t.detach().double()

        scale, shift = wa.bn_affine(double(module.running_mean), double(module.running_var),
                                    double(module.weight), double(module.bias), module.eps)
        return LinearNode(x, (ChannelAffine(scale, shift),))
    if kind in AVG_POOL_MODULES:
        steps = _pool_steps(SPATIAL_DIMS[kind], module.kernel_size, module.stride, module.padding,
                                  module.ceil_mode, module.count_include_pad,
                                  getattr(module, "divisor_override", None))
        return steps if isinstance(steps, NotLinear) else LinearNode(x, steps)
    if kind in _PAD_MODULES:
        pad = _tuple(module.padding, 2 * _PAD_MODULES[kind])
        steps = _pad_steps(pad, getattr(module, "value", 0), _spatial_dims(node))
        return steps if isinstance(steps, NotLinear) else LinearNode(x, steps)
    if isinstance(module, (*CONV_MODULES, *BN_MODULES, *AVG_POOL_MODULES, nn.Linear)):
        return NotLinear(SUBCLASS)
    return NotLinear()


def _function_op(reader: LinearReader, node: Node) -> LinearNode | NotLinear:
    target = node.target
    if target in CONV_FUNCTIONS:
        args = bind(node, _CONV_PARAMS)
        if args is None or not reader.is_tensor(args["input"]):
            return NotLinear()
        weight, bias = reader.value(args["weight"]), reader.value(args["bias"])
        if not isinstance(weight, Tensor) or (args["bias"] is not None and bias is None):
            return NotLinear()
        steps = _conv_steps(weight, bias, args["stride"], args["padding"],
                                  args["dilation"], args["groups"])
        return NotLinear() if steps is None else LinearNode(args["input"], steps)
    if target in AVG_POOL_FUNCTIONS:
        args = bind(node, _POOL_PARAMS)
        if args is None or not reader.is_tensor(args["input"]):
            return NotLinear()
        steps = _pool_steps(SPATIAL_DIMS[target], args["kernel_size"], args["stride"],
                                  args["padding"], args["ceil_mode"], args["count_include_pad"],
                                  args["divisor_override"])
        return steps if isinstance(steps, NotLinear) else LinearNode(args["input"], steps)
    if target is F.pad:
        args = bind(node, _PAD_PARAMS)
        if args is None or args["mode"] != "constant" or not reader.is_tensor(args["input"]):
            return NotLinear()
        value = args["value"]
        if value is not None and not isinstance(value, (int, float)):
            return NotLinear()
        steps = _pad_steps(args["pad"], value, _spatial_dims(node))
        return steps if isinstance(steps, NotLinear) else LinearNode(args["input"], steps)
    return _arithmetic(reader, node)


def _linear_op(reader: LinearReader, node: Node) -> LinearNode | NotLinear:
    if node.op == "call_module":
        return _module_op(reader, node)
    if reader.value(node) is not None:  # a constant is no op on a tensor
        return NotLinear()
    if node.op == "call_function":
        return _function_op(reader, node)
    if node.op == "call_method":
        if node.target in _PASS_THROUGH_METHODS and len(node.args) == 1 and not node.kwargs:
            return LinearNode(node.args[0], ()) if reader.is_tensor(node.args[0]) else NotLinear()
        return _arithmetic(reader, node)
    return NotLinear()


def dtype_at(gm: GraphModule, node: Node | None = None) -> torch.dtype:
    """The floating dtype shape propagation recorded at `node`, else the model's."""
    dtype = node_dtype(node) if node is not None else None
    return dtype if dtype is not None and dtype.is_floating_point else model_dtype(gm)
