"""Importers: what `archc fuse` reads, turned into a module-level torch.fx.GraphModule.

- archc checkpoint (`.pt`): `{format, version, spec, state_dict}`, loaded with `weights_only=True`
  and rebuilt from its spec.
- torch.export program (`.pt2`): the parameterized layers of its aten-level graph are *lifted*
  back to modules: `aten.conv{1,2,3}d(x, W, b, s, p, d, g)` -> `nn.ConvNd`, `aten.linear` ->
  `nn.Linear`, an affine `aten.group_norm` -> `nn.GroupNorm`, `aten.embedding(W, indices)`
  -> `nn.Embedding`; parameters keep their names.
  Functional aten ops become the torch functions a traced module calls (`ATEN_TO_TORCH`:
  `aten.add.Tensor` -> `torch.add`, ...), `aten.slice` the indexing `x[:, a:b]`,
  `aten.upsample_nearest2d.vec` and the other upsamples `F.interpolate`. aten BatchNorm
  and in-place ops are brought to the same form as a traced module's by `canonicalize`.
- a whole pickled `nn.Module` (`torch.save(model)`): unpickling runs arbitrary code, so it is read
  only with an explicit `trust_pickle=True` (`--trust-pickle`); then traced with `symbolic_trace`.
"""

from __future__ import annotations

import io
import logging
import operator
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.fx import GraphModule, Node

from archc.backends.checkpoint import CHECKPOINT_FORMAT, load_checkpoint_bytes
from archc.backends.export import load_program
from archc.errors import CheckpointError, first_line
from archc.frontend.loading import spec_from_mapping
from archc.frontend.lower import input_shape
from archc.ir.graph import attribute
from archc.ir.init import random_input
from archc.ir.ops import ATEN_TO_TORCH, CONV_MODULES
from archc.ir.shapes import node_shape, propagate_shapes

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
    module: nn.Module | None = None  # a pickled model as unpickled: its own class, not the trace


def load_model(path: str | Path, *, trust_pickle: bool = False) -> ImportedModel:
    """Read a checkpoint, a program or (trust_pickle) a pickled module; raises CheckpointError."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc}") from None
    check_file_kind(path, data)
    if path.suffix.lower() == ".pt2":
        return _load_program(data, path)
    try:
        payload = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as exc:
        if _needs_pickle(exc):
            if trust_pickle:
                return _load_pickled_module(data, path)
            raise CheckpointError(f"{path}: {PICKLE_HINT}") from None
        raise CheckpointError(f"{path}: not a loadable checkpoint ({first_line(exc)})") from None
    if isinstance(payload, dict) and payload.get("format") == CHECKPOINT_FORMAT:
        spec, gm = load_checkpoint_bytes(data, str(path))
        return ImportedModel(
            gm, spec["name"], "archc checkpoint", input_shape(spec_from_mapping(spec)), spec
        )
    if isinstance(payload, dict):
        raise CheckpointError(
            f"{path}: a bare state_dict has no architecture; save an archc checkpoint "
            f"(archc build -o model.pt), a torch.export program (.pt2) or a whole module"
        )
    raise CheckpointError(f"{path}: not an archc checkpoint (found a {type(payload).__name__})")


ACCEPTED = ("an archc checkpoint (.pt, from `archc build -o model.pt`), a torch.export program "
            "(.pt2) or a whole pickled nn.Module (.pt, with --trust-pickle)")


def check_file_kind(path: Path, data: bytes) -> None:
    """A one-line error for a file that is not something torch saved (a spec, an ONNX model,
    text): torch.save writes a zip archive (or, before torch 1.6, a pickle stream)."""
    suffix = path.suffix.lower()
    if data[:4] == b"PK\x03\x04" or data[:1] == b"\x80":
        return
    if suffix in (".yaml", ".yml", ".json"):
        kind = "a spec: build it with `archc build SPEC -o model.pt`, then fuse that"
    elif suffix == ".onnx" or data[:1] == b"\x08":
        kind = "an ONNX model: archc rewrites PyTorch models"
    else:
        kind = "not a file torch.save or torch.export wrote"
    raise CheckpointError(f"{path}: {kind}; this command reads {ACCEPTED}")


def _needs_pickle(exc: Exception) -> bool:
    text = str(exc)
    return "Unsupported global" in text or "GLOBAL" in text


def _load_pickled_module(data: bytes, path: Path) -> ImportedModel:
    """Unpickle a whole module; the classes it names are imported like a script's would be, from
    the current directory first (the user opted into running that code)."""
    sys.path.insert(0, os.getcwd())
    try:
        model = torch.load(io.BytesIO(data), weights_only=False, map_location="cpu")
    except ModuleNotFoundError as exc:
        raise CheckpointError(
            f"{path}: the pickle's classes are in module {exc.name!r}, which cannot be imported: "
            f"run archc from the directory that holds it, or add that directory to PYTHONPATH"
        ) from None
    except AttributeError as exc:
        raise CheckpointError(
            f"{path}: a class the pickle names is not in its module ({first_line(exc)}): the "
            f"module has changed since the model was saved"
        ) from None
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot unpickle ({first_line(exc)})") from None
    finally:
        sys.path.remove(os.getcwd())
    if not isinstance(model, nn.Module):
        raise CheckpointError(
            f"{path}: the pickle holds a {type(model).__name__}, not an nn.Module"
        )
    gm = trace(model.eval(), str(path))
    return ImportedModel(gm, path.stem, "pickled nn.Module", inferred_input_shape(gm),
                         module=model)


DEFAULT_SIDE = 224  # spatial size of a pickled model's example input, unless --input-shape


def first_layer(gm: GraphModule) -> tuple[str, nn.Module] | None:
    """The first conv or linear module the graph calls: it tells the input's rank and channels."""
    for node in gm.graph.nodes:
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            if isinstance(module, (*CONV_MODULES, nn.Linear)):
                return node.target, module
    return None


