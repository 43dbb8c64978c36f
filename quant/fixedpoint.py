"""Requantization: how an integer accumulator becomes an integer output.

Two rounding modes, because the two families of integer runtimes disagree and a user must be able to
simulate either bit-exactly:

``half_even`` -- onnxruntime / MLAS arithmetic. The real multiplier is a float32 computed as
    ``float32(s_x) * float32(s_w) / float32(s_y)`` and the output is ``rint(float32(acc) * m)``
    (round half to even), clamped, plus the zero point. This is what a model exported to ONNX computes
    on onnxruntime (and on NPUs reached through it), so our integers equal onnxruntime's.

``half_away`` -- TFLite Micro / CMSIS-NN integer-only arithmetic, for chips without an FPU. The real
    multiplier is encoded as an integer mantissa and a right shift, ``m ~= M / 2**n``: a Q31 mantissa
    for 32-bit accumulators, and TFLite's reduced Q15 mantissa for 64-bit accumulators (16-bit
    operands) so that ``acc * M`` stays inside int64. The output is ``acc * M / 2**n`` rounded half
    away from zero with a single rounding (CMSIS-NN's single-rounding variant).

Everything here is plain numpy and defines the arithmetic; the numba backend re-implements the same
formulas and is tested to give identical integers.
"""
from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

ROUNDING_MODES = ("half_even", "half_away")


def check_rounding(mode: str) -> str:
    if mode not in ROUNDING_MODES:
        raise ValueError(f"unknown rounding mode {mode!r}: use one of {', '.join(ROUNDING_MODES)}")
    return mode


def quantize_multiplier(real: np.ndarray, mantissa_bits: int = 31) -> tuple[np.ndarray, np.ndarray]:
    """Encode positive real multipliers as (mantissa, right_shift) with ``real ~= mantissa / 2**shift``.

    The mantissa is normalised into [2**(bits-1), 2**bits) like TFLite's QuantizeMultiplier, so it
    keeps ``mantissa_bits`` significant bits whatever the magnitude of the multiplier.
    """
    real = np.asarray(real, dtype=np.float64)
    if np.any(~np.isfinite(real)) or np.any(real <= 0):
        raise ValueError(f"requantization multipliers must be finite and > 0, got {real}")
    frac, exp = np.frexp(real)  # real = frac * 2**exp, frac in [0.5, 1)
    mantissa = np.round(frac * (1 << mantissa_bits)).astype(np.int64)
    overflow = mantissa == (1 << mantissa_bits)  # frac rounded up to 1.0
    mantissa[overflow] //= 2
    exp = exp + overflow
    shift = mantissa_bits - exp.astype(np.int64)
    if np.any(shift < 1) or np.any(shift > 62):
        raise ValueError(f"multiplier {real} is outside the fixed-point range (2**-31 .. 2**{mantissa_bits - 1})")
    return mantissa, shift


@dataclass(frozen=True)
class Requant:
    """One real multiplier per output channel (or a single one), in both encodings.

    ``float32``: the onnxruntime multiplier; ``mantissa``/``shift``: the integer-only one.
    """

    float32: np.ndarray
    mantissa: np.ndarray
    shift: np.ndarray

    @classmethod
    def from_scales(cls, s_in, s_w, s_out, wide_accumulator: bool) -> "Requant":
        """Multiplier ``s_in * s_w / s_out`` computed exactly as onnxruntime does, in float32."""
        f32 = (np.float32(s_in) * np.asarray(s_w, np.float32)) / np.float32(s_out)
        f32 = np.atleast_1d(np.asarray(f32, np.float32))
        mantissa, shift = quantize_multiplier(f32.astype(np.float64), 15 if wide_accumulator else 31)
        return cls(f32, mantissa, shift)

    @classmethod
    def from_real(cls, real, wide_accumulator: bool) -> "Requant":
        f32 = np.atleast_1d(np.asarray(real, np.float32))
        mantissa, shift = quantize_multiplier(f32.astype(np.float64), 15 if wide_accumulator else 31)
        return cls(f32, mantissa, shift)


@dataclass(frozen=True)
class OutputSpec:
    """Where accumulators go: multiplier, zero point, integer range (fused clamps), rounding, storage type."""

    requant: Requant
    zero_point: int
    qmin: int
    qmax: int
    mode: str
    dtype: type

    def apply(self, acc: np.ndarray) -> np.ndarray:
        return requantize(acc, self.requant, self.zero_point, self.qmin, self.qmax, self.mode, self.dtype)

    def channels(self, which: slice) -> "OutputSpec":
        """The spec of a slice of the output channels (a convolution group's)."""
        rq = self.requant
        if rq.float32.size > 1:
            rq = Requant(rq.float32[which], rq.mantissa[which], rq.shift[which])
        return OutputSpec(rq, self.zero_point, self.qmin, self.qmax, self.mode, self.dtype)


