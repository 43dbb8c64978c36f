"""Losses on the integer logits of a QGraph."""
from __future__ import annotations

import numpy as np

from quant.tensor import QParams, dequantize


def cross_entropy(logits_int: np.ndarray, params: QParams, labels: np.ndarray) -> float:
    """Mean cross-entropy of the dequantized logits, computed in float64 (log-sum-exp, stable)."""
    loss = float(np.mean(cross_entropy_per_sample(logits_int, params, labels)))
    if not np.isfinite(loss):
        raise FloatingPointError("the loss is NaN/inf: lower --lr or --eps, or check the data for NaN")
    return loss


def cross_entropy_per_sample(logits_int: np.ndarray, params: QParams, labels: np.ndarray) -> np.ndarray:
    """Each sample's cross-entropy (what node perturbation differentiates sample by sample)."""
    logits = dequantize(logits_int, params).astype(np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return -log_probs[np.arange(len(labels)), labels]


def top1(logits_int: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(logits_int, axis=1) == labels))


LOSS_FRACTION_BITS = 16  # integer losses are Q.16 fixed point


def _exp_table(scale: float, levels: int) -> np.ndarray:
    """exp(-scale * d) in Q.16 for every possible logit gap d (one table per output scale)."""
    return np.rint(np.exp(-scale * np.arange(levels)) * (1 << LOSS_FRACTION_BITS)).astype(np.int64)


_LOG2_MANTISSA = np.rint(np.log2(1 + np.arange(256) / 256) * (1 << LOSS_FRACTION_BITS)).astype(np.int64)
_LN2_Q16 = int(round(np.log(2) * (1 << LOSS_FRACTION_BITS)))


def _ln_q16(values: np.ndarray) -> np.ndarray:
    """Natural log of positive integers, in Q.16, from the exponent and an 8-bit mantissa table."""
    values = values.astype(np.int64)
    exponent = np.floor(np.log2(values)).astype(np.int64)  # bit length - 1 (exact for int64 < 2**53)
    top = np.where(exponent >= 8, values >> np.maximum(exponent - 8, 0), values << np.maximum(8 - exponent, 0)) - 256
    log2 = (exponent << LOSS_FRACTION_BITS) + _LOG2_MANTISSA[top]
    return (log2 * _LN2_Q16) >> LOSS_FRACTION_BITS


def integer_cross_entropy(logits_int: np.ndarray, params: QParams, labels: np.ndarray) -> int:
    """Mean cross-entropy in Q.16 (see ``integer_cross_entropy_per_sample``)."""
    return int(integer_cross_entropy_per_sample(logits_int, params, labels).sum() // len(labels))


def integer_cross_entropy_per_sample(logits_int: np.ndarray, params: QParams, labels: np.ndarray) -> np.ndarray:
    """Each sample's cross-entropy in Q.16 using only integer operations and two lookup tables (no FPU).

    With gaps ``d_i = max(l) - l_i`` (integers), ``CE = ln(sum_i exp(-s d_i)) + s d_y``: the exponentials come
    from a table indexed by the gap, the logarithm from the exponent and an 8-bit mantissa table, and
    ``s d_y`` from the scale in Q.32. Its error against the float loss is a few thousandths of a nat.
    """
    logits = logits_int.astype(np.int64)
    gaps = logits.max(axis=1, keepdims=True) - logits
    scale = float(params.scale)
    table = _exp_table(scale, 1 << params.bits)
    sums = table[gaps].sum(axis=1)
    scale_q32 = int(round(scale * (1 << (2 * LOSS_FRACTION_BITS))))  # Q.32: small scales keep their digits
    label_term = (scale_q32 * gaps[np.arange(len(labels)), labels]) >> LOSS_FRACTION_BITS
    return _ln_q16(sums) - (LOSS_FRACTION_BITS * _LN2_Q16) + label_term
