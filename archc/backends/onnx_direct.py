"""A direct torch.fx -> ONNX translation for the graphs archc builds and deploys.

`torch.onnx.export(dynamo=True)` re-traces the model through torch.export, decomposes it and
optimizes the result again: general, but it costs seconds and imports much of torch's compiler
stack. archc's deploy graphs are a small vocabulary (convolutions, linear layers, pools,
pointwise activations, adds and multiplies, concatenation, chunks and channel-shuffle reshapes),
so each node maps to one or a few ONNX operators:

    Conv2d -> Conv             Linear -> Gemm (2-D input) or MatMul + Add
    BatchNorm2d (eval) -> BatchNormalization
    ReLU -> Relu, ReLU6 -> Clip(0, 6), SiLU -> x * Sigmoid(x), GELU -> x/2 (1 + erf(x/sqrt 2))
    Hardswish / Hardsigmoid -> HardSwish / HardSigmoid(alpha=1/6, beta=1/2)
    AdaptiveAvgPool2d(1) -> GlobalAveragePool, AvgPool2d / MaxPool2d -> AveragePool / MaxPool
    x.size(d) -> Shape, Gather; int arithmetic -> Div/Mul/Add/Sub on int64 scalars
    view / reshape -> Reshape of the concatenated sizes, transpose / permute -> Transpose
    cat -> Concat, chunk -> Split (torch's sizes: ceil(n / chunks), the last one smaller)

Sizes that depend on the batch stay symbolic with a dynamic batch (Shape -> Gather), so it survives
a channel shuffle's reshape; every other size is a constant, so the graph needs no simplifier.
Shapes, dtypes, sizes and chunk sizes come from one run of the graph on the example input,
recorded node by node (`archc.ir.shapes.Recorder`).

A node outside the vocabulary raises `Untranslatable` naming it, and the caller falls back to the
general exporter; the result is verified in ONNX Runtime either way (`archc.backends.export`).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node

from archc.ir.ops import reshape_sizes
from archc.ir.shapes import Recorder

ONNX_DTYPES = {torch.float32: 1, torch.float16: 10, torch.float64: 11, torch.int64: 7}


class Untranslatable(Exception):
    """A node has no direct translation; the message names it and why."""


def _describe(value: Any) -> Any:
    """What the translation reads of a node's result: a tensor's shape and dtype, other values
    (sizes, flags) as they are."""
    if isinstance(value, torch.Tensor):
        return _TensorInfo(tuple(value.shape), value.dtype)
    if isinstance(value, (tuple, list)) and not isinstance(value, torch.Size):
        return type(value)(_describe(v) for v in value)
    return value


class _TensorInfo:
    __slots__ = ("shape", "dtype")

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype):
        self.shape, self.dtype = shape, dtype


class _Translation:
    """The ONNX nodes, initializers and value names of one graph being translated."""

    def __init__(self, gm: GraphModule, values: dict[Node, Any], dynamic_batch: bool):
        import onnx.helper

        self.helper = onnx.helper
        self.gm, self.values, self.dynamic_batch = gm, values, dynamic_batch
        self.batch_sizes: set[Node] = set()  # int / Size nodes whose value depends on the batch
        self.modules = dict(gm.named_modules())
        self.nodes: list = []
        self.initializers: dict[str, Any] = {}
        self.names: dict[Node, Any] = {}  # fx node -> ONNX value name (or a list for tuples)
        self._used: dict[str, set[str]] = {"value": {"input", "output"}, "node": set()}

    # ---- building blocks
    def fresh(self, hint: str, space: str = "value") -> str:
        """`hint` (the fx node's name, so the ONNX graph reads like the deploy graph) or, once
        taken, `hint_2`, `hint_3`, ..."""
        used, name, count = self._used[space], hint, 1
        while name in used:
            count += 1
            name = f"{hint}_{count}"
        used.add(name)
        return name

    def op(self, kind: str, inputs: list[str], hint: str, outputs: int = 1, **attrs) -> Any:
        names = [self.fresh(hint) for _ in range(outputs)]
        self.nodes.append(self.helper.make_node(kind, inputs, names,
                                                name=self.fresh(hint, "node"), **attrs))
        return names[0] if outputs == 1 else names

    def tensor(self, name: str, value: torch.Tensor) -> str:
        if value.dtype not in ONNX_DTYPES:
            raise Untranslatable(f"a constant of dtype {value.dtype}")
        name = self.fresh(name)
        self.initializers[name] = value.detach().cpu().contiguous().numpy()
        return name

    def constant(self, value: float | int | list, dtype: torch.dtype, hint: str = "const") -> str:
        return self.tensor(hint, torch.tensor(value, dtype=dtype))

    def parameter(self, module_name: str, attribute: str) -> str:
        value = getattr(self.modules[module_name], attribute)
        return self.tensor(f"{module_name}.{attribute}", value)

    def input(self, arg: Any, like: torch.dtype = torch.float32) -> str:
        """The ONNX name of an argument: a node's output or a Python scalar as a constant."""
        if isinstance(arg, Node):
            name = self.names.get(arg)
            if not isinstance(name, str):
                raise Untranslatable(f"argument {arg.name} is not a single value")
            return name
        if isinstance(arg, bool) or not isinstance(arg, (int, float)):
            raise Untranslatable(f"argument {arg!r} of type {type(arg).__name__}")
        if like.is_floating_point:
            return self.constant(float(arg), like)
        if isinstance(arg, float):
            raise Untranslatable(f"float {arg} combined with an integer size")
        return self.constant(arg, torch.int64)

    def info(self, node: Node) -> _TensorInfo:
        value = self.values.get(node)
        if not isinstance(value, _TensorInfo):
            raise Untranslatable(f"{node.name} is not a tensor")
        return value

    def dtype_of(self, args: tuple) -> torch.dtype:
        for arg in args:
            if isinstance(arg, Node):
                value = self.values.get(arg)
                if isinstance(value, _TensorInfo):
                    return value.dtype
                return torch.int64  # a symbolic size
        return torch.float32


def translate(gm: GraphModule, example_input: torch.Tensor, *, opset: int,
              dynamic_batch: bool):
    """The ONNX `ModelProto` of `gm` (one tensor input, a tensor or tuple output); raises
    `Untranslatable` for a node outside the vocabulary."""
    import onnx.helper as helper

    if example_input.dtype not in ONNX_DTYPES:
        raise Untranslatable(f"input dtype {example_input.dtype}")
    recorder = Recorder(gm, keep=_describe)
    recorder.run(example_input)
    graph = _Translation(gm, recorder.values, dynamic_batch)
    inputs, outputs = [], []
    batch = "batch" if dynamic_batch else None
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if inputs:
                raise Untranslatable("a graph with more than one input")
            graph.names[node] = "input"
            inputs.append(_value_info(helper, "input", graph.info(node), batch))
        elif node.op == "output":
            outputs = _outputs(graph, node, batch)
        elif node.op == "get_attr":
            graph.names[node] = graph.tensor(str(node.target), _attribute(gm, str(node.target)))
        else:
            graph.names[node] = _translate_node(graph, node)
    opsets = [helper.make_opsetid("", opset)]
    model = helper.make_model(
        helper.make_graph(graph.nodes, "archc", inputs, outputs),
        opset_imports=opsets, producer_name="archc",
        ir_version=helper.find_min_ir_version_for(opsets),  # the oldest runtime that can read it
    )
    for name, array in graph.initializers.items():
        _add_initializer(helper, model.graph, name, array)
    return model


def _add_initializer(helper, graph, name: str, array) -> None:
    """`array` as an initializer of the ONNX `graph`, written in place (little-endian raw data,
    as `numpy_helper.from_array` writes it): a tensor built apart is copied into the graph, and
    the graph into the model, twice more (0.7 s for AlexNet's 244 MB)."""
    tensor = graph.initializer.add()
    tensor.name = name
    tensor.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
    tensor.dims.extend(array.shape)
    tensor.raw_data = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()


def _attribute(gm: GraphModule, target: str) -> torch.Tensor:
    value: Any = gm
    for part in target.split("."):
        value = getattr(value, part)
    if not isinstance(value, torch.Tensor):
        raise Untranslatable(f"attribute {target} is not a tensor")
    return value


def _value_info(helper, name: str, info: _TensorInfo, batch: str | None):
    if info.dtype not in ONNX_DTYPES:
        raise Untranslatable(f"{name} has dtype {info.dtype}")
    shape = [batch if batch and i == 0 else d for i, d in enumerate(info.shape)]
    return helper.make_tensor_value_info(name, ONNX_DTYPES[info.dtype], shape)


def _outputs(graph: _Translation, node: Node, batch: str | None) -> list:
    (result,) = node.args
    results = list(result) if isinstance(result, (tuple, list)) else [result]
    names = ["output"] if len(results) == 1 else [f"output_{i}" for i in range(len(results))]
    infos = []
    for name, value in zip(names, results):
        if not isinstance(value, Node):
            raise Untranslatable("an output that is not a tensor")
        _name_output(graph, graph.input(value), name)
        infos.append(_value_info(graph.helper, name, graph.info(value), batch))
    return infos


def _name_output(graph: _Translation, value: str, name: str) -> None:
    """Give the graph output `name`: rename the value where a node of ours produces it (and it
    is not already an output), else copy it through an Identity (the input, a weight)."""
    producer = next((node for node in graph.nodes if value in node.output), None)
    if producer is None or value.startswith("output"):
        graph.nodes.append(graph.helper.make_node("Identity", [value], [name]))
        return
    for node in graph.nodes:
        node.output[:] = [name if v == value else v for v in node.output]
        node.input[:] = [name if v == value else v for v in node.input]
    for fx_node, onnx_name in graph.names.items():
        if onnx_name == value:
            graph.names[fx_node] = name


def _translate_node(graph: _Translation, node: Node) -> Any:
    value = graph.values.get(node)
    if isinstance(value, int) and not isinstance(value, bool) or isinstance(value, torch.Size):
        if _depends_on_batch(graph, node):
            graph.batch_sizes.add(node)
        else:  # a size fixed by the weights and the input's static dims: a constant
            return graph.constant(list(value) if isinstance(value, torch.Size) else value,
                                  torch.int64, node.name)
    if node.op == "call_module":
        module = graph.modules[str(node.target)]
        handler = _MODULES.get(type(module))
        if handler is None:
            raise Untranslatable(f"{node.name}: module {type(module).__name__}")
        if module.training and isinstance(module, nn.modules.batchnorm._BatchNorm):
            raise Untranslatable(f"{node.name}: a BatchNorm in training mode")
        return handler(graph, node, module)
    if node.op == "call_method":
        handler = _METHODS.get(str(node.target))
        if handler is None:
            raise Untranslatable(f"{node.name}: method {node.target}")
        return handler(graph, node)
    handler = _FUNCTIONS.get(node.target)
    if handler is None:
        name = getattr(node.target, "__name__", node.target)
        raise Untranslatable(f"{node.name}: function {name}")
    return handler(graph, node)


def _depends_on_batch(graph: _Translation, node: Node) -> bool:
    """Whether an int or Size node reads the batch dimension (with a dynamic batch only):
    `x.size(0)`, `x.size()`, `x.size()[0]`, and arithmetic on those."""
    if not graph.dynamic_batch:
        return False
    if node.op == "call_method" and node.target == "size":
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        return dim is None or dim % len(graph.info(node.args[0]).shape) == 0
    if node.target is operator.getitem and node.args[0] in graph.batch_sizes:
        return not isinstance(node.args[1], int) or node.args[1] == 0
    return any(n in graph.batch_sizes for n in node.all_input_nodes)


# ---- modules

def _conv(graph: _Translation, node: Node, conv: nn.Conv2d) -> str:
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str) or conv.transposed:
        raise Untranslatable(f"{node.name}: conv padding {conv.padding!r} ({conv.padding_mode})")
    inputs = [graph.input(node.args[0]), graph.parameter(str(node.target), "weight")]
    if conv.bias is not None:
        inputs.append(graph.parameter(str(node.target), "bias"))
    pads = list(conv.padding)
    return graph.op("Conv", inputs, node.name, kernel_shape=list(conv.kernel_size),
                    strides=list(conv.stride), dilations=list(conv.dilation), pads=pads + pads,
                    group=conv.groups)


