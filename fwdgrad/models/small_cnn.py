"""A tiny CNN for 28x28 inputs that uses every op family of MobileNetV2.

It exercises regular, depthwise and pointwise convolutions, BatchNorm (folded at export),
max and global-average pooling and a final Linear, while staying small enough (~8k
parameters at width 16) that forward-gradient training runs fast in tests and demos.
"""

from __future__ import annotations

import torch
from torch import nn


def _conv_bn_relu(cin: int, cout: int, kernel_size: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel_size, padding=kernel_size // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    )


class SmallCNN(nn.Module):
    """28x28 -> conv(w) -> pool -> conv(2w) -> pool -> depthwise(2w) -> pointwise(4w) -> GAP -> Linear."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn_relu(in_channels, width, 3),
            nn.MaxPool2d(2),  # 28 -> 14
            _conv_bn_relu(width, 2 * width, 3),
            nn.MaxPool2d(2),  # 14 -> 7
            _conv_bn_relu(2 * width, 2 * width, 3, groups=2 * width),
            _conv_bn_relu(2 * width, 4 * width, 1),
        )
        self.classifier = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))