def inferred_input_shape(gm: GraphModule) -> tuple[int, ...] | None:
    """(1, C, 224, ...) for a model whose first layer is a conv (its channels and spatial
    rank), (1, F) for a linear one; None if there is neither."""
    found = first_layer(gm)
    if found is None:
        return None
    module = found[1]
    if isinstance(module, nn.Linear):
        return (1, module.in_features)
    return (1, module.in_channels, *([DEFAULT_SIDE] * (module.weight.ndim - 2)))


def check_example(gm: GraphModule, example: torch.Tensor, source: str) -> None:
    """One-line errors for a model of several inputs and an example input the model cannot
    take (`--input-shape`)."""
    inputs = [node.name for node in gm.graph.nodes if node.op == "placeholder"]
    if len(inputs) > 1:  # a class or timestep index beside the image (nn.Embedding)
        raise CheckpointError(f"{source}: the model takes {len(inputs)} inputs "
                              f"({', '.join(inputs)}); archc reads models of one input tensor")
    found = first_layer(gm)
    shape = "x".join(map(str, example.shape))
    if found is not None:
        name, module = found
        rank = 2 if isinstance(module, nn.Linear) else module.weight.ndim
        if example.ndim != rank:
            raise CheckpointError(
                f"{source}: --input-shape {','.join(map(str, example.shape))} has "
                f"{example.ndim} dims, but the first layer {name} ({type(module).__name__}) "
                f"takes {rank}-dimensional input")
    try:
        with torch.no_grad():
            gm(example)
    except Exception as exc:
        raise CheckpointError(
            f"{source}: the model does not run at the example input {shape} "
            f"({first_line(exc)}); give its input shape with --input-shape N,C,H,W") from None


VERIFY_SIDE = 64  # the canonical pipeline's float64 checks run at this spatial side, if smaller


