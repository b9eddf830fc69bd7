"""Post-training static int8 quantization of an ONNX classifier (`archc quantize`).

The work is ONNX Runtime's (`onnxruntime.quantization`); archc feeds it data, checks the input
and measures the result:

1. `quant_pre_process`: ORT's shape inference and basic graph optimizations, so the quantizer sees
   one conv where the export left conv + BN and knows every tensor's shape.
2. `quantize_static` in the QDQ format: QuantizeLinear/DequantizeLinear pairs around the float
   ops, int8 activations (asymmetric, calibrated) and int8 weights (symmetric, per output channel
   by default), which ORT's optimizer fuses into integer kernels (QLinearConv, QGemm) when the
   session is created. Calibration: `minmax` (the range seen), `entropy` (the range minimising the
   KL divergence of the quantized histogram) or `percentile` (99.999% of |x|), over `samples`
   images of the training split of `DATA`.
3. Measurement on the validation split (held out from calibration): SQNR of the logits,
   10 log10(sum fp32^2 / sum (fp32 - int8)^2) in dB; top-1 agreement of int8 with fp32; top-1
   accuracy of both against the labels; per-tensor SQNR of every intermediate activation (the
   float model's tensor against what the int8 model's next layer reads, its dequantized value),
   where a layer's *loss* is the drop from the worst SQNR among its inputs to its output's; and
   the int8/fp32 latency ratio in ORT (batch 1, interleaved rounds, medians).

The output is written atomically and only after it loaded and ran in ORT. Bad input raises
`QuantizationError` (or `DataError` from `archc.train.data`) before anything is written: a file that
is not ONNX, a model whose input is not one float (N, C, H, W) tensor with a square fixed size, data
whose images cannot be fitted to that input, a model with fewer outputs than the data's classes,
an empty calibration set, a `--keep-float` name that is no node of the model.
"""

from __future__ import annotations

import contextlib
import io
import math
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from archc.common.accuracy_stats import PairedComparison, compare_paired
from archc.common.suggest import did_you_mean
from archc.common.timing import interleaved
from archc.errors import ArchcError

METHODS = ("minmax", "entropy", "percentile")
# ops whose weights the quantizer turns to int8 and that "first"/"last" of --keep-float refer to
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
HELD_OUT_LAYER_SAMPLES = 64  # validation images for the per-tensor comparison


class QuantizationError(ArchcError):
    """A model or option `archc quantize` cannot work with."""


@dataclass(frozen=True)
class ModelInput:
    name: str
    batch: int | None  # fixed batch size, or None (dynamic)
    channels: int
    size: int


@dataclass
class LayerLoss:
    node: str
    op: str
    tensor: str
    sqnr_db: float  # of this tensor, fp32 vs int8 model
    drop_db: float  # worst input SQNR minus this one (what this layer adds)


@dataclass
class QuantizationReport:
    output: Path
    method: str
    per_channel: bool
    calibration_samples: int
    held_out_samples: int
    kept_float: list[str]
    sqnr_db: float
    top1_agreement: float  # percent
    fp32_accuracy: float | None  # percent, None without usable labels
    int8_accuracy: float | None
    # int8 against fp32 on the same held-out images: exact McNemar (archc.common.accuracy_stats)
    paired: PairedComparison | None = None
    int8_right: list[bool] = field(default_factory=list)  # per held-out image, for other pairs
    layers: list[LayerLoss] = field(default_factory=list)  # worst first
    fp32_ms: float | None = None
    int8_ms: float | None = None
    quantized_ops: dict[str, int] = field(default_factory=dict)  # after ORT's optimization
    float_convs: int = 0  # convs ORT still runs in float after its optimization
    bytes: int = 0

    @property
    def latency_ratio(self) -> float | None:
        if self.fp32_ms is None or self.int8_ms is None:
            return None
        return self.int8_ms / self.fp32_ms

    def document(self) -> dict:
        return {"output": str(self.output), "method": self.method,
                "per_channel": self.per_channel,
                "calibration_samples": self.calibration_samples,
                "held_out_samples": self.held_out_samples, "kept_float": self.kept_float,
                "sqnr_db": self.sqnr_db, "top1_agreement": self.top1_agreement,
                "fp32_accuracy": self.fp32_accuracy, "int8_accuracy": self.int8_accuracy,
                "int8_vs_fp32": None if self.paired is None else self.paired.document(),
                "layers": [vars(layer) for layer in self.layers],
                "fp32_ms": self.fp32_ms, "int8_ms": self.int8_ms,
                "latency_ratio": self.latency_ratio, "quantized_ops": self.quantized_ops,
                "float_convs": self.float_convs, "bytes": self.bytes}


