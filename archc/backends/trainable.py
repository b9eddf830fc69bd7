"""A classifier to fine-tune or evaluate in whatever format it came, written back in that format.

`load_trainable(path)` reads what `archc train`, `eval`, `qat`, `lowrank` and `--teacher` take:

- a spec (.yaml/.json, a shipped name): built with archc's initialisation; written back as an
  archc checkpoint (.pt);
- an archc checkpoint (.pt): its GraphModule; written back as an archc checkpoint;
- a torch.export program (.pt2): the lifted graph in canonical form; written back as a program
  (`export_program`, dynamic batch), as archc's other `.pt2` outputs, with the spec archc stored
  in it (`program_spec`: a program written from a spec model) if any;
- a whole pickled nn.Module (.pt, only with `trust_pickle`): the unpickled module itself, its own
  class and forward; written back pickled (`torch.save(module)`, reloaded and checked).

A program is lifted to module level (`archc.backends.importers`) and brought to the canonical form
(`canonical_graph`), in which each BatchNorm the program ran on its running statistics
(`aten.batch_norm(..., training=False)`, as `torch.export` records a model exported in eval mode) is
an `nn.BatchNorm` module again: in training mode it normalises with batch statistics and updates
its running ones, so fine-tuning trains BN as the original network would. Two things a program
cannot give back: dropout, which an eval-mode export records as the identity, stays off, and a
program exported in training mode (BN on batch statistics) is refused. Parameters stay
`nn.Parameter`s under their original names (`layer1.0.conv1.weight`, `bn1.weight`), so
`--freeze` patterns read as in the source model, and a program written back and read again keeps
them.

The input (channels, height, width) comes from the spec, from the program's example input, or
from `input_shape` (`--input-shape`); a pickled module records none, so its first conv's channels
at 224x224 are assumed unless given. One forward pass at that input must give `[N, K]` logits: K is
the number of classes. Resume (`--resume`) identifies a model without a spec by its kind and the
SHA-256 of its file.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from archc.backends.export import EmitReport, export_program, verify_emitted
from archc.common.fileio import atomic_output
from archc.errors import CheckpointError, DataError, ExportError, first_line

SPEC = "spec"
CHECKPOINT = "archc checkpoint"
PROGRAM = "torch.export program"
PICKLED = "pickled nn.Module"
OUTPUT_SUFFIX = {SPEC: ".pt", CHECKPOINT: ".pt", PROGRAM: ".pt2", PICKLED: ".pt"}
MODEL_SUFFIXES = (".pt", ".pth", ".pt2")  # read as models; any other path is a spec


@dataclass
class Trainable:
    source: Path
    kind: str  # SPEC, CHECKPOINT, PROGRAM or PICKLED
    name: str
    input_shape: tuple[int, int, int, int]  # (1, C, H, W)
    num_outputs: int  # K of its [N, K] logits (a spec's num_classes)
    spec: dict[str, Any] | None = None  # archc's spec, for a spec or a checkpoint
    module: nn.Module | None = None  # None for a spec: `model(seed)` builds it
    program_spec: dict[str, Any] | None = None  # the spec a .pt2 stores (`program_spec`)

    @property
    def channels(self) -> int:
        return self.input_shape[1]

    @property
    def size(self) -> int:
        return self.input_shape[2]

    def model(self, seed: int = 0) -> nn.Module:
        """The module to train: the loaded one, or the spec built with `seed`."""
        if self.module is None:
            from archc.frontend.loading import spec_from_mapping
            from archc.frontend.lower import build

            self.module = build(spec_from_mapping(self.spec, str(self.source)), seed=seed)
        return self.module

    def graph_module(self):
        """The model as a torch.fx GraphModule (a pickled module traced), for graph passes."""
        from torch.fx import GraphModule

        from archc.backends.importers import trace

        model = self.model()
        return model if isinstance(model, GraphModule) else trace(model, str(self.source))

    def example(self, batch: int = 2, seed: int = 0) -> torch.Tensor:
        from archc.ir.init import random_input

        return random_input((batch, *self.input_shape[1:]), seed)

    def identity(self) -> dict[str, Any]:
        """What a run state records of the model (`archc.train.state`): the spec, or the kind and
        the file's SHA-256."""
        if self.spec is not None:
            return {"spec": self.spec}
        digest = hashlib.sha256(self.source.read_bytes()).hexdigest()
        return {"model": {"kind": self.kind, "sha256": digest}}

    def check_classes(self, classes: int, data_name: str) -> None:
        """A DataError if a model without a spec has fewer outputs than the data has classes
        (a spec's model: `archc.train.loop.check_classes`, whose fix is a spec field)."""
        if self.spec is None and classes > self.num_outputs:
            raise DataError(f"{self.source} gives {self.num_outputs} outputs but {data_name} has "
                            f"{classes} classes: its classifier needs {classes} outputs")

    def check_output(self, path: Path, option: str = "-o") -> None:
        """A CheckpointError unless `path` has this model's own format."""
        wanted = OUTPUT_SUFFIX[self.kind]
        if path.suffix.lower() != wanted:
            what = {SPEC: "a spec", CHECKPOINT: "an archc checkpoint"}.get(self.kind,
                                                                         f"a {self.kind}")
            form = {".pt2": "a torch.export program", ".pt": "an archc checkpoint"}[wanted]
            if self.kind == PICKLED:
                form = "a pickled nn.Module"
            raise CheckpointError(f"{option} {path}: {self.source} is {what}: it is written back "
                                  f"in its own format, as {form} (-o NAME{wanted})")

    def save(self, module: nn.Module, path: Path, example: torch.Tensor) -> EmitReport:
        """Write `module` (this model, trained) in the model's own format, verified."""
        self.check_output(path)
        if self.kind in (SPEC, CHECKPOINT):
            from archc.backends.checkpoint import save_checkpoint

            return save_checkpoint(module, self.spec, path, example)
        if self.kind == PROGRAM:
            return export_program(module, path, example, dynamic_batch=True,
                                  spec=self.program_spec)
        return save_pickled_module(module, path, example)


