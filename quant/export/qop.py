"""``qop``: integer operators that make onnxruntime compute exactly the engine's ``half_even`` integers.

One function per node kind; each takes the ONNX names of the node's integer inputs and returns the name
of its integer output. Every pattern is exact, for these reasons:

- 8-bit convolutions and linear layers are QLinearConv (linear as a 1x1 convolution, because
  QLinearMatMul has no bias input): onnxruntime's requantization is the engine's, ``rint(float32(acc) *
  float32(s_x * s_w / s_y))`` (tests/test_onnxruntime_parity.py).
- 16-bit weights (w16a8): no ONNX integer convolution takes 16-bit operands, so ``w = 256 * hi + lo``
  (hi int8, lo uint8) and the accumulator is ``256 * ConvInteger(x, hi) + ConvInteger(x, lo) + bias``
  (x shifted to uint8, see :func:`_split_conv`), summed exactly in float64 and rounded once to float32,
  then multiplied by the engine's float32 multiplier and rounded by QuantizeLinear (scale 1): the
  engine's wide-accumulator arithmetic step for step.
- Add is ``(x - zp) * s`` of each input (Cast, Sub, Mul: DequantizeLinear's float32 arithmetic) -> Add ->
  QuantizeLinear: the engine's half_even add is defined as that float32 arithmetic.
- Average pooling: ConvInteger with a ones kernel sums ``x - zp`` exactly (padding is the zero point), the
  sum (below 2**24, exact in float32) is divided by the tap count in float32, and QuantizeLinear rounds half
  to even. IEEE division is correctly rounded, so a quotient lands on ``k + 1/2`` only when it is exactly
  that, and rounding matches the engine's integer ``round_divide``.
- Concat inputs on other scales are requantized as DequantizeLinear(scale = the engine's float32
  multiplier) -> QuantizeLinear(scale 1): ``rint(float32(x - zp) * m) + zp_y``, the engine's formula.
- MaxPool, Reshape, Concat move int8 values; fused ReLU/ReLU6 are integer Clips.
"""
from __future__ import annotations

import numpy as np

from ..fixedpoint import Requant
from ..ops import ConvGeometry, PoolGeometry, QAdd, QAvgPool, QClamp, QConcat, QConv, QLinear, QMaxPool, QReshape

from .builder import Builder
from .operands import Weights, conv_weight
from .shared import conv_attrs, max_pool, reshape


def _channel_const(b: Builder, values, dtype, hint: str) -> str:
    """A per-channel vector shaped (1, C, 1, 1) to broadcast over NCHW (a scalar stays a scalar)."""
    values = np.asarray(values, dtype)
    return b.const(values.reshape(1, -1, 1, 1) if values.size > 1 else values.reshape(()), dtype, hint)


def weighted(b: Builder, node, xs: list[str], weights: Weights) -> str:
    linear = isinstance(node, QLinear)
    x = xs[0]
    weight, bias = weights.tensors(b, node)
    w = conv_weight(b, node, weight)
    if linear:
        x = b.op("Unsqueeze", [x, b.const([2, 3], np.int64, f"{node.name}_axes")], node.name)
    geometry = ConvGeometry() if linear else node.geometry
    kernel = (1, 1) if linear else node.weight.shape[2:]
    y = (_qlinear_conv if len(w) == 1 else _split_conv)(b, node, x, w, bias, conv_attrs(geometry, kernel))
    if linear:
        y = b.op("Squeeze", [y, b.const([2, 3], np.int64, f"{node.name}_axes")], node.name)
    return b.clip(y, node.clamp, node.out_params, node.name)


def _qlinear_conv(b: Builder, node, x: str, w: list[str], bias: str, attrs: dict) -> str:
    channels = node.w_params.scale.shape
    inputs = [x, *b.scale_zero(node.in_params, f"{node.name}_x"), w[0],
              b.const(node.w_params.scale, np.float32, f"{node.name}_w_scale"),
              b.const(np.zeros(channels, np.int8), np.int8, f"{node.name}_w_zero"),
              *b.scale_zero(node.out_params, f"{node.name}_y"), bias]
    return b.op("QLinearConv", inputs, node.name, **attrs)