def canonical_graph(gm: GraphModule, example: torch.Tensor | tuple[torch.Tensor, ...],
                    verify: bool = True) -> GraphModule:
    """A foreign model's graph in the canonical form (the `canonical` pipeline: BatchNorm modules
    for functional BN, no in-place ops or shape guards), which the channel analysis reads and in
    which an exported program's BatchNorms train as modules, under the source model's names, with
    the shapes of `example` recorded.

    `verify` (`--no-verify` turns it off): the pipeline checks its passes in float64, at one
    sample of VERIFY_SIDE x VERIFY_SIDE where the example is larger and the graph runs at that
    size (float64 convolutions have no fast CPU kernels: at 224x224 these checks were a third of
    pruning a ResNet-50), else at the example. A model of several inputs (an image and its class
    labels) takes a tuple, one example per input, and is checked at them."""
    import archc.passes  # noqa: F401 - registers the catalogue
    from archc.rewrite.pipeline import PassContext, pipelines, run_pipeline

    def canonical(inputs: torch.Tensor | tuple[torch.Tensor, ...]) -> GraphModule:
        context = PassContext(example_inputs=inputs if isinstance(inputs, tuple) else (inputs,),
                              verify=verify)
        return run_pipeline(gm, list(pipelines()["canonical"]), context).graph_module

    checked = _verification_input(gm, example) if verify and not isinstance(example, tuple) \
        else None
    if checked is None:
        result = canonical(example)
    else:
        result = canonical(checked)
        at_small = {node.name: node_shape(node) for node in result.graph.nodes}
        if not propagate_shapes(result, (example,)):
            raise CheckpointError(f"the canonical graph does not run at the example input "
                                  f"{'x'.join(map(str, example.shape))}")
        if _maps_shrunk(result, at_small):
            result = canonical(example)
    _drop_unread_tensors(result)
    _restore_norm_names(result)
    return result


def _verification_input(gm: GraphModule, example: torch.Tensor) -> torch.Tensor | None:
    """One random sample of VERIFY_SIDE x VERIFY_SIDE, if the example is an image batch larger
    than that and `gm` runs at it (a graph with sizes fixed at the example's does not); else
    None."""
    if example.ndim != 4 or max(example.shape[2:]) <= VERIFY_SIDE:
        return None
    small = random_input((1, example.shape[1], VERIFY_SIDE, VERIFY_SIDE), 0, example.dtype)
    try:
        with torch.no_grad():
            gm(small)
    except Exception:  # sizes baked in (a flatten into a fixed Linear, a reshape): the example
        return None
    return small


def _maps_shrunk(gm: GraphModule, at_small: dict[str, tuple[int, ...] | None]) -> bool:
    """Whether a feature map larger than 1x1 at the recorded (example) shapes was below 2x2 at
    the small input: on such a map a 3x3 kernel's off-centre taps read only padding, so a
    rewrite that misplaced them would pass (`archc.rewrite.pipeline` says the same); the checks
    are then made at the example."""
    for node in gm.graph.nodes:
        full, small = node_shape(node), at_small.get(node.name)
        if small is not None and full is not None and len(small) == len(full) == 4 and any(
                f > 1 and s < 2 for f, s in zip(full[2:], small[2:])):
            return True
    return False


def _drop_unread_tensors(gm) -> None:
    """Delete the parameters and buffers no node reads: canonicalisation leaves the lifted
    BatchNorm tensors on their old owner beside the new module that shares them, and a copy made
    by `.to(device)` would then drift from the one in use."""
    read = {node.target for node in gm.graph.nodes if node.op == "get_attr"}
    called = {node.target for node in gm.graph.nodes if node.op == "call_module"}
    names = [name for name, _ in gm.named_parameters(remove_duplicate=False)]
    names += [name for name, _ in gm.named_buffers(remove_duplicate=False)]
    for name in names:
        owner = name.rpartition(".")[0]
        if name in read or any(owner == c or owner.startswith(c + ".") for c in called):
            continue
        delattr(gm.get_submodule(owner) if owner else gm, name.rpartition(".")[2])
    gm.delete_all_unused_submodules()


