"""Changing the channel counts of a built graph: one routine for removing channels (structured
pruning, `archc.compress.pruning`) and inserting zero channels (`align_channels`, passes/layout.py).

A resize gives, for some channel groups of `archc.ir.channels`, the *source* of every new channel:
a LongTensor s of the new size C' in which new channel j is old channel s[j], or a new zero
channel where s[j] = `NEW` (-1). The sourced entries increase: the old channels keep their order.
Removing channels is the case without `NEW` entries (s = the kept channels); padding the case
that keeps every old channel (old channel i moves to π(i): s[π(i)] = i, `NEW` elsewhere).

Composites follow their parts (`complete_sources`): a concatenation's new channels are its parts'
new channels one after the other (o + s_p[t], `NEW` stays `NEW`); an interleave (a shuffle's
output, parts (offset o, stride g)) keeps the positions o + g s_p[t] of its parts' kept channels in
order, which is exact for removal with lockstep segments (docs/channels.md); padding through it is
refused.

Every member of a resized group is rewritten by the handler of its kind, so the function is kept
exactly (a removed channel must be dead, a new channel is exactly 0 wherever it is read):

- conv (dense, grouped, depthwise), Linear: W'[o', c'] = W[o, i - G(o) I/g] with o = s_out[o'],
  i = s_in[G'(o') I'/g' + c'], where both are sourced and in the same old group
  (G(o) = o // (O/g) = i // (I/g)); 0 elsewhere, so a new row writes 0 and a new column reads
  nothing. b'[o'] = b[s_out[o']], 0 on new rows. The group count: 1 for a dense conv, C' for a
  depthwise one (groups = C_in = C_out), else the number of old groups that keep a sourced row
  (removing whole groups lowers it; padding and per-group removal keep g);
- BN: γ, β, μ gathered with s, σ² too; on a new channel μ = 0, σ² = 1, γ = 0, β = 0, so BN maps
  its 0 to exactly 0 (copied statistics would give β - μγ/σ);
- LayerNorm over the channels: γ and β gathered with s. Its mean and variance run over the
  channels, so any change of their number changes its output: removal is exact only where the
  LayerNorm's channels are all kept, and padding through it is refused;
- GroupNorm: γ, β gathered with s; its groups are removed whole (`kept_norm_groups`: the kept
  channels must be whole old groups, so every kept group's statistics are unchanged), new
  channels are refused; PReLU with one slope per channel: slopes gathered, 0 on new channels
  (prelu(0) = 0); an Embedding [num, C]: its columns gathered with s, 0 on new channels (a
  looked-up row is 0 there);
- a per-channel constant (`graph.constants`: a layer scale `x * gamma`, a shift `x + beta`, a
  position embedding `x + pos`, a functional PReLU's slopes): gathered along its channel dim with
  s, 0 on new channels;
- a split, chunk or channel slice of a resized group (`graph.cuts`, on whichever dim holds the
  channels): an old boundary b moves to
  the number of new channels before it, a `NEW` channel counting with the channel before it
  (`cut_bounds`); a chunk becomes a split;
- a reshape that writes a resized group's channel count as a literal (`graph.sizes`:
  `reshape(B, N, 64)` merging attention heads) requests the new count; a head split that writes
  its head count as a literal (`graph.heads`: `view(B, N, 4, -1)`) requests the new count of
  heads, its input's new size over its result's.

Every change is recorded as a graph edit (`archc.ir.graph_edits`: `module`, `tensor`, `split`), so
an archc checkpoint of the resized graph rebuilds it. Modules are replaced, never written in place.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.fx import GraphModule, Node

from archc.errors import ArchcError
from archc.ir.channel_dims import index_place
from archc.ir.channels import ChannelGraph, ChannelGroup
from archc.ir.graph import attribute
from archc.ir.graph_edits import (
    make_module,
    module_config,
    put_module,
    put_reshape,
    put_slice,
    put_split,
    put_tensor,
)
from archc.ir.ops import BN_MODULES, CONV_MODULES
from archc.ir.shapes import node_shape

NEW = -1  # the source of a new (zero) channel
Sources = dict[int, Tensor]  # channel group index -> the source of each of its new channels


class ResizeError(ArchcError):
    """A resize the graph cannot take: a grouped conv whose new groups would mix or split its old
    groups, padding through a channel shuffle, a source that reorders or repeats channels."""


# ---- pure tensor functions ----

def gather(tensor: Tensor, source: Tensor, dim: int = 0, fill: float = 0.0) -> Tensor:
    """`t'[.., j, ..] = t[.., s[j], ..]` along `dim`, `fill` where s[j] = NEW."""
    moved = tensor.detach().movedim(dim, 0)
    result = moved.new_full((len(source), *moved.shape[1:]), fill)
    sourced = source >= 0
    result[sourced] = moved[source[sourced]]
    return result.movedim(0, dim).contiguous()


def kept_norm_groups(source: Tensor, channels: int, groups: int) -> int:
    """The group count of a GroupNorm over `channels` in `groups` groups whose channels become
    `source`: the number of old groups it keeps. Raises ValueError unless `source` keeps whole
    groups (every channel of a kept group, no new channel): a partial group would be normalized
    with other statistics."""
    width = channels // groups
    if bool((source < 0).any()):
        raise ValueError("a GroupNorm cannot take new channels")
    kept = torch.unique(source // width)
    if len(source) != len(kept) * width:
        raise ValueError(f"a GroupNorm keeps whole groups of {width} channels only")
    return len(kept)


def resized_groups(groups: int, in_channels: int, out_channels: int, out_source: Tensor) -> int:
    """The group count of a conv whose output channels become `out_source`: 1 for a dense conv,
    the new channel count for a depthwise one (groups = C_in = C_out), else the number of old
    groups that keep a sourced output channel."""
    if groups == 1:
        return 1
    if groups == in_channels == out_channels:
        return len(out_source)
    return len(torch.unique(out_source[out_source >= 0] // (out_channels // groups)))


def resize_weight(weight: Tensor, out_source: Tensor, in_source: Tensor, groups: int,
                  new_groups: int) -> Tensor:
    """The weight of a conv (`[O, I/g, k...]`) or Linear (`[O, I]`, g = 1) whose output channels
    become `out_source` and input channels `in_source`, with `new_groups` groups (module
    docstring): W'[o', c'] = W[o, i - G(o) I/g] where o = s_out[o'] and
    i = s_in[G'(o') I'/g' + c'] are sourced and in one old group, 0 elsewhere.

    Raises ValueError unless each new group reads and writes channels of a single old group, a
    different one for each new group: otherwise weights would be lost."""
    out_channels, per_group = weight.shape[:2]
    out_size, in_size = len(out_source), len(in_source)
    if out_channels % groups or out_size % new_groups or in_size % new_groups:
        raise ValueError(f"{out_channels} -> {out_size} outputs and {in_size} inputs do not "
                         f"divide into {groups} -> {new_groups} groups")
    if groups == new_groups == 1 and bool((out_source >= 0).all()) \
            and bool((in_source >= 0).all()):  # dense, removal only: rows and columns
        return weight.detach().index_select(0, out_source).index_select(1, in_source)
    out_width, new_in_width = out_channels // groups, in_size // new_groups
    new_group = torch.arange(out_size) // (out_size // new_groups)
    _check_groups(new_group, out_source // out_width,
                  torch.arange(in_size) // new_in_width, in_source // per_group,
                  out_source >= 0, in_source >= 0)
    inputs = new_group[:, None] * new_in_width + torch.arange(new_in_width)  # [O', I'/g']
    rows = out_source[:, None].expand_as(inputs)
    columns = in_source[inputs]
    old_group = rows // out_width
    kept = (rows >= 0) & (columns >= 0) & (columns // per_group == old_group)
    result = weight.detach().new_zeros((out_size, new_in_width, *weight.shape[2:]))
    result[kept] = weight.detach()[rows[kept], columns[kept] - old_group[kept] * per_group]
    return result


def _check_groups(new_rows: Tensor, old_rows: Tensor, new_columns: Tensor, old_columns: Tensor,
                  sourced_rows: Tensor, sourced_columns: Tensor) -> None:
    """The (new group, old group) pairs of the sourced rows and columns are a one-to-one map."""
    pairs = torch.unique(torch.stack([torch.cat([new_rows[sourced_rows],
                                                 new_columns[sourced_columns]]),
                                      torch.cat([old_rows[sourced_rows],
                                                 old_columns[sourced_columns]])]), dim=1)
    if len(torch.unique(pairs[0])) != pairs.shape[1] or \
            len(torch.unique(pairs[1])) != pairs.shape[1]:
        raise ValueError("a new group of the conv would mix or split the channels of its old "
                         "groups (every group must keep rows and inputs, in equal counts)")


def cut_bounds(source: Tensor, bounds: Sequence[int]) -> list[int]:
    """Where the old channel boundaries `bounds` of a cut land: the number of new channels
    before each, a NEW channel counting with the channel before it (padding follows the channels
    it pads, so every piece keeps its own)."""
    anchors = torch.cummax(source.clamp(min=0), 0).values
    return torch.searchsorted(anchors, torch.as_tensor(list(bounds), dtype=anchors.dtype)).tolist()


def composite_source(parts: Sequence[tuple[int, int, Tensor]]) -> Tensor:
    """A composite's source from its parts' (offset, stride, source), in channel order: a
    concatenation (strides 1) is its parts' new channels one after the other; an interleave keeps
    its parts' kept positions, in order (removal only)."""
    if all(stride == 1 for _, stride, _ in parts):
        return torch.cat([torch.where(source >= 0, source + offset, NEW)
                          for offset, _, source in parts])
    if any(bool((source < 0).any()) for _, _, source in parts):
        raise ValueError("new channels inside a channel shuffle's interleave are not supported")
    return torch.sort(torch.cat([offset + stride * source for offset, stride, source in parts]
                                )).values


