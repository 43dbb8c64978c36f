"""QGraph -> ONNX that a stock onnxruntime runs: the trained integers leave the simulator unchanged.

Two formats:
- ``qop``: integer operators only, chosen so that onnxruntime computes exactly our ``half_even``
  integers: QLinearConv (convolutions, and linear layers as 1x1 convolutions, which carry the int32
  bias QLinearMatMul lacks), Clip for fused ReLU/ReLU6, integer MaxPool/Reshape/Concat, adds as
  DequantizeLinear -> Add -> QuantizeLinear (our half_even add *is* that float32 arithmetic), and
  global average pooling as an integer sum and a rounded integer division in standard ops. 8-bit
  weights and activations (QLinearConv's types); opset 13.
- ``qdq``: QuantizeLinear/DequantizeLinear around float operators (any bit width; int16 needs opset 21),
  the format most edge converters (QNN, TFLite via onnx2tf) take; results agree with the engine up to
  float rounding, not bit for bit.
Graph input ``input`` (float32, NCHW), outputs ``logits`` (float32) and, in ``qop``, ``logits_int`` (the
integers, for bit-exact checks). Only ``ai.onnx`` operators; ir_version 8 (opset 13) or 10 (opset 21).

The optional ``start`` cuts the graph at a node: inputs are then the integer tensors alive there (a
prefix cache), which is how the onnxruntime backend runs forward-gradient suffix calls; ``weight_inputs``
turns weights into graph inputs so one session serves every perturbation.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .graph import QGraph
from .ops import QAdd, QAvgPool, QClamp, QConcat, QConv, QLinear, QMaxPool, QReshape
from .tensor import QParams

FORMATS = ("qop", "qdq")
ONNX_INT = {np.dtype(np.int8): TensorProto.INT8, np.dtype(np.int16): TensorProto.INT16,
            np.dtype(np.int32): TensorProto.INT32}


class ExportError(ValueError):
    """A node with no exact equivalent in the chosen format (the message names it)."""


class _Builder:
    """Collects nodes and initializers with unique names."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def const(self, value, dtype, hint: str) -> str:
        self._count += 1
        name = f"{hint}__{self._count}"
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def node(self, op: str, inputs: list[str], hint: str, output: str | None = None, **attrs) -> str:
        self._count += 1
        output = output or f"{hint}__{op}{self._count}"
        self.nodes.append(helper.make_node(op, inputs, [output], name=f"{hint}/{op}{self._count}", **attrs))
        return output

    def qparams(self, params: QParams, hint: str) -> tuple[str, str]:
        scale = self.const(params.scale, np.float32, f"{hint}_scale")
        zero = self.const(np.zeros(params.scale.shape, params.dtype) + params.zero_point if params.scale.ndim
                          else params.zero_point, params.dtype, f"{hint}_zero")
        return scale, zero

    def clamp(self, x: str, node, hint: str) -> str:
        lo, hi = node.clamp
        if (lo, hi) == (node.out_params.qmin, node.out_params.qmax):
            return x
        dtype = node.out_params.dtype
        return self.node("Clip", [x, self.const(lo, dtype, f"{hint}_lo"), self.const(hi, dtype, f"{hint}_hi")], hint)


def _weights(node, weights: dict | None) -> tuple[np.ndarray, np.ndarray]:
    return node.weights_from(weights)


def _qlinear_conv(b: _Builder, node, x: str, w_name: str, bias_name: str, out: str, geometry=None) -> str:
    xs, xz = b.qparams(node.in_params, f"{node.name}_x")
    ws = b.const(node.w_params.scale, np.float32, f"{node.name}_w_scale")
    wz = b.const(np.zeros(node.w_params.scale.shape, np.int8), np.int8, f"{node.name}_w_zero")
    ys, yz = b.qparams(node.out_params, f"{node.name}_y")
    attrs = {}
    if geometry is not None:
        attrs = dict(strides=list(geometry.stride), pads=list(geometry.pads), dilations=list(geometry.dilation),
                     group=geometry.groups)
    return b.node("QLinearConv", [x, xs, xz, w_name, ws, wz, ys, yz, bias_name], node.name, out, **attrs)


