"""Structural edits of a built graph, recorded as plain data so a checkpoint can replay them.

Compression changes a model's shapes and layers: pruning narrows convs, BNs and Linears and
re-cuts splits; low-rank decomposition replaces one conv by a chain of thinner ones. An archc
checkpoint rebuilds its graph from the spec, so such a graph is stored as the spec plus the list
of edits that turn the spec's graph into it (`gm.meta["archc_edits"]`); `apply_edits` replays
them on a freshly built graph (on the meta device when loading, then the state_dict is assigned).

Edits are dicts of plain values (loadable with `torch.load(weights_only=True)`):
- `{"op": "module", "name": N, "config": C}`: put a new module built from C at N (replacing
  what is there; containers on the way are created). C is `module_config(m)` of a Conv1d/2d/3d,
  BatchNorm1d/2d/3d, LayerNorm, Linear, GroupNorm, PReLU or Embedding.
- `{"op": "split", "node": n, "sizes": [..], "dim": d}`: a split/chunk of dim d (1 if absent)
  cuts these sizes now (a chunk becomes a split); a slice `x[:, a:b]` takes
  `{"node": n, "slice": [a, b], "at": i}`, i the place of the channel slice in the index (1 if
  absent: `x[..., a:b]` has it at 1).
- `{"op": "reshape", "node": n, "at": i, "size": s}`: the reshape n requests size s at place i
  of its sizes (a channel count written as a literal: `reshape(B, N, 64)` after heads).
- `{"op": "chain", "node": n, "modules": [N1, N2, ...]}`: the call of one module becomes the
  calls of N1, N2, ... in sequence (the modules must exist: put them with `module` edits first).
- `{"op": "delete", "name": N}`: remove a module nothing calls any more.
- `{"op": "tensor", "name": N, "shape": [..]}`: the parameter or buffer N (a per-channel
  constant: a layer scale, a shift) has this shape now; its values come with the state_dict.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule, Node

from archc.errors import CheckpointError
from archc.ir.graph import attribute
from archc.ir.ops import BN_MODULES, CONV_MODULES, reshape_sizes

EDITS_KEY = "archc_edits"

_CONV_TYPES = {kind.__name__: kind for kind in CONV_MODULES}  # by the name an edit records
_BN_TYPES = {kind.__name__: kind for kind in BN_MODULES}


def module_config(module: nn.Module) -> dict[str, Any]:
    """The constructor arguments of a conv, BN, LayerNorm, Linear, GroupNorm, PReLU or
    Embedding, as plain values."""
    kind = type(module).__name__
    if kind in _CONV_TYPES and type(module) is _CONV_TYPES[kind]:
        return {"type": kind, "in": module.in_channels, "out": module.out_channels,
                "kernel": list(module.kernel_size), "stride": list(module.stride),
                "padding": list(module.padding) if not isinstance(module.padding, str)
                else module.padding, "dilation": list(module.dilation),
                "groups": module.groups, "bias": module.bias is not None,
                "padding_mode": module.padding_mode}
    if kind in _BN_TYPES and type(module) is _BN_TYPES[kind]:
        return {"type": kind, "features": module.num_features, "eps": module.eps,
                "momentum": module.momentum, "affine": module.affine,
                "track": module.track_running_stats}
    if type(module) is nn.LayerNorm:
        return {"type": "LayerNorm", "shape": list(module.normalized_shape), "eps": module.eps,
                "affine": module.elementwise_affine, "bias": module.bias is not None}
    if type(module) is nn.Linear:
        return {"type": "Linear", "in": module.in_features, "out": module.out_features,
                "bias": module.bias is not None}
    if type(module) is nn.GroupNorm:
        return {"type": "GroupNorm", "groups": module.num_groups,
                "features": module.num_channels, "eps": module.eps, "affine": module.affine}
    if type(module) is nn.PReLU:
        return {"type": "PReLU", "features": module.num_parameters}
    if type(module) is nn.Embedding:
        return {"type": "Embedding", "num": module.num_embeddings,
                "features": module.embedding_dim, "padding_idx": module.padding_idx,
                "max_norm": module.max_norm, "norm_type": module.norm_type,
                "scale_grad_by_freq": module.scale_grad_by_freq, "sparse": module.sparse}
    raise ValueError(f"cannot record a {kind} module")


def make_module(config: dict[str, Any]) -> nn.Module:
    """The module `module_config` describes (fresh parameters)."""
    kind = config["type"]
    if kind in _CONV_TYPES:
        padding = config["padding"]
        return _CONV_TYPES[kind](
            config["in"], config["out"], tuple(config["kernel"]), stride=tuple(config["stride"]),
            padding=padding if isinstance(padding, str) else tuple(padding),
            dilation=tuple(config["dilation"]), groups=config["groups"], bias=config["bias"],
            padding_mode=config["padding_mode"])
    if kind in _BN_TYPES:
        return _BN_TYPES[kind](config["features"], eps=config["eps"],
                               momentum=config["momentum"], affine=config["affine"],
                               track_running_stats=config["track"])
    if kind == "LayerNorm":
        return nn.LayerNorm(config["shape"], eps=config["eps"],
                            elementwise_affine=config["affine"], bias=config["bias"])
    if kind == "Linear":
        return nn.Linear(config["in"], config["out"], bias=config["bias"])
    if kind == "GroupNorm":
        return nn.GroupNorm(config["groups"], config["features"], eps=config["eps"],
                            affine=config["affine"])
    if kind == "PReLU":
        return nn.PReLU(config["features"])
    if kind == "Embedding":
        return nn.Embedding(config["num"], config["features"], config["padding_idx"],
                            config["max_norm"], config["norm_type"], config["scale_grad_by_freq"],
                            config["sparse"])
    raise ValueError(f"unknown module type {kind!r}")


def record(gm: GraphModule, edit: dict[str, Any]) -> None:
    gm.meta.setdefault(EDITS_KEY, []).append(edit)


def edits_of(gm: nn.Module) -> list[dict[str, Any]]:
    meta = getattr(gm, "meta", None)
    return list(meta.get(EDITS_KEY, [])) if isinstance(meta, dict) else []


def set_module(gm: GraphModule, name: str, module: nn.Module) -> None:
    """Put `module` at the dotted `name`, creating plain containers on the way."""
    parent = gm
    *path, leaf = name.split(".")
    for part in path:
        if not hasattr(parent, part):
            parent.add_module(part, nn.Module())
        parent = getattr(parent, part)
    setattr(parent, leaf, module)


def put_module(gm: GraphModule, name: str, module: nn.Module) -> None:
    """`set_module` and record it."""
    set_module(gm, name, module)
    record(gm, {"op": "module", "name": name, "config": module_config(module)})


def set_tensor(gm: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace the parameter or buffer `name` by `value`, keeping its kind."""
    owner_name, _, leaf = name.rpartition(".")
    owner = gm.get_submodule(owner_name) if owner_name else gm
    old = getattr(owner, leaf)
    if isinstance(old, nn.Parameter):
        setattr(owner, leaf, nn.Parameter(value, requires_grad=old.requires_grad))
    elif leaf in owner._buffers:
        owner._buffers[leaf] = value
    else:
        raise KeyError(f"{name} is neither a parameter nor a buffer")


