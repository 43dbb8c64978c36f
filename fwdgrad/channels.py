"""Input channels of weighted layers: the unit that is selected, perturbed and updated.

Channel ``c`` of a layer is every weight that reads input channel ``c`` (TraDy's unit): ``w[:, c]`` for a
dense convolution or a linear layer, ``w[c]`` for a depthwise one, and the ``c % cg`` slice of its group's
filters for a grouped one. A selection maps layer names to sorted channel indices.
"""
from __future__ import annotations

import numpy as np

from quant.ops import QConv, WeightedNode

Selection = dict[str, np.ndarray]


def input_channels(node: WeightedNode) -> int:
    if isinstance(node, QConv):
        return node.weight.shape[1] * node.geometry.groups
    return node.weight.shape[1]


def channel_mask(node: WeightedNode, channels) -> np.ndarray:
    """Boolean array shaped like the weights, true on the weights that read the given input channels."""
    mask = np.zeros(node.weight.shape, dtype=bool)
    channels = np.asarray(channels, dtype=np.int64)
    if isinstance(node, QConv) and node.geometry.groups > 1:
        cg = node.weight.shape[1]
        og = node.weight.shape[0] // node.geometry.groups
        for c in channels:
            group, local = divmod(int(c), cg)
            mask[group * og:(group + 1) * og, local] = True
    else:
        mask[:, channels] = True
    return mask


def weights_per_channel(node: WeightedNode) -> int:
    """How many weights one input channel owns (the same for every channel of a layer)."""
    return int(node.weight.size // input_channels(node))


def channel_bytes(node: WeightedNode) -> int:
    """Bytes of one input channel's weights at training precision (the weights' bit width)."""
    return weights_per_channel(node) * node.w_params.bits // 8


def bias_bytes(node: WeightedNode) -> int:
    """Bytes of a layer's bias (int32, or int64 beside 16-bit operands), trained whole with its layer."""
    return int(node.bias.size * node.bias.dtype.itemsize)


def selection_bytes(graph, selection: Selection, momentum: bool = False, bias: bool = False) -> int:
    """Trainable bytes of a selection: the channels' weights, the selected layers' biases when they train,
    and a momentum copy of both at the same width."""
    total = sum(channel_bytes(graph.node(name)) * len(chans) for name, chans in selection.items())
    if bias:
        total += sum(bias_bytes(graph.node(name)) for name in selection)
    return total * (2 if momentum else 1)


def selection_count(selection: Selection) -> int:
    return int(sum(len(c) for c in selection.values()))


def per_channel_sum(node: WeightedNode, values: np.ndarray) -> np.ndarray:
    """Sum of a weight-shaped array over each input channel's weights (length: input channels)."""
    if isinstance(node, QConv) and node.geometry.groups > 1:
        groups = node.geometry.groups
        o, cg = values.shape[:2]
        return values.reshape(groups, o // groups, cg, -1).sum(axis=(1, 3)).reshape(-1)
    return values.sum(axis=tuple(i for i in range(values.ndim) if i != 1))
