"""Fold eval-mode BatchNorm into a neighbouring conv or linear layer (R1, R2 of `docs/rewrites.md`).

An eval-mode BN is a per-channel affine map: `BN(x) = t x + u` with `t = γ / sqrt(σ² + ε)` and
`u = β - μ t` (γ = 1, β = 0 without affine), using the BN's own ε.

    R1  BN(conv(x)) = conv'(x),  W' = t W (per output channel),  b' = t b + u
        Conv1d/2d/3d with any groups, stride, dilation and padding; Linear -> BatchNorm1d;
        ConvTranspose (W is [I, O/g, k...], t scales dim 1 group by group).
    R2  conv(BN(x)) = conv'(x),  W'[o, i] = W[o, i] t_i,  b'_o = b_o + Σ_{i,k} W[o, i, k] u_i
        Conv1d/2d/3d with any groups; BatchNorm1d -> Linear. Exact only if the conv does not
        zero-pad: the border would see BN(0) = u after folding instead of 0. Reflect, replicate
        and circular padding copy values within a channel, so they commute with BN and are exact.

One pass, `fold_bn`, holds both rule families and a third, `layer_affine`: a constant
per-channel scale after a conv or linear (a layer scale, an averaging `/ 2`) folds in like R1.
R1 rules come first, so a BN between two convs folds into the one before it (always exact).
Layers are modules (`nn.Conv2d`) or functional calls (`F.conv2d`) on `get_attr` constants;
functional weights are replaced by new constants, never written in place, so a constant read
elsewhere keeps its value. BNs are modules: the pass requires the canonical form, in which
`canonicalize` has turned every functional or aten BatchNorm it can into a module
(`BATCH_NORM_MODULES`, checked before the pass runs), so BatchNorm is read in one place.
The per-channel factors (t, u) are computed in float64; the weights are rewritten in their own
dtype or float32, whichever is wider (`archc.rewrite.weight_algebra`): float64 when the pipeline
works on a float64 copy (verification on), float32 otherwise, one rounding of t and of each product,
and a half-precision layer is folded in float32 and cast back. A layer without bias gains one.
Nothing is folded through a non-linearity, into a module used twice, or across a tensor with
other users (R12).

BN normalizes dim 1, a Linear mixes the last dim, a conv's channel dim is 1 only when batched: the
ranks are read from the recorded shapes (`archc.ir.shapes`). Without them, a Linear/BN pair is
refused and a conv is taken as batched when the BN has the conv's spatial dimensionality.

A refusal reason starts with one of the constants below or of `archc.rewrite.legality`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx import GraphModule, Node

from archc.ir.graph import (
    arg,
    attribute,
    bypass,
    called_once,
    describe,
    has_other_users,
    set_arg,
    set_weights,
    unique_name,
)
from archc.ir.ops import (
    BN_MODULES,
    CONV_FUNCTIONS,
    CONV_MODULES,
    CONV_TRANSPOSE_MODULES,
    SPATIAL_DIMS,
    conv_pads,
)
from archc.ir.shapes import node_shape
from archc.passes.canonical import BATCH_NORM_MODULES
from archc.rewrite import weight_algebra as wa
from archc.rewrite.legality import (
    NO_RUNNING_STATS,
    OTHER_USERS,
    SHARED_MODULE,
    SUBCLASS,
    TRAINING,
)
from archc.rewrite.linear_chains import ChannelAffine, LinearNode, LinearReader
from archc.rewrite.pipeline import PassContext, PassResult, register_pass
from archc.rewrite.rules import Match, Op, Plan, Refuse, Rule, apply_rules

NOT_CONSTANT = ("a functional weight or BN statistic is computed in the graph, not a get_attr "
                "constant")
CHANNEL_MISMATCH = "channel mismatch: the BN's num_features differs from the conv/linear channels"
PADDING = ("conv pads its input: the border would see BN(0) instead of 0 after folding; move the "
           "padding upstream (not supported)")
LINEAR_RANK = ("BatchNorm1d and Linear fold only on 2-D (N, C) tensors: BN normalizes dim 1, "
               "Linear mixes the last dim (shape unknown or not 2-D; give example inputs)")
UNBATCHED = "the conv runs unbatched: BN's channel dim 1 is not the conv's channel dim"
NO_NEIGHBOUR = "no adjacent conv/linear to fold into: its input and its users are other ops"

_F_CONV_TRANSPOSES = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)
_EXACT_TYPES = (*BN_MODULES, *CONV_MODULES, *CONV_TRANSPOSE_MODULES, nn.Linear)


@dataclass
class _Layer:
    """A conv, conv-transpose or linear node, module or functional, seen through its weights."""

    node: Node
    kind: str  # "conv", "transpose" or "linear"
    weight: Tensor
    bias: Tensor | None
    groups: int
    zero_pads: bool
    reason: str | None  # why its weights cannot be replaced
    replace: Callable[[Tensor, Tensor], None]  # install (W', b')

    def channels(self, output: bool) -> int:
        if self.kind == "transpose":
            return self.weight.shape[1] * self.groups if output else self.weight.shape[0]
        return self.weight.shape[0] if output else self.weight.shape[1] * self.groups


@dataclass
class _Norm:
    """A BatchNorm module's node: its statistics and affine parameters."""

    node: Node
    mean: Tensor | None
    var: Tensor | None
    weight: Tensor | None
    bias: Tensor | None
    eps: float
    # A batched conv with d spatial dims makes a (d + 2)-D tensor, which only BatchNorm{d}d
    # accepts; None for a subclass of another type (refused anyway)
    spatial_dims: int | None
    reason: str | None  # why it cannot fold at all

    def affine(self) -> tuple[Tensor, Tensor]:
        """(t, u) in float64 with BN(x) = t x + u."""
        def double(t):
            return None if t is None else t.double()

        return wa.bn_affine(double(self.mean), double(self.var), double(self.weight),
                            double(self.bias), self.eps)


