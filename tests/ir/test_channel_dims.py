"""archc/ir/channel_dims.py against torch: a tensor whose value is its channel index (constant over
every other dim) shows where an op puts the channels."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from archc.ir.channel_dims import (
    head_split,
    index_items,
    index_place,
    permuted_dim,
    reduced_dim,
    reshaped_dim,
    transposed_dim,
)


def _labelled(shape: tuple[int, ...], c: int) -> torch.Tensor:
    """A tensor of `shape` whose entry is its index along dim c."""
    view = [1] * len(shape)
    view[c] = shape[c]
    return torch.arange(shape[c]).view(view).expand(shape)


def _holds_channels(t: torch.Tensor, d: int, count: int) -> bool:
    """Every slice along dim d is the channel index, count of them."""
    return t.shape[d] == count and bool(
        (t == _labelled(tuple(t.shape), d)).all())


shapes = st.lists(st.integers(1, 4), min_size=2, max_size=5).map(tuple)


@settings(max_examples=60, deadline=None)
@given(shapes, st.data())
def test_permute_and_transpose_send_the_channels_where_torch_does(shape, data):
    c = data.draw(st.integers(0, len(shape) - 1))
    dims = data.draw(st.permutations(range(len(shape))))
    x = _labelled(shape, c)
    d = permuted_dim(dims, len(shape), c)
    assert _holds_channels(x.permute(*dims), d, shape[c])
    a, b = data.draw(st.integers(-len(shape), len(shape) - 1)), data.draw(
        st.integers(0, len(shape) - 1))
    assert _holds_channels(x.transpose(a, b), transposed_dim(a, b, len(shape), c), shape[c])


@settings(max_examples=60, deadline=None)
@given(shapes, st.data())
def test_a_reshape_that_keeps_the_channels_whole_is_found(shape, data):
    """Merge the dims before the channels and those after them in random ways: the channels stay
    one dim, where `reshaped_dim` says."""
    c = data.draw(st.integers(0, len(shape) - 1))
    before = [math.prod(shape[:c])] if data.draw(st.booleans()) else list(shape[:c])
    after = [math.prod(shape[c + 1:])] if data.draw(st.booleans()) else list(shape[c + 1:])
    target = (*before, shape[c], *after)
    d = reshaped_dim(shape, target, c)
    assert d is not None
    assert _holds_channels(_labelled(shape, c).reshape(target), d, shape[c])


def test_a_reshape_that_merges_the_channels_is_not_followed():
    assert reshaped_dim((2, 8, 4, 4), (2, 128), 1) is None  # flatten(1)
    assert reshaped_dim((2, 4, 4, 8), (2, 4, 32), 3) is None  # [N, H, W C]
    assert reshaped_dim((2, 8, 4, 4), (2, 8, 16), 1) == 1


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.integers(2, 4), st.integers(1, 4), st.integers(1, 4))
def test_a_head_split_makes_channel_i_d_plus_j_head_i_dim_j(n, heads, d, spatial):
    x = _labelled((n, heads * d, spatial), 1)
    target = (n, heads, d, spatial)
    assert head_split(x.shape, target, 1) == (1, 2)
    split = x.reshape(target)
    expected = torch.arange(heads)[:, None] * d + torch.arange(d)[None, :]
    assert bool((split == expected[None, :, :, None]).all())


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(2, 3), st.integers(2, 4),
       st.integers(1, 4))
def test_a_head_split_over_several_dims_makes_channel_i_d_plus_j_head_i_dim_j(n, outer, heads, d,
                                                                             tokens):
    """FastViT's [N, L, 3 h d] -> [N, L, 3, h, d]: the heads are the 3 h pieces of d channels."""
    x = _labelled((n, tokens, outer * heads * d), 2)
    target = (n, tokens, outer, heads, d)
    assert head_split(x.shape, target, 2) == (2, 4)
    split = x.reshape(target)
    expected = (torch.arange(outer * heads)[:, None] * d + torch.arange(d)[None, :])
    assert bool((split == expected.view(1, 1, outer, heads, d)).all())


def test_what_is_not_a_head_split():
    assert head_split((2, 4, 3, 5), (2, 12, 5), 1) is None  # a merge
    assert head_split((2, 12, 5), (2, 12, 5, 1), 1) is None  # nothing split
    assert head_split((2, 12, 5), (2, 3, 5, 4), 1) is None  # the channels and more
    assert head_split((2, 12, 5), (2, 3, 4, 5), 1) == (1, 2)


@settings(max_examples=60, deadline=None)
@given(shapes, st.data())
def test_reductions_move_the_channels_down_past_reduced_dims(shape, data):
    c = data.draw(st.integers(0, len(shape) - 1))
    others = [d for d in range(len(shape)) if d != c]
    dims = sorted(data.draw(st.sets(st.sampled_from(others), min_size=1))) if others else []
    keep = data.draw(st.booleans())
    if not dims:
        return
    reduced = _labelled(shape, c).float().mean(dims, keepdim=keep)
    assert _holds_channels(reduced.long(), reduced_dim(dims, keep, c), shape[c])
    assert reduced_dim([c], keep, c) is None


def test_index_items_expand_an_ellipsis_and_refuse_what_they_cannot_follow():
    assert index_items((Ellipsis, slice(0, 4)), 4) == [slice(None)] * 3 + [slice(0, 4)]
    assert index_items(slice(1, 2), 3) == [slice(1, 2), slice(None), slice(None)]
    assert index_items((slice(None), 0), 3) == [slice(None), 0, slice(None)]
    assert index_items((None, slice(None)), 3) is None
    assert index_items((Ellipsis, Ellipsis), 3) is None


def test_index_place_finds_the_item_of_a_dim_past_ellipses_and_new_dims():
    assert index_place((slice(None), slice(2, 5)), 4, 1) == 1
    assert index_place((Ellipsis, slice(2, 5)), 4, 3) == 1
    assert index_place((Ellipsis, slice(2, 5), None), 4, 3) == 1  # `x[..., a:b, None]`
    assert index_place((slice(None), slice(2, 5), None, None), 4, 1) == 1
    assert index_place((Ellipsis, slice(0, 1)), 4, 1) == 0  # the Ellipsis covers dim 1
    x = torch.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    index = (Ellipsis, slice(1, 3), None)
    assert x[index].shape[3] == 2 and index[index_place(index, 4, 3)] == slice(1, 3)
