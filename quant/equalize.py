"""Activation equalization: per-channel factors folded into the weights around a tensor, so that one
per-tensor activation scale serves channels whose ranges differ by 10x or more.

Why: an 8-bit activation tensor has one scale, set by its widest channel; a channel with a tenth of that
range keeps about five bits. In MobileNetV2 this is what limits w8a8 (docs/engine.md). Multiplying
channel ``c`` of a tensor by ``s[c] > 0`` and dividing the weights that read channel ``c`` by the same
factor leaves the float model unchanged (Nagel et al. 2019, "Data-Free Quantization", cross-layer
equalization; SmoothQuant, Xiao et al. 2023, for the split between activations and weights):

- the producers' output rows (conv/linear weight[c] and bias[c]) are multiplied by ``s[c]``; weights are
  quantized per output channel, so their integers do not change, only their scales;
- the consumers' input columns are divided by ``s[c]``. A depthwise consumer has one input channel per
  output channel, so this too only changes per-channel scales: equalizing a conv -> depthwise pair is
  free, and its channels are stretched to the full range (alpha = 1, up to the cap below). A dense consumer
  pays in weight resolution for what the activation gains, so its tensors are stretched part of the way
  (``s = (A / a_c) ** alpha`` with A the widest channel's magnitude, a_c channel c's): alpha 1/2 with
  8-bit weights (SmoothQuant's even split), 1 with 16-bit weights, which have bits to spare: the best
  logit SNR of 0.25 / 0.5 / 0.75 / 1 on MobileNetV2 (scripts/measure_equalization.py, docs/engine.md).

No factor exceeds 8. A stretched channel saturates at its own calibrated maximum instead of the widest
channel's, so a channel that was nearly silent in calibration and fires on new data (a new domain, or a
calibration set of a few photos) would clip: the cap keeps headroom for the narrowest channels, at no
measurable cost at 8 bits. 16-bit activations are not equalized at all: they have the resolution, and only
the clipping would remain (MobileNetV2 w16a16: 52.9 dB logit SNR without, 49.2 dB with factors capped at 2).

Tensors joined by an Add or a pooling share one set of factors (a *group*: a residual stream is one). A
group is left alone if any of its tensors is the graph's input or output, is read by a Reshape, Concat or
standalone Clip (which would mix or clamp channels), or is clamped by a fused activation other than
ReLU/ReLU6 in a way that scaling would move. Factors are >= 1 and the widest channel keeps factor 1,
so a ReLU6 that saturates a channel still saturates it at 6: on the calibration data the equalized float
model computes exactly the original's values, channel by channel rescaled.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .calibration import Calibration

EQUALIZE_MODES = ("none", "depthwise", "all")
MAX_FACTOR = 8.0  # headroom kept for channels that exceed their calibrated range (module docstring)
_PASS_THROUGH = ("add", "maxpool", "avgpool")  # ops whose output shares its inputs' channel factors


def dense_alpha(weight_bits: int) -> float:
    """How far a tensor read by a dense layer is stretched towards its widest channel (module docstring)."""
    return 1.0 if weight_bits > 8 else 0.5


def check_equalize(mode: str) -> str:
    if mode not in EQUALIZE_MODES:
        raise ValueError(f"unknown equalize {mode!r}: use 'none', 'depthwise' (conv -> depthwise pairs, exact "
                         f"weight integers) or 'all' (also tensors read by dense layers)")
    return mode


@dataclass(frozen=True)
class Equalization:
    """Which tensors are equalized and how far (the module docstring says why these defaults)."""

    mode: str = "all"
    alpha: float | None = None  # dense consumers' migration strength; None: by weight bits (dense_alpha)
    max_factor: float = MAX_FACTOR
    wide_activations: bool = False  # also equalize 16-bit activations (measured worse: only clipping remains)

    def __post_init__(self):
        check_equalize(self.mode)
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"equalization alpha must be in [0, 1], got {self.alpha}")
        if not self.max_factor >= 1.0:
            raise ValueError(f"equalization max_factor must be >= 1, got {self.max_factor}")

    @classmethod
    def of(cls, setting: "str | Equalization") -> "Equalization":
        return setting if isinstance(setting, cls) else cls(mode=setting)


@dataclass
class _Group:
    tensors: set[str] = field(default_factory=set)
    producers: list = field(default_factory=list)
    consumers: list = field(default_factory=list)  # (layer, tensor it reads)
    usable: bool = True


def _is_depthwise(layer) -> bool:
    """Each output channel reads exactly one input channel (depthwise, any channel multiplier)."""
    return layer.kind == "conv" and layer.weight.shape[1] == 1


def _groups(layers, input_name: str, output_name: str) -> list[_Group]:
    parent: dict[str, str] = {}

    def find(t: str) -> str:
        while parent.setdefault(t, t) != t:
            t = parent[t]
        return t

    for layer in layers:
        find(layer.output)
        if layer.kind in _PASS_THROUGH:
            for t in layer.inputs:
                parent[find(t)] = find(layer.output)
    groups: dict[str, _Group] = {}
    for layer in layers:
        group = groups.setdefault(find(layer.output), _Group())
        group.tensors.add(layer.output)
        group.producers.append(layer)
    for layer in layers:
        for t in layer.inputs:
            group = groups.setdefault(find(t), _Group())
            group.tensors.add(t)
            group.consumers.append((layer, t))
            if layer.kind not in ("conv", "linear") + _PASS_THROUGH:
                group.usable = False
    for group in groups.values():
        if input_name in group.tensors or output_name in group.tensors:
            group.usable = False
        calibrated = [p for p in group.producers if p.calibrated]
        for p in group.producers:
            if p.kind not in ("conv", "linear") + _PASS_THROUGH:
                group.usable = False
            elif p.act is not None and (p.act[0] not in (0.0, -np.inf)
                                        or (np.isfinite(p.act[1]) and len(calibrated) > 1)):
                group.usable = False  # a clamp that per-channel factors would move (see the module docstring)
    return list(groups.values())


def _factors(group: _Group, calibration: Calibration, alpha: float, max_factor: float) -> np.ndarray:
    magnitude = None
    for p in group.producers:
        if p.calibrated:
            stats = calibration.stats[p.output]
            a = np.maximum(np.abs(stats.channel_min), np.abs(stats.channel_max))
            magnitude = a if magnitude is None else np.maximum(magnitude, a)
    widest = magnitude.max()
    safe = np.where(magnitude > 0, magnitude, widest)  # a dead channel keeps factor 1
    return np.minimum((widest / safe) ** alpha, max_factor) if widest > 0 else np.ones_like(magnitude)


def _scale_input_channels(layer, factors: np.ndarray) -> None:
    """Divide the weights that read input channel c by factors[c] (conv with groups, or linear)."""
    if layer.kind == "linear":
        layer.weight = (layer.weight / factors[None, :]).astype(np.float32)
        return
    out_channels, per_group = layer.weight.shape[:2]
    groups = factors.size // per_group
    by_output = factors.reshape(groups, per_group).repeat(out_channels // groups, axis=0)  # (O, I/g)
    layer.weight = (layer.weight / by_output[:, :, None, None]).astype(np.float32)


def equalize(layers, input_name: str, output_name: str, calibration: Calibration,
             setting: str | Equalization = "all", weight_bits: int = 8,
             activation_bits: int = 8) -> dict[str, np.ndarray]:
    """Rescale the float layers in place; returns the factors of every equalized tensor (its calibration
    statistics are to be read through them, ``Calibration.range_of(..., factors=...)``)."""
    setting = Equalization.of(setting)
    mode = setting.mode
    if mode == "none" or (activation_bits > 8 and not setting.wide_activations):
        return {}
    alpha = dense_alpha(weight_bits) if setting.alpha is None else setting.alpha
    applied: dict[str, np.ndarray] = {}
    for group in _groups(layers, input_name, output_name):
        free = all(_is_depthwise(layer) for layer, _ in group.consumers if layer.kind in ("conv", "linear"))
        if not group.usable or not group.consumers or (mode == "depthwise" and not free):
            continue
        factors = _factors(group, calibration, 1.0 if free else alpha, setting.max_factor)
        if np.all(factors == 1.0):
            continue
        for p in group.producers:
            if p.kind in ("conv", "linear"):
                shape = (-1,) + (1,) * (p.weight.ndim - 1)
                p.weight = (p.weight * factors.reshape(shape)).astype(np.float32)
                p.bias = (p.bias * factors).astype(np.float32)
        for layer, _ in group.consumers:
            if layer.kind in ("conv", "linear"):
                _scale_input_channels(layer, factors)
        applied.update({t: factors for t in group.tensors})
    return applied