def load_trainable(path: Path, *, trust_pickle: bool = False,
                   input_shape: tuple[int, ...] | None = None) -> Trainable:
    """The model in `path` (module docstring); raises CheckpointError or SpecError."""
    path = Path(path)
    if path.suffix.lower() not in MODEL_SUFFIXES:
        from archc.frontend.loading import load_spec

        spec = load_spec(path)
        if input_shape is not None:
            raise CheckpointError(f"--input-shape: {path} is a spec, whose input is "
                                  f"{spec.input.channels}x{spec.input.size}x{spec.input.size}; "
                                  f"set input in the spec instead")
        side = spec.input.size
        return Trainable(path, SPEC, spec.name, (1, spec.input.channels, side, side),
                         spec.num_classes, spec.to_dict())
    from archc.backends.importers import canonical_graph, check_example, load_model

    imported = load_model(path, trust_pickle=trust_pickle)
    if imported.spec is not None:
        if input_shape is not None:
            raise CheckpointError(f"--input-shape: {path} is an archc checkpoint, whose spec "
                                  f"gives its input")
        from archc.frontend.loading import spec_from_mapping

        classes = spec_from_mapping(imported.spec, str(path)).num_classes
        return Trainable(path, CHECKPOINT, imported.name, imported.input_shape, classes,
                         imported.spec, imported.graph_module)
    shape = _image_shape(path, input_shape or imported.input_shape, imported.kind,
                         input_shape is not None)
    example = _example(shape)
    check_example(imported.graph_module, example, str(path))
    if imported.kind == PICKLED:
        module = imported.module
    else:
        try:
            module = canonical_graph(imported.graph_module, example)
        except Exception as exc:  # a pass that fails on a graph archc has never seen
            raise CheckpointError(f"{path}: cannot bring the program to canonical form "
                                  f"({first_line(exc)})") from None
        _refuse_batch_statistics(module, path)
    stored = None
    if imported.kind == PROGRAM:
        from archc.backends.export import program_spec

        stored = program_spec(path)
    return Trainable(path, imported.kind, imported.name, shape,
                     _outputs(module, example, path), None, module, stored)


