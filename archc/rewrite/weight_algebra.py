"""Weight algebra of the exact structural re-parameterizations (R1..R11 of `docs/rewrites.md`).

Pure tensor functions: no modules, no graphs, inputs are never mutated and results keep the
inputs' float dtype (callers fold in float64 and cast back). Layouts: conv `W[O, I/g, *k]`,
ConvTranspose `W[I, O/g, *k]`, Linear `W[O, I]`, bias `b[O]`. A missing bias counts as zeros and
every returned bias is a real tensor. A violated shape or precondition raises `ValueError`;
conditions the weights cannot show (padding, stride, alignment, other consumers) are the caller's.

Notation: `W ⋆ x` is the conv, sums over `c` run within the group of the output channel `o`.

    BN   eval-BN(x) = t x + u,   t = γ / sqrt(σ² + ε),   u = β - μ t   (affine=False: γ = 1, β = 0)
    R1   t (W ⋆ x + b) + u      = (t W) ⋆ x + (t b + u)
    R2   W ⋆ (t x + u) + b      = (W t) ⋆ x + (b_o + Σ_{i,h,w} W[o,i,h,w] u_i)   W must not pad
    R3   x                      = W_id ⋆ x,   W_id[i, i mod C/g, centre] = 1   odd k, p = d (k-1)/2
    R4   W_k ⋆ x (pad p - d (K-k)/2) = pad(W_k, (K-k)/2 per side) ⋆ x (pad p)
    R9   avgpool_k(x)           = W ⋆ x,   W[c, c mod C/g] = 1/Πk   count_include_pad=True, no ceil
    s    s (W ⋆ x + b)          = (s W) ⋆ x + s b             s a scalar or one per output channel
    R5   Σ_j (W_j ⋆ x + b_j)    = (Σ_j W_j) ⋆ x + Σ_j b_j
    g    grouped W ⋆_g x        = D ⋆_g' x,   D block diagonal (zero across the g/g' merged groups)
    R6   W2 ⋆ (W1 x + b1) + b2  = (Σ_c W2[o,c] W1[c]) ⋆ x + (b2_o + Σ_{c,h,w} W2[o,c,h,w] b1_c)
                                  W1 1x1; only if W2 does not pad or b1 = 0
    R7   W2 (W1 ⋆ x + b1) + b2  = (Σ_c W2[o,c] W1[c]) ⋆ x + (W2 b1 + b2)     W2 1x1, any s1, d1
    R8   W2 ⋆_{s2} (W1 ⋆_{s1} x + b1) + b2 = W ⋆_{s1 s2} x + (b2_o + Σ_{c,h,w} W2[o,c,h,w] b1_c),
         W[o,i,p] = Σ_{c, q + s1 r = p} W2[o,c,r] W1[c,i,q], kernel K1 + s1 (K2 - 1); only p2 = 0
    R10  cat_j (W_j ⋆ x + b_j)  = (cat_j W_j) ⋆ x + cat_j b_j        groups 1 (groups take
         contiguous output blocks, so a plain cat of grouped weights regroups the channels)
    R11  shuffle y[:, j] = x[:, π_j]:   W ⋆ y = W' ⋆ x,  W'[:, π_j] = W[:, j]   (groups 1)
         (W ⋆ x + b)[:, π]      = W[π] ⋆ x + b[π]

The identities, their conditions and the traps around them are written out in `docs/rewrites.md`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _check_weight(name: str, weight: Tensor) -> None:
    if weight.ndim < 2:
        raise ValueError(f"{name}: expected at least 2 weight dims, got {tuple(weight.shape)}")


def _check_divisible(name: str, channels: int, groups: int) -> None:
    if groups < 1 or channels % groups:
        raise ValueError(f"{name}: {channels} channels are not divisible into {groups} groups")


def _check_vector(name: str, vector: Tensor, length: int) -> None:
    if tuple(vector.shape) != (length,):
        raise ValueError(f"{name}: expected shape ({length},), got {tuple(vector.shape)}")


def _bias_or_zeros(bias: Tensor | None, length: int, like: Tensor) -> Tensor:
    if bias is None:
        return like.new_zeros(length)
    _check_vector("bias", bias, length)
    return bias


def _per_output_channel(vector: Tensor, ndim: int) -> Tensor:
    """`vector` shaped to broadcast along dim 0 of an `ndim`-dimensional weight."""
    return vector.reshape(-1, *([1] * (ndim - 1)))


def _propagate_bias(weight: Tensor, vector: Tensor, groups: int) -> Tensor:
    """`Σ_{c,h,w} W[o,c,h,w] v_c` per output channel, `c` running over the group of `o`."""
    out_channels = weight.shape[0]
    _check_divisible("output", out_channels, groups)
    _check_vector("per-input-channel vector", vector, weight.shape[1] * groups)
    grouped = weight.reshape(groups, out_channels // groups, weight.shape[1], -1)
    return torch.einsum("gocs,gc->go", grouped, vector.reshape(groups, -1)).reshape(out_channels)


def _as_permutation(perm: Tensor | Sequence[int], length: int, name: str) -> Tensor:
    perm = torch.as_tensor(perm)
    if (
        perm.ndim != 1
        or perm.dtype.is_floating_point
        or perm.dtype.is_complex
        or len(perm) != length
        or not torch.equal(torch.sort(perm).values, torch.arange(length, dtype=perm.dtype))
    ):
        raise ValueError(f"{name}: expected a permutation of range({length}), got {perm.tolist()}")
    return perm.long()


def _check_kernel_size(name: str, kernel_size: Sequence[int]) -> tuple[int, ...]:
    """A kernel size; `()` is a Linear layer's (a conv without spatial dims)."""
    kernel_size = tuple(kernel_size)
    if any(k < 1 for k in kernel_size):
        raise ValueError(f"{name}: invalid kernel size {kernel_size}")
    return kernel_size