def read_model(path: Path):
    """The ONNX model at `path` and its one input; `QuantizationError` if it does not fit."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise QuantizationError(f"{path}: no such file")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf decode errors of every kind
        raise QuantizationError(f"{path}: not an ONNX model ({type(exc).__name__})") from None
    if not model.graph.node or not model.opset_import:
        raise QuantizationError(f"{path}: not an ONNX model (no graph)")
    initializers = {init.name for init in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise QuantizationError(f"{path}: expected one input (N, C, H, W), got "
                                f"{len(inputs)}: {', '.join(i.name for i in inputs)}")
    tensor = inputs[0].type.tensor_type
    if tensor.elem_type != onnx.TensorProto.FLOAT:
        kind = onnx.TensorProto.DataType.Name(tensor.elem_type) if tensor.elem_type else "none"
        raise QuantizationError(f"{path}: input {inputs[0].name!r} is {kind}; int8 calibration "
                                f"needs a float32 input")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
    if len(dims) != 4 or None in dims[1:] or dims[2] != dims[3]:
        raise QuantizationError(f"{path}: input {inputs[0].name!r} has shape "
                                f"{_shape_text(dims)}; expected (N, C, H, W) with fixed C and "
                                f"a square H = W")
    return model, ModelInput(inputs[0].name, dims[0] or None, dims[1], dims[2])


def _shape_text(dims: Sequence[int | None]) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in dims) + ")"


def resolve_keep_float(model, keep: Sequence[str]) -> list[str]:
    """Node names for `--keep-float`: names, `first`, `last` (the first/last weighted op)."""
    nodes = [node for node in model.graph.node]
    names = [node.name for node in nodes]
    weighted = [node.name for node in nodes if node.op_type in WEIGHTED_OPS]
    chosen: list[str] = []
    for item in keep:
        if item in ("first", "last"):
            if not weighted:
                raise QuantizationError(f"--keep-float {item}: the model has no "
                                        f"{'/'.join(WEIGHTED_OPS)} node")
            chosen.append(weighted[0] if item == "first" else weighted[-1])
        elif item in names:
            chosen.append(item)
        else:
            hint = did_you_mean(item, names)
            raise QuantizationError(f"--keep-float {item}: no node of that name{hint}; the "
                                    f"weighted nodes are {', '.join(weighted[:6])}"
                                    f"{', ...' if len(weighted) > 6 else ''}")
    return list(dict.fromkeys(chosen))


def _batches(x: np.ndarray, batch: int | None, size: int = 32, repeat: bool = False
             ) -> Iterator[np.ndarray]:
    """Chunks of `x` for a model of fixed batch `batch` or any batch. A fixed batch's last chunk
    is padded with zeros (outputs of padding are dropped) or, with `repeat` (calibration, where
    zeros would enter the ranges), with the first images of `x` again."""
    step = batch or size
    for start in range(0, len(x), step):
        part = x[start:start + step]
        if batch is not None and len(part) < batch:
            missing = batch - len(part)
            fill = (np.resize(x, (missing, *x.shape[1:])) if repeat
                    else np.zeros((missing, *part.shape[1:]), dtype=part.dtype))
            part = np.concatenate([part, fill.astype(part.dtype)])
        yield np.ascontiguousarray(part)


class _Reader:
    """ORT's CalibrationDataReader protocol over numpy batches."""

    def __init__(self, name: str, batches: list[np.ndarray]):
        self.name, self.batches, self.index = name, batches, 0

    def get_next(self):
        if self.index >= len(self.batches):
            return None
        self.index += 1
        return {self.name: self.batches[self.index - 1]}

    def rewind(self):
        self.index = 0


