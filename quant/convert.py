"""Float ONNX model -> QGraph: BatchNorm folding, activation fusion, calibration, post-training quantization.

Four passes, each simple on its own:
1. ``lower``: walk the ONNX nodes in order and build float layers, folding BatchNormalization into the
   preceding convolution, fusing ReLU/Clip into the layer before it (they become integer clamps), folding
   constant Adds after MatMul into the bias, and dropping Identity/Dropout. Anything else is an
   :class:`UnsupportedOpError` that names the op type and the node.
2. ``quant.calibration.calibrate``: run the float model in onnxruntime over sample data with every tensor
   we must quantize exposed as an output, and record per-channel statistics.
3. ``quant.equalize.equalize``: fold per-channel factors into the weights around tensors whose channels
   have very different ranges, so that one activation scale fits them all.
4. ``convert``: quantize weights per output channel (symmetric), biases at s_x * s_w, activations with
   the calibrated ranges, at the requested bit widths (w8a8, w16a8, w8a16, w16a16), then correct biases.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .fixedpoint import check_rounding
from .backends import get_backend
from .calibration import all_but_channels, calibrate, check_method
from .equalize import Equalization, equalize
from .graph import QGraph, check_input_shape
from .ops.base import WeightedNode
from .ops import ConvGeometry, PoolGeometry, QAdd, QAvgPool, QClamp, QConcat, QConv, QLinear, QMaxPool, QReshape
from .tensor import QParams, activation_params, check_scales, quantize, weight_params

SUPPORTED_OPS = ("Conv", "BatchNormalization (after Conv)", "Gemm", "MatMul (+ Add of a constant)", "Add", "Relu",
                 "Clip", "MaxPool", "AveragePool", "GlobalAveragePool", "ReduceMean (spatial)", "Flatten",
                 "Reshape (constant shape)", "Concat", "Identity", "Dropout")
BIT_CONFIGS = ("w8a8", "w16a8", "w8a16", "w16a16")


class UnsupportedOpError(ValueError):
    """An ONNX node the engine has no integer equivalent for."""


class ModelFormatError(ValueError):
    """A file that is not a valid single-input, single-output float ONNX model."""


def parse_bits(bits: str) -> tuple[int, int]:
    match = re.fullmatch(r"w(8|16)a(8|16)", str(bits))
    if not match:
        raise ValueError(f"bad bits string {bits!r}: use one of {', '.join(BIT_CONFIGS)} (weight bits, activation bits)")
    return int(match.group(1)), int(match.group(2))


@dataclass
class FloatLayer:
    kind: str  # conv | linear | add | maxpool | avgpool | reshape | clamp | concat
    name: str
    inputs: list[str]
    output: str
    attrs: dict = field(default_factory=dict)
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None
    act: tuple[float, float] | None = None  # fused activation range (ReLU: (0, inf), ReLU6: (0, 6))
    pre_act: str | None = None  # conv/linear: the float tensor before fused activations (bias correction)

    @property
    def calibrated(self) -> bool:
        """Layers whose output gets its own scale; the others inherit their input's params."""
        return self.kind in ("conv", "linear", "add", "concat")


# ---- pass 1: lower ONNX nodes to float layers ---------------------------------------------------------

def load_model(model: str | Path | onnx.ModelProto) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    path = Path(model)
    if not path.is_file():
        problem = f"{path} is a directory, not an ONNX file" if path.is_dir() else f"no ONNX file at {path}"
        raise FileNotFoundError(f"{problem}: pass the path of a float .onnx model (export one with "
                                f"torch.onnx.export; `fwdgrad models` lists the packaged ones)")
    try:
        proto = onnx.load(str(path))
        onnx.checker.check_model(proto)
    except Exception as err:  # onnx raises DecodeError, ValidationError, ... depending on the damage
        raise ModelFormatError(f"{path} is not a valid ONNX model ({type(err).__name__}: {err}); "
                               f"re-export it, e.g. with torch.onnx.export") from err
    return proto


def input_shape(model: onnx.ModelProto) -> tuple[int | None, ...]:
    """The declared shape of the model's data input; None for symbolic or unknown dims (the batch)."""
    consts = {t.name for t in model.graph.initializer}
    value = next((i for i in model.graph.input if i.name not in consts), None)
    dims = value.type.tensor_type.shape.dim if value is not None else ()
    return tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims)


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _node_label(node: onnx.NodeProto) -> str:
    return node.name or node.output[0]


