"""The head's exact gradient from a forward pass: the true cross-entropy gradient, in integers, for free."""
import numpy as np
import pytest
import torch

from fwdgrad.config import TrainConfig
from fwdgrad.head import HeadGradient, apply_head_step, final_linear, softmax_q16
from fwdgrad.reference import gradients
from fwdgrad.zo_step import ZOStep
from quant.convert import convert
from quant.tensor import dequantize


@pytest.fixture(scope="module")
def digits_graph(residual_net):
    _, x, y, proto = residual_net
    return convert(proto, x[:200], bits="w16a8"), x[:64], y[:64]


def test_integer_softmax_is_the_float_softmax(digits_graph):
    graph, x, _ = digits_graph
    logits = graph.forward(x)
    p = softmax_q16(logits, graph.output_params) / 65536
    expected = torch.softmax(torch.tensor(dequantize(logits, graph.output_params), dtype=torch.float64), 1).numpy()
    assert np.abs(p - expected).max() < 2e-4


def test_the_head_gradient_is_the_float_twins(digits_graph):
    """From the integer features and logits of one pass: the direction PyTorch's autograd gives the head."""
    graph, x, y = digits_graph
    head = final_linear(graph)
    features = graph.prefix(x, until=head.name)[head.inputs[0]]
    gradient = HeadGradient(head)
    gradient.add(features, graph.forward(x), y, graph.output_params)
    s_x, s_w = float(head.in_params.scale), head.w_params.scale.astype(np.float64).reshape(-1, 1)
    ours = gradient.weight * s_x / (len(x) * 65536)  # d loss / d real weights
    true = gradients(graph, x, y)[head.weight_key]
    cosine = np.sum(ours * true) / (np.linalg.norm(ours) * np.linalg.norm(true))
    # the twin computes without the 8-bit activation rounding the integer features and logits carry
    assert cosine > 0.99 and 0.8 < np.linalg.norm(ours) / np.linalg.norm(true) < 1.25
    weights = {head.weight_key: head.weight, head.bias_key: head.bias}
    apply_head_step(weights, head, gradient, 50.0, step_seed=3)
    step = (weights[head.weight_key].astype(np.int64) - head.weight) * s_w  # real units
    assert np.sum(step * true) < 0  # downhill
    same = {head.weight_key: head.weight, head.bias_key: head.bias}
    apply_head_step(same, head, gradient, 50.0, step_seed=3)
    assert np.array_equal(same[head.weight_key], weights[head.weight_key])  # seeded rounding


def test_a_step_perturbs_all_but_the_head_and_a_head_alone_costs_one_call(digits_graph):
    graph, x, y = digits_graph
    head = final_linear(graph)
    cfg = TrainConfig(bits="w16a8", m=3, head_update="exact")
    step = ZOStep(graph, cfg, total_steps=10)
    from fwdgrad.perturb import selection_masks

    weights = {k: v for n in graph.weighted_nodes() for k, v in ((n.weight_key, n.weight), (n.bias_key, n.bias))}
    everything = selection_masks(graph, {n.name: np.arange(n.weight.shape[1]) for n in graph.weighted_nodes()}, True)
    assert head.weight_key not in step.perturbed(everything) and len(step.perturbed(everything)) == len(everything) - 2
    _, calls = step(dict(weights), {}, everything, x[:16], y[:16], 0)
    assert calls == 6
    only_head = selection_masks(graph, {head.name: np.arange(head.weight.shape[1])}, True)
    trained = dict(weights)
    loss, calls = step(trained, {}, only_head, x[:16], y[:16], 0)
    assert calls == 1 and np.isfinite(loss) and not np.array_equal(trained[head.weight_key], head.weight)
    assert all(np.array_equal(trained[k], v) for k, v in weights.items() if not k.startswith(head.name))


@pytest.fixture(scope="module")
def pointwise_graph():
    """conv3x3 -> ReLU -> conv1x1 -> ReLU6 -> global pool -> Linear, briefly trained on sklearn digits."""
    from sklearn.datasets import load_digits
    from torch import nn

    from tests.conftest import export_to_proto

    digits = load_digits()
    x = torch.tensor(digits.images[:, None] / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 12, 1), nn.ReLU6(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 10))
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(3):
        for i in range(0, 1500, 50):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x[i:i + 50]), y[i:i + 50]).backward()
            opt.step()
    return convert(export_to_proto(net, x[:1]), x[:200].numpy(), bits="w16a8"), x[:64].numpy(), y[:64].numpy()


