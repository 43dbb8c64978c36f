"""The most likely user mistakes, each met with one clear line: what was wrong and how to fix it.

Command-line mistakes must end in ``fwdgrad: error: ...`` on stderr with exit code 2 (no traceback);
Python-API mistakes raise ValueError / FileNotFoundError / FloatingPointError with the same message.
Everything runs on tiny untrained models and a hundred digits, so the whole file takes seconds.
"""
import io
import re
import warnings

import numpy as np
import onnx
import pytest

import fwdgrad.task
import fwdgrad.zo_step
from fwdgrad.cli import main
from fwdgrad.config import TrainConfig
from fwdgrad.data.split import TrainData
from fwdgrad.rundir import load_checkpoint
from fwdgrad.trainer import Trainer
from quant.convert import UnsupportedOpError, convert

# a short forward-gradient run of `fwdgrad train` (the backbone is patched to a tiny SmallCNN below)
TRAIN = ["train", "--model", "small-cnn", "--dataset", "digits", "--epochs", "1", "--train-samples", "100",
         "--test-samples", "50", "--batch-size", "50", "--m", "1", "--calibration-samples", "32",
         "--rgn-samples", "32", "--selection", "last-layer", "--head", "random"]


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def private_cache_and_tiny_backbone(cache_root, monkeypatch):
    """A private cache (digits build into it once per module) and an untrained SmallCNN of width 4 in place
    of the pretrained one, so `fwdgrad train` runs in a fraction of a second."""
    from fwdgrad.models.small_cnn import SmallCNN

    def tiny(model, width=1.0):
        import torch

        torch.manual_seed(0)
        return SmallCNN(1, 10, 4).eval()

    monkeypatch.setenv("FWDGRAD_CACHE", str(cache_root))
    monkeypatch.setattr(fwdgrad.task, "backbone", tiny)