def put_tensor(gm: GraphModule, name: str, value: torch.Tensor) -> None:
    """`set_tensor` and record it."""
    set_tensor(gm, name, value)
    record(gm, {"op": "tensor", "name": name, "shape": list(value.shape)})


def _node(gm: GraphModule, name: str) -> Node:
    for node in gm.graph.nodes:
        if node.name == name:
            return node
    raise KeyError(name)


def set_split(node: Node, sizes: list[int], dim: int = 1) -> None:
    """Make a split/chunk of dim `dim` cut `sizes`."""
    x = node.args[0]
    node.target = torch.split if node.op == "call_function" else "split"
    node.args = (x, list(sizes))
    node.kwargs = {"dim": dim}


def put_split(gm: GraphModule, node: Node, sizes: list[int], dim: int = 1) -> None:
    """`set_split` and record it."""
    set_split(node, sizes, dim)
    record(gm, {"op": "split", "node": node.name, "sizes": list(sizes), "dim": dim})


def set_slice(node: Node, start: int, stop: int, at: int = 1) -> None:
    """Make a channel slice `x[:, a:b]` (its slice item `at` of the index) take start:stop."""
    x, index = node.args
    items = list(index) if isinstance(index, tuple) else [index]
    items += [slice(None)] * (at + 1 - len(items))
    items[at] = slice(start, stop)
    node.args = (x, tuple(items))


def put_slice(gm: GraphModule, node: Node, start: int, stop: int, at: int = 1) -> None:
    """`set_slice` and record it."""
    set_slice(node, start, stop, at)
    record(gm, {"op": "split", "node": node.name, "slice": [start, stop], "at": at})


def set_reshape(node: Node, at: int, size: int) -> None:
    """Make the reshape `node` (`torch.reshape(x, sizes)`, `x.view(*sizes)`) request `size` at
    place `at` of its sizes."""
    sizes = reshape_sizes(node)
    changed = (*sizes[:at], size, *sizes[at + 1:])
    if node.op == "call_method":
        node.args = (node.args[0], *changed)
    else:
        node.args, node.kwargs = (node.args[0], changed), {
            k: v for k, v in node.kwargs.items() if k != "shape"}


def put_reshape(gm: GraphModule, node: Node, at: int, size: int) -> None:
    """`set_reshape` and record it."""
    set_reshape(node, at, size)
    record(gm, {"op": "reshape", "node": node.name, "at": at, "size": size})


def chain(gm: GraphModule, node: Node, names: list[str]) -> Node:
    """Replace the module call `node` by calls of `names` in sequence; return the last call."""
    current = node.args[0]
    with gm.graph.inserting_before(node):
        for name in names:
            current = gm.graph.call_module(name, (current,))
    node.replace_all_uses_with(current)
    gm.graph.erase_node(node)
    return current


def delete_module(gm: GraphModule, name: str) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    delattr(parent, leaf)


def apply_edits(gm: GraphModule, edits: list[dict[str, Any]], device: str = "cpu") -> None:
    """Replay `edits` (see the module docstring) on `gm`; records them in `gm.meta`."""
    try:
        for edit in edits:
            op = edit["op"]
            if op == "module":
                with torch.device(device):
                    set_module(gm, edit["name"], make_module(edit["config"]))
            elif op == "split":
                node = _node(gm, edit["node"])
                if "slice" in edit:
                    set_slice(node, *edit["slice"], edit.get("at", 1))
                else:
                    set_split(node, edit["sizes"], edit.get("dim", 1))
            elif op == "reshape":
                set_reshape(_node(gm, edit["node"]), edit["at"], edit["size"])
            elif op == "chain":
                chain(gm, _node(gm, edit["node"]), list(edit["modules"]))
            elif op == "delete":
                delete_module(gm, edit["name"])
            elif op == "tensor":
                old = attribute(gm, edit["name"])
                set_tensor(gm, edit["name"], torch.zeros(edit["shape"], dtype=old.dtype,
                                                         device=device))
            else:
                raise ValueError(f"unknown edit {op!r}")
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"the checkpoint's graph edits do not apply: {exc!r}") from None
    gm.graph.lint()
    gm.recompile()
    gm.meta[EDITS_KEY] = list(edits)

