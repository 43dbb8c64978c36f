"""Memory and cost of inference, forward-gradient training and backprop on a QGraph, for one device.

Accounting (per the TFLite Micro planner and the tiny-training / TraDy papers):
- inference: the activation arena, tensors placed greedily by size over their lifetimes (TFLite Micro's
  GreedyMemoryPlanner), CMSIS-NN-style im2col scratch inside it; weights and biases stay in flash;
- ZO training adds only what a forward pass does not have: the selected channels (and their layers'
  biases) copied into SRAM at training precision, a momentum copy if used, m seeds and projected
  gradients, and the cached prefix activation (the input of the first trainable layer, one per sample
  of the batch) that lets 2m calls skip the prefix; with the head's exact gradient, the head's input
  features for the batch and its 32-bit gradient sums;
- backprop on the same selection must keep every activation from the first trainable layer on (inputs
  of every later node, at activation precision), two activation-gradient buffers (32-bit), 32-bit
  weight gradients of the selected weights, the trainable copy and optimizer state.
Costs: MACs per forward, per ZO step (prefix once + 2m suffixes) and per backprop step (forward plus
about twice the trained suffix for input and weight gradients), turned into cycles, seconds and energy
with the profile's MACs/cycle, clock and energy per MAC and per byte moved.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from quant.graph import QGraph
from quant.ops import QConv, WeightedNode

from .profiles import Profile


@dataclass(frozen=True)
class Tensor:
    name: str
    size: int  # bytes
    first: int  # node index that produces it (-1: the graph input)
    last: int  # last node index that reads it
    elements: int = 0


def tensor_lifetimes(graph: QGraph, sample_shape: tuple) -> list[Tensor]:
    """Every activation tensor of one sample with its bytes and lifetime, plus per-node scratch."""
    shapes = graph.shapes((1,) + tuple(sample_shape))
    produced = {graph.input_name: -1} | {n.output: i for i, n in enumerate(graph.nodes)}
    last = {name: first for name, first in produced.items()}
    for i, node in enumerate(graph.nodes):
        for t in node.inputs:
            last[t] = max(last[t], i)
    last[graph.output_name] = len(graph.nodes)
    tensors = []
    for name, first in produced.items():
        elements = int(np.prod(shapes[name]))
        tensors.append(Tensor(name, elements * graph.params_of(name).bits // 8, first, last[name], elements))
    for i, node in enumerate(graph.nodes):
        scratch = scratch_bytes(node)
        if scratch:
            tensors.append(Tensor(f"{node.name}:scratch", scratch, i, i))
    return tensors


def scratch_bytes(node) -> int:
    """CMSIS-NN's im2col buffer for a kxk convolution: two columns of int16 (K = Cin/g * kh * kw each)."""
    if isinstance(node, QConv):
        o, cg, kh, kw = node.weight.shape
        if kh * kw > 1 and not (cg == 1 and node.geometry.groups == o):
            return 2 * cg * kh * kw * 2
    return 0


def greedy_arena(tensors: list[Tensor]) -> int:
    """Peak bytes of TFLite Micro's greedy-by-size placement: biggest first, each at the lowest offset
    that does not collide with an already placed tensor alive at the same time."""
    placed: list[tuple[int, int, Tensor]] = []  # (offset, end, tensor)
    peak = 0
    for t in sorted(tensors, key=lambda t: (-t.size, t.first)):
        busy = sorted((o, e) for o, e, u in placed if u.first <= t.last and t.first <= u.last)
        offset = 0
        for start, end in busy:
            if offset + t.size <= start:
                break
            offset = max(offset, end)
        placed.append((offset, offset + t.size, t))
        peak = max(peak, offset + t.size)
    return peak


def engine_activation_peak(graph: QGraph, x: np.ndarray) -> int:
    """Peak bytes of the integer tensors the engine keeps alive while it runs the graph (its arena)."""
    from quant.backends import get_backend

    kernels = get_backend("numba")
    env = {graph.input_name: graph.quantize_input(x)}
    peak = sum(v.nbytes for v in env.values())
    for i, node in enumerate(graph.nodes):
        env[node.output] = node.run(kernels, [env[t] for t in node.inputs], graph.rounding)
        peak = max(peak, sum(v.nbytes for v in env.values()))
        for t in node.inputs:
            if graph._last_use.get(t) == i and t != graph.output_name:
                env.pop(t, None)
    return peak


def live_peak(tensors: list[Tensor]) -> int:
    """The lower bound any placement must reach: the most bytes alive at one node."""
    steps = range(min(t.first for t in tensors), max(t.last for t in tensors) + 1)
    return max(sum(t.size for t in tensors if t.first <= i <= t.last) for i in steps)


