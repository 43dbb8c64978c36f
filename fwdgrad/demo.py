"""`fwdgrad demo`: the main job end to end on an embedded default, every number computed in this run.

The story a user of an MCU wants told in one command: a float model pretrained elsewhere (the small CNN,
Fashion-MNIST) is quantized w16a8 and shipped to a 256 KB MCU (the ``cortex-m4`` profile: no FPU, so the
loss is the integer one), where it meets new data (MNIST digits) with a weak head (a probe fitted on 100
labelled images). It fine-tunes with forward calls only, on TraDy channels under a budget the device holds:
pure forward gradients (the paper's method; once on the shared schedule and once given 8x its epochs, which
that estimator needs to gain more than a few points), and the hybrid (the exact head and last-layer updates
the forward calls already give, ZO on the other channels); backprop on the same selection, data order and
schedule, plain float32 and quantization-aware (fake-quant), says what was given up. Each row says its
planned device memory and what the run would cost on the MCU (``devices.planner``); the hybrid's integers
are exported to ONNX and onnxruntime must agree with the engine. The runs are a `fwdgrad compare` grid, so
the report, plots and reuse of finished runs come from there.
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
            probe_samples=100, batch_size=8, seed=0, loss="integer", m=4, space="real", eps=0.01,
            lr_scale="dimension", schedule="cosine")
PURE_ZO = dict(method="zo", head_update="zo", lr=3.0)  # the paper's method: every selected channel perturbed
HYBRID = dict(method="zo", head_update="auto", lr=0.3)  # exact head (and last layer), ZO on the other channels
BP = dict(method="bp", device="host", bp_lr=0.02)  # on the host: float32 backprop needs the FPU this MCU lacks
BP_FQ = BP | {"method": "bp-fq"}  # backprop through the integer grids: the strongest like-for-like reference
PURE_ZO_LONGER = 8  # the paper's method needs many more steps than backprop: one row shows it given 8x the epochs
HYBRID_ROW = "forward-only hybrid"
ROWS = (("ZO forward gradients (pure)", PURE_ZO, 1),
        (f"ZO forward gradients (pure), {PURE_ZO_LONGER}x the epochs", PURE_ZO, PURE_ZO_LONGER),
        (HYBRID_ROW, HYBRID, 1), ("BP reference (fp32)", BP, 1), ("BP reference (fake-quant)", BP_FQ, 1))


def demo_runs(epochs: int, samples: int) -> list[RunSpec]:
    """The runs, on one task and one schedule (the same batch, steps, data order), but for the row that gives
    pure ZO ``PURE_ZO_LONGER`` times the epochs (the same data order, repeated)."""
    task = TASK | {"train_samples": samples, "test_samples": samples}
    return [RunSpec(name, task | settings | {"epochs": epochs * times}) for name, settings, times in ROWS]


def run_demo(out: str | Path = "demo-out", epochs: int = 8, samples: int = 2000, workers: int = 2) -> dict:
    """Train the runs (reusing finished ones), export and verify the hybrid's model; returns the table's rows.
    ``samples``: MNIST images to fine-tune on, and as many other ones to test on."""
    out = Path(out)
    started = time.perf_counter()
    results = run_grid(demo_runs(epochs, samples), out, workers)
    failed = [r for r in results if "error" in r]
    if failed:
        raise RuntimeError("demo run failed: " + "; ".join(f"{r['row']}: {r['error']}" for r in failed))
    write_report(results, out)
    hybrid_dir = next(r["dir"] for r in results if r["row"] == HYBRID_ROW)
    onnx_path = export_run(hybrid_dir, "qop", out / "hybrid-w16a8-trady.onnx")
    check = verify_onnx(onnx_path, hybrid_dir, samples=samples)
    summary = {"rows": [_row(r) for r in results], "onnx": check, "onnx_file": str(onnx_path),
               "device": DEVICE, "seconds": time.perf_counter() - started}
    (out / "demo.json").write_text(json.dumps(summary, indent=2))
    return summary


def _row(result: dict) -> dict:
    s = result["summary"]
    cost = planned_memory(result["dir"], DEVICE)  # every row on the demo's device, backprop's too
    return {"row": result["row"], "method": s["config"]["method"], "head_update": s.get("head_update"),
            "zero_shot_top1": s.get("integer_zero_shot_top1", s["zero_shot_top1"]), "final_top1": s["final_top1"],
            "integer_top1": s.get("integer_top1", s["final_top1"]), "forward_calls": s["forward_calls"],
            "train_seconds": s["train_seconds"], "trainable_bytes": s["trainable_bytes"],
            **{f"{k}_bytes": cost[k] for k in ("zo", "bp", "inference")},
            "device_seconds": cost["train_seconds"], "device_joules": cost["train_joules"]}


def format_demo(summary: dict) -> str:
    kb = 1024
    zo = summary["rows"][0]
    lines = [f"Small CNN (Fashion-MNIST) -> MNIST digits, w16a8, TraDy channels, device {summary['device']} "
             f"(256 KB SRAM; memory planned at batch 1, time and energy of the whole run estimated at its batch)",
             "", "| | test top-1 (integers) | device memory | forward calls | on-device time | on-device energy | "
             "host s |", "|---|---|---|---|---|---|---|",
             f"| zero-shot (probe head) | {zo['zero_shot_top1']:.1%} | {zo['inference_bytes'] / kb:.1f} KB inference "
             f"| | | | |"]
    for r in summary["rows"]:
        memory = r["bp_bytes"] if r["method"] != "zo" else r["zo_bytes"]
        fits = "" if memory <= 256 * kb else " (does not fit)"
        float_note = f" (float {r['final_top1']:.1%})" if r["method"] != "zo" else ""
        lines.append(f"| {r['row']} | {r['integer_top1']:.1%}{float_note} | {memory / kb:.1f} KB{fits} | "
                     f"{r['forward_calls']} | {r['device_seconds']:.0f} s | {r['device_joules']:.2f} J | "
                     f"{r['train_seconds']:.0f} |")
    check = summary["onnx"]
    lines += ["", f"ONNX export of the hybrid ({summary['onnx_file']}) in onnxruntime: top-1 "
              f"{check['onnxruntime_top1']:.1%} (engine {check['engine_top1']:.1%}), agreement "
              f"{check['top1_agreement']:.1%}, max integer difference {check['max_integer_difference']}",
              f"total {summary['seconds']:.0f} s"]
    return "\n".join(lines)
