"""From a training run to an ONNX file, and the check that onnxruntime computes what the engine did.

``export_run`` takes the run's last checkpoint (graph + trained integers) and writes qop or qdq ONNX
with the run's summary in the metadata. ``verify_onnx`` runs the file in onnxruntime and the engine on
the same test images and reports top-1 of each, their agreement and the largest integer difference of
the logits (qop exposes the integers as ``logits_int``; qdq is compared on float logits).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx

from quant.export import export

from .config import TrainConfig
from .trainer import load_checkpoint, load_graph


def _run_parts(run_dir: Path):
    cfg = TrainConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
    graph = load_graph(run_dir)
    _, weights, _ = load_checkpoint(run_dir)
    if cfg.method != "zo":  # backprop runs keep float weights: round them as the device would
        from .backprop import rounded_weights

        weights = rounded_weights(graph, weights)
    return cfg, graph, weights


def evaluation_inputs(cfg: TrainConfig, samples: int) -> tuple[np.ndarray, np.ndarray]:
    from .data.datasets import load_dataset
    from .task import model_inputs

    test = load_dataset(cfg.dataset, "test")
    resolution = cfg.resolution or (96 if cfg.model == "mobilenetv2" else 28)
    return model_inputs(cfg.model, test.images[:samples], resolution), test.labels[:samples]


def export_run(run_dir: str | Path, fmt: str, out: str | Path) -> Path:
    """Write the run's trained model as ONNX (``fmt``: qop | qdq)."""
    run_dir = Path(run_dir)
    if not (run_dir / "checkpoint" / "state.json").exists():
        raise FileNotFoundError(f"{run_dir} holds no training checkpoint (checkpoint/state.json): pass a "
                                f"directory written by `fwdgrad train --out`")
    cfg, graph, weights = _run_parts(run_dir)
    x, _ = evaluation_inputs(cfg, 1)
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    metadata = {"source_model": cfg.model, "dataset": cfg.dataset, "training_method": cfg.method,
                "training_summary": json.dumps({k: v for k, v in summary.items() if k != "config"})}
    model = export(graph, x.shape[1:], fmt, weights, metadata=metadata)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, out)
    return out


def verify_onnx(model_path: str | Path, run_dir: str | Path, samples: int = 1000) -> dict:
    """onnxruntime vs the engine on the run's test images."""
    import onnxruntime as ort

    path = Path(model_path)
    try:
        model = onnx.load(path)
        onnx.checker.check_model(model)
    except Exception as err:  # truncated, not ONNX, or invalid: say which file and why
        raise ValueError(f"{path} is not a valid ONNX model ({type(err).__name__}: {err}); re-export it with "
                         f"`fwdgrad export`") from None
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    try:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as err:
        raise ValueError(f"onnxruntime cannot run {path}: {err}") from None
    cfg, graph, weights = _run_parts(Path(run_dir))
    x, labels = evaluation_inputs(cfg, samples)
    outputs = [o.name for o in session.get_outputs()]
    results = session.run(outputs, {session.get_inputs()[0].name: x})
    theirs = dict(zip(outputs, results))
    ours_int = graph.forward(x, weights=weights)
    ours = (ours_int.astype(np.float32) - graph.output_params.zero_point) * graph.output_params.scale
    meta = {p.key: p.value for p in model.metadata_props}
    report = {"model": str(path), "format": meta.get("format"), "samples": int(len(x)), "onnxruntime_top1": float(np.mean(theirs["logits"].argmax(1) == labels)),
              "engine_top1": float(np.mean(ours.argmax(1) == labels)),
              "top1_agreement": float(np.mean(theirs["logits"].argmax(1) == ours.argmax(1)))}
    if "logits_int" in theirs:
        report["max_integer_difference"] = int(np.abs(theirs["logits_int"].astype(np.int64) - ours_int).max())
    else:
        report["max_logit_difference"] = float(np.abs(theirs["logits"] - ours).max())
    return report
