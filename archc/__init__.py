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
    "load_spec": "archc.frontend.loading",
    "Spec": "archc.frontend.spec",
    "build": "archc.frontend.lower",
    "build_module": "archc.frontend.lower",
    "complexity": "archc.ir.analysis",
    "complexity_report": "archc.ir.analysis",
    "export_onnx": "archc.backends.export",
    "load_model": "archc.backends.importers",
    "export_program": "archc.backends.export",
    "save_checkpoint": "archc.backends.checkpoint",
    "load_checkpoint": "archc.backends.checkpoint",
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
