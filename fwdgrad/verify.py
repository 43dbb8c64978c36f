"""The check that an ONNX file is the model that was trained: its graph, its integers, and what onnxruntime
computes from it, against the engine.

A file fwdgrad wrote describes the engine's graph in its metadata (``quant.export.embedded``), so the
check needs nothing but the file and test data:

1. integrity: the initializers' digest is the one written at export, and exporting the graph the file
   describes gives back the file's own nodes, inputs, outputs and initializers (an appended node, an
   edited scale or zeroed weights are all found);
2. arithmetic: onnxruntime and the engine run the same test inputs; every output the file declares is
   compared on the output's integer grid (top-1 on the labels of each, agreement, largest difference).

``--run`` compares against a training run's last checkpoint instead of the graph in the file (and says
when the file holds other integers than that checkpoint). A mismatch (an integrity problem, or any integer
difference where the format computes the engine's integers exactly) makes ``fwdgrad verify-onnx`` exit 1.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx

from quant.export import export
from quant.export.embedded import DIGEST_KEY, graph_from_onnx, initializers_digest, is_fwdgrad_file, metadata
from quant.graph import QGraph
from quant.ops.int8_gemm import has_int8_dot_products
from quant.serialize import GraphFormatError
from quant.tensor import dequantize, quantize

from .config import TrainConfig
from .deploy import TrainedRun, input_format, session_options
from .rundir import weights_digest


def open_session(path: str | Path, optimization: str = "basic"):
    """An onnxruntime session for a file, or a ValueError that names the file and what is wrong with it."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no ONNX file at {path}")
    options = session_options(optimization)
    try:
        model = onnx.load(path)
        onnx.checker.check_model(model)
    except Exception as err:  # truncated, not ONNX, or an operator ONNX does not define
        raise ValueError(f"{path} is not a valid ONNX model ({type(err).__name__}: {err}); re-export it with "
                         f"`fwdgrad export`") from None
    try:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as err:
        raise ValueError(f"onnxruntime cannot run {path}: {err}") from None
    return model, session


def _node_signature(node: onnx.NodeProto) -> tuple:
    return (node.op_type, tuple(node.input), tuple(node.output),
            tuple(sorted(a.SerializeToString() for a in node.attribute)))


def _io_signature(values) -> list:
    return [v.SerializeToString() for v in values]


def _first_difference(theirs, ours) -> str:
    for i, (a, b) in enumerate(zip(theirs, ours)):
        if _node_signature(a) == _node_signature(b):
            continue
        label = f"node {i} ({a.op_type} {a.name!r})"
        if a.op_type != b.op_type:
            return f"{label} is where fwdgrad writes {b.op_type} {b.name!r}"
        if list(a.input) != list(b.input):
            return f"{label} reads {list(a.input)}, expected {list(b.input)}"
        if list(a.output) != list(b.output):
            return f"{label} writes {list(a.output)}, expected {list(b.output)}"
        return f"{label} has other attributes than fwdgrad writes"
    extra = theirs[len(ours):] if len(theirs) > len(ours) else ours[len(theirs):]
    return (f"{'added' if len(theirs) > len(ours) else 'missing'} nodes from {len(min(theirs, ours, key=len))} on: "
            f"{', '.join(f'{n.op_type} {n.name!r}' for n in extra[:3])}")


def integrity_problems(model: onnx.ModelProto) -> tuple[list[str], QGraph | None]:
    """(what differs from the file fwdgrad wrote, the engine's graph the file describes)."""
    meta = metadata(model)
    problems = []
    if meta.get(DIGEST_KEY) != initializers_digest(model):
        problems.append("its initializers (weights, biases, scales) are not the ones fwdgrad wrote: the digest "
                        "recorded at export does not match")
    try:
        graph = graph_from_onnx(model)
    except GraphFormatError as err:
        return problems + [f"its graph description cannot be read ({err})"], None
    shape = tuple(graph.metadata.get("input_shape") or ())[1:]
    expected = export(graph, shape, meta.get("format", "qop"))
    ours, theirs = [_node_signature(n) for n in expected.graph.node], [_node_signature(n) for n in model.graph.node]
    if ours != theirs:
        problems.append(f"its graph is not the one fwdgrad writes for this model ({len(theirs)} nodes, expected "
                        f"{len(ours)}): {_first_difference(model.graph.node, expected.graph.node)}")
    for what in ("input", "output"):
        if _io_signature(getattr(model.graph, what)) != _io_signature(getattr(expected.graph, what)):
            names = [v.name for v in getattr(model.graph, what)]
            problems.append(f"its graph {what}s {names} are not the ones fwdgrad writes "
                            f"{[v.name for v in getattr(expected.graph, what)]}")
    if initializers_digest(expected) != initializers_digest(model):
        problems.append("its initializers are not the ones its own graph description gives (an edited scale, "
                        "zero point or constant)")
    return problems, graph