# ---- the graph ----

def complete_sources(graph: ChannelGraph, sources: Sources) -> Sources:
    """`sources` plus the source of every composite one of whose parts changes (a composite
    given in `sources` keeps its own); groups left as they are are dropped."""
    complete = dict(sources)

    def source_of(group: ChannelGroup) -> Tensor | None:
        if group.index in complete or not group.parts:
            return complete.get(group.index)
        found = [source_of(graph.groups[part.group]) for part in group.parts]
        if all(source is None for source in found):
            return None
        complete[group.index] = composite_source([
            (part.offset, part.stride, torch.arange(part.size) if source is None else source)
            for part, source in zip(group.parts, found)])
        return complete[group.index]

    for group in graph.groups:
        try:
            source_of(group)
        except ValueError as exc:
            raise ResizeError(f"{group.label()}: {exc}") from None
    for index, source in complete.items():
        sourced = source[source >= 0]
        if (sourced.diff() <= 0).any() or (sourced >= graph.groups[index].size).any():
            raise ResizeError(f"{graph.groups[index].label()}: a resize must keep old channels "
                              f"in order, each once")
    return {index: source for index, source in complete.items()
            if not torch.equal(source, torch.arange(graph.groups[index].size))}


def resized_layers(gm: GraphModule, graph: ChannelGraph, sources: Sources
                   ) -> Iterator[tuple[Node, nn.Module, Tensor, Tensor]]:
    """(node, module, input source, output source) of every conv, Linear, BN, LayerNorm,
    GroupNorm and PReLU module call that reads or writes a group of the complete `sources`, in
    graph order."""
    for node in gm.graph.nodes:
        if node.op != "call_module" or node not in graph.index:
            continue
        module = gm.get_submodule(node.target)
        if type(module) not in _LAYERS:
            continue
        out_group, in_group = graph.index[node], graph.index.get(node.args[0], -1)
        if out_group in sources or in_group in sources:  # -1: an Embedding's indices
            yield node, module, _source(graph, sources, in_group), \
                _source(graph, sources, out_group)


