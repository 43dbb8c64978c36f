"""The ONNX graph under construction: unique names, constants, and the few patterns both formats share."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..tensor import QParams

ONNX_TYPES = {np.dtype(t): p for t, p in ((np.int8, TensorProto.INT8), (np.uint8, TensorProto.UINT8),
                                            (np.int16, TensorProto.INT16), (np.int32, TensorProto.INT32),
                                            (np.int64, TensorProto.INT64), (np.float32, TensorProto.FLOAT),
                                            (np.float64, TensorProto.DOUBLE))}


class ExportError(ValueError):
    """A graph or node the chosen format cannot express exactly (the message names the node and what to do)."""


class Builder:
    """Collects nodes, initializers and graph inputs; every generated name is unique and starts with the
    engine node it came from (``<node>/<op>/<n>``), so a runtime error in the file points back at our node."""

    def __init__(self, shapes: dict[str, tuple]):
        self.shapes = shapes  # engine tensor -> shape at batch 1 (pool windows depend on the input size)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.sources: dict[str, dict] = {}  # weight/bias key -> the initializers that hold it (embedded.py)
        self._count = 0

    def _name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}/{self._count}"

    def const(self, value, dtype, hint: str) -> str:
        name = self._name(f"{hint}_const")
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def record(self, key: str, names: list[str], recipe: str = "direct") -> None:
        """Note which initializers hold the integers of ``key`` (``direct``: the array itself, reshaped;
        ``hi_lo``: 16-bit weights as ``256 * hi + lo``), so the graph can be rebuilt from the file."""
        self.sources[key] = {"initializers": list(names), "recipe": recipe}

    def input(self, name: str, dtype, shape) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, ONNX_TYPES[np.dtype(dtype)], list(shape)))
        return name

    def op(self, op_type: str, inputs: list[str], hint: str, output: str | None = None, **attrs) -> str:
        output = output or self._name(f"{hint}_{op_type}")
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=self._name(f"{hint}/{op_type}"), **attrs))
        return output

    def cast(self, x: str, dtype, hint: str) -> str:
        return self.op("Cast", [x], hint, to=ONNX_TYPES[np.dtype(dtype)])

    def scale_zero(self, params: QParams, hint: str) -> tuple[str, str]:
        """The (scale, zero point) inputs of QuantizeLinear/DequantizeLinear for a tensor's params."""
        zero = np.full(params.scale.shape, params.zero_point, params.dtype)
        return self.const(params.scale, np.float32, f"{hint}_scale"), self.const(zero, params.dtype, f"{hint}_zero")

    def quantize(self, x: str, params: QParams, hint: str, output: str | None = None) -> str:
        return self.op("QuantizeLinear", [x, *self.scale_zero(params, hint)], hint, output)

    def dequantize(self, x: str, params: QParams, hint: str, output: str | None = None) -> str:
        axis = {} if params.axis is None or params.scale.ndim == 0 else {"axis": params.axis}
        return self.op("DequantizeLinear", [x, *self.scale_zero(params, hint)], hint, output, **axis)

    def round_to_grid(self, real: str, zero_point: int, dtype, hint: str) -> str:
        """``saturate(rint(real) + zero_point)`` in ``dtype``: QuantizeLinear with scale 1, whose division
        by 1 is exact, so the only rounding is QuantizeLinear's round-half-to-even (the engine's rint)."""
        return self.op("QuantizeLinear", [real, self.const(1.0, np.float32, f"{hint}_one"),
                                          self.const(zero_point, dtype, f"{hint}_zero")], hint)

    def clip(self, x: str, clamp: tuple[int, int], params: QParams, hint: str) -> str:
        """Integer Clip for a fused ReLU/ReLU6 clamp (nothing when the clamp is the full range)."""
        lo, hi = clamp
        if (lo, hi) == (params.qmin, params.qmax):
            return x
        bounds = [self.const(v, params.dtype, f"{hint}_bound") for v in (lo, hi)]
        return self.op("Clip", [x, *bounds], hint)
