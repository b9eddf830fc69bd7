"""Graph helpers shared by the rewrite engine, the passes and the analyses: one home for each.

- Reading calls: `describe` (a node's readable name), `arg` / `set_arg` (an argument given by
  position or keyword), `bind` (a call's arguments by parameter name, with defaults).
- Attributes: `attribute` / `has_attribute` (dotted paths such as `s1.b1.conv.weight`),
  `unique_name` (a fresh dotted name for a new module or constant), `set_weights`.
- Uses: `module_uses`, `called_once`, `has_other_users`, `unique_user`.
- Copying: `copy_module` (a structural copy sharing the tensors, or with them in another dtype).
- Erasing: `bypass` (route users to a replacement, erase), `replace_with_value` (users get a
  Python constant instead), `erase_unused` (erase nodes once unused and what they alone kept
  alive), `delete_module_if_unused`, `is_erased`.
- What a node computes (`archc.ir.ops` names it: `op_kind`): `writes_in_place`, `is_pure`, and the
  one table of pure ops
  (`PURE_FUNCTIONS`, `PURE_METHODS`): functions of their arguments only, no mutation, no
  randomness, so a call on constants may be evaluated once.

torch.fx marks an erased node with a private flag; `is_erased` is the only place that reads it.
"""

from __future__ import annotations

import copy
import inspect
import operator
from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg

# Pure ops, by target: call_function callables and call_method names.
PURE_FUNCTIONS = frozenset({
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg,
    torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.sqrt, torch.rsqrt,
    torch.reciprocal, torch.exp, torch.abs, torch.reshape, torch.flatten, torch.transpose,
    torch.permute, torch.t, torch.unsqueeze, torch.squeeze, torch.cat,
})
PURE_METHODS = frozenset({
    "add", "sub", "mul", "div", "neg", "sqrt", "rsqrt", "reciprocal", "exp", "abs", "reshape",
    "view", "flatten", "transpose", "permute", "t", "unsqueeze", "squeeze", "contiguous",
    "detach",
})

# Python's augmented assignments as functions: they write their first operand.
_IN_PLACE_OPERATORS = frozenset({
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
    operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift,
    operator.irshift, operator.imatmul,
})


def describe(node: Node) -> str:
    """A module's qualified name for call_module nodes, else the node's name."""
    return str(node.target) if node.op == "call_module" else node.name


def arg(node: Node, position: int, keyword: str, default=None):
    """A call's argument given positionally or by keyword."""
    if len(node.args) > position:
        return node.args[position]
    return node.kwargs.get(keyword, default)


def set_arg(node: Node, position: int, keyword: str, value) -> None:
    """Set a call's argument where it is given (positionally or by keyword), else by keyword."""
    if len(node.args) > position:
        node.update_arg(position, value)
    else:
        node.update_kwarg(keyword, value)


def bind(node: Node, params: tuple[tuple[str, object], ...]) -> dict[str, object] | None:
    """A call's arguments by parameter name, defaults filled in, for the signature `params`
    ((name, default), ...); None if the call does not fit it."""
    names = [name for name, _ in params]
    if len(node.args) > len(names) or any(key not in names for key in node.kwargs):
        return None
    bound = dict(params)
    bound.update(zip(names, node.args))
    bound.update(node.kwargs)
    return bound


def attribute(root: nn.Module, dotted: str):
    """`root.a.b.c` for `dotted = "a.b.c"`."""
    return operator.attrgetter(dotted)(root)


def has_attribute(root: nn.Module, dotted: str) -> bool:
    try:
        attribute(root, dotted)
    except AttributeError:
        return False
    return True


def unique_name(gm: GraphModule, base: str) -> str:
    """`base`, or `base_1`, `base_2`, ...: the first that names nothing in `gm` yet."""
    name, index = base, 0
    while has_attribute(gm, name):
        index += 1
        name = f"{base}_{index}"
    return name


