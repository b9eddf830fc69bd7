"""Low-rank weight algebra: truncated SVD of a matrix layer, Tucker-2 of a KxK conv (pure tensor
functions, float64 inside, no graph).

- `svd_factors(W, r)`: W [out, in] ~ B A with A = sqrt(S_r) V_r^T [r, in] and B = U_r sqrt(S_r)
  [out, r] (Eckart-Young: the best rank-r approximation in the Frobenius norm). A 1x1 conv or a
  Linear x -> W x + b becomes x -> B (A x) + b: a thin layer without bias, then one with it.
- `tucker2_factors(W, r_out, r_in)`: W [out, in, kh, kw] ~ C x_1 U x_2 V with U [out, r_out] and
  V [in, r_in] the leading left singular vectors of the mode-1 and mode-2 unfoldings (truncated
  HOSVD) and the core C = W x_1 U^T x_2 V^T [r_out, r_in, kh, kw]. The conv becomes 1x1 (V^T,
  in -> r_in) -> KxK core (stride, padding, dilation of the original; zero padding commutes with
  the 1x1 projection) -> 1x1 (U, r_out -> out, with the bias). U and V are orthonormal, so at full
  rank (r_out = out, r_in = in) the chain is exact.
- `spatial_factors(W, r)`: W [out, in, kh, kw] ~ a Kx1 conv in -> r then a 1xK conv r -> out
  (the truncated SVD of W as the matrix [(in, kh), (out, kw)]); exact at full rank.
- `rank_for_energy(s, e)`: the smallest r whose leading squared singular values hold a fraction
  >= e of the total.
"""

from __future__ import annotations

import torch
from torch import Tensor


def singular_values(matrix: Tensor) -> Tensor:
    return torch.linalg.svdvals(matrix.double())


def rank_for_energy(values: Tensor, energy: float) -> int:
    """Smallest r with sum(s[:r]^2) >= energy * sum(s^2) (at least 1)."""
    if not 0 < energy <= 1:
        raise ValueError(f"energy must be in (0, 1], not {energy}")
    squares = values.double() ** 2
    total = float(squares.sum())
    if total == 0:
        return 1
    cumulative = torch.cumsum(squares, 0) / total
    if energy >= 1:
        return int(values.numel())
    return int(torch.searchsorted(cumulative, torch.tensor(energy, dtype=torch.float64))) + 1


