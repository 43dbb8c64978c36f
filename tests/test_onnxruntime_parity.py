"""In half_even mode our integers are onnxruntime's: QLinearConv / QLinearMatMul built from our tensors."""
import numpy as np
import onnx
import onnxruntime as ort
from hypothesis import given, settings, strategies as st
from onnx import TensorProto, helper, numpy_helper

from quant.backends import get_backend
from quant.ops import QConv, QLinear
from quant.tensor import QParams, weight_params, quantize

from test_kernels import conv_cases


def run_single_node(node, inputs: dict, initializers: list, out_shape) -> np.ndarray:
    graph = helper.make_graph(
        [node], "parity",
        [helper.make_tensor_value_info(name, TensorProto.INT8, value.shape) for name, value in inputs.items()],
        [helper.make_tensor_value_info(node.output[0], TensorProto.INT8, out_shape)],
        initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, inputs)[0]


def quantized_layer(rng, w_float, x_shape):
    x_params = QParams(rng.uniform(0.005, 0.05), int(rng.integers(-128, 128)), 8)
    out_params = QParams(rng.uniform(0.02, 0.5), int(rng.integers(-128, 128)), 8)
    w_params = weight_params(w_float, 8, axis=0)
    x = rng.integers(-128, 128, x_shape).astype(np.int8)
    bias = rng.integers(-5000, 5000, w_float.shape[0]).astype(np.int32)
    return x, x_params, quantize(w_float, w_params), w_params, bias, out_params


def scalar(name, value, dtype=np.float32):
    return numpy_helper.from_array(np.array(value, dtype=dtype), name)


@settings(max_examples=40, deadline=None)
@given(conv_cases(), st.integers(0, 2 ** 32 - 1))
def test_qlinearconv_gives_our_integers(case, seed):
    x_shape, w_shape, geometry = case
    rng = np.random.default_rng(seed)
    x, x_params, w, w_params, bias, out_params = quantized_layer(rng, rng.normal(0, 1, w_shape).astype(np.float32), x_shape)
    node = QConv("conv", ["x"], "y", out_params, in_params=x_params, weight=w, w_params=w_params, bias=bias,
                 geometry=geometry)
    ours = node.run(get_backend("numba"), [x], "half_even")
    onnx_node = helper.make_node(
        "QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz", "b"], ["y"],
        strides=list(geometry.stride), pads=list(geometry.pads), dilations=list(geometry.dilation),
        group=geometry.groups, kernel_shape=list(w_shape[2:]))
    inits = [scalar("xs", x_params.scale), scalar("xz", x_params.zero_point, np.int8), numpy_helper.from_array(w, "w"),
             numpy_helper.from_array(w_params.scale, "ws"), numpy_helper.from_array(np.zeros(w_shape[0], np.int8), "wz"),
             scalar("ys", out_params.scale), scalar("yz", out_params.zero_point, np.int8),
             numpy_helper.from_array(bias, "b")]
    theirs = run_single_node(onnx_node, {"x": x}, inits, ours.shape)
    assert np.array_equal(ours, theirs)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 8), st.integers(1, 1500), st.integers(1, 12), st.integers(0, 2 ** 32 - 1))
def test_qlinearmatmul_gives_our_integers(n, k, o, seed):
    """QLinearMatMul has no bias input: compare the bias-free linear layer."""
    rng = np.random.default_rng(seed)
    x, x_params, w, w_params, _, out_params = quantized_layer(rng, rng.normal(0, 1, (o, k)).astype(np.float32), (n, k))
    node = QLinear("fc", ["x"], "y", out_params, in_params=x_params, weight=w, w_params=w_params,
                   bias=np.zeros(o, np.int32))
    ours = node.run(get_backend("numba"), [x], "half_even")
    onnx_node = helper.make_node("QLinearMatMul", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["y"])
    inits = [scalar("xs", x_params.scale), scalar("xz", x_params.zero_point, np.int8),
             numpy_helper.from_array(np.ascontiguousarray(w.T), "w"), numpy_helper.from_array(w_params.scale, "ws"),
             numpy_helper.from_array(np.zeros(o, np.int8), "wz"), scalar("ys", out_params.scale),
             scalar("yz", out_params.zero_point, np.int8)]
    theirs = run_single_node(onnx_node, {"x": x}, inits, ours.shape)
    assert np.array_equal(ours, theirs)


def test_half_away_differs_from_onnxruntime_only_on_ties():
    """The TFLite-style mode is a different, documented arithmetic: never more than one step away."""
    rng = np.random.default_rng(0)
    x, x_params, w, w_params, bias, out_params = quantized_layer(rng, rng.normal(0, 1, (16, 64)).astype(np.float32), (256, 64))
    node = QLinear("fc", ["x"], "y", out_params, in_params=x_params, weight=w, w_params=w_params, bias=bias)
    even = node.run(get_backend("numpy"), [x], "half_even").astype(int)
    away = node.run(get_backend("numpy"), [x], "half_away").astype(int)
    assert np.abs(even - away).max() <= 1
