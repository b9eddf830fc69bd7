"""Shapes and dtypes of every node: one propagation on meta tensors, kept current by rewrites.

`propagate_shapes(gm, inputs)` runs the graph once on the meta device: every parameter, buffer and
constant is replaced, for that run only, by a meta tensor of the same shape and dtype (no data,
no arithmetic, no copy of the weights), and the inputs by meta tensors of their shapes. A small
model in eval mode at a small input is run for real instead (meta kernels are Python; a real run of
such a model is several times faster) and the meta stand-ins of its values are kept. Each node
records

- `meta["archc_value"]`: its value on meta (a tensor, a tuple of them, or a Python value such as
  the int of `x.size(1)`), from which the values of new nodes are computed;
- `meta["tensor_meta"]`: torch.fx's `TensorMetadata` (shape, dtype, stride, ...) of tensor results,
  as `torch.fx.passes.shape_prop.ShapeProp` records it.

A graph that cannot run on meta (it builds a CPU tensor mid-forward and mixes it in) is propagated
under a `FakeTensorMode` instead, which costs more but accepts such mixes.

A function-preserving rewrite keeps the shape of every node it leaves in the graph and gives the
nodes it creates the shapes of the values they replace, so only new nodes need values:
`refresh_shapes(gm)` computes them from their inputs' values (the rewrite engine calls it after
every rewrite). A pass that changes shapes (channel padding) propagates again.

The three runs (real, meta, fake) are one `Recorder`: an interpreter that keeps what it is told
of each node's result (`stand_in`: meta stand-ins; the ONNX translation keeps shapes and dtypes).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.fx import GraphModule, Node
from torch.fx.node import map_aggregate, map_arg
from torch.fx.passes.shape_prop import _extract_tensor_metadata
from torch.utils._pytree import tree_leaves

from archc.ir.graph import attribute, copy_module

VALUE = "archc_value"


def propagate_shapes(gm: GraphModule, inputs: Sequence[Tensor | torch.Size | tuple] | None
                     ) -> bool:
    """Record shapes and dtypes of every node for these example inputs (tensors, shapes of float
    tensors in the model's dtype, or plain Python values); False (and nothing recorded) without
    inputs or if the graph cannot run on meta or fake tensors."""
    if inputs is None:
        return False
    dtype = _model_dtype(gm)
    values = [_meta_like(x, dtype) for x in inputs]
    _forget_all(gm)
    if _cheap_to_run(gm, values):
        try:
            _record_run(Recorder(gm, keep=stand_in), *[_real_like(x, dtype) for x in inputs])
            return True
        except Exception:  # an op that fails for real fails on meta too, or needs fake tensors
            pass
    try:
        _record_run(Recorder(gm, runs=copy_module(gm, device="meta")), *values)
        return True
    except Exception:  # any op may refuse meta tensors: try fake tensors
        return _propagate_fake(gm, values)


REAL_RUN_INPUT_ELEMENTS = 2 * 3 * 256 * 256  # up to this input size, a real run is the cheaper
# ... for models up to this size. The first meta run in a process imports ~800 modules (~1 s);
# measured at 224x224 on 2 cores: real runs of AlexNet (61M params) 0.04 s, RegNetY-16GF (84M)
# 0.6 s, RegNetY-32GF (145M) 0.9 s, a warm meta run of the last 0.15 s
REAL_RUN_PARAMETERS = 100_000_000


def _cheap_to_run(gm: GraphModule, values: list) -> bool:
    """Whether to record shapes from one real run instead of a meta run: meta kernels are
    Python (and their first use imports much of torch's compiler stack), so running a small
    model for real at a small input is several times faster. Only for models whose every tensor
    holds data, in eval mode, and with no in-place write into a stored tensor (so a run changes no
    state; writes into the run's own activations and into the copied inputs are harmless)."""
    from archc.ir.graph import writes_in_place

    tensors = [*gm.parameters(), *gm.buffers()]
    if any(t.device.type != "cpu" for t in tensors) or any(m.training for m in gm.modules()):
        return False
    if sum(t.numel() for t in tensors) > REAL_RUN_PARAMETERS:
        return False
    elements = sum(v.numel() for v in values if isinstance(v, Tensor))
    if elements > REAL_RUN_INPUT_ELEMENTS:
        return False
    return not any(writes_in_place(gm, node) and node.args and isinstance(node.args[0], Node)
                   and node.args[0].op == "get_attr" for node in gm.graph.nodes)


def _real_like(value, dtype: torch.dtype):
    """A real stand-in for an example input: a copy of a tensor, zeros of a shape."""
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, (tuple, list, torch.Size)):
        return torch.zeros(tuple(value), dtype=dtype)
    return value


def _forget_all(gm: GraphModule) -> None:
    for node in gm.graph.nodes:
        node.meta.pop(VALUE, None)
        node.meta.pop("tensor_meta", None)


def refresh_shapes(gm: GraphModule) -> None:
    """Give every node without a value one computed from its inputs' values (nodes created by a
    rewrite); nodes whose inputs have none, or whose op fails, stay unknown. A node whose inputs
    are small is evaluated for real on zeros of their shapes, as a small model is propagated:
    a process's first meta evaluation imports much of torch's compiler stack (a meta Linear with
    a bias, or a BatchNorm, imports torch._dynamo: 1-1.3 s), where a real one costs microseconds."""
    for node in gm.graph.nodes:
        if VALUE in node.meta or node.op == "placeholder":
            continue
        if any(VALUE not in n.meta for n in node.all_input_nodes):
            continue
        try:
            _record(node, _evaluate(gm, node))
        except Exception:  # unknown stays unknown: rules refuse on it
            continue


def cast_shapes(gm: GraphModule, dtype: torch.dtype) -> bool:
    """After casting a graph's floating tensors to `dtype`: the recorded floating values take that
    dtype (the shapes are the cast's). False, and nothing changed, if a node has no value."""
    if not has_shapes(gm):
        return False
    for node in gm.graph.nodes:
        _record(node, map_aggregate(node.meta[VALUE], lambda v: v.to(dtype) if isinstance(
            v, Tensor) and v.is_floating_point() else v))
    return True


def has_shapes(gm: GraphModule) -> bool:
    """Whether every node has a recorded value."""
    return all(VALUE in n.meta for n in gm.graph.nodes)


def forget_shapes(nodes: Sequence[Node]) -> None:
    """Drop the recorded values of `nodes` (their computation changed shape)."""
    for node in nodes:
        node.meta.pop(VALUE, None)
        node.meta.pop("tensor_meta", None)


def node_shape(node: Node) -> tuple[int, ...] | None:
    """The output shape recorded by shape propagation, if any."""
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def node_dtype(node: Node) -> torch.dtype | None:
    meta = node.meta.get("tensor_meta")
    return getattr(meta, "dtype", None)


def node_value(node: Node):
    """The recorded meta value (tensor, tuple, int, ...), or None."""
    return node.meta.get(VALUE)


# ---- evaluation on meta ----

def _model_dtype(gm: GraphModule) -> torch.dtype:
    tensors = [*gm.parameters(), *gm.buffers()]
    return next((t.dtype for t in tensors if t.is_floating_point()), torch.float32)


def _meta_like(value, dtype: torch.dtype):
    """A meta stand-in for an example input: a tensor's, a shape's (a float tensor in `dtype`),
    or the value itself (a Python number, flag or None passed to forward)."""
    if isinstance(value, Tensor):
        return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="meta")
    if isinstance(value, (tuple, list, torch.Size)):
        return torch.empty(tuple(value), dtype=dtype, device="meta")
    return value


def _to_meta(value):
    return (torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="meta")
            if isinstance(value, Tensor) and value.device.type != "meta" else value)


