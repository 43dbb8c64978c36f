"""The exact gradient of the last pointwise layer before the global pool, from the head's own error signal.

When the head reads ``mean_p clamp(W_L a_p + b_L)`` (a 1x1 convolution ``L``, its fused ReLU/ReLU6, a global
average pool, reshapes), the error the exact head update already has, ``e = softmax - onehot``, gives L's
gradient in one local step: ``dL/dfeature = e W_head``, spread evenly over the ``P`` pooled positions and
masked where L's clamp is saturated, then correlated with L's own input:

    dW_L[o, i] = sum_{b, p} e W_head[b, o] / P * inside[b, o, p] * a[b, i, p] / B.

This is one step back through the head's weights (the last-layer backprop of ElasticZO), not a backward
pass: nothing before L is differentiated, no activation before L's input is kept, and every operand comes
from the forward call (L's input and output, the logits). On the device it is two integer products (the
error times the head's integer weights, with one fixed-point factor per class, then a correlation with
L's input) plus a per-channel fixed-point factor for the step; here the same integers, with the factors
in float64. Only L's selected weights move (its other channels stay as they are); it is averaged over a
step's forward calls like the head's, with an NLMS-normalised step (``fwdgrad.head``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from quant.graph import QGraph
from quant.ops import QAvgPool, QConv, QLinear, QReshape
from quant.tensor import QParams

from .head import softmax_q16
from .loss import LOSS_FRACTION_BITS


@dataclass(frozen=True)
class LastLayer:
    """L (its ReLU/ReLU6 fused as its clamp) and the first node after it (the global pool; then reshapes)."""

    node: QConv
    after: str  # the first node after L


def find_last_layer(graph: QGraph, head: QLinear) -> LastLayer:
    """The 1x1 convolution whose (fused-clamp) output the head reads through a global pool and reshapes,
    or a ValueError that says what is in the way."""
    producers = {n.output: n for n in graph.nodes}
    consumers = {}
    for n in graph.nodes:
        for t in n.inputs:
            consumers[t] = consumers.get(t, 0) + 1
    node = producers.get(head.inputs[0])
    pooled = False
    while node is not None and isinstance(node, (QReshape, QAvgPool)):
        if isinstance(node, QAvgPool):
            if node.geometry is not None or pooled:
                break
            pooled = True
        node = producers.get(node.inputs[0])
        if node is not None and consumers.get(node.output, 0) != 1:
            break
    ok = (pooled and isinstance(node, QConv) and node.weight.shape[2:] == (1, 1) and node.geometry.groups == 1
          and node.geometry.stride == (1, 1) and node.geometry.pads == (0, 0, 0, 0)
          and consumers.get(node.output, 0) == 1)
    if not ok:
        what = f"{node.op_type} node {node.name!r}" if node is not None else "the graph input"
        raise ValueError(f"--head-update exact-last needs the head to read a 1x1 convolution through a global "
                         f"average pool only; this model's head reads {what} that way: use --head-update exact")
    return LastLayer(node, graph.nodes[graph.index(node.name) + 1].name)


@dataclass
class LastLayerGradient:
    """Integer sums of L's gradient over the passes of one step (selected input channels only)."""

    layer: LastLayer
    head: QLinear
    channels: np.ndarray  # L's selected input channels
    weight: np.ndarray = None  # (out, selected) int64 / float64
    bias: np.ndarray = None
    square_sum: float = 0.0
    vectors: int = 0
    passes: int = 0
    batch: int = 0
    positions: int = 1
    ref: float = 1.0  # the largest head weight scale: the per-class factors are relative to it

    def add(self, a_int: np.ndarray, y_int: np.ndarray, logits_int: np.ndarray, labels: np.ndarray,
            params: QParams) -> None:
        node, head = self.layer.node, self.head
        error = softmax_q16(logits_int, params)
        error[np.arange(len(labels)), labels] -= 1 << LOSS_FRACTION_BITS
        s_head = head.w_params.scale.astype(np.float64)
        ref = float(s_head.max())
        scaled = np.rint(error * (s_head / ref)).astype(np.int64)  # one fixed-point factor per class
        dfeature = scaled @ head.weight.astype(np.int64)  # (B, out of L), units ref / 2**16
        lo, hi = node.clamp
        inside = (y_int > lo) & (y_int < hi)  # the clamp passes the gradient only strictly inside
        g = np.where(inside, dfeature[:, :, None, None], 0).reshape(len(a_int), node.weight.shape[0], -1)
        a = a_int[:, self.channels].astype(np.int64).reshape(len(a_int), len(self.channels), -1) \
            - node.in_params.zero_point
        weight = np.einsum("bop,bip->oi", g.astype(np.float64), a.astype(np.float64))  # exact below 2**53
        bias = g.sum(axis=(0, 2)).astype(np.float64)
        self.weight = weight if self.weight is None else self.weight + weight
        self.bias = bias if self.bias is None else self.bias + bias
        self.square_sum += float(np.sum(a.astype(np.float64) ** 2))
        self.vectors += a.shape[0] * a.shape[2]
        self.passes += 1
        self.batch = len(a_int)
        self.positions = a.shape[2]
        self.ref = ref

    def step(self, lr: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(weight step on the selected channels, bias step), integer units of L's grids, stochastically rounded."""
        node = self.layer.node
        s_a = float(node.in_params.scale)
        s_w = node.w_params.scale.astype(np.float64).reshape(-1, 1)
        mean_square = self.square_sum * s_a * s_a / max(self.vectors, 1)
        rate = lr / (1.0 + mean_square) * self.ref / ((1 << LOSS_FRACTION_BITS) * self.positions * self.passes
                                                      * self.batch)
        weight = -rate * s_a / s_w * self.weight
        bias = -rate / (s_a * s_w[:, 0]) * self.bias
        return (np.floor(weight + rng.random(weight.shape)).astype(np.int64),
                np.floor(bias + rng.random(bias.shape)).astype(np.int64))


def apply_last_layer_step(weights: dict, gradient: LastLayerGradient, lr: float, step_seed: int,
                          bias: bool = True) -> None:
    """Move L's selected weights (and bias) in ``weights`` in place, saturated to their grids."""
    node = gradient.layer.node
    dw, db = gradient.step(lr, np.random.default_rng([step_seed, 0x1A57]))
    w = weights[node.weight_key].astype(np.int64)
    w[:, gradient.channels, 0, 0] += dw
    weights[node.weight_key] = np.clip(w, -node.w_params.qmax, node.w_params.qmax).astype(node.weight.dtype)
    if bias:
        limit = np.iinfo(node.bias.dtype).max
        b = weights[node.bias_key].astype(np.int64) + db
        weights[node.bias_key] = np.clip(b, -limit, limit).astype(node.bias.dtype)
