"""One forward-gradient step (MeZO's shape, in the integer grid), with the classifier's exact gradient.

Run the graph's prefix before the first perturbed layer once; draw m seeded perturbations of the selected
channels; two forward calls each from the cached prefix; one seeded stochastic-rounding update. With
``head_update = "exact"`` the head is not perturbed: every one of those forward calls also yields the
head's input features and the logits, which give its exact cross-entropy gradient (``fwdgrad.head``),
averaged over the calls and applied after the ZO update; ``exact-last`` also gives the last 1x1 conv's
selected channels theirs (``fwdgrad.last_layer``). When nothing but exact layers is selected, a step is
one plain forward call. Every random number derives from (seed, step), so (seed, projected gradients)
and the head's integer step are the whole update.
"""
from __future__ import annotations

import numpy as np

from quant.graph import QGraph
from quant.ops.packing import freeze

from .config import TrainConfig
from .directions import Directions, directions_for
from .estimators import Estimate, estimate, seeds_for
from .head import HeadGradient, apply_head_step, final_linear
from .last_layer import LastLayerGradient, apply_last_layer_step, find_last_layer
from .loss import LOSS_FRACTION_BITS, cross_entropy, cross_entropy_per_sample, integer_cross_entropy, \
    integer_cross_entropy_per_sample
from .node_perturbation import OUTPUTS, NodeEstimate, estimate as node_estimate, perturbed_layers
from .perturb import integer_limits, perturbation_units
from .update import apply_steps, apply_update, learning_rate


def step_seed(seed: int, step: int) -> int:
    """The seed of everything random in a step: perturbations and stochastic-rounding noise."""
    return int(np.random.default_rng([seed, 0x57E9, step]).integers(0, 2 ** 62))


def step_learning_rate(cfg: TrainConfig, step: int, total_steps: int, directions: Directions) -> dict[str, float]:
    """Schedule value at ``step`` for each perturbed array, scaled by ``lr_scale`` (``Directions.lr_factors``:
    ZO's stable step shrinks like m / d)."""
    lr = learning_rate(cfg.lr, cfg.schedule, step, total_steps, cfg.warmup_steps)
    return {k: lr * f for k, f in directions.lr_factors(cfg.lr_scale).items()}


def period_directions(graph: QGraph, cfg: TrainConfig, weights: dict, perturbed: dict) -> Directions:
    """The directions of a selection period, by the run's settings."""
    return directions_for(graph, weights, perturbed, space=cfg.space, zo_params=cfg.zo_params,
                          sparsity=cfg.zo_sparsity, orthogonal=cfg.directions)


def integer_loss(logits_int, params, labels) -> float:
    """The integer-only loss, as the float the estimator divides (the device would keep it in Q.16)."""
    return integer_cross_entropy(logits_int, params, labels) / (1 << LOSS_FRACTION_BITS)