def stand_in(value):
    """A meta stand-in of a node's result: tensors (also inside tuples and lists) become meta
    tensors of their shape, dtype and strides; other values stay as they are."""
    return map_aggregate(value, _to_meta)


class Recorder(torch.fx.Interpreter):
    """Runs a graph once, without gradients, and keeps `keep(result)` of every node in `values`,
    by node of `gm` (the result itself without `keep`). The graph run is `gm` itself, or `runs`:
    a copy of it (the meta copy) whose nodes are matched to `gm`'s by name; under `mode` (a
    `FakeTensorMode`) when given."""

    def __init__(self, gm: GraphModule, keep: Callable[[Any], Any] | None = None,
                 runs: GraphModule | None = None,
                 mode: contextlib.AbstractContextManager | None = None):
        super().__init__(gm if runs is None else runs)
        self.keep, self.mode = keep, mode
        self.targets = {node.name: node for node in gm.graph.nodes}
        self.values: dict[Node, Any] = {}

    def run_node(self, node: Node):
        with torch.no_grad(), self.mode or contextlib.nullcontext():
            result = super().run_node(node)
        self.values[self.targets[node.name]] = result if self.keep is None else self.keep(result)
        return result


def _record_run(recorder: Recorder, *inputs) -> Any:
    """Run `recorder` on `inputs`, then record every value it kept on its node (nothing is
    recorded if the run fails); return the graph's result."""
    result = recorder.run(*inputs)
    for node, value in recorder.values.items():
        _record(node, value)
    return result


