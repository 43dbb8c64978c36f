"""The training loop: deterministic across backends, resumable bit-exactly, honest outputs, clear errors."""
import json

import numpy as np
import pytest

from conftest import digits_task
from fwdgrad.config import TrainConfig, parse_bytes
from fwdgrad.data.split import TrainData
from fwdgrad.rundir import load_graph
from fwdgrad.trainer import Trainer

SMALL = dict(model="small-cnn", dataset="digits", bits="w16a8", selection="trady", budget="600B", epochs=2,
             batch_size=100, m=2, eps=1.0, lr=1.0, rgn_samples=128)


pytestmark = pytest.mark.usefixtures("private_cache")


@pytest.fixture(scope="module")
def task(residual_net):
    return digits_task(residual_net, "w16a8", train=600, test_end=1700)


def train(task, out, **changes):
    graph, data = task
    return Trainer(graph, data, TrainConfig(**(SMALL | changes)), out).run()


def test_same_seed_same_integers_on_both_backends(task, tmp_path):
    fast = train(task, tmp_path / "numba")
    reference = train(task, tmp_path / "numpy", backend="numpy")
    assert fast["weights_sha256"] == reference["weights_sha256"]
    assert train(task, tmp_path / "seed1", seed=1)["weights_sha256"] != fast["weights_sha256"]


def test_outputs_of_a_run(task, tmp_path):
    summary = train(task, tmp_path / "run")
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [l["epoch"] for l in lines] == [1, 2]
    assert lines[-1]["forward_calls"] == summary["forward_calls"] == 2 * 6 * 2 * 2  # epochs*steps*m*2
    assert 0 < lines[0]["trainable_bytes"] <= parse_bytes("600B")
    assert 0 < lines[0]["step_macs_per_sample"] <= lines[0]["full_pass_macs_per_sample"]
    assert {"zero_shot_top1", "final_top1", "best_top1", "epochs", "forward_calls", "trainable_bytes",
            "config"} <= set(json.loads((tmp_path / "run" / "summary.json").read_text()))
    assert (tmp_path / "run" / "rgn.json").exists()
    assert load_graph(tmp_path / "run").input_name == task[0].input_name


