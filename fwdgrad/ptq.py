"""Post-training quantization report: how far each bit width moves a model from its float self.

Runs the float ONNX model in onnxruntime and the quantized graph in our engine on the same real inputs,
and reports top-1 agreement and logit SNR per bit width (the numbers behind docs/results.md and the demo).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
from tqdm import tqdm

from quant.convert import convert, input_shape, load_model
from quant.float_runner import float_outputs
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
    top1: float | None = None  # on the evaluation labels, when given
    graph: QGraph | None = field(default=None, repr=False, compare=False)  # the quantized model itself

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "graph"}


def float_logits(model_path, x: np.ndarray, batch_size: int = 32) -> np.ndarray:
    proto = load_model(model_path)  # a missing or broken file is named, before onnxruntime fails on it
    output = proto.graph.output[0].name
    return float_outputs(proto, [output], x, batch_size)[output]


def engine_logits(graph: QGraph, x: np.ndarray, backend: str = "numba", batch_size: int = 16,
                  label: str = "") -> tuple[np.ndarray, float]:
    """Dequantized logits of the integer graph, and images per second (with a tqdm bar)."""
    out, start = [], time.perf_counter()
    for i in tqdm(range(0, len(x), batch_size), desc=f"engine {label}".strip(), unit="batch", leave=False,
                  disable=None):
        out.append(graph.forward_float(x[i:i + batch_size], backend=backend))
    return np.concatenate(out), len(x) / (time.perf_counter() - start)


def ptq_report(model_path, calibration: np.ndarray, evaluation: np.ndarray, bits_list=("w8a8", "w16a8"),
               backend: str = "numba", labels: np.ndarray | None = None,
               **convert_options) -> tuple[list[PTQResult], float | None]:
    """(one result per bit width, the float model's top-1 on ``labels`` or None)."""
    proto = load_model(model_path)
    for what, x in (("calibration data", calibration), ("evaluation data", evaluation)):
        check_input_shape(np.shape(x), input_shape(proto), proto.graph.input[0].name, what)
    reference = float_logits(proto, evaluation)
    accuracy = (lambda logits: float(np.mean(logits.argmax(1) == labels))) if labels is not None else (lambda _: None)
    results = []
    for bits in bits_list:
        start = time.perf_counter()
        graph = convert(proto, calibration, bits=bits, **convert_options)
        seconds = time.perf_counter() - start
        engine_logits(graph, evaluation[:16], backend)  # compile/warm up before timing
        logits, speed = engine_logits(graph, evaluation, backend, label=bits)
        results.append(PTQResult(bits, top1_agreement(reference, logits), snr_db(reference, logits),
                                 len(evaluation), seconds, speed, accuracy(logits), graph))
    return results, accuracy(reference)


def format_table(results: list[PTQResult], float_top1: float | None = None) -> str:
    labelled = float_top1 is not None
    head = "| bits | " + ("top-1 on labels | " if labelled else "") + \
        "top-1 agreement with float | logit SNR (dB) | images | convert (s) | engine images/s |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    if labelled:
        lines.append(f"| float | {float_top1:.1%} | | | {results[0].images if results else 0} | | |")
    for r in results:
        top1 = f"{r.top1:.1%} | " if labelled else ""
        lines.append(f"| {r.bits} | {top1}{r.top1_agreement:.1%} | {r.logit_snr_db:.1f} | {r.images} | "
                     f"{r.convert_seconds:.1f} | {r.engine_images_per_second:.1f} |")
    return "\n".join(lines)


def quantize_file(model, *, data=None, calibration=None, evaluate=None, bits=("w8a8",), out=None, fmt: str = "qop",
                  rounding: str = "half_even", scales: str = "float", equalize: str = "depthwise", head: str = "auto",
                  image_scaling: str = "unit", calibration_samples: int = 256, method: str | None = None,
                  backend: str = "numba") -> dict:
    """`fwdgrad quantize`: a float model file quantized at each of ``bits`` on a user's ``data`` (an .npz or
    image folder: calibration as `fwdgrad train` takes it, evaluation on the labelled test split) or on
    ``calibration`` / ``evaluate`` arrays of inputs; with ``out`` (one bit width) the integer model is
    written. Returns the results, the float top-1, the table, what was written and the notes to show."""
    from .data.files import load_data_file
    from .deploy import write_onnx
    from .filetask import settled_float_model
    from .usermodel import open_model

    if out and len(bits) != 1:
        raise ValueError(f"--out writes one model: give one --bits, not {' '.join(bits)}")
    found = open_model(model)
    if found.integer:
        raise ValueError(f"{model} is already quantized by fwdgrad ({found.bits}): check it with `fwdgrad "
                         f"verify-onnx {model} --data D`, or train it with `fwdgrad train --model {model}`")
    notes, labels, how = [], None, "keep"
    if data is not None:
        if evaluate is not None or calibration is not None:
            raise ValueError("--data gives both the calibration and the test split: drop --calibration/--evaluate")
        split = load_data_file(data, found.sample_shape, image_scaling)
        notes += split.notes
        proto, how = settled_float_model(found, split, head)
        x_calibration, x_eval, labels = split.calibration[:calibration_samples], split.x_test, split.y_test
        source = "x_calibration" if split.x_calibration is not None else "x_train"
        notes.append(f"calibrated on {len(x_calibration)} samples of {source}, evaluated on the {len(x_eval)} test "
                     f"samples (head: {how})")
    else:
        if calibration is None:
            raise ValueError("give calibration data: --data D.npz (or an image folder), or --calibration X.npy")
        proto = found.proto
        x_calibration = _inputs(calibration, "--calibration", found.sample_shape, notes)[:calibration_samples]
        x_eval = x_calibration if evaluate is None else _inputs(evaluate, "--evaluate", found.sample_shape, notes)
    options = {"calibration": method} if method else {}
    results, float_top1 = ptq_report(proto, x_calibration, x_eval, bits, backend=backend, labels=labels,
                                     rounding=rounding, scales=scales, equalize_channels=equalize, **options)
    written = None
    if out:
        from quant.export import export

        meta = {"source_model": Path(model).name, "calibration_samples": len(x_calibration), "head": how,
                "input_format": json.dumps({"zoo_model": None, "resolution": 0, "image_scaling": image_scaling})}
        graph = results[0].graph
        written = str(write_onnx(export(graph, tuple(graph.metadata["input_shape"][1:]), fmt, metadata=meta), out))
    return {"results": results, "float_top1": float_top1, "table": format_table(results, float_top1),
            "written": written, "notes": notes, "head": how}


def _inputs(value, flag: str, sample_shape: tuple, notes: list) -> np.ndarray:
    """Model inputs given as an array or a .npy path (never unpickled), converted and checked like an .npz's."""
    from .data.files import input_array

    name = flag
    if isinstance(value, (str, Path)):
        name = f"{flag} {Path(value).name}"
        try:
            value = np.load(value, allow_pickle=False)
        except FileNotFoundError:
            raise FileNotFoundError(f"{flag} {value}: no such file") from None
        except (ValueError, OSError) as err:
            raise ValueError(f"{name} is not a numeric .npy array ({err}): save it with np.save") from None
    return input_array(np.asarray(value), name, sample_shape, notes)
