"""A user's own model file: a float ONNX classifier (typically from ``torch.onnx.export``), or an integer
file that fwdgrad itself wrote (``fwdgrad quantize --out``, ``fwdgrad export``).

A float file is quantized the way the zoo models are (``quant.convert``), after its head is settled; an
integer file is the engine's graph itself (``quant.export.embedded``), so the integers a user verified are
the integers that train. The head (the final Gemm/MatMul, found by walking back from the output through
shape-only ops) is kept when its outputs are the task's classes, or refitted as a logistic-regression
probe on its input features (``probe``), or drawn at random: in the float file's initializers, or on the
integer graph's grids.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from quant.convert import FloatLayer, ModelFormatError, input_shape, load_model, quantize_layer
from quant.export.embedded import GRAPH_KEY, graph_from_onnx, is_fwdgrad_file
from quant.float_runner import float_outputs
from quant.graph import QGraph
from quant.ops import QLinear, QReshape
from quant.tensor import activation_params, dequantize

SHAPE_OPS = ("Identity", "Flatten", "Reshape", "Squeeze")
HEADS = ("auto", "keep", "probe", "random")


def is_model_path(name: str) -> bool:
    """Whether a model setting names a file rather than a zoo model."""
    return str(name).endswith(".onnx") or "/" in str(name)


def integer_file_settings(path: str | Path) -> dict[str, str]:
    """bits, rounding and scales of an integer file fwdgrad wrote ({} for a float model): what a run that
    trains it must use."""
    from quant.export.embedded import metadata

    meta = metadata(load_model(path))
    if GRAPH_KEY not in meta:
        return {}
    return {"bits": meta["bits"], "rounding": meta["rounding"], "scales": meta.get("scales", "float")}


@dataclass
class ModelFile:
    path: Path
    proto: onnx.ModelProto
    graph: QGraph | None  # the engine's graph of an integer file fwdgrad wrote; None for a float model
    sample_shape: tuple  # the declared input without the batch: (C, H, W) or (F,), None for free dims
    outputs: int  # logits per sample

    @property
    def integer(self) -> bool:
        return self.graph is not None

    @property
    def bits(self) -> str | None:
        return self.graph.bits if self.graph is not None else None


def open_model(path: str | Path) -> ModelFile:
    """Read and check a model file: one data input (N, C, H, W) or (N, F), one logits output (N, classes)."""
    proto = load_model(path)
    if is_fwdgrad_file(proto):
        try:
            graph = graph_from_onnx(proto)
        except ValueError as err:
            raise ModelFormatError(f"{path}: {err}; export it again with fwdgrad") from None
        shape = tuple(graph.metadata.get("input_shape") or ())[1:]
        outputs = graph.shapes((1,) + tuple(d or 1 for d in shape))[graph.output_name][-1]
        return ModelFile(Path(path), proto, graph, shape, int(outputs))
    consts = {t.name for t in proto.graph.initializer}
    inputs = [i.name for i in proto.graph.input if i.name not in consts]
    if len(inputs) != 1 or len(proto.graph.output) != 1:
        raise ModelFormatError(f"{path} has inputs {inputs} and outputs {[o.name for o in proto.graph.output]}: "
                               f"fwdgrad takes a classifier with one input and one logits output (export the model "
                               f"with a single input tensor, e.g. torch.onnx.export(model, x, path))")
    declared = input_shape(proto)
    if len(declared) not in (2, 4):
        raise ModelFormatError(f"{path}: the input {inputs[0]!r} has {len(declared)} dimensions {declared}; fwdgrad "
                               f"takes (N, C, H, W) images or (N, F) features")
    outputs = _output_width(proto, declared)
    return ModelFile(Path(path), proto, None, declared[1:], outputs)


def _output_width(proto: onnx.ModelProto, declared: tuple) -> int:
    dims = proto.graph.output[0].type.tensor_type.shape.dim
    if len(dims) == 2 and dims[1].HasField("dim_value") and dims[1].dim_value > 0:
        return int(dims[1].dim_value)
    if len(dims) not in (0, 2):
        raise ModelFormatError(f"the output {proto.graph.output[0].name!r} has {len(dims)} dimensions: fwdgrad "
                               f"takes logits (N, classes)")
    sample = np.zeros((1,) + tuple(d or 1 for d in declared[1:]), np.float32)
    name = proto.graph.output[0].name
    return int(float_outputs(proto, [name], sample)[name].shape[-1])


# ---- the float head --------------------------------------------------------------------------------------

@dataclass
class FloatHead:
    """The final linear layer of a float model: where its weights are and what it reads."""

    node: str
    features: str  # the tensor it reads (its input features)
    weight: str  # initializer name
    bias: str | None  # initializer name (Gemm's C, or the constant of the Add after a MatMul)
    transposed: bool  # weight stored (out, in) (Gemm transB=1) rather than (in, out)


def find_float_head(proto: onnx.ModelProto) -> FloatHead:
    """The Gemm or MatMul(+Add) that computes the logits, or a ValueError that says why there is none."""
    producers = {out: node for node in proto.graph.node for out in node.output}
    consts = {t.name for t in proto.graph.initializer}
    tensor = proto.graph.output[0].name
    node = producers.get(tensor)
    while node is not None and node.op_type in SHAPE_OPS:
        node = producers.get(node.input[0])
    why = f"the logits come from {node.op_type} node {node.name or node.output[0]!r}" if node else "no node"
    if node is not None and node.op_type == "Add":
        dynamic = [t for t in node.input if t not in consts]
        constant = [t for t in node.input if t in consts]
        before = producers.get(dynamic[0]) if len(dynamic) == 1 and len(constant) == 1 else None
        if before is not None and before.op_type == "MatMul" and before.input[1] in consts:
            return FloatHead(before.name or before.output[0], before.input[0], before.input[1], constant[0], False)
    if node is not None and node.op_type == "MatMul" and node.input[1] in consts:
        return FloatHead(node.name or node.output[0], node.input[0], node.input[1], None, False)
    if node is not None and node.op_type == "Gemm" and node.input[1] in consts:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if not attrs.get("transA", 0) and attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0:
            bias = node.input[2] if len(node.input) > 2 and node.input[2] in consts else None
            return FloatHead(node.name or node.output[0], node.input[0], node.input[1], bias, bool(attrs.get("transB", 0)))
    raise ValueError(f"--head probe/random replace the model's final Gemm or MatMul, and {why} (through "
                     f"{'/'.join(SHAPE_OPS)} only): export the model so that a Linear layer computes its logits, "
                     f"or keep the head (--head keep) with one output per class")


def head_features(proto: onnx.ModelProto, head: FloatHead, x: np.ndarray) -> np.ndarray:
    """The head's input features of ``x`` (float), as (N, features)."""
    values = float_outputs(proto, [head.features], x)[head.features]
    return values.reshape(len(values), -1)


