"""The exact gradient of the last pointwise layer before the global pool, from the head's own error signal.

When the head reads ``mean_p f(clamp(W_L a + b_L))_p`` (a 1x1 convolution ``L``, its fused clamp, then a chain
``f`` of clamps, residual adds and max pools, a global average pool and reshapes), the error the exact head
update already has, ``e = softmax - onehot``, gives L's gradient in one local step: ``dL/dfeature =
e W_head``, spread evenly over the ``P`` pooled positions, routed back through the chain (a max pool sends
each window's gradient to its first maximum; an add passes it to L's branch unchanged, in real units; every
clamp masks where it saturates) and masked where L's clamp saturates, then correlated with L's own input:

    dW_L[o, i] = sum_{b, p} e W_head[b, o] / P * route[b, o, p] * a[b, i, p] / B,

``route`` counting how many pooled positions reach L's output position ``p`` (0 or 1 unless pools overlap).
This is one step back through the head's weights (the last-layer backprop of ElasticZO), not a backward
pass: nothing before L is differentiated, no activation before L's input is kept, and every operand comes
from the forward call (L's input and output, the chain's outputs, the logits). On the device it is two
integer products (the error times the head's integer weights, with one fixed-point factor per class, then
a correlation with L's input) plus a per-channel fixed-point factor for the step; here the same integers,
with the factors in float64. Only L's selected weights move (its other channels stay as they are); it is
averaged over a step's forward calls like the head's, with an NLMS-normalised step (``fwdgrad.head``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from threadpoolctl import ThreadpoolController

from quant.backends import get_backend
from quant.graph import QGraph
from quant.ops import QAdd, QAvgPool, QClamp, QConv, QLinear, QMaxPool, QReshape
from quant.ops.base import Node
from quant.tensor import QParams

from .head import softmax_q16
from .loss import LOSS_FRACTION_BITS

_BLAS = ThreadpoolController()  # numpy's BLAS, held to one thread where it runs beside numba's

CHAIN_OPS = (QClamp, QAdd, QMaxPool)  # what may stand between L and the global pool


@dataclass(frozen=True)
class LastLayer:
    """L (its clamp fused), the first node after it in the graph, and the chain from L's output to the global
    pool (L's consumer first, the pool last)."""

    node: QConv
    after: str  # the first node after L
    chain: tuple[Node, ...]  # never empty: it ends with the global pool
    rounding: str  # the graph's, to recompute the chain's integers


def _is_pointwise(node) -> bool:
    return (isinstance(node, QConv) and node.weight.shape[2:] == (1, 1) and node.geometry.groups == 1
            and node.geometry.stride == (1, 1) and node.geometry.pads == (0, 0, 0, 0))


def find_last_layer(graph: QGraph, head: QLinear) -> LastLayer:
    """The 1x1 convolution whose output the head reads through clamps, residual adds, max pools, one global
    average pool and reshapes, each read by the next alone; or a ValueError that says what is in the way."""
    producers = {n.output: n for n in graph.nodes}
    consumers = {}
    for n in graph.nodes:
        for t in n.inputs:
            consumers[t] = consumers.get(t, 0) + 1

    def alone(n) -> bool:  # read by the next node only: all of L's gradient flows down the chain
        return n is not None and consumers.get(n.output, 0) == 1

    node = producers.get(head.inputs[0])
    while isinstance(node, QReshape) and alone(node):
        node = producers.get(node.inputs[0])
    chain = []
    if isinstance(node, QAvgPool) and node.geometry is None and alone(node):
        chain.append(node)
        node = producers.get(node.inputs[0])
        while isinstance(node, CHAIN_OPS) and alone(node):
            chain.append(node)
            sources = [producers.get(t) for t in node.inputs]
            node = next((n for n in sources if _is_pointwise(n) and alone(n)), sources[-1]) \
                if isinstance(node, QAdd) else sources[0]
    if not (chain and _is_pointwise(node) and alone(node)):
        what = f"{node.op_type} node {node.name!r}" if node is not None else "the graph input"
        raise ValueError(f"--head-update exact-last needs the head to read a 1x1 convolution through a global "
                         f"average pool (and clamps, residual adds, max pools); this model's head reads {what} "
                         f"that way: use --head-update exact")
    return LastLayer(node, graph.nodes[graph.index(node.name) + 1].name, tuple(reversed(chain)), graph.rounding)


def _inside(y: np.ndarray, clamp: tuple[int, int]) -> np.ndarray:
    lo, hi = clamp
    return (y > lo) & (y < hi)  # a clamp passes the gradient only strictly inside


def _route_max(x: np.ndarray, y: np.ndarray, route: np.ndarray, node: QMaxPool) -> np.ndarray:
    """``route`` (at the pool's output) sent to each window's first maximum in the pool's input ``x``."""
    (kh, kw), (sh, sw), (pt, pl, pb, pr) = node.geometry.kernel, node.geometry.stride, node.geometry.pads
    ho, wo = y.shape[2:]
    pads = ((0, 0), (0, 0), (pt, pb), (pl, pr))
    padded, real = np.pad(x, pads), np.pad(np.ones(x.shape, bool), pads)
    routed, claimed = np.zeros(padded.shape, np.int64), np.zeros(y.shape, bool)
    for i in range(kh):
        for j in range(kw):
            view = (slice(None), slice(None), slice(i, i + sh * (ho - 1) + 1, sh), slice(j, j + sw * (wo - 1) + 1, sw))
            hit = (padded[view] == y) & real[view] & ~claimed
            claimed |= hit
            routed[view] += np.where(hit, route, 0)
    return routed[:, :, pt:pt + x.shape[2], pl:pl + x.shape[3]]


def routing(layer: LastLayer, tensors: dict, y_int: np.ndarray) -> tuple[np.ndarray, int]:
    """(route over L's output positions, pooled positions P): the chain's integers are recomputed from L's
    output ``y_int`` and the tensors live at L (an add's other branch), elementwise work next to L's own."""
    kernels, env = get_backend("numba"), dict(tensors) | {layer.node.output: y_int}
    for n in layer.chain[:-1]:
        env[n.output] = n.run(kernels, [env[t] for t in n.inputs], layer.rounding)
    pooled = env[layer.chain[-1].inputs[0]]
    route = np.ones(pooled.shape, np.int64)
    for n in reversed(layer.chain[:-1]):
        if isinstance(n, QMaxPool):
            route = _route_max(env[n.inputs[0]], env[n.output], route, n)
        else:
            route = route * _inside(env[n.output], n.clamp)
    return route * _inside(y_int, layer.node.clamp), pooled.shape[2] * pooled.shape[3]


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
            params: QParams, tensors: dict | None = None) -> None:
        """One forward call's share: L's input ``a_int`` and output ``y_int``, the logits, and ``tensors``
        (what is live at L: the chain's other operands)."""
        node, head = self.layer.node, self.head
        error = softmax_q16(logits_int, params)
        error[np.arange(len(labels)), labels] -= 1 << LOSS_FRACTION_BITS
        s_head = head.w_params.scale.astype(np.float64)
        ref = float(s_head.max())
        scaled = np.rint(error * (s_head / ref)).astype(np.int64)  # one fixed-point factor per class
        dfeature = scaled @ head.weight.astype(np.int64)  # (B, out of L), units ref / 2**16
        route, pooled = routing(self.layer, tensors or {}, y_int)
        g = (route * dfeature[:, :, None, None]).reshape(len(a_int), node.weight.shape[0], -1)
        a = a_int[:, self.channels].astype(np.int64).reshape(len(a_int), len(self.channels), -1) \
            - node.in_params.zero_point
        # a BLAS product over batch and positions (integer-valued float64 sums are exact below 2**53, in any
        # order), on one thread: numpy's BLAS threads would spin on after it, against the engine's numba threads
        # (measured: they made the next kernels twice as slow)
        with _BLAS.limit(limits=1, user_api="blas"):
            weight = np.tensordot(g.astype(np.float64), a.astype(np.float64), axes=([0, 2], [0, 2]))
        bias = g.sum(axis=(0, 2)).astype(np.float64)
        self.weight = weight if self.weight is None else self.weight + weight
        self.bias = bias if self.bias is None else self.bias + bias
        self.square_sum += float(np.sum(a.astype(np.float64) ** 2))
        self.vectors += a.shape[0] * a.shape[2]
        self.passes += 1
        self.batch = len(a_int)
        self.positions = pooled
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
