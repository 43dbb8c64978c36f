"""`fwdgrad demo` end to end, shortened: every number in its table comes from the run it just made."""
import json

from fwdgrad.cli import main
from fwdgrad.demo import DEVICE, PURE_ZO_LONGER


def test_demo_trains_exports_and_verifies(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--epochs", "1", "--samples", "300", "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "demo.json").read_text())
    pure, pure_longer, hybrid, bp, bp_fq = summary["rows"]
    assert summary["device"] == DEVICE == "cortex-m4"
    assert (pure["head_update"], pure_longer["head_update"], hybrid["head_update"]) == ("zo", "zo", "exact-last")
    # every run starts from the same integers, on the same task and schedule
    assert pure["zero_shot_top1"] == pure_longer["zero_shot_top1"] == hybrid["zero_shot_top1"] == bp["zero_shot_top1"] == bp_fq["zero_shot_top1"]
    assert (bp["method"], bp_fq["method"]) == ("bp", "bp-fq")
    assert 0.1 < pure["zero_shot_top1"] < 0.9
    steps = -(-300 // 8)
    assert pure_longer["forward_calls"] == PURE_ZO_LONGER * pure["forward_calls"]
    assert pure["forward_calls"] == hybrid["forward_calls"] == 2 * 4 * steps and bp["forward_calls"] == bp_fq["forward_calls"] == steps
    # forward-only training fits the MCU with less memory than backprop needs; the exported file is the model
    assert pure["inference_bytes"] <= pure["zo_bytes"] <= hybrid["zo_bytes"] < bp["bp_bytes"]
    assert hybrid["zo_bytes"] < 256 * 1024
    assert all(r["device_seconds"] > 0 and r["device_joules"] > 0 for r in summary["rows"])
    assert summary["onnx"]["max_integer_difference"] == 0 and summary["onnx"]["top1_agreement"] == 1.0
    assert abs(summary["onnx"]["onnxruntime_top1"] - hybrid["integer_top1"]) < 1e-9
    for name in ("report.md", "accuracy_vs_epoch.png", "memory.png", "results.json", "hybrid-w16a8-trady.onnx"):
        assert (out / name).is_file(), name
    assert f"{hybrid['integer_top1']:.1%}" in printed and "max integer difference 0" in printed
    assert "on-device time" in printed and " J |" in printed

    # a second call reuses the finished runs instead of training again
    assert main(["demo", "--out", str(out), "--epochs", "1", "--samples", "300", "--workers", "1"]) == 0
    assert json.loads((out / "demo.json").read_text())["rows"] == summary["rows"]
