"""Importers: what `archc fuse` reads, turned into a module-level torch.fx.GraphModule.

- archc checkpoint (`.pt`): `{format, version, spec, state_dict}`, loaded with `weights_only=True`
  and rebuilt from its spec.
- torch.export program (`.pt2`): its aten-level graph is *lifted* back to module level, so the
  same structural rules match it as match a traced nn.Module:
  `aten.conv{1,2,3}d(x, W, b, s, p, d, g)` -> `nn.ConvNd`, `aten.batch_norm(x, γ, β, μ, σ², False,
  m, ε)` -> `nn.BatchNormNd`, `aten.linear` -> `nn.Linear`, `aten.add.Tensor` / `aten.mul.Tensor`
  -> `operator.add` / `operator.mul`, `aten.relu` -> `torch.relu`. Parameters keep their names.
- a whole pickled `nn.Module` (`torch.save(model)`): unpickling runs arbitrary code, so it is read
  only with an explicit `trust_pickle=True` (`--trust-pickle`); then traced with `symbolic_trace`.
"""

from __future__ import annotations

import io
import operator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.fx import GraphModule, Node

from archc.errors import CheckpointError
from archc.export import CHECKPOINT_FORMAT, load_checkpoint_bytes

PICKLE_HINT = (
    "it holds pickled Python objects (a whole nn.Module?); unpickling runs arbitrary code, "
    "so archc reads it only with --trust-pickle, if you trust where it came from"
)


@dataclass
class ImportedModel:
    graph_module: GraphModule
    name: str
    kind: str  # "archc checkpoint", "torch.export program", "pickled nn.Module"
    input_shape: tuple[int, ...] | None  # from the spec or the program's example inputs
    spec: dict | None = None


def load_model(path: str | Path, *, trust_pickle: bool = False) -> ImportedModel:
    """Read a checkpoint, a program or (trust_pickle) a pickled module; raises CheckpointError."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if path.suffix.lower() == ".pt2":
        return _load_program(data, path)
    try:
        payload = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as exc:
        if _needs_pickle(exc):
            if trust_pickle:
                return _load_pickled_module(data, path)
            raise CheckpointError(f"{path}: {PICKLE_HINT}") from None
        raise CheckpointError(f"{path}: not a loadable checkpoint ({_first_line(exc)})") from None
    if isinstance(payload, dict) and payload.get("format") == CHECKPOINT_FORMAT:
        spec, gm = load_checkpoint_bytes(data, str(path))
        from archc.lower import input_shape
        from archc.spec import spec_from_mapping

        return ImportedModel(
            gm, spec["name"], "archc checkpoint", input_shape(spec_from_mapping(spec)), spec
        )
    if isinstance(payload, dict):
        raise CheckpointError(
            f"{path}: a bare state_dict has no architecture; save an archc checkpoint "
            f"(archc build -o model.pt), a torch.export program (.pt2) or a whole module"
        )
    raise CheckpointError(f"{path}: not an archc checkpoint (found a {type(payload).__name__})")


def _needs_pickle(exc: Exception) -> bool:
    text = str(exc)
    return "Unsupported global" in text or "GLOBAL" in text


def _load_pickled_module(data: bytes, path: Path) -> ImportedModel:
    try:
        model = torch.load(io.BytesIO(data), weights_only=False, map_location="cpu")
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot unpickle ({_first_line(exc)})") from None
    if not isinstance(model, nn.Module):
        raise CheckpointError(
            f"{path}: the pickle holds a {type(model).__name__}, not an nn.Module"
        )
    return ImportedModel(trace(model, str(path)), path.stem, "pickled nn.Module", None)


def trace(model: nn.Module, source: str) -> GraphModule:
    """symbolic_trace a foreign model, with a one-line error if FX cannot trace it."""
    if isinstance(model, GraphModule):
        return model
    try:
        return torch.fx.symbolic_trace(model)
    except Exception as exc:
        raise CheckpointError(
            f"{source}: torch.fx cannot trace this model ({_first_line(exc)}); "
            f"export it with torch.export and pass the .pt2 instead"
        ) from None


def _load_program(data: bytes, path: Path) -> ImportedModel:
    try:
        program = torch.export.load(io.BytesIO(data))
    except Exception as exc:
        raise CheckpointError(
            f"{path}: not a loadable torch.export program ({_first_line(exc)})"
        ) from None
    shape = None
    example = getattr(program, "example_inputs", None)
    if example and example[0] and isinstance(example[0][0], torch.Tensor):
        shape = tuple(example[0][0].shape)
    try:
        gm = lift_aten_graph(program.module())
    except Exception as exc:
        raise CheckpointError(
            f"{path}: cannot import the program's graph ({_first_line(exc)})"
        ) from None
    return ImportedModel(gm, path.stem, "torch.export program", shape)


_CONVS = {
    torch.ops.aten.conv1d.default: nn.Conv1d,
    torch.ops.aten.conv2d.default: nn.Conv2d,
    torch.ops.aten.conv3d.default: nn.Conv3d,
}
_BATCH_NORMS = {3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
_FUNCTIONS = {
    torch.ops.aten.relu.default: torch.relu,
    torch.ops.aten.add.Tensor: operator.add,
    torch.ops.aten.mul.Tensor: operator.mul,
}


def lift_aten_graph(exported: nn.Module) -> GraphModule:
    """Turn an unlifted torch.export module (aten ops on get_attr parameters) into a module-level
    GraphModule: convs, batch norms and linears become modules; see the module docstring."""
    root: dict[str, object] = {}
    graph = exported.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
        elif node.op == "call_function" and node.target in _CONVS:
            _lift(node, _conv_module(exported, node), root, graph)
        elif node.op == "call_function" and node.target == torch.ops.aten.batch_norm.default:
            module = _batch_norm_module(exported, node)
            if module is not None:
                _lift(node, module, root, graph)
        elif node.op == "call_function" and node.target == torch.ops.aten.linear.default:
            weight, bias = _attr(exported, node.args[1]), _attr(exported, _arg(node, 2))
            module = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
            _assign(module, weight=weight, bias=bias)
            _lift(node, module, root, graph)
        elif node.op == "call_function" and node.target in _FUNCTIONS:
            if node.target == torch.ops.aten.add.Tensor and node.kwargs.get("alpha", 1) != 1:
                continue
            node.target = _FUNCTIONS[node.target]
    for node in graph.nodes:
        if node.op == "get_attr" and node.users and node.target not in root:
            root[node.target] = _attr(exported, node)
    graph.eliminate_dead_code()
    _plain_signature(graph)
    gm = GraphModule(root, graph)
    gm.graph.lint()
    return gm.eval()


def _plain_signature(graph) -> None:
    """Drop torch.export's pytree calling convention: `forward(x)` returning one tensor."""
    graph._codegen = torch.fx.graph.CodeGen()
    output = next(node for node in graph.nodes if node.op == "output")
    result = output.args[0]
    if isinstance(result, (tuple, list)) and len(result) == 1:
        output.args = (result[0],)


