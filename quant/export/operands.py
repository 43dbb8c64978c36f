"""Weights and biases of a layer as ONNX tensors: initializers holding the integers, or graph inputs.

Graph inputs are what the onnxruntime backend uses for the layers a trainer varies: one session then serves
every perturbed and updated weight set, the way a device would keep re-running its deployed inference graph
with new weights; the layers it leaves alone stay initializers, which onnxruntime prepacks once.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..ops import QLinear, WeightedNode

from .builder import Builder


def varies(node: WeightedNode, keys: frozenset | None) -> bool:
    """Whether ``node``'s weights are among ``keys`` (weight or bias key; every layer's when ``keys`` is
    None): the layers a trainer changes from call to call, which an exported segment takes as inputs."""
    return keys is None or node.weight_key in keys or node.bias_key in keys


@dataclass
class Weights:
    """Where the weights of the exported graph come from: ``replacements`` (key -> integers, as the trainer
    keeps them) over the graph's stored ones, as initializers, or as graph inputs: with ``as_inputs``, the
    layers whose weight or bias key is in ``input_keys`` (every layer when it is None)."""

    replacements: dict = field(default_factory=dict)
    as_inputs: bool = False
    input_keys: frozenset | None = None

    def tensors(self, b: Builder, node: WeightedNode) -> tuple[str | np.ndarray, str]:
        """(weight, bias): the weight as an array to lay out (initializers) or a graph input name; the
        bias as an ONNX name either way, in its stored integer type."""
        if self.as_inputs and varies(node, self.input_keys):
            return (b.input(node.weight_key, node.weight.dtype, node.weight.shape),
                    b.input(node.bias_key, node.bias.dtype, node.bias.shape))
        weight, bias = node.weights_from(self.replacements)
        bias = b.const(np.asarray(bias, node.bias.dtype), node.bias.dtype, f"{node.name}_bias")
        b.record(node.bias_key, [bias])
        return np.asarray(weight, node.weight.dtype), bias


def conv_weight(b: Builder, node: WeightedNode, weight: str | np.ndarray) -> list[str]:
    """The weight in convolution layout (a linear layer's (out, in) becomes (out, in, 1, 1)) as 8-bit
    operands of QLinearConv/ConvInteger: ``[w]`` for 8-bit weights; ``[hi, lo]`` with
    ``w = 256 * hi + lo`` (hi int8, lo uint8) for 16-bit ones, since no ONNX integer convolution takes
    16-bit operands."""
    hint = node.name
    if isinstance(weight, np.ndarray):
        w = weight.reshape(weight.shape + (1, 1)) if isinstance(node, QLinear) else weight
        if node.w_params.bits == 8:
            names = [b.const(w, np.int8, f"{hint}_weight")]
        else:
            names = [b.const(w >> 8, np.int8, f"{hint}_weight_hi"), b.const(w & 0xFF, np.uint8, f"{hint}_weight_lo")]
        b.record(node.weight_key, names, "direct" if len(names) == 1 else "hi_lo")
        return names
    if isinstance(node, QLinear):
        weight = b.op("Unsqueeze", [weight, b.const([2, 3], np.int64, f"{hint}_axes")], hint)
    if node.w_params.bits == 8:
        return [weight]
    # the same split on a graph input, in int32: u = w + 32768 >= 0, so Div truncates as floor
    u = b.op("Add", [b.cast(weight, np.int32, hint), b.const(32768, np.int32, f"{hint}_offset")], hint)
    q = b.op("Div", [u, b.const(256, np.int32, f"{hint}_256")], hint)
    hi = b.op("Sub", [q, b.const(128, np.int32, f"{hint}_128")], hint)
    lo = b.op("Sub", [u, b.op("Mul", [q, b.const(256, np.int32, f"{hint}_256")], hint)], hint)
    return [b.cast(hi, np.int8, hint), b.cast(lo, np.uint8, hint)]