def _run(sess, name: str, x: np.ndarray, batch: int | None) -> np.ndarray:
    outputs = [sess.run(None, {name: part})[0] for part in _batches(x, batch)]
    return np.concatenate(outputs)[:len(x)]


def sqnr_db(reference: np.ndarray, other: np.ndarray) -> float:
    """10 log10(|reference|^2 / |reference - other|^2); inf when they are equal."""
    reference = reference.astype(np.float64)
    noise = float(np.sum((reference - other.astype(np.float64)) ** 2))
    signal = float(np.sum(reference ** 2))
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def quantize(model_path: Path, data: str, output: Path, *, method: str = "minmax",
             samples: int = 256, keep_float: Sequence[str] = (), per_channel: bool = True,
             latency_rounds: int = 15, threads: int = 1, layers: int = 5,
             progress: Callable[[str], None] = lambda text: None) -> QuantizationReport:
    """Quantize `model_path` calibrated on `data`; write `output` atomically (module docstring)."""
    if method not in METHODS:
        raise QuantizationError(f"unknown calibration method {method!r}; one of "
                                f"{', '.join(METHODS)}")
    if samples < 1:
        raise QuantizationError("the calibration set is empty: give --samples >= 1")
    model, model_input = read_model(model_path)
    from archc.train.data import load_data

    dataset = load_data(data, model_input.channels, model_input.size)
    calibration = dataset.train_x[:samples]
    if len(calibration) == 0:
        raise QuantizationError(f"{data}: the calibration set is empty")
    if len(dataset.val_x) == 0:
        raise QuantizationError(f"{data}: no held-out images to measure the int8 model on")
    kept = resolve_keep_float(model, keep_float)
    from archc.backends.onnx_runtime import cpu_session
    from archc.common.fileio import atomic_output

    with tempfile.TemporaryDirectory(prefix="archc-quantize-") as folder:
        work = Path(folder)
        fp32 = _preprocess(model_path, work, progress)
        try:
            fp32_session = cpu_session(str(fp32))
        except Exception as exc:
            raise QuantizationError(f"{model_path}: ONNX Runtime cannot run it "
                                    f"({type(exc).__name__}: {_first(exc)})") from None
        reference = _run(fp32_session, model_input.name, dataset.val_x[:1], model_input.batch)
        if reference.ndim != 2:
            raise QuantizationError(f"{model_path}: the output has shape {reference.shape}; "
                                    f"expected (N, classes) logits")
        if reference.shape[1] < dataset.classes:
            raise QuantizationError(f"{model_path} has {reference.shape[1]} outputs but "
                                    f"{dataset.name} has {dataset.classes} classes")
        gone = [name for name in kept if not _has_node(fp32, name)]
        if gone:
            raise QuantizationError(f"--keep-float {gone[0]}: ONNX Runtime's pre-processing "
                                    f"fused that node into another; name the node it became")
        progress(f"calibrating on {len(calibration)} images ({method})")
        int8 = work / "int8.onnx"
        _quantize_static(fp32, int8, model_input, calibration, method, per_channel, kept)
        with atomic_output(output) as temporary:
            temporary.write_bytes(int8.read_bytes())
            progress("checking the int8 model in ONNX Runtime")
            optimized = work / "int8.optimized.onnx"
            try:
                int8_session = cpu_session(str(temporary), save_optimized=optimized)
                quantized_ops, float_convs = _ops_after_optimization(optimized)
                report = _measure(fp32, temporary, fp32_session, int8_session, model_input,
                                  dataset, threads, latency_rounds, layers, progress)
            except QuantizationError:
                raise
            except Exception as exc:
                raise QuantizationError(f"the int8 model does not run in ONNX Runtime "
                                        f"({type(exc).__name__}: {_first(exc)})") from None
            report.bytes = temporary.stat().st_size
    report.output, report.method, report.per_channel = Path(output), method, per_channel
    report.calibration_samples, report.kept_float = len(calibration), kept
    report.quantized_ops, report.float_convs = quantized_ops, float_convs
    return report


