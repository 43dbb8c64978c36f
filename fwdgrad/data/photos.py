"""Real colour photographs that ship inside installed wheels, as ImageNet-normalised batches.

With no network, the only real natural photos available are the few bundled in
scikit-image's and scikit-learn's wheels (scikit-image's other images are fetched with
pooch and fail offline). To get ``n`` inputs we take deterministic random crops of them:
every image is a real photo, but crops of the same photo are strongly correlated, so
treat a batch as ~7 independent scenes, not ``n``. Good enough for calibration ranges and
for checking that a pretrained model sees natural image statistics; not a test set.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import skimage.data
import skimage.transform
from sklearn.datasets import load_sample_images

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

# Bundled natural colour photos. Left out on purpose: skimage's cat (same image as
# chelsea), motorcycle right view (near-duplicate of left), retina / hubble_deep_field /
# immunohistochemistry (medical, astronomical, microscopy: not natural scenes) and the
# greyscale or synthetic images.
_SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


@lru_cache(maxsize=1)
def bundled_photos() -> tuple[tuple[str, np.ndarray], ...]:
    """(name, HxWx3 uint8) for every bundled natural colour photo, in a fixed order."""
    photos = [(name, getattr(skimage.data, name)()) for name in _SKIMAGE_PHOTOS]
    photos.append(("motorcycle", skimage.data.stereo_motorcycle()[0]))
    sample = load_sample_images()
    photos += [(Path(f).stem, img) for f, img in zip(sample.filenames, sample.images)]
    for _, img in photos:
        img.setflags(write=False)  # shared through the cache
    return tuple(photos)


def _normalise(square: np.ndarray, resolution: int) -> np.ndarray:
    """HxWx3 uint8 square crop -> 3xRxR float32, resized with anti-aliasing, ImageNet-normalised."""
    img = skimage.transform.resize(square.astype(np.float32) / 255.0, (resolution, resolution), anti_aliasing=True)
    return ((img - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1).astype(np.float32)


def photo_to_input(image: np.ndarray, resolution: int = 224) -> np.ndarray:
    """Centre square crop of an HxWx3 uint8 photo as a 3xRxR ImageNet-normalised float32 array."""
    h, w = image.shape[:2]
    s = min(h, w)
    y, x = (h - s) // 2, (w - s) // 2
    return _normalise(image[y : y + s, x : x + s], resolution)


PHOTO_SETS = ("bundled", "debian")


def photo_set(name: str) -> tuple[tuple[str, np.ndarray], ...]:
    """The photos of a set: ``bundled`` (the seven above) or ``debian`` (41 others, fetched on first use:
    fwdgrad.data.debian_photos)."""
    if name == "bundled":
        return bundled_photos()
    if name == "debian":
        from .debian_photos import debian_photos

        return debian_photos()
    raise ValueError(f"unknown photo set {name!r}: choose one of {', '.join(PHOTO_SETS)}")


def real_photos_with_sources(n: int, resolution: int = 224, seed: int = 0,
                             photos: str = "bundled") -> tuple[np.ndarray, list[str]]:
    """``n`` random crops (N x 3 x R x R float32) of the set ``photos`` and the name of the photo each
    came from.

    Crop i comes from ``photo_set(photos)[i % len(...)]`` (every photo used evenly); its side is a
    uniform 0.35-1.0 of the photo's short side, its position uniform, and it is flipped
    horizontally with probability 1/2. Same arguments give the same array.
    """
    photos = photo_set(photos)
    rng = np.random.default_rng(seed)
    out = np.empty((n, 3, resolution, resolution), dtype=np.float32)
    sources = []
    for i in range(n):
        name, img = photos[i % len(photos)]
        h, w = img.shape[:2]
        side = max(1, round(min(h, w) * rng.uniform(0.35, 1.0)))
        y = rng.integers(0, h - side + 1)
        x = rng.integers(0, w - side + 1)
        crop = img[y : y + side, x : x + side]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        out[i] = _normalise(crop, resolution)
        sources.append(name)
    return out, sources


def real_photos(n: int, resolution: int = 224, seed: int = 0, photos: str = "bundled") -> np.ndarray:
    """``n`` ImageNet-normalised crops of real photos (the set ``photos``), N x 3 x R x R float32."""
    return real_photos_with_sources(n, resolution, seed, photos)[0]
