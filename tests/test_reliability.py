"""Bad input never gets through and never leaves a mess; runs never collide; a kill loses nothing.

- generated bad values for every training setting (and for quantize / verify-onnx / plan flags) end in exit
  2 with one `fwdgrad: error:` line that names the setting, no traceback, and no run directory that would
  block the corrected command;
- a second writer of a run directory (another `train --out D`, or `--resume D`) is refused while the first
  runs, naming its pid;
- a kill between an epoch's metrics row and its checkpoint does not repeat the row on resume.
"""
import json
import os
import subprocess
import sys
import time
from dataclasses import fields

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fwdgrad.cli import main
from fwdgrad.config import TrainConfig
from fwdgrad.rundir import load_graph
from fwdgrad.trainer import Trainer
from tests.conftest import digits_task, user_files

COUNTS = {"m", "epochs", "batch_size", "calibration_samples", "rgn_samples"}
NON_NEGATIVE = {"resolution", "resample_every", "warmup_steps", "seed", "train_samples", "test_samples",
                "checkpoint_every", "probe_samples"}
POSITIVE = {"eps", "lr", "bp_lr", "head_lr"}
TEXT = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=8)


def bad_values(name: str):
    """Values of the setting ``name`` that must be refused, as typed on the command line."""
    if name in COUNTS:
        return st.one_of(st.integers(-5, 0).map(str), st.sampled_from(["1.5", "two", "nan", ""]))
    if name in NON_NEGATIVE:
        return st.one_of(st.integers(-99, -1).map(str), st.sampled_from(["2.5", "x"]))
    if name in POSITIVE:
        return st.one_of(st.sampled_from(["nan", "inf", "-inf", "0", "-1e-3", "fast"]),
                         st.floats(-10, 0).map(repr))
    if name == "momentum":
        return st.sampled_from(["nan", "inf", "1", "5", "-0.1"])
    if name == "rho":
        return st.sampled_from(["nan", "inf", "-1"])
    if name == "train_bias":
        return st.sampled_from(["maybe", "2", "nah", ""])
    if name == "budget":
        return st.sampled_from(["0", "0KB", "-5KB", "lots", "8 parsecs"])
    if name == "resolution":
        return st.sampled_from(["13", "97", "-1"])
    if name in ("model", "dataset", "device"):
        return TEXT.map(lambda t: f"no-{t}")
    return TEXT.map(lambda t: f"bad{t}")  # every choice setting: a word that is not a choice


SETTINGS = [f.name for f in fields(TrainConfig)]


def run(argv: list[str]) -> int:
    """The command line's exit code (argparse's own refusals exit through SystemExit)."""
    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code


def _named(message: str, name: str) -> bool:
    forms = {name, name.replace("_", "-"), name.replace("_", " "), "data set" if name == "dataset" else name}
    return any(form in message for form in forms)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return user_files(tmp_path_factory.mktemp("user"))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_every_bad_setting_is_one_clear_error_and_leaves_nothing_behind(data, tmp_path, capsys):
    name = data.draw(st.sampled_from(SETTINGS))
    value = data.draw(bad_values(name))
    out = tmp_path / f"run-{name}"
    capsys.readouterr()
    assert run(["train", "--out", str(out), f"--{name.replace('_', '-')}={value}"]) == 2
    err = capsys.readouterr().err
    assert "fwdgrad: error: " in err and "Traceback" not in err, err
    assert _named(err, name), err
    assert not (out / "checkpoint" / "state.json").exists()  # the corrected command can use the same --out


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_bad_flags_of_quantize_verify_and_plan_are_one_clear_error(data, tiny_model, capsys):
    command = data.draw(st.sampled_from([
        ("quantize", "--bits", st.sampled_from(["w4a8", "int8", "w8"])),
        ("quantize", "--calibration-samples", st.sampled_from(["0", "-3", "many"])),
        ("quantize", "--equalize", TEXT), ("quantize", "--rounding", TEXT), ("quantize", "--head", TEXT),
        ("verify-onnx", "--samples", st.sampled_from(["0", "-1", "all"])),
        ("verify-onnx", "--optimization", TEXT),
        ("plan", "--m", st.sampled_from(["0", "-2", "x"])), ("plan", "--width", st.sampled_from(["0", "nan", "-1"])),
        ("plan", "--batch", st.sampled_from(["0", "x"])), ("plan", "--bits", TEXT)]))
    flag, value = command[1], data.draw(command[2])
    base = {"quantize": ["quantize", str(tiny_model / "user.onnx"), "--data", str(tiny_model / "data.npz")],
            "verify-onnx": ["verify-onnx", str(tiny_model / "user.onnx"), "--data", str(tiny_model / "data.npz")],
            "plan": ["plan", "--model", str(tiny_model / "user.onnx")]}[command[0]]
    capsys.readouterr()
    assert run(base + [f"{flag}={value}"]) == 2
    err = capsys.readouterr().err
    assert "fwdgrad: error: " in err and "Traceback" not in err, err
    assert _named(err, flag.lstrip("-")) or "bits" in err, err


def test_a_second_writer_of_a_run_directory_is_refused_naming_the_first(tiny_model, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--model", str(tiny_model / "user.onnx"), "--data", str(tiny_model / "data.npz"),
            "--epochs", "200", "--batch-size", "50", "--m", "1", "--out", str(out)]
    first = subprocess.Popen([sys.executable, "-m", "fwdgrad.cli", *args], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env=dict(os.environ, FWDGRAD_CACHE=str(tmp_path / "cache")))
    try:
        deadline = time.time() + 300
        while not (out / "checkpoint" / "state.json").exists() and time.time() < deadline and first.poll() is None:
            time.sleep(0.1)
        assert first.poll() is None, "the first writer ended before the test could race it"
        for second in (args, ["train", "--resume", str(out)]):
            capsys.readouterr()
            assert main(second) == 2
            err = capsys.readouterr().err
            assert f"is being written by another fwdgrad process (pid {first.pid})" in err, err
    finally:
        first.kill()
        first.wait()
    from fwdgrad.locks import run_writer

    with run_writer(out):  # a killed writer holds nothing
        pass


def test_a_kill_between_the_metrics_row_and_the_checkpoint_does_not_repeat_the_row(residual_net, tmp_path,
                                                                                    monkeypatch, private_cache):
    graph, data = digits_task(residual_net, "w16a8", 300, 1600)
    cfg = TrainConfig(model="small-cnn", selection="last-layer", epochs=3, batch_size=100, m=1)
    real_save = Trainer.save

    def dying_save(self, state, weights, momentum):  # the end of epoch 2: its row is written, then the kill
        if state["epochs_done"] == 2:
            raise KeyboardInterrupt("killed")
        real_save(self, state, weights, momentum)

    monkeypatch.setattr(Trainer, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        Trainer(graph, data, cfg, tmp_path / "run").run()
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in rows] == [1, 2]  # the row of epoch 2 outlived its checkpoint
    monkeypatch.setattr(Trainer, "save", real_save)
    Trainer(load_graph(tmp_path / "run"), data, cfg, tmp_path / "run").run(resume=True)
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in rows] == [1, 2, 3]
    whole = Trainer(graph, data, cfg, tmp_path / "whole").run()
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["weights_sha256"] == whole["weights_sha256"]
    assert np.isfinite(whole["final_top1"])
