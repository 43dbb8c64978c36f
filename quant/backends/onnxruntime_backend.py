"""The onnxruntime backend: the trainer's forward calls on an unmodified inference runtime.

A run of nodes is exported once (``quant.export.export_segment``: qop operators, integers in and out).
The layers a trainer varies (``varying``: the selection's weight keys) are *graph inputs*, so a perturbed or
updated weight set is just another feed to the same session, as a device would keep re-running its
deployed inference graph with new weights; every other layer is an initializer holding its current
integers, which onnxruntime prepacks once per session instead of once per call. Without ``varying`` every
layer is an input (one session serves any weights: evaluation, whose weights change every epoch).

Sessions are cached per graph and per (first node, last node, input shapes, varying keys, the arrays baked
in): a trainer's prefix and suffix each get one per selection period. The cache keeps the baked arrays
alive, so their identities cannot be reused by other arrays; weights are never changed in place (updates
make new arrays), so the same arrays hold the same integers. At most ``MAX_SESSIONS`` per graph, least
recently used dropped first. In ``half_even`` mode with 8-bit activations the integers are the numba
backend's (the qop lowering is exact, see ``quant.export.qop``).

Sessions run with onnxruntime's basic graph optimizations: the extended level fuses
DequantizeLinear -> Add -> QuantizeLinear into the contrib QLinearAdd, which computes the add with
precomputed scale ratios, a different float32 rounding that may move a tie by one step.
"""
from __future__ import annotations

import weakref
from collections import OrderedDict

import numpy as np

from ..export import export_segment, live_tensors
from ..export.operands import varies
from ..ops import WeightedNode

MAX_SESSIONS = 16
_SESSIONS: dict[int, OrderedDict] = {}  # id(graph) -> {segment key: (session, baked arrays)}; dropped with the graph


def _session(graph, first: int, last: int, env: dict, weights: dict | None, varying: frozenset | None):
    import onnxruntime as ort

    if id(graph) not in _SESSIONS:
        _SESSIONS[id(graph)] = OrderedDict()
        weakref.finalize(graph, _SESSIONS.pop, id(graph), None)
    sessions = _SESSIONS[id(graph)]
    live_shapes = {t: env[t].shape for t in live_tensors(graph, first)}
    baked = [array for node in graph.nodes[first:last] if isinstance(node, WeightedNode)
             and not varies(node, varying) for array in node.weights_from(weights)]
    key = (first, last, tuple(shape[1:] for shape in live_shapes.values()), varying, tuple(map(id, baked)))
    if key not in sessions:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        model = export_segment(graph, first, last, live_shapes, varying=varying, weights=weights)
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        sessions[key] = (session, baked)
        while len(sessions) > MAX_SESSIONS:
            sessions.popitem(last=False)
    sessions.move_to_end(key)
    return sessions[key][0]


def run_segment(graph, env: dict, first: int, last: int, weights: dict | None, rounding: str,
                varying: frozenset | None = None) -> dict:
    """Nodes [first, last) on ``env`` (tensor -> integers), like ``QGraph.run_nodes``: returns the tensors
    live at ``last`` (the graph output when ``last`` is the end), ``weights`` replacing stored integers;
    ``varying``: the keys that may change between calls (None: any may)."""
    if rounding != "half_even":
        raise ValueError(f"the onnxruntime backend computes onnxruntime's arithmetic (rounding half_even), not "
                         f"{rounding}: use backend numba or numpy for {rounding}")
    keep = live_tensors(graph, last) if last < len(graph.nodes) else [graph.output_name]
    carried = {t: env[t] for t in keep if t in env}  # live at ``last`` but not produced in the segment
    if first == last:
        return carried
    session = _session(graph, first, last, env, weights, varying)
    feed = {t: env[t] for t in live_tensors(graph, first)}
    for node in graph.nodes[first:last]:
        if isinstance(node, WeightedNode) and varies(node, varying):
            weight, bias = node.weights_from(weights)
            feed[node.weight_key] = np.ascontiguousarray(weight, dtype=node.weight.dtype)
            feed[node.bias_key] = np.ascontiguousarray(bias, dtype=node.bias.dtype)
    names = [o.name for o in session.get_outputs()]
    return carried | dict(zip(names, session.run(names, feed)))