def _check_qop(graph: QGraph) -> None:
    if graph.rounding != "half_even":
        raise ExportError(f"qop export reproduces onnxruntime's arithmetic (half_even); this graph rounds "
                          f"{graph.rounding}: quantize with rounding=half_even, or export --format qdq")
    for node in graph.weighted_nodes():
        if node.w_params.bits != 8 or node.in_params.bits != 8 or node.out_params.bits != 8:
            raise ExportError(f"node {node.name!r}: qop (QLinearConv) takes 8-bit weights and activations, this "
                              f"graph is {graph.bits}: export --format qdq (int16 at opset 21)")


def _emit_qop(b: _Builder, graph: QGraph, node, names: dict, weights: dict | None, weight_inputs: set) -> None:
    x = [names[t] for t in node.inputs]
    out = node.output
    if isinstance(node, (QConv, QLinear)):
        w, bias = _weights(node, weights)
        linear = isinstance(node, QLinear)  # (N, K) -> (N, K, 1, 1) -> 1x1 QLinearConv -> (N, O)
        if node.weight_key in weight_inputs:
            w_name = node.weight_key
            if linear:
                w_name = b.node("Reshape", [w_name, b.const([0, -1, 1, 1], np.int64, f"{node.name}_w4d")], node.name)
        else:
            w_name = b.const(w.reshape(w.shape + (1, 1)) if linear else w, np.int8, f"{node.name}_w")
        bias_name = node.bias_key if node.bias_key in weight_inputs else b.const(bias, np.int32, f"{node.name}_b")
        if linear:
            as_image = b.node("Reshape", [x[0], b.const([0, -1, 1, 1], np.int64, f"{node.name}_4d")], node.name)
            conv = _qlinear_conv(b, node, as_image, w_name, bias_name, f"{out}__conv")
            y = b.node("Reshape", [conv, b.const([0, -1], np.int64, f"{node.name}_2d")], node.name, f"{out}__raw")
        else:
            y = _qlinear_conv(b, node, x[0], w_name, bias_name, f"{out}__raw", node.geometry)
        names[out] = b.clamp(y, node, node.name)
    elif isinstance(node, QAdd):
        a = b.node("DequantizeLinear", [x[0], *b.qparams(node.a_params, f"{node.name}_a")], node.name)
        c = b.node("DequantizeLinear", [x[1], *b.qparams(node.b_params, f"{node.name}_b")], node.name)
        total = b.node("Add", [a, c], node.name)
        y = b.node("QuantizeLinear", [total, *b.qparams(node.out_params, f"{node.name}_y")], node.name)
        names[out] = b.clamp(y, node, node.name)
    elif isinstance(node, QMaxPool):
        g = node.geometry
        names[out] = b.node("MaxPool", x, node.name, kernel_shape=list(g.kernel), strides=list(g.stride),
                            pads=list(g.pads))
    elif isinstance(node, QAvgPool):
        if node.geometry is not None:
            raise ExportError(f"node {node.name!r}: windowed AveragePool has no integer-exact qop form yet: "
                              f"export --format qdq")
        names[out] = _global_average(b, node, x[0])
    elif isinstance(node, QReshape):
        names[out] = b.node("Reshape", [x[0], b.const(list(node.shape), np.int64, f"{node.name}_shape")], node.name)
    elif isinstance(node, QClamp):
        names[out] = b.clamp(x[0], node, node.name)
    elif isinstance(node, QConcat):
        if not all(p.same_as(node.out_params) for p in node.in_params):
            raise ExportError(f"node {node.name!r}: Concat of differently scaled inputs has no exact qop form: "
                              f"export --format qdq")
        names[out] = b.node("Concat", x, node.name, axis=node.axis)
    else:
        raise ExportError(f"node {node.name!r} ({node.op_type}) has no ONNX export")


