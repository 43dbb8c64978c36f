"""Losses on the integer logits of a QGraph."""
from __future__ import annotations

import numpy as np

from quant.tensor import QParams, dequantize


def cross_entropy(logits_int: np.ndarray, params: QParams, labels: np.ndarray) -> float:
    """Mean cross-entropy of the dequantized logits, computed in float64 (log-sum-exp, stable)."""
    logits = dequantize(logits_int, params).astype(np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    loss = -float(np.mean(log_probs[np.arange(len(labels)), labels]))
    if not np.isfinite(loss):
        raise FloatingPointError("the loss is NaN/inf: lower --lr or --eps, or check the data for NaN")
    return loss


def top1(logits_int: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(logits_int, axis=1) == labels))
