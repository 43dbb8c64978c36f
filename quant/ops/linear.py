"""Quantized fully connected layer (ONNX Gemm / MatMul + Add) and its kernels.

``acc[n, o] = bias[o] + sum_k (x[n, k] - x_zp) * w[o, k]``; weights are stored (out, in) like
PyTorch's Linear so that output channels are axis 0 for per-channel scales, as for convolutions.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import WeightedNode
from ..fixedpoint import OutputSpec
from .exact_gemm import zero_point_offset
from .matmul import prepare_matmul
from .packing import prepared


def check_linear_shapes(x: np.ndarray, w: np.ndarray) -> None:
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"linear expects input (N, {w.shape[1] if w.ndim == 2 else 'K'}) and weights (out, in), "
                         f"got {x.shape} and {w.shape}")


def linear_reference(x: np.ndarray, x_zp: int, w: np.ndarray, bias: np.ndarray,
                     out: OutputSpec | None = None) -> np.ndarray:
    check_linear_shapes(x, w)
    acc = (x.astype(np.int64) - x_zp) @ w.astype(np.int64).T + bias.astype(np.int64)
    return acc if out is None else out.apply(acc)


def _prepare_linear(x_shape, x_dtype, x_zp, w, bias, out):
    """The function ``x -> linear`` for inputs of ``x_shape``: the batch is the product's columns (one GEMM,
    not a matrix-vector product per image)."""
    n, k = x_shape
    product = prepare_matmul((1, k, n), x_dtype, w, zero_point_offset(bias, x_zp, w), out, w, ())
    return lambda x: np.ascontiguousarray(product(np.ascontiguousarray(x.T)[np.newaxis])[0].T)


def linear_numba(x: np.ndarray, x_zp: int, w: np.ndarray, bias: np.ndarray,
                 out: OutputSpec | None = None) -> np.ndarray:
    """Same integers as :func:`linear_reference`, via int8 dot products or exact float BLAS on the raw integers."""
    check_linear_shapes(x, w)
    x_zp = int(x_zp)
    return prepared(w, ("linear", x.shape, x.dtype, x_zp), (bias, out),
                    lambda: _prepare_linear(x.shape, x.dtype, x_zp, w, bias, out))(x)


@dataclass
class QLinear(WeightedNode):
    op_type = "Linear"

    def compute(self, kernels, x, weight, bias, out):
        return kernels.linear(x, self.in_params.zero_point, weight, bias, out)

    def macs(self, in_shapes, out_shape):
        return int(np.prod(out_shape)) * self.weight.shape[1]
