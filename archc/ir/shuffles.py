"""Channel shuffle recognition: every spelling of `y = x[:, π]`, one home for the passes
(`archc.passes.channel_shuffle`) and the channel analysis (`archc.ir.channels`).

A shuffle with g groups on C = g m channels is a fixed permutation of the channel dim 1: input
channel i m + j goes to output channel j g + i (0 <= i < g, 0 <= j < m); that is, reshape
(N, C, *S) -> (N, g, m, *S), swap dims 1 and 2, reshape back.

Recognized spellings (`find_shuffles`): `nn.ChannelShuffle(g)`, `torch.channel_shuffle(x, g)`
(which is `F.channel_shuffle`), and x -> split (N, g, C/g, *R) -> swap dims 1, 2 -> merge to x's
shape, with `view`/`reshape`/`torch.reshape`/`unflatten` to split, `transpose`/`swapaxes`/`permute`
(`(0, 2, 1, ...)`) to swap, `view`/`reshape`/`flatten` to merge and `.contiguous()` anywhere
between. The reshape spelling is decided from the shapes that shape propagation records on the
example inputs. Literal sizes are taken as written for the example's shape; sizes computed from
x's shape (`x.size()`, `x.shape[i]`, `//`, `*`, `+`, `-`) must also describe the shuffle at a probe
shape of x with every batch and spatial size changed, so a spelling that only coincides with a
shuffle at the example (`view(n, g, C/g, w, h)` on a square input) is not taken for one.

`follows_channels` says whether the same nodes still shuffle x when its channel count changes to
another multiple of g (what pruning needs): true for the call spellings and for reshapes whose
sizes are computed from x's shape; false where a size is a literal that depends on C
(`view(n, 2, 24, h, w)`).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.fx import GraphModule, Node

from archc.ir.graph import arg, describe
from archc.ir.ops import RESHAPES, call_target, reshape_sizes
from archc.ir.shapes import node_shape

# The reshape spelling: split dim 1, swap dims 1 and 2, merge (call_method names, functions).
_SPLITS = RESHAPES | {"unflatten", torch.unflatten}
_MERGES = RESHAPES | {"flatten", torch.flatten}
_SWAPS = {"transpose", "swapaxes", "swapdims", torch.transpose, torch.swapaxes, torch.swapdims}
_PERMUTES = {"permute", torch.permute}
SIZE_ARITHMETIC = {operator.add, operator.sub, operator.mul, operator.floordiv}


@dataclass(frozen=True)
class Shuffle:
    """A recognized channel shuffle `y = x[:, π]`, in any spelling."""

    nodes: tuple[Node, ...]  # its own nodes: the first reads x, the last computes y
    groups: int | None  # None: computed in the graph from values not known here

    @property
    def input(self) -> Node:
        return self.nodes[0].args[0]

    @property
    def output(self) -> Node:
        return self.nodes[-1]

    @property
    def canonical(self) -> bool:
        return len(self.nodes) == 1 and self.output.target is torch.channel_shuffle

    @property
    def name(self) -> str:
        return describe(self.output) if len(self.nodes) == 1 else (
            f"{self.nodes[0].name}..{self.output.name}")



def find_shuffles(gm: GraphModule) -> dict[Node, Shuffle]:
    """Every recognized shuffle by its output node. The reshape spelling needs recorded shapes
    (`archc.ir.shapes`); a node belongs to at most one shuffle."""
    found: dict[Node, Shuffle] = {}
    claimed: set[Node] = set()
    for node in gm.graph.nodes:
        shuffle = _call_shuffle(gm, node) or _reshape_shuffle(node)
        if shuffle is not None and claimed.isdisjoint(shuffle.nodes):
            found[node] = shuffle
            claimed.update(shuffle.nodes)
    return found


def _call_shuffle(gm: GraphModule, node: Node) -> Shuffle | None:
    """`nn.ChannelShuffle(g)(x)` or `torch.channel_shuffle(x, g)` (also `F.channel_shuffle`)."""
    if node.op == "call_module" and type(gm.get_submodule(node.target)) is nn.ChannelShuffle:
        return Shuffle((node,), gm.get_submodule(node.target).groups)
    if call_target(node) is torch.channel_shuffle and node.args:
        groups = _size_value(arg(node, 1, "groups"), node_shape)
        return Shuffle((node,), groups if isinstance(groups, int) else None)
    return None


def _reshape_shuffle(node: Node) -> Shuffle | None:
    """x (N, C, *S) -> split (N, g, C/g, *R) -> swap dims 1, 2 -> merge (N, C, *S) ending at `node`.

    Only shapes matter: a merge of the contiguous swapped tensor back to x's shape is x[:, π]
    however the trailing dims were split."""
    if call_target(node) not in _MERGES or not node.args:
        return None
    nodes = [node]
    swap = _skip_contiguous(node, nodes)
    if swap is None or not _swaps_1_2(swap):
        return None
    nodes.append(swap)
    split = _skip_contiguous(swap, nodes)
    if split is None or call_target(split) not in _SPLITS or not split.args:
        return None
    nodes.append(split)
    x = split.args[0]
    if not isinstance(x, Node) or any(len(n.users) != 1 for n in nodes[1:]):
        return None
    shape, split_shape = node_shape(x), node_shape(split)
    if (shape is None or split_shape is None or node_shape(node) != shape or len(shape) < 2
            or len(split_shape) < 3 or split_shape[0] != shape[0]
            or split_shape[1] * split_shape[2] != shape[1]):
        return None
    n, channels, spatial = shape[0], shape[1], shape[2:]
    groups = split_shape[1]
    # far from every example size and distinct per axis, so a swapped or misread size shows
    probe = (1000 * n + 1, channels, *(1000 * s + i + 1 for i, s in enumerate(spatial)))

    def splits(sizes: tuple[int, ...]) -> bool:
        return (sizes[:3] == (probe[0], groups, channels // groups)
                and math.prod(sizes) == math.prod(probe))

    if not (_holds_at_probe(split, x, probe, splits)
            and _holds_at_probe(node, x, probe, lambda sizes: sizes == probe)):
        return None
    return Shuffle(tuple(reversed(nodes)), groups)


def _skip_contiguous(node: Node, nodes: list[Node]) -> Node | None:
    """The producer of `node`'s first argument past any `.contiguous()`, which join `nodes`."""
    value = node.args[0] if node.args else None
    while isinstance(value, Node) and call_target(value) == "contiguous":
        nodes.append(value)
        value = value.args[0]
    return value if isinstance(value, Node) else None