def _pads(padding, kernel: tuple[int, ...], dilation) -> bool:
    """Whether a zero-padding conv with this `padding` argument pads anything."""
    pads = conv_pads(padding, kernel, dilation)
    return pads is None or any(before or after for before, after in pads)


def _constants(gm: GraphModule, args: list) -> list[Tensor | None] | None:
    """The tensors behind get_attr arguments (None stays None); None if one is computed."""
    values = []
    for node in args:
        value = None
        if node is not None:
            if not isinstance(node, Node) or node.op != "get_attr":
                return None
            value = attribute(gm, node.target)
        values.append(value)
    return values


def _layer(gm: GraphModule, node: Node) -> _Layer:
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        kind = ("linear" if isinstance(module, nn.Linear)
                else "transpose" if isinstance(module, CONV_TRANSPOSE_MODULES) else "conv")
        reason = (SUBCLASS if type(module) not in _EXACT_TYPES
                  else SHARED_MODULE if not called_once(gm, node) else None)
        zero_pads = kind == "conv" and module.padding_mode == "zeros" and _pads(
            module.padding, module.kernel_size, module.dilation)
        return _Layer(node, kind, module.weight, module.bias, getattr(module, "groups", 1),
                      zero_pads, reason, lambda w, b: set_weights(module, w, b))
    # F.conv{d}(x, W, b, stride, padding, dilation, groups), F.conv_transpose{d}(x, W, b, stride,
    # padding, output_padding, groups, dilation), F.linear(x, W, b)
    kind = ("transpose" if node.target in _F_CONV_TRANSPOSES
            else "conv" if node.target in CONV_FUNCTIONS else "linear")
    constants = _constants(gm, [arg(node, 1, "weight"), arg(node, 2, "bias")])
    if constants is None:
        return _Layer(node, kind, None, None, 1, False, NOT_CONSTANT, None)
    weight, bias = constants
    zero_pads = kind == "conv" and _pads(arg(node, 4, "padding", 0), tuple(weight.shape[2:]),
                                         arg(node, 5, "dilation", 1))

    def replace(new_weight: Tensor, new_bias: Tensor) -> None:
        for position, keyword, value in ((1, "weight", new_weight), (2, "bias", new_bias)):
            name = unique_name(gm, f"{node.name}_{keyword}")
            if isinstance(weight, nn.Parameter):
                gm.register_parameter(name, nn.Parameter(value.to(weight), weight.requires_grad))
            else:
                gm.register_buffer(name, value.to(weight))
            with gm.graph.inserting_before(node):
                set_arg(node, position, keyword, gm.graph.get_attr(name))

    return _Layer(node, kind, weight, bias, arg(node, 6, "groups", 1) if kind != "linear" else 1,
                  zero_pads, None, replace)


