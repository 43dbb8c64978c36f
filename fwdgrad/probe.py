"""New classifier heads fitted on features: the logistic-regression probe, or a seeded random start.

A least-squares probe separates as well but leaves logits near zero, where cross-entropy is flat, and every
training method then spends its first epochs rescaling the head; a softmax probe starts them on the scale
cross-entropy expects. Both zoo tasks (torch features) and user files (ONNX or integer features) use these.
"""
from __future__ import annotations

import numpy as np


def probe_head(features: np.ndarray, labels: np.ndarray, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic-regression probe (L2, C=1): W (classes, dim), b (classes)."""
    from sklearn.linear_model import LogisticRegression

    present = np.unique(labels)
    if len(present) < classes:
        missing = sorted(set(range(classes)) - set(present.tolist()))
        raise ValueError(f"the probe's training images hold {len(present)} of {classes} classes (none of class "
                         f"{missing[0]}): raise --probe-samples or --train-samples")
    probe = LogisticRegression(C=1.0, max_iter=1000).fit(features, labels)
    weight, bias = probe.coef_.astype(np.float32), probe.intercept_.astype(np.float32)
    if classes == 2:  # sklearn fits one logit for two classes: as softmax logits, (-z/2, z/2)
        weight, bias = np.concatenate([-weight / 2, weight / 2]), np.concatenate([-bias / 2, bias / 2])
    return weight, bias


def random_head(features: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """PyTorch's default Linear start: weights and bias uniform in +-1/sqrt(features), seeded."""
    rng = np.random.default_rng([seed, 0x4EAD])
    bound = 1.0 / np.sqrt(features)
    return (rng.uniform(-bound, bound, (classes, features)).astype(np.float32),
            rng.uniform(-bound, bound, classes).astype(np.float32))
