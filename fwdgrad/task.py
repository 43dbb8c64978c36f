"""A training task: a pretrained float model, a new head for the target data, quantized into a QGraph.

The last mile starts from a deployed model: take the pretrained backbone, give it a head for the new
classes (a softmax linear probe on its float features by default, so that "zero-shot" means the best
linear head the device could be shipped with, with logits on the scale cross-entropy expects), export to
ONNX, and quantize with calibration on the training images, exactly as a user's own model would go
through ``quant.convert``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from quant.convert import convert
from quant.graph import QGraph

from .config import TrainConfig
from .data.split import TrainData

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


TRAIN_MODELS = ("mobilenetv2", "small-cnn", "audio-cnn")


def check_model_name(model: str) -> None:
    """Refuse, before the data loads, a model `fwdgrad train` cannot start from (e.g. a file path)."""
    if model not in TRAIN_MODELS:
        hint = ("; `fwdgrad train` starts from a zoo model, not a file: quantize your own ONNX with `fwdgrad "
                "quantize`, or train it from Python (quant.convert.convert, then fwdgrad.trainer.Trainer)"
                if model.endswith(".onnx") or "/" in model else "")
        raise ValueError(f"unknown model {model!r}: use one of {', '.join(TRAIN_MODELS)} (`fwdgrad models`){hint}")


def backbone(model: str, width: float = 1.0):
    """The pretrained float torch model (its ``classifier`` ends in the Linear we replace)."""
    if model == "mobilenetv2":
        from .models.mobilenetv2 import load_imagenet_mobilenetv2

        return load_imagenet_mobilenetv2(width)
    if model in ("small-cnn", "audio-cnn"):
        from .models.pretrained import AUDIO_RECIPE, pretrained_small_cnn

        return pretrained_small_cnn() if model == "small-cnn" else pretrained_small_cnn(AUDIO_RECIPE)
    check_model_name(model)


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


def probe_head(features: np.ndarray, labels: np.ndarray, classes: int):
    """Multinomial logistic-regression probe (L2, C=1): W (classes, dim), b (classes). A least-squares
    probe separates as well but leaves logits near zero, where cross-entropy is flat, and every training
    method then spends its first epochs rescaling the head."""
    from sklearn.linear_model import LogisticRegression

    if len(np.unique(labels)) < classes:
        raise ValueError(f"the training split holds {len(np.unique(labels))} of {classes} classes: "
                         f"raise --train-samples")
    probe = LogisticRegression(C=1.0, max_iter=1000).fit(features, labels)
    return probe.coef_.astype(np.float32), probe.intercept_.astype(np.float32)


def replace_head(net, x: np.ndarray, y: np.ndarray, classes: int, how: str, seed: int, probe_samples: int = 0):
    """A new classifier for ``classes``: fitted as a probe on the first ``probe_samples`` training images
    (0 = all; few = the weak head a device ships with before it sees its own data), random, or kept."""
    import torch

    linear = net.classifier if isinstance(net.classifier, torch.nn.Linear) else net.classifier[-1]
    if how == "keep":
        if linear.out_features != classes:
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


def prepare_data(cfg: TrainConfig) -> TrainData:
    """The task's train/test inputs, in the model's input format (deterministic for a config)."""
    from .data.datasets import load_dataset

    check_model_name(cfg.model)
    train, test = load_dataset(cfg.dataset, "train"), load_dataset(cfg.dataset, "test")
    resolution = cfg.resolution or (96 if cfg.model == "mobilenetv2" else 28)
    train_idx = train_indices(cfg, len(train.labels))
    test_idx = np.arange(len(test.labels))[:cfg.test_samples or None]
    return TrainData(model_inputs(cfg.model, train.images[train_idx], resolution), train.labels[train_idx],
                     model_inputs(cfg.model, test.images[test_idx], resolution), test.labels[test_idx])


def prepare_graph(cfg: TrainConfig, data: TrainData, out: str | Path) -> QGraph:
    """Pretrained backbone + new head -> ``OUT/model.onnx`` (the float model) -> quantized QGraph."""
    from .models.onnx_export import export_onnx

    classes = int(max(data.y_train.max(), data.y_test.max())) + 1
    net = replace_head(backbone(cfg.model), data.x_train, data.y_train, classes, cfg.head, cfg.seed, cfg.probe_samples)
    path = Path(out) / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    export_onnx(net, (1,) + data.x_train.shape[1:], path)
    return convert(path, data.x_train[:cfg.calibration_samples], bits=cfg.bits, rounding=cfg.rounding,
                   scales=cfg.scales, equalize_channels=cfg.equalize)
