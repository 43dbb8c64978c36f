"""Seeded perturbations of the selected channels, in the weights' integer grid, never stored.

A perturbation is fully described by its seed: ``z`` (Gaussian or Rademacher) is drawn for the selected
weights in a canonical order (layers in graph order, channels sorted, weights in C order) and scaled to
``delta = rint(eps * unit * z)`` integers, where ``unit = 2**(bits - 8)`` so that ``eps`` means the same
real step for 8- and 16-bit weights (it is counted in 8-bit weight steps). The update regenerates the same
integers from the same seed, so memory holds seeds, not vectors (MeZO's trick).

Two ways to count ``eps`` (the ``space`` setting):
- ``steps``: in 8-bit weight steps of each channel's own scale, a relative perturbation (a layer with larger
  weights moves further in real terms); biases (int32 at scale ``s_x * s_w``) move by the output change of
  one weight step on an input at half the activation range, ``2**(a_bits - 1)`` integer input steps;
- ``real``: in real weight units, the same for every layer, as MeZO perturbs float weights, converted to
  each channel's integer grid (``1 / s_w`` integer steps per unit; ``1 / (s_x s_w)`` for biases). SGD in
  this space is plain SGD on the real weights, which a backprop learning rate transfers to; in ``steps``
  space it is preconditioned by ``s_w**2``, which spreads effective learning rates across layers by the
  square of their weight scales.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .channels import Selection, channel_mask

DISTRIBUTIONS = ("gaussian", "rademacher")
SPACES = ("steps", "real")


def node_of(graph, key: str):
    return graph.node(key.removesuffix(".weight").removesuffix(".bias"))


def step_unit(graph, key: str) -> int:
    """Integer steps per "8-bit weight step": 1 for int8 weights, 256 for int16; for a bias, that weight
    step times ``2**(a_bits - 1)`` input steps."""
    node = node_of(graph, key)
    unit = 1 << (node.w_params.bits - 8)
    return unit << (node.in_params.bits - 1) if key.endswith(".bias") else unit


def perturbation_units(graph, masks: dict[str, np.ndarray], space: str = "steps") -> dict[str, np.ndarray]:
    """Integer steps per unit of ``eps`` for every masked element (flat, in mask order)."""
    if space not in SPACES:
        raise ValueError(f"unknown perturbation space {space!r}: use one of {', '.join(SPACES)}")
    units = {}
    for key, mask in masks.items():
        if space == "steps":
            units[key] = np.full(int(mask.sum()), float(step_unit(graph, key)))
            continue
        node = node_of(graph, key)
        real_step = node.w_params.scale.astype(np.float64)  # per output channel
        if key.endswith(".bias"):
            real_step = real_step * float(node.in_params.scale)
        per_channel = real_step.reshape((-1,) + (1,) * (mask.ndim - 1))
        units[key] = np.broadcast_to(1.0 / per_channel, mask.shape)[mask]
    return units


def integer_limits(graph) -> dict[str, int]:
    """Saturation bound of every trainable integer array: the weights' narrow range, the bias dtype's."""
    limits = {}
    for node in graph.weighted_nodes():
        limits[node.weight_key] = node.w_params.qmax
        limits[node.bias_key] = int(np.iinfo(node.bias.dtype).max)
    return limits


@dataclass
class Perturbation:
    """``delta[key]``: the integer perturbation of each selected weight (flat, in mask order)."""

    seed: int
    masks: dict[str, np.ndarray]  # weight key -> boolean mask
    delta: dict[str, np.ndarray]  # weight key -> int64 values on the mask

    def apply(self, weights: dict[str, np.ndarray], sign: int, limits: dict[str, int]) -> dict[str, np.ndarray]:
        """All of ``weights``, the selected ones moved by ``sign * delta`` and saturated to each layer's
        symmetric integer range. Every key is returned, not only the perturbed ones: a forward call given
        this dict must run the other layers with their trained integers too, not the graph's stored ones."""
        moved = dict(weights)
        for key, mask in self.masks.items():
            w = weights[key].copy()  # in its own dtype: only the masked entries widen, to add and saturate
            w[mask] = np.clip(w[mask].astype(np.int64) + sign * self.delta[key], -limits[key], limits[key])
            moved[key] = w
        return moved


def selection_masks(graph, selection: Selection, bias: bool = False) -> dict[str, np.ndarray]:
    """Masks of the selected weights; with ``bias``, the whole bias of every selected layer too."""
    masks = {}
    for name, chans in selection.items():
        node = graph.node(name)
        masks[node.weight_key] = channel_mask(node, chans)
        if bias:
            masks[node.bias_key] = np.ones(node.bias.shape, dtype=bool)
    return masks
