"""Constant weights are packed once: what inference engines do when a session starts.

The numba kernels multiply float copies of the integer weights (see exact_gemm), plus their row sums for
the zero-point term. Recomputing those on every call costs little in a batch but dominates at batch 1 (a
MobileNetV2 classifier spent 1.3 of its 1.4 ms re-packing 1.28M weights, measured). So a graph's stored
weights are frozen (read-only, see ``WeightedNode``) and their packings kept for as long as the array
lives. Anything writable -- the trainer's replacement weights, which change between calls -- is packed
afresh each time: a packing is only cached when the values it derives from cannot change under it.

The same goes for a layer's whole call (:func:`prepared`): everything a kernel call needs besides the
input (zero-point offsets, packed weights, the tile plan, the requantization arguments) is fixed for a
stored layer and an input shape, and computing it in Python on every call cost about 10 us a layer,
a tenth of a batch-1 MobileNetV2 forward at 128 px (measured).
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


def _constant(array) -> bool:
    """Read-only and owning its data, so that no writable view can change it."""
    return not array.flags.writeable and array.base is None


def packed(owner: np.ndarray, tag: tuple, make: Callable[[], T]) -> T:
    """``make()``, computed once per ``tag`` while ``owner`` lives if ``owner`` is constant (read-only, owns
    its data); otherwise computed on every call."""
    if not _constant(owner):
        return make()
    key = (id(owner), tag)
    if key not in _PACKED:
        _PACKED[key] = make()
        weakref.finalize(owner, _PACKED.pop, key, None)  # before the id can be reused
    return _PACKED[key]


def prepared(owner: np.ndarray, tag: tuple, inputs: tuple, make: Callable[[], T]) -> T:
    """Like :func:`packed`, for a value that also derives from ``inputs`` (a bias, an OutputSpec): kept while
    they are the very objects of the last call (and their arrays constant), remade when one is replaced.
    One entry per ``owner`` and ``tag``, so callers that pass new objects every call do not accumulate any."""
    if not _constant(owner) or any(isinstance(a, np.ndarray) and not _constant(a) for a in inputs):
        return make()
    key = (id(owner), tag)
    entry = _PACKED.get(key)
    if entry is None or any(a is not b for a, b in zip(entry[0], inputs)):
        if entry is None:
            weakref.finalize(owner, _PACKED.pop, key, None)
        entry = _PACKED[key] = (inputs, make())
    return entry[1]
