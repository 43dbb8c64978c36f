"""Device profiles, the memory planner and the refusal of runs that do not fit."""
import json
import re

import numpy as np
import pytest

from devices.planner import (Tensor, budget_shape, engine_activation_peak, greedy_arena, live_peak, plan,
                             selection_shape, tensor_lifetimes)
from devices.profiles import load_profile, profile_names
from fwdgrad.cli import main
from fwdgrad.config import TrainConfig
from fwdgrad.data.split import TrainData
from fwdgrad.trainer import Trainer
from quant.convert import convert

TINY_MCU = """name = "tiny"
description = "a 2 KB part, for refusals"
sram_kb = 2
flash_kb = 64
weight_bits = [8, 16]
activation_bits = [8]
accumulator_bits = 32
macs_per_cycle = 1
clock_mhz = 16
fpu = true
energy_per_mac_pj = 100.0
energy_per_byte_pj = 5.0
sources = ["test"]
"""


@pytest.fixture(scope="module")
def task(residual_net):
    _, x, y, proto = residual_net
    return convert(proto, x[:200], bits="w8a8"), TrainData(x[:300], y[:300], x[1500:1600], y[1500:1600])


def test_shipped_profiles_cover_the_device_classes():
    names = set(profile_names())
    assert {"cortex-m4", "cortex-m7", "ethos-u55", "hexagon", "host"} <= names
    m4 = load_profile("cortex-m4")
    assert m4.sram_bytes == 256 * 1024 and m4.flash_bytes == 1024 * 1024 and not m4.fpu
    assert m4.supports(8, 8) and m4.supports(16, 8) and not m4.supports(8, 16) and load_profile("ethos-u55").supports(8, 16)
    assert load_profile("host").sram_bytes is None


def test_bad_profiles_are_explained(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(TINY_MCU.replace("sram_kb", "ram_kb"))
    with pytest.raises(ValueError, match=r"sram_kb is missing; unknown field 'ram_kb'"):
        load_profile(str(path))
    path.write_text(TINY_MCU.replace("weight_bits = [8, 16]", "weight_bits = [4]"))
    with pytest.raises(ValueError, match=r"weight_bits = \(4,\): input should be 8 or 16"):
        load_profile(str(path))
    for value, message in (("nan", "sram_kb = nan: input should be a valid integer"),
                           ("true", "sram_kb = True: input should be a valid integer"),
                           ("-4", "sram_kb = -4: input should be greater than or equal to 0")):
        path.write_text(re.sub(r"sram_kb = \S+", f"sram_kb = {value}", TINY_MCU))
        with pytest.raises(ValueError, match=re.escape(message)):
            load_profile(str(path))
    with pytest.raises(ValueError, match="unknown device 'm4'.*cortex-m4"):
        load_profile("m4")


def test_greedy_arena_is_between_the_live_bound_and_no_reuse(task):
    graph, _ = task
    tensors = tensor_lifetimes(graph, (1, 8, 8))
    arena = greedy_arena(tensors)
    assert live_peak(tensors) <= arena <= sum(t.size for t in tensors)
    # a chain a -> b -> c -> d: only neighbours overlap, so two slots of the biggest sizes suffice
    chain = [Tensor("a", 100, -1, 0), Tensor("b", 60, 0, 1), Tensor("c", 100, 1, 2), Tensor("d", 60, 2, 3)]
    assert greedy_arena(chain) == live_peak(chain) == 160


def test_the_engine_holds_what_the_plan_says(task):
    graph, data = task
    tensors = [t for t in tensor_lifetimes(graph, (1, 8, 8)) if not t.name.endswith(":scratch")]
    measured = engine_activation_peak(graph, data.x_test[:1])
    assert live_peak(tensors) <= measured <= greedy_arena(tensors) <= 1.2 * measured


def test_zo_adds_little_to_inference_and_backprop_adds_much(task):
    graph, _ = task
    shape = budget_shape(graph, (1, 8, 8), 512, method="zo", m=4, batch=1, momentum=False, bits=8)
    result = plan(graph, (1, 8, 8), load_profile("cortex-m7"), shape)
    assert result.zo_peak == sum(result.zo_parts.values())
    assert result.zo_peak <= result.inference_peak + 512 + result.zo_parts["prefix_cache"] + 48
    assert result.bp_peak > result.zo_peak
    assert result.zo_step_macs > result.forward_macs and result.bp_step_macs > result.forward_macs
    assert result.fits_zo and result.zo_step_seconds > 0 and result.zo_step_joules > 0


def test_exact_gradient_sums_are_planned_for_the_selected_weights_only(task):
    graph, _ = task
    last = graph.weighted_nodes()[-1]  # the head: out weights per input channel
    for channels in ([0], [0, 1, 2]):
        shape = selection_shape(graph, {last.name: np.array(channels)}, m=4, batch=1, momentum=False, bias=False)
        shape.exact_layers = (last.name,)
        sums = plan(graph, (1, 8, 8), load_profile("cortex-m7"), shape).zo_parts["exact_gradients"]
        assert sums == 4 * (last.weight.size // last.weight.shape[1] * len(channels) + last.bias.size)


def test_runs_that_do_not_fit_are_refused_with_numbers(task, tmp_path, monkeypatch):
    monkeypatch.setenv("FWDGRAD_CACHE", str(tmp_path / "cache"))
    graph, data = task
    with pytest.raises(ValueError, match=r"device cortex-m4 runs .*activations of \[8\] bits, not w8a16"):
        TrainConfig(bits="w8a16", device="cortex-m4", loss="integer")
    with pytest.raises(ValueError, match="no FPU.*--loss integer"):
        TrainConfig(bits="w8a8", device="cortex-m4")
    profile = tmp_path / "tiny.toml"
    profile.write_text(TINY_MCU)
    cfg = TrainConfig(bits="w8a8", device=str(profile), budget="1KB", epochs=1, batch_size=100)
    with pytest.raises(ValueError, match=r"ZO training needs \d+ KB SRAM \(.*\), device tiny has 2 KB: lower --budget"):
        Trainer(graph, data, cfg, tmp_path / "run").run()
    assert not (tmp_path / "run" / "checkpoint").exists()  # refused before any work


def test_devices_and_plan_commands(capsys):
    assert main(["devices", "--json"]) == 0
    listed = {p["name"] for p in json.loads(capsys.readouterr().out)}
    assert {"cortex-m4", "host"} <= listed
    assert main(["plan", "--resolution", "96", "--json"]) == 0
    rows = {r["device"]: r for r in json.loads(capsys.readouterr().out)}
    host = rows["host"]
    assert host["inference_peak"] < host["zo_peak"] < host["bp_peak"]
    assert not rows["cortex-m4"]["fits_inference"]  # MobileNetV2's 3.4 MB of weights exceed 1 MB of flash
    assert np.isclose(host["zo_peak"], sum(host["zo_parts"].values()))
