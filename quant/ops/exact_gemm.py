"""Integer matrix products on float BLAS, exactly.

numpy has no integer BLAS, and integer matmul is ~100x slower than float. A float32 sum of integer
products is exact while every partial sum stays below 2**24, whatever order BLAS adds in; float64 is
exact below 2**53. So: bound the largest product from the operand widths, split the reduction axis into
chunks short enough for float32 (int8 x int8: 1032 terms), and fall back to float64 for 16-bit
operands. The result holds exact integers in a float array.
"""
from __future__ import annotations

import functools

import numba
import numpy as np

from ..fixedpoint import kernel_arguments, store_accumulators
from .packing import packed

FLOAT32_EXACT = 1 << 24
FLOAT64_EXACT = 1 << 53
MIN_FLOAT32_CHUNK = 64  # below this, float64 BLAS is faster than many tiny float32 products


@functools.cache
def largest_magnitude(dtype) -> int:
    return -int(np.iinfo(dtype).min)


@numba.njit(cache=True, nogil=True)
def _row_sums(w2d):
    sums = np.zeros(w2d.shape[0], np.int64)
    for o in range(w2d.shape[0]):
        total = np.int64(0)
        for k in range(w2d.shape[1]):
            total += w2d[o, k]
        sums[o] = total
    return sums


def zero_point_offset(bias: np.ndarray, x_zp: int, w: np.ndarray) -> np.ndarray:
    """``bias - x_zp * sum_k w[o, k]`` per output ``o`` (``w`` of any shape, outputs first): what the kernels
    add to ``sum x * w`` on the raw integers to get ``bias + sum (x - x_zp) * w``. The row sums run in numba,
    without numpy's int64 copy of the weights (a tenth of a batch-1 MobileNetV2 forward, measured), once
    for stored weights (see packing)."""
    offset = bias.astype(np.int64)
    if not x_zp:
        return offset
    sums = packed(w, ("row sums",), lambda: _row_sums(np.ascontiguousarray(w.reshape(w.shape[0], -1))))
    return offset - int(x_zp) * sums


def exact_float_chunks(k: int, a_dtype, b_dtype) -> tuple[type, int]:
    """The float type and reduction chunk length in which a ``k``-term integer dot product is exact."""
    product_bound = largest_magnitude(a_dtype) * largest_magnitude(b_dtype)
    chunk = (FLOAT32_EXACT - 1) // product_bound
    if chunk >= k:
        return np.float32, k
    if chunk >= MIN_FLOAT32_CHUNK:
        return np.float32, chunk
    if product_bound * k >= FLOAT64_EXACT:
        raise OverflowError(f"a reduction of {k} products of up to {product_bound} exceeds float64's exact range")
    return np.float64, k


# ---- fused GEMM + requantization, parallel over column tiles (the numba backend's convolutions) --------

@functools.cache
def _single_threaded_scipy_blas() -> None:
    """numba's ``np.dot`` calls scipy's OpenBLAS. Our kernels call it from several numba threads at once, one
    tile each, so that BLAS must run single-threaded: its own threads would compete with numba's and, on a
    loaded machine, spin-wait for minutes' worth of cycles (a MobileNetV2 forward took 7 s instead of 0.12 s,
    measured). numpy's BLAS is left alone; scipy.linalg in this process runs on one thread. Done once, on the
    first fused GEMM, rather than as a side effect of importing quant."""
    import ctypes
    import glob
    import os

    import scipy

    for path in glob.glob(os.path.join(os.path.dirname(scipy.__file__), "..", "scipy.libs", "libscipy_openblas*")):
        lib = ctypes.CDLL(path)
        for name in ("scipy_openblas_set_num_threads", "openblas_set_num_threads"):
            if hasattr(lib, name):
                getattr(lib, name)(1)
                break


@numba.njit(cache=True, nogil=True)
def _gather_tile(x3, g0, g1, cols):
    """cols[k, g - g0] = x3[b, k, j] for the flattened columns g = b * s + j in [g0, g1), as floats."""
    s = x3.shape[2]
    g = g0
    while g < g1:
        b, j0 = g // s, g % s
        j1 = min(s, j0 + g1 - g)
        for k in range(x3.shape[1]):
            src, dst = x3[b, k, j0:j1], cols[k, g - g0:g - g0 + j1 - j0]
            for j in range(j1 - j0):
                dst[j] = src[j]
        g += j1 - j0


@numba.njit(cache=True, nogil=True)
def _chunked_product(w3, o0, o1, cols):
    """Exact ``w[o0:o1] @ cols`` when one float32 product could exceed 2**24: one BLAS call per reduction
    chunk (w3 is (chunks, o, chunk)), each exact, summed in float64."""
    chunk = w3.shape[2]
    acc = np.dot(w3[0, o0:o1], cols[:chunk]).astype(np.float64)
    for kc in range(1, w3.shape[0]):
        acc += np.dot(w3[kc, o0:o1], cols[kc * chunk:(kc + 1) * chunk])
    return acc


