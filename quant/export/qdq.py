"""``qdq``: float operators between QuantizeLinear/DequantizeLinear pairs, the layout edge converters take.

Every engine tensor becomes ``QuantizeLinear -> DequantizeLinear`` with its scale and zero point (int16
ones need opset 21); weights are integer initializers behind DequantizeLinear (per output channel),
int32 biases sit behind DequantizeLinear at ``s_x * s_w``, and the int64 biases of 16-bit layers are
int64 constants turned into float by Cast/Mul (DequantizeLinear takes no int64). Fused ReLU/ReLU6 clamps become a float Clip before the
QuantizeLinear, the pattern QNN and TFLite converters fuse into the layer. The runtime computes in float
between the pairs, so results agree with the engine's integers up to float rounding, not bit for bit
(use ``qop`` for that) -- unless every scale is a power of two and operands are 8-bit: then each product
and partial sum is an integer times one power of two, exact in float32 while below 2**24 of that unit
(always for K <= 518 taps, and far beyond for real activations), each QuantizeLinear divides exactly, an
average's division by its tap count is correctly rounded, and the file computes the engine's integers
(measured on MobileNetV2: docs/export.md).

One function per node kind: it returns the float tensor *before* the output's quantizer.
"""
from __future__ import annotations

import numpy as np

from ..ops import QAdd, QAvgPool, QClamp, QConcat, QConv, QLinear, QMaxPool, QReshape
from ..tensor import QParams

from .builder import Builder
from .operands import Weights
from .shared import conv_attrs, max_pool, reshape


def requantize(b: Builder, y: str, params: QParams, clamp: tuple[int, int] | None, hint: str) -> str:
    """The float result on the output's grid: [Clip to the clamp's real range] -> Q -> DQ."""
    lo, hi = clamp or (params.qmin, params.qmax)
    if (lo, hi) != (params.qmin, params.qmax):
        scale = float(params.scale)
        bounds = [np.float32((v - params.zero_point) * scale) for v in (lo, hi)]
        y = b.op("Clip", [y, *(b.const(v, np.float32, f"{hint}_bound") for v in bounds)], hint)
    q = b.quantize(y, params, f"{hint}_y")
    return b.dequantize(q, params, f"{hint}_y")


def _bias(b: Builder, node, bias: np.ndarray) -> str:
    """The real-valued bias: DequantizeLinear of the int32 integers, or (int64, which DequantizeLinear does
    not take) ``float32(float64(b) * float64(scale))`` spelled in Cast/Mul, so that the file still holds
    the integers themselves."""
    scale = np.float32(node.in_params.scale) * node.w_params.scale
    integers = b.const(bias, node.bias.dtype, f"{node.name}_bias")
    b.record(node.bias_key, [integers])
    if node.bias.dtype == np.int32:
        return b.op("DequantizeLinear", [integers, b.const(scale, np.float32, f"{node.name}_bias_scale"),
                                         b.const(np.zeros(scale.shape, np.int32), np.int32, f"{node.name}_bias_zero")],
                    node.name, axis=0)
    real = b.op("Mul", [b.cast(integers, np.float64, node.name),
                        b.const(scale.astype(np.float64), np.float64, f"{node.name}_bias_scale")], node.name)
    return b.cast(real, np.float32, node.name)


def weighted(b: Builder, node, xs: list[str], weights: Weights) -> str:
    weight, bias = node.weights_from(weights.replacements)
    integers = b.const(weight, node.weight.dtype, f"{node.name}_weight")
    b.record(node.weight_key, [integers])
    w = b.dequantize(integers, node.w_params, f"{node.name}_w")
    if isinstance(node, QLinear):
        return b.op("Gemm", [xs[0], w, _bias(b, node, bias)], node.name, transB=1)
    return b.op("Conv", [xs[0], w, _bias(b, node, bias)], node.name,
                **conv_attrs(node.geometry, node.weight.shape[2:]))


def add(b: Builder, node: QAdd, xs: list[str], weights: Weights) -> str:
    return b.op("Add", xs, node.name)


def average_pool(b: Builder, node: QAvgPool, xs: list[str], weights: Weights) -> str:
    g = node.geometry
    if g is None:
        return b.op("GlobalAveragePool", xs, node.name)
    return b.op("AveragePool", xs, node.name, kernel_shape=list(g.kernel), strides=list(g.stride), pads=list(g.pads),
                count_include_pad=int(g.count_include_pad))


def clamp(b: Builder, node: QClamp, xs: list[str], weights: Weights) -> str:
    return xs[0]  # the clamp itself is applied by requantize (a float Clip before the quantizer)


def concat(b: Builder, node: QConcat, xs: list[str], weights: Weights) -> str:
    return b.op("Concat", xs, node.name, axis=node.axis)


LOWERINGS = {QConv: weighted, QLinear: weighted, QAdd: add, QMaxPool: max_pool, QAvgPool: average_pool,
             QReshape: reshape, QClamp: clamp, QConcat: concat}
