"""The onnxruntime backend: forward calls on an unmodified inference runtime.

The graph is exported (``quant.export``, qop) with every weight and bias as a *graph input*, so a
perturbed or updated model is just another feed to the same session: the device story, where training
reuses the deployed inference engine. Sessions are built once per (start, stop, sample shape) and kept
per graph; graph optimizations stay at the basic level so that onnxruntime does not fuse the QDQ adds
into its contrib QLinearAdd, whose arithmetic differs. In half_even mode with 8-bit tensors the
integers equal the numpy reference's.
"""
from __future__ import annotations

import weakref

import numpy as np

_SESSIONS: dict[int, dict] = {}  # id(graph) -> sessions, dropped with the graph (graphs are unhashable)


def _trainable_keys(graph, first: int, last: int) -> list[str]:
    keys = []
    for node in graph.nodes[first:last]:
        if hasattr(node, "weight_key"):
            keys += [node.weight_key, node.bias_key]
    return keys


def _session(graph, sample_shape: tuple, start: str | None, stop: str | None):
    import onnxruntime as ort

    from ..export import export

    if id(graph) not in _SESSIONS:
        _SESSIONS[id(graph)] = {}
        weakref.finalize(graph, _SESSIONS.pop, id(graph), None)
    cache = _SESSIONS[id(graph)]
    key = (start, stop, tuple(sample_shape))
    if key not in cache:
        first = graph.index(start) if start else 0
        last = graph.index(stop) if stop else len(graph.nodes)
        keys = _trainable_keys(graph, first, last)
        model = export(graph, sample_shape, "qop", start=start, stop=stop, weight_inputs=keys)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        cache[key] = (session, keys, [o.name for o in session.get_outputs()])
    return cache[key]


def _weight_feed(graph, keys: list[str], weights: dict | None) -> dict:
    weights = weights or {}
    feed = {}
    for key in keys:
        node = graph.node(key.rsplit(".", 1)[0])
        stored = node.weight if key.endswith(".weight") else node.bias
        feed[key] = np.ascontiguousarray(weights.get(key, stored), dtype=np.int8 if key.endswith(".weight") else np.int32)
    return feed


def onnxruntime_prefix(graph, x: np.ndarray, until: str, weights: dict | None) -> dict:
    """The integer tensors alive at ``until`` (a cache for :func:`onnxruntime_forward`)."""
    session, keys, outputs = _session(graph, x.shape[1:], None, until)
    values = session.run(outputs, {"input": np.asarray(x, np.float32)} | _weight_feed(graph, keys, weights))
    return dict(zip(outputs, values)) | {"__sample_shape__": x.shape[1:]}


def onnxruntime_forward(graph, x, weights: dict | None, start: str | None) -> np.ndarray:
    """Integer logits for a float input, or from a prefix cache with ``start``."""
    if start is None:
        session, keys, _ = _session(graph, np.asarray(x).shape[1:], None, None)
        feed = {"input": np.asarray(x, np.float32)}
    else:
        session, keys, _ = _session(graph, x["__sample_shape__"], start, None)
        feed = {i.name: x[i.name] for i in session.get_inputs() if i.name in x}
    return session.run(["logits_int"], feed | _weight_feed(graph, keys, weights))[0]
