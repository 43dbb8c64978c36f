"""Node perturbation: per-sample output noise, then one local correlation per layer (fwdgrad.node_perturbation)."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from fwdgrad.config import TrainConfig
from fwdgrad.head import final_linear
from fwdgrad.node_perturbation import estimate, output_step, perturbed_layers, weight_gradient
from fwdgrad.perturb import selection_masks
from fwdgrad.reference import gradients
from fwdgrad.zo_step import ZOStep
from quant.convert import convert
from quant.ops.conv import ConvGeometry, QConv
from quant.tensor import QParams


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_the_conv_correlation_is_the_accumulators_weight_gradient(data):
    """For every geometry: sum(g * acc) differentiated by W and b, as autograd does it on the float conv."""
    groups = data.draw(st.sampled_from([1, 2, 3]))
    cg, og = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3))
    kh, kw = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3))
    stride = (data.draw(st.integers(1, 2)), data.draw(st.integers(1, 2)))
    dilation = (data.draw(st.integers(1, 2)), data.draw(st.integers(1, 2)))
    pads = tuple(data.draw(st.integers(0, 2)) for _ in range(4))
    zero_point = data.draw(st.integers(-128, 127))
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 16)))
    x = rng.integers(-128, 128, (2, cg * groups, 7, 6)).astype(np.int8)
    weight = rng.integers(-127, 128, (og * groups, cg, kh, kw)).astype(np.int8)
    geometry = ConvGeometry(stride, pads, dilation, groups)
    node = QConv("c", ["x"], "y", QParams(0.1, 0, 8), QParams(0.05, zero_point, 8), weight,
                 QParams(np.full(og * groups, 0.02), 0, 8, narrow=True, axis=0), np.zeros(og * groups, np.int32),
                 geometry=geometry)
    ho, wo = geometry.output_hw(7, 6, kh, kw)
    g = rng.standard_normal((2, og * groups, ho, wo))
    dw, db = weight_gradient(node, x, g)

    w = torch.tensor(weight, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(og * groups, dtype=torch.float64, requires_grad=True)
    shifted = torch.nn.functional.pad(torch.tensor(x, dtype=torch.float64) - zero_point,
                                      (pads[1], pads[3], pads[0], pads[2]))  # padding reads the zero point
    acc = torch.nn.functional.conv2d(shifted, w, b, stride=stride, dilation=dilation, groups=groups)
    (acc * torch.tensor(g)).sum().backward()
    np.testing.assert_allclose(dw, w.grad.numpy(), rtol=1e-10, atol=1e-9)
    np.testing.assert_allclose(db, b.grad.numpy(), rtol=1e-10, atol=1e-9)


@pytest.fixture(scope="module")
def digits_graph(residual_net):
    _, x, y, proto = residual_net
    return convert(proto, x[:200], bits="w16a8"), x[:64], y[:64]


def head_pass(graph, x, y, head):
    """The engine's per-sample losses with noise added to the head's output, and the clean pass's store."""
    features = graph.prefix(x, until=head.name)[head.inputs[0]]
    clean_logits = graph.forward(x)
    step = ZOStep(graph, TrainConfig(bits="w16a8", loss="float", zo_params="outputs", head_update="zo"), 1)

    def run_pass(noise):
        p = head.out_params
        logits = np.clip(clean_logits.astype(np.int64) + noise[head.name], p.qmin, p.qmax)
        return step.loss(logits, y, per_sample=True)

    return run_pass, {head.name: (features, clean_logits)}


def test_the_head_estimate_points_along_the_true_gradient(digits_graph):
    """Many output-noise pairs on the head alone: the estimate's direction is autograd's on the float twin."""
    graph, x, y = digits_graph
    head = final_linear(graph)
    run_pass, clean = head_pass(graph, x, y, head)
    selected = {head.name: np.ones(head.weight.shape[0], bool)}
    est = estimate(run_pass, [head], clean, selected, 2.0, list(range(400)), len(y), bias=True)
    assert est.forward_calls == 801 and len(est.losses) == 800
    s_w = head.w_params.scale.astype(np.float64).reshape(-1, 1)
    ours = est.gradients[head.weight_key] / s_w  # d loss / d real weights
    true = gradients(graph, x, y)[head.weight_key]
    cosine = np.sum(ours * true) / (np.linalg.norm(ours) * np.linalg.norm(true))
    assert cosine > 0.95 and 0.7 < np.linalg.norm(ours) / np.linalg.norm(true) < 1.4