def _global_average(b: _Builder, node, x: str) -> str:
    """``rint_half_even(sum(x - zp) / count) + zp`` in int32 with standard ops: the sum is shifted by
    ``256 * count`` to be non-negative, so Div truncates as floor and Mod is the remainder."""
    zp = node.out_params.zero_point
    hint = node.name
    xi = b.node("Cast", [x], hint, to=TensorProto.INT32)
    centered = b.node("Sub", [xi, b.const(zp, np.int32, f"{hint}_zp")], hint)
    total = b.node("ReduceSum", [centered, b.const([2, 3], np.int64, f"{hint}_axes")], hint, keepdims=1)
    shape = b.node("Shape", [x], hint)
    hw = b.node("Slice", [shape, b.const([2], np.int64, f"{hint}_s"), b.const([4], np.int64, f"{hint}_e")], hint)
    count = b.node("Cast", [b.node("ReduceProd", [hw], hint, keepdims=1)], hint, to=TensorProto.INT32)
    shifted = b.node("Add", [total, b.node("Mul", [count, b.const(256, np.int32, f"{hint}_k")], hint)], hint)
    quotient = b.node("Div", [shifted, count], hint)
    remainder = b.node("Sub", [shifted, b.node("Mul", [quotient, count], hint)], hint)
    twice = b.node("Mul", [remainder, b.const(2, np.int32, f"{hint}_two")], hint)
    odd = b.node("Equal", [b.node("Mod", [quotient, b.const(2, np.int32, f"{hint}_two2")], hint),
                           b.const(1, np.int32, f"{hint}_one")], hint)
    tie_up = b.node("And", [b.node("Equal", [twice, count], hint), odd], hint)
    up = b.node("Or", [b.node("Greater", [twice, count], hint), tie_up], hint)
    rounded = b.node("Add", [quotient, b.node("Cast", [up], hint, to=TensorProto.INT32)], hint)
    result = b.node("Add", [rounded, b.const(zp - 256, np.int32, f"{hint}_back")], hint)
    return b.node("Cast", [result], hint, to=ONNX_INT[np.dtype(node.out_params.dtype)])


def _emit_qdq(b: _Builder, graph: QGraph, node, names: dict, weights: dict | None, weight_inputs: set) -> None:
    """Float ops between QuantizeLinear/DequantizeLinear pairs: ``names`` maps tensors to float values
    that already went through their quantizer."""
    x = [names[t] for t in node.inputs]
    out = node.output
    if isinstance(node, (QConv, QLinear)):
        if weight_inputs:
            raise ExportError("qdq export takes weights as initializers only (the onnxruntime backend uses qop)")
        w, bias = _weights(node, weights)
        axis = 0
        w_name = b.const(w, w.dtype, f"{node.name}_w")
        w_float = b.node("DequantizeLinear", [w_name, b.const(node.w_params.scale, np.float32, f"{node.name}_ws"),
                                              b.const(np.zeros(w.shape[0], w.dtype), w.dtype, f"{node.name}_wz")],
                         node.name, axis=axis)
        bias_real = (bias.astype(np.float64) * float(node.in_params.scale) * node.w_params.scale.astype(np.float64))
        bias_name = b.const(bias_real.astype(np.float32), np.float32, f"{node.name}_b")
        if isinstance(node, QConv):
            g = node.geometry
            y = b.node("Conv", [x[0], w_float, bias_name], node.name, strides=list(g.stride), pads=list(g.pads),
                       dilations=list(g.dilation), group=g.groups)
        else:
            y = b.node("Gemm", [x[0], w_float, bias_name], node.name, transB=1)
        names[out] = _requantize_float(b, node, y)
    elif isinstance(node, QAdd):
        names[out] = _requantize_float(b, node, b.node("Add", x, node.name))
    elif isinstance(node, QMaxPool):
        g = node.geometry
        names[out] = b.node("MaxPool", x, node.name, kernel_shape=list(g.kernel), strides=list(g.stride),
                            pads=list(g.pads))
    elif isinstance(node, QAvgPool):
        if node.geometry is None:
            y = b.node("GlobalAveragePool", x, node.name)
        else:
            g = node.geometry
            y = b.node("AveragePool", x, node.name, kernel_shape=list(g.kernel), strides=list(g.stride),
                       pads=list(g.pads), count_include_pad=int(g.count_include_pad))
        names[out] = _requantize_float(b, node, y)
    elif isinstance(node, QReshape):
        names[out] = b.node("Reshape", [x[0], b.const(list(node.shape), np.int64, f"{node.name}_shape")], node.name)
    elif isinstance(node, QClamp):
        names[out] = _requantize_float(b, node, x[0])
    elif isinstance(node, QConcat):
        names[out] = _requantize_float(b, node, b.node("Concat", x, node.name, axis=node.axis))
    else:
        raise ExportError(f"node {node.name!r} ({node.op_type}) has no ONNX export")