def _first(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else ""


def _has_node(path: Path, name: str) -> bool:
    import onnx

    return any(node.name == name for node in onnx.load(str(path)).graph.node)


def _preprocess(model_path: Path, work: Path, progress) -> Path:
    """ORT's quantization pre-processing (shape inference, basic optimizations)."""
    from onnxruntime.quantization import quant_pre_process

    progress("pre-processing (shape inference, graph optimization)")
    target = work / "fp32.onnx"
    try:
        quant_pre_process(str(model_path), str(target))
    except Exception:  # symbolic shape inference gives up on some graphs: ONNX's inference only
        try:
            quant_pre_process(str(model_path), str(target), skip_symbolic_shape=True)
        except Exception as exc:
            raise QuantizationError(f"{model_path}: ONNX Runtime's quantization pre-processing "
                                    f"failed ({type(exc).__name__}: {_first(exc)})") from None
    return target


def _quantize_static(fp32: Path, int8: Path, model_input: ModelInput, calibration: np.ndarray,
                     method: str, per_channel: bool, kept: list[str]) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    reader = _Reader(model_input.name,
                     list(_batches(calibration, model_input.batch, repeat=True)))
    # the histogram calibrators print their progress on stdout: keep it off archc's output
    with contextlib.redirect_stdout(io.StringIO()):
        quantize_static(str(fp32), str(int8), reader, quant_format=QuantFormat.QDQ,
                        per_channel=per_channel, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=methods[method],
                        nodes_to_exclude=kept or None, extra_options={"WeightSymmetric": True})


def _ops_after_optimization(optimized: Path) -> tuple[dict[str, int], int]:
    """Integer-kernel op counts in the graph ORT runs, and the convs it still runs in float."""
    import onnx

    counts: dict[str, int] = {}
    float_convs = 0
    for node in onnx.load(str(optimized)).graph.node:
        if node.op_type.startswith("QLinear") or node.op_type in ("QGemm", "ConvInteger",
                                                                   "MatMulInteger"):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
        elif node.op_type in ("Conv", "FusedConv"):
            float_convs += 1
    return counts, float_convs


def _measure(fp32: Path, int8: Path, fp32_session, int8_session, model_input: ModelInput,
             dataset, threads: int, rounds: int, layers: int, progress) -> QuantizationReport:
    x, y = dataset.val_x, dataset.val_y
    progress(f"comparing on {len(y)} held-out images")
    reference = _run(fp32_session, model_input.name, x, model_input.batch)
    quantized = _run(int8_session, model_input.name, x, model_input.batch)
    if not np.isfinite(quantized).all():
        raise QuantizationError("the int8 model's outputs are not finite")
    agreement = 100.0 * float(np.mean(reference.argmax(1) == quantized.argmax(1)))
    report = QuantizationReport(
        output=int8, method="", per_channel=True, calibration_samples=0,
        held_out_samples=len(y), kept_float=[], sqnr_db=sqnr_db(reference, quantized),
        top1_agreement=agreement,
        fp32_accuracy=100.0 * float(np.mean(reference.argmax(1) == y)),
        int8_accuracy=100.0 * float(np.mean(quantized.argmax(1) == y)),
        paired=compare_paired(reference.argmax(1) == y, quantized.argmax(1) == y),
        int8_right=(quantized.argmax(1) == y).tolist())
    progress("per-tensor comparison")
    report.layers = layer_losses(fp32, int8, model_input, x[:HELD_OUT_LAYER_SAMPLES])[:layers]
    if rounds > 0:
        progress(f"latency: {rounds} interleaved rounds")
        from archc.backends.onnx_runtime import cpu_session

        one = x[:1] if model_input.batch is None else next(_batches(x, model_input.batch))
        timing = interleaved_latency(
            {"fp32": cpu_session(str(fp32), threads), "int8": cpu_session(str(int8), threads)},
            model_input.name, one, rounds)
        report.fp32_ms, report.int8_ms = timing["fp32"], timing["int8"]
    return report


def interleaved_latency(sessions: dict, name: str, x: np.ndarray, rounds: int,
                        iterations: int = 20, warmup: int = 5) -> dict[str, float]:
    """Median milliseconds per run of each ORT session on `x`, the sessions taking turns in
    every round (`archc.common.timing.interleaved`)."""
    timings = interleaved({key: lambda sess=sess: sess.run(None, {name: x})
                           for key, sess in sessions.items()}, rounds, iterations, warmup)
    return {key: 1e3 * timing.median for key, timing in timings.items()}


def layer_losses(fp32: Path, int8: Path, model_input: ModelInput, x: np.ndarray
                 ) -> list[LayerLoss]:
    """Per-tensor SQNR of the int8 model against the float one, the largest drops first."""
    import onnx

    float_model = onnx.load(str(fp32))
    int8_model = onnx.load(str(int8))
    types = _float_tensors(float_model)
    produced = {out: node for node in float_model.graph.node for out in node.output}
    int8_names = {out for node in int8_model.graph.node for out in node.output}
    pairs: dict[str, str] = {}
    for tensor in produced:
        if tensor not in types:
            continue
        seen = f"{tensor}_DequantizeLinear_Output"  # what the next layer reads
        if seen in int8_names:
            pairs[tensor] = seen
        elif tensor in int8_names:
            pairs[tensor] = tensor
    if not pairs:
        return []
    float_values = _outputs(float_model, list(pairs), model_input, x)
    int8_values = _outputs(int8_model, list(pairs.values()), model_input, x)
    sqnr = {tensor: sqnr_db(float_values[tensor], int8_values[pairs[tensor]])
            for tensor in pairs}
    # the model input as the int8 model's first layer reads it (its own quantization)
    seen_input = f"{model_input.name}_DequantizeLinear_Output"
    if seen_input in int8_names:
        sqnr[model_input.name] = sqnr_db(x, _outputs(int8_model, [seen_input], model_input,
                                                      x)[seen_input])
    losses = []
    for tensor in pairs:
        start, nodes = _upstream(tensor, produced, sqnr)
        value = sqnr[tensor]
        drop = 0.0 if start == value else start - value
        losses.append(LayerLoss("+".join(node.name for node in nodes),
                                "+".join(node.op_type for node in nodes), tensor, value, drop))
    losses.sort(key=lambda loss: -loss.drop_db)
    return losses


def _upstream(tensor: str, produced: dict, sqnr: dict[str, float]):
    """(worst SQNR among the nearest measured tensors `tensor` is computed from, the nodes from
    those tensors to `tensor`, in order): the quantizer may leave no Q/DQ pair between, e.g., a
    conv and its ReLU, so a layer can span several nodes."""
    node = produced[tensor]
    worst, nodes = math.inf, [node]
    for name in node.input:
        if name in sqnr:
            worst = min(worst, sqnr[name])
        elif name in produced:
            above, path = _upstream(name, produced, sqnr)
            worst = min(worst, above)
            nodes = [*(n for n in path if n not in nodes), *nodes]
    return worst, nodes


def _float_tensors(model) -> set[str]:
    import onnx

    found = set()
    for info in [*model.graph.value_info, *model.graph.output]:
        if info.type.tensor_type.elem_type == onnx.TensorProto.FLOAT:
            found.add(info.name)
    return found


def _outputs(model, names: list[str], model_input: ModelInput, x: np.ndarray
             ) -> dict[str, np.ndarray]:
    import onnx

    model = onnx.ModelProto.FromString(model.SerializeToString())
    existing = {output.name for output in model.graph.output}
    for name in names:
        if name not in existing:
            model.graph.output.append(
                onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    from archc.backends.onnx_runtime import cpu_session

    sess = cpu_session(model.SerializeToString())
    wanted = [output.name for output in model.graph.output]
    collected: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for part in _batches(x, model_input.batch):
        values = dict(zip(wanted, sess.run(wanted, {model_input.name: part})))
        for name in names:
            collected[name].append(values[name])
    return {name: np.concatenate(parts) for name, parts in collected.items()}