def _swaps_1_2(node: Node) -> bool:
    """`transpose(1, 2)` (either order, negative dims too) or `permute(0, 2, 1, 3, ...)`."""
    shape = node_shape(node)
    dims = node.args[1:]
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = tuple(dims[0])
    if shape is None or len(shape) < 3 or not all(type(d) is int for d in dims):
        return False
    rank = len(shape)
    dims = tuple(d % rank for d in dims)
    if call_target(node) in _PERMUTES:
        return dims == (0, 2, 1, *range(3, rank))
    return call_target(node) in _SWAPS and len(dims) == 2 and set(dims) == {1, 2}


def _requested(node: Node) -> tuple[object, object] | None:
    """The sizes a reshape or unflatten asks for and the dim they replace (None: the whole
    shape); None for `flatten`, which takes dims only."""
    if call_target(node) in RESHAPES:
        sizes = reshape_sizes(node)
        if sizes is not None and len(sizes) == 1 and isinstance(sizes[0], Node):
            sizes = sizes[0]  # x.view(s): s may compute the whole shape
        return sizes, None
    if call_target(node) in _SPLITS:  # unflatten(x, dim, sizes)
        return arg(node, 2, "sizes"), arg(node, 1, "dim")
    return None


def _literal(sizes) -> bool:
    return isinstance(sizes, (tuple, list)) and all(type(s) is int for s in sizes)


def _holds_at_probe(node: Node, x: Node, probe: tuple[int, ...],
                    describes: Callable[[tuple[int, ...]], bool]) -> bool:
    """Whether the shape reshape `node` asks for still describes the shuffle when x has shape
    `probe`. Literal sizes count as written for the example's shape (already matched); computed
    sizes must follow x's shape. `flatten` takes dims only."""
    requested = _requested(node)
    if requested is None:
        return True
    sizes, dim = requested
    if _literal(sizes):
        return True
    values = _size_value(sizes, lambda tensor: probe if tensor is x else None)
    if not isinstance(values, tuple) or not all(isinstance(v, int) for v in values):
        return False
    if dim is not None:  # the sizes replace dim `dim` of x
        if type(dim) is not int:
            return False
        dim %= len(probe)
        values = (*probe[:dim], *values, *probe[dim + 1:])
    known = math.prod(v for v in values if v != -1)
    if values.count(-1) == 1 and known and math.prod(probe) % known == 0:
        values = tuple(math.prod(probe) // known if v == -1 else v for v in values)
    return describes(values)


def _size_value(value, shape_of: Callable[[Node], tuple[int, ...] | None]):
    """A traced size expression evaluated with tensor shapes from `shape_of`: int literals,
    `t.shape`, `t.size()`, `t.size(d)`, indexing, `+ - * //` and tuples of them; None if it
    reads anything else."""
    if isinstance(value, (tuple, list)):
        items = [_size_value(v, shape_of) for v in value]
        return None if None in items else tuple(items)
    if isinstance(value, int) or not isinstance(value, Node):
        return value if isinstance(value, int) else None
    target, args = call_target(value), value.args
    tensor = args[0] if args and isinstance(args[0], Node) else None
    if target == "size" and tensor is not None:
        shape, dim = shape_of(tensor), arg(value, 1, "dim")
        return shape if shape is None or dim is None else shape[dim]
    if target is getattr and tensor is not None and args[1] == "shape":
        return shape_of(tensor)
    if target is operator.getitem:
        sequence = _size_value(args[0], shape_of)
        index = args[1]
        return sequence[index] if isinstance(sequence, tuple) and type(index) is int else None
    if target in SIZE_ARITHMETIC:
        a, b = (_size_value(v, shape_of) for v in args)
        return target(a, b) if isinstance(a, int) and isinstance(b, int) else None
    return None


def follows_channels(shuffle: Shuffle) -> bool:
    """Whether `shuffle`'s nodes shuffle x with g groups at any channel count g m' (see the module
    docstring): every reshape size that depends on the channel count is computed from x's shape."""
    shape = node_shape(shuffle.input)
    if len(shuffle.nodes) == 1 or shuffle.groups is None or shape is None:
        return len(shuffle.nodes) == 1 and shuffle.groups is not None
    split, merge = shuffle.nodes[0], shuffle.output
    g = shuffle.groups
    probe = (shape[0], g * (shape[1] // g + 1000), *shape[2:])  # another multiple of g

    def splits(sizes: tuple[int, ...]) -> bool:
        return sizes[:3] == (probe[0], g, probe[1] // g) and math.prod(sizes) == math.prod(probe)

    return all(not (_requested(node) and _literal(_requested(node)[0]))
               and _holds_at_probe(node, shuffle.input, probe, describes)
               for node, describes in ((split, splits), (merge, lambda sizes: sizes == probe)))
