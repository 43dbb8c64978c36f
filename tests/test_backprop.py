"""The backprop reference shares data order, selection and outputs with the ZO trainer, and learns."""
import json

import numpy as np
import pytest

from conftest import digits_task
from fwdgrad.backprop import BackpropTrainer, trainer_for
from fwdgrad.config import TrainConfig
from fwdgrad.reference import FloatTwin
from fwdgrad.trainer import Trainer

SETTINGS = dict(bits="w8a8", selection="trady", budget="2KB", epochs=2, batch_size=100, bp_lr=0.05,
                rgn_samples=128, schedule="constant")


pytestmark = pytest.mark.usefixtures("private_cache")


@pytest.fixture(scope="module")
def task(residual_net):
    return digits_task(residual_net, "w8a8", train=600, test_end=1797)


def run(task, out, **changes):
    graph, data = task
    cfg = TrainConfig(**(SETTINGS | changes))
    return trainer_for(cfg)(graph, data, cfg, out).run()


def test_fake_quant_twin_matches_the_integer_engine(task):
    import torch

    graph, data = task
    twin = FloatTwin(graph, fake_quant=True)
    with torch.inference_mode():
        logits = twin(data.x_test, twin.parameters(requires_grad=False)).numpy()
    engine = graph.forward_float(data.x_test)
    agreement = np.mean(logits.argmax(1) == engine.argmax(1))
    assert agreement > 0.97  # same grids; only requantization rounding differs
    assert np.abs(logits - engine).max() < 0.25 * np.abs(engine).max()


@pytest.mark.parametrize("method", ["bp", "bp-fq"])
def test_backprop_reference_learns_on_the_same_selection(task, tmp_path, method):
    graph, data = task
    zo = run(task, tmp_path / "zo", method="zo", lr=1.0, eps=1.0, m=2)
    bp = run(task, tmp_path / method, method=method, epochs=3, bp_lr=0.02)
    assert bp["best_top1"] > bp["zero_shot_top1"] - 0.01
    ranked = [json.loads(l) for l in (tmp_path / method / "metrics.jsonl").read_text().splitlines()]
    assert ranked[-1]["train_loss"] < ranked[0]["train_loss"]
    # same sampler, same seed: every period trains the channels the ZO run trained
    zo_state = json.loads((tmp_path / "zo" / "checkpoint" / "state.json").read_text())
    bp_state = json.loads((tmp_path / method / "checkpoint" / "state.json").read_text())
    assert zo_state["selection"] == bp_state["selection"] or zo_state["period"] != bp_state["period"]
    assert bp["forward_calls"] == 3 * 6  # one forward (and one backward) per step
    assert zo["trainable_bytes"] == bp["trainable_bytes"]


def test_backprop_only_moves_selected_channels_and_resumes_exactly(task, tmp_path, monkeypatch):
    graph, data = task
    whole = run(task, tmp_path / "whole", method="bp-fq", momentum=0.9, checkpoint_every=2)
    real_step = BackpropTrainer.step

    def dying_step(self, *args):
        if args[-1] == 7:
            raise KeyboardInterrupt("killed")
        return real_step(self, *args)

    monkeypatch.setattr(BackpropTrainer, "step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        run(task, tmp_path / "killed", method="bp-fq", momentum=0.9, checkpoint_every=2)
    monkeypatch.setattr(BackpropTrainer, "step", real_step)
    cfg = TrainConfig(**(SETTINGS | dict(method="bp-fq", momentum=0.9, checkpoint_every=2)))
    resumed = BackpropTrainer(graph, data, cfg, tmp_path / "killed").run(resume=True)
    assert resumed["weights_sha256"] == whole["weights_sha256"]

    assert trainer_for(TrainConfig(method="zo")) is Trainer


def test_backprop_moves_only_the_selected_channels(task, tmp_path):
    graph, data = task
    cfg = TrainConfig(**(SETTINGS | dict(method="bp-fq", selection="last-layer", epochs=1)))
    trainer = BackpropTrainer(graph, data, cfg, tmp_path / "last")
    trainer.run()
    _, weights, _ = trainer.load()
    last = graph.weighted_nodes()[-1]
    stored = {k: v for n in graph.weighted_nodes() for k, v in ((n.weight_key, n.weight), (n.bias_key, n.bias))}
    moved = {k for k, v in trainer.integer_weights(weights).items() if not np.array_equal(v, stored[k])}
    assert moved == {last.weight_key, last.bias_key}


def test_bad_method_is_refused():
    with pytest.raises(ValueError, match="bad method 'sgd'"):
        TrainConfig(method="sgd")
