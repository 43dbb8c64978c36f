"""Named models, exported to ONNX once and cached on disk.

Export takes seconds (MobileNetV2) while everything downstream only needs the ONNX file,
so each (name, width, resolution) is exported once into a cache directory. The file name
also carries a digest of the weights and of the model/export source code, so a retrained
or edited model never silently reuses a stale export.
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..locks import exclusive

if TYPE_CHECKING:  # torch loads only when a model is built: the catalogue is read without it
    import torch


@dataclass(frozen=True)
class ModelSpec:
    """How to build a model and which inputs it accepts."""

    build: Callable[[float], "torch.nn.Module"]  # width multiplier -> model
    default_resolution: int
    resolutions: tuple[int, ...]
    channels: int
    description: str
    aspect: float = 1.0  # input width / height (log-mel images are not square)


def _mobilenetv2(width: float) -> "torch.nn.Module":
    from .mobilenetv2 import load_imagenet_mobilenetv2

    return load_imagenet_mobilenetv2(width)


def _pretrained(recipe_name: str) -> Callable[[float], "torch.nn.Module"]:
    def build(width: float) -> "torch.nn.Module":
        from . import pretrained

        if width != 1.0:
            raise ValueError(f"the pretrained {recipe_name} model exists at width 1.0 only, got {width}")
        return pretrained.pretrained_small_cnn(getattr(pretrained, recipe_name))
    return build


MODELS: dict[str, ModelSpec] = {
    "mobilenetv2": ModelSpec(
        build=_mobilenetv2,
        default_resolution=224,
        resolutions=tuple(range(96, 225, 32)),
        channels=3,
        description="MobileNetV2, ImageNet weights (width < 1: channel-truncated, needs fine-tuning)",
    ),
    "small-cnn": ModelSpec(
        build=_pretrained("FASHION_RECIPE"),
        default_resolution=28,
        resolutions=(28,),
        channels=1,
        description="SmallCNN pretrained on Fashion-MNIST by scripts/pretrain.py (89% test top-1), 28x28 grey",
    ),
    "audio-cnn": ModelSpec(
        build=_pretrained("AUDIO_RECIPE"),
        default_resolution=40,
        resolutions=(40,),
        channels=1,
        description="SmallCNN on 40x48 log-mel images, pretrained on keywords spoken by espeak-ng voices",
        aspect=48 / 40,
    ),
}


def _spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
    return MODELS[name]


def model_input_shape(name: str, resolution: int | None = None) -> tuple[int, int, int, int]:
    """Input shape (batch 1, NCHW) of ``name`` at ``resolution`` (None: the model's default)."""
    spec = _spec(name)
    res = spec.default_resolution if resolution is None else resolution
    if res not in spec.resolutions:
        raise ValueError(f"{name} accepts resolutions {list(spec.resolutions)}, got {res}")
    return (1, spec.channels, res, round(res * spec.aspect))


def default_cache_dir() -> Path:
    """``$FWDGRAD_CACHE/models`` if set, else ``~/.cache/fwdgrad/models``."""
    root = os.environ.get("FWDGRAD_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "fwdgrad") / "models"


def _digest(model: "torch.nn.Module") -> str:
    from . import onnx_export

    h = hashlib.sha256()
    for module in (sys.modules[type(model).__module__], onnx_export):
        h.update(Path(module.__file__).read_bytes())
    for key, tensor in model.state_dict().items():
        h.update(key.encode())
        h.update(tensor.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def model_onnx(name: str, *, width: float = 1.0, resolution: int | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of the ONNX export of ``name``, exporting it on first use.

    ``resolution=None`` means the model's default (224 for mobilenetv2, 28 for small-cnn).
    """
    shape = model_input_shape(name, resolution)
    model = _spec(name).build(width)
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = directory / f"{name}-w{width:g}-r{shape[-1]}-{_digest(model)}.onnx"
    with exclusive(path):
        if not path.exists():
            from .onnx_export import export_onnx

            export_onnx(model, shape, path)
    return path
