"""The directions a step perturbs along: per-channel scales, Sparse MeZO masks, orthogonal draws, per-array
learning rates; each gives what it claims, and the default draws are the integers they always were."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import cosine, digits_task
from fwdgrad.config import TrainConfig
from fwdgrad.directions import directions_for
from fwdgrad.estimators import estimate, one_by_one
from fwdgrad.loss import cross_entropy
from fwdgrad.perturb import integer_limits, selection_masks
from fwdgrad.trainer import Trainer

pytestmark = pytest.mark.usefixtures("private_cache")


def whole_layer(graph, node):
    return selection_masks(graph, {node.name: np.arange(node.weight.shape[1])})


def test_scale_directions_follow_the_gradient_of_each_channels_scale(digits_graph):
    """A scale direction moves w[o] by eps z_o w[o] (one number per output channel), and E[g z_o] is the
    derivative of the engine's loss along that channel's scale (central differences, one channel at a time)."""
    graph, x, y = digits_graph
    head = graph.weighted_nodes()[-1]
    weights = {head.weight_key: head.weight, head.bias_key: head.bias}
    directions = directions_for(graph, weights, whole_layer(graph, head), space="real", zo_params="scale-bias")
    assert directions.sizes() == {head.weight_key: head.weight.shape[0]}
    cache = graph.prefix(x, until=head.name)

    def loss_at(w):
        return cross_entropy(graph.forward(cache, start=head.name, weights=w), graph.output_params, y)

    w, eps = head.weight.astype(np.float64), 0.02
    limits = integer_limits(graph)
    mean = np.zeros(w.shape[0])
    for seed in range(1500):
        est = estimate(one_by_one(loss_at), weights, directions, limits, step_seed=seed, m=1, eps=eps, distribution="gaussian",
                       method="spsa")
        delta = est.perturbations[0].delta[head.weight_key].reshape(w.shape)
        z = (delta * w).sum(axis=1) / (eps * (w * w).sum(axis=1))  # the draw's z_o, back from the integers
        mean += est.projected[0] * z / 1500
    assert np.abs(delta - eps * z[:, None] * w).max() < 1.0  # w[o] times one number, rounded

    def scaled(o, factor):
        moved = w.copy()
        moved[o] *= factor
        q = limits[head.weight_key]
        return {head.weight_key: np.clip(np.rint(moved), -q, q).astype(head.weight.dtype), head.bias_key: head.bias}

    h = 0.02
    derivative = np.array([(loss_at(scaled(o, 1 + h)) - loss_at(scaled(o, 1 - h))) / (2 * h) for o in range(w.shape[0])])
    assert cosine(mean, derivative) > 0.9


def test_sparse_masks_keep_the_smallest_weights(digits_graph):
    graph, _, _ = digits_graph
    node = graph.weighted_nodes()[1]
    masks = selection_masks(graph, {node.name: np.arange(6)}, bias=True)
    weights = {node.weight_key: node.weight, node.bias_key: node.bias}
    sparse = directions_for(graph, weights, masks, sparsity=0.75).masks
    chosen, selected = sparse[node.weight_key], masks[node.weight_key]
    assert not (chosen & ~selected).any()
    assert abs(chosen.sum() / selected.sum() - 0.25) < 0.05
    magnitude = np.abs(node.weight.astype(np.int64))
    assert magnitude[chosen].max() <= magnitude[selected & ~chosen].min()
    assert np.array_equal(sparse[node.bias_key], masks[node.bias_key])  # biases stay whole


def test_orthogonal_draws_are_orthogonal_and_the_first_keeps_its_direction(digits_graph):
    graph, _, _ = digits_graph
    node = graph.weighted_nodes()[1]
    masks = selection_masks(graph, {node.name: np.arange(12)})
    independent = directions_for(graph, {}, masks)
    orthogonal = directions_for(graph, {}, masks, orthogonal="orthogonal")
    seeds = [11, 12, 13, 14]
    z = np.stack([p.delta[node.weight_key] / independent.units[node.weight_key] for p in orthogonal.draw(seeds, {}, 4.0)])
    gram = z @ z.T / np.outer(np.linalg.norm(z, axis=1), np.linalg.norm(z, axis=1))
    assert np.abs(gram - np.eye(4)).max() < 1e-3  # up to rounding onto the int16 grid
    plain = independent.draw(seeds, {}, 4.0)[0].delta[node.weight_key].astype(np.float64)
    assert cosine(plain, z[0]) > 0.999
    assert abs(np.linalg.norm(z[1]) / np.linalg.norm(plain / independent.units[node.weight_key]) - 1) < 0.2


def test_learning_rate_factors_share_one_total(digits_graph):
    graph, _, _ = digits_graph
    layers = graph.weighted_nodes()
    masks = selection_masks(graph, {layers[0].name: np.arange(1), layers[-1].name: np.arange(5)}, bias=True)
    directions = directions_for(graph, {}, masks)
    sizes = directions.sizes()
    for scale in ("dimension", "layer"):
        factors = directions.lr_factors(scale)
        assert abs(sum(sizes[k] * f for k, f in factors.items()) - 1.0) < 1e-12
    layer = directions.lr_factors("layer")
    assert layer[layers[-1].bias_key] > layer[layers[-1].weight_key]  # the small array moves as fast
    assert set(directions.lr_factors("none").values()) == {1.0}


@pytest.mark.parametrize("changes", [{"zo_params": "scale-bias"}, {"zo_sparsity": 0.5},
                                     {"directions": "orthogonal"}, {"lr_scale": "layer", "lr": 200.0}])
def test_every_direction_setting_trains_deterministically_on_both_backends(residual_net, tmp_path, changes):
    graph, data = digits_task(residual_net, "w16a8", train=300, test_end=1700)
    settings = dict(model="small-cnn", dataset="digits", bits="w16a8", selection="trady", budget="600B", epochs=1,
                    batch_size=100, m=2, eps=1.0, lr=1.0, rgn_samples=128, head_update="zo")
    runs = [Trainer(graph, data, TrainConfig(**(settings | changes | {"backend": b})), tmp_path / b).run()
            for b in ("numba", "numpy")]
    plain = Trainer(graph, data, TrainConfig(**settings), tmp_path / "plain").run()
    assert runs[0]["weights_sha256"] == runs[1]["weights_sha256"] != plain["weights_sha256"]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_copies_of_a_layer_run_together_give_the_integers_of_separate_calls(residual_net, data):
    """QGraph.advance_each: every weighted layer of the residual net (dense and grouped convolutions, the
    linear head), 1-5 weight sets, both kernel backends, 8- and 16-bit weights, whole or chunked."""
    import quant.graph

    bits = data.draw(st.sampled_from(["w8a8", "w16a8"]))
    graph = digits_task(residual_net, bits, train=16, test_end=1516)[0]
    _, x, _, _ = residual_net
    node = data.draw(st.sampled_from(graph.weighted_nodes()))
    backend = data.draw(st.sampled_from(["numpy", "numba"]))
    copies = data.draw(st.integers(1, 5))
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 31)))
    q = node.w_params.qmax
    sets = [{node.weight_key: rng.integers(-q, q + 1, node.weight.shape).astype(node.weight.dtype),
             node.bias_key: rng.integers(-1000, 1000, node.bias.shape).astype(node.bias.dtype)}
            for _ in range(copies)]
    cache = graph.prefix(x[:data.draw(st.integers(1, 6))], until=node.name, backend=backend)
    limit = data.draw(st.sampled_from([1, quant.graph.WIDE_OUTPUT_BYTES]))
    saved, quant.graph.WIDE_OUTPUT_BYTES = quant.graph.WIDE_OUTPUT_BYTES, limit  # 1: one copy per call
    try:
        together = [env for env, _ in graph.advance_each(cache, node.name, sets, backend=backend)]
    finally:
        quant.graph.WIDE_OUTPUT_BYTES = saved
    after = graph.nodes[graph.index(node.name) + 1].name if node is not graph.nodes[-1] else None
    for env, w in zip(together, sets):
        alone = graph.advance(cache, node.name, after, weights=w, backend=backend) if after else \
            {graph.output_name: graph.forward(cache, start=node.name, weights=w, backend=backend)}
        assert set(env) >= set(alone)
        assert all(np.array_equal(env[t], alone[t]) and env[t].dtype == alone[t].dtype for t in alone)


def test_a_run_with_widened_copies_ends_on_the_integers_of_one_call_at_a_time(residual_net, tmp_path, monkeypatch):
    from quant.ops.base import WeightedNode

    graph, data = digits_task(residual_net, "w16a8", train=300, test_end=1700)
    settings = dict(model="small-cnn", dataset="digits", bits="w16a8", selection="all", epochs=1,
                    batch_size=100, m=2, eps=1.0, lr=1.0, rgn_samples=128, head_update="zo")
    calls = []
    run_wide = WeightedNode.run_wide
    monkeypatch.setattr(WeightedNode, "run_wide", lambda self, *a: calls.append(self.name) or run_wide(self, *a))
    widened = Trainer(graph, data, TrainConfig(**settings), tmp_path / "wide").run()
    assert calls  # the copies of the first layer did run together
    monkeypatch.setattr(WeightedNode, "widens", property(lambda self: False))
    alone = Trainer(graph, data, TrainConfig(**settings), tmp_path / "alone").run()
    assert widened["weights_sha256"] == alone["weights_sha256"]


@pytest.mark.parametrize("space, step", [("real", 1.0), ("steps", 1 / 128)])
def test_a_scale_moves_by_eps_in_its_space(digits_graph, space, step):
    """eps is a relative scale change in real space and counts 8-bit steps of 1/128 in steps space (train's
    default: eps 2 moves a channel by 1.6%, not by 200%)."""
    graph, _, _ = digits_graph
    head = graph.weighted_nodes()[-1]
    weights = {head.weight_key: head.weight, head.bias_key: head.bias}
    directions = directions_for(graph, weights, whole_layer(graph, head), space=space, zo_params="scale-bias")
    p, = directions.draw([5], weights, 2.0)
    w = head.weight.astype(np.float64)
    large = np.abs(w) > 1000
    ratio = p.delta[head.weight_key].reshape(w.shape)[large] / w[large]
    assert 0 < np.abs(ratio).max() < 2.0 * step * 5  # |z| < 5
    assert np.abs(ratio).max() > 2.0 * step * 0.1


def test_a_sparse_mask_and_scale_directions_are_refused_together():
    from fwdgrad.config import ConfigError

    with pytest.raises((ValueError, ConfigError), match="zo_sparsity = 0.5 masks weights.*drop one of the two"):
        TrainConfig(zo_params="scale-bias", zo_sparsity=0.5)
