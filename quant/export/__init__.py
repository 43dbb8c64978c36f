"""QGraph -> ONNX: the trained integers leave the simulator for a stock runtime.

``export(graph, sample_shape, "qop" | "qdq", weights)`` writes the deployable model:

- input ``input``: float32 (N, C, H, W), the values the engine's ``forward`` takes (N is free; C, H, W are
  ``sample_shape``, fixed because pooling windows depend on them);
- output ``logits``: float32 (N, classes), the dequantized integer logits;
- ``qop`` only, output ``logits_int``: the integer logits (int8), for bit-exact comparison with the engine.

``qop`` (see :mod:`.qop`) gives onnxruntime exactly the engine's ``half_even`` integers, for 8-bit
activations with 8- or 16-bit weights; ``qdq`` (see :mod:`.qdq`) suits converters and any bit width and
agrees up to float rounding, which vanishes for w8a8 graphs whose scales are all powers of two
(``convert(..., scales="pow2")``): then the runtime's float arithmetic between the quantizers is exact.
The metadata's ``scales`` says which kind the file has, and its ``fwdgrad_*`` entries describe the engine's
graph itself (:mod:`.embedded`), so the file alone rebuilds the model that was exported. Only ``ai.onnx`` operators (opset 13, ir_version 8; qdq with 16-bit tensors:
opset 21, ir_version 10), so no contrib ops and onnxruntime 1.31+ loads them.

``export_segment`` builds the integer-in, integer-out model of a run of nodes: in ``qop`` with every weight
and bias a graph input (the onnxruntime backend runs the trainer's prefix and suffix calls through it); in
``qdq`` to compare the runtime's float arithmetic with the engine's node by node.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import helper

from ..backends import get_backend
from ..ops import WeightedNode
from ..tensor import scales_kind

from . import qdq, qop
from .builder import ONNX_TYPES, Builder, ExportError
from .embedded import embedding
from .operands import Weights

if TYPE_CHECKING:  # the graph knows exporters by name only (quant.backends): no import back
    from ..graph import QGraph

FORMATS = ("qop", "qdq")
QOP_OPSET, WIDE_QDQ_OPSET = 13, 21

__all__ = ["FORMATS", "ExportError", "export", "export_segment", "live_tensors", "qdq_nodes_against_engine"]


def live_tensors(graph: QGraph, index: int) -> list[str]:
    """Tensors produced before node ``index`` (the graph input included) that a later node or the graph
    output still needs: the state a run split at ``index`` must carry over."""
    produced = [graph.input_name] + [n.output for n in graph.nodes[:index]]
    needed = {t for n in graph.nodes[index:] for t in n.inputs} | {graph.output_name}
    return [t for t in produced if t in needed]


def _check_qop(graph: QGraph, nodes) -> None:
    if graph.rounding != "half_even":
        raise ExportError(f"qop reproduces onnxruntime's arithmetic (rounding half_even) and this graph rounds "
                          f"{graph.rounding} (TFLite Micro's): quantize with rounding=half_even, or export "
                          f"--format qdq (float between Q/DQ pairs, approximate)")
    if graph.input_params.bits != 8:
        raise ExportError(f"qop takes 8-bit activations and the graph input is {graph.input_params.bits}-bit "
                          f"({graph.bits}): onnxruntime's QLinearConv/ConvInteger reject int16; export --format "
                          f"qdq (int16 Q/DQ at opset 21)")
    for node in nodes:  # every activation is the input or a node's output
        if node.out_params.bits != 8:
            raise ExportError(f"node {node.name!r} ({node.op_type}) has 16-bit activations ({graph.bits}): qop "
                              f"takes 8-bit activations, since onnxruntime's QLinearConv/ConvInteger reject int16; "
                              f"export --format qdq (int16 Q/DQ at opset 21)")


def _shapes(graph: QGraph, first: int, last: int, live_shapes: dict) -> dict[str, tuple]:
    """Every tensor's shape in nodes [first, last), from the live inputs' shapes (zeros through the engine)."""
    kernels = get_backend("numba")
    env = {t: np.full(shape, graph.params_of(t).zero_point, graph.params_of(t).dtype)
           for t, shape in live_shapes.items()}
    for node in graph.nodes[first:last]:
        env[node.output] = node.run(kernels, [env[t] for t in node.inputs], graph.rounding)
    return {t: v.shape for t, v in env.items()}


def _has_16_bit_tensors(graph: QGraph) -> bool:
    """Whether qdq needs opset 21, where QuantizeLinear/DequantizeLinear gained int16."""
    return graph.input_params.bits > 8 or any(
        n.out_params.bits > 8 or (isinstance(n, WeightedNode) and n.w_params.bits > 8) for n in graph.nodes)


def _lower(b: Builder, graph: QGraph, fmt: str, first: int, last: int, names: dict, weights: Weights) -> None:
    """Emit nodes [first, last) into ``b``; ``names`` maps engine tensors to ONNX names (qdq: dequantized)."""
    lowerings = qop.LOWERINGS if fmt == "qop" else qdq.LOWERINGS
    for node in graph.nodes[first:last]:
        lower = lowerings.get(type(node))
        if lower is None:
            raise ExportError(f"node {node.name!r} ({node.op_type}) has no {fmt} form: the exporter knows "
                              f"{', '.join(sorted(t.op_type for t in lowerings))}")
        y = lower(b, node, [names[t] for t in node.inputs], weights)
        if fmt == "qdq":
            y = qdq.requantize(b, y, node.out_params, getattr(node, "clamp", None), node.name)
        names[node.output] = y


def _model(b: Builder, outputs: list, opset: int, doc: str) -> onnx.ModelProto:
    graph = helper.make_graph(b.nodes, "fwdgrad", b.inputs, outputs, b.initializers, doc_string=doc)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              ir_version=10 if opset >= 21 else 8, producer_name="fwdgrad")
    onnx.checker.check_model(model, full_check=True)
    return model


def export(graph: QGraph, sample_shape: tuple, fmt: str = "qop", weights: dict | None = None, *,
           metadata: dict | None = None) -> onnx.ModelProto:
    """The graph, with ``weights`` (key -> integers, as the trainer keeps them) replacing its stored
    integers, as a deployable ONNX model for inputs of shape (N, *sample_shape); see the module doc.
    ``metadata`` (e.g. source model, training summary) goes into the model's metadata_props."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}: use one of {', '.join(FORMATS)}")
    if fmt == "qop":
        _check_qop(graph, graph.nodes)
    b = Builder(_shapes(graph, 0, len(graph.nodes), {graph.input_name: (1,) + tuple(sample_shape)}))
    params = graph.input_params
    q = b.quantize(b.input("input", np.float32, ["N", *sample_shape]), params, "input")
    names = {graph.input_name: q if fmt == "qop" else b.dequantize(q, params, "input")}
    _lower(b, graph, fmt, 0, len(graph.nodes), names, Weights(weights or {}))
    out, result = graph.output_params, names[graph.output_name]
    shape = ["N", *b.shapes[graph.output_name][1:]]
    outputs = [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, shape)]
    if fmt == "qop":
        b.dequantize(result, out, "output", output="logits")
        b.op("Identity", [result], "output", output="logits_int")
        outputs.append(helper.make_tensor_value_info("logits_int", onnx.TensorProto.INT8, shape))
    else:
        b.op("Identity", [result], "output", output="logits")
    opset = WIDE_QDQ_OPSET if fmt == "qdq" and _has_16_bit_tensors(graph) else QOP_OPSET
    doc = (f"fwdgrad {graph.bits} {fmt} export. Input 'input': float32 {['N', *sample_shape]} (NCHW). Output "
           f"'logits': float32 {shape}" + (f"; 'logits_int': int8 {shape}, the integer logits" if fmt == "qop" else ""))
    model = _model(b, outputs, opset, doc)
    every = [graph.input_params] + [n.out_params for n in graph.nodes] + [n.w_params for n in graph.weighted_nodes()]
    props = {"bits": graph.bits, "rounding": graph.rounding, "scales": scales_kind(*every), "format": fmt, "input": "input",
             "outputs": "logits,logits_int" if fmt == "qop" else "logits"}
    props |= embedding(graph, weights or {}, b.sources, model)
    helper.set_model_props(model, {k: str(v) for k, v in (props | (metadata or {})).items()})
    return model


