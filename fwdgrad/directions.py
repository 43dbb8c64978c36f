"""The directions a step perturbs along: which numbers one perturbation draws, and how they move the integers.

A direction is ``z`` (Gaussian or Rademacher, from the perturbation's seed) mapped onto the perturbed weights
as ``delta = rint(eps * units * z[groups])``; the update regenerates the same ``delta`` from the same seed.
The settings that shape it (each studied on its own in docs/results.md):

- ``zo_params = "weights"`` (MeZO): one entry of ``z`` per selected weight and bias;
- ``zo_params = "scale-bias"`` (BitFit, TinyTL, SSF: a tiny dimension): one entry per output channel of a
  selected layer, which scales that channel's weights, ``w[o] -> w[o] (1 + eps z_o)`` (the change of the
  channel's requantization multiplier, folded into its 16-bit weights; ``eps`` is a relative change in
  ``real`` space, in 8-bit steps of 1/128 in ``steps`` space), and one per bias entry when biases train;
- ``zo_sparsity = s`` (Sparse MeZO, arXiv 2402.15751): only the selected weights whose magnitude is at most
  the layer's ``1 - s`` quantile are perturbed, as ZO noise hurts large weights most;
- ``directions = "orthogonal"`` (Flügel et al., arXiv 2410.17764): the step's m draws are orthonormalised
  (and rescaled to the norm a Gaussian draw has), so that no two of them probe the same direction twice.

The learning rate per array follows ``lr_scale``: ``dimension`` divides it by the number of entries of
``z`` (ZO's stable step shrinks like m / d), ``layer`` divides each array's by its own number of entries
times the number of arrays (the same total, but a small array, a bias or a head, moves as fast as a large
one).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .perturb import DISTRIBUTIONS, Perturbation, node_of, perturbation_units

ZO_PARAMS = ("weights", "scale-bias")
DIRECTIONS = ("independent", "orthogonal")
LR_SCALES = ("none", "dimension", "layer")
SCALE_STEP = 1 / 128  # in ``steps`` space a scale moves by 8-bit steps of 1: eps 2 is a 1.6% change


@dataclass
class Directions:
    """What one period's perturbations draw: ``masks`` (the perturbed entries), ``units`` (integer steps per
    unit of eps, flat in mask order; ``scaled`` keys take the current weights instead) and ``groups`` (the
    entry of ``z`` each masked element takes; None: its own)."""

    masks: dict[str, np.ndarray]
    units: dict[str, np.ndarray]
    groups: dict[str, np.ndarray | None]
    scaled: frozenset = frozenset()
    orthogonal: bool = False
    scale_step: float = 1.0  # a scale's change per unit of eps: 1 in real units, 1/128 in 8-bit steps

    def sizes(self) -> dict[str, int]:
        """Entries of ``z`` per array."""
        return {k: int(self.masks[k].sum()) if g is None else int(g.max()) + 1 for k, g in self.groups.items()}

    def units_at(self, weights: dict) -> dict[str, np.ndarray]:
        """The units at the current weights (a scaled channel moves in proportion to its weights)."""
        return {k: weights[k][self.masks[k]].astype(np.float64) * self.scale_step if k in self.scaled else u
                for k, u in self.units.items()}

    def lr_factors(self, lr_scale: str) -> dict[str, float]:
        """What each array's learning rate is multiplied by (see the module's docstring)."""
        if lr_scale not in LR_SCALES:
            raise ValueError(f"unknown lr_scale {lr_scale!r}: use one of {', '.join(LR_SCALES)}")
        sizes = self.sizes()
        if lr_scale == "none":
            return dict.fromkeys(sizes, 1.0)
        if lr_scale == "dimension":
            return dict.fromkeys(sizes, 1.0 / max(1, sum(sizes.values())))
        return {k: 1.0 / (max(1, n) * len(sizes)) for k, n in sizes.items()}

    def draw(self, seeds: list[int], weights: dict, eps: float, distribution: str = "gaussian") -> list[Perturbation]:
        """The perturbations of ``seeds`` at ``weights``, in a canonical order (arrays in mask order)."""
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"unknown perturbation {distribution!r}: use one of {', '.join(DISTRIBUTIONS)}")
        sizes, units = self.sizes(), self.units_at(weights)
        zs = (_draw_z(seed, sizes, distribution) for seed in seeds)  # one draw alive at a time
        if self.orthogonal:
            zs = _orthonormalised(list(zs), sizes)
        return [Perturbation(seed, self.masks, {k: _integers(eps * units[k] * (z[k] if self.groups[k] is None
                                                                            else z[k][self.groups[k]]))
                                                for k in self.masks})
                for seed, z in zip(seeds, zs)]


def _integers(values: np.ndarray) -> np.ndarray:
    """Rounded to integers, in the narrowest of int16 / int32 / int64 that holds them (a step keeps m of them
    until its update: int16 is a quarter of int64's memory)."""
    rounded = np.rint(values)
    largest = float(np.abs(rounded).max()) if rounded.size else 0.0
    return rounded.astype(next(t for t in (np.int16, np.int32, np.int64) if largest <= np.iinfo(t).max))


def _draw_z(seed: int, sizes: dict[str, int], distribution: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([seed, 0x2E27])
    return {k: rng.standard_normal(n) if distribution == "gaussian" else rng.choice([-1.0, 1.0], n)
            for k, n in sizes.items()}


def _orthonormalised(zs: list[dict], sizes: dict[str, int]) -> list[dict]:
    """The draws made orthogonal (Gram-Schmidt in draw order, via QR), each of norm sqrt(d) as a Gaussian's."""
    keys = list(sizes)
    stacked = np.stack([np.concatenate([z[k] for k in keys]) for z in zs], axis=1)  # (d, m)
    q, r = np.linalg.qr(stacked)
    q *= np.sign(np.where(np.diag(r) == 0, 1.0, np.diag(r)))  # keep each draw's sign: draw 1 stays along z_1
    q *= np.sqrt(stacked.shape[0])
    bounds = np.cumsum([0] + [sizes[k] for k in keys])
    return [{k: q[bounds[i]:bounds[i + 1], j] for i, k in enumerate(keys)} for j in range(len(zs))]


def sparse_masks(weights: dict, masks: dict[str, np.ndarray], sparsity: float) -> dict[str, np.ndarray]:
    """Sparse MeZO's masks: of each weight array's selected entries, those of magnitude at most its
    ``1 - sparsity`` quantile (biases stay whole)."""
    if sparsity <= 0:
        return masks
    sparse = {}
    for key, mask in masks.items():
        if key.endswith(".bias") or not mask.any():
            sparse[key] = mask
            continue
        magnitude = np.abs(weights[key].astype(np.float64))
        sparse[key] = mask & (magnitude <= np.quantile(magnitude[mask], 1.0 - sparsity))
    return sparse


def scale_bias_masks(graph, masks: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every weight entry of the layers ``masks`` names (a channel's scale moves all its weights), and their
    whole biases where ``masks`` trains them (``train_bias``)."""
    return {key: np.ones((node := node_of(graph, key)).weight.shape if key.endswith(".weight") else node.bias.shape,
                         dtype=bool) for key in masks}


def directions_for(graph, weights: dict, masks: dict[str, np.ndarray], *, space: str = "steps",
                   zo_params: str = "weights", sparsity: float = 0.0, orthogonal: str = "independent") -> Directions:
    """The directions of a selection period (``masks``: the selected entries ZO perturbs)."""
    if zo_params not in ZO_PARAMS:
        raise ValueError(f"unknown zo_params {zo_params!r}: use one of {', '.join(ZO_PARAMS)}")
    if orthogonal not in DIRECTIONS:
        raise ValueError(f"unknown directions {orthogonal!r}: use one of {', '.join(DIRECTIONS)}")
    if zo_params == "scale-bias":
        masks = scale_bias_masks(graph, masks)
        scaled = frozenset(k for k in masks if k.endswith(".weight"))
        units = perturbation_units(graph, {k: m for k, m in masks.items() if k not in scaled}, space)
        units |= {k: np.empty(0) for k in scaled}  # the current weights, drawn at each step (units_at)
        groups = {k: np.nonzero(m)[0] if k in scaled else None for k, m in masks.items()}  # output channel
        return Directions(masks, units, groups, scaled, orthogonal == "orthogonal",
                          1.0 if space == "real" else SCALE_STEP)
    masks = sparse_masks(weights, masks, sparsity)
    return Directions(masks, perturbation_units(graph, masks, space), dict.fromkeys(masks), frozenset(),
                      orthogonal == "orthogonal")