def _unsupported(node: onnx.NodeProto, why: str = "") -> UnsupportedOpError:
    reason = f" ({why})" if why else ""
    return UnsupportedOpError(f"unsupported ONNX op {node.op_type} at node {_node_label(node)!r}{reason}; "
                              f"supported: {', '.join(SUPPORTED_OPS)}")


class _Lowering:
    """State of pass 1: constants, tensor aliases, and which layer produced each tensor."""

    def __init__(self, model: onnx.ModelProto):
        graph = model.graph
        self.consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        inputs = [i.name for i in graph.input if i.name not in self.consts]
        if len(inputs) != 1 or len(graph.output) != 1:
            raise ModelFormatError(f"expected one input and one output, got inputs {inputs} and outputs "
                                   f"{[o.name for o in graph.output]}")
        self.input_name, self.output_name = inputs[0], graph.output[0].name
        elem = graph.input[[i.name for i in graph.input].index(self.input_name)].type.tensor_type.elem_type
        if elem != onnx.TensorProto.FLOAT:
            raise ModelFormatError(f"input {self.input_name!r} must be float32 (a float model to quantize), "
                                   f"got {onnx.TensorProto.DataType.Name(elem)}")
        self.consumers: dict[str, int] = {}
        for node in graph.node:
            for t in node.input:
                self.consumers[t] = self.consumers.get(t, 0) + 1
        self.alias: dict[str, str] = {}
        self.layers: list[FloatLayer] = []
        self.producer: dict[str, FloatLayer] = {}

    def resolve(self, name: str) -> str:
        while name in self.alias:
            name = self.alias[name]
        return name

    def const(self, node, index: int) -> np.ndarray:
        if index >= len(node.input) or not node.input[index]:
            return None
        name = node.input[index]
        if name not in self.consts:
            raise _unsupported(node, f"input {name!r} must be a constant")
        return self.consts[name].astype(np.float32)

    def add_layer(self, layer: FloatLayer) -> None:
        layer.inputs = [self.resolve(t) for t in layer.inputs]
        if layer.kind in ("conv", "linear"):
            layer.pre_act = layer.output
        self.layers.append(layer)
        self.producer[layer.output] = layer

    def fusable(self, tensor: str, kinds: tuple[str, ...]) -> FloatLayer | None:
        """The layer producing ``tensor`` if it may absorb the next op (sole consumer, right kind)."""
        layer = self.producer.get(self.resolve(tensor))
        if layer is not None and layer.kind in kinds and self.consumers.get(tensor, 0) == 1:
            return layer
        return None

    def move_output(self, layer: FloatLayer, new_output: str, folds_into_accumulator: bool = False) -> None:
        del self.producer[layer.output]
        layer.output = new_output
        if folds_into_accumulator:
            layer.pre_act = new_output
        self.producer[new_output] = layer


def _clip_range(low: _Lowering, node) -> tuple[float, float]:
    if node.op_type == "Relu":
        return 0.0, float("inf")
    attrs = _attrs(node)
    lo, hi = low.const(node, 1), low.const(node, 2)
    lo = float(lo) if lo is not None else float(attrs.get("min", -np.inf))
    hi = float(hi) if hi is not None else float(attrs.get("max", np.inf))
    return lo, hi


def _pads(node, attrs) -> tuple[int, int, int, int]:
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise _unsupported(node, "auto_pad is not supported: export with explicit pads")
    t, l, b, r = attrs.get("pads", [0, 0, 0, 0])
    return int(t), int(l), int(b), int(r)


