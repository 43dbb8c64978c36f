"""A user's own data: an ``.npz`` of arrays or a folder of images, checked against the model before any work.

Two layouts, the ones PyTorch users already have:

- ``.npz`` with ``x_train, y_train, x_test, y_test`` (and optionally ``x_calibration``, what the model is
  quantized on): inputs already in the model's input format, (N, C, H, W) or (N, F). float32 is taken as
  it is; float64/float16 are cast to float32 and uint8 images scaled to [0, 1] (x / 255), each conversion
  reported; (N, H, W) becomes (N, 1, H, W) for a one-channel model. Read with ``allow_pickle=False``.
- a folder of class sub-folders of images (torchvision's ImageFolder): ``DIR/<class>/*.png`` split 80/20
  per class (seeded), or ``DIR/train/<class>/`` and ``DIR/test/<class>/`` as given. Classes are the sorted
  folder names. Images are read with Pillow as grey (one-channel models) or RGB (three), resized to the
  model's input (bilinear) and scaled by ``IMAGE_SCALINGS``.

Every refusal names the array (or file), the index of the first bad sample and the fix.
"""
from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import numpy as np

from .split import TrainData

ARRAYS = ("x_train", "y_train", "x_test", "y_test")
OPTIONAL = ("x_calibration",)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pbm"}
# how pixel values in [0, 1] become model inputs: (shift, divide) per channel, x = (v - shift) / divide
IMAGE_SCALINGS = {"unit": ((0.0,), (1.0,)), "symmetric": ((0.5,), (0.5,)),
                  "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}
SCALING_TEXT = {"unit": "scaled to [0, 1]", "symmetric": "scaled to [-1, 1]",
                "imagenet": "scaled to [0, 1] and normalised with ImageNet's mean and std"}
TEST_FRACTION = 0.2


def is_data_path(name: str) -> bool:
    """Whether a data-set setting names a file or folder rather than a registered set."""
    return str(name).endswith(".npz") or "/" in str(name) or Path(name).is_dir()


def fingerprint(path: str | Path) -> str:
    """SHA-256 of a data file, or of a folder's relative file names and contents (what a run was trained on)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        digest.update(str(file.relative_to(path) if file != path else file.name).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def load_data_file(path: str | Path, sample_shape: tuple, scaling: str = "unit") -> TrainData:
    """The splits of a user's ``.npz`` or image folder, checked against ``sample_shape`` (the model's declared
    input without the batch: (C, H, W) or (F,), None for a free size)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no data at {path}: pass an .npz with x_train, y_train, x_test, y_test, or a folder "
                                f"of class sub-folders of images")
    if path.is_dir():
        return load_image_folder(path, sample_shape, scaling)
    return load_npz(path, sample_shape)


# ---- .npz ---------------------------------------------------------------------------------------------

def load_npz(path: Path, sample_shape: tuple) -> TrainData:
    try:
        with np.load(path, allow_pickle=False) as stored:
            arrays = {k: stored[k] for k in stored.files}
    except ValueError as err:
        if "pickle" in str(err):
            raise ValueError(f"{path} holds object arrays (pickled Python objects), which are never loaded: save "
                             f"numeric arrays, e.g. np.savez(path, x_train=x.astype(np.float32), ...)") from None
        raise ValueError(f"{path} is not a readable .npz archive ({err}): write it with np.savez") from None
    except (OSError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path} is not a readable .npz archive ({type(err).__name__}: {err}): write it with "
                         f"np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)") from None
    missing = [k for k in ARRAYS if k not in arrays]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)} (it holds {', '.join(sorted(arrays)) or 'nothing'}): "
                         f"save x_train, y_train, x_test, y_test (and optionally x_calibration)")
    notes = []
    inputs = {k: input_array(arrays[k], k, sample_shape, notes) for k in ("x_train", "x_test", *OPTIONAL) if k in arrays}
    labels = {k: _labels(arrays[k], k, notes) for k in ("y_train", "y_test")}
    for split in ("train", "test"):
        if len(inputs[f"x_{split}"]) != len(labels[f"y_{split}"]):
            raise ValueError(f"{path}: x_{split} has {len(inputs[f'x_{split}'])} samples but y_{split} has "
                             f"{len(labels[f'y_{split}'])} labels: give one label per sample")
    unused = sorted(set(arrays) - set(ARRAYS) - set(OPTIONAL))
    if unused:
        notes.append(f"arrays {', '.join(unused)} are not used (fwdgrad reads {', '.join(ARRAYS + OPTIONAL)})")
    return TrainData(inputs["x_train"], labels["y_train"], inputs["x_test"], labels["y_test"],
                     inputs.get("x_calibration"), notes)


def input_array(x: np.ndarray, name: str, sample_shape: tuple, notes: list[str]) -> np.ndarray:
    if x.ndim == 0 or len(x) == 0:
        raise ValueError(f"{name} is empty: every split needs samples")
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / np.float32(255)
        notes.append(f"{name}: uint8 scaled to float32 in [0, 1] (x / 255)")
    elif x.dtype in (np.float64, np.float16):
        notes.append(f"{name}: {x.dtype} cast to float32")
        x = x.astype(np.float32)
    elif x.dtype != np.float32:
        raise ValueError(f"{name} holds {x.dtype}: save the model's inputs as float32 (or uint8 images, scaled to "
                         f"[0, 1]), e.g. {name}.astype(np.float32)")
    expected = tuple(sample_shape)
    if len(expected) == 3 and expected[0] == 1 and x.ndim == 3:
        notes.append(f"{name}: (N, H, W) given a channel axis, (N, 1, H, W)")
        x = x[:, None]
    if x.shape[1:] != expected and not _fits(x.shape[1:], expected):
        raise ValueError(f"{name} has samples of shape {x.shape[1:]}, the model's input is {_shape_text(expected)}"
                         f"{_layout_hint(x.shape[1:], expected, name)}")
    from .split import check_finite

    check_finite(x, name)
    return x


