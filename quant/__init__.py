"""quant: an int8/int16 inference engine with integer semantics spelled out (no torch in here)."""
from .fixedpoint import ROUNDING_MODES, Requant, requantize
from .tensor import QParams, QTensor, dequantize, quantize

__all__ = ["ROUNDING_MODES", "Requant", "requantize", "QParams", "QTensor", "quantize", "dequantize"]
