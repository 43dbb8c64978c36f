"""Constant weights are packed once: what inference engines do when a session starts.

The numba kernels multiply float copies of the integer weights (see exact_gemm), plus their row sums for
the zero-point term. Recomputing those on every call costs little in a batch but dominates at batch 1 (a
MobileNetV2 classifier spent 1.3 of its 1.4 ms re-packing 1.28M weights, measured). So a graph's stored
weights are frozen (read-only, see ``WeightedNode``) and their packings kept for as long as the array
lives. Anything writable -- the trainer's replacement weights, which change between calls -- is packed
afresh each time: a packing is only cached when the values it derives from cannot change under it.
"""
from __future__ import annotations

import weakref
from typing import Callable, TypeVar

import numpy as np

T = TypeVar("T")
_PACKED: dict[tuple, object] = {}


def freeze(array: np.ndarray | None) -> np.ndarray | None:
    """Make ``array`` read-only (the stored integers of a node are constants; replace them, do not edit)."""
    if isinstance(array, np.ndarray):
        array.setflags(write=False)
    return array


def packed(owner: np.ndarray, tag: tuple, make: Callable[[], T]) -> T:
    """``make()``, computed once per ``tag`` while ``owner`` lives if ``owner`` is read-only and owns its data
    (so no writable view can change it); otherwise computed on every call."""
    if owner.flags.writeable or owner.base is not None:
        return make()
    key = (id(owner), tag)
    if key not in _PACKED:
        _PACKED[key] = make()
        weakref.finalize(owner, _PACKED.pop, key, None)  # before the id can be reused
    return _PACKED[key]