def _norm(gm: GraphModule, node: Node) -> _Norm:
    bn = gm.get_submodule(node.target)
    reason = (TRAINING if bn.training else NO_RUNNING_STATS if bn.running_mean is None
              else SUBCLASS if type(bn) not in _EXACT_TYPES else None)
    return _Norm(node, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps,
                 SPATIAL_DIMS.get(type(bn)), reason)


@dataclass(frozen=True)
class _Fold:
    layer: _Layer
    norm: _Norm


def _check(match: Match, layer_index: int) -> Plan | Refuse:
    """Legality of folding the BN into the layer; `match.nodes[0]` produces the tensor between."""
    gm, (between, consumer) = match.gm, match.nodes
    norm, layer = _norm(gm, match.nodes[1 - layer_index]), _layer(gm, match.nodes[layer_index])
    reason = norm.reason or layer.reason
    if reason is None and has_other_users(between, consumer):
        reason = OTHER_USERS
    if reason is None and norm.mean.numel() != layer.channels(output=layer_index == 0):
        reason = CHANNEL_MISMATCH
    shape = node_shape(between)
    if reason is None and layer.kind == "linear" and (shape is None or len(shape) != 2):
        reason = LINEAR_RANK
    elif reason is None and layer.kind != "linear" and (
            norm.spatial_dims not in (None, layer.weight.ndim - 2)
            or (shape is not None and len(shape) != layer.weight.ndim)):
        reason = UNBATCHED
    if reason is None and layer_index == 1 and layer.zero_pads:
        reason = PADDING
    return Refuse(reason) if reason else Plan(_Fold(layer, norm))


def _in_algebra_dtype(layer: _Layer, norm: _Norm
                      ) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """(W, b, t, u) in the dtype the fold computes in: the layer's, at least float32."""
    dtype = torch.promote_types(layer.weight.dtype, torch.float32)
    t, u = (v.to(dtype) for v in norm.affine())
    bias = None if layer.bias is None else layer.bias.detach().to(dtype)
    return layer.weight.detach().to(dtype), bias, t, u


def _fold_into_preceding(match: Match, fold: _Fold) -> str:
    layer, norm = fold.layer, fold.norm
    with torch.no_grad():
        weight, bias, t, u = _in_algebra_dtype(layer, norm)
        if layer.kind == "transpose":
            layer.replace(*wa.fold_bn_after_transpose(weight, bias, t, u, layer.groups))
        else:
            layer.replace(*wa.fold_bn_after(weight, bias, t, u))
    bypass(match.gm, norm.node, layer.node)
    return f"folded {describe(norm.node)} into {describe(layer.node)}"


def _fold_into_following(match: Match, fold: _Fold) -> str:
    norm, layer = fold.norm, fold.layer
    with torch.no_grad():
        weight, bias, t, u = _in_algebra_dtype(layer, norm)
        layer.replace(*wa.fold_bn_before(weight, bias, t, u, layer.groups))
    bypass(match.gm, norm.node, norm.node.args[0])
    return f"folded {describe(norm.node)} into the following {describe(layer.node)}"


def _before(match: Match) -> Plan | Refuse:
    return _check(match, 0)


def _after(match: Match) -> Plan | Refuse:
    return _check(match, 1)


_BN = Op(modules=BN_MODULES)
_BN1D = Op(modules=(nn.BatchNorm1d,))
_CONV = Op(modules=CONV_MODULES, functions=CONV_FUNCTIONS)
_CONV_TRANSPOSE = Op(modules=CONV_TRANSPOSE_MODULES, functions=_F_CONV_TRANSPOSES)
_LINEAR = Op(modules=(nn.Linear,), functions=(F.linear,))

FOLD_RULES = (
    # R1  BN(conv(x)) -> conv'(x)
    Rule("conv_bn", (_CONV, _BN), _before, _fold_into_preceding, "BN(W*x+b) = (tW)*x + (tb+u)"),
    Rule("linear_bn", (_LINEAR, _BN1D), _before, _fold_into_preceding, "BN(Wx+b) = (tW)x + (tb+u)"),
    Rule("conv_transpose_bn", (_CONV_TRANSPOSE, _BN), _before, _fold_into_preceding,
         "BN(W*^T x+b) = (W t_per_group)*^T x + (tb+u)"),
    # R2  conv(BN(x)) -> conv'(x)
    Rule("bn_conv", (_BN, _CONV), _after, _fold_into_following, "W*(tx+u)+b = (Wt)*x + (b+ΣWu)"),
    Rule("bn_linear", (_BN1D, _LINEAR), _after, _fold_into_following, "W(tx+u)+b = (Wt)x + (b+Wu)"),
)