def _lower_node(low: _Lowering, node: onnx.NodeProto) -> None:
    op, attrs, label = node.op_type, _attrs(node), _node_label(node)
    if op in ("Identity", "Dropout"):
        if node.input[0] in low.consts:  # exporters alias shared initializers through Identity
            low.consts[node.output[0]] = low.consts[node.input[0]]
        else:
            low.alias[node.output[0]] = node.input[0]
    elif op == "Constant":
        low.consts[node.output[0]] = numpy_helper.to_array(attrs["value"])
    elif op == "Conv":
        geometry = ConvGeometry(tuple(attrs.get("strides", (1, 1))), _pads(node, attrs),
                                tuple(attrs.get("dilations", (1, 1))), int(attrs.get("group", 1)))
        weight = low.const(node, 1)
        if weight.ndim != 4:
            raise _unsupported(node, f"only 2-D convolutions, got weights {weight.shape}")
        bias = low.const(node, 2)
        low.add_layer(FloatLayer("conv", label, [node.input[0]], node.output[0], {"geometry": geometry}, weight,
                                 bias if bias is not None else np.zeros(weight.shape[0], np.float32)))
    elif op == "BatchNormalization":
        conv = low.fusable(node.input[0], ("conv",))
        if conv is None or conv.act is not None:
            raise _unsupported(node, "BatchNormalization is folded only when it directly follows a Conv")
        gamma, beta, mean, var = (low.const(node, i) for i in range(1, 5))
        scale = gamma / np.sqrt(var + attrs.get("epsilon", 1e-5))
        conv.weight = conv.weight * scale[:, None, None, None]
        conv.bias = (conv.bias - mean) * scale + beta
        low.move_output(conv, node.output[0], folds_into_accumulator=True)
    elif op in ("Relu", "Clip"):
        lo, hi = _clip_range(low, node)
        layer = low.fusable(node.input[0], ("conv", "linear", "add"))
        if layer is not None:
            prev = layer.act or (-np.inf, np.inf)
            layer.act = (max(prev[0], lo), min(prev[1], hi))
            low.move_output(layer, node.output[0])
        else:
            low.add_layer(FloatLayer("clamp", label, [node.input[0]], node.output[0], {"range": (lo, hi)}))
    elif op == "Gemm":
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            raise _unsupported(node, "Gemm with transA or alpha/beta != 1")
        weight = low.const(node, 1)
        weight = weight if attrs.get("transB", 0) else weight.T
        bias = low.const(node, 2)
        low.add_layer(FloatLayer("linear", label, [node.input[0]], node.output[0], {}, weight,
                                 bias if bias is not None else np.zeros(weight.shape[0], np.float32)))
    elif op == "MatMul":
        weight = low.const(node, 1).T
        low.add_layer(FloatLayer("linear", label, [node.input[0]], node.output[0], {}, weight,
                                 np.zeros(weight.shape[0], np.float32)))
    elif op == "Add":
        constant = [t for t in node.input if t in low.consts]
        if not constant:
            low.add_layer(FloatLayer("add", label, list(node.input), node.output[0]))
            return
        dynamic = [t for t in node.input if t not in low.consts]
        layer = low.fusable(dynamic[0], ("linear", "conv"))
        value = low.consts[constant[0]].astype(np.float32)
        if layer is None or layer.act is not None or value.size not in (1, layer.bias.size):
            raise _unsupported(node, "an Add of a constant must follow a MatMul/Gemm/Conv as its bias")
        layer.bias = layer.bias + value.reshape(-1)
        low.move_output(layer, node.output[0], folds_into_accumulator=True)
    elif op in ("MaxPool", "AveragePool"):
        if attrs.get("ceil_mode", 0) or any(d != 1 for d in attrs.get("dilations", (1, 1))):
            raise _unsupported(node, "ceil_mode and dilated pooling are not supported")
        kernel = tuple(attrs["kernel_shape"])
        geometry = PoolGeometry(kernel, tuple(attrs.get("strides", (1, 1))), _pads(node, attrs),
                                bool(attrs.get("count_include_pad", 0)))
        low.add_layer(FloatLayer("maxpool" if op == "MaxPool" else "avgpool", label, [node.input[0]],
                                 node.output[0], {"geometry": geometry}))
    elif op == "GlobalAveragePool":
        low.add_layer(FloatLayer("avgpool", label, [node.input[0]], node.output[0], {"geometry": None}))
    elif op == "ReduceMean":
        axes = attrs.get("axes") or (low.const(node, 1).astype(int).tolist() if len(node.input) > 1 else None)
        if axes is None or sorted(a % 4 for a in axes) != [2, 3]:
            raise _unsupported(node, f"ReduceMean only over the spatial axes [2, 3] of NCHW, got axes={axes}")
        pooled = node.output[0] if attrs.get("keepdims", 1) else node.output[0] + "::pooled"
        low.add_layer(FloatLayer("avgpool", label, [node.input[0]], pooled, {"geometry": None}))
        if pooled != node.output[0]:
            low.add_layer(FloatLayer("reshape", label + "::squeeze", [pooled], node.output[0], {"shape": (0, -1)}))
    elif op == "Flatten":
        if attrs.get("axis", 1) != 1:
            raise _unsupported(node, "Flatten only with axis=1")
        low.add_layer(FloatLayer("reshape", label, [node.input[0]], node.output[0], {"shape": (0, -1)}))
    elif op == "Reshape":
        if node.input[1] not in low.consts:
            raise _unsupported(node, "the shape must be a constant (export with torch.flatten instead of "
                                     "x.view(x.size(0), -1))")
        shape = tuple(int(d) for d in low.consts[node.input[1]])
        low.add_layer(FloatLayer("reshape", label, [node.input[0]], node.output[0], {"shape": (0,) + shape[1:]}))
    elif op == "Concat":
        low.add_layer(FloatLayer("concat", label, list(node.input), node.output[0], {"axis": int(attrs["axis"])}))
    elif op == "Softmax":
        raise _unsupported(node, "export the model's logits, not probabilities: the loss applies softmax itself")
    else:
        raise _unsupported(node)