def test_only_the_selected_output_channels_are_perturbed(digits_graph):
    graph, x, y = digits_graph
    head = final_linear(graph)
    noises = []
    run_pass, clean = head_pass(graph, x, y, head)

    def recording(noise):
        noises.append(noise[head.name])
        return run_pass(noise)

    selected = {head.name: np.arange(10) < 4}
    est = estimate(recording, [head], clean, selected, 2.0, [0, 1], len(y), bias=False)
    assert all(np.all(n[:, 4:] == 0) and np.all(np.abs(n[:, :4]) == output_step(head, 2.0)) for n in noises)
    assert np.all(est.gradients[head.weight_key][4:] == 0) and head.bias_key not in est.gradients


def test_a_node_perturbation_step_moves_the_selection_and_is_seeded(digits_graph):
    graph, x, y = digits_graph
    weights = {k: v for n in graph.weighted_nodes() for k, v in ((n.weight_key, n.weight), (n.bias_key, n.bias))}
    inputs = {n.name: n.weight.shape[1] * (n.geometry.groups if isinstance(n, QConv) else 1)
              for n in graph.weighted_nodes()}
    masks = selection_masks(graph, {name: np.arange(c) for name, c in inputs.items()})
    layers, channels = perturbed_layers(graph, masks)
    assert [n.name for n in layers] == [n.name for n in graph.weighted_nodes()]
    assert all(channels[n.name].all() for n in layers)
    cfg = TrainConfig(bits="w16a8", zo_params="outputs", head_update="zo", m=2, eps=2.0, lr=0.5)
    runs = []
    for _ in range(2):
        trained = dict(weights)
        loss, calls = ZOStep(graph, cfg, total_steps=10)(trained, {}, masks, x, y, 0)
        runs.append(trained)
    assert calls == 1 + 2 * 2 and np.isfinite(loss)
    assert any(not np.array_equal(runs[0][k], weights[k]) for k in masks)
    assert all(np.array_equal(runs[0][k], runs[1][k]) for k in weights)  # same seed, same integers


@pytest.mark.parametrize("setting, message", [
    (dict(zo_sparsity=0.5), "zo_sparsity"), (dict(directions="orthogonal"), "directions"),
    (dict(estimator="sign-spsa"), "estimator"), (dict(lr_scale="dimension"), "lr_scale"),
    (dict(eps=0.01), "rounds to no step")])
def test_settings_that_shape_weight_directions_are_refused(setting, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(zo_params="outputs", **setting)


def test_the_planner_counts_what_node_perturbation_keeps(digits_graph):
    """The clean pass's inputs, masks and 32-bit output sums of a sample, the gradient sums, the correlation."""
    from devices.planner import plan, selection_shape
    from devices.profiles import load_profile
    from fwdgrad.fit import node_layers

    graph, x, _ = digits_graph
    conv = graph.weighted_nodes()[1]
    selection = {conv.name: np.arange(4)}
    cfg = TrainConfig(bits="w16a8", zo_params="outputs", eps=2.0)
    assert node_layers(cfg, selection, ()) == (conv.name,) and node_layers(TrainConfig(), selection, ()) == ()
    shape = selection_shape(graph, selection, m=4, batch=8, momentum=False, bias=False)
    sample, profile = x.shape[1:], load_profile("cortex-m4")
    weights_only = plan(graph, sample, profile, shape)
    shape.node_layers = node_layers(cfg, selection, ())
    nodes = plan(graph, sample, profile, shape)
    shapes = graph.shapes((1,) + sample)
    out = int(np.prod(shapes[conv.output]))
    # one sample at a time: a sample's losses need no other sample, so nothing is kept for the batch
    assert nodes.zo_parts["node_inputs"] == int(np.prod(shapes[conv.inputs[0]]))
    assert nodes.zo_parts["node_output_sums"] == 4 * out and nodes.zo_parts["node_masks"] == -(-out // 8)
    assert nodes.zo_parts["node_gradients"] == 4 * (shape.selected_weights[conv.name] + conv.bias.size)
    assert nodes.zo_peak == weights_only.zo_peak + sum(v for k, v in nodes.zo_parts.items() if k.startswith("node_"))
    assert nodes.zo_step_macs > weights_only.zo_step_macs
