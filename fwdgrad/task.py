"""A training task: a model (zoo name or the user's file) and data (registry name or the user's file),
prepared into the quantized QGraph training starts from and the splits it trains and tests on.

Zoo models: take the pretrained backbone, give it a head for the new classes (a softmax linear probe on
its float features by default, so that "zero-shot" means the best linear head the device could be shipped
with, with logits on the scale cross-entropy expects), export to ONNX, and quantize with calibration on
the training images, exactly as a user's own model goes through ``quant.convert``. Model files go through
``fwdgrad.filetask``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from quant.convert import convert
from quant.graph import QGraph

from .config import TrainConfig
from .data.files import is_data_path, load_data_file
from .data.split import TrainData
from .probe import probe_head
from .usermodel import is_model_path, open_model

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32).reshape(1, 3, 1, 1)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32).reshape(1, 3, 1, 1)


def model_inputs(model: str, images: np.ndarray, resolution: int) -> np.ndarray:
    """Images in [0, 1] (N, C, H, W) -> what the model was trained on.

    MobileNetV2: resized to ``resolution``, grey replicated to RGB, ImageNet-normalised. SmallCNN:
    28x28 grey, scaled to [-1, 1] (as ``scripts/pretrain.py`` trains it). AudioCNN: the log-mel image as
    it is, scaled to [-1, 1].
    """
    import torch
    import torch.nn.functional as F

    x = torch.as_tensor(np.asarray(images, np.float32))
    if model == "mobilenetv2":
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-1] != resolution:
            x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
        return ((x.numpy() - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)
    if model == "small-cnn" and x.shape[-1] != 28:
        x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)
    return (x.numpy() * 2.0 - 1.0).astype(np.float32)


def backbone(model: str, width: float = 1.0):
    """The pretrained float torch model (its ``classifier`` ends in the Linear we replace)."""
    if model == "mobilenetv2":
        from .models.mobilenetv2 import load_imagenet_mobilenetv2

        return load_imagenet_mobilenetv2(width)
    from .models.pretrained import AUDIO_RECIPE, pretrained_small_cnn

    return pretrained_small_cnn() if model == "small-cnn" else pretrained_small_cnn(AUDIO_RECIPE)


def float_features(net, x: np.ndarray, batch_size: int = 128) -> np.ndarray:
    """Penultimate activations (after global pooling), the input of the classifier."""
    import torch
    import torch.nn.functional as F

    out = []
    with torch.inference_mode():
        for start in range(0, len(x), batch_size):
            h = net.features(torch.as_tensor(x[start:start + batch_size]))
            out.append(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1).numpy())
    return np.concatenate(out)


def replace_head(net, x: np.ndarray, y: np.ndarray, classes: int, how: str, seed: int, probe_samples: int = 0):
    """A new classifier for ``classes``: fitted as a probe on the first ``probe_samples`` training images
    (0 = all; few = the weak head a device ships with before it sees its own data), random, or kept."""
    import torch

    linear = net.classifier if isinstance(net.classifier, torch.nn.Linear) else net.classifier[-1]
    if how == "keep":
        if linear.out_features < classes:
            raise ValueError(f"head='keep' needs {classes} outputs, the model has {linear.out_features}")
        return net
    new = torch.nn.Linear(linear.in_features, classes)
    if how == "probe":
        n = probe_samples or len(x)
        w, b = probe_head(float_features(net, x[:n]), y[:n], classes)
        new.weight.data, new.bias.data = torch.from_numpy(w), torch.from_numpy(b)
    else:
        torch.manual_seed(seed)
        new.reset_parameters()
    if isinstance(net.classifier, torch.nn.Linear):
        net.classifier = new
    else:
        net.classifier[-1] = new
    return net.eval()


def train_indices(cfg: TrainConfig, n: int) -> np.ndarray:
    """Which of the data set's ``n`` training samples a run uses, in its order (a seeded subset), so that
    per-sample facts kept elsewhere (e.g. the voice of a clip) can follow them."""
    return np.random.default_rng([cfg.seed, 0x5A3]).permutation(n)[:cfg.train_samples or None]


def zoo_resolution(cfg: TrainConfig) -> int:
    return cfg.resolution or {"mobilenetv2": 96, "small-cnn": 28, "audio-cnn": 40}[cfg.model]


def model_sample_shape(cfg: TrainConfig) -> tuple:
    """One input sample's shape as the model declares it: (C, H, W) or (F,), None where it is free."""
    if is_model_path(cfg.model):
        return open_model(cfg.model).sample_shape
    from .models.zoo import model_input_shape

    return model_input_shape(cfg.model, zoo_resolution(cfg))[1:]