def run_recording_shapes(gm: GraphModule, inputs: Sequence[Tensor]) -> Any:
    """`gm(*inputs)` without gradients, run once for real, recording every node's shape and dtype
    from that run as `propagate_shapes` does: a caller that needs both the outputs and the shapes
    (the pipeline's float64 reference) pays for one run. If the run fails, `gm` has no shapes."""
    _forget_all(gm)
    return _record_run(Recorder(gm, keep=stand_in), *inputs)


REAL_EVALUATION_ELEMENTS = 1 << 20  # a new node whose tensor inputs hold up to this many


def _evaluate(gm: GraphModule, node: Node):
    """The meta value of `node` from its inputs' values: for real on zeros where that is cheap
    and the node's module holds real tensors (`refresh_shapes`), else on meta."""
    args, kwargs = map_arg((node.args, node.kwargs), lambda n: n.meta[VALUE])
    if node.op == "output":
        return args[0]
    if node.op == "get_attr":
        return _to_meta(attribute(gm, node.target))
    module = gm.get_submodule(node.target) if node.op == "call_module" else None
    if _cheap_to_evaluate(module, (args, kwargs)):
        with contextlib.suppress(Exception):  # an op that fails for real may still run on meta
            real_args, real_kwargs = map_aggregate((args, kwargs), _zeros_like)
            return stand_in(_call(node, module, real_args, real_kwargs))
    if module is not None:
        with torch.no_grad():
            return torch.func.functional_call(module, _state_on_meta(module), args, kwargs)
    return _call(node, None, args, kwargs)


def _call(node: Node, module: nn.Module | None, args, kwargs):
    with torch.no_grad():
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        return module(*args, **kwargs)


def _cheap_to_evaluate(module: nn.Module | None, values) -> bool:
    """Whether a node runs for real (`refresh_shapes`): its tensor inputs hold few elements, and
    its module, if any, is in eval mode with every tensor holding data on the CPU."""
    tensors = [v for v in tree_leaves(values) if isinstance(v, Tensor)]
    if sum(t.numel() for t in tensors) > REAL_EVALUATION_ELEMENTS:
        return False
    if module is None:
        return True
    state = [*module.parameters(), *module.buffers()]
    return not any(m.training for m in module.modules()) and all(
        t.device.type == "cpu" for t in state)


def _zeros_like(value):
    """Real zeros standing in for a meta value (other values stay as they are)."""
    if isinstance(value, Tensor) and value.device.type == "meta":
        return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype).zero_()
    return value


def _record(node: Node, value) -> None:
    node.meta[VALUE] = value

    def extract(item):  # without the memory-format probe: it imports torch's symbolic shapes
        # (0.3-0.4 s of every build), and nothing here reads tensor_meta's memory_format
        return (_extract_tensor_metadata(item, include_contiguity=False)
                if isinstance(item, Tensor) else item)

    if isinstance(value, Tensor) or (isinstance(value, (tuple, list))
                                     and any(isinstance(v, Tensor) for v in value)):
        node.meta["tensor_meta"] = map_aggregate(value, extract)
    else:
        node.meta.pop("tensor_meta", None)


def _propagate_fake(gm: GraphModule, inputs: list[Tensor]) -> bool:
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        fakes = [torch.empty_strided(x.shape, x.stride(), dtype=x.dtype)
                 if isinstance(x, Tensor) else x for x in inputs]

    try:
        _record_run(Recorder(gm, keep=stand_in, mode=mode), *fakes)
    except Exception:  # shapes stay unknown: rules refuse on it
        _forget_all(gm)
        return False
    return True


def _state_on_meta(module: nn.Module) -> dict[str, Tensor]:
    """Meta stand-ins for a module's parameters and buffers, for one shape-only call."""
    return {name: _to_meta(t) for name, t in [*module.named_parameters(), *module.named_buffers()]}