@numba.njit(cache=True, nogil=True)
def store_tile(acc, o0, g0, g1, offset, f32, mantissa, shift, zero_point, qmin, qmax, half_even, requantize_out,
               out3):
    """out3[b, o0 + c, j] = requantize(acc[c, g - g0] + offset[o0 + c]) for the flattened columns
    g = b * s + j in [g0, g1)."""
    s = out3.shape[2]
    per_channel = f32.shape[0] > 1
    g = g0
    while g < g1:
        b, j0 = g // s, g % s
        j1 = min(s, j0 + g1 - g)
        for c in range(o0, o0 + acc.shape[0]):
            q = c if per_channel else 0
            store_accumulators(acc[c - o0, g - g0:g - g0 + j1 - j0], j1 - j0, offset[c], f32[q], mantissa[q],
                               shift[q], zero_point, qmin, qmax, half_even, requantize_out, out3[b, c, j0:j1])
        g += j1 - j0


@numba.njit(cache=True, nogil=True, parallel=True)
def _gemm_requant_kernel(x3, w3, offset, f32, mantissa, shift, zero_point, qmin, qmax, half_even, requantize_out,
                         tile, block, out3):
    """out3[b, :, j] = requantize(w @ x3[b, :, j] + offset), by tiles of the flattened (b, j) columns and
    blocks of ``block`` outputs.

    Each task gathers its columns into a float buffer (the K x tile block stays in cache), multiplies with
    BLAS, and requantizes straight into the output: no full-size float copy of the input or accumulator.
    Output blocks give the threads work when the columns are few (a classifier, batch 1).
    """
    total = x3.shape[0] * x3.shape[2]
    n_chunks, chunk = w3.shape[0], w3.shape[2]
    n_blocks = (w3.shape[1] + block - 1) // block
    for t in numba.prange(((total + tile - 1) // tile) * n_blocks):
        g0, o0 = (t // n_blocks) * tile, (t % n_blocks) * block
        g1, o1 = min(total, g0 + tile), min(w3.shape[1], o0 + block)
        cols = np.zeros((n_chunks * chunk, g1 - g0), dtype=w3.dtype)  # rows past K stay 0: exact padding
        _gather_tile(x3, g0, g1, cols)
        if n_chunks == 1:
            store_tile(np.dot(w3[0, o0:o1], cols), o0, g0, g1, offset, f32, mantissa, shift, zero_point, qmin,
                       qmax, half_even, requantize_out, out3)
        else:
            store_tile(_chunked_product(w3, o0, o1, cols), o0, g0, g1, offset, f32, mantissa, shift, zero_point,
                       qmin, qmax, half_even, requantize_out, out3)


def gemm_weights(w: np.ndarray, x_dtype) -> np.ndarray:
    """The integer matrix ``w`` (O, K) as the float chunks :func:`prepare_gemm` multiplies: (chunks, O, chunk)
    in the float type and chunk length that keep products with ``x_dtype`` inputs exact, chunk-major and
    zero-padded past K."""
    o, k = w.shape
    dtype, chunk = exact_float_chunks(k, x_dtype, w.dtype)
    n_chunks = -(-k // chunk)
    if n_chunks == 1:
        return w.astype(dtype)[np.newaxis]
    w3 = np.empty((n_chunks, o, chunk), dtype)
    for c in range(n_chunks):
        width = min(chunk, k - c * chunk)
        w3[c, :, :width] = w[:, c * chunk:c * chunk + width]
        w3[c, :, width:] = 0
    return w3


def gemm_plan(columns: int, outputs: int, threads: int, max_tile: int = 256) -> tuple[int, int]:
    """(columns per tile, outputs per block) of the tasks :func:`prepare_gemm` hands to ``threads``.

    About two tasks a thread; a tile holds 64 to ``max_tile`` columns (its K x tile float block stays in
    cache, and BLAS is inefficient on narrower products); when the columns make fewer tiles than that, the
    outputs are split too, into blocks of at least 96, their number a multiple of the threads so that none
    idles in a last round. Against the previous plan (four tasks a thread, tiles from 16 columns, blocks from
    32), MobileNetV2's 1x1 shapes at batch 1 and 16 took 12% less time in all, up to 1.7x less on the
    7x7 layers (alternated micro-benchmarks, same integers)."""
    tasks = 2 * threads
    tile = int(min(max_tile, max(64, -(-columns // tasks))))
    n_tiles = -(-columns // tile)
    n_blocks = max(1, min(-(-tasks // n_tiles), -(-outputs // 96)))
    if n_blocks > threads:
        n_blocks -= n_blocks % threads
    elif n_tiles == 1:
        n_blocks = max(n_blocks, min(threads, outputs))
    return tile, -(-outputs // n_blocks)


def prepare_gemm(x_shape: tuple, w3: np.ndarray, offset: np.ndarray, out):
    """A function ``x3 -> requantize(w @ x3[b] + offset)``, exactly, for ``x3`` of shape ``x_shape`` (N, K, S),
    with ``w3`` the weights packed by :func:`gemm_weights` for ``x3``'s integer type (x3 may hold the integers
    in floats, e.g. im2col columns) and ``out`` an OutputSpec (None: int64 accumulators); it returns (N, O, S)."""
    n, _, s = x_shape
    o = w3.shape[1]
    _single_threaded_scipy_blas()
    dtype, requantization = kernel_arguments(out)
    arguments = (offset.astype(np.int64), *requantization, *gemm_plan(n * s, o, numba.get_num_threads()))

    def run(x3: np.ndarray) -> np.ndarray:
        result = np.empty((n, o, s), dtype=dtype)
        _gemm_requant_kernel(x3, w3, *arguments, result)
        return result

    return run
