"""Fleets: non-IID splits, seed replay that reproduces a device's own integers, and a 3-device Flower
simulation whose copies stay bit-identical while uploading a few bytes per step."""
import json

import numpy as np
import pytest

from conftest import serve_residual_net
import fwdgrad.task
from fwdgrad.config import TrainConfig
from fwdgrad.exchange import SeedSteps, average_values, replay, set_values, trained_values
from fwdgrad.fleet import Device, FleetConfig, fold_seeds, load_fleet, run_fleet
from fwdgrad.partition import client_indices
from fwdgrad.perturb import selection_masks
from fwdgrad.rundir import weights_digest
from quant.convert import convert

SMALL = dict(dataset="digits", bits="w16a8", selection="s-full-random", budget="2KB", batch_size=25, m=2,
             eps=1.0, lr=2.0, schedule="cosine", seed=3)


pytestmark = pytest.mark.usefixtures("private_cache")


@pytest.fixture
def residual_task(residual_net, monkeypatch):
    """The fleet's server prepares the conftest residual net on sklearn digits (devices get it pickled)."""
    return serve_residual_net(monkeypatch, residual_net, train=300, test_end=1650)


def test_label_split_deals_disjoint_classes():
    labels = np.repeat(np.arange(10), 5)
    parts = client_indices(TrainConfig(), labels, 3, "labels")
    assert [sorted(set(labels[p])) for p in parts] == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert sorted(np.concatenate(parts)) == list(range(50))
    iid = client_indices(TrainConfig(), labels, 3, "iid")
    assert sorted(np.concatenate(iid)) == list(range(50)) and [len(p) for p in iid] == [17, 17, 16]
    with pytest.raises(ValueError, match="at most 10 clients"):
        client_indices(TrainConfig(), labels, 11, "labels")
    with pytest.raises(ValueError, match="dataset = 'keywords'"):
        client_indices(TrainConfig(dataset="digits"), labels, 3, "voices")


@pytest.mark.parametrize("directions", [{}, {"zo_params": "scale-bias", "lr_scale": "layer"},
                                        {"zo_sparsity": 0.5, "directions": "orthogonal"}])
def test_replaying_a_devices_seeds_gives_its_own_integers(residual_task, tmp_path, directions):
    """(seed, g) pairs are the whole update, whatever the directions: replayed on the starting weights they
    land on exactly the integers the device computed, and the FedAvg helpers round-trip the trained values."""
    x, y, proto = residual_task
    cfg = TrainConfig(**SMALL | directions)
    graph = convert(proto, x[:200], bits=cfg.bits)
    setup = {"graph": graph, "config": cfg.to_dict(), "dir": str(tmp_path), "local_steps": 4, "total_steps": 8,
             "clients": [(fwdgrad.task.prepare_data(cfg).x_train[:100], y[:100])]}
    device = Device(setup, 0)
    start = device.trainer.initial_weights()
    selection = device.trainer.sampler().select(0)
    masks = selection_masks(graph, selection, cfg.train_bias)
    trained, upload, loss = device.local_round(dict(start), masks, round_=1)
    assert upload["seeds"].shape == (4,) and upload["projected"].shape == (4, 2) and np.isfinite(loss)
    # the exact head's steps travel as their integer sums (int32, the head's size): the bytes a device adds
    head = device.trainer.zo.head
    assert upload[f"exact:{head.weight_key}"].shape == head.weight.shape
    assert upload[f"exact:{head.weight_key}"].dtype == np.int32
    replayed = fold_seeds(device.trainer.zo, dict(start), masks, {k: v[None] for k, v in upload.items()}, 4, 8)
    assert weights_digest(replayed) == weights_digest(trained) != weights_digest(start)
    perturbed = device.trainer.zo.perturbed(masks)  # the ZO part alone is (seed, g) pairs
    only_zo = replay(graph, dict(start), device.trainer.zo.directions(masks, start), device.trainer.limits, device.config, SeedSteps(upload["seeds"], upload["projected"]), 4, 8)
    assert all(np.array_equal(only_zo[k], trained[k]) for k in perturbed)

    values = trained_values(trained, masks)
    assert weights_digest(set_values(start, masks, values)) == weights_digest(trained)
    assert all(np.array_equal(average_values([values, values])[k], values[k]) for k in values)


def test_fleet_file_and_settings_are_checked(tmp_path):
    path = tmp_path / "fleet.toml"
    path.write_text('[train]\ndataset = "digits"\n[fleet]\nclients = 4\nsplit = "iid"\n')
    cfg, fleet = load_fleet(path)
    assert cfg.dataset == "digits" and fleet == FleetConfig(clients=4, split="iid")
    path.write_text('[fleet]\nclient = 4\n')
    with pytest.raises(ValueError, match="unknown fleet settings"):
        load_fleet(path)
    with pytest.raises(ValueError, match="momentum = 0"):
        load_fleet(None, {"momentum": 0.9})
    with pytest.raises(ValueError, match="unknown protocols"):
        FleetConfig(protocols=["gradients"])


def test_three_device_flower_fleet_keeps_copies_identical(residual_task, tmp_path):
    pytest.importorskip("flwr")
    cfg = TrainConfig(**SMALL)
    fleet = FleetConfig(clients=3, rounds=2, local_steps=2, split="labels")
    result = run_fleet(cfg, fleet, tmp_path / "fleet")
    seeds, weights = result["protocols"]["seeds"], result["protocols"]["weights"]
    assert seeds["in_sync"] and weights["in_sync"]  # every device's digest matched the server's every round
    assert [len(p["rounds"]) for p in (seeds, weights)] == [3, 3]  # 2 training rounds + the final download
    # a device uploads 8 + 4m bytes per ZO step (3 devices x 2 steps x (8 + 4 * 2)), and the int32 sum of its
    # exact head steps once per round (the head has 10 x 20 weights and 10 biases)
    assert seeds["uplink_payload_bytes_per_round"] == 3 * 2 * (8 + 4 * 2) + 3 * 4 * (10 * 20 + 10)
    assert weights["uplink_payload_bytes_per_round"] > seeds["uplink_payload_bytes_per_round"]
    assert seeds["zero_shot_top1"] == weights["zero_shot_top1"]
    stored = json.loads((tmp_path / "fleet" / "fleet.json").read_text())
    assert stored["device_classes"] == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert "| seeds |" in (tmp_path / "fleet" / "report.md").read_text()
    assert (tmp_path / "fleet" / "fleet.png").stat().st_size > 10_000