def channel_view(values: np.ndarray, ndim: int) -> np.ndarray:
    """Shape a per-channel vector to broadcast along axis 1 of an (N, C, ...) array."""
    values = np.asarray(values)
    if values.size == 1:
        return values.reshape(())
    return values.reshape((1, -1) + (1,) * (ndim - 2))


def round_shift(product: np.ndarray, shift: np.ndarray, mode: str) -> np.ndarray:
    """``product / 2**shift`` rounded to an integer with the given tie rule, integers only."""
    half = np.int64(1) << (shift - 1)
    if mode == "half_away":
        magnitude = (np.abs(product) + half) >> shift
        return np.where(product < 0, -magnitude, magnitude)
    floor = product >> shift
    remainder = product - (floor << shift)
    up = (remainder > half) | ((remainder == half) & ((floor & 1) == 1))
    return floor + up


def requantize(acc: np.ndarray, rq: Requant, zero_point: int, qmin: int, qmax: int, mode: str,
               out_dtype=np.int64) -> np.ndarray:
    """Scale integer accumulators (N, C, ...) to output integers in [qmin, qmax]."""
    acc = np.asarray(acc).astype(np.int64)
    if mode == "half_even":
        scaled = acc.astype(np.float32) * channel_view(rq.float32, acc.ndim)
        lo, hi = np.float32(qmin - zero_point), np.float32(qmax - zero_point)
        out = np.rint(np.clip(scaled, lo, hi)).astype(np.int64) + zero_point
    else:
        product = acc * channel_view(rq.mantissa, acc.ndim)
        out = np.clip(round_shift(product, channel_view(rq.shift, acc.ndim), mode) + zero_point, qmin, qmax)
    return out.astype(out_dtype)


def round_divide(numerator: np.ndarray, denominator: int | np.ndarray, mode: str) -> np.ndarray:
    """Integer division rounded to nearest, ties by ``mode`` (average pooling uses it)."""
    numerator = np.asarray(numerator, dtype=np.int64)
    denominator = np.asarray(denominator, dtype=np.int64)
    q, r = np.divmod(numerator, denominator)  # floor division, 0 <= r < d
    twice = 2 * r
    if mode == "half_even":
        up = (twice > denominator) | ((twice == denominator) & ((q & 1) == 1))
    else:
        up = (twice > denominator) | ((twice == denominator) & (numerator >= 0))
    return q + up


# ---- numba twins of the functions above (same formulas, element by element) -------------------------

@numba.njit(cache=True, nogil=True, inline="always")
def requantize_scalar(a, mant, sh, half, zero_point, qmin, qmax):
    """``half_away`` for one int64 accumulator ``a``: the integer-only formula of :func:`requantize`."""
    p = a * mant
    q = -((-p + half) >> sh) if p < 0 else (p + half) >> sh
    return min(max(q + zero_point, qmin), qmax)


@numba.njit(cache=True, nogil=True, inline="always")
def requantize_float_scalar(a, offset, m, zero_point, lo, hi):
    """``half_even`` for an exact integer ``a`` held in a float, without leaving floating point: ``a + offset``
    (``offset`` a float64) is exact in float64 (below 2**53) and rounds to float32 once, as onnxruntime's
    int32 -> float32 conversion does; branch-free so loops over it vectorize."""
    v = np.float32(np.float64(a) + offset) * m
    v = lo if v < lo else (hi if v > hi else v)
    return np.int32(np.rint(v)) + zero_point


@numba.njit(cache=True, nogil=True)
def store_accumulators(acc, count, off, m, mant, shf, zero_point, qmin, qmax, half_even, requantize_out, out):
    """The outputs of one channel: ``out[:count]`` = the exact accumulators ``acc[:count]`` (integers, or
    integers held in floats by the fused kernels) plus the channel's ``offset``, requantized in the layer's
    rounding mode, or the int64 sums when the caller asked for accumulators (``requantize_out`` False). The
    formula is chosen once, outside three plain loops: a branch inside the loop keeps it from vectorizing
    (6x slower over a depthwise conv's outputs, measured)."""
    if not requantize_out:
        for q in range(count):
            out[q] = np.int64(acc[q]) + off
    elif half_even:
        lo, hi, off64 = np.float32(qmin - zero_point), np.float32(qmax - zero_point), np.float64(off)
        for q in range(count):
            out[q] = requantize_float_scalar(acc[q], off64, m, zero_point, lo, hi)
    else:
        half = np.int64(1) << (shf - 1)
        for q in range(count):
            out[q] = requantize_scalar(np.int64(acc[q]) + off, mant, shf, half, zero_point, qmin, qmax)


