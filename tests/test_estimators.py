"""The forward-gradient estimator points along the true (PyTorch) gradient, and the update is exact."""
import numpy as np
import pytest
import torch

from conftest import cosine

from fwdgrad.channels import channel_mask, per_channel_sum, selection_bytes
from fwdgrad.directions import directions_for
from fwdgrad.estimators import estimate, one_by_one
from fwdgrad.loss import cross_entropy
from fwdgrad.perturb import integer_limits, selection_masks
from fwdgrad.reference import FloatTwin, gradients
from fwdgrad.update import apply_update, stochastic_round
from quant.convert import convert


def mean_estimate(loss_at, graph, weights, masks, limits, eps, samples, space="steps"):
    """Average of g_i * delta_i over many seeds (integer units of each weight)."""
    total = {k: 0.0 for k in masks}
    directions = directions_for(graph, weights, masks, space=space)
    for seed in range(samples):
        est = estimate(one_by_one(loss_at), weights, directions, limits, step_seed=seed, m=1, eps=eps,
                       distribution="gaussian", method="spsa")
        p, g = est.perturbations[0], est.projected[0]
        for key, d in p.delta.items():
            total[key] = total[key] + g * d
    return total


@pytest.mark.parametrize("mode, space", [("float", "steps"), ("integer", "steps"), ("integer", "real")])
def test_estimator_expectation_follows_the_true_gradient(digits_graph, mode, space):
    graph, x, y = digits_graph
    head = graph.weighted_nodes()[-1]
    selection = {head.name: np.arange(head.weight.shape[1])}
    masks = selection_masks(graph, selection)
    weights = {n.weight_key: n.weight for n in graph.weighted_nodes()}
    limits = integer_limits(graph)
    twin = FloatTwin(graph)

    if mode == "float":
        def loss_at(w):
            with torch.no_grad():
                logits = twin(x, twin.parameters(w, requires_grad=False))
            return float(torch.nn.functional.cross_entropy(logits, torch.as_tensor(y)))
    else:
        cache = graph.prefix(x, until=head.name)

        def loss_at(w):
            return cross_entropy(graph.forward(cache, start=head.name, weights=w), graph.output_params, y)

    eps = 1.0 if space == "steps" else 2e-3  # one 8-bit step = 256 int16 steps; or real weight units
    est = mean_estimate(loss_at, graph, weights, masks, limits, eps, 3000, space)[head.weight_key]
    true = gradients(graph, x, y)[head.weight_key]
    scale = head.w_params.scale[:, None].astype(np.float64)
    # steps: E[g delta] follows d(loss)/d(w_int) = d(loss)/d(w_real) * s_w (per output channel);
    # real: delta = eps z / s_w, so E[g delta] follows d(loss)/d(w_real) / s_w
    expected = (true * scale if space == "steps" else true / scale)[masks[head.weight_key]]
    assert cosine(est, expected) > 0.9


def test_bias_estimate_follows_the_true_bias_gradient(digits_graph):
    graph, x, y = digits_graph
    head = graph.weighted_nodes()[-1]
    masks = {head.bias_key: np.ones(head.bias.shape, dtype=bool)}
    weights = {head.bias_key: head.bias}
    cache = graph.prefix(x, until=head.name)

    def loss_at(w):
        return cross_entropy(graph.forward(cache, start=head.name, weights=w), graph.output_params, y)

    est = mean_estimate(loss_at, graph, weights, masks, integer_limits(graph), 1.0, 1500)[head.bias_key]
    true = gradients(graph, x, y)[head.bias_key]  # d(loss)/d(b_int) = d(loss)/d(b_real) * s_x * s_w
    assert cosine(est, true * head.w_params.scale * float(head.in_params.scale)) > 0.9


def test_perturbations_regenerate_from_their_seed(digits_graph):
    graph, _, _ = digits_graph
    node = graph.weighted_nodes()[1]
    masks = selection_masks(graph, {node.name: np.array([0, 3])})
    directions = directions_for(graph, {}, masks)
    a, b, c = directions.draw([7, 7, 8], {}, 2.0)
    assert np.array_equal(a.delta[node.weight_key], b.delta[node.weight_key])
    assert not np.array_equal(a.delta[node.weight_key], c.delta[node.weight_key])
    assert a.delta[node.weight_key].size == masks[node.weight_key].sum()
    assert np.abs(a.delta[node.weight_key]).max() > 256  # eps=2 8-bit steps = 512 int16 steps (w16)