def set_weights(module: nn.Module, weight: Tensor, bias: Tensor | None) -> None:
    """Replace `module.weight` (and `.bias`) by new parameters in the old weight's dtype.

    New Parameter objects, never in-place writes: a tensor shared with another module, or with
    the caller's model (the pipeline's working copy shares tensors), keeps its value.
    """
    like = module.weight
    module.weight = nn.Parameter(weight.detach().to(like), requires_grad=like.requires_grad)
    if bias is not None:
        module.bias = nn.Parameter(bias.detach().to(like), requires_grad=like.requires_grad)


def copy_module(module: nn.Module, dtype: torch.dtype | None = None,
                device: str | torch.device | None = None) -> nn.Module:
    """A copy of `module`'s structure (submodules, graph, attributes). Its tensors are the
    module's own (shared, so nothing may write them in place), or new ones: floating tensors in
    `dtype`, and every tensor on `device` (`"meta"`: shape-only stand-ins, no data copied)."""
    memo: dict[int, object] = {}
    for sub in module.modules():
        tensors = [*sub._parameters.values(), *sub._buffers.values(),
                   *(v for v in vars(sub).values() if isinstance(v, Tensor))]
        for tensor in tensors:
            if tensor is None or id(tensor) in memo:
                continue
            converted = tensor
            if dtype is not None and tensor.is_floating_point():
                converted = converted.detach().to(dtype, copy=True)
            if device is not None:
                converted = converted.detach().to(device)
            if converted is not tensor and isinstance(tensor, nn.Parameter):
                converted = nn.Parameter(converted, requires_grad=tensor.requires_grad)
            memo[id(tensor)] = converted
    return copy.deepcopy(module, memo)


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating parameter or buffer (float32 if none)."""
    tensors = [*model.parameters(), *model.buffers()]
    return next((t.dtype for t in tensors if t.is_floating_point()), torch.float32)


SOURCE_DTYPE = "archc_source_dtype"  # GraphModule.meta key: the dtype of the model passes work on


def source_dtype(gm: GraphModule) -> torch.dtype:
    """The dtype of the model the graph came from: its own, or, for a float64 working copy,
    the one the pipeline recorded (its constants were computed, and round, in that dtype)."""
    return gm.meta.get(SOURCE_DTYPE) or model_dtype(gm)


ALIASES = "archc_aliases"  # GraphModule.meta key: the rewrite engine's map of module aliases


def module_uses(gm: GraphModule, target: str) -> int:
    """How often the graph uses the module registered as `target`: calls under any of its names
    plus `get_attr` reads of its parameters or buffers. Rewrites never register a module twice,
    so the rewrite engine computes the aliases once per sweep (`ALIASES`); elsewhere they are
    found here."""
    module = gm.get_submodule(target)
    aliases = gm.meta.get(ALIASES)
    names = (aliases if aliases is not None else module_aliases(gm)).get(id(module), {target})
    calls = sum(1 for node in gm.graph.find_nodes(op="call_module") if node.target in names)
    reads = sum(1 for node in gm.graph.find_nodes(op="get_attr")
                if node.target.rpartition(".")[0] in names)
    return calls + reads


def module_aliases(gm: GraphModule) -> dict[int, set[str]]:
    """id(module) -> its names, for every module registered under more than one name."""
    names: dict[int, set[str]] = {}
    for name, module in gm.named_modules(remove_duplicate=False):
        names.setdefault(id(module), set()).add(name)
    return {key: value for key, value in names.items() if len(value) > 1}


def called_once(gm: GraphModule, node: Node) -> bool:
    """Whether the module of call_module `node` is used by this node only."""
    return module_uses(gm, node.target) == 1


def unique_user(node: Node) -> Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def has_other_users(node: Node, user: Node) -> bool:
    """Whether the tensor `node` is read by anything besides `user` (the graph output counts)."""
    return any(other is not user for other in node.users)


def is_erased(node: Node) -> bool:
    """Whether `node` was erased from its graph (by an earlier rewrite of the same sweep)."""
    return getattr(node, "_erased", False)


def bypass(gm: GraphModule, node: Node, replacement: Node) -> None:
    """Send the users of `node` to `replacement`, erase `node` and delete its module if unused."""
    node.replace_all_uses_with(replacement)
    erase_unused(gm, [node], cascade=False)


def replace_with_value(gm: GraphModule, node: Node, value) -> None:
    """Give every user of `node` the Python constant `value` in its place, then erase `node`
    (and what only it read)."""
    for user in list(node.users):
        user.args, user.kwargs = map_arg((user.args, user.kwargs),
                                         lambda n: value if n is node else n)
    erase_unused(gm, [node])


def erase_unused(gm: GraphModule, nodes: Iterable[Node], cascade: bool = True) -> list[Node]:
    """Erase each of `nodes` once nothing reads it; with `cascade`, then the inputs that only they
    read, if pure (constants, size arithmetic, reshapes: no writes, no randomness). Modules and
    root attributes no node uses any more are deleted. Returns the erased nodes."""
    pending = list(nodes)
    erased: list[Node] = []
    while pending:
        node = pending.pop(0)
        if node.users or is_erased(node) or node.op in ("placeholder", "output"):
            continue
        inputs = node.all_input_nodes
        gm.graph.erase_node(node)
        erased.append(node)
        if cascade:
            pending += [n for n in inputs if is_pure(gm, n)]
    for node in erased:
        if node.op == "call_module":
            delete_module_if_unused(gm, node.target)
        elif node.op == "get_attr" and "." in node.target:
            delete_module_if_unused(gm, node.target.rpartition(".")[0])
    return erased


def delete_module_if_unused(gm: GraphModule, target: str) -> None:
    """Delete submodule `target` unless the graph still uses it or one of its submodules (or it
    is already gone)."""
    try:
        gm.get_submodule(target)
    except AttributeError:
        return
    inside = f"{target}."
    nested = any(node.op in ("call_module", "get_attr") and node.target.startswith(inside)
                 for node in gm.graph.nodes)
    if not nested and not module_uses(gm, target):
        gm.delete_submodule(target)


def is_pure(gm: GraphModule, node: Node) -> bool:
    """A node whose only effect is its result: a constant read, a pure op, or a module call that
    neither writes in place nor is impure in torch.fx's sense."""
    if node.op == "get_attr":
        return True
    if node.op not in ("call_function", "call_method", "call_module"):
        return False
    return not node.is_impure() and not writes_in_place(gm, node)


