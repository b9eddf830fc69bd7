"""archc: a graph-rewriting architecture compiler for convolutional networks.

Python API (imported lazily, so `import archc` and the CLI's argument parsing stay torch-free):

- `load_spec(path_or_mapping) -> Spec`
- `build(spec, seed=0, init="pycls") -> torch.fx.GraphModule`
- `complexity(graph_module, input_size) -> (flops, params, acts)`
- `export_onnx(graph_module, path, example_input, opset=18, ...) -> EmitReport`
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_spec": "archc.loading",
    "Spec": "archc.spec",
    "build": "archc.lower",
    "build_module": "archc.lower",
    "complexity": "archc.analysis",
    "complexity_report": "archc.analysis",
    "export_onnx": "archc.export",
    "load_model": "archc.importers",
    "export_program": "archc.export",
    "save_checkpoint": "archc.checkpoint",
    "load_checkpoint": "archc.checkpoint",
    "ArchcError": "archc.errors",
    "SpecError": "archc.errors",
    "PassError": "archc.errors",
    "ExportError": "archc.errors",
    "CheckpointError": "archc.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'archc' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
