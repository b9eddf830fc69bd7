"""archc checkpoints (`.pt`): a spec and its weights, loadable with `torch.load(weights_only=True)`.

The payload is `{format: "archc-checkpoint", version, spec, state_dict}` and, for a pruned or
decomposed graph, `edits` (`archc.ir.graph_edits`: replayed on the spec's graph): plain containers
and tensors only, so loading runs no pickled code. Loading rebuilds the graph from the spec on the
meta device and assigns the stored tensors; a file of another kind, a spec that does not
validate or a state_dict that does not match its spec is one `CheckpointError`. Saving reloads
the bytes it is about to write and checks the rebuilt model against the graph it came from.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from torch.fx import GraphModule

from archc.backends.export import EmitReport, verify_emitted
from archc.common.fileio import atomic_output
from archc.errors import CheckpointError, SpecError, first_line
from archc.frontend.loading import spec_from_mapping
from archc.frontend.lower import build
from archc.ir.graph_edits import apply_edits, edits_of

CHECKPOINT_FORMAT = "archc-checkpoint"
CHECKPOINT_VERSION = 1


def save_checkpoint(
    gm: GraphModule,
    spec: dict[str, Any],
    path: str | Path,
    example_input: torch.Tensor,
    *,
    rtol: float = 1e-5,
) -> EmitReport:
    """An archc checkpoint: {format, version, spec, state_dict}; loads with weights_only=True."""
    report = EmitReport(Path(path), "pt", verified_with="torch.load(weights_only=True) + rebuild")
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "spec": spec,
        "state_dict": {k: v.detach().clone() for k, v in gm.state_dict().items()},
    }
    edits = edits_of(gm)
    if edits:  # a pruned or decomposed graph: the spec's graph plus these edits
        payload["edits"] = edits
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    _, rebuilt = load_checkpoint_bytes(data, str(path))
    verify_emitted(report, gm, rebuilt, example_input, False, rtol)
    with atomic_output(report.path) as temporary:
        temporary.write_bytes(data)
    report.bytes = len(data)
    return report


def load_checkpoint(path: str | Path) -> tuple[dict[str, Any], GraphModule]:
    """Load an archc checkpoint: (spec dict, GraphModule with weights). Raises CheckpointError."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return load_checkpoint_bytes(data, str(path))


def load_checkpoint_bytes(data: bytes, source: str) -> tuple[dict[str, Any], GraphModule]:
    """`load_checkpoint` on bytes already read; `source` names them in errors."""

    try:
        payload = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as exc:  # truncated zip, random bytes, pickled code refused by weights_only
        raise CheckpointError(f"{source}: not a loadable checkpoint ({first_line(exc)})") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{source}: not an archc checkpoint (no format: {CHECKPOINT_FORMAT!r})"
        )
    if payload.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{source}: checkpoint version {payload.get('version')!r} "
            f"is not supported (expected {CHECKPOINT_VERSION})"
        )
    try:
        spec = spec_from_mapping(payload.get("spec"), f"{source}[spec]")
    except SpecError as exc:
        raise CheckpointError(str(exc)) from None
    gm = build(spec, device="meta")
    edits = payload.get("edits", [])
    if not isinstance(edits, list):
        raise CheckpointError(f"{source}: edits must be a list")
    if edits:
        apply_edits(gm, edits, device="meta")
    state = payload.get("state_dict")
    if not isinstance(state, dict):
        raise CheckpointError(f"{source}: state_dict is missing")
    try:
        gm.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{source}: state_dict does not match its spec: {_state_dict_mismatch(exc)}"
        ) from None
    return spec.to_dict(), gm.eval()


def _state_dict_mismatch(exc: RuntimeError) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return "; ".join(lines[1:3]) if len(lines) > 1 else lines[0]
