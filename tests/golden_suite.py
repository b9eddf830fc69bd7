"""The golden-output regression suite: what is stored per spec, and how it is computed.

For every spec in `specs/`, at a small input (batch 2, 32x32) drawn from the versioned numpy
generator, with weights from `archc.init.randomize` (seed 0, BN statistics calibrated then
perturbed, so outputs are O(1)):

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
BATCH = 2
OPSET = 18
# DECISIONS.md tiers: eager before/after passes and eager vs ONNX Runtime (no graph optimizations)
RTOL, ATOL = 1e-4, 1e-5


def spec_names() -> list[str]:
    return sorted(p.stem for p in (ROOT / "specs").glob("*.yaml"))


def example_input(spec) -> torch.Tensor:
    from archc.init import random_input

    return random_input((BATCH, spec.input.channels, INPUT_SHAPE_HW, INPUT_SHAPE_HW), SEED)


def train_model(name: str):
    import archc

    spec = archc.load_spec(ROOT / "specs" / f"{name}.yaml")
    return spec, archc.build(spec, seed=SEED, init="random")


def deploy_model(train, x, verify: bool = True):
    from archc.pipeline import PassContext, resolve_pipeline, run_pipeline

    ctx = PassContext(verify=verify, example_inputs=(x,))
    return run_pipeline(train, resolve_pipeline("default"), ctx).graph_module


def fx_histogram(gm) -> dict[str, int]:
    from archc.pipeline import op_kind

    ops = Counter(op_kind(gm, n) for n in gm.graph.nodes if n.op not in ("placeholder", "output"))
    return dict(sorted(ops.items()))


def onnx_run(deploy, x) -> tuple[np.ndarray, dict[str, int]]:
    """archc's ONNX of `deploy`, run in ONNX Runtime without graph optimizations."""
    import onnx
    import onnxruntime as ort

    from archc.export import export_onnx

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        export_onnx(deploy, path, x, opset=OPSET)
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