def _restore_norm_names(gm) -> None:
    """`bn1.norm` -> `bn1`: canonicalisation puts the BatchNorm it makes beside the lifted
    tensors' owner (`bn1`), which is left empty; the module takes the owner's place, so the
    parameters keep the source model's names (`bn1.weight`) and a program written back and read
    again has the same names."""
    for node in gm.graph.nodes:
        if node.op != "call_module" or not node.target.endswith(".norm"):
            continue
        owner = node.target.rpartition(".")[0]
        holder = gm.get_submodule(owner)
        if type(holder) is not nn.Module or list(holder.named_children()) != [
                ("norm", gm.get_submodule(node.target))] or next(
                holder.named_parameters(recurse=False), None) or next(
                holder.named_buffers(recurse=False), None):
            continue
        parent, _, name = owner.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, name, holder.norm)
        node.target = owner
    gm.recompile()


def trace(model: nn.Module, source: str) -> GraphModule:
    """symbolic_trace a foreign model, with a one-line error if FX cannot trace it."""
    if isinstance(model, GraphModule):
        return model
    try:
        return torch.fx.symbolic_trace(model)
    except Exception as exc:
        raise CheckpointError(
            f"{source}: torch.fx cannot trace this model ({first_line(exc)}); "
            f"export it with torch.export and pass the .pt2 instead"
        ) from None


def _load_program(data: bytes, path: Path) -> ImportedModel:
    # torch.export.load logs the traceback of a failed load as a warning before raising; the
    # error below says it in one line, so its logger is silenced for the load only
    logger = logging.getLogger("torch.export")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        program = load_program(io.BytesIO(data))
    except Exception as exc:
        raise CheckpointError(
            f"{path}: not a loadable torch.export program ({first_line(exc)})"
        ) from None
    finally:
        logger.setLevel(level)
    shape = None
    example = getattr(program, "example_inputs", None)
    if example and example[0] and isinstance(example[0][0], torch.Tensor):
        shape = tuple(example[0][0].shape)
    try:
        gm = lift_aten_graph(program.module())
    except Exception as exc:
        raise CheckpointError(
            f"{path}: cannot import the program's graph ({first_line(exc)})"
        ) from None
    return ImportedModel(gm, path.stem, "torch.export program", shape)


_CONVS = {  # the aten conv overloads a lifted program calls -> the module each becomes
    torch.ops.aten.conv1d.default: nn.Conv1d,
    torch.ops.aten.conv2d.default: nn.Conv2d,
    torch.ops.aten.conv3d.default: nn.Conv3d,
}
# aten overloads whose positional arguments a torch function or operator takes as they are:
# a lifted program calls what a traced module would, so one set of rules reads both.
_ATEN = torch.ops.aten


def lift_aten_graph(exported: nn.Module) -> GraphModule:
    """Turn an unlifted torch.export module (aten ops on get_attr parameters) into a module-level
    GraphModule: convs and linears become modules; see the module docstring."""
    root: dict[str, object] = {}
    graph = exported.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
        elif node.op == "call_function" and node.target in _CONVS:
            _lift(node, _conv_module(exported, node), root, graph)
        elif node.op == "call_function" and node.target in ATEN_TO_TORCH:
            node.target = ATEN_TO_TORCH[node.target]
        elif node.op == "call_function" and node.target == torch.ops.aten.slice.Tensor:
            _as_indexing(node)
        elif node.op == "call_function" and node.target in _UPSAMPLES:
            _as_interpolate(node)
        elif node.op == "call_function" and node.target == torch.ops.aten.linear.default:
            weight, bias = _attr(exported, node.args[1]), _attr(exported, _arg(node, 2))
            module = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
            _assign(module, weight=weight, bias=bias)
            _lift(node, module, root, graph)
        elif node.op == "call_function" and node.target == torch.ops.aten.embedding.default \
                and isinstance(node.args[0], Node) and node.args[0].op == "get_attr":
            weight = _attr(exported, node.args[0])  # (weight, indices, padding_idx, ...)
            padding = _arg(node, 2)
            module = nn.Embedding(*weight.shape, None if padding in (None, -1) else padding)
            _assign(module, weight=weight)
            _lift(node, module, root, graph, node.args[0], node.args[1])
        elif node.op == "call_function" and node.target == torch.ops.aten.group_norm.default \
                and isinstance(_arg(node, 2), Node) and isinstance(_arg(node, 3), Node):
            weight, bias = _attr(exported, node.args[2]), _attr(exported, node.args[3])
            module = nn.GroupNorm(node.args[1], weight.shape[0],
                                  1e-5 if _arg(node, 4) is None else node.args[4])
            _assign(module, weight=weight, bias=bias)
            _lift(node, module, root, graph, node.args[2])
    for node in graph.nodes:
        if node.op == "get_attr" and node.users and node.target not in root:
            root[node.target] = _attr(exported, node)
    graph.eliminate_dead_code()
    _plain_signature(graph)
    gm = GraphModule(root, graph)
    gm.graph.lint()
    return gm.eval()


