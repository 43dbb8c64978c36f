"""The float model in onnxruntime, batch by batch, with any of its tensors exposed as outputs.

Calibration, the float reference of a PTQ report and feature extraction for a new head all run a user's
float ONNX file over many samples. Such files often declare a fixed batch (``torch.onnx.export`` without
``dynamic_axes`` gives batch 1), which onnxruntime enforces; here batches then have exactly that size, the
last one padded with copies of its final sample and the padding dropped from the results.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import onnx


def fixed_batch(model: onnx.ModelProto) -> int | None:
    """The batch size the model's data input declares, or None when it is free (symbolic)."""
    consts = {t.name for t in model.graph.initializer}
    value = next((i for i in model.graph.input if i.name not in consts), None)
    dims = value.type.tensor_type.shape.dim if value is not None else ()
    return dims[0].dim_value if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0 else None


def float_batches(model: onnx.ModelProto, outputs: list[str], data: np.ndarray,
                  batch_size: int = 32) -> Iterator[dict[str, np.ndarray]]:
    """For consecutive batches of ``data``: the float values of ``outputs`` (tensor names of the model)."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    for name in outputs:
        if name not in existing:
            probe.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    data = np.asarray(data, np.float32)
    size = fixed_batch(model) or batch_size
    for start in range(0, len(data), size):
        batch = data[start:start + size]
        real = len(batch)
        if fixed_batch(model) and real < size:
            batch = np.concatenate([batch, np.repeat(batch[-1:], size - real, axis=0)])
        values = session.run(list(outputs), {input_name: batch})
        yield {name: value[:real] for name, value in zip(outputs, values)}


def float_outputs(model: onnx.ModelProto, outputs: list[str], data: np.ndarray, batch_size: int = 32) -> dict:
    """``outputs`` over all of ``data``, concatenated."""
    parts = list(float_batches(model, outputs, data, batch_size))
    return {name: np.concatenate([p[name] for p in parts]) for name in outputs}