def _linear(graph: _Translation, node: Node, linear: nn.Linear) -> str:
    x = graph.input(node.args[0])
    weight = graph.parameter(str(node.target), "weight")
    if len(graph.info(node.args[0]).shape) == 2:
        inputs = [x, weight] + ([graph.parameter(str(node.target), "bias")]
                                if linear.bias is not None else [])
        return graph.op("Gemm", inputs, node.name, transB=1)
    transposed = graph.tensor(f"{node.target}.weight_t", linear.weight.t())
    y = graph.op("MatMul", [x, transposed], node.name)
    if linear.bias is None:
        return y
    return graph.op("Add", [y, graph.parameter(str(node.target), "bias")], node.name)


def _batch_norm(graph: _Translation, node: Node, bn: nn.BatchNorm2d) -> str:
    if not bn.track_running_stats or bn.running_mean is None:
        raise Untranslatable(f"{node.name}: BatchNorm without running statistics")
    name, shape = str(node.target), (bn.num_features,)
    weight = (graph.parameter(name, "weight") if bn.affine
              else graph.tensor(f"{name}.weight", torch.ones(shape)))
    bias = (graph.parameter(name, "bias") if bn.affine
            else graph.tensor(f"{name}.bias", torch.zeros(shape)))
    return graph.op("BatchNormalization",
                    [graph.input(node.args[0]), weight, bias, graph.parameter(name, "running_mean"),
                     graph.parameter(name, "running_var")], node.name, epsilon=bn.eps)


