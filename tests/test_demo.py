"""`fwdgrad demo` end to end, shortened: every number in its table comes from the run it just made."""
import json

from fwdgrad.cli import main
from fwdgrad.demo import DEVICE


def test_demo_trains_exports_and_verifies(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--epochs", "1", "--bp-epochs", "1", "--samples", "300",
                 "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "demo.json").read_text())
    zo, bp = summary["rows"]
    assert summary["device"] == DEVICE == "cortex-m4"
    # both runs start from the same model (evaluated w16a8 by ZO, in float32 by BP) on the same task
    assert abs(zo["zero_shot_top1"] - bp["zero_shot_top1"]) < 0.05 and 0.1 < zo["zero_shot_top1"] < 0.9
    assert zo["forward_calls"] == 2 * 4 * -(-300 // 8) and bp["forward_calls"] == -(-300 // 16)  # steps: ceil
    # forward gradients fit the MCU with less memory than backprop needs; the exported file is the model
    assert zo["inference_bytes"] <= zo["zo_bytes"] < bp["bp_bytes"]
    assert zo["zo_bytes"] < 256 * 1024
    assert summary["onnx"]["max_integer_difference"] == 0 and summary["onnx"]["top1_agreement"] == 1.0
    assert abs(summary["onnx"]["onnxruntime_top1"] - zo["final_top1"]) < 1e-9
    for name in ("report.md", "accuracy_vs_epoch.png", "memory.png", "results.json", "zo-w16a8-trady.onnx"):
        assert (out / name).is_file(), name
    assert f"{zo['final_top1']:.1%}" in printed and "max integer difference 0" in printed

    # a second call reuses the finished runs instead of training again
    assert main(["demo", "--out", str(out), "--epochs", "1", "--bp-epochs", "1", "--samples", "300",
                 "--workers", "1"]) == 0
    assert json.loads((out / "demo.json").read_text())["rows"] == summary["rows"]