def svd_factors(weight: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """(A [r, in], B [out, r]) with B @ A the best rank-r approximation of `weight` [out, in]."""
    if weight.ndim != 2:
        raise ValueError(f"svd_factors takes a matrix, got shape {tuple(weight.shape)}")
    if not 1 <= rank <= min(weight.shape):
        raise ValueError(f"rank {rank} outside 1..{min(weight.shape)}")
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    root = s[:rank].sqrt()
    first = root[:, None] * vh[:rank]
    second = u[:, :rank] * root[None, :]
    return first.to(weight.dtype), second.to(weight.dtype)


def _leading_vectors(unfolded: Tensor, rank: int) -> Tensor:
    u, _, _ = torch.linalg.svd(unfolded, full_matrices=False)
    return u[:, :rank]


def mode_singular_values(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Singular values of the mode-1 (output) and mode-2 (input) unfoldings of a conv weight."""
    w = weight.double()
    out, cin = w.shape[:2]
    return (torch.linalg.svdvals(w.reshape(out, -1)),
            torch.linalg.svdvals(w.transpose(0, 1).reshape(cin, -1)))


def tucker2_factors(weight: Tensor, rank_out: int, rank_in: int
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """(first [r_in, in, 1, 1], core [r_out, r_in, kh, kw], last [out, r_out, 1, 1]): the
    1x1 -> KxK -> 1x1 chain of a truncated Tucker-2 (HOSVD) of `weight` [out, in, kh, kw]."""
    if weight.ndim < 3:
        raise ValueError(f"tucker2_factors takes a conv weight, got shape {tuple(weight.shape)}")
    w = weight.double()
    out, cin = w.shape[:2]
    if not (1 <= rank_out <= out and 1 <= rank_in <= cin):
        raise ValueError(f"ranks ({rank_out}, {rank_in}) outside (1..{out}, 1..{cin})")
    u = _leading_vectors(w.reshape(out, -1), rank_out)  # [out, r_out]
    v = _leading_vectors(w.transpose(0, 1).reshape(cin, -1), rank_in)  # [in, r_in]
    core = torch.einsum("oi...,or,is->rs...", w, u, v)
    spatial = (1,) * (weight.ndim - 2)
    first = v.t().reshape(rank_in, cin, *spatial)
    last = u.reshape(out, rank_out, *spatial)
    return first.to(weight.dtype), core.to(weight.dtype), last.to(weight.dtype)


def tucker2_weight(first: Tensor, core: Tensor, last: Tensor) -> Tensor:
    """The single conv weight the chain computes: W = core x_1 U x_2 V."""
    u = last.double().flatten(1)  # [out, r_out]
    v = first.double().flatten(1).t()  # [in, r_in]
    return torch.einsum("rs...,or,is->oi...", core.double(), u, v).to(core.dtype)


def frobenius_relative_error(reference: Tensor, candidate: Tensor) -> float:
    """||candidate - reference||_F / ||reference||_F (the Frobenius norm of the whole tensor, in
    float64), ||candidate||_F for an all-zero reference. Same argument order as
    `archc.ir.verify.relative_error`, which measures max|candidate - reference| / max|reference|
    instead: this one weighs every entry, the measure of a weight approximation."""
    reference, candidate = reference.detach().double(), candidate.detach().double()
    norm = float(reference.norm())
    difference = float((candidate - reference).norm())
    return difference / norm if norm else difference


def merge_low_rank_branch(weight: Tensor, down: Tensor, up: Tensor) -> Tensor:
    """The conv weight of x -> conv_W(x) + conv_up(conv_down(x)) with down [r, in, k...] (same
    window as W) and up [out, r, 1...]: W + up . down (in float64, returned in W's dtype)."""
    if up.shape[2:] != (1,) * (up.ndim - 2) or down.shape[2:] != weight.shape[2:]:
        raise ValueError("the branch must be a conv of W's kernel followed by a 1x1 conv")
    delta = torch.einsum("or,ri...->oi...", up.double().flatten(1), down.double())
    return (weight.double() + delta).to(weight.dtype)


def spatial_matrix(weight: Tensor) -> Tensor:
    """W [out, in, kh, kw] as the matrix M[(in, kh), (out, kw)] whose rank-r factorization is a
    Kx1 conv followed by a 1xK conv."""
    if weight.ndim != 4:
        raise ValueError(f"spatial factors take a 2-d conv weight, got {tuple(weight.shape)}")
    out, cin, kh, kw = weight.shape
    return weight.double().permute(1, 2, 0, 3).reshape(cin * kh, out * kw)


def spatial_factors(weight: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """(vertical [r, in, kh, 1], horizontal [out, r, 1, kw]): W[o, i, a, b] ~ sum_r
    vertical[r, i, a] horizontal[o, r, b], the best such approximation (the truncated SVD of
    `spatial_matrix(W)`; Jaderberg et al. 2014's scheme 2). A KxK conv becomes Kx1 (the original's
    vertical stride, padding, dilation; no bias) then 1xK (the horizontal ones; the bias): zero
    padding commutes, the Kx1 conv of zero columns is zero. Exact at rank min(in kh, out kw)."""
    out, cin, kh, kw = weight.shape
    # spatial_matrix(W) [(in, kh), (out, kw)] ~ left @ right, left [(in, kh), r], right
    # [r, (out, kw)]
    right, left = svd_factors(spatial_matrix(weight), rank)
    vertical = left.t().reshape(rank, cin, kh, 1)
    horizontal = right.reshape(rank, out, kw).permute(1, 0, 2).reshape(out, rank, 1, kw)
    return vertical.to(weight.dtype), horizontal.to(weight.dtype)


def spatial_weight(vertical: Tensor, horizontal: Tensor) -> Tensor:
    """The KxK weight the Kx1 -> 1xK chain computes."""
    return torch.einsum("ria,orb->oiab", vertical.double()[..., 0],
                        horizontal.double()[:, :, 0, :]).to(vertical.dtype)
