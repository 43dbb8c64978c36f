"""Inference speed of our integer engine against its peers, measured in one run on this machine.

Same model (ImageNet MobileNetV2, real photo crops), same batch, same process:
- ours: the QGraph on the numba backend (w8a8, identical integers to the numpy reference), and w16a8 (the
  trainer's TraDy setting; no onnxruntime kernel takes 16-bit weights, so it is compared with int8);
- onnxruntime int8: the same float model quantized by onnxruntime's own quantize_static (QOperator,
  u8 activations / s8 per-channel weights: its fastest CPU int8 path, VNNI/AMX kernels);
- onnxruntime float32 and PyTorch float32 (2 threads) on the float model.
Writes the table to docs/benchmarks.md (between markers, so other benchmarks can share the file).
"""
from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

from fwdgrad.data.photos import real_photos
from fwdgrad.models.mobilenetv2 import load_imagenet_mobilenetv2
from fwdgrad.models.zoo import model_onnx
from quant.convert import convert
from quant.ops.int8_gemm import cpu_flags

from doc_sections import write_section

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench_engine:begin -->", "<!-- bench_engine:end -->"


def images_per_second(run, x: np.ndarray, batch: int, seconds: float) -> float:
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        run(x[:batch])
        done += batch
    return done / (time.perf_counter() - start)


def interleaved_speeds(runs: dict, x: np.ndarray, batch: int, seconds: float, rounds: int) -> dict[str, float]:
    """Median images/s of each runner over ``rounds`` short windows taken in turn (ours, peer, peer, ...,
    ours, ...): on a shared machine whose speed drifts, every runner sees the same drift, so the ratios hold
    where back-to-back long windows would compare a fast minute with a slow one."""
    for run in runs.values():
        run(x[:batch])  # warm up (numba compilation, onnxruntime arena)
    rates = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            rates[name].append(images_per_second(run, x, batch, seconds / rounds))
    return {name: float(np.median(r)) for name, r in rates.items()}


class _Reader(CalibrationDataReader):
    def __init__(self, data):
        self.items = iter([{"input": data[i:i + 1]} for i in range(len(data))])

    def get_next(self):
        return next(self.items, None)


def onnxruntime_int8(path: Path, calibration: np.ndarray, workdir: Path) -> ort.InferenceSession:
    out = workdir / "ort_int8.onnx"
    quantize_static(str(path), str(out), _Reader(calibration), quant_format=QuantFormat.QOperator, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])


def measure(resolution: int, batches: list[int], seconds: float, rounds: int) -> list[dict]:
    path = model_onnx("mobilenetv2", resolution=resolution)
    x = real_photos(max(batches), resolution, seed=0)
    calibration = real_photos(32, resolution, seed=1)
    graphs = {bits: convert(path, calibration, bits=bits) for bits in ("w8a8", "w16a8")}
    float_session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    torch.set_num_threads(2)
    net = load_imagenet_mobilenetv2()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        int8_session = onnxruntime_int8(path, calibration, Path(tmp))
        for batch in batches:
            with torch.inference_mode():
                speeds = interleaved_speeds({
                    "ours (numba, w8a8)": lambda b: graphs["w8a8"].forward(b),
                    "ours (numba, w16a8)": lambda b: graphs["w16a8"].forward(b),
                    "onnxruntime int8": lambda b: int8_session.run(None, {"input": b}),
                    "onnxruntime float32": lambda b: float_session.run(None, {"input": b}),
                    "pytorch float32": lambda b: net(torch.from_numpy(b)),
                }, x, batch, seconds, rounds)
            rows.append({"resolution": resolution, "batch": batch, **speeds})
            print(rows[-1])
    return rows


def int8_features() -> str:
    """The CPU's int8 dot-product instructions (onnxruntime's int8 kernels use them, and ours where present)."""
    flags = cpu_flags()
    if not flags:
        return "CPU features unknown"
    names = {"avx512_vnni": "AVX-512 VNNI", "avx_vnni": "AVX-VNNI", "amx_int8": "AMX-INT8"}
    named = [name for flag, name in names.items() if flag in flags]
    return ("with " + ", ".join(named)) if named else "without VNNI or AMX"


def render(rows: list[dict]) -> str:
    peers = ["onnxruntime int8", "onnxruntime float32", "pytorch float32"]
    lines = [BEGIN, "## Inference engine (`scripts/bench_engine.py`)", "",
             f"MobileNetV2 (ImageNet), images/s on this machine ({platform.processor() or platform.machine()} "
             f"{int8_features()}, {torch.get_num_threads()} threads), all measured in the same run, in turns "
             "(median of short windows taken one runner after the other, so all see the same machine). Ratio = peer time / our time "
             "(below 1: we are slower).", "",
             "| resolution | batch | ours (numba, w8a8) img/s | " + " | ".join(f"{p} img/s" for p in peers)
             + " | " + " | ".join(f"ours vs {p}" for p in peers) + " | ours w16a8 img/s | ours w16a8 vs onnxruntime int8 |",
             "|" + "---|" * (5 + 2 * len(peers))]
    for r in rows:
        ours, wide = r["ours (numba, w8a8)"], r["ours (numba, w16a8)"]
        lines.append(f"| {r['resolution']} | {r['batch']} | {ours:.1f} | "
                     + " | ".join(f"{r[p]:.1f}" for p in peers) + " | "
                     + " | ".join(f"{ours / r[p]:.2f}x" for p in peers)
                     + f" | {wide:.1f} | {wide / r['onnxruntime int8']:.2f}x |")
    lines += ["", END]
    return "\n".join(lines)


def write_doc(section: str) -> None:
    write_section(DOC, section, BEGIN, END,
                  new_page="# Benchmarks\n\nEvery figure is a ratio against a peer measured in the same run.\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--resolutions", type=int, nargs="+", default=[224, 128])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--seconds", type=float, default=5.0, help="timing per runner and configuration")
    parser.add_argument("--rounds", type=int, default=10, help="windows per runner, taken in turn; median reported")
    args = parser.parse_args()
    rows = [row for res in args.resolutions for row in measure(res, args.batches, args.seconds, args.rounds)]
    write_doc(render(rows))
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