def _requantize_float(b: _Builder, node, y: str) -> str:
    """Quantize to the node's output grid (with its clamp) and dequantize back: a Q/DQ pair."""
    params = node.out_params
    lo, hi = getattr(node, "clamp", None) or (params.qmin, params.qmax)
    scale, zero = b.qparams(params, f"{node.name}_y")
    if (lo, hi) != (params.qmin, params.qmax):  # clamp in float: onnxruntime has no int16 Clip
        real = [np.float32((v - params.zero_point) * float(params.scale)) for v in (lo, hi)]
        y = b.node("Clip", [y, b.const(real[0], np.float32, f"{node.name}_lo"),
                            b.const(real[1], np.float32, f"{node.name}_hi")], node.name)
    q = b.node("QuantizeLinear", [y, scale, zero], node.name)
    return b.node("DequantizeLinear", [q, scale, zero], node.name)


def export(graph: QGraph, sample_shape: tuple, fmt: str = "qop", weights: dict | None = None, *,
           start: str | None = None, stop: str | None = None, weight_inputs: list[str] | tuple = (),
           metadata: dict | None = None) -> onnx.ModelProto:
    """The graph (with ``weights`` replacing its stored integers) as an ONNX model with a free batch
    dimension, for inputs of ``sample_shape`` (C, H, W); see the module doc."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}: use one of {', '.join(FORMATS)}")
    if fmt == "qop":
        _check_qop(graph)
    wide = any(p.bits > 8 for n in graph.nodes for p in [n.out_params] + ([n.w_params] if hasattr(n, "w_params") else []))
    opset = 21 if fmt == "qdq" and wide else 13
    b = _Builder()
    first = graph.index(start) if start else 0
    last = graph.index(stop) if stop else len(graph.nodes)
    if (start or stop) and fmt != "qop":
        raise ExportError("a graph cut at a node (start=, stop=) is exported as qop only")
    weight_inputs = set(weight_inputs)
    produced = {n.output for n in graph.nodes[first:last]}
    shapes = {k: ["N"] + list(v[1:]) for k, v in graph.shapes((1,) + tuple(sample_shape)).items()}
    inputs, names = [], {}
    if start is None:
        inputs.append(helper.make_tensor_value_info("input", TensorProto.FLOAT, shapes[graph.input_name]))
        scale, zero = b.qparams(graph.input_params, "input")
        q = b.node("QuantizeLinear", ["input", scale, zero], "input")
        names[graph.input_name] = q if fmt == "qop" else b.node("DequantizeLinear", [q, scale, zero], "input")
    else:
        live = sorted({t for n in graph.nodes[first:last] for t in n.inputs if t not in produced})
        for t in live:
            names[t] = t
            inputs.append(helper.make_tensor_value_info(t, ONNX_INT[np.dtype(graph.params_of(t).dtype)], shapes[t]))
    for key in sorted(weight_inputs):
        node = graph.node(key.rsplit(".", 1)[0])
        array = node.weight if key.endswith(".weight") else node.bias.astype(np.int32)
        inputs.append(helper.make_tensor_value_info(key, ONNX_INT[np.dtype(array.dtype)], list(array.shape)))
    emit = _emit_qop if fmt == "qop" else _emit_qdq
    for node in graph.nodes[first:last]:
        emit(b, graph, node, names, weights, weight_inputs)
    out = graph.output_params
    if stop:  # a prefix: the integer tensors alive at ``stop``, under their own names
        needed = sorted({t for n in graph.nodes[last:] for t in n.inputs} & set(names))
        outputs = [helper.make_tensor_value_info(t, ONNX_INT[np.dtype(graph.params_of(t).dtype)], shapes[t])
                   for t in needed]
        for t in needed:
            if names[t] != t:
                b.node("Identity", [names[t]], "prefix", t)
    elif fmt == "qop":
        result = names[graph.output_name]
        outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, shapes[graph.output_name])]
        b.node("Identity", [result], "output", "logits_int")
        b.node("DequantizeLinear", [result, *b.qparams(out, "output")], "output", "logits")
        outputs.append(helper.make_tensor_value_info("logits_int", ONNX_INT[np.dtype(out.dtype)],
                                                     shapes[graph.output_name]))
    else:
        outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, shapes[graph.output_name])]
        b.node("Identity", [names[graph.output_name]], "output", "logits")
    model = helper.make_model(helper.make_graph(b.nodes, "fwdgrad", inputs, outputs, b.initializers),
                              opset_imports=[helper.make_opsetid("", opset)], ir_version=10 if opset == 21 else 8)
    entries = {"bits": graph.bits, "rounding": graph.rounding, "format": fmt, "producer": "fwdgrad"} | (metadata or {})
    onnx.helper.set_model_props(model, {k: str(v) for k, v in entries.items()})
    onnx.checker.check_model(model)
    return model