def lower(model: onnx.ModelProto) -> tuple[list[FloatLayer], str, str]:
    """Pass 1: float layers in execution order, the input tensor name and the output tensor name."""
    low = _Lowering(model)
    for node in model.graph.node:
        _lower_node(low, node)
    for layer in low.layers:
        for what, value in (("weights", layer.weight), ("bias", layer.bias)):
            if value is not None and not np.all(np.isfinite(value)):
                raise ModelFormatError(f"layer {layer.name!r} has NaN or inf in its {what} "
                                       f"({int(np.sum(~np.isfinite(value)))} values): the model itself is damaged "
                                       f"(check the training that produced it), not the calibration data")
    output = low.resolve(low.output_name)
    if output not in low.producer:
        raise ModelFormatError(f"graph output {low.output_name!r} is not computed by any supported layer")
    return low.layers, low.input_name, output


# ---- pass 3: quantization -----------------------------------------------------------------------------

def _clamp_bounds(params: QParams, act: tuple[float, float] | None) -> tuple[int, int]:
    lo, hi = params.qmin, params.qmax
    if act is not None:
        scale = float(params.scale)
        if np.isfinite(act[0]):
            lo = max(lo, params.zero_point + int(np.rint(act[0] / scale)))
        if np.isfinite(act[1]):
            hi = min(hi, params.zero_point + int(np.rint(act[1] / scale)))
    return lo, hi


def quantize_layer(layer: FloatLayer, in_params: QParams, out_params: QParams, wbits: int, scales: str):
    """A float conv/linear layer on the integer grids: weights per output channel, bias at s_x * s_w."""
    w_params = weight_params(layer.weight, wbits, axis=0, scales=scales)
    weight = quantize(layer.weight, w_params)
    wide = in_params.bits > 8 or wbits > 8
    bias_scale = np.float32(in_params.scale) * w_params.scale
    bias_bits = 64 if wide else 32
    limit = (1 << (bias_bits - 1)) - 1
    bias = np.clip(np.rint(layer.bias / bias_scale), -limit, limit).astype(np.int64 if wide else np.int32)
    kind = QConv if layer.kind == "conv" else QLinear
    extra = {"geometry": layer.attrs["geometry"]} if layer.kind == "conv" else {}
    return kind(layer.name, layer.inputs, layer.output, out_params, in_params=in_params, weight=weight,
                w_params=w_params, bias=bias, clamp=_clamp_bounds(out_params, layer.act), **extra)


def correct_biases(graph: QGraph, data: np.ndarray, float_means: dict[str, np.ndarray], batch_size: int = 32):
    """Empirical bias correction (Nagel et al. 2019, "Data-Free Quantization", sec. 4.2).

    Rounding weights shifts each output channel's mean; over 50 layers these shifts add up. Layer by layer,
    in order, run the quantized graph on the calibration data and move each bias (in its integer grid) so
    that the mean of the integer pre-activation matches the float model's. Later layers see the corrected
    earlier ones, so the shifts do not accumulate.
    """
    kernels = get_backend("numba")
    envs = [{graph.input_name: graph.quantize_input(data[i:i + batch_size])} for i in range(0, len(data), batch_size)]
    for index, node in enumerate(graph.nodes):
        if isinstance(node, WeightedNode) and node.name in float_means:
            total, count = 0.0, 0
            for env in envs:
                acc = node.accumulate(kernels, [env[t] for t in node.inputs])
                total = total + acc.astype(np.float64).sum(axis=all_but_channels(acc))
                count += acc.size // acc.shape[1]
            acc_scale = np.float32(node.in_params.scale) * node.w_params.scale
            shift = np.rint((float_means[node.name] - total / count * acc_scale) / acc_scale)
            limit = np.iinfo(node.bias.dtype).max
            node.bias = np.clip(node.bias + shift, -limit, limit).astype(node.bias.dtype)
        for env in envs:
            graph.run_nodes(env, index, index + 1, kernels)