def resize_channels(gm: GraphModule, graph: ChannelGraph, sources: Sources) -> None:
    """Resize the groups of `sources` (their composites follow) and every member of them, by the
    handler of its kind (module docstring); record each change as a graph edit."""
    sources = complete_sources(graph, sources)
    for node, module, in_source, out_source in list(resized_layers(gm, graph, sources)):
        try:
            resized = _LAYERS[type(module)](module, in_source, out_source)
        except ValueError as exc:
            raise ResizeError(f"{node.target}: {exc}") from None
        if resized is not None:
            _replace(gm, str(node.target), module, *resized)
    for node, reads in graph.constants.items():
        if graph.index[node] in sources:
            for name, dim, _ in reads:
                put_tensor(gm, name, gather(attribute(gm, name), sources[graph.index[node]], dim))
    for node, whole in graph.cuts.items():
        if whole in sources:
            _recut(gm, node, sources[whole], graph.groups[whole].size, graph.dim(node.args[0]))
    for node, at in graph.sizes.items():
        if graph.index[node] in sources:
            put_reshape(gm, node, at, len(sources[graph.index[node]]))
    for heads in graph.heads:
        for node, at in heads.literals:
            whole, head = graph.index[node.args[0]], graph.index[node]
            if whole in sources:
                count = len(sources[whole]) // len(_source(graph, sources, head))
                if count != heads.count:
                    put_reshape(gm, node, at, count)
    gm.graph.lint()
    gm.recompile()