def _silu(graph: _Translation, x: str, hint: str) -> str:
    return graph.op("Mul", [x, graph.op("Sigmoid", [x], hint)], hint)


def _gelu(graph: _Translation, x: str, hint: str, approximate: str, dtype: torch.dtype) -> str:
    if approximate == "tanh":  # x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        cube = graph.op("Mul", [graph.op("Mul", [x, x], hint), x], hint)
        inner = graph.op("Add", [x, graph.op("Mul", [cube, graph.constant(0.044715, dtype)],
                                              hint)], hint)
        scaled = graph.op("Mul", [inner, graph.constant(math.sqrt(2 / math.pi), dtype)], hint)
        gate = graph.op("Tanh", [scaled], hint)
    else:  # x/2 (1 + erf(x / sqrt 2))
        gate = graph.op("Erf", [graph.op("Div", [x, graph.constant(math.sqrt(2), dtype)], hint)],
                        hint)
    half = graph.op("Mul", [x, graph.constant(0.5, dtype)], hint)
    return graph.op("Mul", [half, graph.op("Add", [gate, graph.constant(1.0, dtype)], hint)], hint)


def _pointwise(kind: str, **attrs) -> Callable:
    def handler(graph: _Translation, node: Node, module: nn.Module | None = None) -> str:
        return graph.op(kind, [graph.input(node.args[0])], node.name, **attrs)
    return handler