def _fits(shape: tuple, expected: tuple) -> bool:
    return len(shape) == len(expected) and all(e is None or e == s for s, e in zip(shape, expected))


def _shape_text(shape: tuple) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


def _layout_hint(shape: tuple, expected: tuple, name: str) -> str:
    if len(shape) == 3 and len(expected) == 3 and _fits((shape[2], shape[0], shape[1]), expected):
        return f": the channels come last; move them first with {name}.transpose(0, 3, 1, 2)"
    if len(expected) == 1 and expected[0] and int(np.prod(shape)) == expected[0]:
        return f": flatten the samples with {name}.reshape(len({name}), -1)"
    return ": resize the inputs to the model's input (or export the model for this size)"


def _labels(y: np.ndarray, name: str, notes: list[str]) -> np.ndarray:
    if y.ndim != 1:
        raise ValueError(f"{name} has shape {y.shape}: give one class index per sample (N,) (not one-hot: "
                         f"{name}.argmax(1))")
    if np.issubdtype(y.dtype, np.floating):
        bad = ~np.isfinite(y) | (y != np.round(y))
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"{name}[{i}] is {y[i]}: labels are class indices 0, 1, 2, ... (integers)")
        notes.append(f"{name}: {y.dtype} labels cast to int64")
    elif not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{name} holds {y.dtype}: labels are class indices (integers), e.g. "
                         f"np.unique({name}, return_inverse=True)[1]")
    y = y.astype(np.int64)
    if (y < 0).any():
        i = int(np.argmax(y < 0))
        raise ValueError(f"{name}[{i}] is {y[i]}: labels are class indices from 0")
    return y


# ---- image folders -----------------------------------------------------------------------------------------

def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not p.name.startswith("."))


def load_image_folder(root: Path, sample_shape: tuple, scaling: str = "unit") -> TrainData:
    if scaling not in IMAGE_SCALINGS:
        raise ValueError(f"unknown image scaling {scaling!r}: use one of {', '.join(IMAGE_SCALINGS)}")
    if len(sample_shape) != 3 or sample_shape[0] not in (1, 3) or None in sample_shape:
        raise ValueError(f"an image folder needs a model whose input is (N, 1 or 3, H, W) with a fixed size; this "
                         f"model's is (N, {_shape_text(sample_shape)[1:]}: give the data as an .npz of its inputs")
    channels, height, width = sample_shape
    if channels == 1 and len(IMAGE_SCALINGS[scaling][0]) > 1:
        raise ValueError(f"image scaling {scaling!r} is for RGB models; this model takes one channel")
    subsets = {p.name: p for p in _class_dirs(root)}
    if "train" in subsets and "test" in subsets:
        trees = {"train": subsets["train"], "test": subsets["test"]}
        classes = sorted({p.name for tree in trees.values() for p in _class_dirs(tree)})
        split_note = f"the {root.name}/train and {root.name}/test folders as the splits"
    else:
        trees, classes = {"all": root}, [p.name for p in _class_dirs(root)]
        split_note = f"{TEST_FRACTION:.0%} of each class held out as the test split (seed 0)"
    if not classes:
        raise ValueError(f"{root} holds no class folders: lay the images out as {root}/<class>/<image>.png "
                         f"(or {root}/train/<class>/ and {root}/test/<class>/)")
    files, labels = {}, {}
    for split, tree in trees.items():
        files[split], labels[split] = [], []
        for index, name in enumerate(classes):
            found = _images_in(tree / name) if (tree / name).is_dir() else []
            if not found and split != "test":
                raise ValueError(f"{tree / name} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}): every "
                                 f"class needs training images")
            files[split] += found
            labels[split] += [index] * len(found)
    if "all" in trees:
        labels_all = np.asarray(labels["all"])
        train, test = _stratified(labels_all)
        files = {"train": [files["all"][i] for i in train], "test": [files["all"][i] for i in test]}
        labels = {"train": labels_all[train], "test": labels_all[test]}
    if not files["test"]:
        raise ValueError(f"{root}: no test images (each class needs at least two images to split, or give a test/ "
                         f"folder)")
    x = {split: _read_images(files[split], channels, height, width, scaling) for split in ("train", "test")}
    mode = "grey" if channels == 1 else "RGB"
    notes = [f"{len(files['train']) + len(files['test'])} images of {len(classes)} classes ({', '.join(classes[:6])}"
             f"{', ...' if len(classes) > 6 else ''}) read as {mode}, resized to {height}x{width} (bilinear), "
             f"{SCALING_TEXT[scaling]}; {split_note}"]
    return TrainData(x["train"], np.asarray(labels["train"], np.int64), x["test"], np.asarray(labels["test"], np.int64),
                     notes=notes)


def _stratified(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    train, test = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        cut = max(1, int(round(len(members) * TEST_FRACTION))) if len(members) > 1 else 0
        test.append(members[:cut])
        train.append(members[cut:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _read_images(files: list[Path], channels: int, height: int, width: int, scaling: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    out = np.empty((len(files), channels, height, width), np.float32)
    for i, file in enumerate(files):
        try:
            with Image.open(file) as image:
                image = image.convert("L" if channels == 1 else "RGB").resize((width, height), Image.BILINEAR)
                pixels = np.asarray(image, np.float32) / np.float32(255)
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"cannot read image {file} ({err}): remove it or convert it to PNG") from None
        out[i] = pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)
    shift, divide = (np.asarray(v, np.float32).reshape(-1, 1, 1) for v in IMAGE_SCALINGS[scaling])
    return ((out - shift) / divide).astype(np.float32)