def _source(graph: ChannelGraph, sources: Sources, group: int) -> Tensor:
    """The group's source (-1: no group, an Embedding's indices: an empty one)."""
    if group < 0:
        return torch.empty(0, dtype=torch.long)
    found = sources.get(group)
    return torch.arange(graph.groups[group].size) if found is None else found


def _resize_conv(conv: nn.Module, in_source: Tensor, out_source: Tensor
                 ) -> tuple[dict, dict[str, Tensor]]:
    groups = resized_groups(conv.groups, conv.in_channels, conv.out_channels, out_source)
    config = {**module_config(conv), "in": len(in_source), "out": len(out_source),
              "groups": groups}
    tensors = {"weight": resize_weight(conv.weight, out_source, in_source, conv.groups, groups)}
    if conv.bias is not None:
        tensors["bias"] = gather(conv.bias, out_source)
    return config, tensors


def _resize_linear(linear: nn.Linear, in_source: Tensor, out_source: Tensor
                   ) -> tuple[dict, dict[str, Tensor]]:
    config = {**module_config(linear), "in": len(in_source), "out": len(out_source)}
    tensors = {"weight": resize_weight(linear.weight, out_source, in_source, 1, 1)}
    if linear.bias is not None:
        tensors["bias"] = gather(linear.bias, out_source)
    return config, tensors


def _resize_layer_norm(norm: nn.LayerNorm, in_source: Tensor, out_source: Tensor
                       ) -> tuple[dict, dict[str, Tensor]]:
    if bool((out_source < 0).any()):
        raise ValueError("a new channel would change the LayerNorm's mean and variance")
    config = {**module_config(norm), "shape": [len(out_source)]}
    tensors = {key: gather(getattr(norm, key), out_source) for key in ("weight", "bias")
               if getattr(norm, key) is not None}
    return config, tensors


def _resize_norm(norm: nn.Module, in_source: Tensor, out_source: Tensor
                 ) -> tuple[dict, dict[str, Tensor]]:
    """New channels: μ = 0, σ² = 1, γ = 0, β = 0, so BN maps their 0 to exactly 0."""
    config = {**module_config(norm), "features": len(out_source)}
    fills = {"weight": 0.0, "bias": 0.0, "running_mean": 0.0, "running_var": 1.0}
    tensors = {key: gather(getattr(norm, key), out_source, fill=fill)
               for key, fill in fills.items() if getattr(norm, key) is not None}
    if norm.num_batches_tracked is not None:
        tensors["num_batches_tracked"] = norm.num_batches_tracked
    return config, tensors


