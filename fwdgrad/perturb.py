"""Seeded perturbations of the selected channels, in the weights' integer grid, never stored.

A perturbation is fully described by its seed: ``z`` (Gaussian or Rademacher) is drawn for the selected
weights in a canonical order (layers in graph order, channels sorted, weights in C order) and scaled to
``delta = rint(eps * unit * z)`` integers, where ``unit = 2**(bits - 8)`` so that ``eps`` means the same
real step for 8- and 16-bit weights (it is counted in 8-bit weight steps). The update regenerates the same
integers from the same seed, so memory holds seeds, not vectors (MeZO's trick).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .channels import Selection, channel_mask

DISTRIBUTIONS = ("gaussian", "rademacher")


def node_of(graph, weight_key: str):
    return graph.node(weight_key.removesuffix(".weight"))


def weight_unit(node) -> int:
    """Integer steps per 8-bit weight step: 1 for int8 weights, 256 for int16."""
    return 1 << (node.w_params.bits - 8)


@dataclass
class Perturbation:
    """``delta[key]``: the integer perturbation of each selected weight (flat, in mask order)."""

    seed: int
    masks: dict[str, np.ndarray]  # weight key -> boolean mask
    delta: dict[str, np.ndarray]  # weight key -> int64 values on the mask

    def apply(self, weights: dict[str, np.ndarray], sign: int, limits: dict[str, int]) -> dict[str, np.ndarray]:
        """Weights moved by ``sign * delta`` and saturated to each layer's symmetric integer range."""
        moved = {}
        for key, mask in self.masks.items():
            w = weights[key].astype(np.int64)
            w[mask] = np.clip(w[mask] + sign * self.delta[key], -limits[key], limits[key])
            moved[key] = w.astype(weights[key].dtype)
        return moved


def selection_masks(graph, selection: Selection) -> dict[str, np.ndarray]:
    return {graph.node(name).weight_key: channel_mask(graph.node(name), chans) for name, chans in selection.items()}


def draw(seed: int, graph, masks: dict[str, np.ndarray], eps: float, distribution: str = "gaussian") -> Perturbation:
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown perturbation {distribution!r}: use one of {', '.join(DISTRIBUTIONS)}")
    rng = np.random.default_rng([seed, 0x2E27])
    delta = {}
    for key, mask in masks.items():
        count = int(mask.sum())
        z = rng.standard_normal(count) if distribution == "gaussian" else rng.choice([-1.0, 1.0], count)
        delta[key] = np.rint(eps * weight_unit(node_of(graph, key)) * z).astype(np.int64)
    return Perturbation(seed, masks, delta)
