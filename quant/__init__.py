"""quant: an int8/int16 inference engine with integer semantics spelled out (no torch in here)."""
import os

import numba

# numba's default OpenMP threads spin after each parallel loop and starve the BLAS threads that run the
# next layer's matrix product (a 10x slowdown at batch 1, measured): use numba's own work queue instead.
if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "workqueue"

from .fixedpoint import ROUNDING_MODES, Requant, requantize
from .tensor import QParams, QTensor, dequantize, quantize

__all__ = ["ROUNDING_MODES", "Requant", "requantize", "QParams", "QTensor", "quantize", "dequantize"]
