"""Node perturbation: ZO on the selected layers' outputs instead of their weights (``zo_params = "outputs"``).

Pair ``j`` adds ``+-eps r_j`` integer steps (``r`` Rademacher, one entry per output element of the selected
output channels, ``eps`` in 8-bit steps of the output grid) to one selected layer's output; the layers take
turns, pair by pair and step by step. The two passes' *per-sample* losses give, for each sample ``b`` on its
own, ``g_b = (L_b(+) - L_b(-)) / (2 eps) r_j[b]``, an unbiased estimate of ``dL_b / dy_b`` (averaged over the
layer's pairs). The weight gradient is then one local correlation with the layer's own input, as
the exact head's is: for ``acc = W (x - zp) + b`` and ``y = clamp(rint(M_o acc) + zp_y)``,

    dL/dW[o, c, k] = M_o sum_{b, p} g[b, o, p] inside[b, o, p] (x - zp)[b, c, p + k] / B.

Why try it (Flower and Jabri 1993; Dalm et al. 2023 "Effective learning with node perturbation"): every sample
yields its own estimate, where a weight perturbation gets one number per pair for the whole batch, and the
dimension probed per sample is the layer's output, not its weights. A TraDy selection names input channels,
so a dense layer's outputs are all perturbed; a depthwise layer's only on its selected channels. What it
costs: a clean pass (the inputs and clamp masks the correlation needs, and 32-bit output sums; a device
goes one sample at a time, so it keeps them for one sample: the planner counts them), then 2m passes from
the first selected layer, and one correlation per layer per sample. The update is SGD on that gradient in
the ``space`` ZO's expected step takes: ``-lr units**2 dL/d(integers)``, stochastically rounded
(``fwdgrad.update``). Unlike a weight perturbation it is not seed-replayable (the correlation needs the
device's inputs): a fleet refuses it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from quant.ops import QConv, QLinear

from .perturb import node_of

OUTPUTS = "outputs"  # the zo_params value that selects node perturbation


def output_step(node, eps: float) -> int:
    """``eps`` 8-bit steps of the node's output grid, as whole integer steps."""
    return int(round(eps * (1 << max(0, node.out_params.bits - 8))))


def noise(seed: int, index: int, shape: tuple) -> np.ndarray:
    """The Rademacher signs (int8) of pair ``seed`` on the step's ``index``-th perturbed layer."""
    return np.random.default_rng([seed, 0x40DE, index]).integers(0, 2, shape, dtype=np.int8) * 2 - 1


def multiplier(node) -> np.ndarray:
    """``M_o = s_x s_w[o] / s_y`` per output channel: d(output steps) / d(accumulator)."""
    return (float(node.in_params.scale) * node.w_params.scale.astype(np.float64).reshape(-1)
            / float(node.out_params.scale))


