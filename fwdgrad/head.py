"""The classifier's exact gradient from what a forward pass already computed: no backward pass at all.

For a linear head ``z = W x + b`` under softmax cross-entropy, ``dL/dW = (softmax(z) - onehot(y))^T x / B``
and ``dL/db = mean(softmax(z) - onehot(y))``: the head's input features and the logits are all it needs,
and every forward call of a zeroth-order step produces both. So the head gets its true gradient for free,
averaged over the step's 2m perturbed passes, while ZO perturbs the other selected channels (whose
gradient does need what a forward pass cannot give). Everything is integer, as on an FPU-less MCU:

- softmax in Q.16 from the exponential table of the integer loss (``fwdgrad.loss``): ``p = e_i / sum e``;
- ``G = sum_passes (p - onehot)^T (x - zp_x)`` and ``g_b = sum (p - onehot)``, integer sums (int32 on a
  device for 8-bit features, int64 here);
- one step per layer: ``dW = -lr_t * G * s_x / (P * B * 2**16 * s_w[c])`` integer weight steps per output
  channel ``c``, stochastically rounded with the step's seed (the device holds the per-channel factor as a
  fixed-point multiplier, like a requantization scale), and likewise for the bias at ``s_x * s_w[c]``.

``lr_t`` is normalised like NLMS: ``head_lr * schedule(t) / (1 + mean ||x||^2)`` over the step's feature
vectors (the head's curvature is at most ``||x||^2 / 2``), so one default suits features of any scale.
Memory on the device: the head's input for the batch (what the planner counts) and the integer sums.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from quant.graph import QGraph
from quant.ops import QLinear, QReshape
from quant.tensor import QParams

from .loss import LOSS_FRACTION_BITS, _exp_table

# auto: exact-last where the model's structure allows it (fwdgrad.last_layer), else exact, else zo
HEAD_UPDATES = ("auto", "exact", "exact-last", "zo")


def final_linear(graph: QGraph) -> QLinear:
    """The QLinear whose output reaches the graph output through reshapes only (the classifier head)."""
    index = len(graph.nodes) - 1
    while index >= 0 and isinstance(graph.nodes[index], QReshape):
        index -= 1
    node = graph.nodes[index] if index >= 0 else None
    if not isinstance(node, QLinear):
        what = f"{node.op_type} node {node.name!r}" if node else "no node"
        raise ValueError(f"the model's logits come from {what}, not a linear layer: the exact head update needs a "
                         f"final Gemm/MatMul (use --head-update zo)")
    return node


def softmax_q16(logits_int: np.ndarray, params: QParams) -> np.ndarray:
    """Softmax of integer logits in Q.16, with integer operations and the loss's exponential table."""
    logits = logits_int.astype(np.int64)
    gaps = logits.max(axis=1, keepdims=True) - logits
    e = _exp_table(float(params.scale), 1 << params.bits)[gaps]
    return (e << LOSS_FRACTION_BITS) // e.sum(axis=1, keepdims=True)


@dataclass
class HeadGradient:
    """Integer gradient sums of the head over the passes of one step."""

    head: QLinear
    weight: np.ndarray = None  # (classes, features) int64
    bias: np.ndarray = None  # (classes,) int64
    square_sum: int = 0  # sum of ||x - zp||^2 over every feature vector seen, in integer steps
    vectors: int = 0
    passes: int = 0
    batch: int = 0

    def add(self, features_int: np.ndarray, logits_int: np.ndarray, labels: np.ndarray, params: QParams) -> None:
        """One forward pass's contribution: its head input and its logits."""
        x = features_int.reshape(len(features_int), -1).astype(np.int64) - self.head.in_params.zero_point
        error = softmax_q16(logits_int, params)
        error[np.arange(len(labels)), labels] -= 1 << LOSS_FRACTION_BITS
        weight, bias = error.T @ x, error.sum(axis=0)
        self.weight = weight if self.weight is None else self.weight + weight
        self.bias = bias if self.bias is None else self.bias + bias
        self.square_sum += int(np.sum(x * x))
        self.vectors += len(x)
        self.passes += 1
        self.batch = len(x)

    def step(self, lr: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(weight step, bias step) in integer units of the head's grids, stochastically rounded."""
        s_x = float(self.head.in_params.scale)
        s_w = self.head.w_params.scale.astype(np.float64).reshape(-1, 1)
        mean_square = self.square_sum * s_x * s_x / max(self.vectors, 1)
        rate = lr / (1.0 + mean_square) / (self.passes * self.batch * (1 << LOSS_FRACTION_BITS))
        weight = -rate * s_x / s_w * self.weight
        bias = -rate / (s_x * s_w[:, 0]) * self.bias
        return _stochastic(weight, rng), _stochastic(bias, rng)


def _stochastic(values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.floor(values + rng.random(values.shape)).astype(np.int64)


def apply_head_step(weights: dict, head: QLinear, gradient: HeadGradient, lr: float, step_seed: int,
                    bias: bool = True) -> None:
    """Move the head's integers in ``weights`` (in place) by the gradient's step, saturated to their grids
    (its bias too, unless ``bias`` is false: ``train_bias = false``)."""
    rng = np.random.default_rng([step_seed, 0x4EAD])
    dw, db = gradient.step(lr, rng)
    w = weights[head.weight_key].astype(np.int64) + dw
    weights[head.weight_key] = np.clip(w, -head.w_params.qmax, head.w_params.qmax).astype(head.weight.dtype)
    if bias:
        limit = np.iinfo(head.bias.dtype).max
        b = weights[head.bias_key].astype(np.int64) + db
        weights[head.bias_key] = np.clip(b, -limit, limit).astype(head.bias.dtype)