@dataclass
class TrainingShape:
    """What a run trains: bytes of the trainable copy, weight count, first trainable node, m, batch."""
    trainable_bytes: int
    trainable_weights: int
    first_node: int
    m: int = 4
    batch: int = 1
    momentum: bool = False
    cache_prefix: bool = True  # keep the first trainable layer's input per sample, or recompute the prefix
    exact_layers: tuple = ()  # layers with exact gradients (fwdgrad.head, .last_layer): their input and sums kept
    selected_weights: dict = field(default_factory=dict)  # layer -> weights selected (a concrete selection)
    node_layers: tuple = ()  # node perturbation (zo_params = "outputs"): layers whose outputs are perturbed


@dataclass
class Plan:
    device: str
    flash_weights: int
    inference_peak: int
    zo_peak: int
    bp_peak: int
    zo_parts: dict
    bp_parts: dict
    forward_macs: int
    zo_step_macs: int
    bp_step_macs: int
    zo_step_seconds: float
    bp_step_seconds: float
    zo_step_joules: float
    bp_step_joules: float
    fits_inference: bool
    fits_zo: bool
    fits_bp: bool

    def as_dict(self) -> dict:
        return asdict(self)


def weight_bytes(graph: QGraph) -> int:
    return sum(n.weight.nbytes + n.bias.nbytes for n in graph.weighted_nodes())