def _lift(node: Node, module: nn.Module, root: dict, graph) -> None:
    """Replace `node` by a call of `module`, named after its weight's owner (`s1.conv.weight` ->
    `s1.conv`). A weight used by several calls keeps one shared module, as in the source model."""
    target = str(node.args[1].target)
    name = target.rsplit(".", 1)[0] if "." in target else f"{target}_module"
    root.setdefault(name, module)
    with graph.inserting_after(node):
        replacement = graph.call_module(name, (node.args[0],))
    replacement.meta = dict(node.meta)
    node.replace_all_uses_with(replacement)
    graph.erase_node(node)


def _conv_module(exported: nn.Module, node: Node) -> nn.Module:
    weight, bias = _attr(exported, node.args[1]), _attr(exported, _arg(node, 2))
    stride, padding, dilation, groups = (
        default if _arg(node, index) is None else _arg(node, index)
        for index, default in ((3, 1), (4, 0), (5, 1), (6, 1))
    )
    if isinstance(padding, str):
        raise ValueError(f"string padding {padding!r} is not supported")
    module = _CONVS[node.target](
        weight.shape[1] * groups,
        weight.shape[0],
        tuple(weight.shape[2:]),
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=bias is not None,
    )
    _assign(module, weight=weight, bias=bias)
    return module


def _batch_norm_module(exported: nn.Module, node: Node) -> nn.Module | None:
    _, weight, bias, mean, var, training, momentum, eps = (list(node.args) + [None] * 9)[:8]
    if training or mean is None or var is None:
        return None  # batch statistics: not a module-level eval BN, leave it as it is
    mean_t = _attr(exported, mean)
    rank = len(node.meta["val"].shape) if "val" in node.meta else 4
    module = _BATCH_NORMS[rank](
        mean_t.shape[0], eps=eps, momentum=momentum, affine=weight is not None
    )
    _assign(module, weight=_attr(exported, weight), bias=_attr(exported, bias))
    module.running_mean.copy_(mean_t)
    module.running_var.copy_(_attr(exported, var))
    return module


def _assign(module: nn.Module, **tensors) -> None:
    for name, tensor in tensors.items():
        if tensor is not None:
            setattr(module, name, nn.Parameter(tensor.detach().clone()))


def _arg(node: Node, index: int):
    return node.args[index] if len(node.args) > index else None


def _attr(module: nn.Module, node: Node | None):
    if node is None:
        return None
    if not isinstance(node, Node) or node.op != "get_attr":
        raise ValueError(f"expected a parameter, got {node}")
    value = module
    for part in str(node.target).split("."):
        value = getattr(value, part)
    return value


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160]}" if text else type(exc).__name__
