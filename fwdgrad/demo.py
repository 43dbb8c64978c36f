"""`fwdgrad demo`: the main job end to end on an embedded default, every number computed in this run.

The story a user of an MCU wants told in one command: a float model pretrained elsewhere (the small CNN,
Fashion-MNIST) is quantized w16a8 and shipped to a 256 KB MCU (the ``cortex-m4`` profile: no FPU, so the
loss is the integer one), where it meets new data (MNIST digits) with a weak head (a probe fitted on 100
labelled images). It fine-tunes with forward gradients on TraDy channels under a budget the device holds;
backprop on the same selection and data order says what was given up; the trained integers are exported to
ONNX and onnxruntime must agree with the engine. The two runs are a `fwdgrad compare` grid, so the report,
its plots and the reuse of finished runs come from there.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from .compare import RunSpec, planned_memory, run_grid, write_report
from .deploy import export_run
from .verify import verify_onnx

DEVICE = "cortex-m4"
TASK = dict(model="small-cnn", dataset="mnist", bits="w16a8", selection="trady", budget="8KB", device=DEVICE,
            probe_samples=100, batch_size=8, seed=0)
ZO = dict(method="zo", loss="integer", m=4, space="real", eps=0.01, lr=3.0, lr_scale="dimension",
          schedule="cosine")
BP = dict(method="bp", device="host", bp_lr=0.02, batch_size=16, schedule="cosine")  # a reference run on the host: backprop does not fit the MCU


def demo_runs(epochs: int, bp_epochs: int, samples: int) -> list[RunSpec]:
    task = TASK | {"train_samples": samples, "test_samples": samples}
    return [RunSpec("ZO w16a8 TraDy", task | ZO | {"epochs": epochs}),
            RunSpec("BP fp32 TraDy", task | BP | {"epochs": bp_epochs})]


def run_demo(out: str | Path = "demo-out", epochs: int = 8, bp_epochs: int = 4, samples: int = 2000,
             workers: int = 2) -> dict:
    """Train both runs (reusing finished ones), export and verify the ZO model; returns the table's rows.
    ``samples``: MNIST images to fine-tune on, and as many other ones to test on."""
    out = Path(out)
    started = time.perf_counter()
    results = run_grid(demo_runs(epochs, bp_epochs, samples), out, workers)
    failed = [r for r in results if "error" in r]
    if failed:
        raise RuntimeError("demo run failed: " + "; ".join(f"{r['row']}: {r['error']}" for r in failed))
    write_report(results, out)
    zo_dir = results[0]["dir"]
    onnx_path = export_run(zo_dir, "qop", out / "zo-w16a8-trady.onnx")
    check = verify_onnx(onnx_path, zo_dir, samples=samples)
    summary = {"rows": [_row(r) for r in results], "onnx": check, "onnx_file": str(onnx_path),
               "device": DEVICE, "seconds": time.perf_counter() - started}
    (out / "demo.json").write_text(json.dumps(summary, indent=2))
    return summary


def _row(result: dict) -> dict:
    s = result["summary"]
    return {"row": result["row"], "zero_shot_top1": s["zero_shot_top1"], "final_top1": s["final_top1"],
            "forward_calls": s["forward_calls"], "train_seconds": s["train_seconds"],
            "trainable_bytes": s["trainable_bytes"], **{f"{k}_bytes": v for k, v in planned_memory(result["dir"]).items()}}


def format_demo(summary: dict) -> str:
    zo, bp = summary["rows"]
    kb = 1024
    lines = [f"Small CNN (Fashion-MNIST) -> MNIST digits, w16a8, TraDy channels, device {summary['device']} "
             f"(256 KB SRAM, planned peaks at batch 1)", "",
             "| | test top-1 | device memory | forward calls | train s |", "|---|---|---|---|---|",
             f"| zero-shot (probe head) | {zo['zero_shot_top1']:.1%} | {zo['inference_bytes'] / kb:.1f} KB inference "
             f"| | |",
             f"| ZO forward gradients | {zo['final_top1']:.1%} | {zo['zo_bytes'] / kb:.1f} KB | {zo['forward_calls']} "
             f"| {zo['train_seconds']:.0f} |",
             f"| BP reference (fp32) | {bp['final_top1']:.1%} | {bp['bp_bytes'] / kb:.1f} KB | "
             f"{bp['forward_calls']} | {bp['train_seconds']:.0f} |"]
    check = summary["onnx"]
    lines += ["", f"ONNX export ({summary['onnx_file']}) in onnxruntime: top-1 {check['onnxruntime_top1']:.1%} "
              f"(engine {check['engine_top1']:.1%}), agreement {check['top1_agreement']:.1%}, max integer "
              f"difference {check['max_integer_difference']}", f"total {summary['seconds']:.0f} s"]
    return "\n".join(lines)