def plan(graph: QGraph, sample_shape: tuple, profile: Profile, training: TrainingShape) -> Plan:
    tensors = tensor_lifetimes(graph, sample_shape)
    arena = greedy_arena(tensors)
    by_name = {t.name: t for t in tensors}
    first = training.first_node
    suffix_nodes = graph.nodes[first:]
    prefix_input = by_name[graph.nodes[first].inputs[0]].size
    zo_parts = {"arena": arena, "prefix_cache": prefix_input * training.batch if training.cache_prefix else 0,
                "trainable": training.trainable_bytes * (2 if training.momentum else 1),
                "seeds_and_projections": training.m * (8 + 4)}
    if training.exact_layers:  # each exact layer's input for the batch and 32-bit gradient sums; below the
        # head, the layer's clamp mask too (one bit per output)
        layers = [graph.node(name) for name in training.exact_layers]
        zo_parts["exact_inputs"] = sum(by_name[n.inputs[0]].size for n in layers) * training.batch
        # 32-bit sums for the selected weights only (all of a layer's when no selection is known yet)
        zo_parts["exact_gradients"] = sum(4 * (training.selected_weights.get(n.name, n.weight.size) + n.bias.size)
                                          for n in layers)
        zo_parts["exact_masks"] = sum(-(-by_name[n.output].elements // 8) for n in layers[1:]) * training.batch
    if training.node_layers:  # node perturbation, one sample at a time (its losses need no other sample): its
        # clean pass keeps each layer's input and clamp mask; each output's noise is summed over the sample's
        # pairs, weighted by its loss differences (32 bits), then correlated with the input into the gradient sums
        layers = [graph.node(name) for name in training.node_layers]
        zo_parts["node_inputs"] = sum(by_name[n.inputs[0]].size for n in layers)
        zo_parts["node_output_sums"] = sum(4 * by_name[n.output].elements for n in layers)
        zo_parts["node_masks"] = sum(-(-by_name[n.output].elements // 8) for n in layers)
        zo_parts["node_gradients"] = sum(4 * (training.selected_weights.get(n.name, n.weight.size) + n.bias.size)
                                         for n in layers)
    stored = {t for node in suffix_nodes for t in node.inputs}
    act_grads = 2 * 4 * max(by_name[n.output].elements for n in suffix_nodes)  # two 32-bit gradient buffers
    bp_parts = {"stored_activations": sum(by_name[t].size for t in stored) * training.batch,
                "activation_gradients": act_grads * training.batch,
                "weight_gradients": 4 * training.trainable_weights,
                "trainable": training.trainable_bytes,
                "optimizer": 4 * training.trainable_weights if training.momentum else 0}
    bp_peak = (max(arena, bp_parts["stored_activations"] + bp_parts["activation_gradients"])
               + bp_parts["weight_gradients"] + bp_parts["trainable"] + bp_parts["optimizer"])
    macs = list(graph.macs((1,) + tuple(sample_shape)).values())
    forward = sum(macs)
    suffix_macs = sum(macs[first:])
    zo_macs = ((forward - suffix_macs) + 2 * training.m * suffix_macs if training.cache_prefix
               else 2 * training.m * forward)
    for i, name in enumerate(training.exact_layers):  # the exact updates' products, over the 2m calls: the
        node = graph.node(name)  # head's error x features; below it, error x head weights and x L's input
        positions = int(np.prod(by_name[node.output].elements)) // node.weight.shape[0]
        zo_macs += 2 * training.m * (node.weight.size * positions + (graph.node(training.exact_layers[0]).weight.size
                                                                     if i else 0))
    if training.node_layers:  # the clean pass, and one correlation of the output sums with the input per layer
        zo_macs += suffix_macs
        for node in map(graph.node, training.node_layers):
            zo_macs += node.weight.size * (by_name[node.output].elements // node.weight.shape[0])
    bp_macs = forward + 2 * suffix_macs
    moved = sum(t.size for t in tensors) + weight_bytes(graph)  # bytes one forward reads and writes, roughly
    suffix_share = suffix_macs / forward if forward else 1.0

    def seconds(m):
        return m / profile.macs_per_cycle / (profile.clock_mhz * 1e6)

    def joules(m, passes):
        return (m * profile.energy_per_mac_pj + passes * moved * profile.energy_per_byte_pj) * 1e-12

    sram, flash = profile.sram_bytes, profile.flash_bytes
    zo_peak = sum(zo_parts.values())
    return Plan(profile.name, weight_bytes(graph), arena, zo_peak, bp_peak, zo_parts, bp_parts, forward,
                zo_macs * training.batch, bp_macs * training.batch, seconds(zo_macs) * training.batch,
                seconds(bp_macs) * training.batch, joules(zo_macs, 1 + 2 * training.m * suffix_share) * training.batch,
                joules(bp_macs, 1 + 2 * suffix_share) * training.batch,
                _fits(arena, sram) and _fits(weight_bytes(graph), flash),
                _fits(zo_peak, sram) and _fits(weight_bytes(graph), flash),
                _fits(bp_peak, sram) and _fits(weight_bytes(graph), flash))


def _fits(need: int, have: int | None) -> bool:
    return have is None or need <= have


def selection_shape(graph: QGraph, selection: dict, *, m: int, batch: int, momentum: bool, bias: bool) -> TrainingShape:
    """The training shape of a concrete channel selection (what the trainer picked)."""
    from fwdgrad.channels import selection_bytes, weights_per_channel

    first = min(graph.index(name) for name in selection)
    selected = {name: weights_per_channel(graph.node(name)) * len(ch) for name, ch in selection.items()}
    return TrainingShape(selection_bytes(graph, selection, False, bias), sum(selected.values()), first, m, batch,
                         momentum, selected_weights=selected)


def budget_shape(graph: QGraph, sample_shape: tuple, budget_bytes: int, *, method: str, m: int, batch: int,
                 momentum: bool, bits: int) -> TrainingShape:
    """The worst case of any selection within a budget, before the run picks one: the full budget (or the
    whole model, when it holds less) trainable, starting where it costs most: for ZO at the weighted layer with the largest input (the
    biggest prefix cache), for backprop at the first weighted layer (the most stored activations)."""
    from fwdgrad.channels import bias_bytes, channel_bytes, input_channels

    weighted = [i for i, n in enumerate(graph.nodes) if isinstance(n, WeightedNode)]
    # a budget above everything the model holds trains all of it, no more
    budget_bytes = min(budget_bytes, sum(channel_bytes(graph.nodes[i]) * input_channels(graph.nodes[i])
                                         + bias_bytes(graph.nodes[i]) for i in weighted))
    if method == "zo":
        sizes = {t.name: t.size for t in tensor_lifetimes(graph, sample_shape)}
        first = max(weighted, key=lambda i: sizes[graph.nodes[i].inputs[0]])
    else:
        first = weighted[0]
    return TrainingShape(budget_bytes, budget_bytes * 8 // bits, first, m, batch, momentum)


def require_fit(graph: QGraph, sample_shape: tuple, profile: Profile, training: TrainingShape, method: str) -> Plan:
    """The plan, or a ValueError with the numbers and what to change when the run does not fit."""
    result = plan(graph, sample_shape, profile, training)
    need = result.zo_peak if method == "zo" else result.bp_peak
    if profile.flash_bytes is not None and result.flash_weights > profile.flash_bytes:
        raise ValueError(f"the model's weights need {result.flash_weights / 1024:.0f} KB of flash, device "
                         f"{profile.name} has {profile.flash_kb} KB: use a smaller model or width")
    if profile.sram_bytes is not None and need > profile.sram_bytes:
        parts = result.zo_parts if method == "zo" else result.bp_parts
        detail = ", ".join(f"{k.replace('_', ' ')} {v / 1024:.0f} KB" for k, v in parts.items() if v)
        raise ValueError(f"{'ZO training' if method == 'zo' else 'backprop'} needs {need / 1024:.0f} KB SRAM "
                         f"({detail}), device {profile.name} has {profile.sram_kb} KB: lower --budget, "
                         f"use a smaller --resolution, or use w8a8")
    return result
