"""Quantized pooling: MaxPool, AveragePool, GlobalAveragePool.

Pools keep the input's scale and zero point (as TFLite requires), so no requantization is needed:
max pooling is an integer max (padding never wins), average pooling is the integer mean of
``x - zp`` rounded by the rounding mode's tie rule, over the taps inside the input (or over the whole
kernel with ``count_include_pad``; padding is the real value 0 either way).
"""
from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

from ..fixedpoint import round_divide
from .base import Node


@dataclass(frozen=True)
class PoolGeometry:
    kernel: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)  # top, left, bottom, right
    count_include_pad: bool = False

    def output_hw(self, h: int, w: int) -> tuple[int, int]:
        (kh, kw), (sh, sw), (pt, pl, pb, pr) = self.kernel, self.stride, self.pads
        ho, wo = (h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1
        if ho < 1 or wo < 1:
            raise ValueError(f"pool kernel {self.kernel} does not fit input {h}x{w} + padding {self.pads}")
        return ho, wo


def _taps(x: np.ndarray, g: PoolGeometry, fill):
    """Yield, per kernel tap, the (N, C, Ho, Wo) view of the padded input (reference kernels)."""
    (kh, kw), (sh, sw), (pt, pl, pb, pr) = g.kernel, g.stride, g.pads
    ho, wo = g.output_hw(x.shape[2], x.shape[3])
    padded = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)), constant_values=fill)
    for i in range(kh):
        for j in range(kw):
            yield padded[:, :, i: i + sh * (ho - 1) + 1: sh, j: j + sw * (wo - 1) + 1: sw]


def maxpool_reference(x: np.ndarray, g: PoolGeometry) -> np.ndarray:
    return np.maximum.reduce(list(_taps(x, g, np.iinfo(x.dtype).min)))


def avgpool_reference(x: np.ndarray, zp: int, g: PoolGeometry, mode: str) -> np.ndarray:
    total = sum(t.astype(np.int64) for t in _taps(x.astype(np.int64) - zp, g, 0))
    if g.count_include_pad:
        count = np.int64(g.kernel[0] * g.kernel[1])
    else:
        ones = np.ones((1, 1) + x.shape[2:], dtype=np.int64)
        count = sum(_taps(ones, g, 0))
    return (round_divide(total, count, mode) + zp).astype(x.dtype)


@numba.njit(cache=True, nogil=True, inline="always")
def _rounded_mean(total, count, half_even):
    """``total / count`` rounded to nearest, ties by the mode (round_divide's rule)."""
    q = total // count  # floor, like numpy
    twice = 2 * (total - q * count)
    if twice > count or (twice == count and ((half_even and q % 2 == 1) or (not half_even and total >= 0))):
        q += 1
    return q


@numba.njit(cache=True, nogil=True, parallel=True)
def _pool_kernel(x, zp, kh, kw, sh, sw, pt, pl, include_pad, is_max, half_even, out):
    """One task per (sample, channel) plane, spread over the threads. For each output row the window's input
    rows are first folded into one padded row (max or sum: a contiguous loop that vectorizes), then each
    window reads its kw entries of that row. Padding holds the fold's neutral element, so the taps need no
    bounds checks: the small CNN's 2x2 max pools, tap by tap, had been half of its forward pass."""
    n_batch, n_chan, h, wd = x.shape
    _, _, ho, wo = out.shape
    width = max(pl + wd, (wo - 1) * sw + kw)
    neutral = np.int64(-(1 << 62)) if is_max else np.int64(0)
    for p in numba.prange(n_batch * n_chan):
        b, c = p // n_chan, p % n_chan
        row = np.empty(width, np.int64)
        for oy in range(ho):
            y0 = oy * sh - pt
            i_lo, i_hi = max(0, -y0), min(kh, h - y0)
            row[:] = neutral
            for i in range(i_lo, i_hi):
                line, inner = x[b, c, y0 + i], row[pl:pl + wd]
                if is_max:
                    for k in range(wd):
                        inner[k] = max(inner[k], np.int64(line[k]))
                else:
                    for k in range(wd):
                        inner[k] += np.int64(line[k])
            rows = max(0, i_hi - i_lo)
            for ox in range(wo):
                x0 = ox * sw
                acc = row[x0]
                for j in range(1, kw):
                    acc = max(acc, row[x0 + j]) if is_max else acc + row[x0 + j]
                if is_max:
                    out[b, c, oy, ox] = acc
                    continue
                taps = np.int64(rows * max(0, min(x0 + kw, pl + wd) - max(x0, pl)))  # inside the plane
                count = np.int64(kh * kw) if include_pad else taps
                out[b, c, oy, ox] = _rounded_mean(acc - zp * taps, count, half_even) + zp


@numba.njit(cache=True, nogil=True)
def _global_pool_kernel(x, zp, is_max, half_even, out):
    """A window that is the whole plane (GlobalAveragePool): one contiguous reduction per plane, which
    vectorizes, instead of the general loop's bounds-checked taps (a 1280 x 4 x 4 input took 60 us there)."""
    n_batch, n_chan, h, wd = x.shape
    planes = x.reshape(n_batch * n_chan, h * wd)
    flat = out.reshape(n_batch * n_chan)
    for p in range(n_batch * n_chan):
        plane = planes[p]
        if is_max:
            flat[p] = plane.max()
        else:
            total = np.int64(0)
            for i in range(h * wd):
                total += np.int64(plane[i])
            flat[p] = _rounded_mean(total - zp * h * wd, np.int64(h * wd), half_even) + zp


def _pool_numba(x, zp, g: PoolGeometry, is_max: bool, mode: str) -> np.ndarray:
    ho, wo = g.output_hw(x.shape[2], x.shape[3])
    out = np.empty(x.shape[:2] + (ho, wo), dtype=x.dtype)
    (kh, kw), (sh, sw), (pt, pl, _, _) = g.kernel, g.stride, g.pads
    x = np.ascontiguousarray(x)
    if (kh, kw) == x.shape[2:] and g.pads == (0, 0, 0, 0):
        _global_pool_kernel(x, int(zp), is_max, mode == "half_even", out)
    else:
        _pool_kernel(x, int(zp), kh, kw, sh, sw, pt, pl, g.count_include_pad, is_max, mode == "half_even", out)
    return out


def maxpool_numba(x: np.ndarray, g: PoolGeometry) -> np.ndarray:
    return _pool_numba(x, 0, g, True, "half_even")


def avgpool_numba(x: np.ndarray, zp: int, g: PoolGeometry, mode: str) -> np.ndarray:
    return _pool_numba(x, zp, g, False, mode)


@dataclass
class QMaxPool(Node):
    geometry: PoolGeometry = None

    op_type = "MaxPool"

    def run(self, kernels, xs, rounding, overrides=None):
        return kernels.maxpool(xs[0], self.geometry)


@dataclass
class QAvgPool(Node):
    """AveragePool; GlobalAveragePool is the same with the kernel set to the input's size at run time."""

    geometry: PoolGeometry | None = None  # None: global

    op_type = "AveragePool"

    def run(self, kernels, xs, rounding, overrides=None):
        geometry = self.geometry or PoolGeometry(kernel=xs[0].shape[2:])
        return kernels.avgpool(xs[0], self.out_params.zero_point, geometry, rounding)

    def macs(self, in_shapes, out_shape):
        return int(np.prod(in_shapes[0]))
