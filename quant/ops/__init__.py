"""One module per op family, each with a numpy reference kernel and a numba kernel."""
from .add import QAdd
from .base import Node, WeightedNode
from .conv import ConvGeometry, QConv
from .linear import QLinear
from .pool import PoolGeometry, QAvgPool, QMaxPool
from .shape import QClamp, QConcat, QReshape

__all__ = ["Node", "WeightedNode", "QConv", "ConvGeometry", "QLinear", "QAdd", "QMaxPool", "QAvgPool",
           "PoolGeometry", "QReshape", "QClamp", "QConcat"]