def _split_conv(b: Builder, node, x: str, w: list[str], bias: str, attrs: dict) -> str:
    hint = node.name
    # onnxruntime's ConvInteger gets int8 inputs with uint8 weights wrong (1.32, measured), and right with
    # uint8 inputs and either weight type: shift x by 128 into uint8 (exact, via QuantizeLinear scale 1)
    x = b.round_to_grid(b.cast(x, np.float32, hint), 128, np.uint8, hint)
    x_zero = b.const(node.in_params.zero_point + 128, np.uint8, f"{hint}_x_zero")
    hi, lo = (b.cast(b.op("ConvInteger", [x, part, x_zero], hint, **attrs), np.float64, hint) for part in w)
    bias = b.op("Unsqueeze", [b.cast(bias, np.float64, hint), b.const([0, 2, 3], np.int64, f"{hint}_axes")], hint)
    acc = b.op("Add", [b.op("Add", [b.op("Mul", [hi, b.const(256.0, np.float64, f"{hint}_256")], hint), lo], hint),
                       bias], hint)
    real = b.op("Mul", [b.cast(acc, np.float32, hint), _channel_const(b, node.requant.float32, np.float32,
                                                                    f"{hint}_multiplier")], hint)
    return b.round_to_grid(real, node.out_params.zero_point, node.out_params.dtype, hint)


def _real_value(b: Builder, x: str, params, hint: str) -> str:
    """``float32(x - zp) * float32(scale)``: what DequantizeLinear computes, spelled Cast -> Sub -> Mul so that
    onnxruntime's full optimization level cannot fuse DequantizeLinear -> Add -> QuantizeLinear into its
    contrib QLinearAdd. That kernel rounds exact ties its own way: with power-of-two scales, where half the
    sums of an add can be ties, it put 44% of the outputs one step off the engine's (measured)."""
    centered = b.op("Sub", [b.cast(x, np.float32, hint), b.const(params.zero_point, np.float32, f"{hint}_zero")], hint)
    return b.op("Mul", [centered, b.const(params.scale, np.float32, f"{hint}_scale")], hint)


def add(b: Builder, node: QAdd, xs: list[str], weights: Weights) -> str:
    a = _real_value(b, xs[0], node.a_params, f"{node.name}_a")
    c = _real_value(b, xs[1], node.b_params, f"{node.name}_b")
    y = b.quantize(b.op("Add", [a, c], node.name), node.out_params, f"{node.name}_y")
    return b.clip(y, node.clamp, node.out_params, node.name)


def _taps_inside(n_out: int, size: int, kernel: int, stride: int, pad: int) -> np.ndarray:
    """Per output position along one axis: how many kernel taps fall inside the input."""
    start = np.arange(n_out) * stride - pad
    return np.minimum(start + kernel, size) - np.maximum(start, 0)


def average_pool(b: Builder, node: QAvgPool, xs: list[str], weights: Weights) -> str:
    _, channels, h, w = b.shapes[node.inputs[0]]
    g = node.geometry or PoolGeometry(kernel=(h, w))
    (kh, kw), (sh, sw), (pt, pl, _, _) = g.kernel, g.stride, g.pads
    ho, wo = g.output_hw(h, w)
    if g.count_include_pad:
        counts = np.float32(kh * kw)
    else:
        counts = np.outer(_taps_inside(ho, h, kh, sh, pt), _taps_inside(wo, w, kw, sw, pl)).astype(np.float32)
    params, hint = node.out_params, node.name
    ones = b.const(np.ones((channels, 1, kh, kw), np.int8), np.int8, f"{hint}_ones")
    total = b.op("ConvInteger", [xs[0], ones, b.const(params.zero_point, np.int8, f"{hint}_zero")], hint,
                 kernel_shape=[kh, kw], strides=[sh, sw], pads=list(g.pads), group=channels)
    mean = b.op("Div", [b.cast(total, np.float32, hint), b.const(counts, np.float32, f"{hint}_counts")], hint)
    return b.round_to_grid(mean, params.zero_point, params.dtype, hint)


def clamp(b: Builder, node: QClamp, xs: list[str], weights: Weights) -> str:
    return b.clip(xs[0], node.clamp, node.out_params, node.name)


def concat(b: Builder, node: QConcat, xs: list[str], weights: Weights) -> str:
    y = node.out_params
    parts = []
    for i, (x, p) in enumerate(zip(xs, node.in_params)):
        if not p.same_as(y):
            m = Requant.from_real(float(p.scale) / float(y.scale), p.bits > 8).float32[0]
            real = b.op("DequantizeLinear", [x, b.const(m, np.float32, f"{node.name}_m{i}"),
                                             b.const(p.zero_point, p.dtype, f"{node.name}_zero{i}")], node.name)
            x = b.round_to_grid(real, y.zero_point, y.dtype, node.name)
        parts.append(x)
    return b.op("Concat", parts, node.name, axis=node.axis)


LOWERINGS = {QConv: weighted, QLinear: weighted, QAdd: add, QMaxPool: max_pool, QAvgPool: average_pool,
             QReshape: reshape, QClamp: clamp, QConcat: concat}