@numba.njit(cache=True, nogil=True)
def lane_params(c0, count, offset, f32, mantissa, shift):
    """Channels ``c0 .. c0 + count``'s offsets and multipliers (the layer's one repeated if it has one), as
    :func:`store_lanes` takes them: one array each, indexed like the lanes."""
    per_channel = f32.shape[0] > 1
    offsets, m = offset[c0:c0 + count].copy(), np.empty(count, np.float32)
    mant, shf = np.empty(count, np.int64), np.empty(count, np.int64)
    for c in range(count):
        k = c0 + c if per_channel else 0
        m[c], mant[c], shf[c] = f32[k], mantissa[k], shift[k]
    return offsets, offsets.astype(np.float64), m, mant, shf, np.int64(1) << (shf - 1)


@numba.njit(cache=True, nogil=True)
def store_lanes(acc, count, params, zero_point, qmin, qmax, half_even, requantize_out, out):
    """``out[c]`` = :func:`store_accumulators`'s value for ``acc[c]``, each lane with its own channel's
    offset and multiplier (``params``: :func:`lane_params`): for kernels that hold channels innermost."""
    offsets, offsets64, m, mant, shf, half = params
    if not requantize_out:
        for c in range(count):
            out[c] = np.int64(acc[c]) + offsets[c]
    elif half_even:
        lo, hi = np.float32(qmin - zero_point), np.float32(qmax - zero_point)
        for c in range(count):
            out[c] = requantize_float_scalar(acc[c], offsets64[c], m[c], zero_point, lo, hi)
    else:
        for c in range(count):
            out[c] = requantize_scalar(np.int64(acc[c]) + offsets[c], mant[c], shf[c], half[c], zero_point, qmin, qmax)


@numba.njit(cache=True, nogil=True, parallel=True)
def _requantize_kernel(acc3, offset, f32, mantissa, shift, zero_point, qmin, qmax, half_even, out3):
    n_batch, n_chan, n_space = acc3.shape
    per_channel = f32.shape[0] > 1
    for bc in numba.prange(n_batch * n_chan):
        b, c = bc // n_chan, bc % n_chan
        k = c if per_channel else 0
        store_accumulators(acc3[b, c], n_space, offset[c], f32[k], mantissa[k], shift[k], zero_point, qmin, qmax,
                           half_even, True, out3[b, c])


def requantize_numba(acc: np.ndarray, rq: Requant, zero_point: int, qmin: int, qmax: int, mode: str,
                     out_dtype=np.int64, offset: np.ndarray | None = None) -> np.ndarray:
    """Numba twin of :func:`requantize`. ``acc`` may hold exact integers in a float array, and ``offset``
    (per channel of axis 1) is added first: the fast kernels fold bias and zero-point terms in here."""
    acc3 = np.ascontiguousarray(acc).reshape(acc.shape[0], acc.shape[1] if acc.ndim > 1 else 1, -1)
    if offset is None:
        offset = np.zeros(acc3.shape[1], np.int64)
    out = np.empty(acc3.shape, dtype=out_dtype)
    _requantize_kernel(acc3, offset.astype(np.int64), rq.float32, rq.mantissa, rq.shift, int(zero_point), int(qmin),
                       int(qmax), mode == "half_even", out)
    return out.reshape(acc.shape)


# What fused kernels receive when the caller wants int64 accumulators, not requantized outputs: their
# signature needs a spec, and ``requantize_out=False`` keeps them from using it.
ACCUMULATOR_SPEC = OutputSpec(Requant(np.ones(1, np.float32), np.ones(1, np.int64), np.ones(1, np.int64)), 0, 0, 0,
                              "half_even", np.int64)


def kernel_arguments(out: OutputSpec | None) -> tuple[np.dtype, tuple]:
    """The output type and the requantization arguments every fused kernel takes, in their order
    (``f32, mantissa, shift, zero_point, qmin, qmax, half_even, requantize_out``), for ``out`` or, when it is
    None, for int64 accumulators."""
    spec = out or ACCUMULATOR_SPEC
    rq = spec.requant
    return spec.dtype, (rq.float32, rq.mantissa, rq.shift, int(spec.zero_point), int(spec.qmin), int(spec.qmax),
                        spec.mode == "half_even", out is not None)