def exact_format(meta: dict, optimization: str) -> bool:
    """Whether onnxruntime computes the engine's integers exactly for this file (docs/export.md)."""
    if meta.get("format") == "qop":
        return True
    if meta.get("format") == "qdq" and meta.get("bits") == "w8a8":
        scales = meta.get("scales", "float")
        return ((scales == "pow2" and optimization in ("basic", "all"))
                or (scales == "float" and optimization == "int8" and has_int8_dot_products()))
    return False


def compare_outputs(session, graph: QGraph, weights: dict, x: np.ndarray, labels: np.ndarray,
                    batch_size: int = 128) -> dict:
    """onnxruntime against the engine on the same inputs, over every output the file declares. Integer
    outputs are compared as they are, float ones on the output's grid (quantized with its params); top-1
    is read from the float ``logits`` a deployed runtime would use (``logits_int`` if there is none)."""
    names = [o.name for o in session.get_outputs()]
    input_name = session.get_inputs()[0].name
    theirs = {name: [] for name in names}
    ours = []
    for i in range(0, len(x), batch_size):
        batch = x[i:i + batch_size]
        for name, value in zip(names, session.run(names, {input_name: batch})):
            theirs[name].append(value)
        ours.append(graph.forward(batch, weights=weights))
    ours = np.concatenate(ours).astype(np.int64)
    differences, problems = {}, []
    for name in names:
        value = np.concatenate(theirs[name])
        if value.shape != ours.shape:
            problems.append(f"output {name!r} has shape {value.shape}, the engine's logits {ours.shape}")
            continue
        grid = value.astype(np.int64) if np.issubdtype(value.dtype, np.integer) else \
            quantize(value, graph.output_params).astype(np.int64)
        differences[name] = grid
        if np.issubdtype(value.dtype, np.floating):  # the float logits must be exactly the dequantized grid
            off = np.abs(value - dequantize(grid, graph.output_params))
            if not np.all(np.isfinite(value)) or off.max(initial=0) > 1e-6 * max(1.0, np.abs(value).max(initial=0)):
                problems.append(f"output {name!r} holds values off the logits' integer grid (by up to "
                                f"{float(np.nanmax(off)):.3g}): something after the logits changes them")
    primary = "logits" if "logits" in differences else next(iter(differences), None)
    if primary is None:
        raise ValueError(f"none of the file's outputs {names} has the engine's logits shape {ours.shape}")
    top = differences[primary].argmax(1)
    worst = max(int(np.abs(d - ours).max(initial=0)) for d in differences.values())
    return {"samples": int(len(x)), "outputs": names, "onnxruntime_top1": float(np.mean(top == labels)),
            "engine_top1": float(np.mean(ours.argmax(1) == labels)),
            "top1_agreement": float(np.mean(top == ours.argmax(1))), "max_integer_difference": worst,
            "differing_logits": float(np.mean(differences[primary] != ours)), "output_problems": problems}


