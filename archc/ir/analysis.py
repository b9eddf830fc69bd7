"""Graph analysis: complexity, computed from the FX graph itself.

Shapes come from `archc.ir.shapes` (one propagation on meta tensors: no real computation, works for
graphs whose weights live on the meta device). Complexity follows pycls' counting rules, per node:

- flops are multiply-adds. Conv (any dim, groups g): `prod(k) * c_in * c_out * prod(out_spatial) /
  g`, plus `c_out * prod(out_spatial)` with a bias. Linear: `c_in * c_out * rows`, plus `c_out *
  rows` with a bias. Everything else (BN, activations, adds, SE multiply, pooling) counts 0.
- params: the parameters of every module the graph calls (each module once), plus parameters read
  directly by `get_attr`. BN counts its affine gamma and beta (2C), never running statistics.
- acts: output elements of every conv, linear and non-global pooling node (pycls counts max-pool).

All figures are per sample (batch 1); the `stage` of a node is the first component of its qualified
name (`stem`, `s1`, ..., `head`), which gives the per-stage breakdown.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.fx import GraphModule, Node

from archc.ir.graph import arg, attribute
from archc.ir.ops import (
    AVG_POOL_MODULES,
    BN_FUNCTIONS,
    CONV_FUNCTIONS,
    CONV_MODULES,
    CONV_TRANSPOSE_MODULES,
    LINEAR_FUNCTIONS,
    MAX_POOL_MODULES,
    aten_name,
)
from archc.ir.shapes import has_shapes, node_shape, propagate_shapes

_CONVS = (*CONV_MODULES, *CONV_TRANSPOSE_MODULES)
_POOLS = (*MAX_POOL_MODULES, *AVG_POOL_MODULES)
_FUNCTIONAL_POOLS = {
    torch.nn.functional.max_pool2d,
    torch.nn.functional.avg_pool2d,
    torch.max_pool2d,
    torch.nn.functional.max_pool1d,
    torch.nn.functional.avg_pool1d,
}


@dataclass
class Complexity:
    flops: int = 0  # multiply-adds
    params: int = 0
    acts: int = 0

    def __iadd__(self, other: Complexity) -> Complexity:
        self.flops += other.flops
        self.params += other.params
        self.acts += other.acts
        return self

    def as_tuple(self) -> tuple[int, int, int]:
        return self.flops, self.params, self.acts


@dataclass
class ComplexityReport:
    total: Complexity
    stages: dict[str, Complexity] = field(default_factory=dict)  # in graph order


def _per_sample(shape: tuple[int, ...]) -> int:
    return math.prod(shape[1:]) if len(shape) > 1 else math.prod(shape)


def _node_complexity(gm: GraphModule, node: Node, seen: set[str]) -> Complexity:
    out = node_shape(node)
    cx = Complexity()
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if node.target not in seen:
            seen.add(node.target)
            cx.params = sum(p.numel() for p in module.parameters())
        if out is None:
            return cx
        if isinstance(module, (*_CONVS, nn.Linear)):
            cx.flops = module_macs(module, node)
            cx.acts = _per_sample(out)
        elif isinstance(module, _POOLS):
            cx.acts = _per_sample(out)
    elif node.op == "get_attr":
        value = attribute(gm, node.target)
        if isinstance(value, nn.Parameter) and node.target not in seen:
            seen.add(node.target)
            cx.params = value.numel()
    elif node.op == "call_function" and out is not None:
        if node.target in CONV_FUNCTIONS or node.target in LINEAR_FUNCTIONS:
            weight = arg(node, 1, "weight")
            bias = arg(node, 2, "bias")
            w_shape = node_shape(weight) if isinstance(weight, Node) else None
            if w_shape is not None:
                if node.target in CONV_FUNCTIONS:  # weight [c_out, c_in / g, k...]
                    spatial = math.prod(out[2:])
                    cx.flops = math.prod(w_shape) * spatial
                    cx.flops += w_shape[0] * spatial if bias is not None else 0
                else:
                    rows = math.prod(out[1:-1]) if len(out) > 2 else 1
                    cx.flops = rows * (
                        w_shape[0] * w_shape[1] + (w_shape[0] if bias is not None else 0)
                    )
                cx.acts = _per_sample(out)
        elif node.target in _FUNCTIONAL_POOLS:
            cx.acts = _per_sample(out)
    return cx


def module_macs(module: nn.Module, node: Node, *, in_channels: int | None = None,
                out_channels: int | None = None, groups: int | None = None) -> int:
    """Multiply-adds of the conv or Linear `module` called at `node`, at its recorded shapes, by
    the rules above (0 without shapes or for another module). The keywords count the same layer
    with other channel counts and the same spatial sizes: a pruned candidate before it is built.

    Conv: prod(k) c_in c_out / g prod(out_spatial) + [bias] c_out prod(out_spatial); a transposed
    conv runs its kernel at every input position: prod(in_spatial) in place of prod(out_spatial)
    in the first term. Linear: rows (c_in c_out + [bias] c_out), rows = prod(out[1:-1])."""
    out = node_shape(node)
    if out is None:
        return 0
    bias = module.bias is not None
    if isinstance(module, nn.Linear):
        c_in = module.in_features if in_channels is None else in_channels
        c_out = module.out_features if out_channels is None else out_channels
        rows = math.prod(out[1:-1]) if len(out) > 2 else 1
        return rows * (c_in * c_out + (c_out if bias else 0))
    if not isinstance(module, _CONVS):
        return 0
    c_in = module.in_channels if in_channels is None else in_channels
    c_out = module.out_channels if out_channels is None else out_channels
    g = module.groups if groups is None else groups
    kernel = math.prod(module.kernel_size)
    spatial = math.prod(out[2:])
    if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        source = node_shape(node.args[0]) if isinstance(node.args[0], Node) else None
        if source is None:
            return 0
        return kernel * c_in * c_out // g * math.prod(source[2:]) + (
            c_out * spatial if bias else 0)
    return kernel * c_in * c_out // g * spatial + (c_out * spatial if bias else 0)


def module_complexity(gm: GraphModule) -> dict[str, Complexity]:
    """module name -> the flops of its calls and its params, at the recorded shapes."""
    found: dict[str, Complexity] = {}
    seen: set[str] = set()
    for node in gm.graph.nodes:
        if node.op == "call_module":
            found.setdefault(str(node.target), Complexity())
            found[str(node.target)] += _node_complexity(gm, node, seen)
    return found


def stage_of(node: Node) -> str:
    """The top-level component of a node's qualified name (`s2` for `s2.b1.f.a.conv`); for a
    function call, that of the outermost module it was called in below the root (torch.export
    records the root itself as the path '')."""
    if node.op in ("call_module", "get_attr"):
        return str(node.target).split(".")[0]
    paths = [path for path, _ in (node.meta.get("nn_module_stack") or {}).values() if path]
    return paths[0].split(".")[0] if paths else "<top>"


def complexity_report(
    gm: GraphModule, input_shape: tuple[int, ...] | None = None
) -> ComplexityReport:
    """flops, params and acts of a graph, in total and per stage.

    `input_shape` (N, C, H, W) triggers shape propagation; without it the nodes must already
    carry shapes. Figures are per sample whatever N is. Stages are listed as the graph runs
    them (by their first call), not in the order their weights are read (a torch.export
    program reads every weight before the first layer).
    """
    if input_shape is not None:
        propagate_shapes(gm, [tuple(input_shape)])
    total, stages, seen = Complexity(), {}, set()
    for node in gm.graph.nodes:
        cx = _node_complexity(gm, node, seen)
        if cx.as_tuple() == (0, 0, 0):
            continue
        total += cx
        stages.setdefault(stage_of(node), Complexity())
        stages[stage_of(node)] += cx
    runs = {stage_of(node): None for node in gm.graph.nodes
            if node.op in ("call_module", "call_function", "call_method")}
    order = [name for name in runs if name in stages]
    order += [name for name in stages if name not in runs]
    return ComplexityReport(total, {name: stages[name] for name in order})


def complexity(gm: GraphModule, input_size: int | tuple[int, ...] = 224) -> tuple[int, int, int]:
    """(flops, params, acts) of a graph for one sample.

    `input_size` is the square side (channels taken from the graph's first conv/linear) or a full
    input shape (N, C, H, W).
    """
    if isinstance(input_size, int):
        input_shape = (1, _input_channels(gm), input_size, input_size)
    else:
        input_shape = tuple(input_size)
    return complexity_report(gm, input_shape).total.as_tuple()


def _input_channels(gm: GraphModule) -> int:
    for node in gm.graph.nodes:
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            if isinstance(module, _CONVS):
                return module.in_channels
    spec = gm.meta.get("archc_spec")
    if spec:
        return spec.get("input", {}).get("channels", 3)
    return 3


def flops_per_sample(gm: GraphModule) -> int:
    """Multiply-adds of `gm` per sample at its recorded shapes, by pycls' rules."""
    return complexity_report(gm).total.flops


def executed_flops(gm: GraphModule) -> int:
    """Multiply-adds `gm` executes per sample (the pass reports' FLOP counter): pycls' count plus
    one per output element of every normalization layer that remains. pycls counts a conv's bias
    but not a BatchNorm; an eval BatchNorm is `x * scale + shift`, one multiply-add per element,
    so counting it makes folding read as what it is: the bias it leaves costs C*H*W adds, the
    BatchNorm it removes cost C*H*W multiply-adds."""
    norms = 0
    for node in gm.graph.nodes:
        out = node_shape(node)
        if out is not None and _is_norm(gm, node):
            norms += _per_sample(out)
    return flops_per_sample(gm) + norms


def _is_norm(gm: GraphModule, node: Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), _NORM_MODULES)
    if node.op == "call_function":
        name = aten_name(node) or ""
        return node.target in _NORM_FUNCTIONS or "batch_norm" in name or name in (
            "layer_norm", "group_norm")
    return False