def test_a_perturbed_call_runs_every_other_layer_with_its_trained_integers(digits_graph):
    """The loss at w + delta, from the cached prefix, is a full forward of the complete trained weights plus
    delta: layers trained in an earlier period but not selected now keep their trained integers (they once
    fell back to the graph's stored ones)."""
    graph, x, y = digits_graph
    trained = {n.weight_key: n.weight for n in graph.weighted_nodes()} | {n.bias_key: n.bias for n in graph.weighted_nodes()}
    layers = graph.weighted_nodes()
    for node in layers[:-1]:  # every layer but the one perturbed now was "trained" earlier
        trained[node.weight_key] = np.clip(node.weight.astype(np.int64) + 300, -32767, 32767).astype(node.weight.dtype)
    now = layers[-1]
    masks = selection_masks(graph, {now.name: np.arange(now.weight.shape[1])}, bias=True)
    p, = directions_for(graph, trained, masks).draw([3], trained, 2.0)
    moved = p.apply(trained, +1, integer_limits(graph))
    assert set(moved) == set(trained)
    cache = graph.prefix(x, until=now.name, weights=trained)
    expected = dict(trained)
    expected[now.weight_key] = moved[now.weight_key]
    expected[now.bias_key] = moved[now.bias_key]
    assert not np.array_equal(moved[now.weight_key], trained[now.weight_key])
    full = graph.forward(x, weights=expected)
    assert np.array_equal(graph.forward(cache, start=now.name, weights=moved), full)
    assert not np.array_equal(full, graph.forward(x, weights={now.weight_key: moved[now.weight_key],
                                                              now.bias_key: moved[now.bias_key]}))


def test_channel_masks_cover_grouped_and_depthwise(residual_net):
    _, x, _, proto = residual_net
    graph = convert(proto, x[:50], bits="w8a8")
    for node in graph.weighted_nodes():
        channels = node.weight.shape[1] * getattr(getattr(node, "geometry", None), "groups", 1)
        per_channel = [channel_mask(node, [c]).sum() for c in range(channels)]
        assert sum(per_channel) == node.weight.size and len(set(per_channel)) == 1
        ones = per_channel_sum(node, np.ones(node.weight.shape))
        assert np.array_equal(ones, np.array(per_channel))
    first = graph.weighted_nodes()[0]
    assert selection_bytes(graph, {first.name: np.array([0])}) == first.weight.size  # 1 input channel, int8


def test_stochastic_rounding_is_unbiased():
    rng = np.random.default_rng(0)
    values = np.full(200_000, 0.3)
    assert abs(stochastic_round(values, rng).mean() - 0.3) < 0.005


def test_update_moves_against_the_gradient_and_saturates(digits_graph):
    graph, x, y = digits_graph
    head = graph.weighted_nodes()[-1]
    masks = selection_masks(graph, {head.name: np.arange(head.weight.shape[1])})
    weights = {n.weight_key: n.weight for n in graph.weighted_nodes()}
    limits = integer_limits(graph)
    cache = graph.prefix(x, until=head.name)

    def loss_at(w):
        return cross_entropy(graph.forward(cache, start=head.name, weights=w), graph.output_params, y)

    before = loss_at(weights)
    directions = directions_for(graph, weights, masks)
    for step in range(30):
        est = estimate(one_by_one(loss_at), weights, directions, limits, step_seed=step, m=8, eps=1.0,
                       distribution="gaussian", method="spsa")
        weights = apply_update(graph, weights, est, 2.0, 1.0, limits, step)
    assert loss_at(weights) < before
    huge = apply_update(graph, weights, est, 1e9, 1.0, limits, 0)
    assert np.abs(huge[head.weight_key]).max() == limits[head.weight_key]


@pytest.mark.parametrize("bits, scale", [(8, 0.1), (8, 0.02), (16, 0.001)])
def test_integer_cross_entropy_matches_float(bits, scale):
    from fwdgrad.loss import integer_cross_entropy
    from quant.tensor import QParams

    rng = np.random.default_rng(bits)
    params = QParams(scale, 0, bits)
    logits = rng.integers(params.qmin // 2, params.qmax // 2, (64, 10))
    labels = rng.integers(0, 10, 64)
    assert abs(integer_cross_entropy(logits, params, labels) / 65536 - cross_entropy(logits, params, labels)) < 0.005
