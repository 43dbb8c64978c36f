"""Integer tensors with their scales: the only way numbers travel through the engine.

Conventions (TFLite's, so models map onto MCU/NPU kernels directly):
- weights: symmetric, zero point 0, range [-(2**(b-1) - 1), 2**(b-1) - 1] (int8 [-127, 127], int16
  [-32767, 32767]); one scale per output channel;
- activations: int8 asymmetric (zero point in [-128, 127]), or int16 symmetric (zero point 0), one scale;
- biases: int32 (int64 when an operand is 16-bit) at scale s_x * s_w[c].
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

INT_DTYPES = {8: np.int8, 16: np.int16, 32: np.int32, 64: np.int64}


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


def activation_params(lo: float, hi: float, bits: int) -> QParams:
    """Params covering the real range [lo, hi] (widened to include 0, so padding is exact)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError(f"activation range [{lo}, {hi}] is not finite: check the calibration data for NaN/inf")
    if bits == 16:  # TFLite 16x8: symmetric int16 activations
        return QParams(max(-lo, hi, 1e-8) / 32767.0, 0, 16)
    if bits != 8:
        raise ValueError(f"activations are 8 or 16 bits, got {bits}")
    scale = max(hi - lo, 1e-8) / 255.0
    zero_point = int(np.clip(np.rint(-128 - lo / scale), -128, 127))
    return QParams(scale, zero_point, 8)


def weight_params(w: np.ndarray, bits: int, axis: int = 0) -> QParams:
    """Symmetric per-output-channel params for a weight tensor."""
    reduce_axes = tuple(i for i in range(w.ndim) if i != axis)
    absmax = np.max(np.abs(w), axis=reduce_axes) if w.ndim > 1 else np.abs(w)
    qmax = (1 << (bits - 1)) - 1
    scale = np.where(absmax > 0, absmax / qmax, 1.0)
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