@pytest.fixture(scope="module")
def residual_pool_graph():
    """A user's layout (as in tests/test_byo.py): conv -> depthwise -> 1x1 conv added to the stem, ReLU, a
    2x2 max pool, the mean, Linear; briefly trained on sklearn digits."""
    from sklearn.datasets import load_digits
    from torch import nn

    from tests.conftest import export_to_proto

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU6())
            self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU())
            self.pw, self.fc = nn.Conv2d(8, 8, 1), nn.Linear(8, 10)

        def forward(self, x):
            x = self.stem(x)
            return self.fc(nn.functional.max_pool2d(torch.relu(x + self.pw(self.dw(x))), 2).mean(dim=(2, 3)))

    digits = load_digits()
    x = torch.tensor(digits.images[:, None] / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target)
    torch.manual_seed(0)
    net = Net()
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for i in range(0, 1500, 50):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x[i:i + 50]), y[i:i + 50]).backward()
        opt.step()
    return convert(export_to_proto(net, x[:1]), x[:200].numpy(), bits="w16a8"), x[:64].numpy(), y[:64].numpy()


@pytest.mark.parametrize("model", ["pointwise_graph", "residual_pool_graph"])
def test_the_last_layer_gradient_through_adds_and_max_pools_is_the_float_twins(model, request):
    from fwdgrad.last_layer import LastLayerGradient, find_last_layer

    graph, x, y = request.getfixturevalue(model)
    head = final_linear(graph)
    last = find_last_layer(graph, head)
    node = last.node
    assert [type(n).__name__ for n in last.chain][:-1] == ([] if model == "pointwise_graph" else ["QAdd", "QMaxPool"])
    channels = np.array([1, 4, 5])
    cache = graph.prefix(x, until=node.name)
    after = graph.advance(cache, node.name, last.after)
    gradient = LastLayerGradient(last, head, channels)
    gradient.add(cache[node.inputs[0]], after[node.output], graph.forward(x), y, graph.output_params, cache)
    true = gradients(graph, x, y)[node.weight_key][:, channels, 0, 0]
    s_a = float(node.in_params.scale)
    ours = gradient.weight * gradient.ref * s_a / (65536 * gradient.positions * len(x))
    cosine = np.sum(ours * true) / (np.linalg.norm(ours) * np.linalg.norm(true))
    assert cosine > 0.98 and 0.8 < np.linalg.norm(ours) / np.linalg.norm(true) < 1.25


def test_a_max_pool_routes_each_window_to_its_first_maximum():
    from fwdgrad.last_layer import _route_max
    from quant.ops import PoolGeometry, QMaxPool
    from quant.ops.pool import maxpool_reference

    x = np.array([[[[1, 3, 3, 0], [2, 0, 1, 1], [5, 5, 0, -2], [5, 4, -3, -1]]]], np.int8)
    node = QMaxPool.__new__(QMaxPool)
    node.geometry = PoolGeometry((2, 2), (2, 2))
    y = maxpool_reference(x, node.geometry)
    routed = _route_max(x, y, np.array([[[[1, 2], [3, 4]]]]), node)
    assert routed.tolist() == [[[[0, 1, 2, 0], [0, 0, 0, 0], [3, 0, 4, 0], [0, 0, 0, 0]]]]


def test_auto_takes_the_strongest_exact_update_the_model_allows(pointwise_graph, digits_graph):
    from fwdgrad.zo_step import exact_layers

    head, last = exact_layers(pointwise_graph[0], "auto")
    assert head is not None and last is not None and last.node.weight.shape[2:] == (1, 1)
    head, last = exact_layers(digits_graph[0], "auto")  # the residual net pools a concat: the head only
    assert head is not None and last is None
    with pytest.raises(ValueError, match="use --head-update exact"):
        exact_layers(digits_graph[0], "exact-last")