def test_inputs(model_path: Path, model: onnx.ModelProto, data: str | None, samples: int, run: TrainedRun | None):
    """(x, labels, name) of the test split of ``data`` in the model's input format: a user's file as it is,
    or a registered set / image folder converted the way the model's run converted it."""
    from .task import prepare_data

    if data is None and run is None:
        raise ValueError("say which test data to check on: --data D (your .npz or image folder, or a registered "
                         "set), or --run RUN to use that run's")
    form = input_format(run.config) if run is not None else json.loads(metadata(model).get("input_format", "{}"))
    zoo = form.get("zoo_model")
    source = zoo or (str(model_path) if is_fwdgrad_file(model) else run.config.model)
    name = str(data or run.config.dataset)
    cfg = TrainConfig.from_dict({"model": source, "resolution": form.get("resolution", 0) if zoo else 0,
                                 "image_scaling": form.get("image_scaling", "unit"), "dataset": name,
                                 "train_samples": 1, "test_samples": samples})
    prepared = prepare_data(cfg)
    return prepared.x_test, prepared.y_test, name


def verify_onnx(model_path: str | Path, run: str | Path | None = None, data: str | None = None,
                samples: int = 1000, optimization: str = "basic") -> dict:
    """The report of :mod:`fwdgrad.verify` for one file (``report["mismatch"]`` lists what failed)."""
    model_path = Path(model_path)
    model, session = open_session(model_path, optimization)
    meta = metadata(model)
    run = TrainedRun.load(run) if run is not None else None
    if is_fwdgrad_file(model):
        problems, described = integrity_problems(model)
    elif run is None:
        raise ValueError(f"{model_path} holds no fwdgrad graph description (not written by `fwdgrad export` or "
                         f"`fwdgrad quantize --out`, or by an older version): pass --run RUN to check it against "
                         f"that training run's engine")
    else:
        problems, described = [], None
    if run is not None:
        graph, weights = run.graph, run.weights
        if described is not None and weights_digest(_all_weights(described)) != weights_digest(_all_weights(run.graph, weights)):
            problems.append(f"it holds other integers than the last checkpoint of {run.path}")
    elif described is not None:
        graph, weights = described, {}
    else:
        raise ValueError(f"{model_path}: {problems[-1]}")
    x, labels, name = test_inputs(model_path, model, data, samples, run)
    report = {"model": str(model_path), "run": str(run.path) if run else None, "data": name,
              "format": meta.get("format"), "bits": meta.get("bits"), "scales": meta.get("scales", "float"),
              "optimization": optimization, "exact_format": exact_format(meta, optimization),
              "integrity": ("failed" if problems else "ok") if is_fwdgrad_file(model)
              else "not checked (no fwdgrad metadata)"}
    report |= compare_outputs(session, graph, weights, x, labels)
    mismatch = problems + report.pop("output_problems")
    if report["exact_format"] and report["max_integer_difference"]:
        mismatch.append(f"onnxruntime's logits differ from the engine's by up to {report['max_integer_difference']} "
                        f"integer steps, though this format computes the engine's integers exactly")
    report["mismatch"] = mismatch
    return report | notes(report, optimization)


def _all_weights(graph: QGraph, weights: dict | None = None) -> dict:
    weights = weights or {}
    return {k: np.asarray(weights.get(k, v)) for n in graph.weighted_nodes()
            for k, v in ((n.weight_key, n.weight), (n.bias_key, n.bias))}


def notes(report: dict, optimization: str) -> dict:
    """What the user should know about running this file elsewhere (its format at this level)."""
    if optimization == "int8" and report["format"] == "qdq" and report["scales"] == "pow2":
        return {"warning": "onnxruntime's int8 add (QLinearAdd) rounds exact ties, which power-of-two scales "
                           "make frequent, its own way: run this file with --optimization basic or all, where "
                           "its float arithmetic is exact"}
    if (optimization != "int8" and report["format"] == "qdq" and report["bits"] == "w8a8"
            and report["scales"] == "float" and has_int8_dot_products()):
        return {"hint": "this CPU has int8 dot-product instructions: with --optimization int8 onnxruntime runs "
                        "this file on its int8 kernels, which compute the engine's integers (docs/export.md)"}
    if report["format"] == "qdq" and str(report["bits"]).startswith("w16"):
        return {"hint": "onnxruntime has no integer kernel for 16-bit weights, at any level: it runs this file's "
                        "layers in float32, whose sums of 16-bit products can round, so its integers may differ "
                        "from the engine's (docs/export.md); --format qop runs the engine's integers"}
    return {}
