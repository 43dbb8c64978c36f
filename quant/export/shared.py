"""What both formats emit alike: data movement that is the same on integers and on floats."""
from __future__ import annotations

import numpy as np

from ..ops import ConvGeometry, QMaxPool, QReshape

from .builder import Builder
from .operands import Weights


def conv_attrs(geometry: ConvGeometry, kernel: tuple[int, int]) -> dict:
    return dict(kernel_shape=list(kernel), strides=list(geometry.stride), pads=list(geometry.pads),
                dilations=list(geometry.dilation), group=geometry.groups)


def max_pool(b: Builder, node: QMaxPool, xs: list[str], weights: Weights) -> str:
    g = node.geometry
    return b.op("MaxPool", xs, node.name, kernel_shape=list(g.kernel), strides=list(g.stride), pads=list(g.pads))


def reshape(b: Builder, node: QReshape, xs: list[str], weights: Weights) -> str:
    return b.op("Reshape", [xs[0], b.const(list(node.shape), np.int64, f"{node.name}_shape")], node.name)