def _clip(low: float, high: float) -> Callable:
    def handler(graph: _Translation, node: Node, module: nn.Module | None = None) -> str:
        dtype = graph.info(node.args[0]).dtype
        return graph.op("Clip", [graph.input(node.args[0]), graph.constant(low, dtype),
                                 graph.constant(high, dtype)], node.name)
    return handler


def _hardtanh(graph: _Translation, node: Node, module: nn.Hardtanh) -> str:
    return _clip(module.min_val, module.max_val)(graph, node)


def _leaky_relu(graph: _Translation, node: Node, module: nn.LeakyReLU) -> str:
    return graph.op("LeakyRelu", [graph.input(node.args[0])], node.name,
                    alpha=float(module.negative_slope))


def _identity(graph: _Translation, node: Node, module: nn.Module | None = None) -> str:
    return graph.input(node.args[0])


def _module_silu(graph: _Translation, node: Node, module: nn.SiLU) -> str:
    return _silu(graph, graph.input(node.args[0]), node.name)


def _module_gelu(graph: _Translation, node: Node, module: nn.GELU) -> str:
    return _gelu(graph, graph.input(node.args[0]), node.name, module.approximate,
                 graph.info(node.args[0]).dtype)


def _adaptive_average(graph: _Translation, node: Node, size: Any) -> str:
    shape = graph.info(node.args[0]).shape
    sizes = (size, size) if isinstance(size, int) else tuple(size)
    if sizes == (1, 1):
        return graph.op("GlobalAveragePool", [graph.input(node.args[0])], node.name)
    if len(shape) != 4:
        raise Untranslatable(f"{node.name}: adaptive pool of a {len(shape)}-d tensor")
    sizes = tuple(shape[2 + i] if s is None else s for i, s in enumerate(sizes))
    if not any(d % s for d, s in zip(shape[2:], sizes)):
        kernel = [d // s for d, s in zip(shape[2:], sizes)]
        return graph.op("AveragePool", [graph.input(node.args[0])], node.name,
                        kernel_shape=kernel, strides=kernel)
    # cells of unequal size (or an output larger than the input): Y = P_h X P_w^T, where row i of
    # P averages input rows floor(i n / m) .. ceil((i + 1) n / m) - 1
    dtype = graph.info(node.args[0]).dtype
    rows, columns = (_averaging(n, m, dtype) for n, m in zip(shape[2:], sizes))
    across = graph.op("MatMul", [graph.input(node.args[0]),
                                 graph.tensor(f"{node.name}.pool_w", columns.t())], node.name)
    return graph.op("MatMul", [graph.tensor(f"{node.name}.pool_h", rows), across], node.name)


def _averaging(size: int, cells: int, dtype: torch.dtype) -> torch.Tensor:
    """The (cells, size) matrix of adaptive average pooling along one axis."""
    matrix = torch.zeros(cells, size, dtype=torch.float64)
    for i in range(cells):
        start, stop = (i * size) // cells, -((-(i + 1) * size) // cells)
        matrix[i, start:stop] = 1.0 / (stop - start)
    return matrix.to(dtype)


def _module_adaptive_average(graph: _Translation, node: Node, module) -> str:
    return _adaptive_average(graph, node, module.output_size)


def _pool_attributes(module: nn.Module) -> dict[str, Any]:
    pair = torch.nn.modules.utils._pair
    kernel, padding = list(pair(module.kernel_size)), list(pair(module.padding))
    stride = list(pair(module.stride if module.stride is not None else module.kernel_size))
    return {"kernel_shape": kernel, "strides": stride, "pads": padding + padding,
            "ceil_mode": int(module.ceil_mode)}


def _average_pool(graph: _Translation, node: Node, module: nn.AvgPool2d) -> str:
    if module.divisor_override is not None:
        raise Untranslatable(f"{node.name}: AvgPool2d with a divisor override")
    return graph.op("AveragePool", [graph.input(node.args[0])], node.name,
                    count_include_pad=int(module.count_include_pad), **_pool_attributes(module))


def _max_pool(graph: _Translation, node: Node, module: nn.MaxPool2d) -> str:
    if module.return_indices:
        raise Untranslatable(f"{node.name}: MaxPool2d returning indices")
    pair = torch.nn.modules.utils._pair
    return graph.op("MaxPool", [graph.input(node.args[0])], node.name,
                    dilations=list(pair(module.dilation)), **_pool_attributes(module))


def _flatten_dims(graph: _Translation, node: Node, start: int, end: int) -> str:
    rank = len(graph.info(node.args[0]).shape)
    start, end = start % rank, end % rank
    if end == rank - 1 and start == 1:  # ONNX Flatten: (d0 ... d(axis-1), the rest)
        return graph.op("Flatten", [graph.input(node.args[0])], node.name, axis=1)
    # Reshape: the dims before `start` copied (0), the merged one inferred (-1), the rest static
    sizes = [0] * start + [-1] + list(graph.info(node).shape[start + 1:])
    return graph.op("Reshape", [graph.input(node.args[0]),
                                graph.constant(sizes, torch.int64, "shape")], node.name)


def _module_flatten(graph: _Translation, node: Node, module: nn.Flatten) -> str:
    return _flatten_dims(graph, node, module.start_dim, module.end_dim)


_MODULES: dict[type, Callable] = {
    nn.Conv2d: _conv, nn.Linear: _linear, nn.BatchNorm2d: _batch_norm,
    nn.ReLU: _pointwise("Relu"), nn.ReLU6: _clip(0.0, 6.0), nn.Hardtanh: _hardtanh,
    nn.Sigmoid: _pointwise("Sigmoid"), nn.Tanh: _pointwise("Tanh"), nn.SiLU: _module_silu,
    nn.Hardswish: _pointwise("HardSwish"),
    nn.Hardsigmoid: _pointwise("HardSigmoid", alpha=1 / 6, beta=0.5),
    nn.GELU: _module_gelu, nn.LeakyReLU: _leaky_relu,
    nn.Identity: _identity, nn.Dropout: _identity, nn.Dropout2d: _identity,
    nn.AdaptiveAvgPool2d: _module_adaptive_average, nn.AvgPool2d: _average_pool,
    nn.MaxPool2d: _max_pool, nn.Flatten: _module_flatten,
}


# ---- functions and methods

def _binary(kind: str) -> Callable:
    def handler(graph: _Translation, node: Node) -> str:
        if len(node.args) != 2 or set(node.kwargs) - {"out"} or node.kwargs.get("out"):
            raise Untranslatable(f"{node.name}: {kind} with arguments {node.args} {node.kwargs}")
        dtype = graph.dtype_of(node.args)
        return graph.op(kind, [graph.input(a, dtype) for a in node.args], node.name)
    return handler


def _floordiv(graph: _Translation, node: Node) -> str:
    if graph.dtype_of(node.args).is_floating_point:
        raise Untranslatable(f"{node.name}: floor division of floating-point tensors")
    return _binary("Div")(graph, node)  # int64 sizes are non-negative: Div truncates = floors


def _cat(graph: _Translation, node: Node) -> str:
    tensors = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    rank = len(graph.info(tensors[0]).shape)
    return graph.op("Concat", [graph.input(t) for t in tensors], node.name, axis=dim % rank)


def _getitem(graph: _Translation, node: Node) -> str:
    source, index = node.args
    name = graph.names.get(source)
    if isinstance(name, list) and isinstance(index, int):
        return name[index]
    if isinstance(graph.values.get(source), torch.Size) and isinstance(index, int):
        return graph.op("Gather", [name, graph.constant(index, torch.int64, "index")],
                        node.name, axis=0)
    if isinstance(graph.values.get(source), _TensorInfo):
        return _slice(graph, node, source, index if isinstance(index, tuple) else (index,))
    raise Untranslatable(f"{node.name}: indexing {source.name}[{index!r}]")


def _slice(graph: _Translation, node: Node, source: Node, index: tuple) -> str:
    """`x[a:b, ..., i]` with static bounds: one Slice, then a Gather per integer index (last axis
    first, so the axes before it keep their numbers)."""
    if len(index) > len(graph.info(source).shape):
        raise Untranslatable(f"{node.name}: indexing with {index!r}")
    starts, ends, axes, steps, picks = [], [], [], [], []
    for axis, item in enumerate(index):
        if isinstance(item, slice) and item != slice(None):
            if not all(v is None or isinstance(v, int) for v in (item.start, item.stop, item.step)):
                raise Untranslatable(f"{node.name}: a slice with computed bounds")
            if (item.step or 1) < 1:
                raise Untranslatable(f"{node.name}: a slice with a negative step")
            starts.append(item.start or 0)
            ends.append(item.stop if item.stop is not None else 2**62)
            axes.append(axis)
            steps.append(item.step or 1)
        elif isinstance(item, int) and not isinstance(item, bool):
            picks.append((axis, item))
        elif not isinstance(item, slice):
            raise Untranslatable(f"{node.name}: indexing with {item!r}")
    name = graph.input(source)
    if axes:
        name = graph.op("Slice", [name] + [graph.constant(v, torch.int64, "slice")
                                           for v in (starts, ends, axes, steps)], node.name)
    for axis, position in reversed(picks):
        name = graph.op("Gather", [name, graph.constant(position, torch.int64, "index")],
                        node.name, axis=axis)
    return name


def _size(graph: _Translation, node: Node) -> str:
    shape = graph.op("Shape", [graph.input(node.args[0])], node.name)
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if dim is None:
        return shape
    rank = len(graph.info(node.args[0]).shape)
    return graph.op("Gather", [shape, graph.constant(dim % rank, torch.int64, "index")],
                    node.name, axis=0)


def _reshape(graph: _Translation, node: Node) -> str:
    sizes = [graph.values[s] if isinstance(s, Node) and s not in graph.batch_sizes else s
             for s in reshape_sizes(node)]  # a size that does not depend on the batch is a number
    if all(isinstance(s, int) for s in sizes):
        shape = graph.constant(list(sizes), torch.int64, "shape")
    else:
        pieces = []
        for size in sizes:
            if isinstance(size, int):
                pieces.append(graph.constant([size], torch.int64, "dim"))
            else:
                pieces.append(graph.op("Unsqueeze", [graph.input(size, torch.int64),
                                                      graph.constant([0], torch.int64, "axes")],
                                       node.name))
        shape = graph.op("Concat", pieces, node.name, axis=0)
    return graph.op("Reshape", [graph.input(node.args[0]), shape], node.name)


def _transpose(graph: _Translation, node: Node) -> str:
    rank = len(graph.info(node.args[0]).shape)
    first, second = (d % rank for d in node.args[1:3])
    perm = list(range(rank))
    perm[first], perm[second] = perm[second], perm[first]
    return graph.op("Transpose", [graph.input(node.args[0])], node.name, perm=perm)


def _permute(graph: _Translation, node: Node) -> str:
    dims = node.args[1:]
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = tuple(dims[0])
    rank = len(graph.info(node.args[0]).shape)
    return graph.op("Transpose", [graph.input(node.args[0])], node.name,
                    perm=[d % rank for d in dims])


def _split_sizes(graph: _Translation, node: Node, dim: int) -> tuple[str, list[int], int]:
    parts = graph.values[node]
    rank = len(graph.info(node.args[0]).shape)
    if dim % rank == 0:
        raise Untranslatable(f"{node.name}: a split along the batch dimension")
    return graph.input(node.args[0]), [p.shape[dim] for p in parts], dim % rank


def _chunk(graph: _Translation, node: Node) -> list[str]:
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    x, sizes, axis = _split_sizes(graph, node, dim)
    return graph.op("Split", [x, graph.constant(sizes, torch.int64, "split")], node.name,
                    outputs=len(sizes), axis=axis)


def _mean(graph: _Translation, node: Node) -> str:
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    if dims is None or node.kwargs.get("dtype") is not None:
        raise Untranslatable(f"{node.name}: mean without dims or with a dtype")
    dims = [dims] if isinstance(dims, int) else list(dims)
    rank = len(graph.info(node.args[0]).shape)
    return graph.op("ReduceMean", [graph.input(node.args[0]),
                                   graph.constant([d % rank for d in dims], torch.int64, "axes")],
                    node.name, keepdims=int(bool(keep)))


def _method_flatten(graph: _Translation, node: Node) -> str:
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
    return _flatten_dims(graph, node, start, end)


def _contiguous(graph: _Translation, node: Node) -> str:
    return graph.input(node.args[0])


def _function_pointwise(kind: str, **attrs) -> Callable:
    def handler(graph: _Translation, node: Node) -> str:
        if len(node.args) != 1 or set(node.kwargs) - {"inplace"}:
            raise Untranslatable(f"{node.name}: {kind} with extra arguments")
        return graph.op(kind, [graph.input(node.args[0])], node.name, **attrs)
    return handler


def _function_silu(graph: _Translation, node: Node) -> str:
    return _silu(graph, graph.input(node.args[0]), node.name)


def _function_gelu(graph: _Translation, node: Node) -> str:
    return _gelu(graph, graph.input(node.args[0]), node.name,
                 node.kwargs.get("approximate", "none"), graph.info(node.args[0]).dtype)


def _function_adaptive_average(graph: _Translation, node: Node) -> str:
    size = node.args[1] if len(node.args) > 1 else node.kwargs["output_size"]
    return _adaptive_average(graph, node, size)


def _function_flatten(graph: _Translation, node: Node) -> str:
    return _method_flatten(graph, node)


_FUNCTIONS: dict[Any, Callable] = {
    operator.add: _binary("Add"), torch.add: _binary("Add"), operator.iadd: _binary("Add"),
    operator.mul: _binary("Mul"), torch.mul: _binary("Mul"), operator.imul: _binary("Mul"),
    operator.sub: _binary("Sub"), torch.sub: _binary("Sub"),
    operator.truediv: _binary("Div"), torch.div: _binary("Div"),
    operator.floordiv: _floordiv, operator.getitem: _getitem,
    torch.cat: _cat, torch.concat: _cat, torch.chunk: _chunk, torch.flatten: _function_flatten,
    torch.relu: _function_pointwise("Relu"), F.relu: _function_pointwise("Relu"),
    torch.sigmoid: _function_pointwise("Sigmoid"), F.sigmoid: _function_pointwise("Sigmoid"),
    F.hardswish: _function_pointwise("HardSwish"),
    F.hardsigmoid: _function_pointwise("HardSigmoid", alpha=1 / 6, beta=0.5),
    F.silu: _function_silu, F.gelu: _function_gelu,
    F.adaptive_avg_pool2d: _function_adaptive_average, torch.mean: _mean,
}

_METHODS: dict[str, Callable] = {
    "size": _size, "view": _reshape, "reshape": _reshape, "transpose": _transpose,
    "permute": _permute, "chunk": _chunk, "flatten": _method_flatten, "mean": _mean,
    "contiguous": _contiguous, "add": _binary("Add"), "mul": _binary("Mul"),
    "relu": _function_pointwise("Relu"), "sigmoid": _function_pointwise("Sigmoid"),
}
