"""quant: an int8/int16 inference engine with integer semantics spelled out (no torch in here)."""
import os

import numba

# numba's parallel kernels run on GNU OpenMP where the system has it (Debian's libgomp1, which `make`
# installs), else on numba's work queue. OpenMP threads spin a moment after each kernel, so the next layer's
# kernel starts at once; the work queue puts them to sleep, and waking them costs so much on a VM that a
# batch-1 layer ran on 1.1 cores out of 2 (MobileNetV2 batch 1 1.4-1.8x faster on OpenMP, measured). The
# spinning would starve a multi-threaded BLAS, which is why no kernel uses one: the fused GEMMs call
# scipy's OpenBLAS single-threaded from each numba thread (ops/exact_gemm.py).
if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER_PRIORITY = ["omp", "workqueue", "tbb"]

from .fixedpoint import ROUNDING_MODES, Requant, requantize
from .tensor import QParams, QTensor, dequantize, quantize

__all__ = ["ROUNDING_MODES", "Requant", "requantize", "QParams", "QTensor", "quantize", "dequantize"]
