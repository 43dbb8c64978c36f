"""A user's own model and data through every command, from the command line as a user runs it.

The model is what a PyTorch user exports: a small CNN on 1x16x16 grey images with a depthwise conv, a
residual Add, ReLU6, MaxPool, ReduceMean pooling and a Gemm head, exported with a fixed batch of 1; the
data an .npz of float64 arrays (numpy's default) and a folder of PNGs. Every command runs in its own
process: quantize -> train (forward gradients and backprop) -> export -> verify-onnx -> plan -> resume ->
compare, and each bad input on that path must exit 2 with one `fwdgrad: error:` line.
"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import user_files

TRAIN = ["--epochs", "1", "--batch-size", "50", "--bits", "w16a8", "--m", "2", "--rgn-samples", "64"]


def fwdgrad(root, *args, check=0):
    """Run `fwdgrad ARGS` in ``root`` (its own data/model cache); assert the exit code, return the result."""
    env = dict(os.environ, FWDGRAD_CACHE=str(root / "cache"))
    result = subprocess.run([sys.executable, "-m", "fwdgrad.cli", *map(str, args)], cwd=root, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == check, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    if check == 2:
        assert "fwdgrad: error: " in result.stderr and "Traceback" not in result.stderr, result.stderr
    return result


def summary_of(result) -> dict:
    return json.loads(result.stdout[result.stdout.index("{"):])


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    return user_files(tmp_path_factory.mktemp("user"))


def test_the_journey_from_a_float_file_to_a_verified_trained_file(user):
    quantized = fwdgrad(user, "quantize", "user.onnx", "--data", "data.npz", "--bits", "w16a8", "--out", "q.onnx")
    assert "| float |" in quantized.stdout and "| w16a8 |" in quantized.stdout and "top-1 on labels" in quantized.stdout
    assert "x_train: float64 cast to float32" in quantized.stderr
    check = fwdgrad(user, "verify-onnx", "q.onnx", "--data", "data.npz", "--json", "q.json")
    assert "max integer difference of the logits 0" in check.stdout
    assert json.loads((user / "q.json").read_text())["mismatch"] == []

    zo = summary_of(fwdgrad(user, "train", "--model", "user.onnx", "--data", "data.npz", "--out", "zo", *TRAIN))
    assert zo["integer_top1"] == zo["final_top1"] and zo["sources"]["model"] and zo["sources"]["data"]
    assert 0 < zo["budget_used_bytes"] <= zo["budget_bytes"]
    # the integer file quantize wrote is the model training starts from: same zero-shot, same trained integers
    again = summary_of(fwdgrad(user, "train", "--model", "q.onnx", "--data", "data.npz", "--out", "zo-int", *TRAIN))
    assert (again["zero_shot_top1"], again["weights_sha256"]) == (zo["zero_shot_top1"], zo["weights_sha256"])

    bp = summary_of(fwdgrad(user, "train", "--model", "user.onnx", "--data", "data.npz", "--out", "bp", "--method",
                            "bp", *TRAIN))
    assert 0 <= bp["integer_top1"] <= 1 and bp["integer_zero_shot_top1"] == zo["zero_shot_top1"]

    fwdgrad(user, "export", "zo", "--format", "qop", "--out", "zo.onnx")
    for source in (["--data", "data.npz"], ["--run", "zo"]):
        check = fwdgrad(user, "verify-onnx", "zo.onnx", *source)
        assert "max integer difference of the logits 0" in check.stdout and "integrity: ok" in check.stdout
    assert f"{zo['final_top1']:.4f}" in check.stdout

    planned = fwdgrad(user, "plan", "--model", "user.onnx", "--data", "data.npz", "--device", "cortex-m4")
    assert "input (1, 16, 16)" in planned.stdout and "cortex-m4" in planned.stdout
    assert "input (1, 16, 16)" in fwdgrad(user, "plan", "--model", "q.onnx").stdout

    resumed = summary_of(fwdgrad(user, "train", "--resume", "zo"))  # a finished run: its result, no more steps
    assert resumed["weights_sha256"] == zo["weights_sha256"]


def test_a_killed_run_on_user_files_resumes_to_the_same_integers(user):
    args = ["train", "--model", "user.onnx", "--data", "data.npz", *TRAIN, "--epochs", "2", "--checkpoint-every", "1"]
    whole = summary_of(fwdgrad(user, *args, "--out", "whole"))
    env = dict(os.environ, FWDGRAD_CACHE=str(user / "cache"))
    process = subprocess.Popen([sys.executable, "-m", "fwdgrad.cli", *args, "--out", "killed"], cwd=user, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = user / "killed" / "checkpoint" / "state.json"
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if state.exists() and json.loads(state.read_text() or "{}").get("step", 0) >= 3:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    resumed = summary_of(fwdgrad(user, "train", "--resume", "killed"))
    assert resumed["weights_sha256"] == whole["weights_sha256"]
    rows = (user / "killed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in rows] == [1, 2]


def test_a_grid_on_user_files_reports_integers_and_reuses_finished_runs(user):
    (user / "grid.toml").write_text(f"""