def prepare_data(cfg: TrainConfig) -> TrainData:
    """The task's train/test inputs, in the model's input format (deterministic for a config)."""
    shape = model_sample_shape(cfg)
    zoo = not is_model_path(cfg.model)
    convert, notes = None, []
    if is_data_path(cfg.dataset):
        path = Path(cfg.dataset)
        data = load_data_file(path, shape, "unit" if zoo else cfg.image_scaling)
        if zoo and path.is_dir():  # images in [0, 1], converted as the zoo model's own inputs
            convert, notes = zoo_inputs(cfg), [f"images converted as {cfg.model}'s inputs"]
        calibration = data.calibration[:cfg.calibration_samples]  # in the file's order, as `quantize --data`
    else:
        data, convert, notes = registry_data(cfg, shape, zoo)
        calibration = None
    train_idx = train_indices(cfg, len(data.y_train))
    test_idx = np.arange(len(data.y_test))[:cfg.test_samples or None]
    convert = convert or (lambda x: x)
    return TrainData(convert(data.x_train[train_idx]), data.y_train[train_idx], convert(data.x_test[test_idx]),
                     data.y_test[test_idx], None if calibration is None else convert(calibration), data.notes + notes)


def zoo_inputs(cfg: TrainConfig):
    return lambda images: model_inputs(cfg.model, images, zoo_resolution(cfg))


def registry_data(cfg: TrainConfig, shape: tuple, zoo: bool):
    """A registered set's images in [0, 1], and how they become inputs: a zoo model's own conversion, or for
    a model file the ``image_scaling`` (shapes must then match)."""
    from .data.datasets import load_dataset
    from .data.files import IMAGE_SCALINGS, SCALING_TEXT

    train, test = load_dataset(cfg.dataset, "train"), load_dataset(cfg.dataset, "test")
    data = TrainData(train.images, train.labels, test.images, test.labels)
    if zoo:
        return data, zoo_inputs(cfg), []
    if tuple(train.images.shape[1:]) != tuple(shape):
        raise ValueError(f"data set {cfg.dataset!r} has images of shape {train.images.shape[1:]} and "
                         f"{Path(cfg.model).name} takes {shape}: give your data as an .npz of the model's inputs "
                         f"(x_train, y_train, x_test, y_test)")
    shift, divide = (np.asarray(v, np.float32).reshape(1, -1, 1, 1) for v in IMAGE_SCALINGS[cfg.image_scaling])
    note = (f"{cfg.dataset} images {SCALING_TEXT[cfg.image_scaling]} (image_scaling {cfg.image_scaling!r}) for "
            f"{Path(cfg.model).name}")
    return data, lambda x: ((x - shift) / divide).astype(np.float32), [note]


def prepare_graph(cfg: TrainConfig, data: TrainData, out: str | Path) -> QGraph:
    """The quantized graph a run starts from; its float model (if any) goes to ``OUT/model.onnx``."""
    if is_model_path(cfg.model):
        from .filetask import file_graph

        graph, _ = file_graph(open_model(cfg.model), data, head=cfg.head, bits=cfg.bits, rounding=cfg.rounding,
                              scales=cfg.scales, equalize=cfg.equalize, calibration_samples=cfg.calibration_samples,
                              seed=cfg.seed, probe_samples=cfg.probe_samples, float_out=Path(out) / "model.onnx")
        return graph
    return zoo_graph(cfg, data, out)


def zoo_graph(cfg: TrainConfig, data: TrainData, out: str | Path) -> QGraph:
    """Pretrained backbone + new head -> ``OUT/model.onnx`` (the float model) -> quantized QGraph."""
    from .models.onnx_export import export_onnx

    head = "probe" if cfg.head == "auto" else cfg.head
    net = replace_head(backbone(cfg.model), data.x_train, data.y_train, data.classes, head, cfg.seed, cfg.probe_samples)
    path = Path(out) / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    export_onnx(net, (1,) + data.x_train.shape[1:], path)
    return convert(path, data.calibration[:cfg.calibration_samples], bits=cfg.bits, rounding=cfg.rounding,
                   scales=cfg.scales, equalize_channels=cfg.equalize)
