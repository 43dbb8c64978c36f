"""The reference backend: plain integer numpy kernels that define the arithmetic."""
from ..fixedpoint import requantize
from ..ops.add import add_reference
from ..ops.conv import conv_reference
from ..ops.linear import linear_reference
from ..ops.pool import avgpool_reference, maxpool_reference
from . import Kernels

KERNELS = Kernels("numpy", conv_reference, linear_reference, requantize, add_reference, maxpool_reference,
                  avgpool_reference)
