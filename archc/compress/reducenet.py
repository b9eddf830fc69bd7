"""ReduceNet's two stages (seed 004) on archc checkpoints, and a LoRA-style branch that merges.

- `reduce(spec, gm)`: the reduced phase of a train-phase ReduceNet checkpoint: every `reducenet`
  stage gets `phase: reduced` (scaler 0: branch1 is not built) and every other weight is carried
  over by name (docs/spec.md: nothing else is missing, only `*.branch1.*` is dropped). Fine-tune it
  with the train phase as `--teacher` and the classifier frozen (`--freeze 'head.*'`).
- `LowRankBranch(r)`: a training plugin that puts a narrow linear branch beside every dense conv,
  y = conv(x) + up(down(x)) with down a KxK conv in -> r (the conv's stride, padding, dilation,
  no bias) and up a 1x1 conv r -> out initialised to 0 (training starts from the model's own
  function); the conv itself is frozen, the branch trains. `merge_branches` then folds each
  branch into its conv, W' = W + up . down (`archc.compress.lowrank_algebra.merge_low_rank_branch`):
  both are linear in x with the same window, so the merged conv computes the same function.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn
from torch.fx import GraphModule

from archc.compress.lowrank_algebra import frobenius_relative_error, merge_low_rank_branch
from archc.errors import ArchcError
from archc.train.loop import Plugin


class ReduceError(ArchcError):
    """A checkpoint that has no train-phase ReduceNet stage, or weights that do not carry over."""


def reduced_spec(spec: dict[str, Any]) -> dict[str, Any]:
    spec = copy.deepcopy(spec)
    stages = spec.get("body", {}).get("stages") or []
    found = [s for s in stages if s.get("block") == "reducenet" and s.get("phase", "train")
             == "train"]
    if not found:
        raise ReduceError("no reducenet stage in the train phase: nothing to reduce")
    for stage in found:
        stage["phase"] = "reduced"
    spec["name"] = f"{spec['name']}_reduced" if not spec["name"].endswith("_reduced") else \
        spec["name"]
    return spec


def reduce(spec: dict[str, Any], gm: GraphModule) -> tuple[dict[str, Any], GraphModule]:
    """(reduced spec, reduced graph with the train phase's weights but branch1's)."""
    from archc.frontend.loading import spec_from_mapping
    from archc.frontend.lower import build

    if gm.meta.get("archc_edits"):
        raise ReduceError("reduce a ReduceNet before pruning or decomposing it")
    new_spec = spec_from_mapping(reduced_spec(spec), "reduced spec")
    reduced = build(new_spec, device="meta")
    state = {k: v for k, v in gm.state_dict().items() if ".branch1." not in k}
    missing, unexpected = reduced.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ReduceError(f"the train-phase weights do not carry over: missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}")
    return new_spec.to_dict(), reduced.eval()


class BranchedConv(nn.Module):
    """conv(x) + up(down(x)): a frozen conv with a trainable rank-r linear branch."""

    def __init__(self, conv: nn.Conv2d, rank: int):
        super().__init__()
        self.conv = conv
        rank = min(rank, conv.in_channels, conv.out_channels)
        like = conv.weight
        self.down = nn.Conv2d(conv.in_channels, rank, conv.kernel_size, conv.stride, conv.padding,
                              conv.dilation, bias=False).to(like.device, like.dtype)
        self.up = nn.Conv2d(rank, conv.out_channels, 1, bias=False).to(like.device, like.dtype)
        nn.init.zeros_(self.up.weight)
        for parameter in conv.parameters():
            parameter.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x) + self.up(self.down(x))

    def merged(self) -> nn.Conv2d:
        conv = copy.deepcopy(self.conv)
        with torch.no_grad():
            conv.weight.copy_(merge_low_rank_branch(self.conv.weight, self.down.weight,
                                                    self.up.weight))
        for parameter in conv.parameters():
            parameter.requires_grad_(True)
        return conv


def _dense_convs(model: nn.Module) -> list[tuple[nn.Module, str, nn.Conv2d]]:
    found = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is nn.Conv2d and child.groups == 1 and child.padding_mode == "zeros" \
                    and not isinstance(child.padding, str) and not isinstance(parent,
                                                                              BranchedConv):
                found.append((parent, name, child))
    return found


class LowRankBranch(Plugin):
    def __init__(self, rank: int):
        if rank < 1:
            raise ArchcError(f"the branch rank must be at least 1, not {rank}")
        self.rank = rank

    def wrap(self, model: nn.Module) -> nn.Module:
        for parent, name, conv in _dense_convs(model):
            setattr(parent, name, BranchedConv(conv, self.rank))
        return model


def merge_branches(model: nn.Module, example: Tensor) -> tuple[int, float]:
    """Fold every BranchedConv into its conv, in place; (count, relative output error of the
    merged model against the branched one on `example`)."""
    model.eval()
    with torch.no_grad():
        before = model(example)
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, BranchedConv):
                setattr(parent, name, child.merged())
                count += 1
    with torch.no_grad():
        after = model(example)
    return count, frobenius_relative_error(before, after)
