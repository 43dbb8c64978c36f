"""Integer matrix products on float BLAS, exactly.

numpy has no integer BLAS, and integer matmul is ~100x slower than float. A float32 sum of integer
products is exact while every partial sum stays below 2**24, whatever order BLAS adds in; float64 is
exact below 2**53. So: bound the largest product from the operand widths, split the reduction axis into
chunks short enough for float32 (int8 x int8: 1032 terms), and fall back to float64 for 16-bit
operands. The result holds exact integers in a float array.
"""
from __future__ import annotations

import numpy as np

FLOAT32_EXACT = 1 << 24
FLOAT64_EXACT = 1 << 53
MIN_FLOAT32_CHUNK = 64  # below this, float64 BLAS is faster than many tiny float32 products


def largest_magnitude(dtype) -> int:
    return -int(np.iinfo(dtype).min)


def exact_matmul(a: np.ndarray, b: np.ndarray, a_dtype, b_dtype) -> np.ndarray:
    """``a @ b`` over the last axis of ``a`` / second-to-last of ``b``, for integer-valued arrays.

    ``a_dtype``/``b_dtype`` are the integer types the values come from (they bound the products).
    Returns float32 or float64 holding the exact integer result.
    """
    k = a.shape[-1]
    product_bound = largest_magnitude(a_dtype) * largest_magnitude(b_dtype)
    chunk = (FLOAT32_EXACT - 1) // product_bound
    if chunk >= k:
        return np.matmul(a.astype(np.float32, copy=False), b.astype(np.float32, copy=False))
    if chunk >= MIN_FLOAT32_CHUNK:
        a32, b32 = a.astype(np.float32, copy=False), b.astype(np.float32, copy=False)
        total = None
        for start in range(0, k, chunk):
            part = np.matmul(a32[..., start:start + chunk], b32[..., start:start + chunk, :]).astype(np.float64)
            total = part if total is None else total + part
        return total
    if product_bound * k >= FLOAT64_EXACT:
        raise OverflowError(f"a reduction of {k} products of up to {product_bound} exceeds float64's exact range")
    return np.matmul(a.astype(np.float64, copy=False), b.astype(np.float64, copy=False))
