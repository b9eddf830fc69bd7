"""archc.rewrite.weight_algebra against the unrewritten computation, run with real torch ops.

float64 checks that each identity is exact (relative error `max|Δ| / max|ref|` <= 1e-12), float32
that it holds at working precision (<= 1e-5). Each `test_trap_*` breaks one legality condition of
docs/rewrites.md and shows the rewrite is then no longer exact: the caller's checks are what make
it so.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor
from torch.nn.utils.fusion import fuse_conv_bn_weights

from archc.rewrite.weight_algebra import (
    avg_pool_kernel,
    bn_affine,
    channel_shuffle_permutation,
    concat_convs,
    fold_bn_after,
    fold_bn_after_transpose,
    fold_bn_before,
    grouped_to_dense,
    identity_kernel,
    invert_permutation,
    merge_1x1_then_kxk,
    merge_kxk_then_1x1,
    merge_sequential,
    pad_kernel,
    permute_input_channels,
    permute_output_channels,
    permute_vector,
    scale_branch,
    sum_branches,
)

F64 = torch.float64
EXACT = 1e-12
PRECISIONS = [
    pytest.param(torch.float64, EXACT, id="float64"),
    pytest.param(torch.float32, 1e-5, id="float32"),
]
BN_EPS = [1e-5, 1e-3, 1e-6]
PROPERTY = settings(deadline=None, max_examples=30)
SEEDS = st.integers(0, 2**31 - 1)
KERNELS = st.sampled_from([(1, 1), (3, 3), (1, 3), (3, 1), (2, 2)])


def rel_err(out: Tensor, ref: Tensor) -> float:
    assert out.shape == ref.shape
    return ((out - ref).abs().max() / ref.abs().max()).item()


def randn(gen: torch.Generator, *shape: int, dtype: torch.dtype = F64) -> Tensor:
    return torch.randn(*shape, generator=gen, dtype=dtype)


def maybe_randn(gen: torch.Generator, present: bool, *shape: int, dtype=F64) -> Tensor | None:
    return randn(gen, *shape, dtype=dtype) if present else None


def pad_per_channel(x: Tensor, value: Tensor, padding: int) -> Tensor:
    """Spatial constant padding with one value per channel."""
    value = value[:, None, None]
    return F.pad(x - value, [padding] * 4) + value


@dataclass
class EvalBN:
    """An eval-mode BatchNorm with random statistics; variances down to 3e-4 make eps matter."""

    mean: Tensor
    var: Tensor
    gamma: Tensor | None
    beta: Tensor | None
    eps: float

    @classmethod
    def random(cls, gen, channels, eps=1e-5, affine=True, dtype=F64) -> EvalBN:
        return cls(
            mean=randn(gen, channels, dtype=dtype),
            var=10 ** (torch.rand(channels, generator=gen, dtype=dtype) * 4 - 3.5),
            gamma=maybe_randn(gen, affine, channels, dtype=dtype),
            beta=maybe_randn(gen, affine, channels, dtype=dtype),
            eps=eps,
        )

    def __call__(self, x: Tensor) -> Tensor:
        return F.batch_norm(
            x, self.mean, self.var, self.gamma, self.beta, training=False, eps=self.eps
        )

    def affine(self) -> tuple[Tensor, Tensor]:
        return bn_affine(self.mean, self.var, self.gamma, self.beta, self.eps)

    def _map(self, fn) -> EvalBN:
        def apply(v):
            return None if v is None else fn(v)

        return EvalBN(
            apply(self.mean), apply(self.var), apply(self.gamma), apply(self.beta), self.eps
        )

    def permuted(self, perm: Tensor) -> EvalBN:
        return self._map(lambda v: permute_vector(v, perm))

    def to(self, dtype: torch.dtype) -> EvalBN:
        return self._map(lambda v: v.to(dtype))


# ---------------------------------------------------------------- BN as an affine map, R1, R2


@pytest.mark.parametrize("eps", BN_EPS)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize(("dtype", "tol"), PRECISIONS)
def test_bn_affine_matches_eval_batch_norm(eps, affine, dtype, tol):
    gen = torch.Generator().manual_seed(0)
    bn = EvalBN.random(gen, 6, eps, affine, dtype)
    x = randn(gen, 2, 6, 5, 5, dtype=dtype)
    scale, shift = bn.affine()
    assert scale.dtype == shift.dtype == dtype
    assert rel_err(x * scale[:, None, None] + shift[:, None, None], bn(x)) <= tol


@PROPERTY
@given(
    seed=SEEDS,
    groups=st.integers(1, 3),
    in_per_group=st.integers(1, 3),
    out_per_group=st.integers(1, 3),
    kernel=KERNELS,
    stride=st.integers(1, 2),
    dilation=st.integers(1, 2),
    has_bias=st.booleans(),
    affine=st.booleans(),
    eps=st.sampled_from(BN_EPS),
)
def test_fold_bn_after_conv(
    seed, groups, in_per_group, out_per_group, kernel, stride, dilation, has_bias, affine, eps
):
    gen = torch.Generator().manual_seed(seed)
    out_channels = groups * out_per_group
    conv = dict(stride=stride, padding=1, dilation=dilation, groups=groups)
    x = randn(gen, 2, groups * in_per_group, 7, 7)
    w = randn(gen, out_channels, in_per_group, *kernel)
    b = maybe_randn(gen, has_bias, out_channels)
    bn = EvalBN.random(gen, out_channels, eps, affine)
    weight, bias = fold_bn_after(w, b, *bn.affine())
    assert rel_err(F.conv2d(x, weight, bias, **conv), bn(F.conv2d(x, w, b, **conv))) <= EXACT


@pytest.mark.parametrize(("dtype", "tol"), PRECISIONS)
def test_fold_bn_after_depthwise_with_channel_multiplier(dtype, tol):
    gen = torch.Generator().manual_seed(1)
    x = randn(gen, 2, 4, 8, 8, dtype=dtype)
    w = randn(gen, 8, 1, 3, 3, dtype=dtype)
    bn = EvalBN.random(gen, 8, 1e-3, dtype=dtype)
    weight, bias = fold_bn_after(w, None, *bn.affine())
    ref = bn(F.conv2d(x, w, None, stride=2, padding=1, groups=4))
    assert rel_err(F.conv2d(x, weight, bias, stride=2, padding=1, groups=4), ref) <= tol


@pytest.mark.parametrize("eps", BN_EPS)
@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize(("dtype", "tol"), PRECISIONS)
def test_fold_bn_after_linear_then_bn1d(eps, has_bias, dtype, tol):
    gen = torch.Generator().manual_seed(2)
    x = randn(gen, 4, 5, dtype=dtype)
    w = randn(gen, 6, 5, dtype=dtype)
    b = maybe_randn(gen, has_bias, 6, dtype=dtype)
    bn = EvalBN.random(gen, 6, eps, dtype=dtype)
    weight, bias = fold_bn_after(w, b, *bn.affine())
    assert rel_err(F.linear(x, weight, bias), bn(F.linear(x, w, b))) <= tol


@pytest.mark.parametrize(("groups", "out_per_group"), [(1, 3), (2, 3), (4, 1)])
@pytest.mark.parametrize(("dtype", "tol"), PRECISIONS)
def test_fold_bn_after_conv_transpose(groups, out_per_group, dtype, tol):
    gen = torch.Generator().manual_seed(3)
    out_channels = groups * out_per_group
    conv = dict(stride=2, padding=1, output_padding=1, groups=groups)
    x = randn(gen, 2, 4, 5, 5, dtype=dtype)
    w = randn(gen, 4, out_per_group, 3, 3, dtype=dtype)
    b = randn(gen, out_channels, dtype=dtype)
    bn = EvalBN.random(gen, out_channels, dtype=dtype)
    weight, bias = fold_bn_after_transpose(w, b, *bn.affine(), groups)
    ref = bn(F.conv_transpose2d(x, w, b, **conv))
    assert rel_err(F.conv_transpose2d(x, weight, bias, **conv), ref) <= tol


def test_trap_torch_fusion_helper_breaks_grouped_conv_transpose():
    gen = torch.Generator().manual_seed(4)
    w = randn(gen, 4, 1, 3, 3)
    bn = EvalBN.random(gen, 4)
    torch_weight, _ = fuse_conv_bn_weights(
        w, None, bn.mean, bn.var, bn.eps, bn.gamma, bn.beta, transpose=True
    )
    weight, _ = fold_bn_after_transpose(w, None, *bn.affine(), groups=4)
    assert torch_weight.shape != w.shape
    assert weight.shape == w.shape


def test_trap_fold_bn_with_another_eps():
    gen = torch.Generator().manual_seed(5)
    x = randn(gen, 2, 4, 6, 6)
    w = randn(gen, 4, 4, 3, 3)
    bn = replace(EvalBN.random(gen, 4, eps=1e-3), var=torch.full((4,), 1e-4, dtype=F64))
    weight, bias = fold_bn_after(w, None, *replace(bn, eps=1e-5).affine())
    assert rel_err(F.conv2d(x, weight, bias), bn(F.conv2d(x, w))) > 1


def test_trap_folding_in_float16_loses_accuracy():
    gen = torch.Generator().manual_seed(6)
    w = randn(gen, 64, 32, 3, 3).half()
    bn = EvalBN.random(gen, 64).to(torch.float16)
    exact = fold_bn_after(w.double(), None, *bn.to(F64).affine())
    in_float16 = fold_bn_after(w, None, *bn.affine())
    for folded, ref in zip(in_float16, exact, strict=True):
        cast_back = ref.half()

        def mean_rel_err(out, ref=ref):
            return ((out.double() - ref).abs() / ref.abs()).mean().item()

        assert mean_rel_err(folded) > 1.5 * mean_rel_err(cast_back)


@pytest.mark.parametrize(
    ("groups", "in_per_group", "out_per_group", "eps", "affine", "has_bias"),
    [(1, 4, 5, 1e-5, True, True), (2, 2, 3, 1e-3, False, False), (4, 1, 2, 1e-6, True, True)],
    ids=["dense", "grouped", "depthwise"],
)
@pytest.mark.parametrize(("dtype", "tol"), PRECISIONS)
def test_fold_bn_before_unpadded_conv(
    groups, in_per_group, out_per_group, eps, affine, has_bias, dtype, tol
):
    gen = torch.Generator().manual_seed(7)
    in_channels, out_channels = groups * in_per_group, groups * out_per_group
    conv = dict(stride=2, dilation=2, groups=groups)
    x = randn(gen, 2, in_channels, 9, 9, dtype=dtype)
    w = randn(gen, out_channels, in_per_group, 3, 3, dtype=dtype)
    b = maybe_randn(gen, has_bias, out_channels, dtype=dtype)
    bn = EvalBN.random(gen, in_channels, eps, affine, dtype)
    weight, bias = fold_bn_before(w, b, *bn.affine(), groups)
    assert rel_err(F.conv2d(x, weight, bias, **conv), F.conv2d(bn(x), w, b, **conv)) <= tol


@pytest.mark.parametrize(("dtype", "tol"), PRECISIONS)
def test_fold_bn1d_before_linear(dtype, tol):
    gen = torch.Generator().manual_seed(8)
    x = randn(gen, 4, 6, dtype=dtype)
    w = randn(gen, 3, 6, dtype=dtype)
    b = randn(gen, 3, dtype=dtype)
    bn = EvalBN.random(gen, 6, dtype=dtype)
    weight, bias = fold_bn_before(w, b, *bn.affine(), groups=1)
    assert rel_err(F.linear(x, weight, bias), F.linear(bn(x), w, b)) <= tol


def test_trap_fold_bn_before_padded_conv():
    gen = torch.Generator().manual_seed(9)
    x = randn(gen, 2, 4, 7, 7)
    w = randn(gen, 5, 4, 3, 3)
    bn = EvalBN.random(gen, 4)
    weight, bias = fold_bn_before(w, None, *bn.affine(), groups=1)
    assert rel_err(F.conv2d(x, weight, bias, padding=1), F.conv2d(bn(x), w, padding=1)) > 1e-3


def test_fold_bn_before_padded_conv_is_exact_with_the_padding_moved_upstream():
    # docs/rewrites.md R2's repair: pad before the BN with v = μ - β/t = -u/t, which BN maps to 0.
    gen = torch.Generator().manual_seed(9)
    x = randn(gen, 2, 4, 7, 7)
    w = randn(gen, 5, 4, 3, 3)
    bn = EvalBN.random(gen, 4)
    scale, shift = bn.affine()
    weight, bias = fold_bn_before(w, None, scale, shift, groups=1)
    out = F.conv2d(pad_per_channel(x, -shift / scale, 1), weight, bias)
    assert rel_err(out, F.conv2d(bn(x), w, padding=1)) <= EXACT


# ---------------------------------------------------------------- R3, R4, R5, R9: branch sums


@pytest.mark.parametrize(
    ("groups", "kernel", "dilation"),
    [(1, (3, 3), 1), (2, (3, 3), 2), (6, (5, 5), 1), (3, (1, 3), 2)],
)
@pytest.mark.parametrize(("dtype", "tol"), PRECISIONS)
def test_identity_kernel_is_the_identity(groups, kernel, dilation, dtype, tol):
    gen = torch.Generator().manual_seed(10)
    x = randn(gen, 2, 6, 7, 7, dtype=dtype)
    padding = [dilation * (k - 1) // 2 for k in kernel]
    weight = identity_kernel(6, groups, kernel, dtype)
    assert weight.dtype == dtype
    out = F.conv2d(x, weight, padding=padding, dilation=dilation, groups=groups)
    assert rel_err(out, x) <= tol


@pytest.mark.parametrize(
    ("small", "big", "big_padding", "dilation", "stride"),
    [
        ((1, 1), (3, 3), (1, 1), 1, 1),
        ((1, 3), (3, 3), (1, 1), 1, 2),
        ((3, 1), (3, 3), (2, 2), 2, 1),
        ((1, 3), (3, 3), (2, 1), 1, 1),
        ((1, 1), (5, 5), (4, 4), 2, 1),
        ((3, 3), (5, 5), (2, 2), 1, 2),
    ],
)
@pytest.mark.parametrize(("dtype", "tol"), PRECISIONS)
def test_pad_kernel_with_aligned_padding(small, big, big_padding, dilation, stride, dtype, tol):
    gen = torch.Generator().manual_seed(11)
    x = randn(gen, 2, 3, 9, 9, dtype=dtype)
    w = randn(gen, 4, 3, *small, dtype=dtype)
    small_padding = [p - dilation * (K - k) // 2 for p, K, k in zip(big_padding, big, small)]
    conv = dict(stride=stride, dilation=dilation)
    ref = F.conv2d(x, w, padding=small_padding, **conv)
    assert rel_err(F.conv2d(x, pad_kernel(w, big), padding=big_padding, **conv), ref) <= tol


def test_trap_pad_kernel_alignment_that_ignores_dilation():
    # p_small = p_K - (K-k)/2 (DBB, ACNet) instead of p_K - d (K-k)/2: the branches misalign.
    gen = torch.Generator().manual_seed(12)
    x = randn(gen, 2, 3, 9, 9)
    w = randn(gen, 4, 3, 1, 3)
    merged = F.conv2d(x, pad_kernel(w, (3, 3)), padding=2, dilation=2)
    assert F.conv2d(x, w, padding=(0, 2), dilation=2).shape == merged.shape
    assert F.conv2d(x, w, padding=(1, 2), dilation=2).shape != merged.shape


@PROPERTY
@given(
    seed=SEEDS,
    groups=st.integers(1, 3),
    per_group=st.integers(1, 3),
    big=st.sampled_from([(3, 3), (5, 5), (3, 5)]),
    smalls=st.lists(st.sampled_from([(1, 1), (1, 3), (3, 1), (3, 3)]), max_size=3),
    stride=st.integers(1, 2),
    dilation=st.integers(1, 2),
    with_identity=st.booleans(),
    layer_scale=st.booleans(),
    eps=st.sampled_from(BN_EPS),
)
def test_parallel_conv_bn_branches_sum_to_one_conv(
    seed, groups, per_group, big, smalls, stride, dilation, with_identity, layer_scale, eps
):
    """RepVGG / ACNet / DBB-style block: KxK, smaller kernels and identity, each with a BN."""
    gen = torch.Generator().manual_seed(seed)
    channels = groups * per_group
    x = randn(gen, 2, channels, 9, 9)
    big_padding = [dilation * (K - 1) // 2 for K in big]
    conv = dict(stride=stride, dilation=dilation, groups=groups)
    ref, folded = 0, []
    for kernel in [big, *smalls]:
        padding = [p - dilation * (K - k) // 2 for p, K, k in zip(big_padding, big, kernel)]
        w = randn(gen, channels, per_group, *kernel)
        b = maybe_randn(gen, len(folded) % 2 == 0, channels)
        bn = EvalBN.random(gen, channels, eps)
        ref = ref + bn(F.conv2d(x, w, b, padding=padding, **conv))
        weight, bias = fold_bn_after(w, b, *bn.affine())
        folded.append((pad_kernel(weight, big), bias))
    if layer_scale:
        gamma = randn(gen, channels)
        ref = ref * gamma[:, None, None]
        folded = [scale_branch(w, b, gamma) for w, b in folded]
    if with_identity and stride == 1:
        bn = EvalBN.random(gen, channels, eps)
        ref = ref + bn(x)
        folded.append(
            fold_bn_after(identity_kernel(channels, groups, big, F64), None, *bn.affine())
        )
    weight, bias = sum_branches(folded)
    assert rel_err(F.conv2d(x, weight, bias, padding=big_padding, **conv), ref) <= EXACT


@pytest.mark.parametrize(("dtype", "tol"), PRECISIONS)
def test_repvgg_block_folds_to_one_conv(dtype, tol):
    gen = torch.Generator().manual_seed(13)
    x = randn(gen, 2, 4, 8, 8, dtype=dtype)
    w3, w1 = randn(gen, 4, 2, 3, 3, dtype=dtype), randn(gen, 4, 2, 1, 1, dtype=dtype)
    bn3, bn1, bn_id = (EvalBN.random(gen, 4, dtype=dtype) for _ in range(3))
    ref = bn3(F.conv2d(x, w3, padding=1, groups=2)) + bn1(F.conv2d(x, w1, groups=2)) + bn_id(x)
    weight, bias = sum_branches(
        [
            fold_bn_after(w3, None, *bn3.affine()),
            fold_bn_after(pad_kernel(w1, (3, 3)), None, *bn1.affine()),
            fold_bn_after(identity_kernel(4, 2, (3, 3), dtype), None, *bn_id.affine()),
        ]
    )
    assert rel_err(F.conv2d(x, weight, bias, padding=1, groups=2), ref) <= tol


@pytest.mark.parametrize("scale_kind", ["float", "0-dim tensor", "per channel"])
@pytest.mark.parametrize(("dtype", "tol"), PRECISIONS)
def test_scale_branch(scale_kind, dtype, tol):
    gen = torch.Generator().manual_seed(14)
    x = randn(gen, 2, 3, 6, 6, dtype=dtype)
    w, b = randn(gen, 4, 3, 3, 3, dtype=dtype), randn(gen, 4, dtype=dtype)
    scale = {
        "float": -0.7,
        "0-dim tensor": torch.tensor(1.3, dtype=dtype),
        "per channel": randn(gen, 4, dtype=dtype),
    }[scale_kind]
    weight, bias = scale_branch(w, b, scale)
    ref = torch.as_tensor(scale, dtype=dtype).reshape(-1, 1, 1) * F.conv2d(x, w, b)
    assert weight.dtype == bias.dtype == dtype
    assert rel_err(F.conv2d(x, weight, bias), ref) <= tol


@pytest.mark.parametrize(
    ("groups", "target_groups", "out_per_group", "in_per_group"),
    [(4, 1, 1, 1), (4, 2, 2, 3), (6, 3, 1, 2), (3, 3, 2, 2)],
)
@pytest.mark.parametrize(("dtype", "tol"), PRECISIONS)
def test_grouped_to_dense(groups, target_groups, out_per_group, in_per_group, dtype, tol):
    gen = torch.Generator().manual_seed(15)
    x = randn(gen, 2, groups * in_per_group, 6, 6, dtype=dtype)
    w = randn(gen, groups * out_per_group, in_per_group, 3, 3, dtype=dtype)
    dense = grouped_to_dense(w, groups, target_groups)
    ref = F.conv2d(x, w, padding=1, groups=groups)
    assert rel_err(F.conv2d(x, dense, padding=1, groups=target_groups), ref) <= tol


@pytest.mark.parametrize(("dtype", "tol"), PRECISIONS)
def test_dense_and_depthwise_branches_sum_after_densifying(dtype, tol):
    gen = torch.Generator().manual_seed(16)
    x = randn(gen, 2, 4, 6, 6, dtype=dtype)
    dense, depthwise = randn(gen, 4, 4, 3, 3, dtype=dtype), randn(gen, 4, 1, 3, 3, dtype=dtype)
    b = randn(gen, 4, dtype=dtype)
    ref = F.conv2d(x, dense, b, padding=1) + F.conv2d(x, depthwise, padding=1, groups=4)
    weight, bias = sum_branches([(dense, b), (grouped_to_dense(depthwise, 4), None)])
    assert rel_err(F.conv2d(x, weight, bias, padding=1), ref) <= tol


@pytest.mark.parametrize(
    ("kernel", "stride", "padding"),
    [((2, 2), 2, 0), ((3, 3), 1, 1), ((3, 3), 2, 1), ((1, 3), 1, (0, 1))],
)
@pytest.mark.parametrize("groups", [6, 2, 1])
@pytest.mark.parametrize(("dtype", "tol"), PRECISIONS)
def test_avg_pool_kernel_matches_avg_pool(kernel, stride, padding, groups, dtype, tol):
    gen = torch.Generator().manual_seed(17)
    x = randn(gen, 2, 6, 8, 8, dtype=dtype)
    ref = F.avg_pool2d(x, kernel, stride, padding, ceil_mode=False, count_include_pad=True)
    weight = avg_pool_kernel(6, groups, kernel, dtype)
    out = F.conv2d(x, weight, stride=stride, padding=padding, groups=groups)
    assert rel_err(out, ref) <= tol


def test_trap_avg_pool_without_count_include_pad():
    gen = torch.Generator().manual_seed(18)
    x = randn(gen, 2, 3, 8, 8)
    out = F.conv2d(x, avg_pool_kernel(3, 3, (3, 3), F64), padding=1, groups=3)
    assert rel_err(out, F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)) > 1e-3


def test_trap_avg_pool_with_ceil_mode():
    gen = torch.Generator().manual_seed(18)
    x = randn(gen, 2, 3, 8, 8)
    out = F.conv2d(x, avg_pool_kernel(3, 3, (3, 3), F64), stride=2, padding=1, groups=3)
    assert out.shape != F.avg_pool2d(x, 3, 2, 1, ceil_mode=True).shape


# ---------------------------------------------------------------- R6, R7, R8: sequential merges


@PROPERTY
@given(
    seed=SEEDS,
    groups=st.integers(1, 3),
    in_per_group=st.integers(1, 3),
    mid_per_group=st.integers(1, 3),
    out_per_group=st.integers(1, 3),
    kernel=KERNELS,
    stride=st.integers(1, 2),
    dilation=st.integers(1, 2),
    padded=st.booleans(),
    has_b2=st.booleans(),
)
def test_merge_1x1_then_kxk(
    seed,
    groups,
    in_per_group,
    mid_per_group,
    out_per_group,
    kernel,
    stride,
    dilation,
    padded,
    has_b2,
):
    gen = torch.Generator().manual_seed(seed)
    mid = groups * mid_per_group
    x = randn(gen, 2, groups * in_per_group, 7, 7)
    w1 = randn(gen, mid, in_per_group, 1, 1)
    b1 = maybe_randn(gen, not padded, mid)  # legal: a padded KxK only after a bias-free 1x1
    w2 = randn(gen, groups * out_per_group, mid_per_group, *kernel)
    b2 = maybe_randn(gen, has_b2, groups * out_per_group)
    padding = [dilation * (k - 1) // 2 if padded else 0 for k in kernel]
    conv = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    ref = F.conv2d(F.conv2d(x, w1, b1, groups=groups), w2, b2, **conv)
    weight, bias = merge_1x1_then_kxk(w1, b1, w2, b2, groups)
    assert rel_err(F.conv2d(x, weight, bias, **conv), ref) <= EXACT


def test_trap_merge_1x1_with_bias_then_padded_kxk():
    gen = torch.Generator().manual_seed(19)
    x = randn(gen, 2, 3, 7, 7)
    w1, b1 = randn(gen, 4, 3, 1, 1), randn(gen, 4)
    w2, b2 = randn(gen, 5, 4, 3, 3), randn(gen, 5)
    weight, bias = merge_1x1_then_kxk(w1, b1, w2, b2)
    ref = F.conv2d(F.conv2d(x, w1, b1), w2, b2, padding=1)
    assert rel_err(F.conv2d(x, weight, bias, padding=1), ref) > 1e-3


def test_merge_1x1_then_kxk_is_exact_when_the_intermediate_is_padded_with_b1():
    # DBB's BNAndPad: the border of the intermediate holds b1, which is what the merged conv sees.
    gen = torch.Generator().manual_seed(19)
    x = randn(gen, 2, 3, 7, 7)
    w1, b1 = randn(gen, 4, 3, 1, 1), randn(gen, 4)
    w2, b2 = randn(gen, 5, 4, 3, 3), randn(gen, 5)
    weight, bias = merge_1x1_then_kxk(w1, b1, w2, b2)
    ref = F.conv2d(pad_per_channel(F.conv2d(x, w1, b1), b1, 1), w2, b2)
    assert rel_err(F.conv2d(x, weight, bias, padding=1), ref) <= EXACT


@PROPERTY
@given(
    seed=SEEDS,
    groups=st.integers(1, 3),
    in_per_group=st.integers(1, 3),
    mid_per_group=st.integers(1, 3),
    out_per_group=st.integers(1, 3),
    kernel=KERNELS,
    stride=st.integers(1, 2),
    dilation=st.integers(1, 2),
    padding=st.integers(0, 2),
    has_b1=st.booleans(),
    has_b2=st.booleans(),
)
def test_merge_kxk_then_1x1(
    seed,
    groups,
    in_per_group,
    mid_per_group,
    out_per_group,
    kernel,
    stride,
    dilation,
    padding,
    has_b1,
    has_b2,
):
    gen = torch.Generator().manual_seed(seed)
    mid, out_channels = groups * mid_per_group, groups * out_per_group
    x = randn(gen, 2, groups * in_per_group, 7, 7)
    w1 = randn(gen, mid, in_per_group, *kernel)
    b1 = maybe_randn(gen, has_b1, mid)
    w2 = randn(gen, out_channels, mid_per_group, 1, 1)
    b2 = maybe_randn(gen, has_b2, out_channels)
    conv = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    ref = F.conv2d(F.conv2d(x, w1, b1, **conv), w2, b2, groups=groups)
    weight, bias = merge_kxk_then_1x1(w1, b1, w2, b2, groups)
    assert rel_err(F.conv2d(x, weight, bias, **conv), ref) <= EXACT


@pytest.mark.parametrize("merge", [merge_1x1_then_kxk, merge_kxk_then_1x1])
@pytest.mark.parametrize(("dtype", "tol"), PRECISIONS)
def test_consecutive_linears_merge(merge, dtype, tol):
    gen = torch.Generator().manual_seed(20)
    x = randn(gen, 4, 5, dtype=dtype)
    w1, b1 = randn(gen, 6, 5, dtype=dtype), randn(gen, 6, dtype=dtype)
    w2, b2 = randn(gen, 3, 6, dtype=dtype), randn(gen, 3, dtype=dtype)
    weight, bias = merge(w1, b1, w2, b2)
    assert rel_err(F.linear(x, weight, bias), F.linear(F.linear(x, w1, b1), w2, b2)) <= tol


@PROPERTY
@given(
    seed=SEEDS,
    channels=st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(1, 4)),
    kernel1=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    kernel2=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    stride1=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    stride2=st.integers(1, 2),
    padding1=st.integers(0, 1),
    has_b1=st.booleans(),
    has_b2=st.booleans(),
)
def test_merge_sequential(
    seed, channels, kernel1, kernel2, stride1, stride2, padding1, has_b1, has_b2
):
    gen = torch.Generator().manual_seed(seed)
    in_channels, mid, out_channels = channels
    x = randn(gen, 2, in_channels, 9, 9)
    w1, b1 = randn(gen, mid, in_channels, *kernel1), maybe_randn(gen, has_b1, mid)
    w2, b2 = randn(gen, out_channels, mid, *kernel2), maybe_randn(gen, has_b2, out_channels)
    ref = F.conv2d(F.conv2d(x, w1, b1, stride=stride1, padding=padding1), w2, b2, stride=stride2)
    weight, bias = merge_sequential(w1, b1, stride1, w2, b2)
    assert weight.shape[2:] == tuple(
        k1 + s1 * (k2 - 1) for k1, k2, s1 in zip(kernel1, kernel2, stride1)
    )
    out = F.conv2d(x, weight, bias, stride=[s * stride2 for s in stride1], padding=padding1)
    assert rel_err(out, ref) <= EXACT


@pytest.mark.parametrize(("dtype", "tol"), PRECISIONS)
def test_merge_two_3x3_into_5x5(dtype, tol):
    gen = torch.Generator().manual_seed(21)
    x = randn(gen, 2, 3, 8, 8, dtype=dtype)
    w1, b1 = randn(gen, 4, 3, 3, 3, dtype=dtype), randn(gen, 4, dtype=dtype)
    w2, b2 = randn(gen, 5, 4, 3, 3, dtype=dtype), randn(gen, 5, dtype=dtype)
    weight, bias = merge_sequential(w1, b1, 1, w2, b2)
    assert weight.shape == (5, 3, 5, 5)
    ref = F.conv2d(F.conv2d(x, w1, b1, padding=1), w2, b2)
    assert rel_err(F.conv2d(x, weight, bias, padding=1), ref) <= tol


def test_trap_merge_sequential_when_the_second_conv_pads():
    gen = torch.Generator().manual_seed(22)
    x = randn(gen, 2, 3, 8, 8)
    w1, w2 = randn(gen, 4, 3, 3, 3), randn(gen, 5, 4, 3, 3)
    weight, bias = merge_sequential(w1, None, 1, w2, None)
    ref = F.conv2d(F.conv2d(x, w1, padding=1), w2, padding=1)
    assert rel_err(F.conv2d(x, weight, bias, padding=2), ref) > 1e-3


# ---------------------------------------------------------------- R10 concat, R11 permutations


@pytest.mark.parametrize(("dtype", "tol"), PRECISIONS)
def test_concat_convs(dtype, tol):
    gen = torch.Generator().manual_seed(23)
    x = randn(gen, 2, 4, 6, 6, dtype=dtype)
    branches = [
        (randn(gen, 3, 4, 3, 3, dtype=dtype), randn(gen, 3, dtype=dtype)),
        (randn(gen, 5, 4, 3, 3, dtype=dtype), None),
        (randn(gen, 2, 4, 3, 3, dtype=dtype), randn(gen, 2, dtype=dtype)),
    ]
    ref = torch.cat([F.conv2d(x, w, b, padding=1) for w, b in branches], dim=1)
    weight, bias = concat_convs(branches)
    assert rel_err(F.conv2d(x, weight, bias, padding=1), ref) <= tol


def test_trap_concat_of_grouped_convs_interleaves_the_groups():
    # conv groups take contiguous blocks of the output channels, so cat(W_a, W_b) regroups them.
    gen = torch.Generator().manual_seed(24)
    x = randn(gen, 2, 4, 6, 6)
    branches = [(randn(gen, 4, 2, 3, 3), None), (randn(gen, 4, 2, 3, 3), None)]
    ref = torch.cat([F.conv2d(x, w, padding=1, groups=2) for w, _ in branches], dim=1)
    weight, bias = concat_convs(branches)
    assert rel_err(F.conv2d(x, weight, bias, padding=1, groups=2), ref) > 1e-3


@pytest.mark.parametrize(("channels", "groups"), [(6, 2), (6, 3), (8, 4), (5, 1), (4, 4)])
def test_channel_shuffle_permutation_matches_torch(channels, groups):
    x = torch.randn(2, channels, 3, 3, generator=torch.Generator().manual_seed(25))
    perm = channel_shuffle_permutation(channels, groups)
    assert perm.dtype == torch.long
    assert torch.equal(torch.channel_shuffle(x, groups), x[:, perm])
    by_reshape = x.view(2, groups, channels // groups, 3, 3).transpose(1, 2).reshape(x.shape)
    assert torch.equal(by_reshape, x[:, perm])


@PROPERTY
@given(
    seed=SEEDS,
    groups=st.integers(1, 4),
    per_group=st.integers(1, 3),
    out_channels=st.integers(1, 5),
    kernel=KERNELS,
    random_perm=st.booleans(),
)
def test_permutation_folds_into_producer_and_consumer(
    seed, groups, per_group, out_channels, kernel, random_perm
):
    gen = torch.Generator().manual_seed(seed)
    channels = groups * per_group
    perm = (
        torch.randperm(channels, generator=gen)
        if random_perm
        else channel_shuffle_permutation(channels, groups)
    )
    x = randn(gen, 2, 3, 7, 7)
    w0, b0 = randn(gen, channels, 3, 3, 3), randn(gen, channels)
    bn = EvalBN.random(gen, channels)
    w, b = randn(gen, out_channels, channels, *kernel), randn(gen, out_channels)
    produced = bn(F.conv2d(x, w0, b0, padding=1))
    shuffled = produced[:, perm]
    # producer -> BN -> permutation: permute the producer's outputs and the BN's vectors
    weight0, bias0 = permute_output_channels(w0, b0, perm)
    assert rel_err(bn.permuted(perm)(F.conv2d(x, weight0, bias0, padding=1)), shuffled) <= EXACT
    # permutation -> consumer: permute the consumer's inputs
    out = F.conv2d(produced, permute_input_channels(w, perm), b)
    assert rel_err(out, F.conv2d(shuffled, w, b)) <= EXACT


def test_permute_input_channels_direction():
    # the shuffle of 6 channels in 2 groups is no involution, so W[:, π] is the wrong answer
    gen = torch.Generator().manual_seed(26)
    x = randn(gen, 2, 6, 5, 5)
    w = randn(gen, 4, 6, 3, 3)
    perm = channel_shuffle_permutation(6, 2)
    assert not torch.equal(perm[perm], torch.arange(6))
    ref = F.conv2d(torch.channel_shuffle(x, 2), w)
    assert rel_err(F.conv2d(x, permute_input_channels(w, perm)), ref) <= EXACT
    assert rel_err(F.conv2d(x, w[:, perm]), ref) > 1e-3


def test_shuffle_into_grouped_consumer_needs_densifying():
    # ShuffleNet: shuffle -> grouped 1x1. A grouped weight is refused; its dense form folds exactly.
    gen = torch.Generator().manual_seed(27)
    x = randn(gen, 2, 6, 5, 5)
    w = randn(gen, 4, 3, 1, 1)
    perm = channel_shuffle_permutation(6, 2)
    with pytest.raises(ValueError, match="densified"):
        permute_input_channels(w, perm)
    out = F.conv2d(x, permute_input_channels(grouped_to_dense(w, 2), perm))
    assert rel_err(out, F.conv2d(torch.channel_shuffle(x, 2), w, groups=2)) <= EXACT


def test_invert_permutation():
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(28))
    inverse = invert_permutation(perm)
    assert torch.equal(inverse[perm], torch.arange(9))
    assert torch.equal(perm[inverse], torch.arange(9))
    assert torch.equal(invert_permutation([2, 0, 1]), torch.tensor([1, 2, 0]))


# ---------------------------------------------------------------- contracts


W3x3 = torch.zeros(4, 2, 3, 3)
W1x1 = torch.zeros(4, 2, 1, 1)
PRECONDITION_VIOLATIONS = [
    pytest.param(lambda: identity_kernel(4, 1, (2, 2)), "no centre", id="identity-even-kernel"),
    pytest.param(lambda: identity_kernel(6, 4, (3, 3)), "divisible", id="identity-groups"),
    pytest.param(lambda: avg_pool_kernel(6, 4, (3, 3)), "divisible", id="avg-pool-groups"),
    pytest.param(lambda: pad_kernel(torch.zeros(4, 2, 2, 2), (3, 3)), "centre", id="pad-odd"),
    pytest.param(lambda: pad_kernel(W3x3, (1, 1)), "centre", id="pad-shrink"),
    pytest.param(lambda: pad_kernel(W3x3, (5,)), "centre", id="pad-rank"),
    pytest.param(
        lambda: bn_affine(torch.zeros(4), torch.ones(3), None, None, 1e-5), "var", id="bn"
    ),
    pytest.param(
        lambda: fold_bn_after(W3x3, None, torch.ones(3), torch.zeros(3)), "scale", id="after"
    ),
    pytest.param(
        lambda: fold_bn_after(W3x3, torch.zeros(3), torch.ones(4), torch.zeros(4)),
        "bias",
        id="after-bias",
    ),
    pytest.param(
        lambda: fold_bn_after_transpose(W3x3, None, torch.ones(6), torch.zeros(6), 3),
        "divisible",
        id="after-transpose",
    ),
    pytest.param(
        lambda: fold_bn_before(W3x3, None, torch.ones(4), torch.zeros(4), 1), "scale", id="before"
    ),
    pytest.param(lambda: scale_branch(W3x3, None, torch.ones(3)), "scale", id="scale-length"),
    pytest.param(lambda: sum_branches([]), "no branches", id="sum-empty"),
    pytest.param(lambda: sum_branches([(W3x3, None), (W1x1, None)]), "branch 1", id="sum-shapes"),
    pytest.param(lambda: concat_convs([(W3x3, None), (W1x1, None)]), "branch 1", id="concat"),
    pytest.param(lambda: grouped_to_dense(W3x3, 4, 3), "divide", id="dense-target"),
    pytest.param(lambda: grouped_to_dense(W3x3, 3), "divisible", id="dense-groups"),
    pytest.param(
        lambda: merge_1x1_then_kxk(W3x3, None, torch.zeros(5, 4, 3, 3), None), "not 1x1", id="r6"
    ),
    pytest.param(
        lambda: merge_kxk_then_1x1(W3x3, None, torch.zeros(5, 4, 3, 3), None), "not 1x1", id="r7"
    ),
    pytest.param(
        lambda: merge_kxk_then_1x1(W3x3, None, torch.zeros(5, 3, 1, 1), None), "reads", id="chain"
    ),
    pytest.param(
        lambda: merge_sequential(W3x3, None, 0, torch.zeros(5, 4, 3, 3), None), "stride", id="r8"
    ),
    pytest.param(lambda: channel_shuffle_permutation(6, 4), "divisible", id="shuffle"),
    pytest.param(lambda: invert_permutation([0, 0, 1]), "permutation", id="not-a-permutation"),
    pytest.param(lambda: permute_vector(torch.zeros(3), [1, 0]), "permutation", id="perm-length"),
    pytest.param(
        lambda: permute_output_channels(W3x3, None, [0.0, 1.0, 2.0, 3.0]), "permutation", id="float"
    ),
]


@pytest.mark.parametrize(("call", "message"), PRECONDITION_VIOLATIONS)
def test_precondition_violations_raise_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_functions_keep_the_dtype_and_never_touch_their_inputs(dtype):
    gen = torch.Generator().manual_seed(29)
    w, w1x1 = randn(gen, 4, 4, 3, 3, dtype=dtype), randn(gen, 4, 4, 1, 1, dtype=dtype)
    b, scale, shift = (randn(gen, 4, dtype=dtype) for _ in range(3))
    var = torch.rand(4, generator=gen, dtype=dtype) + 0.5
    perm = torch.randperm(4, generator=gen)
    inputs = [w, w1x1, b, scale, shift, var, perm]
    before = [t.clone() for t in inputs]
    calls = [
        lambda: bn_affine(shift, var, scale, b, 1e-5),
        lambda: fold_bn_after(w, b, scale, shift),
        lambda: fold_bn_after_transpose(w, b, scale, shift, 1),
        lambda: fold_bn_before(w, b, scale, shift, 1),
        lambda: identity_kernel(4, 2, (3, 3), dtype),
        lambda: avg_pool_kernel(4, 2, (3, 3), dtype),
        lambda: pad_kernel(w1x1, (3, 3)),
        lambda: pad_kernel(w, (3, 3)),
        lambda: scale_branch(w, b, 2.0),
        lambda: sum_branches([(w, b)]),
        lambda: grouped_to_dense(w, 2),
        lambda: merge_1x1_then_kxk(w1x1, b, w, b),
        lambda: merge_kxk_then_1x1(w, b, w1x1, b),
        lambda: merge_sequential(w, b, 2, w, b),
        lambda: concat_convs([(w, None)]),
        lambda: permute_output_channels(w, b, perm),
        lambda: permute_input_channels(w, perm),
        lambda: permute_vector(b, perm),
    ]
    for call in calls:
        result = call()
        for out in result if isinstance(result, tuple) else (result,):
            assert out.dtype == dtype
            out.add_(1)  # a result that aliased an input would change it here
    assert all(torch.equal(t, saved) for t, saved in zip(inputs, before))
