"""Which 8-bit activation tensors limit w8a8 MobileNetV2: each tensor's rounding taken away in turn.

The w8a8 model's qdq export (docs/export.md) is the model with a QuantizeLinear -> DequantizeLinear pair
on every activation tensor. Replacing one pair by a float Clip to the same real range keeps that tensor's
range (and any clamp its quantizer applies) but not its rounding: what a much finer grid for that one
tensor would give. Run in onnxruntime (basic level, float between the quantizers, so within float rounding
of the engine's integers) on the photo crops of scripts/measure_ptq.py, against the float model: the
logit SNR gained per tensor, then with the most sensitive tensors rounded away together; then where the
rest of the gap is, one setting changed at a time (ideal calibration ranges, bias correction off with and
without activation rounding, 16-bit activations or weights). Writes its section of docs/engine.md.
"""
from __future__ import annotations

import copy
import re

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from doc_sections import markdown_table
from fwdgrad.deploy import session_options
from measure_ptq import PHOTO_SETS, measure_main, photo_task, scores
from quant.convert import convert
from quant.export import export

TOP = 8
TOGETHER = (1, 2, 4, 8, 16)
SHARES = [  # (what the row changes from convert's w8a8 defaults, calibrated on, every activation unrounded?, convert options)
    ("calibrated on the evaluation crops themselves", "evaluation", False, {}),
    ("no bias correction", "calibration", False, {"bias_correction": False}),
    ("no bias correction, every activation unrounded", "calibration", True, {"bias_correction": False}),
    ("16-bit activations (w8a16): 8-bit weights, bias correction", "calibration", False, {"bits": "w8a16"}),
    ("16-bit weights (w16a8)", "calibration", False, {"bits": "w16a8"}),
]


def activation_pairs(model: onnx.ModelProto) -> dict[str, tuple[onnx.NodeProto, onnx.NodeProto]]:
    """The tensor each activation Q -> DQ pair quantizes (weights and biases have a DQ only) -> (Q, DQ)."""
    producers = {out: node for node in model.graph.node for out in node.output}
    outputs = {o.name for o in model.graph.output}
    pairs = {}
    for dq in model.graph.node:
        q = producers.get(dq.input[0]) if dq.op_type == "DequantizeLinear" else None
        if q is not None and q.op_type == "QuantizeLinear" and dq.output[0] not in outputs:
            pairs[q.input[0]] = (q, dq)
    return pairs


def unrounded(model: onnx.ModelProto, tensors: list[str]) -> onnx.ModelProto:
    """``model`` with the Q -> DQ pairs of ``tensors`` replaced by a float Clip to the grid's real range."""
    model = copy.deepcopy(model)
    constants = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    constants |= {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node
                  if n.op_type == "Constant"}
    pairs = activation_pairs(model)
    for tensor in tensors:
        q, dq = pairs[tensor]
        scale, zero = float(constants[q.input[1]]), constants[q.input[2]]
        info = np.iinfo(zero.dtype)
        bounds = [f"{tensor}_unrounded_{side}" for side in ("lo", "hi")]
        for name, v in zip(bounds, (info.min, info.max)):
            model.graph.initializer.append(numpy_helper.from_array(
                np.array((v - int(zero)) * scale, np.float32), name))
        clip = helper.make_node("Clip", [tensor, *bounds], [dq.output[0]], name=f"{tensor}_unrounded")
        replaced = {q.output[0], dq.output[0]}  # by name: the graph's node messages are copies
        nodes = [n for n in model.graph.node if n.output[0] not in replaced] + [clip]
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    return _sorted(model)


def _sorted(model: onnx.ModelProto) -> onnx.ModelProto:
    """Nodes in an order where each runs after the producers of its inputs (ONNX requires it)."""
    ready = {i.name for i in model.graph.input} | {i.name for i in model.graph.initializer} | {""}
    pending, ordered = list(model.graph.node), []
    while pending:
        runnable = [n for n in pending if all(i in ready for i in n.input)]
        for n in runnable:
            ready.update(n.output)
        ordered += runnable
        pending = [n for n in pending if all(n is not r for r in runnable)]
    del model.graph.node[:]
    model.graph.node.extend(ordered)
    return model


