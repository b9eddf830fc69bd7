"""ONNX Runtime on the CPU: an ONNX classifier as a function of torch batches (`archc eval`), and
the session settings of timed runs (`archc bench`).

The model must take one float input (N, C, H, W) with fixed C, H and W; a fixed batch size N is
honoured by running N images at a time (the last chunk zero-padded, its padding dropped).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from archc.errors import DataError


def onnx_classifier(path: Path) -> tuple[Callable[[torch.Tensor], torch.Tensor], tuple[int, int],
                                          int]:
    """(run, (channels, size), number of outputs); `DataError` if the file does not fit."""
    import onnxruntime as ort

    try:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # missing file, not ONNX, unsupported ops
        raise DataError(f"{path}: cannot load the ONNX model ({type(exc).__name__}: "
                        f"{str(exc).strip().splitlines()[0][:200]})") from None
    inputs = session.get_inputs()
    if len(inputs) != 1 or inputs[0].type != "tensor(float)" or len(inputs[0].shape) != 4:
        raise DataError(f"{path}: expected one float input (N, C, H, W), got "
                        f"{[(i.name, i.type, i.shape) for i in inputs]}")
    batch, channels, height, width = inputs[0].shape
    if not all(isinstance(d, int) for d in (channels, height, width)) or height != width:
        raise DataError(f"{path}: the input must have fixed channels and a square size, got "
                        f"{inputs[0].shape}")
    outputs = session.get_outputs()[0].shape
    classes = outputs[-1] if outputs and isinstance(outputs[-1], int) else None
    name = inputs[0].name
    chunk = batch if isinstance(batch, int) else None

    def run(x: torch.Tensor) -> torch.Tensor:
        array = x.numpy()
        if chunk is None:
            return torch.from_numpy(session.run(None, {name: array})[0])
        pieces = []
        for start in range(0, len(array), chunk):
            part = array[start:start + chunk]
            padding = np.zeros((chunk - len(part), *part.shape[1:]), dtype=part.dtype)
            outputs = session.run(None, {name: np.concatenate([part, padding])})[0]
            pieces.append(outputs[:len(part)])
        return torch.from_numpy(np.concatenate(pieces))

    if classes is None:
        classes = run(torch.zeros((chunk or 1, channels, height, width))).shape[-1]
    return run, (channels, height), classes


def cpu_session(model: str | bytes, threads: int = 1, optimized: bool = True,
                save_optimized: Path | None = None):
    """An ONNX Runtime CPU session with `threads` intra-op threads that does not spin-wait: with
    sessions run in turns (interleaved timing), one session's spinning thread pool would steal
    the cores from the next (measured: a 2x penalty on whichever runs second). `optimized`:
    ORT's full graph optimizations, else none (to check the file itself). `save_optimized`:
    where ORT writes the graph it optimized (to count the kernels it chose)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    if save_optimized is not None:
        options.optimized_model_filepath = str(save_optimized)
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