def with_noise(node, y_int: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """A layer's integer output moved by node perturbation's ``delta``, saturated to its output's range."""
    p = node.out_params
    return np.clip(y_int.astype(np.int64) + delta, p.qmin, p.qmax).astype(y_int.dtype)


def exact_layers(graph: QGraph, head_update: str):
    """(head, last layer) whose gradients a run computes exactly, by ``head_update`` (auto: the most the
    model's structure allows). Either may be None."""
    if head_update == "zo":
        return None, None
    try:
        head = final_linear(graph)
    except ValueError:
        if head_update == "auto":
            return None, None
        raise
    if head_update == "exact":
        return head, None
    try:
        return head, find_last_layer(graph, head)
    except ValueError:
        if head_update == "auto":
            return head, None
        raise


class ZOStep:
    """The forward-gradient step of a run: ``step(weights, momentum, masks, x, y, t)`` updates in place."""

    def __init__(self, graph: QGraph, config: TrainConfig, total_steps: int):
        self.graph, self.config, self.total_steps = graph, config, total_steps
        self.limits = integer_limits(graph)
        self.head, self.last = exact_layers(graph, config.head_update)
        self._directions = (None, None)

    @property
    def head_update(self) -> str:
        """What ``head_update`` resolved to for this model."""
        return "exact-last" if self.last else "exact" if self.head else "zo"

    @property
    def exact_keys(self) -> list[str]:
        """Weight keys updated by exact gradients instead of perturbations."""
        nodes = [n for n in (self.head, self.last.node if self.last else None) if n is not None]
        return [k for n in nodes for k in (n.weight_key, n.bias_key)]

    def perturbed(self, masks: dict) -> dict:
        """The masks ZO perturbs: the selection's, less what exact gradients update."""
        return {k: m for k, m in masks.items() if k not in self.exact_keys}

    def last_channels(self, masks: dict) -> np.ndarray | None:
        """The last layer's selected input channels (None when it is not selected or not exact)."""
        if self.last is None or self.last.node.weight_key not in masks:
            return None
        return np.flatnonzero(masks[self.last.node.weight_key].any(axis=(0, 2, 3)))

    def start(self, masks: dict) -> str:
        """The first node a step's calls run from the cached prefix (the exact layers when nothing else
        is perturbed)."""
        names = {k.rsplit(".", 1)[0] for k in self.perturbed(masks)}
        if self.last_channels(masks) is not None:
            names.add(self.last.node.name)
        first = min((self.graph.index(n) for n in names), default=self.graph.index(self.head.name) if self.head
                    else len(self.graph.nodes) - 1)
        return self.graph.nodes[first].name

    def loss(self, logits: np.ndarray, y: np.ndarray, per_sample: bool = False):
        """The batch's loss, or (``per_sample``) each sample's."""
        params = self.graph.output_params
        if per_sample:
            if self.config.loss == "float":
                return cross_entropy_per_sample(logits, params, y)
            return integer_cross_entropy_per_sample(logits, params, y) / (1 << LOSS_FRACTION_BITS)
        return (cross_entropy if self.config.loss == "float" else integer_loss)(logits, params, y)

    @property
    def node_perturbation(self) -> bool:
        return self.config.zo_params == OUTPUTS

    def gradient(self, weights: dict, masks: dict, x, y, step: int):
        """(the step's estimate, its seed, the exact gradients' sums: head, last layer). The seed regenerates
        every perturbation and the rounding noise, so (seed, projected gradients) is the whole ZO update: a
        fleet device uploads only that (and the exact layers' integer steps)."""
        cfg, graph = self.config, self.graph
        start = self.start(masks)
        varying = frozenset(masks)  # all else stays as it is for the selection period (prepacked by onnxruntime)
        cache = graph.prefix(x, until=start, weights=weights, backend=cfg.backend, varying=varying)
        head = HeadGradient(self.head) if self.head is not None else None
        channels = self.last_channels(masks)
        last = LastLayerGradient(self.last, self.head, channels) if channels is not None else None

        layers, outputs_of = perturbed_layers(graph, self.perturbed(masks)) if self.node_perturbation else ([], {})
        nodes = {graph.index(n.name): n for n in layers}
        # node perturbation: this pass's output noise; the clean pass's store of each perturbed layer's input and
        # output, and of the tensors live just after it (a pass perturbing that layer starts there)
        outputs = {"noise": {}, "capture": None, "after": {}}

        def following(i):
            """The name of the node after node ``i`` (None after the last: a run to the end)."""
            return graph.nodes[i + 1].name if i + 1 < len(graph.nodes) else None

        def advance(env, begin, until, w, consume):
            return graph.advance(env, begin, until, weights=w, backend=cfg.backend, varying=varying, consume=consume)

        def run(env, begin, until, w, consume=False):
            """Nodes ``begin`` up to ``until`` (None: the end); the layer this pass perturbs gets its noise, or in
            the clean pass every perturbed layer's input and output are kept (the run splits only there)."""
            last = len(graph.nodes) if until is None else graph.index(until)
            stops = [i for i in sorted(nodes) if graph.index(begin) <= i < last
                     and (outputs["capture"] is not None or nodes[i].name in outputs["noise"])]
            for i in stops:
                node = nodes[i]
                env = advance(env, begin, node.name, w, consume)
                x = env[node.inputs[0]]
                begin = following(i)
                env, consume = advance(env, node.name, begin, w, True), True
                y_int = env[node.output]
                if outputs["capture"] is not None:
                    outputs["capture"][node.name] = (x, y_int)
                    outputs["after"][node.name] = dict(env)
                else:
                    env[node.output] = with_noise(node, y_int, outputs["noise"][node.name])
                if begin is None:
                    return env
            return env if begin is None else advance(env, begin, until, w, consume)

        def loss_from(env, begin, w, per_sample=False):
            """The loss of one call with weights ``w``, ``env`` holding the tensors before node ``begin``
            (None: after the last node); an ``env`` of its own (not the shared cache) is used up."""
            own = env is not cache
            if head is None:
                logits = env[graph.output_name] if begin is None else run(env, begin, None, w, own)[graph.output_name]
                return self.loss(logits, y, per_sample)
            if last is not None:
                node = self.last.node
                at_last = run(env, begin, node.name, w, own)
                a = at_last[node.inputs[0]]
                after = run(at_last, node.name, self.last.after, w)
                y_int = after[node.output]
                at_head = run(after, self.last.after, self.head.name, w)
            else:
                at_head = run(env, begin, self.head.name, w, own)
            logits = graph.forward(at_head, start=self.head.name, weights=w, backend=cfg.backend, varying=varying)
            head.add(at_head[self.head.inputs[0]], logits, y, graph.output_params)
            if last is not None:
                last.add(a, y_int, logits, y, graph.output_params, at_last)
            return self.loss(logits, y, per_sample)

        def losses_at(sets):
            """The losses of the step's calls: when they all perturb the first node they run, its copies run
            as one wider layer (QGraph.advance_each) and each call goes on from the node after it."""
            perturbed_first = start in {k.rsplit(".", 1)[0] for k in self.perturbed(masks)}
            if not perturbed_first or not graph.widens(start, cfg.backend):
                return [loss_from(cache, start, w) for w in sets]
            begin = following(graph.index(start))
            losses = []
            for env, w in graph.advance_each(cache, start, sets, backend=cfg.backend, varying=varying):
                losses.append(loss_from(env, begin, w))
                del env, w  # before the next copy is made: one copy's activations and weights at a time
            return losses

        seed = step_seed(cfg.seed, step)
        perturbed = self.perturbed(masks)
        if not perturbed:  # exact updates alone: one forward call gives their gradients
            return Estimate([], [], [loss_from(cache, start, weights)], 1), seed, (head, last)
        if layers:
            outputs["capture"] = clean = {}
            base = loss_from(cache, start, weights)
            outputs["capture"] = None
            exact_first = min((graph.index(n.name) for n in (self.head, self.last.node if last else None)
                               if n is not None), default=len(graph.nodes))

            def run_pass(noise):
                """One pass perturbing one layer, from the clean pass's tensors just after it (the nodes before
                it would compute the same integers again), or from ``start`` when exact layers come first."""
                (name, delta), = noise.items()
                i = graph.index(name)
                if i >= exact_first:
                    outputs["noise"] = noise
                    return loss_from(cache, start, weights, per_sample=True)
                outputs["noise"] = {}
                env, node = dict(outputs["after"][name]), graph.nodes[i]
                env[node.output] = with_noise(node, clean[name][1], delta)
                begin = following(i)
                return loss_from(env, begin, weights, per_sample=True)

            est = node_estimate(run_pass, layers, clean, outputs_of, cfg.eps, seeds_for(seed, cfg.m), len(y),
                                cfg.train_bias, first=step * cfg.m)
            est.losses.insert(0, base)
            return est, seed, (head, last)
        est = estimate(losses_at, weights, self.directions(masks, weights), self.limits, step_seed=seed, m=cfg.m,
                       eps=cfg.eps, distribution=cfg.distribution, method=cfg.estimator, rho=cfg.rho)
        return est, seed, (head, last)

    def directions(self, masks: dict, weights: dict) -> Directions:
        """The perturbed directions of the selection ``masks``, made at its first step's ``weights`` and kept
        while the selection lasts."""
        if self._directions[0] is not masks:
            self._directions = (masks, period_directions(self.graph, self.config, weights, self.perturbed(masks)))
        return self._directions[1]

    def learning_rate(self, step: int) -> dict[str, float]:
        """The ZO update size of ``step`` per perturbed array, for the current selection (after ``gradient``
        drew it)."""
        return step_learning_rate(self.config, step, self.total_steps, self._directions[1])

    def exact_learning_rate(self, step: int) -> float:
        cfg = self.config
        return learning_rate(cfg.head_lr, cfg.schedule, step, self.total_steps, cfg.warmup_steps)

    def apply_exact(self, weights: dict, exact: tuple, step: int, seed: int) -> None:
        """The exact layers' steps, in place (after the ZO update of the same step)."""
        head, last = exact
        lr, bias = self.exact_learning_rate(step), self.config.train_bias
        if head is not None:
            apply_head_step(weights, self.head, head, lr, seed, bias)
        if last is not None:
            apply_last_layer_step(weights, last, lr, seed, bias)

    def __call__(self, weights: dict, momentum: dict, masks: dict, x, y, step: int) -> tuple[float, int]:
        """One step; updates ``weights`` (and ``momentum``) in place. Returns the mean loss of its forward
        calls and how many it made."""
        cfg = self.config
        est, seed, exact = self.gradient(weights, masks, x, y, step)
        if isinstance(est, NodeEstimate):
            perturbed = self.perturbed(masks)
            lr = learning_rate(cfg.lr, cfg.schedule, step, self.total_steps, cfg.warmup_steps)
            steps = est.steps(perturbed, perturbation_units(self.graph, perturbed, cfg.space), lr)
            weights.update(apply_steps(weights, steps, perturbed, self.limits, seed,
                                       momentum if cfg.momentum > 0 else None, cfg.momentum))
        elif est.perturbations:
            weights.update(apply_update(self.graph, weights, est, self.learning_rate(step), cfg.eps, self.limits,
                                        seed, momentum if cfg.momentum > 0 else None, cfg.momentum))
        self.apply_exact(weights, exact, step, seed)
        for array in weights.values():  # constants until the next update: kernels keep their packings
            freeze(array)
        return float(np.mean(est.losses)), est.forward_calls
