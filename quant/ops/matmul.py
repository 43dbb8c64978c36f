"""The products of convolutions and linear layers: ``requantize(w @ x + offset)``, on whichever exact path
is fastest here. Products of int8 activations and int8 or int16 weights with reductions of
``int8_gemm.MIN_DEPTH`` terms or more run on the CPU's int8 dot-product instructions where it has them
(int8_gemm: VNNI / AMX through oneDNN, int32 accumulators; 16-bit weights as two byte products);
everything else on float BLAS chunked to stay exact (exact_gemm). Both give the numpy reference's
integers (tests/test_kernels.py runs its int8-activation cases on both paths).
"""
from __future__ import annotations

import numpy as np

from . import int8_gemm
from .exact_gemm import gemm_weights, prepare_gemm
from .packing import packed


def prepare_matmul(x_shape: tuple, x_dtype, w: np.ndarray, offset: np.ndarray, out, owner: np.ndarray, tag: tuple):
    """A function ``x3 -> requantize(w @ x3[b] + offset)`` for every image ``b`` of ``x3`` (``x_shape``: N, K,
    S; integers of ``x_dtype``, held as such on the int8 path or in floats on the float path, e.g. im2col
    columns), with ``w`` the (O, K) integer weights, ``out`` an OutputSpec (None: int64 accumulators). It
    returns (N, O, S). ``w`` is (a view of) the stored array ``owner``: the weights the kernels read are
    packed on ``owner`` under ``tag`` (ops.packing), shared by every input shape, and the function holds
    those copies, never ``w``."""
    if int8_gemm.usable(x_dtype, w.dtype, w.shape[1]):
        parts = packed(owner, tag + ("int8 parts",), lambda: int8_gemm.pack_weights(w))
        return int8_gemm.prepare_int8_gemm(x_shape, parts, offset, out)
    chunks = packed(owner, tag + ("float chunks", x_dtype), lambda: gemm_weights(w, x_dtype))
    return prepare_gemm(x_shape, chunks, offset, out)
