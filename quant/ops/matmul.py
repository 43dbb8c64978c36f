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
from .exact_gemm import gemm_requant


def matmul_requant(x3: np.ndarray, w: np.ndarray, offset: np.ndarray, out, float_weights: Callable[[], np.ndarray]):
    """``requantize(w @ x3[b] + offset)`` for every image ``b`` of ``x3`` (N, K, S), with ``w`` the (O, K)
    integer weights, ``out`` an OutputSpec (None: int64 accumulators) and ``float_weights()`` the packed
    float chunks of ``w`` the float path needs (only computed if it runs). Returns (N, O, S)."""
    if int8_gemm.usable(x3.dtype, w.dtype, w.shape[1]):
        return int8_gemm.int8_gemm_requant(x3, w, offset, out)
    return gemm_requant(x3, float_weights(), offset, out)
