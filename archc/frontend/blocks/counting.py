"""Counting torch's own layers without building them: the twins every block, stem and head twin
calls (torch-free).

One `*_cx` function per layer updates a running `Cx` (the spatial size h x w and the three
totals), in pycls' style; the twin of a module of this package is its `complexity` (a block, a
head, `MobileOneUnit`, ...) or a `*_cx` function beside its builder (`conv_bn_cx`, ...).

Counting rules (pycls, as `archc.ir.analysis`), per sample:
- conv k_h x k_w, c_in -> c_out, g groups, output h' x w': flops `k_h k_w c_in c_out h' w' / g`
  (+ `c_out h' w'` with a bias), params `k_h k_w c_in c_out / g` (+ c_out), acts `c_out h' w'`;
  h' = (h + 2 p - k) // s + 1.
- BN (2d or 1d): params 2C (gamma, beta), no flops, no acts. Linear: flops = params =
  `c_in c_out + c_out`, acts c_out. A layer scale (`x * gamma`, gamma of shape (C, 1, 1)):
  params C.
- Max/avg pooling with a window: acts `C h' w'`, h' as a conv's, or with ceil_mode torch's
  `ceil((h + 2 p - k) / s) + 1`, less one if that window would start past h + p. Adaptive average
  pooling (global, or AlexNet's 6 x 6), activations, adds, the SE multiply, channel shuffles,
  dropout, stochastic depth (eval mode) and the deep-training activation count nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Cx:
    h: int
    w: int
    flops: int = 0
    params: int = 0
    acts: int = 0

    def as_tuple(self) -> tuple[int, int, int]:
        return self.flops, self.params, self.acts


def _out_size(size: int, kernel: int, stride: int, padding: int, ceil_mode: bool = False) -> int:
    if not ceil_mode:
        return (size + 2 * padding - kernel) // stride + 1
    out = -(-(size + 2 * padding - kernel) // stride) + 1
    return out - 1 if (out - 1) * stride >= size + padding else out


def conv2d_cx(
    cx: Cx,
    w_in: int,
    w_out: int,
    kernel: int | tuple[int, int],
    stride: int = 1,
    groups: int = 1,
    bias: bool = False,
    padding: int | tuple[int, int] | None = None,
) -> Cx:
    """A conv; padding defaults to (k - 1) // 2 per dimension."""
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    if padding is None:
        padding = ((kh - 1) // 2, (kw - 1) // 2)
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    cx.h, cx.w = _out_size(cx.h, kh, stride, ph), _out_size(cx.w, kw, stride, pw)
    weights = kh * kw * w_in * w_out // groups
    cx.flops += weights * cx.h * cx.w + (w_out * cx.h * cx.w if bias else 0)
    cx.params += weights + (w_out if bias else 0)
    cx.acts += w_out * cx.h * cx.w
    return cx


def norm2d_cx(cx: Cx, width: int) -> Cx:
    cx.params += 2 * width
    return cx


def pool2d_cx(cx: Cx, width: int, kernel: int, stride: int, padding: int,
              ceil_mode: bool = False) -> Cx:
    cx.h = _out_size(cx.h, kernel, stride, padding, ceil_mode)
    cx.w = _out_size(cx.w, kernel, stride, padding, ceil_mode)
    cx.acts += width * cx.h * cx.w
    return cx


def linear_cx(cx: Cx, w_in: int, w_out: int) -> Cx:
    """Linear with bias on a flattened input."""
    cx.flops += w_in * w_out + w_out
    cx.params += w_in * w_out + w_out
    cx.acts += w_out
    return cx


def add_cx(cx: Cx, other: Cx, times: int = 1) -> Cx:
    """Add `times` the totals of `other` to cx (its spatial size stays)."""
    cx.flops += times * other.flops
    cx.params += times * other.params
    cx.acts += times * other.acts
    return cx


def branch_cx(cx: Cx, layers: Callable[[Cx], Cx]) -> Cx:
    """Run `layers` from cx's spatial size, keep their totals, restore the size (a side branch)."""
    return add_cx(cx, layers(Cx(cx.h, cx.w)))