@dataclass(frozen=True)
class Census:
    """What a graph executes: conv and linear layers, normalization layers (modules, and
    functional or aten batch_norm calls), parameters, multiply-adds per sample (None without
    recorded shapes)."""

    convs: int
    linears: int
    norms: int
    params: int
    macs: int | None

    def changes(self, after: Census) -> str:
        """`44 -> 22 convs, 61 -> 0 normalization layers, ...`: this graph, then `after`."""
        def arrow(before, now, noun, fmt=str):
            count = fmt(now) if before == now else f"{fmt(before)} -> {fmt(now)}"
            return f"{count} {noun}{'' if now == 1 and noun != 'params' else 's'}".replace(
                "paramss", "params")

        parts = [arrow(self.convs, after.convs, "conv"),
                 arrow(self.linears, after.linears, "linear layer"),
                 arrow(self.norms, after.norms, "normalization layer"),
                 arrow(self.params, after.params, "params", '{:,}'.format)]
        if self.macs is not None and after.macs is not None:
            parts.append(arrow(self.macs, after.macs, "MAC", lambda m: f"{m / 1e6:,.1f}M"))
        return ", ".join(parts)


_NORM_MODULES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm,
                 nn.modules.instancenorm._InstanceNorm)
_NORM_FUNCTIONS = {*BN_FUNCTIONS, torch.nn.functional.layer_norm,
                   torch.nn.functional.group_norm}


def census(gm: GraphModule) -> Census:
    """Count what `gm` executes (see `Census`)."""
    convs = linears = norms = 0
    for node in gm.graph.nodes:
        norms += _is_norm(gm, node)
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            convs += isinstance(module, _CONVS)
            linears += isinstance(module, nn.Linear)
        elif node.op == "call_function":
            name = aten_name(node) or ""
            convs += node.target in CONV_FUNCTIONS or name.startswith(("conv", "convolution"))
            linears += node.target in LINEAR_FUNCTIONS or name == "linear"
    macs = executed_flops(gm) if has_shapes(gm) else None
    return Census(convs, linears, norms, sum(p.numel() for p in gm.parameters()), macs)
