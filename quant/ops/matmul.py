"""The products of convolutions and linear layers: ``requantize(w @ x + offset)``, on whichever exact path
is fastest here. int8 x int8 products with reductions of ``int8_gemm.MIN_DEPTH`` terms or more run on the
CPU's int8 dot-product instructions where it has them (int8_gemm: VNNI / AMX through oneDNN, int32
accumulators); everything else on float BLAS chunked to stay exact (exact_gemm). Both give the numpy
reference's integers (tests/test_kernels.py runs its int8 cases on both paths).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from . import int8_gemm
from .exact_gemm import prepare_gemm


def prepare_matmul(x_shape: tuple, x_dtype, w: np.ndarray, offset: np.ndarray, out,
                   float_weights: Callable[[], np.ndarray]):
    """A function ``x3 -> requantize(w @ x3[b] + offset)`` for every image ``b`` of ``x3`` (``x_shape``: N, K,
    S; integers of ``x_dtype``, or held in floats), with ``w`` the (O, K) integer weights, ``out`` an
    OutputSpec (None: int64 accumulators) and ``float_weights()`` the packed float chunks of ``w`` the float
    path needs (only computed if it runs). The function returns (N, O, S)."""
    if int8_gemm.usable(x_dtype, w.dtype, w.shape[1]):
        return int8_gemm.prepare_int8_gemm(x_shape, w, offset, out)
    return prepare_gemm(x_shape, float_weights(), offset, out)
