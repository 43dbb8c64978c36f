"""Which channels train: layer preselection by RGN, and per-epoch channel samplers (TraDy + baselines).

TraDy (arXiv 2510.19675), "D-TopK Random": rank layers once by reweighted gradient norm
``RGN_c = ||dL/dW_c||_2 / bytes(c)`` summed over a layer's input channels, keep the top layers that cover
97% of the total, then every epoch draw input channels of those layers uniformly at random until the memory
budget is full. The baselines of the paper are here under their names; ``d-det-rgn`` is the oracle that
recomputes gradients every epoch (it needs the PyTorch twin, so it is a reference, not a device method).
Layers whose gradients are exact (``fwdgrad.head``, ``fwdgrad.last_layer``) come first: the head whole,
then the last layer's channels, drawn the same way, then the rest of the budget as the method says.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .channels import Selection, bias_bytes, channel_bytes, input_channels

METHODS = ("trady", "s-full-random", "d-full-random", "s-topk-random", "s-det-rgn", "d-det-rgn", "last-layer", "all")
STATIC = {"s-full-random", "s-topk-random", "s-det-rgn", "last-layer", "all"}


def channel_rgn(graph, x: np.ndarray, y: np.ndarray, weights: dict | None = None, batch_size: int = 64) -> dict[str, np.ndarray]:
    """Reweighted gradient norm of every input channel of every weighted layer, from the float twin."""
    from .channels import per_channel_sum
    from .reference import gradients

    sums: dict[str, np.ndarray] = {}
    for start in range(0, len(x), batch_size):
        grads = gradients(graph, x[start:start + batch_size], y[start:start + batch_size], weights)
        for node in graph.weighted_nodes():
            per_channel = per_channel_sum(node, grads[node.weight_key].astype(np.float64) ** 2)
            sums[node.name] = sums.get(node.name, 0.0) + per_channel
    return {node.name: np.sqrt(sums[node.name]) / channel_bytes(node) for node in graph.weighted_nodes()}


def channel_rgn_zo(graph, x: np.ndarray, y: np.ndarray, samples: int = 64, eps: float = 1.0, seed: int = 0,
                   backend: str = "numba") -> dict[str, np.ndarray]:
    """RGN from forward calls only, for machines without torch: the per-channel root mean square of
    ``g_i * delta_i`` over ``samples`` whole-network perturbations (an estimate of the gradient's second
    moment; noisier than the twin's gradients, but enough to rank layers)."""
    from .channels import input_channels, per_channel_sum
    from .directions import directions_for
    from .estimators import estimate, one_by_one
    from .loss import cross_entropy
    from .perturb import integer_limits, selection_masks

    selection = {n.name: np.arange(input_channels(n)) for n in graph.weighted_nodes()}
    masks = selection_masks(graph, selection)
    weights = {n.weight_key: n.weight for n in graph.weighted_nodes()}
    limits = integer_limits(graph)
    directions = directions_for(graph, weights, masks)

    def loss_at(w):
        return cross_entropy(graph.forward(x, weights=w, backend=backend), graph.output_params, y)

    second = {key: np.zeros(mask.shape) for key, mask in masks.items()}
    for i in range(samples):
        est = estimate(one_by_one(loss_at), weights, directions, limits, step_seed=seed * 1_000_003 + i, m=1, eps=eps,
                       distribution="gaussian", method="spsa")
        for key, d in est.perturbations[0].delta.items():
            second[key][masks[key]] += (est.projected[0] * d / eps) ** 2
    return {n.name: np.sqrt(per_channel_sum(n, second[n.weight_key]) / samples) / channel_bytes(n)
            for n in graph.weighted_nodes()}


def preselect_layers(rgn: dict[str, np.ndarray], coverage: float = 0.97) -> list[str]:
    """The highest-RGN layers that together hold ``coverage`` of the total RGN (TraDy's preselection)."""
    scores = {name: float(v.sum()) for name, v in rgn.items()}
    total = sum(scores.values())
    kept, covered = [], 0.0
    for name in sorted(scores, key=scores.get, reverse=True):
        kept.append(name)
        covered += scores[name]
        if covered >= coverage * total:
            break
    return kept


@dataclass
class ChannelSampler:
    """Draws the trainable channels for each selection period (an epoch, or every N steps)."""

    graph: object
    method: str
    budget_bytes: int | None
    seed: int
    preselected: list[str] | None = None
    rgn: dict[str, np.ndarray] | None = None
    train_bias: bool = False  # a layer's first channel also brings its bias into the budget
    reserved: list[str] = field(default_factory=list)  # layers every selection trains whole (an exact head)
    preferred: list[str] = field(default_factory=list)  # layers whose channels are drawn first (exact updates)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown selection {self.method!r}: use one of {', '.join(METHODS)}")
        if self.method in ("trady", "s-topk-random") and self.preselected is None:
            raise ValueError(f"{self.method} needs preselected layers (run layer ranking first)")
        if self.method in ("s-det-rgn", "d-det-rgn") and self.rgn is None:
            raise ValueError(f"{self.method} needs channel RGN scores")
        if self.method not in ("all", "last-layer"):
            smallest = min(channel_bytes(n) + (bias_bytes(n) if self.train_bias else 0)
                           for n in self.graph.weighted_nodes())
            if self.budget_bytes is None or self.budget_bytes < smallest:
                raise ValueError(f"budget {self.budget_bytes} bytes is below one channel ({smallest} bytes): "
                                 f"raise --budget to at least {smallest}B")
            whole = self._whole_bytes(self.reserved)
            if self.reserved and self.budget_bytes < whole:
                raise ValueError(f"budget {self.budget_bytes} bytes is below the {whole} bytes of the head "
                                 f"{', '.join(self.reserved)}, which the exact head update trains whole: raise "
                                 f"--budget to at least {whole}B, or use --head-update zo")

    def layers(self) -> list[str]:
        """The layers this sampler draws channels from."""
        if self.method == "last-layer":
            return [self.graph.weighted_nodes()[-1].name]
        if self.method in ("trady", "s-topk-random"):
            return list(dict.fromkeys(list(self.preselected) + list(self.preferred)))
        return [n.name for n in self.graph.weighted_nodes()]

    def available_bytes(self) -> int:
        """Trainable bytes of every channel (and bias) of those layers: the most a selection can hold."""
        return self._whole_bytes(dict.fromkeys(self.layers() + list(self.reserved)))

    def _whole_bytes(self, layers) -> int:
        nodes = [self.graph.node(name) for name in layers]
        return sum(channel_bytes(n) * input_channels(n) + (bias_bytes(n) if self.train_bias else 0) for n in nodes)

    def _pool(self, layers) -> list[tuple[str, int]]:
        return [(name, c) for name in layers for c in range(input_channels(self.graph.node(name)))]

    def _fill(self, ordered: list[tuple[str, int]]) -> Selection:
        """Take the reserved layers whole, then the preferred layers' channels in their order, then the
        others in theirs, while they fit the budget (skipping ones that do not)."""
        chosen: dict[str, list[int]] = {}
        left = self.budget_bytes
        rest = [nc for nc in ordered if nc[0] not in self.reserved]
        ordered = (self._pool(self.reserved) + [nc for nc in rest if nc[0] in self.preferred]
                   + [nc for nc in rest if nc[0] not in self.preferred])
        sizes = {n.name: channel_bytes(n) for n in self.graph.weighted_nodes()}
        entry = {n.name: bias_bytes(n) if self.train_bias else 0 for n in self.graph.weighted_nodes()}
        for name, c in ordered:
            cost = sizes[name] + (0 if name in chosen else entry[name])
            if cost <= left:
                chosen.setdefault(name, []).append(c)
                left -= cost
        return self._ordered(chosen)

    def _ordered(self, chosen: dict[str, list[int]]) -> Selection:
        """Layers in graph order, channels sorted: the canonical order perturbations are drawn in."""
        order = [n.name for n in self.graph.weighted_nodes()]
        return {name: np.array(sorted(chosen[name]), dtype=np.int64) for name in order if chosen.get(name)}

    def select(self, period: int, rgn_now: dict[str, np.ndarray] | None = None) -> Selection:
        """The selection for a period (epoch index, or step // N). Static methods ignore ``period``."""
        all_layers = [n.name for n in self.graph.weighted_nodes()]
        if self.method == "all":
            return self._ordered({name: list(range(input_channels(self.graph.node(name)))) for name in all_layers})
        if self.method == "last-layer":
            last = all_layers[-1]
            return {last: np.arange(input_channels(self.graph.node(last)), dtype=np.int64)}
        if self.method in ("s-det-rgn", "d-det-rgn"):
            scores = rgn_now if (self.method == "d-det-rgn" and rgn_now is not None) else self.rgn
            pool = self._pool(all_layers)
            return self._fill(sorted(pool, key=lambda nc: -scores[nc[0]][nc[1]]))
        layers = self.layers() if self.method in ("trady", "s-topk-random") else all_layers
        pool = self._pool(layers)
        draw = 0 if self.method in STATIC else period
        rng = np.random.default_rng([self.seed, 0x5E1EC7, draw])
        return self._fill([pool[i] for i in rng.permutation(len(pool))])
