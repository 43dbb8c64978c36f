"""Quantized elementwise Add of two tensors with different scales (residual connections).

``half_even`` (onnxruntime's QDQ arithmetic, float32): ``rint(((x1 - z1) * s1 + (x2 - z2) * s2) / s_y) + z_y``.
``half_away`` (TFLite's integer-only add): both inputs are shifted left by 20 bits (15 for 16-bit
tensors), rescaled to a common scale ``2 * max(s1, s2)`` with fixed-point multipliers, summed, and the sum
requantized to the output; every rounding is half away from zero.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numba
import numpy as np

from ..fixedpoint import Requant, round_shift
from ..tensor import QParams
from .base import Node


@dataclass(frozen=True)
class AddRescale:
    """Everything the add kernels need, derived once from the three tensors' params."""

    z1: int
    z2: int
    zy: int
    s1: np.float32
    s2: np.float32
    sy: np.float32
    left_shift: int
    m1: Requant
    m2: Requant
    my: Requant

    @classmethod
    def from_params(cls, a: QParams, b: QParams, y: QParams) -> "AddRescale":
        s1, s2, sy = float(a.scale), float(b.scale), float(y.scale)
        left_shift = 20 if max(a.bits, b.bits) == 8 else 15
        twice_max = 2 * max(s1, s2)
        return cls(a.zero_point, b.zero_point, y.zero_point, np.float32(s1), np.float32(s2), np.float32(sy),
                   left_shift, Requant.from_real(s1 / twice_max, False), Requant.from_real(s2 / twice_max, False),
                   Requant.from_real(twice_max / ((1 << left_shift) * sy), False))


def _fixed(values: np.ndarray, rq: Requant) -> np.ndarray:
    return round_shift(values * rq.mantissa[0], rq.shift[0], "half_away")


def add_reference(x1, x2, r: AddRescale, lo: int, hi: int, mode: str, out_dtype) -> np.ndarray:
    if x1.shape != x2.shape:
        raise ValueError(f"add needs equal shapes, got {x1.shape} and {x2.shape}")
    d1, d2 = x1.astype(np.int64) - r.z1, x2.astype(np.int64) - r.z2
    if mode == "half_even":
        real = (d1.astype(np.float32) * r.s1 + d2.astype(np.float32) * r.s2) / r.sy
        out = np.rint(np.clip(real, np.float32(lo - r.zy), np.float32(hi - r.zy))).astype(np.int64) + r.zy
    else:
        total = _fixed(d1 << r.left_shift, r.m1) + _fixed(d2 << r.left_shift, r.m2)
        out = np.clip(_fixed(total, r.my) + r.zy, lo, hi)
    return out.astype(out_dtype)


@numba.njit(cache=True, nogil=True)
def _fixed_scalar(v, mantissa, shift):
    p = v * mantissa
    half = np.int64(1) << (shift - 1)
    return -((-p + half) >> shift) if p < 0 else (p + half) >> shift


@numba.njit(cache=True, nogil=True, parallel=True)
def _add_kernel(x1, x2, z1, z2, zy, s1, s2, sy, ls, a1, n1, a2, n2, ay, ny, lo, hi, half_even, out):
    """The rounding mode is chosen once, outside two plain parallel loops (a branch inside keeps a loop
    from vectorizing). In half_even the differences are exact in int32 and float32, as in int64."""
    if half_even:
        flo, fhi, w1, w2 = np.float32(lo - zy), np.float32(hi - zy), np.int32(z1), np.int32(z2)
        for i in numba.prange(x1.size):
            real = (np.float32(np.int32(x1[i]) - w1) * s1 + np.float32(np.int32(x2[i]) - w2) * s2) / sy
            out[i] = np.int32(np.rint(min(max(real, flo), fhi))) + zy
    else:
        for i in numba.prange(x1.size):
            total = _fixed_scalar((np.int64(x1[i]) - z1) << ls, a1, n1) + _fixed_scalar((np.int64(x2[i]) - z2) << ls,
                                                                                       a2, n2)
            out[i] = min(max(_fixed_scalar(total, ay, ny) + zy, lo), hi)


def add_numba(x1, x2, r: AddRescale, lo: int, hi: int, mode: str, out_dtype) -> np.ndarray:
    if x1.shape != x2.shape:
        raise ValueError(f"add needs equal shapes, got {x1.shape} and {x2.shape}")
    out = np.empty(x1.shape, dtype=out_dtype)
    _add_kernel(np.ascontiguousarray(x1).ravel(), np.ascontiguousarray(x2).ravel(), r.z1, r.z2, r.zy,
                r.s1, r.s2, r.sy, r.left_shift, r.m1.mantissa[0], r.m1.shift[0], r.m2.mantissa[0], r.m2.shift[0],
                r.my.mantissa[0], r.my.shift[0], lo, hi, mode == "half_even", out.reshape(-1))
    return out


@dataclass
class QAdd(Node):
    a_params: QParams = None
    b_params: QParams = None
    clamp: tuple[int, int] = None
    rescale: AddRescale = field(init=False)

    op_type = "Add"

    def __post_init__(self):
        if self.clamp is None:
            self.clamp = (self.out_params.qmin, self.out_params.qmax)
        self.rescale = AddRescale.from_params(self.a_params, self.b_params, self.out_params)

    def run(self, kernels, xs, rounding, overrides=None):
        lo, hi = self.clamp
        return kernels.add(xs[0], xs[1], self.rescale, lo, hi, rounding, self.out_params.dtype)