def _example(shape: tuple[int, ...]) -> torch.Tensor:
    from archc.ir.init import random_input

    return random_input((2, *shape[1:]), 0)


def _image_shape(path: Path, shape: tuple[int, ...] | None, kind: str,
                 given: bool) -> tuple[int, int, int, int]:
    """(1, C, S, S): archc's data are square images."""
    if shape is None:
        raise CheckpointError(f"{path}: the {kind} records no input shape and its first layer "
                              f"is neither a conv nor a Linear; give --input-shape N,C,H,W")
    where = "--input-shape" if given else f"the {kind}'s input"
    if len(shape) != 4 or shape[2] != shape[3]:
        raise CheckpointError(f"{path}: {where} is {'x'.join(map(str, shape))}; archc trains "
                              f"and evaluates on square images, N,C,S,S (give --input-shape)")
    return (1, shape[1], shape[2], shape[3])


def _outputs(module: nn.Module, example: torch.Tensor, path: Path) -> int:
    """K of the [N, K] logits the model gives at `example`; a CheckpointError otherwise."""
    module.eval()
    try:
        with torch.no_grad():
            output = module(example)
    except Exception as exc:
        raise CheckpointError(f"{path}: the model does not run at the input "
                              f"{'x'.join(map(str, example.shape))} ({first_line(exc)}); give "
                              f"--input-shape N,C,H,W") from None
    if not isinstance(output, torch.Tensor):
        raise CheckpointError(f"{path}: the model returns a {type(output).__name__}, not one "
                              f"[N, K] tensor of class logits")
    if output.ndim != 2 or output.shape[0] != example.shape[0] or not output.is_floating_point():
        raise CheckpointError(f"{path}: the model's output is a {output.dtype} tensor of shape "
                              f"{list(output.shape)} for a batch of {example.shape[0]}, not "
                              f"[N, K] class logits")
    other = torch.cat([example, example[:1]])  # training feeds batches of any size
    try:
        with torch.no_grad():
            shape = tuple(module(other).shape)
    except Exception as exc:
        shape = f"fails ({first_line(exc)})"
    if shape != (len(other), output.shape[1]):
        raise CheckpointError(f"{path}: at a batch of {len(other)} the model's output {shape} is "
                              f"not [{len(other)}, {output.shape[1]}]: it holds a fixed batch "
                              f"size; export it with a dynamic batch (dynamic_shapes={{'x': "
                              f"{{0: torch.export.Dim('batch')}}}})")
    return int(output.shape[1])


def _refuse_batch_statistics(module: nn.Module, path: Path) -> None:
    """A program exported in training mode normalises with batch statistics in any mode."""
    from archc.ir.ops import BN_FUNCTIONS, aten_name

    for node in module.graph.nodes:
        if node.op == "call_function" and (node.target in BN_FUNCTIONS
                                           or aten_name(node) == "batch_norm") and (
                len(node.args) > 5 and node.args[5] is not False):
            raise CheckpointError(f"{path}: the program was exported in training mode (BatchNorm "
                                  f"{node.name} uses batch statistics); export the model after "
                                  f"model.eval()")


def save_pickled_module(module: nn.Module, path: Path, example: torch.Tensor,
                        rtol: float = 1e-5) -> EmitReport:
    """`torch.save(module)` (a whole pickled module, its class by reference), reloaded and
    checked against `module`, written atomically."""
    report = EmitReport(Path(path), "pt", verified_with="torch.load(weights_only=False)")
    buffer = io.BytesIO()
    try:
        torch.save(module, buffer)
    except Exception as exc:  # a lambda or a local class in the module cannot be pickled
        raise ExportError(f"{path}: cannot pickle the module ({first_line(exc)})") from None
    data = buffer.getvalue()
    reloaded = torch.load(io.BytesIO(data), weights_only=False, map_location="cpu").eval()
    verify_emitted(report, module.eval(), reloaded, example, False, rtol)
    with atomic_output(report.path) as temporary:
        temporary.write_bytes(data)
    report.bytes = len(data)
    return report
