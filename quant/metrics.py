"""How close a quantized model's outputs are to the float model's."""
from __future__ import annotations

import numpy as np


def top1_agreement(reference: np.ndarray, approx: np.ndarray) -> float:
    """Fraction of inputs whose arg-max class is the same."""
    return float(np.mean(np.argmax(reference, axis=1) == np.argmax(approx, axis=1)))


def snr_db(reference: np.ndarray, approx: np.ndarray) -> float:
    """Signal-to-noise ratio of ``approx`` against ``reference``, in dB: 10 log10(|ref|^2 / |ref - approx|^2)."""
    reference = np.asarray(reference, np.float64)
    noise = np.sum((reference - np.asarray(approx, np.float64)) ** 2)
    return float("inf") if noise == 0 else float(10 * np.log10(np.sum(reference ** 2) / noise))