def export_segment(graph: QGraph, first: int, last: int, live_shapes: dict[str, tuple],
                   fmt: str = "qop", *, varying: frozenset | None = None,
                   weights: dict | None = None) -> onnx.ModelProto:
    """Nodes [first, last) as a model from integers to integers.

    Inputs: the tensors live at ``first`` (engine names and types, shapes ``live_shapes`` with a free
    batch); for ``qop`` then ``<node>.weight`` / ``<node>.bias`` of each layer in the segment, so that one
    session serves every weight set (the onnxruntime backend); with ``varying`` (weight keys), only of the
    layers it names, the others initializers holding ``weights`` (over the stored ones). ``qdq`` keeps the
    graph's weights as constants: it serves to compare the runtime's float arithmetic with the engine's one
    node at a time.
    Outputs: the tensors live at ``last`` that the segment produces (the graph output when ``last`` is the
    end), as integers."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}: use one of {', '.join(FORMATS)}")
    nodes = graph.nodes[first:last]
    if fmt == "qop":
        _check_qop(graph, nodes)
    b = Builder(_shapes(graph, first, last, live_shapes))
    names = {}
    for t in live_tensors(graph, first):
        names[t] = b.input(t, graph.params_of(t).dtype, ["N", *live_shapes[t][1:]])
        if fmt == "qdq":
            names[t] = b.dequantize(names[t], graph.params_of(t), t)
    _lower(b, graph, fmt, first, last, names, Weights(weights or {}, as_inputs=fmt == "qop", input_keys=varying))
    produced = {n.output for n in nodes}
    outputs = []
    for t in live_tensors(graph, last) if last < len(graph.nodes) else [graph.output_name]:
        if t in produced:
            params = graph.params_of(t)
            if fmt == "qdq":  # back on the integer grid: Q(DQ(q)) is q exactly
                b.quantize(names[t], params, "output", output=t)
            else:
                b.op("Identity", [names[t]], "output", output=t)
            outputs.append(helper.make_tensor_value_info(t, ONNX_TYPES[np.dtype(params.dtype)],
                                                         ["N", *b.shapes[t][1:]]))
    wide = fmt == "qdq" and _has_16_bit_tensors(graph)
    return _model(b, outputs, WIDE_QDQ_OPSET if wide else QOP_OPSET,
                  f"fwdgrad {fmt} segment: nodes {first}..{last - 1} of {graph.bits}")


def qdq_nodes_against_engine(graph: QGraph, x: np.ndarray):
    """For each node: (node, its qdq segment, onnxruntime's integers, the engine's), the segment run in
    onnxruntime at the basic level on the engine's own input integers for ``x``. Separates the float
    rounding of one node from its propagation through the graph (docs/export.md)."""
    import onnxruntime as ort

    env, kernels = {graph.input_name: graph.quantize_input(x)}, get_backend("numba")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    for i, node in enumerate(graph.nodes):
        inputs = {t: env[t] for t in live_tensors(graph, i)}
        env[node.output] = node.run(kernels, [env[t] for t in node.inputs], graph.rounding)
        model = export_segment(graph, i, i + 1, {t: v.shape for t, v in inputs.items()}, "qdq")
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        yield node, model, session.run([node.output], inputs)[0], env[node.output]
