"""Pretrained small CNN: trained once on Fashion-MNIST with PyTorch, cached, then used like any user model.

The last-mile story needs a model that was trained on one task and is deployed on another; no small
pretrained CNN ships offline, so we train one deterministically (seeded, 2 threads) on first use, about
a minute on 2 cores, and cache its weights under a name that encodes the recipe. Inputs are images in
[0, 1] mapped to [-1, 1] (``fwdgrad.task.model_inputs`` does the same for every small-CNN task).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..data.base import cache_dir
from ..locks import exclusive


@dataclass(frozen=True)
class Recipe:
    dataset: str = "fashion-mnist"
    width: int = 16
    epochs: int = 4
    batch_size: int = 128
    lr: float = 3e-3
    seed: int = 0

    def digest(self) -> str:
        """Names the weights by recipe and data version, so rebuilt data never meets stale weights."""
        from ..data.datasets import CACHE_VERSION

        identity = asdict(self) | {"data_version": CACHE_VERSION}
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]


FASHION_RECIPE = Recipe()
# The audio model: the same small CNN on log-mel images of keywords spoken by espeak-ng voices.
AUDIO_RECIPE = Recipe(dataset="keywords-espeak", width=16, epochs=40, batch_size=32, lr=3e-3)


def weights_path(recipe: Recipe = Recipe()) -> Path:
    return cache_dir("models") / f"small-cnn-{recipe.dataset}-{recipe.digest()}.pt"


def _scaled(images: np.ndarray):
    import torch

    return torch.from_numpy(images * 2.0 - 1.0)


def accuracy(net, images: np.ndarray, labels: np.ndarray, batch_size: int = 1000) -> float:
    import torch

    correct = 0
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            logits = net(_scaled(images[start:start + batch_size]))
            correct += int((logits.argmax(1).numpy() == labels[start:start + batch_size]).sum())
    return correct / len(images)


def train_small_cnn(recipe: Recipe = Recipe()):
    """Train from scratch with Adam and a cosine schedule; returns (net, {"test_top1", "seconds", ...})."""
    import time

    import torch
    from tqdm import tqdm

    from ..data.datasets import load_dataset
    from .small_cnn import SmallCNN

    torch.manual_seed(recipe.seed)
    torch.set_num_threads(2)
    train, test = load_dataset(recipe.dataset, "train"), load_dataset(recipe.dataset, "test")
    net = SmallCNN(train.images.shape[1], train.num_classes, recipe.width)
    steps = recipe.epochs * (len(train) // recipe.batch_size)
    optimizer = torch.optim.Adam(net.parameters(), lr=recipe.lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, recipe.lr, total_steps=steps)
    labels = torch.from_numpy(train.labels)
    started = time.perf_counter()
    bar = tqdm(total=steps, desc=f"pretrain small-cnn on {recipe.dataset}", unit="step", disable=None)
    for epoch in range(recipe.epochs):
        net.train()
        order = torch.from_numpy(np.random.default_rng([recipe.seed, epoch]).permutation(len(train)))
        for start in range(0, len(order) - recipe.batch_size + 1, recipe.batch_size):
            batch = order[start:start + recipe.batch_size]
            loss = torch.nn.functional.cross_entropy(net(_scaled(train.images[batch.numpy()])), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    net.eval()
    report = {"recipe": asdict(recipe), "test_top1": accuracy(net, test.images, test.labels),
              "seconds": time.perf_counter() - started, "torch": torch.__version__}
    return net, report


def pretrained_small_cnn(recipe: Recipe = Recipe()):
    """The float SmallCNN (eval mode) pretrained on ``recipe.dataset``, trained on first use and cached."""
    import torch

    from .small_cnn import SmallCNN

    path = weights_path(recipe)
    with exclusive(path):  # parallel runs on a fresh machine: one trains, the others wait for its file
        if not path.exists():
            net, report = train_small_cnn(recipe)
            buffer = io.BytesIO()
            torch.save(net.state_dict(), buffer)
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            tmp.write_bytes(buffer.getvalue())
            os.replace(tmp, path)
            path.with_suffix(".json").write_text(json.dumps(report, indent=2))
    state = torch.load(path, weights_only=True)
    net = SmallCNN(state["features.0.0.weight"].shape[1], state["classifier.weight"].shape[0], recipe.width)
    net.load_state_dict(state)
    return net.eval()


def pretrain_report(recipe: Recipe = Recipe()) -> dict:
    """What pretraining measured (accuracy, seconds), written next to the cached weights."""
    pretrained_small_cnn(recipe)
    return json.loads(weights_path(recipe).with_suffix(".json").read_text())
