"""What every node of a QGraph is: named integer inputs -> one named integer output with its params."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..fixedpoint import OutputSpec, Requant
from ..tensor import QParams
from .packing import freeze


@dataclass
class Node:
    name: str
    inputs: list[str]
    output: str
    out_params: QParams

    op_type = "Node"

    def run(self, kernels, xs: list[np.ndarray], rounding: str, overrides: dict | None = None) -> np.ndarray:
        raise NotImplementedError

    def macs(self, in_shapes: list[tuple], out_shape: tuple) -> int:
        """Multiply-accumulates of one forward call (0 for data movement ops)."""
        return 0


@dataclass
class WeightedNode(Node):
    """A node with integer weights and bias: the layers the trainer can perturb and update.

    ``clamp`` is the output integer range after fused activations (ReLU/ReLU6 become clamps). ``weight``
    and ``bias`` are frozen (read-only) when set, so the numba kernels can pack them once (see
    ops.packing): give a node new integers by assigning new arrays, or pass them as ``weights=`` overrides.
    """

    in_params: QParams = None
    weight: np.ndarray = None
    w_params: QParams = None
    bias: np.ndarray = None
    clamp: tuple[int, int] = None
    requant: Requant = field(init=False)

    def __setattr__(self, name, value):
        super().__setattr__(name, freeze(value) if name in ("weight", "bias") else value)
        self.__dict__.pop("_output_specs", None)  # derived from the fields: made again when one is set

    def __setstate__(self, state):
        """Unpickled (a checkpoint, a worker process, a deepcopy) arrays come back writable: freeze them
        again, or every call would repack the layer (ops.packing caches only read-only arrays)."""
        self.__dict__.update(state)
        self.__dict__.pop("_output_specs", None)
        freeze(self.weight), freeze(self.bias)

    def __post_init__(self):
        if self.clamp is None:
            self.clamp = (self.out_params.qmin, self.out_params.qmax)
        self.requant = Requant.from_scales(self.in_params.scale, self.w_params.scale, self.out_params.scale,
                                           self.wide_accumulator)

    @property
    def wide_accumulator(self) -> bool:
        """16-bit operands need a 64-bit accumulator (TFLite 16x8 does the same)."""
        return self.in_params.bits > 8 or self.w_params.bits > 8

    @property
    def weight_key(self) -> str:
        return f"{self.name}.weight"

    @property
    def bias_key(self) -> str:
        return f"{self.name}.bias"

    def weights_from(self, overrides: dict | None) -> tuple[np.ndarray, np.ndarray]:
        overrides = overrides or {}
        return overrides.get(self.weight_key, self.weight), overrides.get(self.bias_key, self.bias)

    def compute(self, kernels, x: np.ndarray, weight: np.ndarray, bias: np.ndarray, out: OutputSpec | None):
        """The op's kernel: int64 accumulators (bias included) when ``out`` is None, else requantized."""
        raise NotImplementedError

    def accumulate(self, kernels, xs: list[np.ndarray], overrides: dict | None = None) -> np.ndarray:
        return self.compute(kernels, xs[0], *self.weights_from(overrides), None)

    def output_spec(self, rounding: str) -> OutputSpec:
        """The same object on every call while the node is unchanged, so that the kernels' prepared calls
        (ops.packing.prepared), which are kept for the very spec they were made for, are reused."""
        specs = self.__dict__.setdefault("_output_specs", {})
        if rounding not in specs:
            lo, hi = self.clamp
            specs[rounding] = OutputSpec(self.requant, self.out_params.zero_point, lo, hi, rounding, self.out_params.dtype)
        return specs[rounding]

    def run(self, kernels, xs, rounding, overrides=None):
        return self.compute(kernels, xs[0], *self.weights_from(overrides), self.output_spec(rounding))

    @property
    def widens(self) -> bool:
        """Whether copies of this layer with other weights can run as one layer with their output channels
        side by side (every output channel reads the whole input: not a grouped convolution)."""
        return True

    def run_wide(self, kernels, x: np.ndarray, weight_sets: list[dict], rounding: str) -> list[np.ndarray]:
        """The outputs on one input ``x`` of the layer under each of ``weight_sets``, from one kernel call:
        the sets' weights stacked along the output channels (each with its own bias and multiplier), so
        the input is read, padded and unfolded once. Each output channel is computed as in its own call,
        so the integers are those of separate calls."""
        pairs = [self.weights_from(w) for w in weight_sets]
        out = self.output_spec(rounding)
        rq, copies = out.requant, len(pairs)
        if rq.float32.size > 1:
            rq = Requant(*(np.tile(a, copies) for a in (rq.float32, rq.mantissa, rq.shift)))
        wide = OutputSpec(rq, out.zero_point, out.qmin, out.qmax, out.mode, out.dtype)
        y = self.compute(kernels, x, np.concatenate([w for w, _ in pairs]), np.concatenate([b for _, b in pairs]),
                         wide)
        return np.split(y, copies, axis=1)
