"""A task's data as the trainer takes it: train and test splits already in the model's input format.

Whatever the source (a registered data set converted for a zoo model, or a user's ``.npz`` / image
folder), the trainer sees one type, checked once when it is made, so that a bad array is refused with its
name and the index of the first bad sample, not met as a crash in the middle of an epoch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class TrainData:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    x_calibration: np.ndarray | None = None  # what the model is quantized on (default: the training inputs)
    notes: list[str] = field(default_factory=list)  # conversions made on the way in, to tell the user

    def __post_init__(self):
        """Refuse data the loop would fail on mid-run, or silently mis-learn from."""
        for split in ("train", "test"):
            x, y = np.asarray(getattr(self, f"x_{split}")), np.asarray(getattr(self, f"y_{split}"))
            if x.ndim < 2 or y.ndim != 1 or len(x) != len(y) or not len(x):
                raise ValueError(f"x_{split} {x.shape} and y_{split} {y.shape} must hold samples (N, C, H, W) "
                                 f"or (N, F) and one label each (N,), N > 0")
            check_finite(x, f"x_{split}")
            if not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
                raise ValueError(f"y_{split} must hold class indices (integers >= 0), got {y.dtype} "
                                 f"from {y.min()} to {y.max()}")
        if self.x_calibration is not None:
            if len(self.x_calibration) == 0:
                raise ValueError("x_calibration is empty: drop it (the training inputs calibrate then) or give "
                                 "it samples")
            check_finite(self.x_calibration, "x_calibration")
        for name in ("x_test", "x_calibration"):
            other = getattr(self, name)
            if other is not None and np.shape(other)[1:] != np.shape(self.x_train)[1:]:
                raise ValueError(f"x_train samples are {np.shape(self.x_train)[1:]} but {name} samples are "
                                 f"{np.shape(other)[1:]}: give every split the model's input shape")

    @property
    def calibration(self) -> np.ndarray:
        return self.x_train if self.x_calibration is None else self.x_calibration

    @property
    def classes(self) -> int:
        """Classes the labels need: one more than the largest label of either split."""
        return int(max(self.y_train.max(), self.y_test.max())) + 1


def check_finite(x: np.ndarray, name: str) -> None:
    """Refuse NaN/inf, naming the array, how many samples and the first one."""
    bad = ~np.isfinite(np.asarray(x).reshape(len(x), -1)).all(axis=1)
    if bad.any():
        axes = tuple(range(1, np.ndim(x)))
        raise ValueError(f"{name} holds NaN or inf in {int(bad.sum())} of {len(x)} samples (the first at index "
                         f"{int(np.argmax(bad))}): repair or drop them, e.g. keep = np.isfinite({name})"
                         f".all(axis={axes})")