def _without_neighbour(gm: GraphModule, node: Node, memo) -> tuple[Node, ...] | None:
    """A BN that no fold rule matches: no conv/linear feeds it or reads it."""
    if not _BN.matches(gm, node):
        return None
    anchors = [node, *node.users]
    if any(rule.match(gm, anchor) for rule in FOLD_RULES for anchor in anchors):
        return None
    return (node,)


def _scaled_layer(gm: GraphModule, node: Node, reader: LinearReader
                  ) -> tuple[Node, ...] | None:
    """`layer(x) * c`, `layer(x) / c`, `-layer(x)` with constant c (a scalar or one value per
    output channel: a layer scale, an averaging `/ 2`): (layer, node). A constant *shift* stays:
    it is how a graph pads with a value (`pad(y - v) + v`, DBB's BN-and-pad), which sequential
    merging composes whole."""
    if node.op not in ("call_function", "call_method") or _BN.matches(gm, node):
        return None
    op = reader.op(node)
    if not isinstance(op, LinearNode) or not op.steps or not all(
            isinstance(step, ChannelAffine) and not bool(step.shift.any()) for step in op.steps):
        return None
    layer = op.input
    if not (_CONV.matches(gm, layer) or _LINEAR.matches(gm, layer)) or layer.op != "call_module":
        return None
    return (layer, node)


@dataclass(frozen=True)
class _Scale:
    layer: _Layer
    scale: Tensor  # per output channel (float64)
    shift: Tensor


def _check_scale(match: Match) -> Plan | Refuse:
    gm, (layer_node, node) = match.gm, match.nodes
    layer = _layer(gm, layer_node)
    if layer.reason:
        return Refuse(layer.reason)
    if has_other_users(layer_node, node):
        return Refuse(OTHER_USERS)
    channels = layer.channels(output=True)
    scale = torch.ones(channels, dtype=torch.float64)
    shift = torch.zeros(channels, dtype=torch.float64)
    for step in match.memo.op(node).steps:  # t2 (t1 y + u1) + u2
        step_scale, step_shift = (v.expand(channels) if v.ndim == 0 else v
                                  for v in (step.scale, step.shift))
        if step_scale.shape != (channels,) or step_shift.shape != (channels,):
            return Refuse(CHANNEL_MISMATCH)
        scale, shift = step_scale * scale, step_scale * shift + step_shift
    return Plan(_Scale(layer, scale, shift))


def _fold_scale(match: Match, plan: _Scale) -> str:
    layer, node = plan.layer, match.nodes[1]
    with torch.no_grad():
        dtype = torch.promote_types(layer.weight.dtype, torch.float32)
        bias = None if layer.bias is None else layer.bias.detach().to(dtype)
        layer.replace(*wa.fold_bn_after(layer.weight.detach().to(dtype), bias,
                                        plan.scale.to(dtype), plan.shift.to(dtype)))
    bypass(match.gm, node, layer.node)
    return f"folded the constant affine {describe(node)} into {describe(layer.node)}"


RULES = (
    *FOLD_RULES,
    # c (W x + b) -> (c W) x + c b   (a constant scale after a layer)
    Rule("layer_affine", _scaled_layer, _check_scale, _fold_scale,
         "t (W x + b) = (t W) x + t b"),
    # BN between other ops: no fold applies (reported so --explain names every BN left)
    Rule("fold_bn", _without_neighbour, lambda match: Refuse(NO_NEIGHBOUR), None,
         "no identity: BN(x) stays an affine map"),
)


@register_pass("fold_bn", "fold eval-mode BatchNorm into the conv/linear before (R1) or after (R2)",
               True, requires=(BATCH_NORM_MODULES,))
def fold_bn(gm: GraphModule, ctx: PassContext) -> PassResult:
    return apply_rules(gm, RULES, memo=LinearReader)
