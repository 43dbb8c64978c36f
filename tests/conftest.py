import io

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