[base]
model = "{user / 'user.onnx'}"
dataset = "{user / 'data.npz'}"
epochs = 1
batch_size = 50
m = 2
rgn_samples = 64
[[row]]
name = "ZO"
[[row]]
name = "BP"
method = "bp"
""")
    first = fwdgrad(user, "compare", "--config", "grid.toml", "--out", "grid", "--workers", "1")
    assert "| ZO |" in first.stdout and "| BP |" in first.stdout
    fwdgrad(user, "compare", "--config", "grid.toml", "--out", "grid", "--workers", "1")
    assert all(r["attempts"] == 0 for r in json.loads((user / "grid" / "results.json").read_text()))


def test_an_image_folder_goes_the_same_way(user):
    quantized = fwdgrad(user, "quantize", "user.onnx", "--data", "images", "--bits", "w8a8")
    assert "read as grey, resized to 16x16 (bilinear), scaled to [0, 1]" in quantized.stderr
    assert "| w8a8 |" in quantized.stdout
    fwdgrad(user, "train", "--model", "user.onnx", "--data", "images", "--out", "folder-run", *TRAIN)
    fwdgrad(user, "export", "folder-run", "--out", "folder.onnx")
    check = fwdgrad(user, "verify-onnx", "folder.onnx", "--data", "images")
    assert "on 100 images test samples" in check.stdout and "max integer difference of the logits 0" in check.stdout


def _bad_files(root):
    """Files a user might pass by mistake, made once."""
    import onnx

    data = dict(np.load(root / "data.npz"))
    bad = {"missing-key.npz": {k: v for k, v in data.items() if k != "y_test"},
           "nan.npz": data | {"x_train": np.where(np.arange(300)[:, None, None, None] == 7, np.nan, data["x_train"])},
           "labels.npz": data | {"y_test": data["y_test"] + 10},
           "shape.npz": data | {"x_train": data["x_train"][:, :, :8, :8]},
           "float-labels.npz": data | {"y_train": data["y_train"] + 0.5},
           "channels-last.npz": data | {"x_train": data["x_train"].transpose(0, 2, 3, 1)}}
    for name, arrays in bad.items():
        np.savez(root / name, **arrays)
    proto = onnx.load(root / "user.onnx")
    proto.graph.input.append(onnx.helper.make_tensor_value_info("extra", onnx.TensorProto.FLOAT, [1, 4]))
    onnx.save(proto, root / "two-inputs.onnx")
    (root / "empty-class" / "a").mkdir(parents=True, exist_ok=True)
    (root / "empty-class" / "b").mkdir(exist_ok=True)
    (root / "empty-class" / "a" / "1.png").write_bytes(next((root / "images").rglob("*.png")).read_bytes())
    (root / "broken-image" / "a").mkdir(parents=True, exist_ok=True)
    (root / "broken-image" / "a" / "1.png").write_bytes(b"not a png")
    (root / "broken-image" / "a" / "2.png").write_bytes(next((root / "images").rglob("*.png")).read_bytes())


BAD = [
    (["train", "--model", "user.onnx", "--data", "missing-key.npz"], "lacks y_test"),
    (["train", "--model", "user.onnx", "--data", "nan.npz"], "x_train holds NaN or inf in 1 of 300 samples (the first at index 7)"),
    (["train", "--model", "user.onnx", "--data", "labels.npz"], "the labels need 20 classes but user.onnx has 10 outputs: --head probe"),
    (["train", "--model", "user.onnx", "--data", "shape.npz"], "x_train has samples of shape (1, 8, 8), the model's input is (1, 16, 16)"),
    (["train", "--model", "user.onnx", "--data", "float-labels.npz"], "y_train[0] is"),
    (["train", "--model", "user.onnx", "--data", "channels-last.npz"], "transpose(0, 3, 1, 2)"),
    (["train", "--model", "user.onnx", "--data", "nowhere.npz"], "no data at nowhere.npz"),
    (["train", "--model", "two-inputs.onnx", "--data", "data.npz"], "one input and one logits output"),
    (["train", "--model", "user.onnx", "--data", "data.npz", "--resolution", "32"], "does not apply to a model file"),
    (["train", "--model", "q.onnx", "--data", "data.npz", "--bits", "w8a8"], "holds integers with bits 'w16a8'"),
    (["train", "--model", "user.onnx", "--data", "empty-class"], "holds no images"),
    (["train", "--model", "user.onnx", "--data", "broken-image"], "cannot read image"),
    (["quantize", "q.onnx", "--data", "data.npz"], "already quantized by fwdgrad"),
    (["quantize", "user.onnx"], "give calibration data: --data D.npz"),
    (["verify-onnx", "user.onnx", "--data", "data.npz"], "holds no fwdgrad graph description"),
    (["verify-onnx", "q.onnx"], "say which test data to check on"),
    (["verify-onnx", "q.onnx", "--data", "digits"], "has images of shape (1, 28, 28)"),
    (["plan", "--model", "two-inputs.onnx"], "one input and one logits output"),
]


@pytest.mark.parametrize("argv, message", BAD, ids=[f"{a[0]}-{a[-1]}" for a, _ in BAD])
def test_bad_inputs_on_the_path_exit_2_with_a_clear_error(user, argv, message):
    if not (user / "two-inputs.onnx").exists():
        _bad_files(user)
    if not (user / "q.onnx").exists():
        fwdgrad(user, "quantize", "user.onnx", "--data", "data.npz", "--bits", "w16a8", "--out", "q.onnx")
    argv = argv + (["--out", f"bad-{len(argv)}"] if argv[0] == "train" else [])
    result = fwdgrad(user, *argv, check=2)
    assert message in result.stderr, result.stderr
