"""Quantized 2-D convolution (groups, depthwise, stride, padding, dilation) and its kernels.

Integer semantics (TFLite's): ``acc[n, o, y, x] = bias[o] + sum (x_q - x_zp) * w_q`` over the receptive
field, in a 32-bit accumulator (64-bit when an operand is 16-bit), with padding at the real value 0
(i.e. the integer ``x_zp``). The accumulator is then requantized to the output (see fixedpoint).

The numba kernel computes ``sum x_q * w_q - x_zp * sum w_q`` so that the heavy part is a product of raw
int8 values, which float32 BLAS computes exactly (see exact_gemm); depthwise convolutions, which are
memory-bound, run as a direct numba loop.
"""
from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

from .base import WeightedNode
from .exact_gemm import add_channel_offset, exact_matmul


@dataclass(frozen=True)
class ConvGeometry:
    stride: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)  # ONNX order: top, left, bottom, right
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1

    def output_hw(self, h: int, w: int, kh: int, kw: int) -> tuple[int, int]:
        (sh, sw), (dh, dw), (pt, pl, pb, pr) = self.stride, self.dilation, self.pads
        ho = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
        wo = (w + pl + pr - dw * (kw - 1) - 1) // sw + 1
        if ho < 1 or wo < 1:
            raise ValueError(f"kernel {kh}x{kw} with dilation {self.dilation} does not fit input {h}x{w} + padding {self.pads}")
        return ho, wo


def check_conv_shapes(x: np.ndarray, w: np.ndarray, geometry: ConvGeometry) -> None:
    if x.ndim != 4 or w.ndim != 4:
        raise ValueError(f"conv expects NCHW input and OIHW weights, got {x.shape} and {w.shape}")
    groups = geometry.groups
    if x.shape[1] != w.shape[1] * groups or w.shape[0] % groups:
        raise ValueError(f"conv input has {x.shape[1]} channels but weights {w.shape} with groups={groups} "
                         f"expect {w.shape[1] * groups}")


def conv_reference(x: np.ndarray, x_zp: int, w: np.ndarray, bias: np.ndarray, geometry: ConvGeometry) -> np.ndarray:
    """The definition: int64 accumulators, loops over kernel taps, integer einsum per group."""
    check_conv_shapes(x, w, geometry)
    (sh, sw), (dh, dw), (pt, pl, pb, pr) = geometry.stride, geometry.dilation, geometry.pads
    g = geometry.groups
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    ho, wo = geometry.output_hw(h, wd, kh, kw)
    centered = np.pad(x.astype(np.int64) - x_zp, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    grouped = centered.reshape(n, g, cg, h + pt + pb, wd + pl + pr)
    weights = w.astype(np.int64).reshape(g, o // g, cg, kh, kw)
    acc = np.zeros((n, g, o // g, ho, wo), dtype=np.int64)
    for i in range(kh):
        for j in range(kw):
            taps = grouped[:, :, :, i * dh: i * dh + sh * (ho - 1) + 1: sh, j * dw: j * dw + sw * (wo - 1) + 1: sw]
            acc += np.einsum("ngchw,goc->ngohw", taps, weights[:, :, :, i, j])
    return acc.reshape(n, o, ho, wo) + bias.astype(np.int64).reshape(1, o, 1, 1)


@numba.njit(cache=True, nogil=True)
def _depthwise_kernel(x, x_zp, w, bias, sh, sw, pt, pl, dh, dw, out):
    n_batch, n_chan, h, wd = x.shape
    _, _, kh, kw = w.shape
    _, _, ho, wo = out.shape
    for b in range(n_batch):
        for c in range(n_chan):
            for oy in range(ho):
                for ox in range(wo):
                    acc = np.int64(bias[c])
                    for i in range(kh):
                        iy = oy * sh - pt + i * dh
                        if iy < 0 or iy >= h:
                            continue
                        for j in range(kw):
                            ix = ox * sw - pl + j * dw
                            if 0 <= ix < wd:
                                acc += (np.int64(x[b, c, iy, ix]) - x_zp) * np.int64(w[c, 0, i, j])
                    out[b, c, oy, ox] = acc


@numba.njit(cache=True, nogil=True)
def _im2col_kernel(x, x_zp, kh, kw, sh, sw, pt, pl, dh, dw, ho, wo, cols):
    """cols[b, (c, i, j), (oy, ox)] = x at that tap, or x_zp (real zero) in the padding."""
    n_batch, n_chan, h, wd = x.shape
    for b in range(n_batch):
        for c in range(n_chan):
            for i in range(kh):
                for j in range(kw):
                    row = (c * kh + i) * kw + j
                    for oy in range(ho):
                        iy = oy * sh - pt + i * dh
                        for ox in range(wo):
                            ix = ox * sw - pl + j * dw
                            inside = 0 <= iy < h and 0 <= ix < wd
                            cols[b, row, oy * wo + ox] = x[b, c, iy, ix] if inside else x_zp


def conv_numba(x: np.ndarray, x_zp: int, w: np.ndarray, bias: np.ndarray, geometry: ConvGeometry) -> np.ndarray:
    """Same integers as :func:`conv_reference`: direct loop for depthwise, im2col + exact BLAS otherwise."""
    check_conv_shapes(x, w, geometry)
    (sh, sw), (dh, dw), (pt, pl, _, _) = geometry.stride, geometry.dilation, geometry.pads
    g = geometry.groups
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    ho, wo = geometry.output_hw(h, wd, kh, kw)
    x = np.ascontiguousarray(x)
    if cg == 1 and o == g:
        out = np.empty((n, o, ho, wo), dtype=np.int64)
        _depthwise_kernel(x, int(x_zp), np.ascontiguousarray(w), bias.astype(np.int64), sh, sw, pt, pl, dh, dw, out)
        return out
    og = o // g
    k = cg * kh * kw
    pointwise = kh == kw == 1 and geometry.pads == (0, 0, 0, 0) and (sh, sw) == (1, 1)
    parts = []
    for gi in range(g):
        xg = x[:, gi * cg:(gi + 1) * cg]
        if pointwise:
            cols = xg.reshape(n, cg, h * wd)
        else:
            cols = np.empty((n, k, ho * wo), dtype=np.float32 if x.itemsize == 1 else np.float64)
            _im2col_kernel(np.ascontiguousarray(xg), int(x_zp), kh, kw, sh, sw, pt, pl, dh, dw, ho, wo, cols)
        wg = w[gi * og:(gi + 1) * og].reshape(og, k)
        parts.append(exact_matmul(wg, cols, w.dtype, x.dtype))
    acc = parts[0] if g == 1 else np.concatenate(parts, axis=1)
    offset = bias.astype(np.int64) - int(x_zp) * w.reshape(o, -1).astype(np.int64).sum(axis=1)
    return add_channel_offset(acc.reshape(n, o, ho, wo), offset)


@dataclass
class QConv(WeightedNode):
    geometry: ConvGeometry = ConvGeometry()

    op_type = "Conv"

    def run(self, kernels, xs, rounding, overrides=None):
        weight, bias = self.weights_from(overrides)
        acc = kernels.conv(xs[0], self.in_params.zero_point, weight, bias, self.geometry)
        return self.finish(kernels, acc, rounding)

    def macs(self, in_shapes, out_shape):
        o, cg, kh, kw = self.weight.shape
        return int(np.prod(out_shape)) * cg * kh * kw
