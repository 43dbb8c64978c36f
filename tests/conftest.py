import io
from pathlib import Path

import numpy as np
import onnx
import pytest


def export_to_proto(model, example) -> onnx.ModelProto:
    """Float torch module -> ONNX proto the way users export (legacy exporter, BN folded, IR <= 10)."""
    import torch

    buffer = io.BytesIO()
    torch.onnx.export(model.eval(), example, buffer, input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}}, dynamo=False, opset_version=13)
    proto = onnx.load_from_string(buffer.getvalue())
    proto.ir_version = min(proto.ir_version, 10)
    return proto


@pytest.fixture(scope="session")
def residual_net():
    """A small net with every op family the engine supports (conv groups, BN, ReLU6, residual add,
    concat, max/avg pooling, global pooling, flatten, linear), trained briefly on sklearn digits so that
    its activations and decisions are real."""
    import torch
    from torch import nn
    from sklearn.datasets import load_digits

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU())
            self.dw = nn.Sequential(nn.Conv2d(12, 12, 3, padding=1, groups=12), nn.BatchNorm2d(12), nn.ReLU6())
            self.pw = nn.Sequential(nn.Conv2d(12, 12, 1), nn.BatchNorm2d(12))
            self.grouped = nn.Conv2d(12, 8, 3, padding=1, groups=4)
            self.pool = nn.MaxPool2d(2)
            self.avg = nn.AvgPool2d(3, stride=1, padding=1)
            self.head = nn.Linear(20, 10)

        def forward(self, x):
            x = self.stem(x)
            x = torch.relu(x + self.pw(self.dw(x)))
            x = torch.cat([x, self.grouped(x)], dim=1)
            x = self.avg(self.pool(x))
            return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    digits = load_digits()
    x = torch.tensor(digits.images[:, None] / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target)
    torch.manual_seed(0)
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead, and xdist workers share 2 cores
    net = Net()
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(12):
        for i in range(0, 1500, 50):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x[i:i + 50]), y[i:i + 50]).backward()
            opt.step()
    net.eval()
    return net, x.numpy(), y.numpy(), export_to_proto(net, x[:1])


@pytest.fixture(scope="session")
def digits_graph(residual_net):
    """The residual net at w16a16 (calibrated on 200 digits) and a batch of 64 digits."""
    from quant.convert import convert

    _, x, y, proto = residual_net
    return convert(proto, x[:200], bits="w16a16"), x[:64], y[:64]


def cosine(a, b) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """This test's own data and model cache (FWDGRAD_CACHE), so that tests never see each other's files."""
    monkeypatch.setenv("FWDGRAD_CACHE", str(tmp_path / "cache"))


def digits_split(residual_net, train: int, test_end: int):
    """The first ``train`` digits to train on, digits 1500 to ``test_end`` to test on (after the residual
    net's own training images)."""
    from fwdgrad.data.split import TrainData

    _, x, y, _ = residual_net
    return TrainData(x[:train], y[:train], x[1500:test_end], y[1500:test_end])


def digits_task(residual_net, bits: str, train: int, test_end: int):
    """The residual net quantized at ``bits`` (calibrated on 200 digits) and its ``digits_split``."""
    from quant.convert import convert

    _, x, _, proto = residual_net
    return convert(proto, x[:200], bits=bits), digits_split(residual_net, train, test_end)


def serve_residual_net(monkeypatch, residual_net, train: int, test_end: int):
    """Make fwdgrad.task prepare the residual net on digits (a ``digits_split``), whatever model and
    data set a config names, the way the real preparation does: the float model goes to OUT/model.onnx.
    For the runners that prepare their own tasks (grids, studies, fleets)."""
    import fwdgrad.task
    from quant.convert import convert

    _, x, y, proto = residual_net
    monkeypatch.setattr(fwdgrad.task, "prepare_data", lambda cfg: digits_split(residual_net, train, test_end))

    def prepare_graph(cfg, data, out):
        Path(out).mkdir(parents=True, exist_ok=True)
        onnx.save(proto, Path(out) / "model.onnx")
        return convert(proto, x[:200], bits=cfg.bits)

    monkeypatch.setattr(fwdgrad.task, "prepare_graph", prepare_graph)
    return x, y, proto


def user_files(root):
    """Writes into ``root`` what a user has: user.onnx (a float CNN on 1x16x16 images with a depthwise conv, a
    residual Add, ReLU6, MaxPool, ReduceMean and a Gemm head, exported with a fixed batch of 1), data.npz
    (float64 inputs, int labels), images/ (train/ and test/ class folders of PNGs). Returns ``root``."""
    import warnings

    import numpy as np
    import torch
    from PIL import Image
    from sklearn.datasets import load_digits
    from torch import nn

    class UserCNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6())
            self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU())
            self.pw = nn.Conv2d(8, 8, 1)
            self.pool = nn.MaxPool2d(2)
            self.fc = nn.Linear(8, 10)

        def forward(self, x):
            x = self.stem(x)
            x = torch.relu(x + self.pw(self.dw(x)))
            return self.fc(self.pool(x).mean(dim=(2, 3)))

    digits = load_digits()
    x = nn.functional.interpolate(torch.tensor(digits.images[:, None] / 16.0, dtype=torch.float32), size=16,
                                  mode="bilinear").numpy()
    y = digits.target
    torch.manual_seed(0)
    torch.set_num_threads(1)
    net = UserCNN()
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(10):
        for i in range(0, 1200, 40):
            opt.zero_grad()
            nn.functional.cross_entropy(net(torch.tensor(x[i:i + 40])), torch.tensor(y[i:i + 40])).backward()
            opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(net.eval(), torch.zeros(1, 1, 16, 16), root / "user.onnx", input_names=["image"],
                          output_names=["scores"], dynamo=False, opset_version=17)
    xs = x.astype(np.float64)
    np.savez(root / "data.npz", x_train=xs[1200:1500], y_train=y[1200:1500], x_test=xs[1500:1650], y_test=y[1500:1650])
    for split, part in (("train", slice(1200, 1400)), ("test", slice(1500, 1600))):
        for i, (image, label) in enumerate(zip(x[part], y[part])):
            folder = root / "images" / split / f"class-{label}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray((image[0] * 255).astype(np.uint8)).resize((24, 24)).save(folder / f"{i}.png")
    return root
