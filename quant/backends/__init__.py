"""Backends: interchangeable kernel sets that produce identical integers.

``numpy`` is the reference that defines the arithmetic (plain integer numpy, slow); ``numba`` is the fast
one (numba loops + exact float BLAS). Both are tested to agree integer for integer. ``onnxruntime`` runs
whole segments of nodes at once (exported to ONNX), so the graph reaches it by name through
``segment_runner``: the exporter it builds on imports the graph's types, and nothing imports back.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

SEGMENT_RUNNERS = {"onnxruntime": "quant.backends.onnxruntime_backend"}  # name -> module with run_segment


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


def segment_runner(name: str) -> Callable | None:
    """``run_segment(graph, env, first, last, weights, rounding, varying)`` of a backend that runs segments of
    nodes as one model, or None for a kernel backend."""
    module = SEGMENT_RUNNERS.get(name) if isinstance(name, str) else None
    return importlib.import_module(module).run_segment if module else None