def engine_name(tensor: str) -> str:
    """The engine node that produces an exported tensor (the exporter names it ``<node>_<Op>/<n>``)."""
    return re.sub(r"_[A-Za-z]+/\d+$", "", tensor)


def logits(model: onnx.ModelProto, x: np.ndarray, batch_size: int = 50) -> np.ndarray:
    """The file's logits at onnxruntime's basic level: its own ONNX semantics, none of the CPU fusions."""
    session = ort.InferenceSession(model.SerializeToString(), session_options("basic"),
                                   providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(["logits"], {"input": x[i:i + batch_size]})[0]
                           for i in range(0, len(x), batch_size)])


def measure(resolution: int, images: int, calibration_images: int, photos: str) -> list[dict]:
    path, calibration, evaluation, reference = photo_task(resolution, images, calibration_images, photos)
    model = export(convert(path, calibration, bits="w8a8"), evaluation.shape[1:], "qdq")
    base = logits(model, evaluation)
    row = lambda kind, tensors, out: {"resolution": resolution, "kind": kind, "tensors": tensors, "images": images,
                                      **scores(reference, out)}
    rows = [row("all 8-bit", [], base)]
    single = [row("one", [t], logits(unrounded(model, [t]), evaluation)) for t in activation_pairs(model)]
    single.sort(key=lambda r: -r["snr_db"])
    rows += single[:TOP]
    order = [r["tensors"][0] for r in single]
    rows += [row("together", order[:k], logits(unrounded(model, order[:k]), evaluation)) for k in TOGETHER]
    rows.append(row("together", order, logits(unrounded(model, order), evaluation)))
    data = {"calibration": calibration, "evaluation": evaluation}
    for setting, calibrated_on, unround, options in SHARES:  # where the rest of the gap is
        other = export(convert(path, data[calibrated_on], **{"bits": "w8a8"} | options), evaluation.shape[1:], "qdq")
        tensors = list(activation_pairs(other)) if unround else []
        rows.append(row("share", tensors, logits(unrounded(other, tensors), evaluation)) | {"setting": setting})
    for r in rows:
        print({k: v for k, v in r.items() if k != "tensors"} | {"tensors": len(r["tensors"])}, flush=True)
    return rows


def _unrounded_label(r: dict, everything: int) -> str:
    """Which tensors a row measured without rounding (``everything``: how many there are)."""
    k = len(r["tensors"])
    return {"all 8-bit": "none", "one": f"`{engine_name(r['tensors'][0])}`" if k else "",
            "together": f"all {k}" if k == everything else f"the {k} most sensitive"}[r["kind"]]


def render(rows: list[dict], calibration_images: int, photos: str) -> str:
    everything = max(len(r["tensors"]) for r in rows if r["kind"] == "together")
    lines = ["### Which activation tensors limit w8a8 (`scripts/measure_sensitivity.py`)", "",
             f"ImageNet MobileNetV2 w8a8 (convert's defaults, {calibration_images} calibration crops), its qdq "
             "file in onnxruntime with some tensors' rounding taken away (their Q -> DQ pair replaced by a float "
             f"Clip to the same range), against the float model on {rows[0]['images']} crops of {PHOTO_SETS[photos]} "
             "(seed 0). One: the "
             f"{TOP} tensors whose rounding costs the most, alone; together: the most sensitive k at once.", "",
             *markdown_table(["resolution", "tensors without rounding", "top-1 agreement", "logit SNR dB"],
                             [[r["resolution"], _unrounded_label(r, everything), f"{r['agreement']:.1%}",
                               f"{r['snr_db']:.1f}"] for r in rows if r["kind"] != "share"]),
             "", "Where the rest is: the same w8a8 model with one thing changed (nothing unrounded unless said):", "",
             *markdown_table(["resolution", "changed", "top-1 agreement", "logit SNR dB"],
                             [[r["resolution"], r["setting"], f"{r['agreement']:.1%}", f"{r['snr_db']:.1f}"]
                              for r in rows if r["kind"] == "share"])]
    return "\n".join(lines)


if __name__ == "__main__":
    measure_main(__doc__, measure, render, "measure_sensitivity", [128])