def _resize_group_norm(norm: nn.GroupNorm, in_source: Tensor, out_source: Tensor
                       ) -> tuple[dict, dict[str, Tensor]]:
    groups = kept_norm_groups(out_source, norm.num_channels, norm.num_groups)
    config = {**module_config(norm), "groups": groups, "features": len(out_source)}
    tensors = {key: gather(getattr(norm, key), out_source) for key in ("weight", "bias")
               if getattr(norm, key) is not None}
    return config, tensors


def _resize_prelu(prelu: nn.PReLU, in_source: Tensor, out_source: Tensor
                  ) -> tuple[dict, dict[str, Tensor]] | None:
    """One slope per channel: gathered (0 on new channels); a single slope stays."""
    if prelu.num_parameters == 1:
        return None
    return {**module_config(prelu), "features": len(out_source)}, {
        "weight": gather(prelu.weight, out_source)}


def _resize_embedding(embedding: nn.Embedding, in_source: Tensor, out_source: Tensor
                      ) -> tuple[dict, dict[str, Tensor]]:
    """W'[:, c'] = W[:, s[c']] (the channels are the weight's columns), 0 on new channels."""
    return {**module_config(embedding), "features": len(out_source)}, {
        "weight": gather(embedding.weight, out_source, dim=1)}


# module type -> its handler: (module, input source, output source) -> (config, tensors), None
# if the module stays as it is
_LAYERS: dict[type, Callable[[nn.Module, Tensor, Tensor],
                             tuple[dict, dict[str, Tensor]] | None]] = {
    **dict.fromkeys(CONV_MODULES, _resize_conv),
    nn.Linear: _resize_linear,
    **dict.fromkeys(BN_MODULES, _resize_norm),
    nn.LayerNorm: _resize_layer_norm,
    nn.GroupNorm: _resize_group_norm,
    nn.PReLU: _resize_prelu,
    nn.Embedding: _resize_embedding,
}


def _replace(gm: GraphModule, name: str, old: nn.Module, config: dict,
             tensors: dict[str, Tensor]) -> None:
    """Put a module built from `config` at `name` with `tensors`, in `old`'s dtype, device, mode
    and requires_grad; record it."""
    reference = next(old.parameters(), None)
    if reference is None:
        reference = next(old.buffers())
    with torch.device("meta"):  # every tensor is set below: no initialization to pay for
        new = make_module(config).to(reference.dtype)
    if {key for key, _ in (*new.named_parameters(), *new.named_buffers())} - tensors.keys():
        raise ResizeError(f"{name}: the resize gives only {', '.join(tensors)}")
    new = new.to_empty(device=reference.device)
    new.train(old.training)
    with torch.no_grad():
        for key, value in tensors.items():
            target = getattr(new, key)
            if isinstance(target, nn.Parameter):
                setattr(new, key, nn.Parameter(value.detach().clone().to(reference.dtype),
                                               requires_grad=getattr(old, key).requires_grad))
            else:
                target.copy_(value)
    put_module(gm, name, new)


def _recut(gm: GraphModule, node: Node, source: Tensor, size: int, dim: int) -> None:
    """Give a split, chunk or channel slice (of channel dim `dim`) of a resized group its new
    bounds."""
    if node.target is operator.getitem:  # x[:, a:b], x[..., a:b]
        index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        at = index_place(index, len(node_shape(node.args[0])), dim)
        start, stop = index[at].indices(size)[:2]
        put_slice(gm, node, *cut_bounds(source, [start, stop]), at)
        return
    bounds = [0]
    for piece in node.meta["tensor_meta"]:
        bounds.append(bounds[-1] + piece.shape[dim])
    moved = cut_bounds(source, bounds)
    put_split(gm, node, [b - a for a, b in zip(moved, moved[1:])], dim)

