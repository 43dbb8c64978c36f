"""From a training run to an ONNX file: the run as the exporter needs it, and the file written atomically.

``export_run`` takes a run's last checkpoint (the quantized graph and the trained integers) and writes a
qop or qdq ONNX file with the run's summary in its metadata, and with the engine's graph described in it
(``quant.export.embedded``), so that ``fwdgrad.verify`` can check the file on its own.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import onnx

from quant.export import export
from quant.graph import QGraph

from .config import TrainConfig
from .rundir import atomic_write_bytes, load_checkpoint, load_graph, read_json

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
class TrainedRun:
    """What a training run directory holds, as the exporter needs it."""

    path: Path
    config: TrainConfig
    graph: QGraph
    weights: dict
    summary: dict
    sample_shape: tuple  # (C, H, W) of one model input

    @classmethod
    def load(cls, path: str | Path) -> "TrainedRun":
        """A run directory (``fwdgrad train --out``) or its ``checkpoint`` directory."""
        path = Path(path)
        if (path / "state.json").exists() and path.name == "checkpoint":
            path = path.parent
        if not (path / "checkpoint" / "state.json").exists():
            raise FileNotFoundError(f"{path} holds no training checkpoint (checkpoint/state.json): pass a directory "
                                    f"written by `fwdgrad train --out`, or its checkpoint/ directory")
        config = TrainConfig.from_dict(read_json(path / "config.json", "run configuration"))
        graph = load_graph(path)
        weights = load_checkpoint(path)[1]
        if config.method != "zo":  # backprop runs keep float weights: round them as the device would
            from .backprop import rounded_weights

            weights = rounded_weights(graph, weights)
        summary = read_json(path / "summary.json", "run summary") if (path / "summary.json").exists() else {}
        shape = tuple(graph.metadata.get("input_shape") or ())[1:]  # C, H, W (batch is free)
        return cls(path, config, graph, weights, summary, shape)

    def metadata(self) -> dict:
        summary = {k: v for k, v in self.summary.items() if k != "config"}
        return {"source_model": Path(self.config.model).name, "dataset": Path(self.config.dataset).name,
                "training_method": self.config.method, "training_summary": json.dumps(summary),
                "training_config": json.dumps(self.config.to_dict()), "input_format": json.dumps(input_format(self.config))}


def input_format(config: TrainConfig) -> dict:
    """How images become this model's inputs, for checking the file later on a registered data set or an
    image folder: a zoo model's own conversion, or the image scaling a file model was trained with."""
    from .usermodel import is_model_path

    zoo = not is_model_path(config.model)
    return {"zoo_model": config.model if zoo else None, "resolution": config.resolution,
            "image_scaling": config.image_scaling}


def export_run(run: str | Path, fmt: str, out: str | Path) -> Path:
    """Write the run's trained model as ONNX (``fmt``: qop | qdq)."""
    run = TrainedRun.load(run)
    return write_onnx(export(run.graph, run.sample_shape, fmt, run.weights, metadata=run.metadata()), out)


def write_onnx(model: onnx.ModelProto, out: str | Path) -> Path:
    """Write ``model`` atomically (a failed write, e.g. a full disk, leaves no truncated file behind)."""
    out = Path(out)
    if out.is_dir():
        raise IsADirectoryError(f"--out {out} is a directory: name the .onnx file to write, e.g. {out / 'model.onnx'}")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, model.SerializeToString())
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