def bn_affine(
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """Per-channel `(t, u)` with eval-BN(x) = t x + u; `weight`/`bias` None means affine=False."""
    channels = running_mean.shape[0]
    _check_vector("running_mean", running_mean, channels)
    _check_vector("running_var", running_var, channels)
    gamma = torch.ones_like(running_var) if weight is None else weight
    beta = torch.zeros_like(running_mean) if bias is None else bias
    _check_vector("BN weight", gamma, channels)
    _check_vector("BN bias", beta, channels)
    scale = gamma / torch.sqrt(running_var + eps)
    return scale, beta - running_mean * scale


def fold_bn_after(
    weight: Tensor, bias: Tensor | None, scale: Tensor, shift: Tensor
) -> tuple[Tensor, Tensor]:
    """R1: fold `y t + u` per output channel into the conv (any groups/ndim) or Linear before."""
    _check_weight("fold_bn_after", weight)
    out_channels = weight.shape[0]
    _check_vector("scale", scale, out_channels)
    _check_vector("shift", shift, out_channels)
    bias = _bias_or_zeros(bias, out_channels, weight)
    return weight * _per_output_channel(scale, weight.ndim), bias * scale + shift


def fold_bn_after_transpose(
    weight: Tensor, bias: Tensor | None, scale: Tensor, shift: Tensor, groups: int
) -> tuple[Tensor, Tensor]:
    """R1 for a ConvTranspose `W[I, O/g, *k]`: output channel `k O/g + j` is column j of group k."""
    _check_weight("fold_bn_after_transpose", weight)
    in_channels, out_per_group = weight.shape[:2]
    _check_divisible("ConvTranspose input", in_channels, groups)
    out_channels = out_per_group * groups
    _check_vector("scale", scale, out_channels)
    _check_vector("shift", shift, out_channels)
    bias = _bias_or_zeros(bias, out_channels, weight)
    grouped = weight.reshape(groups, in_channels // groups, *weight.shape[1:])
    scaled = grouped * scale.reshape(groups, 1, out_per_group, *([1] * (weight.ndim - 2)))
    return scaled.reshape(weight.shape), bias * scale + shift


def fold_bn_before(
    weight: Tensor, bias: Tensor | None, scale: Tensor, shift: Tensor, groups: int
) -> tuple[Tensor, Tensor]:
    """R2: fold `x t + u` per input channel into the conv/Linear after it (exact if no padding)."""
    _check_weight("fold_bn_before", weight)
    out_channels, in_per_group = weight.shape[:2]
    _check_divisible("output", out_channels, groups)
    _check_vector("scale", scale, in_per_group * groups)
    _check_vector("shift", shift, in_per_group * groups)
    bias = _bias_or_zeros(bias, out_channels, weight)
    grouped = weight.reshape(groups, out_channels // groups, in_per_group, -1)
    scaled = grouped * scale.reshape(groups, 1, in_per_group, 1)
    return scaled.reshape(weight.shape), bias + _propagate_bias(weight, shift, groups)


def identity_kernel(
    channels: int, groups: int, kernel_size: Sequence[int], dtype: torch.dtype = torch.float32
) -> Tensor:
    """R3: `W[i, i mod C/g, centre] = 1`, the identity as a conv (needs stride 1, p = d (k-1)/2)."""
    kernel_size = _check_kernel_size("identity_kernel", kernel_size)
    if any(k % 2 == 0 for k in kernel_size):
        raise ValueError(f"identity_kernel: kernel {kernel_size} has no centre (needs odd sizes)")
    _check_divisible("identity_kernel", channels, groups)
    per_group = channels // groups
    weight = torch.zeros(channels, per_group, *kernel_size, dtype=dtype)
    channel = torch.arange(channels)
    weight[(channel, channel % per_group, *(k // 2 for k in kernel_size))] = 1
    return weight


def pad_kernel(weight: Tensor, kernel_size: Sequence[int]) -> Tensor:
    """R4: centre-embed `W[..., *k]` into `kernel_size`; the small conv pads `p - d (K-k)/2`."""
    _check_weight("pad_kernel", weight)
    kernel_size = _check_kernel_size("pad_kernel", kernel_size)
    small = tuple(weight.shape[2:])
    growth = [big - k for big, k in zip(kernel_size, small, strict=False)]
    if len(kernel_size) != len(small) or any(g < 0 or g % 2 for g in growth):
        raise ValueError(
            f"pad_kernel: cannot centre a {small} kernel in {kernel_size} "
            "(needs the same rank and an even, non-negative difference per axis)"
        )
    # F.pad lists (before, after) pairs starting from the last axis.
    pads = [side for g in reversed(growth) for side in (g // 2, g // 2)]
    return F.pad(weight, pads)


def avg_pool_kernel(
    channels: int, groups: int, kernel_size: Sequence[int], dtype: torch.dtype = torch.float32
) -> Tensor:
    """R9: `W[c, c mod C/g] = 1/Πk` (exact for count_include_pad=True, ceil_mode=False)."""
    kernel_size = _check_kernel_size("avg_pool_kernel", kernel_size)
    _check_divisible("avg_pool_kernel", channels, groups)
    weight = torch.zeros(channels, channels // groups, *kernel_size, dtype=dtype)
    channel = torch.arange(channels)
    weight[channel, channel % (channels // groups)] = 1 / math.prod(kernel_size)
    return weight


def scale_branch(
    weight: Tensor, bias: Tensor | None, scale: float | Tensor
) -> tuple[Tensor, Tensor]:
    """A constant `s` times a branch: `s` a scalar or one value per output channel."""
    _check_weight("scale_branch", weight)
    out_channels = weight.shape[0]
    bias = _bias_or_zeros(bias, out_channels, weight)
    scale = torch.as_tensor(scale, dtype=weight.dtype)
    if scale.ndim == 0:
        return weight * scale, bias * scale
    _check_vector("scale", scale, out_channels)
    return weight * _per_output_channel(scale, weight.ndim), bias * scale


def sum_branches(branches: Sequence[tuple[Tensor, Tensor | None]]) -> tuple[Tensor, Tensor]:
    """R5: the sum of parallel branches already brought to one weight shape."""
    if not branches:
        raise ValueError("sum_branches: no branches")
    shape = branches[0][0].shape
    for index, (weight, _) in enumerate(branches):
        if weight.shape != shape:
            raise ValueError(
                f"sum_branches: branch {index} has weight shape {tuple(weight.shape)}, "
                f"branch 0 has {tuple(shape)}"
            )
    _check_weight("sum_branches", branches[0][0])
    weight = torch.stack([w for w, _ in branches]).sum(0)
    bias = torch.stack([_bias_or_zeros(b, shape[0], w) for w, b in branches]).sum(0)
    return weight, bias


def grouped_to_dense(weight: Tensor, groups: int, target_groups: int = 1) -> Tensor:
    """Re-express a `groups` conv with `target_groups` (dividing it) by block-diagonal expansion."""
    _check_weight("grouped_to_dense", weight)
    out_channels, in_per_group = weight.shape[:2]
    _check_divisible("grouped_to_dense output", out_channels, groups)
    if target_groups < 1 or groups % target_groups:
        raise ValueError(f"grouped_to_dense: {target_groups} groups do not divide {groups}")
    merged = groups // target_groups
    spatial = weight.shape[2:]
    source = weight.reshape(target_groups, merged, out_channels // groups, in_per_group, *spatial)
    dense = weight.new_zeros(
        target_groups, merged, out_channels // groups, merged, in_per_group, *spatial
    )
    for block in range(merged):
        dense[:, block, :, block] = source[:, block]
    return dense.reshape(out_channels, merged * in_per_group, *spatial)


def _check_chain(name: str, first: Tensor, second: Tensor, groups: int) -> None:
    _check_weight(name, first)
    _check_weight(name, second)
    if first.ndim != second.ndim:
        raise ValueError(f"{name}: weights of rank {first.ndim} and {second.ndim}")
    _check_divisible(f"{name} first conv output", first.shape[0], groups)
    _check_divisible(f"{name} second conv output", second.shape[0], groups)
    if second.shape[1] * groups != first.shape[0]:
        raise ValueError(
            f"{name}: the second conv reads {second.shape[1] * groups} channels "
            f"({groups} groups), the first writes {first.shape[0]}"
        )


def merge_1x1_then_kxk(
    w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None, groups: int = 1
) -> tuple[Tensor, Tensor]:
    """R6: 1x1 then KxK, both with `groups`. Exact only if the KxK does not pad or `b1` is zero:
    the KxK's zero padding would otherwise see `b1` after the merge (the caller checks).
    """
    _check_chain("merge_1x1_then_kxk", w1, w2, groups)
    if any(k != 1 for k in w1.shape[2:]):
        raise ValueError(f"merge_1x1_then_kxk: first kernel is {tuple(w1.shape[2:])}, not 1x1")
    mid, in_per_group = w1.shape[:2]
    out_channels = w2.shape[0]
    first = w1.reshape(groups, mid // groups, in_per_group)
    second = w2.reshape(groups, out_channels // groups, mid // groups, -1)
    weight = torch.einsum("gocs,gci->gois", second, first)
    bias = _bias_or_zeros(b2, out_channels, w2) + _propagate_bias(
        w2, _bias_or_zeros(b1, mid, w1), groups
    )
    return weight.reshape(out_channels, in_per_group, *w2.shape[2:]), bias


def merge_kxk_then_1x1(
    w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None, groups: int = 1
) -> tuple[Tensor, Tensor]:
    """R7: KxK (any stride, dilation, padding) then 1x1, both with `groups`; always exact."""
    _check_chain("merge_kxk_then_1x1", w1, w2, groups)
    if any(k != 1 for k in w2.shape[2:]):
        raise ValueError(f"merge_kxk_then_1x1: second kernel is {tuple(w2.shape[2:])}, not 1x1")
    mid = w1.shape[0]
    out_channels = w2.shape[0]
    second = w2.reshape(groups, out_channels // groups, mid // groups)
    first = w1.reshape(groups, mid // groups, -1)
    weight = torch.einsum("goc,gcr->gor", second, first)
    bias = _bias_or_zeros(b2, out_channels, w2) + _propagate_bias(
        w2, _bias_or_zeros(b1, mid, w1), groups
    )
    return weight.reshape(out_channels, *w1.shape[1:]), bias


def merge_sequential(
    w1: Tensor, b1: Tensor | None, stride1: int | Sequence[int], w2: Tensor, b2: Tensor | None
) -> tuple[Tensor, Tensor]:
    """R8: K1 (stride s1, padding p1) then K2 (stride s2, padding 0), groups 1, dilation 1, into one
    conv of kernel `K1 + s1 (K2-1)`, stride `s1 s2`, padding p1. Exact only if the second conv does
    not pad (the caller checks).
    """
    _check_chain("merge_sequential", w1, w2, 1)
    spatial_dims = w1.ndim - 2
    if spatial_dims not in _CONV_TRANSPOSE:
        raise ValueError(f"merge_sequential: {spatial_dims} spatial dims, expected 1, 2 or 3")
    stride = (stride1,) * spatial_dims if isinstance(stride1, int) else tuple(stride1)
    if len(stride) != spatial_dims or any(s < 1 for s in stride):
        raise ValueError(f"merge_sequential: invalid stride {stride1} for {spatial_dims} dims")
    # W[o, i] = Σ_c W2[o, c] (upsampled by s1) ⋆ W1[c, i]: a transposed conv over the channel c.
    merged = _CONV_TRANSPOSE[spatial_dims](w1.transpose(0, 1), w2.transpose(0, 1), dilation=stride)
    out_channels = w2.shape[0]
    bias = _bias_or_zeros(b2, out_channels, w2) + _propagate_bias(
        w2, _bias_or_zeros(b1, w1.shape[0], w1), 1
    )
    return merged.transpose(0, 1).contiguous(), bias


def merge_sequential_grouped(
    w1: Tensor, b1: Tensor | None, factor: int | Sequence[int], w2: Tensor, b2: Tensor | None,
    groups: int,
) -> tuple[Tensor, Tensor]:
    """R8 for two convs with the same `groups`: `merge_sequential` (groups 1) on each group's
    slices, concatenated. `factor` spaces W2's taps on W1's grid (s1 for dilation 1, s1 d2 / d1
    in general)."""
    if groups < 1 or w1.shape[0] % groups or w2.shape[0] % groups:
        raise ValueError(f"merge_sequential_grouped: {groups} groups do not divide the outputs")
    mid, out = w1.shape[0] // groups, w2.shape[0] // groups
    b1 = _bias_or_zeros(b1, w1.shape[0], w1)
    b2 = _bias_or_zeros(b2, w2.shape[0], w2)
    parts = [merge_sequential(w1[g * mid:(g + 1) * mid], b1[g * mid:(g + 1) * mid], factor,
                              w2[g * out:(g + 1) * out], b2[g * out:(g + 1) * out])
             for g in range(groups)]
    return torch.cat([w for w, _ in parts]), torch.cat([b for _, b in parts])


def concat_convs(branches: Sequence[tuple[Tensor, Tensor | None]]) -> tuple[Tensor, Tensor]:
    """R10: parallel groups-1 convs on one input, concatenated along the output channels.

    Not for grouped convs: cat(W_a, W_b) would put the rows of both convs' later groups into the
    merged conv's first groups, which read other input channels.
    """
    if not branches:
        raise ValueError("concat_convs: no branches")
    tail = branches[0][0].shape[1:]
    for index, (weight, _) in enumerate(branches):
        _check_weight("concat_convs", weight)
        if weight.shape[1:] != tail:
            raise ValueError(
                f"concat_convs: branch {index} has weight shape {tuple(weight.shape)}, "
                f"expected [*, {', '.join(map(str, tail))}]"
            )
    weight = torch.cat([w for w, _ in branches])
    bias = torch.cat([_bias_or_zeros(b, w.shape[0], w) for w, b in branches])
    return weight, bias


def channel_shuffle_permutation(channels: int, groups: int) -> Tensor:
    """π with `channel_shuffle(x, groups)[:, j] = x[:, π_j]`, i.e. π_{a g + k} = k C/g + a."""
    _check_divisible("channel_shuffle_permutation", channels, groups)
    return torch.arange(channels).reshape(groups, channels // groups).t().reshape(-1)


def invert_permutation(perm: Tensor | Sequence[int]) -> Tensor:
    """π⁻¹ with `π⁻¹[π_j] = j`."""
    perm = torch.as_tensor(perm)
    perm = _as_permutation(perm, perm.numel(), "invert_permutation")
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(len(perm))
    return inverse


def permute_input_channels(weight: Tensor, perm: Tensor | Sequence[int]) -> Tensor:
    """R11 shuffle -> conv, groups 1: `conv(x[:, π], W) = conv(x, W')`, `W'[:, π_j] = W[:, j]`."""
    _check_weight("permute_input_channels", weight)
    perm = _as_permutation(
        perm,
        weight.shape[1],
        "permute_input_channels (a grouped consumer must be densified first)",
    )
    return weight[:, invert_permutation(perm)]


def permute_output_channels(
    weight: Tensor, bias: Tensor | None, perm: Tensor | Sequence[int]
) -> tuple[Tensor, Tensor]:
    """R11 conv -> shuffle: `conv(x, W)[:, π] = conv(x, W[π])`, bias `b[π]`."""
    _check_weight("permute_output_channels", weight)
    perm = _as_permutation(perm, weight.shape[0], "permute_output_channels")
    return weight[perm], _bias_or_zeros(bias, weight.shape[0], weight)[perm]


def permute_vector(vector: Tensor, perm: Tensor | Sequence[int]) -> Tensor:
    """`v[π]`: BN statistics and affine parameters of a BN that follows a permuted producer."""
    return vector[_as_permutation(perm, vector.shape[0], "permute_vector")]
