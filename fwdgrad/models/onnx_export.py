"""Export a float torch model to the ONNX graph that the integer engine imports.

Uses torch's legacy TorchScript exporter (``dynamo=False``): it needs no extra package
(the dynamo exporter needs onnxscript) and, in eval mode, folds BatchNorm into the
preceding Conv, so the engine never sees a BatchNormalization node. Constant tensors are
then moved into the initializer list, so every node left in the graph is a real layer.
"""

from __future__ import annotations

import os
import uuid
import warnings
from pathlib import Path

import onnx
import torch

# An onnxruntime refuses a model whose IR version is newer than it knows; onnx 1.23 tooling
# defaults to IR 14 while pyproject allows onnxruntime down to 1.18 (IR <= 10). Opset 13
# needs only IR 7, so capping at 10 keeps every supported runtime able to load the file.
MAX_IR_VERSION = 10


def export_onnx(model: torch.nn.Module, input_shape: tuple[int, ...], path: str | os.PathLike, opset: int = 13) -> Path:
    """Export ``model`` (switched to eval mode) with input "input", output "logits", dynamic batch axis.

    The file is written atomically (temp file in the same directory + ``os.replace``), so
    concurrent exporters, e.g. pytest-xdist workers sharing a cache, never see a partial file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        with warnings.catch_warnings():
            # The legacy exporter is deprecated but still the one without an extra dependency.
            warnings.filterwarnings("ignore", "You are using the legacy TorchScript-based ONNX export", DeprecationWarning)
            warnings.filterwarnings("ignore", "The feature will be removed", DeprecationWarning)
            torch.onnx.export(
                model,
                (torch.zeros(input_shape),),
                tmp,
                dynamo=False,
                opset_version=opset,
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                do_constant_folding=True,
            )
        proto = onnx.load(tmp)
        _constants_to_initializers(proto.graph)
        proto.ir_version = min(proto.ir_version, MAX_IR_VERSION)
        onnx.checker.check_model(proto, full_check=True)
        onnx.save(proto, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _constants_to_initializers(graph: onnx.GraphProto) -> None:
    """Replace ``Constant`` nodes and ``Identity`` nodes of initializers by initializers.

    The exporter emits ReLU6's bounds as Constant nodes feeding Clip, and when two folded
    tensors are bitwise equal (e.g. the zero biases of untrained BatchNorms) it keeps one
    initializer and aliases it with an Identity node. Neither is computation.
    """
    initializers = {t.name: t for t in graph.initializer}
    kept = []
    for node in graph.node:
        source = None
        if node.op_type == "Constant" and [a.name for a in node.attribute] == ["value"]:
            source = node.attribute[0].t
        elif node.op_type == "Identity" and node.input[0] in initializers:
            source = initializers[node.input[0]]
        if source is None:
            kept.append(node)
            continue
        tensor = onnx.TensorProto()
        tensor.CopyFrom(source)
        tensor.name = node.output[0]
        graph.initializer.append(tensor)
        initializers[tensor.name] = tensor
    del graph.node[:]
    graph.node.extend(kept)
