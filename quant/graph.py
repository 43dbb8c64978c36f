"""QGraph: the quantized model as an ordered list of integer nodes over named tensors.

Two things the trainer needs are first-class here: replacement weights (``weights=`` maps
``"<node>.weight"`` / ``"<node>.bias"`` to integer arrays used instead of the stored ones) and running from a
cached intermediate (``prefix`` returns the live tensors before a node, ``forward(cache, start=node)``
continues from them), so the part of the network before the first perturbed layer runs once per batch.
Tensors are freed after their last use (liveness), as an MCU arena would.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from .backends import get_backend, segment_runner
from .fixedpoint import check_rounding
from .ops.base import Node, WeightedNode
from .tensor import QParams, dequantize, quantize


WIDE_OUTPUT_BYTES = 1 << 20  # copies of a layer run together while their outputs fit in this (or the input)


def check_input_shape(shape: tuple, expected: tuple | None, input_name: str, what: str = "data") -> None:
    """Refuse ``shape`` (N, C, H, W) if it does not fit the model's declared input (``None`` dims are free;
    the batch always is), naming both shapes rather than failing deep inside an op."""
    if not expected:
        return
    shape = tuple(int(d) for d in shape)
    if len(shape) != len(expected) or any(e is not None and e != s for e, s in zip(expected[1:], shape[1:])):
        sample = "(" + ", ".join("?" if e is None else str(e) for e in expected[1:]) + ")"
        raise ValueError(f"{what} of shape {shape} does not fit the model's input {input_name!r} of shape "
                         f"(N, {sample[1:]}: give samples of shape {sample} (resize them), or quantize the model "
                         f"for this input size")


@dataclass
class QGraph:
    nodes: list[Node]
    input_name: str
    input_params: QParams
    output_name: str
    rounding: str = "half_even"
    bits: str = "w8a8"
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        check_rounding(self.rounding)
        produced = {self.input_name}
        for node in self.nodes:
            missing = [t for t in node.inputs if t not in produced]
            if missing:
                raise ValueError(f"node {node.name!r} reads {missing} before they are produced: nodes must be in "
                                 f"topological order")
            produced.add(node.output)
        if self.output_name not in produced:
            raise ValueError(f"graph output {self.output_name!r} is produced by no node")
        self._index = {node.name: i for i, node in enumerate(self.nodes)}
        self._last_use = {}
        for i, node in enumerate(self.nodes):
            for t in node.inputs:
                self._last_use[t] = i

    # ---- structure ---------------------------------------------------------------------------------
    @property
    def output_params(self) -> QParams:
        return self.params_of(self.output_name)

    def params_of(self, tensor: str) -> QParams:
        if tensor == self.input_name:
            return self.input_params
        for node in self.nodes:
            if node.output == tensor:
                return node.out_params
        raise KeyError(f"no tensor named {tensor!r}")

    def node(self, name: str) -> Node:
        return self.nodes[self.index(name)]

    def index(self, name: str) -> int:
        if name not in self._index:
            raise KeyError(f"no node named {name!r}; nodes are {[n.name for n in self.nodes]}")
        return self._index[name]

    def weighted_nodes(self) -> list[WeightedNode]:
        return [n for n in self.nodes if isinstance(n, WeightedNode)]

    # ---- execution ---------------------------------------------------------------------------------
    def quantize_input(self, x: np.ndarray) -> np.ndarray:
        check_input_shape(np.shape(x), self.metadata.get("input_shape"), self.input_name, "input")
        if np.issubdtype(np.asarray(x).dtype, np.integer):
            return np.asarray(x, dtype=self.input_params.dtype)
        return quantize(x, self.input_params)

    def run_nodes(self, env: dict, first: int, last: int, kernels, weights: dict | None = None,
                  rounding: str | None = None) -> dict:
        """Run nodes [first, last) on ``env`` (tensor name -> integers) in place, freeing dead tensors."""
        rounding = rounding or self.rounding
        for i in range(first, last):
            node = self.nodes[i]
            env[node.output] = node.run(kernels, [env[t] for t in node.inputs], rounding, weights)
            for t in node.inputs:
                if self._last_use.get(t) == i and t != self.output_name:
                    env.pop(t, None)
        return env

    def prefix(self, x: np.ndarray, until: str, *, weights: dict | None = None, backend="numba",
               rounding: str | None = None, varying: frozenset | None = None) -> dict:
        """Run the nodes before ``until`` (with ``weights`` replacing stored ones, e.g. layers trained in an
        earlier selection period) and return the tensors still live there (a cache for forward)."""
        env = {self.input_name: self.quantize_input(x)}
        return self._execute(env, 0, self.index(until), backend, weights, rounding or self.rounding, varying)

    def advance(self, cache: dict, start: str, until: str | None, *, weights: dict | None = None, backend="numba",
                rounding: str | None = None, varying: frozenset | None = None, consume: bool = False) -> dict:
        """Run the nodes from ``start`` up to (not including) ``until`` (None: to the end) on a ``prefix`` cache
        and return the tensors live there: the cache at ``until`` (what a trainer reads the head's input features from).
        ``consume``: run on ``cache`` itself, freeing its tensors as they die, instead of on a copy (for a
        caller that has no more use for it: its tensors are then not held for the whole call)."""
        rounding = check_rounding(rounding or self.rounding)
        last = len(self.nodes) if until is None else self.index(until)
        return self._execute(cache if consume else dict(cache), self.index(start), last, backend,
                             weights, rounding, varying)

    def widens(self, name: str, backend="numba") -> bool:
        """Whether ``advance_each`` runs copies of node ``name`` together: a dense layer on a kernel backend
        (a segment backend runs whole segments; splitting one at each copy's first layer would cost a call)."""
        node = self.node(name)
        return segment_runner(backend) is None and isinstance(node, WeightedNode) and node.widens

    def advance_each(self, cache: dict, start: str, weight_sets: Sequence[dict], *, backend="numba",
                     rounding: str | None = None, varying: frozenset | None = None) -> Iterator[tuple[dict, dict]]:
        """For each of ``weight_sets`` in turn, (the cache after node ``start``, run from a ``prefix`` cache,
        and the weight set): a set is read from ``weight_sets`` once, so a lazy sequence is made once.

        A trainer's perturbed copies of one layer read the same input: on a kernel backend (the only kind
        taken), copies of a dense layer run together as one wider layer (``WeightedNode.run_wide``: one
        unfolding of the input, one packing, one call), in chunks whose outputs together take no more memory
        than the layer's input or 1 MB. The integers are those of separate calls. Take each cache before
        asking for the next: the generator holds none of them."""
        rounding = check_rounding(rounding or self.rounding)
        first = self.index(start)
        node, kernels = self.nodes[first], get_backend(backend)

        def alone(w):
            return self.run_nodes(dict(cache), first, first + 1, kernels, w, rounding)

        w = weight_sets[0]
        env = alone(w)
        x = cache[node.inputs[0]]
        chunk = max(1, max(x.nbytes, WIDE_OUTPUT_BYTES) // max(1, env[node.output].nbytes)) \
            if self.widens(start, backend) else 1
        yield env, w
        del env, w
        if chunk == 1:
            for i in range(1, len(weight_sets)):
                w = weight_sets[i]
                yield alone(w), w
            return
        dead = [t for t in node.inputs if self._last_use.get(t) == first and t != self.output_name]
        for begin in range(1, len(weight_sets), chunk):
            sets = weight_sets[begin:begin + chunk]
            outputs = node.run_wide(kernels, x, sets, rounding)
            for i in range(len(outputs)):
                env = {t: v for t, v in cache.items() if t not in dead}
                env[node.output], outputs[i] = np.ascontiguousarray(outputs[i]), None
                yield env, sets[i]
                del env

    def forward(self, x, *, weights: dict | None = None, start: str | None = None, backend="numba",
                rounding: str | None = None, varying: frozenset | None = None, consume: bool = False) -> np.ndarray:
        """Integer output for input ``x`` (float array, integer array, or with ``start`` a ``prefix`` cache).
        ``varying``: the weight keys that change from call to call (a trainer's selection); a segment backend
        keeps every other layer's ``weights`` fixed in its session, so name every key that may change.
        ``consume``: as for ``advance``."""
        rounding = check_rounding(rounding or self.rounding)
        if start is None:
            env, first = {self.input_name: self.quantize_input(x)}, 0
        else:
            if not isinstance(x, dict):
                raise TypeError("with start=, pass the dict returned by graph.prefix(x, until=start)")
            env, first = (x if consume else dict(x)), self.index(start)
        return self._execute(env, first, len(self.nodes), backend, weights, rounding, varying)[self.output_name]

    def _execute(self, env: dict, first: int, last: int, backend, weights: dict | None, rounding: str,
                 varying: frozenset | None = None) -> dict:
        """Nodes [first, last) on a backend: kernel by kernel, or (onnxruntime) as one exported segment."""
        run_segment = segment_runner(backend)
        if run_segment is not None:
            return run_segment(self, env, first, last, weights, rounding, varying)
        return self.run_nodes(env, first, last, get_backend(backend), weights, rounding)

    def forward_float(self, x, **kwargs) -> np.ndarray:
        """Dequantized output (e.g. float32 logits)."""
        return dequantize(self.forward(x, **kwargs), self.output_params)

    def shapes(self, input_shape: tuple) -> dict[str, tuple]:
        """Shape of every tensor for an input shape, found by running zeros through the fast backend."""
        check_input_shape(input_shape, self.metadata.get("input_shape"), self.input_name, "input")
        env = {self.input_name: np.full(input_shape, self.input_params.zero_point, self.input_params.dtype)}
        shapes = {self.input_name: tuple(input_shape)}
        kernels = get_backend("numba")
        for node in self.nodes:
            env[node.output] = node.run(kernels, [env[t] for t in node.inputs], self.rounding)
            shapes[node.output] = env[node.output].shape
        return shapes

    def macs(self, input_shape: tuple) -> dict[str, int]:
        """Multiply-accumulates per node for one forward call on ``input_shape``."""
        shapes = self.shapes(input_shape)
        return {n.name: n.macs([shapes[t] for t in n.inputs], shapes[n.output]) for n in self.nodes}
