"""Integer tensors with their scales: the only way numbers travel through the engine.

Conventions (TFLite's, so models map onto MCU/NPU kernels directly):
- weights: symmetric, zero point 0, range [-(2**(b-1) - 1), 2**(b-1) - 1] (int8 [-127, 127], int16
  [-32767, 32767]); one scale per output channel;
- activations: int8 asymmetric (zero point in [-128, 127]), or int16 symmetric (zero point 0), one scale;
- biases: int32 (int64 when an operand is 16-bit) at scale s_x * s_w[c].

Scales are any positive float (``float``, what TFLite and onnxruntime use), or powers of two (``pow2``,
the Q-format of fixed-point DSPs, CMSIS-NN's legacy q7/q15 kernels and shift-only NPUs): then every
requantization multiplier is a power of two, i.e. a shift, and float arithmetic on dequantized values
(a qdq ONNX file) is exact, so it lands on the engine's integers.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

INT_DTYPES = {8: np.int8, 16: np.int16, 32: np.int32, 64: np.int64}
SCALE_KINDS = ("float", "pow2")


def check_scales(scales: str) -> str:
    if scales not in SCALE_KINDS:
        raise ValueError(f"unknown scales {scales!r}: use 'float' (any scale) or 'pow2' (powers of two, shift-only "
                         f"requantization)")
    return scales


def scales_kind(*params: "QParams") -> str:
    """``pow2`` if every scale of ``params`` is a power of two, else ``float``."""
    mantissas = [np.frexp(np.asarray(p.scale, np.float64))[0] for p in params]
    return "pow2" if all(np.all(m == 0.5) for m in mantissas) else "float"


def _as_scale(scale, scales: str):
    """``scale``, or with ``pow2`` the smallest power of two at least as large (so the range still fits:
    coarser by at most one bit, never clipped)."""
    if check_scales(scales) == "float":
        return scale
    return np.exp2(np.ceil(np.log2(scale)))


def storage_dtype(bits: int) -> type:
    if bits not in INT_DTYPES:
        raise ValueError(f"unsupported bit width {bits}: use 8 or 16 (32/64 for biases)")
    return INT_DTYPES[bits]


@dataclass(frozen=True)
class QParams:
    """Scale(s), zero point and bit width of an integer tensor.

    ``narrow`` ranges drop the most negative value (weights), which keeps the range symmetric so that
    negating a weight never saturates.
    """

    scale: np.ndarray
    zero_point: int = 0
    bits: int = 8
    narrow: bool = False
    axis: int | None = field(default=None)  # channel axis of per-channel scales

    def __post_init__(self):
        object.__setattr__(self, "scale", np.asarray(self.scale, dtype=np.float32))
        storage_dtype(self.bits)
        if np.any(~np.isfinite(self.scale)) or np.any(self.scale <= 0):
            raise ValueError(f"scales must be finite and > 0, got {self.scale}")
        if not self.qmin <= self.zero_point <= self.qmax:
            raise ValueError(f"zero point {self.zero_point} outside [{self.qmin}, {self.qmax}]")

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1)) + (1 if self.narrow else 0)

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    @property
    def dtype(self) -> type:
        return storage_dtype(self.bits)

    def same_as(self, other: "QParams") -> bool:
        return (self.bits == other.bits and self.zero_point == other.zero_point
                and self.scale.shape == other.scale.shape and np.array_equal(self.scale, other.scale))


def activation_params(lo: float, hi: float, bits: int, scales: str = "float") -> QParams:
    """Params covering the real range [lo, hi] (widened to include 0, so padding is exact)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError(f"activation range [{lo}, {hi}] is not finite: check the calibration data for NaN/inf")
    if bits == 16:  # TFLite 16x8: symmetric int16 activations
        return QParams(float(_as_scale(max(-lo, hi, 1e-8) / 32767.0, scales)), 0, 16)
    if bits != 8:
        raise ValueError(f"activations are 8 or 16 bits, got {bits}")
    scale = float(_as_scale(max(hi - lo, 1e-8) / 255.0, scales))
    zero_point = int(np.clip(np.rint(-128 - lo / scale), -128, 127))
    return QParams(scale, zero_point, 8)


def weight_params(w: np.ndarray, bits: int, axis: int = 0, scales: str = "float") -> QParams:
    """Symmetric per-output-channel params for a weight tensor."""
    reduce_axes = tuple(i for i in range(w.ndim) if i != axis)
    absmax = np.max(np.abs(w), axis=reduce_axes) if w.ndim > 1 else np.abs(w)
    qmax = (1 << (bits - 1)) - 1
    scale = _as_scale(np.where(absmax > 0, absmax / qmax, 1.0), scales)
    return QParams(scale.astype(np.float32), 0, bits, narrow=True, axis=axis)


def _broadcast_scale(params: QParams, ndim: int) -> np.ndarray:
    if params.axis is None or params.scale.ndim == 0:
        return params.scale
    shape = [1] * ndim
    shape[params.axis] = -1
    return params.scale.reshape(shape)


def quantize(x: np.ndarray, params: QParams) -> np.ndarray:
    """Float -> integers as onnxruntime's QuantizeLinear does: rint(x / scale) + zp, saturated."""
    x = np.asarray(x, dtype=np.float32)
    if not np.all(np.isfinite(x)):
        raise ValueError("cannot quantize NaN or inf: clean the input data first")
    q = np.rint(x / _broadcast_scale(params, x.ndim)) + params.zero_point
    return np.clip(q, params.qmin, params.qmax).astype(params.dtype)


def dequantize(q: np.ndarray, params: QParams) -> np.ndarray:
    return (q.astype(np.float32) - np.float32(params.zero_point)) * _broadcast_scale(params, q.ndim)


@dataclass
class QTensor:
    """An integer array and the params that give it meaning."""

    data: np.ndarray
    params: QParams

    @classmethod
    def from_float(cls, x: np.ndarray, params: QParams) -> "QTensor":
        return cls(quantize(x, params), params)

    def dequantize(self) -> np.ndarray:
        return dequantize(self.data, self.params)