def with_float_head(proto: onnx.ModelProto, head: FloatHead, weight: np.ndarray, bias: np.ndarray) -> onnx.ModelProto:
    """A copy of ``proto`` whose head computes ``features @ weight.T + bias`` (weight (classes, features))."""
    users = [n for n in proto.graph.node for t in n.input if t in (head.weight, head.bias)]
    if len(users) > (2 if head.bias else 1):
        raise ValueError(f"the head's weights ({head.weight}) are shared with other nodes: fwdgrad cannot replace "
                         f"them alone; export the model with an unshared final Linear")
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    node = next(n for n in model.graph.node if (n.name or n.output[0]) == head.node)
    bias_name = head.bias
    if bias_name is None:
        if node.op_type != "Gemm":
            raise ValueError(f"the head {head.node!r} is a MatMul without a bias to refit: export the final Linear "
                             f"with bias=True")
        bias_name = f"{head.node}::bias"
        node.input.append(bias_name)
        model.graph.initializer.append(numpy_helper.from_array(np.zeros(0, np.float32), bias_name))
    new = {head.weight: weight if head.transposed else weight.T, bias_name: bias}
    for tensor in model.graph.initializer:
        if tensor.name in new:
            tensor.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(new[tensor.name], np.float32), tensor.name))
    del model.graph.value_info[:]  # intermediate shapes are inferred again
    out = model.graph.output[0].type.tensor_type.shape
    if len(out.dim) == 2:
        out.dim[1].Clear()
        out.dim[1].dim_value = int(weight.shape[0])
    onnx.checker.check_model(model)
    return model


# ---- the integer head ------------------------------------------------------------------------------------

def integer_head(graph: QGraph) -> tuple[int, QLinear]:
    """(index, node) of the QLinear whose output reaches the graph output through reshapes only."""
    index = len(graph.nodes) - 1
    while index >= 0 and isinstance(graph.nodes[index], QReshape):
        index -= 1
    node = graph.nodes[index] if index >= 0 else None
    if not isinstance(node, QLinear):
        what = f"{node.op_type} node {node.name!r}" if node else "no node"
        raise ValueError(f"--head probe/random replace the integer model's final linear layer, and its logits come "
                         f"from {what}: keep the head (--head keep)")
    return index, node


def integer_head_features(graph: QGraph, x: np.ndarray) -> np.ndarray:
    """Dequantized input features of the integer graph's head, (N, features)."""
    _, head = integer_head(graph)
    out = []
    for start in range(0, len(x), 256):
        cache = graph.prefix(x[start:start + 256], until=head.name)
        out.append(dequantize(cache[head.inputs[0]], head.in_params))
    values = np.concatenate(out)
    return values.reshape(len(values), -1)


def with_integer_head(graph: QGraph, weight: np.ndarray, bias: np.ndarray, features: np.ndarray) -> QGraph:
    """The graph with its head replaced by float ``weight`` (classes, features) and ``bias`` quantized on the
    graph's grids; the new logits' range comes from the head applied to ``features``."""
    index, head = integer_head(graph)
    logits = features @ weight.T + bias
    out = activation_params(float(logits.min()), float(logits.max()), head.out_params.bits,
                            graph.metadata.get("scales", "float"))
    layer = FloatLayer("linear", head.name, list(head.inputs), head.output, weight=weight.astype(np.float32),
                       bias=bias.astype(np.float32))
    nodes = list(graph.nodes)
    nodes[index] = quantize_layer(layer, head.in_params, out, head.w_params.bits, graph.metadata.get("scales", "float"))
    for i in range(index + 1, len(nodes)):  # reshapes after the head carry its params on
        n = nodes[i]
        nodes[i] = QReshape(n.name, n.inputs, n.output, out, shape=n.shape)
    return QGraph(nodes, graph.input_name, graph.input_params, graph.output_name, graph.rounding, graph.bits,
                  dict(graph.metadata))
