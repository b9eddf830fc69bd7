"""The golden-output regression suite: what is stored per spec, and how it is computed.

For every spec in `specs/`, at a small input (batch 2, 32x32, or the smallest of 64x64, 128x128,
224x224 that the network runs at) drawn from the versioned numpy generator, with weights from
`archc.ir.init.randomize` (seed 0, BN statistics calibrated then perturbed, so outputs are O(1)):

- `<spec>.npz`: `input`, `train` (eager train form), `deploy` (after the default pipeline),
  `onnx` (archc's ONNX of the deploy form in ONNX Runtime, graph optimizations disabled);
- `<spec>.json`: structural golden: the op-type histograms of the deploy FX graph and of the
  emitted ONNX graph (a lost fusion shows even when the numbers still match);
- `manifest.json`: generator, seed, input digests, versions, opset, tolerances.

Only `python tests/golden/regenerate.py` writes these files; tests only read them.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"
SEED = 0
INPUT_SHAPE_HW = 32
LARGER_SIDES = (64, 128, 224)  # for networks that do not run at 32 pixels
BATCH = 2
OPSET = 18
# Relative error max|Δ| / max|golden| allowed against a stored output: RTOL, or NOISE_FACTOR times
# the model's own float32 rounding (its distance from float64), whichever is larger: float32
# results vary with thread count and kernel choice by that much (deep RegNets: ~1e-5).
RTOL = 1e-5


def spec_names() -> list[str]:
    return sorted(p.stem for p in (ROOT / "specs").glob("*.yaml"))


def input_side(spec) -> int:
    """INPUT_SHAPE_HW, or the smallest of LARGER_SIDES at which the network runs (AlexNet's
    pools need 63 pixels), found on meta tensors."""
    import archc

    gm = archc.build(spec, device="meta")
    for side in (INPUT_SHAPE_HW, *LARGER_SIDES):
        try:
            gm(torch.empty(1, spec.input.channels, side, side, device="meta"))
        except RuntimeError:
            continue
        return side
    raise ValueError(f"{spec.name} runs at none of {(INPUT_SHAPE_HW, *LARGER_SIDES)} pixels")


def example_input(spec) -> torch.Tensor:
    from archc.ir.init import random_input

    side = input_side(spec)
    return random_input((BATCH, spec.input.channels, side, side), SEED)


def train_model(name: str):
    import archc

    spec = archc.load_spec(ROOT / "specs" / f"{name}.yaml")
    return spec, archc.build(spec, seed=SEED, init="random")


def deploy_model(train, x, verify: bool = True):
    import archc.passes  # noqa: F401 - registers the catalogue
    from archc.rewrite.pipeline import PassContext, resolve_pipeline, run_pipeline

    ctx = PassContext(verify=verify, example_inputs=(x,))
    return run_pipeline(train, resolve_pipeline("default"), ctx).graph_module


def fx_histogram(gm) -> dict[str, int]:
    from archc.ir.ops import op_kind

    ops = Counter(op_kind(gm, n) for n in gm.graph.nodes if n.op not in ("placeholder", "output"))
    return dict(sorted(ops.items()))


def onnx_run(deploy, x) -> tuple[np.ndarray, dict[str, int]]:
    """archc's ONNX of `deploy`, run in ONNX Runtime without graph optimizations (its export
    verified at the deploy graph's own float32 rounding, as `archc build` does)."""
    import onnx
    import onnxruntime as ort

    from archc.backends.export import export_onnx

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        export_onnx(deploy, path, x, opset=OPSET, rtol=tolerance(deploy, x))
        model = onnx.load(str(path))
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        (output,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    ops = Counter(node.op_type for node in model.graph.node)
    return output, dict(sorted(ops.items()))


def digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]


def compute(name: str) -> tuple[dict[str, np.ndarray], dict]:
    spec, train = train_model(name)
    x = example_input(spec)
    with torch.no_grad():
        train_out = train(x).numpy()
        deploy = deploy_model(train, x)
        deploy_out = deploy(x).numpy()
    onnx_out, onnx_ops = onnx_run(deploy, x)
    arrays = {"input": x.numpy(), "train": train_out, "deploy": deploy_out, "onnx": onnx_out}
    structure = {"deploy_fx_ops": fx_histogram(deploy), "onnx_ops": onnx_ops}
    return arrays, structure


def tolerance(train, x) -> float:
    """What a float32 output of this model may differ from its golden by."""
    from archc.ir.verify import artifact_tolerance, rounding_noise

    return artifact_tolerance(RTOL, rounding_noise(train, (x,)))


def versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    return {"torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "numpy": np.__version__}


def load(name: str) -> tuple[dict[str, np.ndarray], dict]:
    with np.load(GOLDEN / f"{name}.npz") as data:
        arrays = {key: data[key] for key in data.files}
    return arrays, json.loads((GOLDEN / f"{name}.json").read_text())


def manifest() -> dict:
    return json.loads((GOLDEN / "manifest.json").read_text())
