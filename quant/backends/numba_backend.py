"""The fast backend: numba loops and exact float BLAS, tested to match the reference integer for integer."""
from ..fixedpoint import requantize_numba
from ..ops.add import add_numba
from ..ops.conv import conv_numba
from ..ops.linear import linear_numba
from ..ops.pool import avgpool_numba, maxpool_numba
from . import Kernels

KERNELS = Kernels("numba", conv_numba, linear_numba, requantize_numba, add_numba, maxpool_numba, avgpool_numba)
