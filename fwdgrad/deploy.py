"""From a training run to an ONNX file, and the check that onnxruntime computes what the engine did.

``export_run`` takes a run's last checkpoint (the quantized graph and the trained integers) and writes a
qop or qdq ONNX file with the run's summary in its metadata. ``verify_onnx`` runs a file in onnxruntime
and the engine on the same images and reports top-1 of each, their agreement and the largest integer
difference of the logits: the number that says whether a deployed model is the one that was trained.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from quant.export import export
from quant.ops.int8_gemm import has_int8_dot_products
from quant.graph import QGraph
from quant.tensor import quantize

from .config import TrainConfig
from .rundir import load_checkpoint, load_graph

# onnxruntime session settings verify-onnx offers. basic: the file's ONNX semantics (float ops between the
# quantizers); all: onnxruntime's default, with its CPU-specific fusions; int8: all, and QDQ groups with
# int8 activations fused into onnxruntime's int8 x int8 kernels ("session.qdqisint8allowed", which x86
# builds leave off: there they only fuse uint8 activations). On a CPU with int8 dot-product instructions
# (VNNI, AMX) those kernels compute the engine's integer arithmetic, so a w8a8 qdq file gives the engine's
# integers (docs/export.md).
OPTIMIZATION_LEVELS = ("basic", "all", "int8")


def session_options(optimization: str = "basic"):
    """onnxruntime SessionOptions for one of OPTIMIZATION_LEVELS."""
    import onnxruntime as ort

    if optimization not in OPTIMIZATION_LEVELS:
        raise ValueError(f"unknown optimization level {optimization!r}: use one of {', '.join(OPTIMIZATION_LEVELS)}")
    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_BASIC if optimization == "basic"
                                        else ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    if optimization == "int8":
        options.add_session_config_entry("session.qdqisint8allowed", "1")
    return options


@dataclass
class Run:
    """What a training run directory holds, as the exporter needs it."""

    path: Path
    config: TrainConfig
    graph: QGraph
    weights: dict
    summary: dict
    sample_shape: tuple  # (C, H, W) of one model input

    @classmethod
    def load(cls, path: str | Path) -> "Run":
        """A run directory (``fwdgrad train --out``) or its ``checkpoint`` directory."""
        path = Path(path)
        if (path / "state.json").exists() and path.name == "checkpoint":
            path = path.parent
        if not (path / "checkpoint" / "state.json").exists():
            raise FileNotFoundError(f"{path} holds no training checkpoint (checkpoint/state.json): pass a directory "
                                    f"written by `fwdgrad train --out`, or its checkpoint/ directory")
        config = TrainConfig.from_dict(json.loads((path / "config.json").read_text()))
        graph = load_graph(path)
        weights = load_checkpoint(path)[1]
        if config.method != "zo":  # backprop runs keep float weights: round them as the device would
            from .backprop import rounded_weights

            weights = rounded_weights(graph, weights)
        summary_path = path / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
        # the float model the graph was quantized from fixes the input's C, H, W (batch is free)
        if not (path / "model.onnx").exists():
            raise FileNotFoundError(f"{path} has no model.onnx (the float model `fwdgrad train` writes), which "
                                    f"gives the input shape: export from Python with quant.export.export instead")
        dims = onnx.load(path / "model.onnx").graph.input[0].type.tensor_type.shape.dim[1:]
        return cls(path, config, graph, weights, summary, tuple(d.dim_value for d in dims))

    def metadata(self) -> dict:
        summary = {k: v for k, v in self.summary.items() if k != "config"}
        return {"source_model": self.config.model, "dataset": self.config.dataset,
                "training_method": self.config.method, "training_summary": json.dumps(summary),
                "training_config": json.dumps(self.config.to_dict())}


def export_run(run: str | Path, fmt: str, out: str | Path) -> Path:
    """Write the run's trained model as ONNX (``fmt``: qop | qdq)."""
    run = Run.load(run)
    return write_onnx(export(run.graph, run.sample_shape, fmt, run.weights, metadata=run.metadata()), out)


def write_onnx(model: onnx.ModelProto, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, out)
    return out


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


def compare(session, graph: QGraph, weights: dict, x: np.ndarray, labels: np.ndarray,
            batch_size: int = 128) -> dict:
    """onnxruntime (an exported model's session) against the engine on the same inputs.

    The integer difference is measured on the output grid: ``logits_int`` when the file has it (qop),
    else onnxruntime's float logits quantized with the output's params (qdq)."""
    names = {o.name for o in session.get_outputs()}
    theirs, ours = [], []
    for i in range(0, len(x), batch_size):
        batch = x[i:i + batch_size]
        if "logits_int" in names:
            theirs.append(session.run(["logits_int"], {"input": batch})[0])
        else:
            theirs.append(quantize(session.run(["logits"], {"input": batch})[0], graph.output_params))
        ours.append(graph.forward(batch, weights=weights))
    theirs, ours = np.concatenate(theirs).astype(np.int64), np.concatenate(ours).astype(np.int64)
    return {"samples": int(len(x)), "onnxruntime_top1": float(np.mean(theirs.argmax(1) == labels)),
            "engine_top1": float(np.mean(ours.argmax(1) == labels)),
            "top1_agreement": float(np.mean(theirs.argmax(1) == ours.argmax(1))),
            "max_integer_difference": int(np.abs(theirs - ours).max()),
            "differing_logits": float(np.mean(theirs != ours))}


def verify_onnx(model_path: str | Path, run: str | Path, data: str | None = None, samples: int = 1000,
                optimization: str = "basic") -> dict:
    """Run an exported file and the run's engine on the test split of ``data`` (default: the run's data
    set), in the model's input format."""
    from .data.datasets import load_dataset
    from .task import model_inputs

    model, session = open_session(model_path, optimization)
    run = Run.load(run)
    test = load_dataset(data or run.config.dataset, "test")
    x = model_inputs(run.config.model, test.images[:samples], run.sample_shape[-1])
    meta = {p.key: p.value for p in model.metadata_props}
    report = {"model": str(model_path), "run": str(run.path), "data": data or run.config.dataset,
              "format": meta.get("format"), "bits": meta.get("bits"), "scales": meta.get("scales", "float"),
              "optimization": optimization}
    if optimization == "int8" and report["format"] == "qdq" and report["scales"] == "pow2":
        report["warning"] = ("onnxruntime's int8 add (QLinearAdd) rounds exact ties, which power-of-two scales "
                             "make frequent, its own way: run this file with --optimization basic or all, where "
                             "its float arithmetic is exact")
    elif (optimization != "int8" and report["format"] == "qdq" and report["bits"] == "w8a8"
          and report["scales"] == "float" and has_int8_dot_products()):
        report["hint"] = ("this CPU has int8 dot-product instructions: with --optimization int8 onnxruntime runs "
                          "this file on its int8 kernels, which compute the engine's integers (docs/export.md)")
    elif report["format"] == "qdq" and str(report["bits"]).startswith("w16"):
        report["hint"] = ("onnxruntime has no integer kernel for 16-bit weights, at any level: it runs this file's "
                          "layers in float32, whose sums of 16-bit products can round, so its integers may differ "
                          "from the engine's (docs/export.md); --format qop runs the engine's integers")
    return report | compare(session, run.graph, run.weights, x, test.labels[:samples])