def weight_gradient(node, x_int: np.ndarray, g_acc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(dL/dW, dL/db) in the layer's integer units from ``g_acc = dL/d(accumulator)`` and the input integers."""
    x = x_int.astype(np.float64) - float(node.in_params.zero_point)
    if isinstance(node, QLinear):
        x = x.reshape(len(x), -1)
        return g_acc.T @ x, g_acc.sum(axis=0)
    if not isinstance(node, QConv):
        raise TypeError(f"node perturbation trains Conv and Linear layers, not {node.op_type} {node.name!r}")
    geometry, (o, cg, kh, kw) = node.geometry, node.weight.shape
    (sh, sw), (dh, dw), (pt, pl, pb, pr), groups = geometry.stride, geometry.dilation, geometry.pads, geometry.groups
    b, _, ho, wo = g_acc.shape
    x = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))  # padding reads the zero point: 0 after the shift
    g = g_acc.reshape(b, groups, o // groups, ho * wo)
    dw_ = np.empty((groups, o // groups, cg, kh, kw))
    for i in range(kh):
        for j in range(kw):
            patch = x[:, :, i * dh:i * dh + sh * (ho - 1) + 1:sh, j * dw:j * dw + sw * (wo - 1) + 1:sw]
            dw_[..., i, j] = np.einsum("bgop,bgcp->goc", g, patch.reshape(b, groups, cg, ho * wo), optimize=True)
    return dw_.reshape(o, cg, kh, kw), g_acc.sum(axis=(0, 2, 3))


@dataclass
class NodeEstimate:
    """The step's gradients, per weight key, in integer units (full arrays; the update takes the masks)."""

    gradients: dict[str, np.ndarray]
    losses: list[float]
    forward_calls: int

    def steps(self, masks: dict, units: dict, lr: float) -> dict[str, np.ndarray]:
        """SGD steps on the masked entries, in integer steps, in the space of ``units``."""
        return {k: lr * units[k] ** 2 * self.gradients[k][m] for k, m in masks.items() if k in self.gradients}


def estimate(run_pass, layers: list, clean: dict, channels: dict, eps: float, seeds: list[int],
             batch: int, bias: bool, first: int = 0) -> NodeEstimate:
    """Node perturbation's estimate. ``run_pass(noise) -> per-sample losses`` runs one pass with ``noise`` (node
    name -> integers added to its output); ``clean[name] = (input, output)`` integers of the clean pass;
    ``channels[name]``: the output channels the selection trains (only they are perturbed: the others' noise
    would add variance and no gradient). Pair ``j`` perturbs only layer ``(first + j) mod L``: each layer's
    estimate then carries its own output's dimension alone, not every selected layer's (with all layers
    perturbed at once, a head of 10 logits drowns in the noise of the convs' thousands of outputs)."""
    sums = {n.name: np.zeros(clean[n.name][1].shape) for n in layers}
    losses = []
    counts = dict.fromkeys(sums, 0)
    for j, seed in enumerate(seeds):
        k = (first + j) % len(layers)
        layer = layers[k]
        signs = noise(seed, k, clean[layer.name][1].shape).astype(np.int32) * channel_axis(channels[layer.name],
                                                                                     clean[layer.name][1])
        step = output_step(layer, eps)
        plus, minus = run_pass({layer.name: signs * step}), run_pass({layer.name: -signs * step})
        losses += [float(np.mean(plus)), float(np.mean(minus))]
        share = (plus - minus) / (2 * step * batch)  # the batch mean's derivative
        sums[layer.name] += share.reshape((-1,) + (1,) * (signs.ndim - 1)) * signs
        counts[layer.name] += 1
    gradients = {}
    for n in layers:
        if not counts[n.name]:
            continue
        x, y = clean[n.name]
        lo, hi = n.clamp
        m_o = multiplier(n).reshape((1, -1) + (1,) * (y.ndim - 2))
        g_acc = sums[n.name] / counts[n.name] * ((y > lo) & (y < hi)) * m_o
        dw, db = weight_gradient(n, x, g_acc)
        gradients[n.weight_key] = dw
        if bias:
            gradients[n.bias_key] = db
    return NodeEstimate(gradients, losses, 1 + 2 * len(seeds))


def channel_axis(selected: np.ndarray, output: np.ndarray) -> np.ndarray:
    """The per-channel 0/1 ``selected`` shaped to broadcast over a layer's (N, C, ...) output."""
    return selected.astype(np.int8).reshape((1, -1) + (1,) * (output.ndim - 2))


def perturbed_layers(graph, masks: dict) -> tuple[list, dict]:
    """The layers whose outputs a step perturbs, in graph order, and each one's selected output channels."""
    channels = {}
    for key, mask in masks.items():
        name = node_of(graph, key).name
        selected = mask.reshape(len(mask), -1).any(axis=1)
        channels[name] = channels[name] | selected if name in channels else selected
    return [n for n in graph.nodes if n.name in channels], channels
