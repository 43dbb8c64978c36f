"""The task of a user's own model file: settle its head on their data, then quantize it (or take the
integers of a file fwdgrad wrote as they are).

``fwdgrad quantize --data`` and ``fwdgrad train`` both come through :func:`file_graph`, with the same
calibration samples (``x_calibration``, else the first training samples in the file's own order), so the
file ``quantize --out`` writes holds exactly the integers training starts from.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from quant.convert import convert
from quant.graph import QGraph

from .data.split import TrainData
from .probe import probe_head, random_head
from .usermodel import (ModelFile, find_float_head, head_features, integer_head, integer_head_features,
                        with_float_head, with_integer_head)


def resolve_head(how: str, model: ModelFile, classes: int) -> str:
    """``auto`` -> ``keep`` when the model's outputs cover the labels; otherwise say what to do."""
    if how in ("auto", "keep") and model.outputs >= classes:
        return "keep"
    if how in ("auto", "keep"):
        try:
            found = f"its final linear layer {_head_name(model)!r}"
        except ValueError as err:
            found = f"no final linear layer to refit ({err})"
        raise ValueError(f"the labels need {classes} classes but {model.path.name} has {model.outputs} outputs: "
                         f"--head probe fits a new head on your data in place of {found}, or relabel the data")
    return how


def _head_name(model: ModelFile) -> str:
    return integer_head(model.graph)[1].name if model.integer else find_float_head(model.proto).node


def new_head(how: str, features: np.ndarray, labels: np.ndarray, classes: int, seed: int):
    if how == "probe":
        return probe_head(features, labels, classes)
    return random_head(features.shape[1], classes, seed)


def settled_float_model(model: ModelFile, data: TrainData, head: str, seed: int = 0,
                        probe_samples: int = 0) -> tuple[onnx.ModelProto, str]:
    """(the float model with its head settled for ``data``, the head used): kept, or refitted / drawn at
    random in the final Gemm/MatMul's initializers."""
    how = resolve_head(head, model, data.classes)
    if how == "keep":
        return model.proto, how
    probe = slice(0, probe_samples or None)
    found = find_float_head(model.proto)
    features = head_features(model.proto, found, data.x_train[probe])
    return with_float_head(model.proto, found, *new_head(how, features, data.y_train[probe], data.classes, seed)), how


def file_graph(model: ModelFile, data: TrainData, *, head: str, bits: str, rounding: str, scales: str,
               equalize: str, calibration_samples: int, seed: int = 0, probe_samples: int = 0,
               float_out: str | Path | None = None) -> tuple[QGraph, str]:
    """(the quantized graph training starts from, the head used). ``float_out``: where the float model with
    its settled head is written (a run's model.onnx)."""
    calibration = data.calibration[:calibration_samples]
    if model.integer:
        how = resolve_head(head, model, data.classes)
        graph = model.graph
        if how != "keep":
            probe = slice(0, probe_samples or None)
            features = integer_head_features(graph, data.x_train[probe])
            weight, bias = new_head(how, features, data.y_train[probe], data.classes, seed)
            graph = with_integer_head(graph, weight, bias, integer_head_features(graph, calibration))
        return graph, how
    proto, how = settled_float_model(model, data, head, seed, probe_samples)
    if float_out is not None:
        Path(float_out).parent.mkdir(parents=True, exist_ok=True)
        onnx.save(proto, float_out)
    graph = convert(proto, calibration, bits=bits, rounding=rounding, scales=scales, equalize_channels=equalize)
    return graph, how