def fails(capsys, argv) -> str:
    """Run the command line; it must refuse with exit code 2 and one `fwdgrad: error:` line. Returns it."""
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert "fwdgrad: error: " in err and "Traceback" not in err
    return err.split("fwdgrad: error: ", 1)[1].strip()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A float conv + linear model on 1x8x8 inputs as ONNX (proto and file), its w8a8 graph, and data."""
    import torch
    from torch import nn

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.head = nn.Linear(4 * 8 * 8, 3)

        def forward(self, x):
            return self.head(torch.flatten(torch.relu(self.conv(x)), 1))

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    x, y = rng.random((60, 1, 8, 8), dtype=np.float32), rng.integers(0, 3, 60)
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the legacy exporter's deprecation notices
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(Tiny().eval(), torch.as_tensor(x[:1]), buffer, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}}, dynamo=False, opset_version=13)
    proto = onnx.load_from_string(buffer.getvalue())
    proto.ir_version = min(proto.ir_version, 10)
    root = tmp_path_factory.mktemp("tiny")
    onnx.save(proto, root / "tiny.onnx")
    np.save(root / "calib.npy", x[:20])
    return {"proto": proto, "path": root / "tiny.onnx", "calib": root / "calib.npy", "x": x, "y": y,
            "graph": convert(proto, x[:20], bits="w8a8")}


# 1. a data set name that is not registered, or a registered one that is not installed ------------------
def test_unknown_data_set_lists_the_valid_names(capsys, tmp_path):
    message = fails(capsys, TRAIN + ["--dataset", "cifar10", "--out", tmp_path / "run"])
    assert "unknown data set 'cifar10'" in message
    assert all(name in message for name in ("fashion-mnist", "mnist", "digits", "lfw", "keywords"))
    assert "fwdgrad data list" in message


def test_data_set_not_installed_gives_the_install_command(capsys, tmp_path, monkeypatch):
    import fwdgrad.data.datasets as registry

    monkeypatch.setenv("FWDGRAD_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(registry, "FASHION_MNIST_DIR", tmp_path / "nowhere")
    message = fails(capsys, TRAIN + ["--dataset", "fashion-mnist", "--out", tmp_path / "run"])
    assert "data set 'fashion-mnist' is not installed" in message
    assert "sudo apt-get install -y dataset-fashion-mnist" in message


# 2. the model: an ONNX path that does not exist or is a directory; a file given where a zoo name goes ---
def test_missing_model_file_names_the_path(capsys, tiny, tmp_path):
    message = fails(capsys, ["quantize", tmp_path / "model.onnx", "--calibration", tiny["calib"]])
    assert f"no ONNX file at {tmp_path / 'model.onnx'}" in message and "torch.onnx.export" in message
    message = fails(capsys, ["quantize", tmp_path, "--calibration", tiny["calib"]])
    assert f"{tmp_path} is a directory, not an ONNX file" in message
    with pytest.raises(FileNotFoundError, match="no ONNX file at"):
        convert(tmp_path / "model.onnx", tiny["x"][:8])


def test_missing_model_file_for_train_names_the_path(capsys, tmp_path):
    message = fails(capsys, TRAIN + ["--model", tmp_path / "my_model.onnx", "--out", tmp_path / "run"])
    assert f"no ONNX file at {tmp_path / 'my_model.onnx'}" in message
    message = fails(capsys, TRAIN + ["--model", "resnet", "--out", tmp_path / "run"])
    assert "unknown model 'resnet'" in message and "mobilenetv2, small-cnn, audio-cnn" in message
    assert "your own .onnx file" in message


# 3. a budget that cannot hold even one channel ---------------------------------------------------------
def test_budget_below_one_channel_says_the_bytes_needed(capsys, tmp_path):
    message = fails(capsys, TRAIN + ["--selection", "s-full-random", "--budget", "2B", "--out", tmp_path / "run"])
    needed = re.search(r"budget 2 bytes is below one channel \((\d+) bytes\): raise --budget to at least (\d+)B",
                       message)
    assert needed and needed.group(1) == needed.group(2) and int(needed.group(1)) > 2


# 4. an ONNX operator the integer engine has no equivalent for -----------------------------------------
def test_unsupported_op_names_the_op_and_the_node(capsys, tiny, tmp_path):
    model = onnx.ModelProto()
    model.CopyFrom(tiny["proto"])
    relu = next(n for n in model.graph.node if n.op_type == "Relu")
    relu.op_type, relu.name = "Sigmoid", "gate_3"
    onnx.save(model, tmp_path / "sigmoid.onnx")
    message = fails(capsys, ["quantize", tmp_path / "sigmoid.onnx", "--calibration", tiny["calib"]])
    assert "unsupported ONNX op Sigmoid at node 'gate_3'" in message and "supported: Conv" in message
    with pytest.raises(UnsupportedOpError, match="Sigmoid at node 'gate_3'"):
        convert(model, tiny["x"][:8])


# 5. a bits string that is not one of the four configurations -------------------------------------------
@pytest.mark.parametrize("bits", ["w7a8", "int8", "W8A8"])
def test_bad_bits_string_lists_the_accepted_forms(capsys, tmp_path, bits):
    message = fails(capsys, TRAIN + ["--bits", bits, "--out", tmp_path / "run"])
    assert f"bad bits {bits!r}" in message and "w8a8, w16a8, w8a16, w16a16" in message
    message = fails(capsys, ["plan", "--model", "small-cnn", "--bits", bits])
    assert f"bad bits string {bits!r}" in message and "w8a8, w16a8, w8a16, w16a16" in message


# 6. --resume of a directory with no checkpoint, or with a run of other settings -------------------------
def test_resume_without_a_checkpoint_says_how_to_start(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    message = fails(capsys, ["train", "--resume", tmp_path / "empty"])
    assert f"nothing to resume in {tmp_path / 'empty'}" in message and "--out" in message


def test_resume_with_other_settings_names_them(capsys, tmp_path):
    run = tmp_path / "run"
    assert main(TRAIN + ["--out", str(run)]) == 0
    message = fails(capsys, ["train", "--resume", run, "--lr", "3", "--m", "2"])
    assert f"{run} holds a run of another configuration" in message
    assert "lr: the run has 0.5, now 3.0" in message and "m: the run has 1, now 2" in message
    assert "new --out" in message
    (tmp_path / "other.toml").write_text('[train]\nbudget = "4KB"\n')
    message = fails(capsys, ["train", "--resume", run, "--config", tmp_path / "other.toml"])
    assert "budget: the run has '8KB', now '4KB'" in message
    message = fails(capsys, TRAIN + ["--out", run])  # and --out of an existing run points to --resume
    assert f"already holds a run: continue it with --resume {run}" in message


# 7. the loss turns NaN/inf mid-run -------------------------------------------------------------------
def test_nan_loss_stops_with_advice_and_keeps_the_last_checkpoint(capsys, tmp_path, monkeypatch):
    real, calls = fwdgrad.zo_step.cross_entropy, []

    def diverging(logits, params, labels):  # the step loss of step 3 is NaN (TRAIN selects the last layer,
        calls.append(1)                     # which head_update auto trains exactly: one forward call a step)
        return real(np.full(logits.shape, np.nan) if len(calls) >= 3 else logits, params, labels)

    monkeypatch.setattr(fwdgrad.zo_step, "cross_entropy", diverging)
    run = tmp_path / "run"
    message = fails(capsys, TRAIN + ["--epochs", "2", "--checkpoint-every", "1", "--out", run])
    match = re.search(r"training diverged at step (\d) of 4: the loss is NaN/inf: lower --lr or --eps.*"
                      r"the last checkpoint \(step (\d)\) is kept in (\S+); train again into a new --out", message)
    assert match, message
    assert match.group(3) == str(run / "checkpoint")
    state, weights, _ = load_checkpoint(run)
    assert state["step"] == int(match.group(2)) == int(match.group(1)) - 1 == 2
    assert all(np.issubdtype(w.dtype, np.integer) for w in weights.values())


# 8. NaN/inf in the input data -------------------------------------------------------------------------
def test_nan_in_training_data_names_the_sample(tiny):
    x = tiny["x"].copy()
    x[[5, 9], 0, 2, 2] = [np.nan, np.inf]
    with pytest.raises(ValueError, match=r"x_train holds NaN or inf in 2 of 60 samples \(the first at index 5\): "
                                         r"repair or drop them"):
        TrainData(x, tiny["y"], tiny["x"], tiny["y"])


def test_nan_in_calibration_data_is_refused(capsys, tiny, tmp_path):
    x = tiny["x"][:20].copy()
    x[3, 0, 0, 0] = np.nan
    np.save(tmp_path / "calib.npy", x)
    message = fails(capsys, ["quantize", tiny["path"], "--calibration", tmp_path / "calib.npy"])
    assert "--calibration calib.npy holds NaN or inf in 1 of 20 samples (the first at index 3)" in message


# 9. a device name that has no profile -----------------------------------------------------------------
def test_unknown_device_lists_the_profiles(capsys, tmp_path):
    message = fails(capsys, TRAIN + ["--device", "m4", "--out", tmp_path / "run"])
    assert "unknown device 'm4'" in message and "cortex-m4" in message and "cortex-m7" in message
    assert "fwdgrad devices" in message and "path.toml" in message


# 10. data whose shape is not the model's input --------------------------------------------------------
def test_input_shape_mismatch_names_both_shapes(capsys, tiny, tmp_path):
    wrong = np.random.default_rng(1).random((20, 1, 10, 10), dtype=np.float32)
    np.save(tmp_path / "wrong.npy", wrong)
    message = fails(capsys, ["quantize", tiny["path"], "--calibration", tmp_path / "wrong.npy"])
    assert "--calibration wrong.npy has samples of shape (1, 10, 10), the model's input is (1, 8, 8)" in message
    message = fails(capsys, ["quantize", tiny["path"], "--calibration", tiny["calib"], "--evaluate",
                             tmp_path / "wrong.npy"])
    assert "--evaluate wrong.npy has samples of shape (1, 10, 10)" in message and "(1, 8, 8)" in message
    with pytest.raises(ValueError, match=r"input of shape \(20, 3, 8, 8\) does not fit .* \(N, 1, 8, 8\)"):
        tiny["graph"].forward(np.zeros((20, 3, 8, 8), np.float32))
    cfg = TrainConfig(bits="w8a8", selection="last-layer", epochs=1, batch_size=20, m=1)
    with pytest.raises(ValueError, match=r"x_train of shape \(20, 1, 10, 10\) does not fit .* \(N, 1, 8, 8\)"):
        Trainer(tiny["graph"], TrainData(wrong, tiny["y"][:20], wrong, tiny["y"][:20]), cfg, tmp_path / "run")


def test_labels_beyond_the_model_outputs_are_refused(tiny, tmp_path):
    cfg = TrainConfig(bits="w8a8", selection="last-layer", epochs=1, batch_size=20, m=1)
    data = TrainData(tiny["x"], tiny["y"] + 5, tiny["x"], tiny["y"])
    with pytest.raises(ValueError, match="labels go up to 7 but the model has 3 outputs"):
        Trainer(tiny["graph"], data, cfg, tmp_path / "run")


# 11. settings that do not exist: TOML keys, selection methods, TOML syntax -----------------------------
def test_unknown_toml_key_suggests_the_right_one(capsys, tmp_path):
    (tmp_path / "run.toml").write_text("[train]\nbatchsize = 32\nlearning_rate = 0.1\n")
    message = fails(capsys, ["train", "--config", tmp_path / "run.toml", "--out", tmp_path / "run"])
    assert "unknown config keys ['batchsize', 'learning_rate']" in message
    assert "did you mean 'batch_size' for 'batchsize'?" in message and "known: [" in message and "'lr'" in message


def test_unknown_selection_method_lists_the_methods(capsys, tmp_path):
    message = fails(capsys, TRAIN + ["--selection", "topk", "--out", tmp_path / "run"])
    assert "bad selection 'topk': use one of trady, s-full-random" in message and "last-layer" in message


def test_broken_toml_names_the_file(capsys, tmp_path):
    (tmp_path / "run.toml").write_text("[train]\nbudget = 8KB\n")
    message = fails(capsys, ["train", "--config", tmp_path / "run.toml", "--out", tmp_path / "run"])
    assert f"{tmp_path / 'run.toml'} is not valid TOML" in message and 'budget = "8KB"' in message
    message = fails(capsys, ["train", "--config", tmp_path / "missing.toml", "--out", tmp_path / "run"])
    assert "missing.toml" in message
