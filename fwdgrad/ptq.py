"""Post-training quantization report: how far each bit width moves a model from its float self.

Runs the float ONNX model in onnxruntime and the quantized graph in our engine on the same real inputs,
and reports top-1 agreement and logit SNR per bit width (the numbers behind docs/results.md and the demo).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, fields

import numpy as np
import onnxruntime as ort
from tqdm import tqdm

from quant.convert import convert, input_shape, load_model
from quant.graph import QGraph, check_input_shape
from quant.metrics import snr_db, top1_agreement


@dataclass
class PTQResult:
    bits: str
    top1_agreement: float
    logit_snr_db: float
    images: int
    convert_seconds: float
    engine_images_per_second: float
    graph: QGraph | None = field(default=None, repr=False, compare=False)  # the quantized model itself

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "graph"}


def float_logits(model_path, x: np.ndarray, batch_size: int = 32) -> np.ndarray:
    proto = load_model(model_path)  # a missing or broken file is named, before onnxruntime fails on it
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i:i + batch_size]})[0] for i in range(0, len(x), batch_size)])


def engine_logits(graph: QGraph, x: np.ndarray, backend: str = "numba", batch_size: int = 16,
                  label: str = "") -> tuple[np.ndarray, float]:
    """Dequantized logits of the integer graph, and images per second (with a tqdm bar)."""
    out, start = [], time.perf_counter()
    for i in tqdm(range(0, len(x), batch_size), desc=f"engine {label}".strip(), unit="batch", leave=False):
        out.append(graph.forward_float(x[i:i + batch_size], backend=backend))
    return np.concatenate(out), len(x) / (time.perf_counter() - start)


def ptq_report(model_path, calibration: np.ndarray, evaluation: np.ndarray, bits_list=("w8a8", "w16a8"),
               backend: str = "numba", **convert_options) -> list[PTQResult]:
    proto = load_model(model_path)
    for what, x in (("calibration data", calibration), ("evaluation data", evaluation)):
        check_input_shape(np.shape(x), input_shape(proto), proto.graph.input[0].name, what)
    reference = float_logits(proto, evaluation)
    results = []
    for bits in bits_list:
        start = time.perf_counter()
        graph = convert(model_path, calibration, bits=bits, **convert_options)
        seconds = time.perf_counter() - start
        engine_logits(graph, evaluation[:16], backend)  # compile/warm up before timing
        logits, speed = engine_logits(graph, evaluation, backend, label=bits)
        results.append(PTQResult(bits, top1_agreement(reference, logits), snr_db(reference, logits),
                                 len(evaluation), seconds, speed, graph))
    return results


def format_table(results: list[PTQResult]) -> str:
    lines = ["| bits | top-1 agreement with float | logit SNR (dB) | images | convert (s) | engine images/s |",
             "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.bits} | {r.top1_agreement:.1%} | {r.logit_snr_db:.1f} | {r.images} | "
                     f"{r.convert_seconds:.1f} | {r.engine_images_per_second:.1f} |")
    return "\n".join(lines)
