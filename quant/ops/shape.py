"""Data-movement ops: Flatten/Reshape, Concat, and standalone Clip/ReLU (integer clamps).

They move integers without arithmetic, except Concat, whose inputs are requantized to the output's
params when they differ (TFLite does the same).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..fixedpoint import Requant
from ..tensor import QParams
from .base import Node


@dataclass
class QReshape(Node):
    """Flatten or Reshape: ``shape`` follows ONNX Reshape (0 copies a dim, -1 is inferred)."""

    shape: tuple[int, ...] = (0, -1)

    op_type = "Reshape"

    def run(self, kernels, xs, rounding, overrides=None):
        x = xs[0]
        target = [x.shape[i] if d == 0 else d for i, d in enumerate(self.shape)]
        return x.reshape(target)


@dataclass
class QClamp(Node):
    """ReLU / ReLU6 / Clip on an already-quantized tensor: a clamp in the integer domain."""

    clamp: tuple[int, int] = None

    op_type = "Clip"

    def run(self, kernels, xs, rounding, overrides=None):
        return np.clip(xs[0], *self.clamp).astype(xs[0].dtype)


@dataclass
class QConcat(Node):
    in_params: list[QParams] = None
    axis: int = 1

    op_type = "Concat"

    def run(self, kernels, xs, rounding, overrides=None):
        y = self.out_params
        parts = []
        for x, p in zip(xs, self.in_params):
            if p.same_as(y):
                parts.append(x)
                continue
            rq = Requant.from_real(float(p.scale) / float(y.scale), p.bits > 8)
            centered = x.astype(np.int64).reshape(x.shape[0], 1, -1) - p.zero_point  # one scale: any layout
            requantized = kernels.requantize(centered, rq, y.zero_point, y.qmin, y.qmax, rounding, y.dtype)
            parts.append(requantized.reshape(x.shape))
        return np.concatenate(parts, axis=self.axis)
