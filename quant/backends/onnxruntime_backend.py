"""The onnxruntime backend: the trainer's forward calls on an unmodified inference runtime.

A run of nodes is exported once (``quant.export.export_segment``: qop operators, integers in and out)
with every weight and bias as a *graph input*, so a perturbed or updated model is just another feed to
the same session, as a device would keep re-running its deployed inference graph with new weights.
Sessions are cached per graph and per (first node, last node, input shapes): the trainer's prefix
(nodes before the first perturbed layer) and suffix each get one. In ``half_even`` mode with 8-bit
activations the integers are the numba backend's (the qop lowering is exact, see ``quant.export.qop``).

Sessions run with onnxruntime's basic graph optimizations: the extended level fuses
DequantizeLinear -> Add -> QuantizeLinear into the contrib QLinearAdd, which computes the add with
precomputed scale ratios, a different float32 rounding that may move a tie by one step.
"""
from __future__ import annotations

import weakref

import numpy as np

from ..export import export_segment, live_tensors
from ..ops import WeightedNode

_SESSIONS: dict[int, dict] = {}  # id(graph) -> {segment key: session}; dropped with the graph (QGraph is unhashable)


def _session(graph, first: int, last: int, env: dict):
    import onnxruntime as ort

    if id(graph) not in _SESSIONS:
        _SESSIONS[id(graph)] = {}
        weakref.finalize(graph, _SESSIONS.pop, id(graph), None)
    sessions = _SESSIONS[id(graph)]
    live_shapes = {t: env[t].shape for t in live_tensors(graph, first)}
    key = (first, last, tuple(shape[1:] for shape in live_shapes.values()))
    if key not in sessions:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        model = export_segment(graph, first, last, live_shapes)
        sessions[key] = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return sessions[key]


def run_segment(graph, env: dict, first: int, last: int, weights: dict | None, rounding: str) -> dict:
    """Nodes [first, last) on ``env`` (tensor -> integers), like ``QGraph.run_nodes``: returns the tensors
    live at ``last`` (the graph output when ``last`` is the end), ``weights`` replacing stored integers."""
    if rounding != "half_even":
        raise ValueError(f"the onnxruntime backend computes onnxruntime's arithmetic (rounding half_even), not "
                         f"{rounding}: use backend numba or numpy for {rounding}")
    keep = live_tensors(graph, last) if last < len(graph.nodes) else [graph.output_name]
    carried = {t: env[t] for t in keep if t in env}  # live at ``last`` but not produced in the segment
    if first == last:
        return carried
    session = _session(graph, first, last, env)
    feed = {t: env[t] for t in live_tensors(graph, first)}
    for node in graph.nodes[first:last]:
        if isinstance(node, WeightedNode):
            weight, bias = node.weights_from(weights)
            feed[node.weight_key] = np.ascontiguousarray(weight, dtype=node.weight.dtype)
            feed[node.bias_key] = np.ascontiguousarray(bias, dtype=node.bias.dtype)
    names = [o.name for o in session.get_outputs()]
    return carried | dict(zip(names, session.run(names, feed)))