def convert(model: str | Path | onnx.ModelProto, calibration_data: np.ndarray, *, bits: str = "w8a8",
            rounding: str = "half_even", calibration: str = "minmax", percentile: float = 99.99,
            bias_correction: bool = True, batch_size: int = 32, scales: str = "float",
            equalize_channels: str | Equalization = "all") -> QGraph:
    """Quantize a float ONNX model into a QGraph (post-training quantization); ``scales="pow2"`` rounds every
    scale up to a power of two (shift-only requantization, see quant.tensor); ``equalize_channels`` picks
    the tensors whose channels are equalized first (quant.equalize: ``depthwise``, ``all`` or ``none``, or
    an ``Equalization`` that also sets how far)."""
    wbits, abits = parse_bits(bits)
    check_rounding(rounding)
    check_scales(scales)
    check_method(calibration)
    equalization = Equalization.of(equalize_channels)
    proto = load_model(model)
    layers, input_name, output_name = lower(proto)
    check_input_shape(np.shape(calibration_data), input_shape(proto), input_name, "calibration data")
    weighted = [l for l in layers if l.kind in ("conv", "linear")]
    stats = calibrate(proto, [input_name] + [l.output for l in layers if l.calibrated], calibration_data,
                      batch_size, mean_tensors=[l.pre_act for l in weighted] if bias_correction else (),
                      sample=calibration != "minmax")
    factors = equalize(layers, input_name, output_name, stats, equalization, wbits, abits)

    def activation(tensor: str) -> QParams:
        lo, hi = stats.range_of(tensor, calibration, percentile, abits, scales, factors.get(tensor))
        return activation_params(lo, hi, abits, scales)

    params = {input_name: activation(input_name)}
    nodes = []
    for layer in layers:
        ins = [params[t] for t in layer.inputs]
        out = activation(layer.output) if layer.calibrated else ins[0]
        if layer.kind in ("conv", "linear"):
            node = quantize_layer(layer, ins[0], out, wbits, scales)
        elif layer.kind == "add":
            node = QAdd(layer.name, layer.inputs, layer.output, out, a_params=ins[0], b_params=ins[1],
                        clamp=_clamp_bounds(out, layer.act))
        elif layer.kind == "maxpool":
            node = QMaxPool(layer.name, layer.inputs, layer.output, out, geometry=layer.attrs["geometry"])
        elif layer.kind == "avgpool":
            node = QAvgPool(layer.name, layer.inputs, layer.output, out, geometry=layer.attrs["geometry"])
        elif layer.kind == "reshape":
            node = QReshape(layer.name, layer.inputs, layer.output, out, shape=layer.attrs["shape"])
        elif layer.kind == "clamp":
            node = QClamp(layer.name, layer.inputs, layer.output, out, clamp=_clamp_bounds(out, layer.attrs["range"]))
        else:
            node = QConcat(layer.name, layer.inputs, layer.output, out, in_params=ins, axis=layer.attrs["axis"])
        params[layer.output] = out
        nodes.append(node)
    metadata = {"scales": scales, "calibration": calibration, "calibration_samples": int(len(calibration_data)),
                "bias_correction": bias_correction, "equalize": equalization.mode,
                "equalized_tensors": len(factors), "input_shape": input_shape(proto)}
    graph = QGraph(nodes, input_name, params[input_name], output_name, rounding, bits, metadata)
    if bias_correction:
        correct_biases(graph, np.asarray(calibration_data, np.float32),
                       {l.name: stats.channel_means[l.pre_act] * factors.get(l.output, 1.0) for l in weighted},
                       batch_size)
    return graph
