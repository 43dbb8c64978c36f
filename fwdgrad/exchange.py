"""What a fleet device uploads after its local steps, and how the server folds it into the global integers.

Two protocols, over the same local forward-gradient training:

- ``seeds``: a step's update is fully described by its step seed (which regenerates every perturbation
  and the stochastic-rounding noise, ``fwdgrad.perturb`` / ``fwdgrad.update``) and its ``m`` projected
  gradients, so a device uploads ``8 + 4m`` bytes per step instead of weights. The server replays every
  device's steps, in device order, onto the global integer weights with ``lr / N`` (the replayed sum of N
  devices' steps is FedAvg's mean of their updates, to first order); devices download the same pairs and
  replay them with the same code, so every copy of the model stays bit-identical.
- ``weights``: federated averaging of the trained integers. A device uploads its selected channels' values
  (weights and biases on the selection masks) after local training; the server sets each trained value to
  the rounded mean over devices and sends the averaged channels back.

Projected gradients travel as float32; the device applies the float32 values locally as well, so its own
update is exactly what the server replays. With the head's exact gradient (``head_update = "exact"``) the
steps of the exactly-trained layers depend on the device's data and cannot be regenerated from a seed: a
``seeds`` device also uploads the sum of their integer steps over the round (int32, the layers' size), and
every copy adds the devices' mean, rounded half to even, after replaying the seeds.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import TrainConfig
from .estimators import Estimate, seeds_for
from .directions import Directions
from .update import apply_update
from .zo_step import step_learning_rate

PROTOCOLS = ("seeds", "weights")


@dataclass
class SeedSteps:
    """A device's local steps of one round: ``seeds[j]`` and the ``m`` projected gradients ``projected[j]``."""

    seeds: np.ndarray  # int64 (steps,)
    projected: np.ndarray  # float32 (steps, m)

    @property
    def nbytes(self) -> int:
        return int(self.seeds.nbytes + self.projected.nbytes)


def as_sent(est: Estimate) -> Estimate:
    """The estimate with its projected gradients rounded to float32, as they travel."""
    return Estimate(est.perturbations, [float(v) for v in np.float32(est.projected)], est.losses, est.forward_calls)


def replay(graph, weights: dict, directions: Directions, limits: dict, cfg: TrainConfig, steps: SeedSteps,
           first_step: int, total_steps: int, scale: float = 1.0) -> dict:
    """The weights after applying ``steps`` (taken at global step indices ``first_step + j``) with their
    learning rates times ``scale``, regenerating each perturbation from its seed along ``directions``."""
    for j, (seed, projected) in enumerate(zip(steps.seeds, steps.projected)):
        perturbations = directions.draw(seeds_for(int(seed), len(projected)), weights, cfg.eps, cfg.distribution)
        est = Estimate(perturbations, [float(v) for v in projected], [], 0)
        lr = {k: v * scale for k, v in step_learning_rate(cfg, first_step + j, total_steps, directions).items()}
        weights = apply_update(graph, weights, est, lr, cfg.eps, limits, int(seed))
    return weights


def trained_values(weights: dict, masks: dict) -> dict[str, np.ndarray]:
    """The values a FedAvg device uploads: every masked weight and bias, in its integer type."""
    return {key: np.ascontiguousarray(weights[key][mask]) for key, mask in sorted(masks.items())}


def average_values(uploads: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Elementwise mean of the devices' trained values, rounded half to even back to the integer type."""
    return {key: np.rint(np.mean([u[key].astype(np.float64) for u in uploads], axis=0)).astype(uploads[0][key].dtype)
            for key in uploads[0]}


def set_values(weights: dict, masks: dict, values: dict[str, np.ndarray]) -> dict:
    """The weights with the masked entries replaced by ``values``."""
    new = dict(weights)
    for key, mask in masks.items():
        w = weights[key].copy()
        w[mask] = values[key]
        new[key] = w
    return new


def payload_bytes(arrays: dict[str, np.ndarray]) -> int:
    return int(sum(a.nbytes for a in arrays.values()))


def fold_exact(weights: dict, steps: dict[str, np.ndarray], limits: dict) -> dict:
    """The weights with the mean over devices of each exactly-trained array's summed steps (``steps[key]``
    stacks the devices' sums) added, rounded half to even and saturated: the same integers on the server
    and on every device."""
    new = dict(weights)
    for key, per_device in steps.items():
        mean = np.rint(np.mean(per_device.astype(np.float64), axis=0)).astype(np.int64)
        new[key] = np.clip(weights[key].astype(np.int64) + mean, -limits[key], limits[key]).astype(weights[key].dtype)
    return new
