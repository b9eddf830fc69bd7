"""Where a tensor's channel dimension goes through ops that only rearrange dimensions.

A channel tensor carries its channels on one dim, dim 1 of NCHW (and of [N, F]) unless a permute
moved them: `x.permute(0, 2, 3, 1)` puts them last (NHWC, the layout of channels-last blocks:
ConvNeXt's LayerNorm and Linear layers, a layer scale gamma of shape [C]). The functions below
answer, for one op, the channel dim of its result from the channel dim `c` of its input, or None
when the op does more than move it (merges it with another dim, splits it, reduces it):

- permute(dims): the result's dim j is the input's dims[j], so channels land at dims.index(c);
- transpose(a, b): a and b swap;
- a reshape (view, reshape, flatten, squeeze, unsqueeze) keeps the channel dim when some result
  dim j has the same size with the same number of elements before it (and so after it):
  [N, H, W, C] -> [N, H W, C] moves it from 3 to 2; [N, C, 1, 1] -> [N, C] keeps it at 1;
  [N, C, H, W] -> [N, C H W] merges it (None);
- a reduction over dims D that do not include c, without keepdim: c less the reduced dims before
  it.

`head_split` recognizes the one reshape that splits the channel dim itself in a way pruning can
follow: [.., h d, ..] -> [.., h, d, ..] (attention heads, `archc.ir.channels`), the dims after it
free to be reshaped among themselves ([N, h d, H, W] -> [N, h, d, H W], EfficientViT), the heads
themselves possibly over several dims ([N, L, 3 h d] -> [N, L, 3, h, d], FastViT).
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def normal_dim(value, rank: int) -> int | None:
    """`value` as a dim in [0, rank), None if it is not an int in [-rank, rank)."""
    return value % rank if isinstance(value, int) and -rank <= value < rank else None


def permuted_dim(dims: Sequence, rank: int, c: int) -> int | None:
    """The channel dim after permute(dims) (None for a malformed permutation)."""
    dims = [normal_dim(d, rank) for d in dims]
    if sorted(d for d in dims if d is not None) != list(range(rank)):
        return None
    return dims.index(c)


def transposed_dim(a, b, rank: int, c: int) -> int | None:
    """The channel dim after transpose(a, b)."""
    a, b = normal_dim(a, rank), normal_dim(b, rank)
    if a is None or b is None:
        return None
    return b if c == a else a if c == b else c


def reshaped_dim(before: Sequence[int], after: Sequence[int], c: int) -> int | None:
    """The result dim holding the channels of dim c of `before` after a reshape to `after`, or
    None if the reshape merges or splits them (the same size with as many elements before it)."""
    prefix = math.prod(before[:c])
    for j, size in enumerate(after):
        if size == before[c] and math.prod(after[:j]) == prefix:
            return j
    return None


def reduced_dim(dims: Sequence[int], keepdim: bool, c: int) -> int | None:
    """The channel dim after reducing over `dims` (normalized), None if it reduces the channels."""
    if c in dims:
        return None
    return c if keepdim else c - sum(d < c for d in dims)


def head_split(before: Sequence[int], after: Sequence[int], c: int) -> tuple[int, int] | None:
    """(first heads dim, head-size dim) of a reshape that splits channel dim c of C = h d
    channels into adjacent dims [h_1, .., h_k, d] (h = h_1 .. h_k >= 2 heads; k = 1 for
    [h, d], k = 2 for FastViT's [3, heads, d]), keeps the dims before it and the number of
    elements after it (None otherwise); the head-size dim is the first that completes C."""
    if len(after) < c + 2 or c >= len(before) or tuple(after[:c]) != tuple(before[:c]):
        return None
    for j in range(c + 1, len(after)):
        heads = math.prod(after[c:j])
        if heads * after[j] == before[c]:
            if heads < 2 or math.prod(after[j + 1:]) != math.prod(before[c + 1:]):
                return None
            return c, j
    return None


def index_items(index, rank: int) -> list | None:
    """The items of `x[index]` for x of rank `rank`, one per dim of x (an Ellipsis expanded, the
    dims after the last item as full slices); None for an index with anything but ints and
    slices of constant bounds (None, tensors, computed bounds)."""
    items = list(index) if isinstance(index, tuple) else [index]
    if items.count(Ellipsis) > 1:
        return None
    if Ellipsis in items:
        at = items.index(Ellipsis)
        items[at:at + 1] = [slice(None)] * (rank - len(items) + 1)
    if len(items) > rank or not all(
            isinstance(i, int) or isinstance(i, slice) and all(
                isinstance(v, (int, type(None))) for v in (i.start, i.stop, i.step))
            for i in items):
        return None
    return items + [slice(None)] * (rank - len(items))


def index_place(index, rank: int, dim: int) -> int:
    """The place in `index` (of `x[index]`, x of rank `rank`) of the item that indexes dim `dim`
    of x: an Ellipsis stands for the dims the other items leave, `None` items (new dims of size
    1) index none."""
    index = list(index) if isinstance(index, (tuple, list)) else [index]
    items = [i for i in index if i is not None]
    place = dim
    if Ellipsis in items and items.index(Ellipsis) <= dim:
        place = max(items.index(Ellipsis), dim - (rank - len(items)))
    seen = -1
    for at, item in enumerate(index):  # the place-th item that is not None
        seen += item is not None
        if seen == place:
            return at
    return len(index)
