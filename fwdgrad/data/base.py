"""What every data-set loader returns, and where loaders cache what they build.

One small shared type keeps the registry, the trainer and the audio/image loaders interchangeable:
images (or log-mel "images") as float32 NCHW in [0, 1], integer labels, and the class names.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Dataset:
    name: str
    split: str
    images: np.ndarray  # float32 (N, C, H, W), values in [0, 1]
    labels: np.ndarray  # int64 (N,), values in [0, num_classes)
    class_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.labels)

    def check(self) -> "Dataset":
        """Refuse data the trainer would silently mis-learn from (NaNs, wrong ranges, bad labels)."""
        if self.images.ndim != 4 or self.images.dtype != np.float32:
            raise ValueError(f"{self.name}/{self.split}: images must be float32 (N, C, H, W), "
                             f"got {self.images.dtype} {self.images.shape}")
        if len(self.images) != len(self.labels):
            raise ValueError(f"{self.name}/{self.split}: {len(self.images)} images but {len(self.labels)} labels")
        if not np.isfinite(self.images).all():
            raise ValueError(f"{self.name}/{self.split}: images contain NaN or inf; delete the cache "
                             f"({cache_dir('data')}) and load again")
        if self.images.min() < 0 or self.images.max() > 1:
            raise ValueError(f"{self.name}/{self.split}: images must lie in [0, 1], "
                             f"got [{self.images.min()}, {self.images.max()}]")
        if self.labels.min() < 0 or self.labels.max() >= self.num_classes:
            raise ValueError(f"{self.name}/{self.split}: labels outside [0, {self.num_classes})")
        return self


def cache_dir(kind: str) -> Path:
    """``$FWDGRAD_CACHE/<kind>`` if set, else ``~/.cache/fwdgrad/<kind>`` (created)."""
    root = os.environ.get("FWDGRAD_CACHE")
    path = (Path(root) if root else Path.home() / ".cache" / "fwdgrad") / kind
    path.mkdir(parents=True, exist_ok=True)
    return path
