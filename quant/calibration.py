"""Calibration: statistics of the float model's tensors over sample data, and the ranges they give.

Statistics are kept per channel (axis 1): each tensor's per-channel minimum and maximum, a bounded random
sample of its values with the channel each came from, and per-channel means of the pre-activations that
bias correction matches. Per-channel statistics are what activation equalization (``quant.equalize``)
needs: after it rescales channel ``c`` of a tensor by ``s[c]``, the rescaled tensor's range and samples
follow from the original ones without running the model again.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from .float_runner import float_batches
from .tensor import activation_params, dequantize, quantize

CALIBRATION_METHODS = ("minmax", "percentile", "mse")
SAMPLE_PER_TENSOR = 200_000


@dataclass
class TensorStats:
    """What calibration saw of one float tensor (channels on axis 1; a 0-d or 1-d tensor has one)."""

    channel_min: np.ndarray  # (C,) float64
    channel_max: np.ndarray  # (C,)
    sample: np.ndarray  # values drawn uniformly from all batches, float32
    sample_channel: np.ndarray  # the channel of each sampled value

    def scaled(self, factors: np.ndarray | None) -> "TensorStats":
        """The statistics of the tensor with channel ``c`` multiplied by ``factors[c] > 0``."""
        if factors is None:
            return self
        return TensorStats(self.channel_min * factors, self.channel_max * factors,
                           (self.sample * factors[self.sample_channel]).astype(np.float32), self.sample_channel)


@dataclass
class Calibration:
    stats: dict[str, TensorStats]  # every calibrated tensor
    channel_means: dict[str, np.ndarray]  # mean over batch and space of each pre-activation, per channel

    def range_of(self, tensor: str, method: str = "minmax", percentile: float = 99.99, bits: int = 8,
                 scales: str = "float", factors: np.ndarray | None = None) -> tuple[float, float]:
        """The real range to quantize ``tensor`` to (after scaling its channels by ``factors``, if given)."""
        stats = self.stats[tensor].scaled(factors)
        lo, hi = float(stats.channel_min.min()), float(stats.channel_max.max())
        if method == "minmax":
            return lo, hi
        if method == "mse":
            return _mse_range(stats.sample, lo, hi, bits, scales)
        return tuple(np.percentile(stats.sample, [100 - percentile, percentile]).tolist())


def check_method(method: str) -> str:
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"unknown calibration {method!r}: use one of {', '.join(CALIBRATION_METHODS)}")
    return method


def all_but_channels(value: np.ndarray) -> tuple[int, ...]:
    return tuple(i for i in range(value.ndim) if i != 1)


def _per_channel(value: np.ndarray, reduce) -> np.ndarray:
    if value.ndim < 2:
        return np.atleast_1d(reduce(value)).astype(np.float64)
    return reduce(value, axis=all_but_channels(value)).astype(np.float64)


def calibrate(model: onnx.ModelProto, tensors: list[str], data: np.ndarray, batch_size: int = 32, seed: int = 0,
              mean_tensors: tuple[str, ...] = (), sample: bool = True) -> Calibration:
    """Statistics of the float model over ``data`` (already checked against the model's input shape), from
    onnxruntime: of ``tensors``, and the per-channel means of ``mean_tensors`` (what bias correction
    matches). ``sample=False`` skips the value samples (min-max calibration does not need them)."""
    data = np.asarray(data, dtype=np.float32)
    if data.size == 0:
        raise ValueError("calibration needs at least one sample")
    if not np.all(np.isfinite(data)):
        raise ValueError("calibration data contains NaN or inf: clean it before quantizing")
    wanted = list(dict.fromkeys(list(tensors) + list(mean_tensors)))
    rng = np.random.default_rng(seed)
    lows, highs = {t: np.inf for t in tensors}, {t: -np.inf for t in tensors}
    values_of: dict[str, list[np.ndarray]] = {t: [] for t in tensors}
    channels_of: dict[str, list[np.ndarray]] = {t: [] for t in tensors}
    sums, counts = {t: 0.0 for t in mean_tensors}, {t: 0 for t in mean_tensors}
    per_batch = max(1, SAMPLE_PER_TENSOR * batch_size // len(data))
    for values in float_batches(model, wanted, data, batch_size):
        for name in mean_tensors:
            value = values[name]
            sums[name] = sums[name] + value.astype(np.float64).sum(axis=all_but_channels(value))
            counts[name] += value.size // value.shape[1]
        for name in tensors:
            value = values[name]
            lows[name] = np.minimum(lows[name], _per_channel(value, np.min))
            highs[name] = np.maximum(highs[name], _per_channel(value, np.max))
            if sample:
                flat = value.reshape(-1)
                picked = rng.choice(flat.size, min(per_batch, flat.size), replace=False)
                inner = int(np.prod(value.shape[2:], dtype=np.int64)) if value.ndim >= 2 else flat.size
                channels = value.shape[1] if value.ndim >= 2 else 1
                values_of[name].append(flat[picked])
                channels_of[name].append((picked // inner) % channels)
    empty = np.zeros(0, np.float32)
    stats = {t: TensorStats(lows[t], highs[t], np.concatenate(values_of[t]) if values_of[t] else empty,
                            np.concatenate(channels_of[t]) if channels_of[t] else empty.astype(np.int64))
             for t in tensors}
    return Calibration(stats, {t: sums[t] / counts[t] for t in mean_tensors})


def _mse_range(values: np.ndarray, lo: float, hi: float, bits: int, scales: str) -> tuple[float, float]:
    """The shrink of [lo, hi] whose quantization (rounding + clipping) error on ``values`` is smallest."""
    best, best_err = (lo, hi), np.inf
    for shrink in np.linspace(0.3, 1.0, 36):
        params = activation_params(lo * shrink, hi * shrink, bits, scales)
        err = np.mean((dequantize(quantize(values, params), params) - values) ** 2)
        if err < best_err:
            best, best_err = (lo * shrink, hi * shrink), err
    return best
