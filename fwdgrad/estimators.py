"""Zeroth-order gradient estimators: each perturbation costs two forward calls and yields one number.

For perturbation i with integer offsets ``delta_i`` (in 8-bit weight steps: ``u_i = delta_i / unit``),
``g_i = (L(w + delta_i) - L(w - delta_i)) / (2 eps)`` estimates the directional derivative along ``u_i / eps``;
the update then moves ``-lr * mean_i g_i * u_i / eps``. Variants ("Stepping Forward on the Last Mile",
arXiv 2411.04036):
- ``spsa``: m perturbations per step (m-SPSA), 2m forward calls;
- ``sign-spsa``: ``g_i = sign(L+ - L-)``, robust to the loss scale and to outliers;
- ``sharpness``: first estimate the gradient at w, step to the neighbour ``w + rho * d`` along its
  normalised direction, estimate there and apply that estimate at w (a zeroth-order SAM), 4m calls.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .directions import Directions
from .perturb import Perturbation

ESTIMATORS = ("spsa", "sign-spsa", "sharpness")


@dataclass
class Estimate:
    perturbations: list[Perturbation]
    projected: list[float]  # g_i
    losses: list[float]  # the 2 losses of every perturbation, for logging
    forward_calls: int


def seeds_for(step_seed: int, m: int, offset: int = 0) -> list[int]:
    return [int(s) for s in np.random.default_rng([step_seed, 0xE57, offset]).integers(0, 2 ** 62, m)]


def one_by_one(loss_at: Callable[[dict], float]) -> Callable[[list[dict]], list[float]]:
    """``losses_at`` from a function of one weight set (one forward call each)."""
    return lambda sets: [loss_at(w) for w in sets]  # each set made as it is reached


def estimate(losses_at: Callable[[list[dict]], list[float]], weights: dict, directions: Directions, limits: dict, *,
             step_seed: int, m: int, eps: float, distribution: str, method: str, rho: float = 0.0) -> Estimate:
    """The step's perturbations and projected gradients along ``directions`` (``fwdgrad.directions``: what
    is perturbed, in which integer units). ``losses_at(weight sets) -> losses`` makes one forward call per
    set; it gets the 2m sets of a pass together (``PerturbedSets``: w + delta_1, w - delta_1, w + delta_2,
    ..., each made when read), so that it can run their copies of a shared layer together."""
    if method not in ESTIMATORS:
        raise ValueError(f"unknown estimator {method!r}: use one of {', '.join(ESTIMATORS)}")
    centre, calls = weights, 0
    if method == "sharpness":
        first = _pairs(losses_at, weights, directions, limits, seeds_for(step_seed, m, 1), eps, distribution, False)
        units = directions.units_at(weights)
        centre = _neighbour(weights, directions.masks, units, _direction(units, first), rho, limits)
        calls += first.forward_calls
    result = _pairs(losses_at, centre, directions, limits, seeds_for(step_seed, m), eps, distribution,
                    method == "sign-spsa")
    result.forward_calls += calls
    return result


class PerturbedSets(Sequence):
    """The 2m weight sets of a pass, ``w + delta_1, w - delta_1, w + delta_2, ...``, each made when it is
    read (an item or a slice), so that only the sets a caller holds are in memory."""

    def __init__(self, weights: dict, perturbations: list[Perturbation], limits: dict):
        self.weights, self.perturbations, self.limits = weights, perturbations, limits

    def __len__(self) -> int:
        return 2 * len(self.perturbations)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        p = self.perturbations[i % len(self) // 2]
        return p.apply(self.weights, -1 if i % 2 else +1, self.limits)


def _pairs(losses_at, weights, directions, limits, seeds, eps, distribution, use_sign) -> Estimate:
    perturbations = directions.draw(seeds, weights, eps, distribution)
    losses = losses_at(PerturbedSets(weights, perturbations, limits))
    pairs = zip(losses[::2], losses[1::2])
    projected = [float(np.sign(plus - minus)) if use_sign else (plus - minus) / (2 * eps) for plus, minus in pairs]
    return Estimate(perturbations, projected, losses, 2 * len(seeds))


def _direction(units, est: Estimate) -> dict[str, np.ndarray]:
    """Unit-norm (in units of eps) estimated gradient, per weight key, on the mask (an entry with no unit,
    a zero weight a scale moves, has none)."""
    grad = {}
    for p, g in zip(est.perturbations, est.projected):
        for key, d in p.delta.items():
            u = units[key]
            grad[key] = grad.get(key, 0.0) + g * np.divide(d, u, out=np.zeros(len(d)), where=u != 0)
    norm = np.sqrt(sum(float(np.sum(v ** 2)) for v in grad.values())) or 1.0
    return {key: v / norm for key, v in grad.items()}


def _neighbour(weights, masks, units, direction, rho, limits) -> dict:
    """The ascent neighbour ``w + rho * d`` (rho in units of eps, rounded to the integer grid)."""
    step = {key: np.rint(rho * units[key] * d).astype(np.int64) for key, d in direction.items()}
    return Perturbation(-1, masks, step).apply(weights, +1, limits)
