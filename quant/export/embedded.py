"""The engine's own graph inside the ONNX files fwdgrad writes: read back, it is the model that was exported.

Three metadata entries make a file self-describing:

- ``fwdgrad_graph``: the QGraph's description (``quant.serialize.describe``) with every weight and bias
  given by reference;
- ``fwdgrad_arrays``: for each weight/bias key, the initializers that hold its integers and how
  (``direct``: the array reshaped to the layer's; ``hi_lo``: ``256 * hi + lo``, 16-bit weights in qop);
- ``fwdgrad_initializers_sha256``: a digest of every initializer, so an edited file is told apart from
  the one written.

So ``graph_from_onnx`` rebuilds the engine from the file's own integers (what verify-onnx compares
onnxruntime against, and what training starts from when a user passes an integer file), and nothing in it
is executable.
"""
from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import numpy_helper

from ..serialize import GraphFormatError, describe, rebuild

if TYPE_CHECKING:
    from ..graph import QGraph

GRAPH_KEY, ARRAYS_KEY, DIGEST_KEY = "fwdgrad_graph", "fwdgrad_arrays", "fwdgrad_initializers_sha256"


def initializers_digest(model: onnx.ModelProto) -> str:
    """SHA-256 over every initializer's name, type, shape and values, in file order."""
    digest = hashlib.sha256()
    for tensor in model.graph.initializer:
        value = numpy_helper.to_array(tensor)
        digest.update(f"{tensor.name}|{tensor.data_type}|{list(tensor.dims)}|".encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()


def embedding(graph: QGraph, weights: dict, sources: dict[str, dict], model: onnx.ModelProto) -> dict[str, str]:
    """The metadata entries that describe ``graph`` (with ``weights``) in ``model``, whose initializers
    ``sources`` (the exporter's record) names for every weight and bias."""
    description, arrays = describe(graph, weights)
    refs = {}
    for key, value in arrays.items():
        if key not in sources:
            raise GraphFormatError(f"the exporter recorded no initializer for {key!r}")
        refs[key] = sources[key] | {"shape": list(value.shape), "dtype": str(value.dtype)}
    return {GRAPH_KEY: json.dumps(description, separators=(",", ":")), ARRAYS_KEY: json.dumps(refs),
            DIGEST_KEY: initializers_digest(model)}


def metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def is_fwdgrad_file(model: onnx.ModelProto) -> bool:
    return GRAPH_KEY in metadata(model)


def _array(initializers: dict, key: str, ref: dict) -> np.ndarray:
    try:
        parts = [initializers[name] for name in ref["initializers"]]
    except KeyError as err:
        raise GraphFormatError(f"{key}: initializer {err} is missing from the file") from None
    if ref["recipe"] == "direct" and len(parts) == 1:
        value = parts[0]
    elif ref["recipe"] == "hi_lo" and len(parts) == 2:
        value = parts[0].astype(np.int64) * 256 + parts[1].astype(np.int64)
    else:
        raise GraphFormatError(f"{key}: unknown layout {ref['recipe']!r} of {len(parts)} initializers")
    if value.size != int(np.prod(ref["shape"])):
        raise GraphFormatError(f"{key}: the file holds {value.size} values for shape {ref['shape']}")
    return value.reshape(ref["shape"]).astype(ref["dtype"])


def graph_from_onnx(model: onnx.ModelProto) -> QGraph:
    """The QGraph a fwdgrad ONNX file describes, with the integers its initializers hold."""
    meta = metadata(model)
    if GRAPH_KEY not in meta or ARRAYS_KEY not in meta:
        raise GraphFormatError("the file holds no fwdgrad graph description (it was not written by fwdgrad "
                               "export or quantize --out, or by an older version)")
    try:
        description, refs = json.loads(meta[GRAPH_KEY]), json.loads(meta[ARRAYS_KEY])
    except json.JSONDecodeError as err:
        raise GraphFormatError(f"damaged fwdgrad metadata ({err})") from None
    initializers = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    arrays = {key: _array(initializers, key, ref) for key, ref in refs.items()}
    return rebuild(description, arrays)