def test_killed_run_resumes_to_the_same_integers(task, tmp_path, monkeypatch):
    whole = train(task, tmp_path / "whole", checkpoint_every=2, momentum=0.9, selection="d-full-random",
                  resample_every=3)
    real_step = Trainer.step

    def dying_step(self, weights, momentum, masks, selection, x, y, step):
        if step == 7:
            raise KeyboardInterrupt("killed")
        return real_step(self, weights, momentum, masks, selection, x, y, step)

    monkeypatch.setattr(Trainer, "step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train(task, tmp_path / "killed", checkpoint_every=2, momentum=0.9, selection="d-full-random", resample_every=3)
    monkeypatch.setattr(Trainer, "step", real_step)
    graph, data = task
    cfg = TrainConfig(**(SMALL | dict(checkpoint_every=2, momentum=0.9, selection="d-full-random", resample_every=3)))
    resumed = Trainer(load_graph(tmp_path / "killed"), data, cfg, tmp_path / "killed").run(resume=True)
    assert resumed["weights_sha256"] == whole["weights_sha256"]
    assert resumed["forward_calls"] == whole["forward_calls"]
    assert len((tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()) == 2


def test_resume_of_another_config_is_refused(task, tmp_path):
    train(task, tmp_path / "run", epochs=1)
    graph, data = task
    with pytest.raises(ValueError, match="another configuration"):
        Trainer(graph, data, TrainConfig(**(SMALL | dict(epochs=1, lr=3.0))), tmp_path / "run").run(resume=True)


def test_every_selection_method_runs_within_budget(task, tmp_path):
    for method in ["trady", "s-full-random", "d-full-random", "s-topk-random", "s-det-rgn", "last-layer"]:
        summary = train(task, tmp_path / method, selection=method, epochs=1)
        if method != "last-layer":
            assert summary["trainable_bytes"] <= 600


def test_biases_train_with_their_layer_inside_the_budget(task, tmp_path):
    graph, data = task
    with_bias = train(task, tmp_path / "bias", selection="last-layer", epochs=1)
    without = train(task, tmp_path / "nobias", selection="last-layer", epochs=1, train_bias=False)
    head = graph.weighted_nodes()[-1]
    assert with_bias["trainable_bytes"] == without["trainable_bytes"] + head.bias.nbytes
    _, weights, _ = Trainer(graph, data, TrainConfig(**SMALL), tmp_path / "bias").load()
    _, frozen, _ = Trainer(graph, data, TrainConfig(**SMALL), tmp_path / "nobias").load()
    assert not np.array_equal(weights[head.bias_key], head.bias)
    assert np.array_equal(frozen[head.bias_key], head.bias)
    budgeted = train(task, tmp_path / "trady", epochs=1)
    assert budgeted["trainable_bytes"] <= parse_bytes(SMALL["budget"])


def test_integer_loss_trains_like_the_float_loss(task, tmp_path):
    integer = train(task, tmp_path / "int", loss="integer")
    assert integer["forward_calls"] == 2 * 6 * 2 * 2
    assert integer["final_top1"] >= integer["zero_shot_top1"] - 0.05


@pytest.mark.parametrize("estimator", ["sign-spsa", "sharpness"])
def test_estimator_variants_count_their_calls(task, tmp_path, estimator):
    summary = train(task, tmp_path / estimator, estimator=estimator, epochs=1)
    assert summary["forward_calls"] == 6 * 2 * 2 * (2 if estimator == "sharpness" else 1)


@pytest.mark.parametrize("bad, message", [
    (dict(bits="int8"), "bad bits 'int8': use one of auto, w8a8"), (dict(selection="topk"), "bad selection"),
    (dict(budget="lots"), "bad size"), (dict(m=0), "m = 0: must be >= 1"), (dict(lr=0.0), "lr = 0.0: must be > 0")])
def test_bad_settings_are_explained(bad, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**(SMALL | bad))


def test_budget_below_one_channel_names_the_minimum(task, tmp_path):
    with pytest.raises(ValueError, match="raise --budget to at least"):
        train(task, tmp_path / "tiny", budget="2B")


def test_rgn_without_torch_ranks_layers_like_the_twin(task):
    from fwdgrad.selection import channel_rgn, channel_rgn_zo

    graph, data = task
    twin = channel_rgn(graph, data.x_train[:128], data.y_train[:128])
    zo = channel_rgn_zo(graph, data.x_train[:128], data.y_train[:128], samples=48)
    twin_layers = np.array([twin[k].sum() for k in twin])
    zo_layers = np.array([zo[k].sum() for k in twin])
    assert np.corrcoef(np.log(twin_layers), np.log(zo_layers))[0, 1] > 0.5


def test_parse_bytes():
    assert parse_bytes("64KB") == 65536 and parse_bytes("1.5MB") == 1572864 and parse_bytes("300") == 300


def test_prefix_cache_uses_the_trained_weights_of_earlier_periods(task):
    """A layer trained in one selection period sits in the next period's prefix: the cache must use it."""
    graph, data = task
    first, later = graph.weighted_nodes()[0], graph.weighted_nodes()[2]
    trained = {first.weight_key: np.clip(first.weight.astype(np.int32) + 300, -32767, 32767).astype(first.weight.dtype)}
    cache = graph.prefix(data.x_test, until=later.name, weights=trained)
    from_cache = graph.forward(cache, start=later.name, weights=trained)
    assert np.array_equal(from_cache, graph.forward(data.x_test, weights=trained))
    assert not np.array_equal(from_cache, graph.forward(data.x_test))


def test_dimension_scaled_lr_is_the_plain_lr_divided_by_the_perturbed_weights(task, tmp_path):
    graph, _ = task
    head = graph.weighted_nodes()[-1]
    d = head.weight.size + head.bias.size  # last-layer selection: the whole head and its bias
    plain = train(task, tmp_path / "plain", selection="last-layer", epochs=1, lr=0.5)
    scaled = train(task, tmp_path / "scaled", selection="last-layer", epochs=1, lr=0.5 * d, lr_scale="dimension")
    assert plain["weights_sha256"] == scaled["weights_sha256"]


def test_layer_ranking_depends_on_the_task_not_on_what_filled_the_cache(task, tmp_path):
    """The cached RGN belongs to one model and its samples: another task on the same architecture computes
    its own (else which layers train would depend on the order runs happened in), the same task reuses it."""
    graph, data = task
    train(task, tmp_path / "a", epochs=1)
    cached = sorted((tmp_path / "cache" / "rgn").iterdir())
    assert len(cached) == 1
    train(task, tmp_path / "b", epochs=1, seed=1)
    assert sorted((tmp_path / "cache" / "rgn").iterdir()) == cached
    other = TrainData(data.x_train[::-1].copy(), data.y_train[::-1].copy(), data.x_test, data.y_test)
    Trainer(graph, other, TrainConfig(**(SMALL | dict(epochs=1))), tmp_path / "c").run()
    assert len(list((tmp_path / "cache" / "rgn").iterdir())) == 2
    first, second = (json.loads((tmp_path / run / "rgn.json").read_text())["rgn"] for run in ("a", "c"))
    assert first != second
