"""Low-rank decomposition of a graph's layers (`archc lowrank`), as plain conv/Linear chains.

Every dense (groups = 1) conv and every Linear on [N, F] is a candidate:
- 1x1 conv / Linear: truncated SVD into two thin layers, in -> r (stride, padding and dilation
  of the original, no bias) -> out (the bias);
- KxK conv: Tucker-2 into 1x1 in -> r_in, the KxK core r_in -> r_out (the original's stride,
  padding, dilation), 1x1 r_out -> out (the bias); or (`kxk="spatial"`) Kx1 in -> r then 1xK
  r -> out (Jaderberg et al. 2014), or whichever of the two has fewer MACs (`kxk="cheaper"`);
(the math is in `archc.compress.lowrank_algebra`). The ranks are the smallest keeping `energy` of
the squared singular values (per mode for Tucker-2). A layer is replaced only where its chain has
fewer MACs than it at the recorded shapes. The chain's modules sit in a container named after
the layer (`s1.b1.f.a.conv_lowrank.0`, `.1`, `.2`) and are called one after the other, so every
pass, the channel analysis and the emitters see plain convs; the edits are recorded
(`archc.ir.graph_edits`) and an archc checkpoint replays them.

At full rank (energy 1) the chain computes the same function (orthonormal factors); the report
gives every replaced layer's relative weight error ||W_r - W|| / ||W|| and the whole model's
relative output error on the example input.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.fx import GraphModule, Node

from archc.compress.lowrank_algebra import (
    frobenius_relative_error,
    mode_singular_values,
    rank_for_energy,
    singular_values,
    spatial_factors,
    spatial_matrix,
    spatial_weight,
    svd_factors,
    tucker2_factors,
    tucker2_weight,
)
from archc.errors import ArchcError
from archc.ir.analysis import complexity_report
from archc.ir.graph_edits import chain, delete_module, put_module, record
from archc.ir.ops import CONV_MODULES
from archc.ir.shapes import node_shape


class LowRankError(ArchcError):
    """No layer to decompose, or a MACs target that cannot be met."""


@dataclass
class LayerDecomposition:
    name: str
    kind: str  # "svd" or "tucker2"
    shape: list[int]  # the original weight's
    ranks: list[int]  # [r] or [r_out, r_in]
    macs_before: int
    macs_after: int
    weight_error: float


@dataclass
class LowRankResult:
    graph_module: GraphModule
    energy: float
    params: tuple[int, int]
    macs: tuple[int, int]
    output_error: float
    layers: list[LayerDecomposition] = field(default_factory=list)
    skipped: int = 0  # candidates whose chain would not lower their MACs

    def format(self) -> str:
        lines = [f"{'layer':<30} {'kind':<8} {'ranks':<10} {'MACs':>25} {'weight err':>11}"]
        for layer in self.layers:
            lines.append(f"{layer.name[:30]:<30} {layer.kind:<8} "
                         f"{'/'.join(map(str, layer.ranks)):<10} "
                         f"{layer.macs_before:>11,}->{layer.macs_after:<11,} "
                         f"{layer.weight_error:>11.2e}")
        (p0, p1), (m0, m1) = self.params, self.macs
        lines.append(f"energy {self.energy:g}: {len(self.layers)} layers decomposed, "
                     f"{self.skipped} left as they are (no MACs saved)")
        lines.append(f"total params {p0:,} -> {p1:,} ({100 * p1 / p0:.1f}%), MACs {m0:,} -> "
                     f"{m1:,} ({100 * m1 / m0:.1f}%) per sample; relative output error "
                     f"{self.output_error:.2e} on the example input")
        return "\n".join(lines)


def _conv(cls, cin: int, cout: int, kernel, *, stride=1, padding=0, dilation=1, bias: bool,
          like: Tensor) -> nn.Module:
    with torch.device(like.device):
        module = cls(cin, cout, kernel, stride=stride, padding=padding, dilation=dilation,
                     bias=bias)
    return module.to(like.dtype)


def _set(module: nn.Module, weight: Tensor, bias: Tensor | None) -> nn.Module:
    module.weight = nn.Parameter(weight.detach().clone())
    if bias is not None:
        module.bias = nn.Parameter(bias.detach().clone())
    return module


def _plan(module: nn.Module, node: Node, energy: float, kxk: str = "tucker2"):
    """(kind, ranks, macs_before, macs_after, layers, reconstructed weight) or None."""
    out_shape = node_shape(node)
    in_shape = node_shape(node.args[0]) if node.args else None
    if out_shape is None or in_shape is None:
        return None
    bias = module.bias
    weight = module.weight.detach()
    if isinstance(module, nn.Linear):
        if len(out_shape) != 2:
            return None
        cout, cin = weight.shape
        r = rank_for_energy(singular_values(weight), energy)
        before = cin * cout + (cout if bias is not None else 0)
        after = r * cin + cout * r + (cout if bias is not None else 0)
        first, second = svd_factors(weight, r)
        with torch.device(weight.device):
            a = nn.Linear(cin, r, bias=False).to(weight.dtype)
            b = nn.Linear(r, cout, bias=bias is not None).to(weight.dtype)
        layers = [_set(a, first, None), _set(b, second, bias)]
        return "svd", [r], before, after, layers, second @ first
    if not isinstance(module, CONV_MODULES) or module.groups != 1 \
            or module.padding_mode != "zeros" or isinstance(module.padding, str):
        return None
    cls = type(module)
    cout, cin = weight.shape[:2]
    kernel = tuple(weight.shape[2:])
    out_spatial = math.prod(out_shape[2:])
    in_spatial = math.prod(in_shape[2:])
    bias_macs = cout * out_spatial if bias is not None else 0
    before = cin * cout * math.prod(kernel) * out_spatial + bias_macs
    ones = (1,) * len(kernel)
    if all(k == 1 for k in kernel):
        matrix = weight.reshape(cout, cin)
        r = rank_for_energy(singular_values(matrix), energy)
        after = (r * cin + cout * r) * out_spatial + bias_macs
        first, second = svd_factors(matrix, r)
        a = _conv(cls, cin, r, ones, stride=module.stride, padding=module.padding,
                  dilation=module.dilation, bias=False, like=weight)
        b = _conv(cls, r, cout, ones, bias=bias is not None, like=weight)
        layers = [_set(a, first.reshape(r, cin, *ones), None),
                  _set(b, second.reshape(cout, r, *ones), bias)]
        return "svd", [r], before, after, layers, (second @ first).reshape(weight.shape)
    if kxk in ("spatial", "cheaper") and weight.ndim == 4:
        spatial = _spatial_plan(module, weight, bias, in_shape, out_shape, energy, before,
                                bias_macs)
        if kxk == "spatial":
            return spatial
    s_out, s_in = mode_singular_values(weight)
    r_out, r_in = rank_for_energy(s_out, energy), rank_for_energy(s_in, energy)
    after = (r_in * cin * in_spatial + r_out * r_in * math.prod(kernel) * out_spatial
             + cout * r_out * out_spatial + bias_macs)
    first, core, last = tucker2_factors(weight, r_out, r_in)
    a = _conv(cls, cin, r_in, ones, bias=False, like=weight)
    b = _conv(cls, r_in, r_out, kernel, stride=module.stride, padding=module.padding,
              dilation=module.dilation, bias=False, like=weight)
    c = _conv(cls, r_out, cout, ones, bias=bias is not None, like=weight)
    layers = [_set(a, first, None), _set(b, core, None), _set(c, last, bias)]
    tucker = ("tucker2", [r_out, r_in], before, after, layers, tucker2_weight(first, core, last))
    if kxk == "cheaper" and weight.ndim == 4 and spatial[3] < after:
        return spatial
    return tucker


def _spatial_plan(module, weight, bias, in_shape, out_shape, energy, before, bias_macs):
    """KxK -> Kx1 (vertical window: stride, padding, dilation) then 1xK (horizontal ones)."""
    cout, cin, kh, kw = weight.shape
    r = rank_for_energy(singular_values(spatial_matrix(weight)), energy)
    (sh, sw), (ph, pw), (dh, dw) = module.stride, module.padding, module.dilation
    rows = out_shape[2]
    after = (r * cin * kh * rows * in_shape[3] + cout * r * kw * rows * out_shape[3]
             + bias_macs)
    vertical, horizontal = spatial_factors(weight, r)
    a = _conv(nn.Conv2d, cin, r, (kh, 1), stride=(sh, 1), padding=(ph, 0), dilation=(dh, 1),
              bias=False, like=weight)
    b = _conv(nn.Conv2d, r, cout, (1, kw), stride=(1, sw), padding=(0, pw), dilation=(1, dw),
              bias=bias is not None, like=weight)
    layers = [_set(a, vertical, None), _set(b, horizontal, bias)]
    return "spatial", [r], before, after, layers, spatial_weight(vertical, horizontal)


KXK_METHODS = ("tucker2", "spatial", "cheaper")


def decompose(gm: GraphModule, example_input: Tensor, energy: float,
              only_if_cheaper: bool = True, kxk: str = "tucker2") -> LowRankResult:
    """A decomposed copy of `gm` (see the module docstring); `gm` is left as it is.
    `only_if_cheaper=False` replaces every candidate (to check the chains at full rank)."""
    if not 0 < energy <= 1:
        raise LowRankError(f"the energy must be in (0, 1], not {energy}")
    if kxk not in KXK_METHODS:
        raise LowRankError(f"unknown KxK method {kxk!r}; one of {', '.join(KXK_METHODS)}")
    original = gm
    gm = copy.deepcopy(gm)
    shape = tuple(example_input.shape)
    before = complexity_report(gm, shape).total
    layers, skipped, candidates = [], 0, 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        if not isinstance(module, (nn.Linear, *CONV_MODULES)):
            continue
        with torch.no_grad():
            plan = _plan(module, node, energy, kxk)
        if plan is None:
            continue
        candidates += 1
        kind, ranks, macs_before, macs_after, modules, approx = plan
        if only_if_cheaper and macs_after >= macs_before:
            skipped += 1
            continue
        name = str(node.target)
        names = [f"{name}_lowrank.{i}" for i in range(len(modules))]
        for child, new in zip(names, modules):
            new.train(module.training)
            put_module(gm, child, new)
        chain(gm, node, names)
        record(gm, {"op": "chain", "node": node.name, "modules": names})
        delete_module(gm, name)
        record(gm, {"op": "delete", "name": name})
        layers.append(LayerDecomposition(name, kind, list(module.weight.shape), ranks,
                                         macs_before, macs_after,
                                         frobenius_relative_error(module.weight.detach(), approx)))
    if candidates == 0:
        raise LowRankError("no dense conv or Linear to decompose")
    gm.graph.lint()
    gm.recompile()
    after = complexity_report(gm, shape).total
    with torch.no_grad():
        error = frobenius_relative_error(original(example_input), gm(example_input))
    return LowRankResult(gm.eval(), energy, (before.params, after.params),
                         (before.flops, after.flops), error, layers, skipped)


def decompose_to_macs(gm: GraphModule, example_input: Tensor, target: float,
                      steps: int = 8, kxk: str = "tucker2") -> LowRankResult:
    """The highest energy (bisected) whose decomposition keeps at most `target` of the MACs."""
    if not 0 < target < 1:
        raise LowRankError(f"the MACs target must be a fraction in (0, 1), not {target}")
    low, high, best = 0.0, 1.0, None
    for _ in range(steps):
        energy = (low + high) / 2
        result = decompose(gm, example_input, energy, kxk=kxk)
        if result.macs[1] <= target * result.macs[0]:
            best, low = result, energy
        else:
            high = energy
    if best is None:
        kept = 100 * result.macs[1] / result.macs[0]
        raise LowRankError(f"cannot reach {100 * target:.0f}% of the MACs: at energy "
                           f"{energy:.3g} the model keeps {kept:.1f}%")
    return best
