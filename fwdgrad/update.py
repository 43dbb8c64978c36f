"""The weight update in the integer grid: SGD (optional momentum) with seeded stochastic rounding.

``step = lr * mean_i(g_i * delta_i / (eps * unit)) * unit`` integer steps (lr counted in 8-bit weight steps
like eps), plus momentum ``v = beta * v + step``. Updates are often a fraction of one integer step, which
round-to-nearest would silently drop; stochastic rounding ``floor(x + u)``, ``u ~ U[0, 1)`` from the step
seed, keeps them alive in expectation. Results saturate to the weights' symmetric range.
"""
from __future__ import annotations

import math

import numpy as np

from .estimators import Estimate

SCHEDULES = ("constant", "cosine")


def learning_rate(base: float, schedule: str, step: int, total_steps: int, warmup_steps: int = 0) -> float:
    """Linear warm-up, then constant or cosine decay to zero."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}: use one of {', '.join(SCHEDULES)}")
    if step < warmup_steps:
        return base * (step + 1) / warmup_steps
    if schedule == "constant":
        return base
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def stochastic_round(values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.floor(values + rng.random(values.shape)).astype(np.int64)


def apply_update(graph, weights: dict, est: Estimate, lr: float | dict[str, float], eps: float, limits: dict,
                 step_seed: int, momentum: dict | None = None, beta: float = 0.0) -> dict:
    """New integer weights after one step (``momentum`` is updated in place when given); ``lr`` is one
    learning rate, or one per weight array (``Directions.lr_factors``)."""
    step: dict[str, np.ndarray] = {}
    m = len(est.perturbations)
    for p, g in zip(est.perturbations, est.projected):
        for key, d in p.delta.items():
            rate = lr[key] if isinstance(lr, dict) else lr
            step[key] = step.get(key, 0.0) + (rate * g / (eps * m)) * d  # d / unit * unit: integer steps
    return apply_steps(weights, step, est.perturbations[0].masks, limits, step_seed, momentum, beta)


def apply_steps(weights: dict, step: dict[str, np.ndarray], masks: dict, limits: dict, step_seed: int,
                momentum: dict | None = None, beta: float = 0.0) -> dict:
    """New integer weights: each masked entry moved by ``-step`` (float integer steps, flat in mask order),
    with momentum, stochastically rounded and saturated."""
    rng = np.random.default_rng([step_seed, 0x0DA7E])
    new = dict(weights)
    for key in sorted(step):
        direction = step[key]
        if momentum is not None:
            momentum[key] = beta * momentum.get(key, 0.0) + direction
            direction = momentum[key]
        mask = masks[key]
        w = weights[key].astype(np.int64)
        w[mask] = np.clip(w[mask] - stochastic_round(direction, rng), -limits[key], limits[key])
        new[key] = w.astype(weights[key].dtype)
    return new