# aten.upsample_*.vec overloads -> the `F.interpolate` mode that decomposes to each; the linear
# modes take align_corners before the scales
_UPSAMPLES = {
    **{getattr(_ATEN, f"upsample_nearest{n}d").vec: "nearest" for n in (1, 2, 3)},
    **{getattr(_ATEN, f"_upsample_nearest_exact{n}d").vec: "nearest-exact" for n in (1, 2, 3)},
    _ATEN.upsample_linear1d.vec: "linear", _ATEN.upsample_bilinear2d.vec: "bilinear",
    _ATEN.upsample_trilinear3d.vec: "trilinear", _ATEN.upsample_bicubic2d.vec: "bicubic",
}


def _as_interpolate(node: Node) -> None:
    """`aten.upsample_bilinear2d.vec(x, size, align_corners, scales)` (nearest: no
    align_corners) -> `F.interpolate(x, size, scales, mode, align_corners)`, as traced code
    calls it."""
    mode = _UPSAMPLES[node.target]
    if mode.startswith("nearest"):
        (x, size, scales), align_corners = node.args[:3], None
    else:
        x, size, align_corners, scales = node.args[:4]
    node.target = torch.nn.functional.interpolate
    node.args = (x,)
    node.kwargs = {"size": size, "scale_factor": scales, "mode": mode,
                   "align_corners": align_corners}


def _as_indexing(node: Node) -> None:
    """`aten.slice(x, d, a, b, s)` -> `x[:, ..., a:b:s]` (the slice on dim d), as traced code
    writes it."""
    x, dim, start, end, step = (list(node.args) + [0, None, None, 1][len(node.args) - 1:])[:5]
    node.target = operator.getitem
    node.args = (x, (*[slice(None)] * dim, slice(start, end, step)))


def _plain_signature(graph) -> None:
    """Drop torch.export's pytree calling convention: `forward(x)` returning one tensor."""
    graph._codegen = torch.fx.graph.CodeGen()
    output = next(node for node in graph.nodes if node.op == "output")
    result = output.args[0]
    if isinstance(result, (tuple, list)) and len(result) == 1:
        output.args = (result[0],)


def _lift(node: Node, module: nn.Module, root: dict, graph, weight: Node | None = None,
          x: Node | None = None) -> None:
    """Replace `node` by a call of `module` on `x` (the call's first argument unless given),
    named after its weight's owner (`s1.conv.weight` -> `s1.conv`; the weight is the call's
    second argument unless given). A weight used by several calls keeps one shared module, as in
    the source model."""
    target = str((weight or node.args[1]).target)
    name = target.rsplit(".", 1)[0] if "." in target else f"{target}_module"
    root.setdefault(name, module)
    with graph.inserting_after(node):
        replacement = graph.call_module(name, (node.args[0] if x is None else x,))
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
    return attribute(module, str(node.target))
