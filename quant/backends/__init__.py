"""Backends: interchangeable kernel sets that produce identical integers.

``numpy`` is the reference that defines the arithmetic (plain integer numpy, slow); ``numba`` is the fast
one (numba loops + exact float BLAS). Both are tested to agree integer for integer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Kernels:
    name: str
    conv: Callable
    linear: Callable
    requantize: Callable
    add: Callable
    maxpool: Callable
    avgpool: Callable


BACKENDS = ("numpy", "numba")


def get_backend(name: str | Kernels) -> Kernels:
    if isinstance(name, Kernels):
        return name
    if name == "numpy":
        from .numpy_backend import KERNELS
    elif name == "numba":
        from .numba_backend import KERNELS
    else:
        hint = " (onnxruntime runs whole graphs: QGraph.forward/prefix take backend='onnxruntime')" \
            if name == "onnxruntime" else ""
        raise ValueError(f"unknown backend {name!r}: use one of {', '.join(BACKENDS)}{hint}")
    return KERNELS