def writes_in_place(gm: GraphModule, node: Node) -> bool:
    """Whether `node` writes into a tensor it is given: `x.add_(y)`, `operator.iadd(x, y)` (what
    `x += y` calls), `torch.add(x, y, out=z)`, `F.relu(x, inplace=True)` or `F.relu(x, True)`,
    a module with `inplace=True`, an aten overload whose schema mutates an argument
    (`aten.add_.Tensor`, `aten.add.out`)."""
    if node.op == "call_module":
        return bool(getattr(gm.get_submodule(node.target), "inplace", False))
    if node.op == "call_method":
        return _trailing_underscore(node.target)
    if node.op != "call_function":
        return False
    target = node.target
    schema = getattr(target, "_schema", None)
    if schema is not None:
        return bool(schema.is_mutable)
    if target in _IN_PLACE_OPERATORS or node.kwargs.get("out") is not None:
        return True
    if _trailing_underscore(getattr(target, "__name__", "")):
        return True
    if node.kwargs.get("inplace") is True:
        return True
    try:  # F.relu(x, True): find `inplace` among positional arguments too
        bound = inspect.signature(target).bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):  # builtins without a signature, or arguments that do not fit
        return False
    return bound.arguments.get("inplace") is True


def _trailing_underscore(name: str) -> bool:
    return name.endswith("_") and not name.endswith("__")
