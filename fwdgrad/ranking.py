"""Layer ranking for TraDy's preselection: channel RGN of a model on a task, computed once and cached.

From the PyTorch float twin, or from forward-only estimates where torch is not installed. The cache key is
everything the numbers depend on (architecture, weights, samples): keyed by architecture alone, the layers
a run trains would depend on which task happened to fill the cache first, and two machines would train
different channels from one seed.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from quant.graph import QGraph

from .rundir import atomic_write_json, weights_digest
from .selection import channel_rgn, channel_rgn_zo


def rgn_cache_dir() -> Path:
    root = os.environ.get("FWDGRAD_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "fwdgrad") / "rgn"


def architecture_digest(graph: QGraph) -> str:
    """Identity of an architecture at a bit width: node types, names and weight shapes (not values)."""
    parts = [graph.bits] + [f"{n.op_type}:{n.name}:{getattr(n, 'weight', np.empty(0)).shape}" for n in graph.nodes]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def layer_rgn(graph: QGraph, weights: dict, x: np.ndarray, y: np.ndarray, out: Path,
              backend: str = "numba") -> dict[str, np.ndarray]:
    """Channel RGN of ``graph`` (with ``weights``) on ``x, y``, from the cache when it is there; copied into
    ``out/rgn.json`` with the run."""
    key = hashlib.sha256("|".join([architecture_digest(graph), weights_digest(weights),
                                   hashlib.sha256(x.tobytes() + y.tobytes()).hexdigest()]).encode())
    path = rgn_cache_dir() / f"{key.hexdigest()[:16]}.json"
    if not path.exists():
        try:
            import torch  # noqa: F401  (the twin needs it)
            rgn, source = channel_rgn(graph, x, y), "pytorch-twin"
        except ImportError:
            rgn, source = channel_rgn_zo(graph, x, y, backend=backend), "zo-estimate"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {"source": source, "rgn": {k: v.tolist() for k, v in rgn.items()}})
    stored = json.loads(path.read_text())
    atomic_write_json(Path(out) / "rgn.json", stored)
    return {k: np.array(v) for k, v in stored["rgn"].items()}
