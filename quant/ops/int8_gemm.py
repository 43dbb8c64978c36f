"""Matrix products of int8 activations on the CPU's integer dot-product instructions, exactly, via oneDNN.

The float-BLAS path (exact_gemm) is exact but pays for float arithmetic: each int8 product takes a float32
lane. CPUs with VNNI (AVX-512 VNNI, AVX-VNNI) or AMX-INT8 sum four u8 x s8 products straight into an int32
lane (``vpdpbusd``; AMX tiles do the same on 16 x 64 blocks), which is what onnxruntime's int8 kernels
run on. oneDNN's ``dnnl_gemm_s8s8s32`` (PyPI ``onednn-cpu-gomp``: the library alone, built on the GNU
OpenMP that numba's threads use too) exposes those as a GEMM with int32 accumulators: integer arithmetic
throughout, exact while the sums fit int32 (8-bit operands: K below 130,000). 16-bit weights run as two
such products, on their high byte (int8, ``dnnl_gemm_s8s8s32``) and low byte (uint8,
``dnnl_gemm_u8s8s32``), joined as ``256 * high + low`` in int64 (:func:`pack_weights`).

Without VNNI oneDNN falls back to ``vpmaddubsw``, whose pairwise sums saturate at int16 (the instruction
that corrupts onnxruntime's qdq files on such CPUs, docs/export.md): there, and where the library is
missing, the engine keeps the float path. ``FWDGRAD_INT8_GEMM=0`` turns this path off (to compare the two,
or to rule it out).

The kernel is the float path's, with oneDNN in BLAS's place: numba's threads take tiles of (image,
columns) x (outputs), each calls oneDNN on its tile (inside a parallel region oneDNN runs on the calling
thread) straight from the int8 activations, with no gather, and requantizes the int32 tile while it is in
cache.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import site
import sys
from pathlib import Path

import numba
import numpy as np

from ..fixedpoint import kernel_arguments
from .exact_gemm import gemm_plan, store_tile

INT8_DOT_PRODUCT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
LIBRARY = "libdnnl.so.3"
MIN_DEPTH = 24  # shorter reductions (MobileNetV2's expand from 16 channels) are faster on float BLAS at batch 16
MAX_TILE = 1024  # columns per tile: oneDNN keeps gaining up to here at batch 16, the float path stops at 256
MAX_DEPTH = (1 << 31) // (128 * 255)  # int32 sums of int8 x uint8 products stay exact below this many terms
_NO = ord("N")  # oneDNN's char arguments, passed as their codes (numba calls ctypes functions with ints)
_FIXED = ord("F")


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as info:
            line = next(l for l in info if l.startswith("flags"))
    except (OSError, StopIteration):
        return set()
    return set(line.split(":", 1)[1].split())


@functools.cache
def has_int8_dot_products() -> bool:
    """Whether this CPU has VNNI or AMX-INT8: where int8 x int8 products sum into int32 lanes without the
    int16 saturation of ``vpmaddubsw`` (ours here, and onnxruntime's int8 kernels)."""
    return bool(cpu_flags() & set(INT8_DOT_PRODUCT_FLAGS))


def _library_paths() -> list[str]:
    """Where pip puts the wheel's data files (the environment's lib/, or the user base's), then the system."""
    found = ctypes.util.find_library("dnnl")
    return [str(Path(root) / "lib" / LIBRARY) for root in (sys.prefix, site.getuserbase())] + ([found] if found else [])


def _onednn(name: str, a_type):
    """oneDNN's integer GEMM ``name`` (A of ``a_type``, B int8, int32 C) as a ctypes function, or None."""
    for path in _library_paths():
        try:
            function = getattr(ctypes.CDLL(path), name)
        except (OSError, AttributeError):
            continue
        dim, pointer, char = ctypes.c_int64, ctypes.c_void_p, ctypes.c_uint8
        function.restype = ctypes.c_int
        function.argtypes = [char, char, char, dim, dim, dim, ctypes.c_float, pointer, dim, a_type, pointer, dim,
                             ctypes.c_int8, ctypes.c_float, pointer, dim, pointer]
        return function
    return None


@functools.cache
def gemm_functions():
    """oneDNN's ``dnnl_gemm_s8s8s32`` and ``dnnl_gemm_u8s8s32`` (weights int8 or uint8, activations int8) as
    ctypes functions, or None where they should not or cannot be used."""
    if os.environ.get("FWDGRAD_INT8_GEMM", "1") == "0" or not has_int8_dot_products():
        return None
    signed, unsigned = _onednn("dnnl_gemm_s8s8s32", ctypes.c_int8), _onednn("dnnl_gemm_u8s8s32", ctypes.c_uint8)
    return (signed, unsigned) if signed and unsigned else None


def usable(x_dtype, w_dtype, depth: int) -> bool:
    """Whether a product of int8 activations and int8 or int16 weights with ``depth``-term reductions should
    run here rather than on float BLAS."""
    return (x_dtype == np.int8 and w_dtype in (np.int8, np.int16) and MIN_DEPTH <= depth <= MAX_DEPTH
            and gemm_functions() is not None)


def pack_weights(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(O, K) int8 or int16 weights as the products' operands: int8 ``w`` itself (and no low part); int16 ``w``
    as ``256 * high + low`` with int8 ``high`` and uint8 ``low`` (``low = w mod 256``: for |w| <= 32767 the
    high part stays within [-128, 127]). Each part's products sum exactly in int32 (8-bit operands), and
    ``256 * high_sum + low_sum`` is the 16-bit product, exactly, in int64."""
    if w.dtype == np.int8:
        return np.array(w, order="C"), np.empty((0, w.shape[1]), np.uint8)
    wide = w.astype(np.int32)
    low = wide & 0xFF
    return ((wide - low) >> 8).astype(np.int8), low.astype(np.uint8)


@numba.njit(cache=True, nogil=True, parallel=True)
def _kernel(gemm, gemm_unsigned, x3, w, w_low, offset, f32, mantissa, shift, zero_point, qmin, qmax, half_even,
            requantize_out, tile, block, out3):
    """out3[b, :, j] = requantize(w @ x3[b, :, j] + offset) by tiles of one image's columns and blocks of
    outputs, with ``w`` the int8 weights, or the high part of 16-bit ones whose low part is ``w_low``
    (:func:`pack_weights`; empty for 8-bit weights); returns how many oneDNN calls failed (0)."""
    n, k, s = x3.shape
    o = w.shape[0]
    n_tiles, n_blocks = (s + tile - 1) // tile, (o + block - 1) // block
    no_offset = np.zeros(1, np.int32)
    failures = 0
    for t in numba.prange(n * n_tiles * n_blocks):
        b, r = t // (n_tiles * n_blocks), t % (n_tiles * n_blocks)
        j0, o0 = (r // n_blocks) * tile, (r % n_blocks) * block
        j1, o1 = min(s, j0 + tile), min(o, o0 + block)
        acc = np.empty((o1 - o0, j1 - j0), np.int32)
        failures += gemm(_NO, _NO, _FIXED, o1 - o0, j1 - j0, k, 1.0, w[o0:].ctypes.data, k, 0,
                         x3[b, :, j0:].ctypes.data, s, 0, 0.0, acc.ctypes.data, j1 - j0, no_offset.ctypes.data) != 0
        if w_low.shape[0] == 0:
            store_tile(acc, o0, b * s + j0, b * s + j1, offset, f32, mantissa, shift, zero_point, qmin, qmax,
                       half_even, requantize_out, out3)
        else:
            low = np.empty_like(acc)
            failures += gemm_unsigned(_NO, _NO, _FIXED, o1 - o0, j1 - j0, k, 1.0, w_low[o0:].ctypes.data, k, 0,
                                      x3[b, :, j0:].ctypes.data, s, 0, 0.0, low.ctypes.data, j1 - j0,
                                      no_offset.ctypes.data) != 0
            store_tile(acc.astype(np.int64) * 256 + low, o0, b * s + j0, b * s + j1, offset, f32, mantissa, shift,
                       zero_point, qmin, qmax, half_even, requantize_out, out3)
    return failures


def prepare_int8_gemm(x_shape: tuple, parts: tuple[np.ndarray, np.ndarray], offset: np.ndarray, out):
    """A function ``x3 -> requantize(w @ x3[b] + offset)`` for int8 ``x3`` of shape ``x_shape`` (N, K, S) and
    weights ``w`` (O, K) given as :func:`pack_weights` ``parts``; ``out`` an OutputSpec (None: int64
    accumulators); it returns (N, O, S). The function keeps ``parts``: pass a packing of a stored array
    (ops.matmul). Call only where :func:`usable` says so."""
    n, _, s = x_shape
    w, w_low = parts
    tile, block = gemm_plan(n * s, w.shape[0], numba.get_num_threads(), MAX_TILE)
    gemm, gemm_unsigned = gemm_functions()
    dtype, requantization = kernel_arguments(out)
    arguments = (offset.astype(np.int64), *requantization, min(tile, s), block)

    def run(x3: np.ndarray) -> np.ndarray:
        result = np.empty((n, w.shape[0], s), dtype=dtype)
        failures = _kernel(gemm, gemm_unsigned, x3, w, w_low, *arguments, result)
        if failures:
            raise RuntimeError(f"oneDNN's integer GEMM failed on {failures} tiles of {w.shape} x {x3.shape}: "
                               f"set FWDGRAD_INT8_GEMM=0 to use the float path")
        return result

    return run
