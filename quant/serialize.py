"""A QGraph as data: a JSON description plus named integer arrays, and back, without executing anything.

Checkpoints and the ONNX files fwdgrad writes must be openable from anyone's run directory, so nothing
here is a pickle: the description names node types from a fixed list (the engine's op classes), values
are JSON (scales as the float32 numbers they are, exactly), and every weight and bias is an array held
beside it (an ``.npz`` read with ``allow_pickle=False``, or an ONNX file's own initializers). Loading
rebuilds the nodes through their constructors, so every derived quantity (requantization multipliers,
packings) is computed again from the integers and scales, never trusted from the file.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

from .graph import QGraph
from .ops import ConvGeometry, PoolGeometry, QAdd, QAvgPool, QClamp, QConcat, QConv, QLinear, QMaxPool, QReshape
from .ops.base import WeightedNode
from .tensor import QParams

FORMAT = "fwdgrad-graph/1"
NODE_TYPES = {cls.__name__: cls for cls in (QConv, QLinear, QAdd, QMaxPool, QAvgPool, QReshape, QClamp, QConcat)}
VALUE_TYPES = {cls.__name__: cls for cls in (QParams, ConvGeometry, PoolGeometry)}


class GraphFormatError(ValueError):
    """A graph description that is not one fwdgrad wrote (or was damaged since)."""


def _encode(value, key: str, arrays: dict):
    if isinstance(value, np.ndarray) and key:
        arrays[key] = value
        return {"array": key}
    if isinstance(value, QParams):
        return {"type": "QParams", "scale": np.asarray(value.scale, np.float32).reshape(-1).tolist(),
                "scale_shape": list(value.scale.shape), "zero_point": int(value.zero_point), "bits": int(value.bits),
                "narrow": bool(value.narrow), "axis": value.axis}
    if isinstance(value, (ConvGeometry, PoolGeometry)):
        return {"type": type(value).__name__,
                **{f.name: _encode(getattr(value, f.name), "", arrays) for f in dataclasses.fields(value)}}
    if isinstance(value, tuple):
        return {"tuple": [_encode(v, "", arrays) for v in value]}
    if isinstance(value, list):
        return [_encode(v, "", arrays) for v in value]
    if isinstance(value, dict):
        return {"dict": {str(k): _encode(v, "", arrays) for k, v in value.items()}}
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot describe {type(value).__name__} in a graph file")


def _decode(value, arrays: Mapping[str, np.ndarray]):
    if isinstance(value, list):
        return [_decode(v, arrays) for v in value]
    if not isinstance(value, dict):
        return value
    if "array" in value:
        if value["array"] not in arrays:
            raise GraphFormatError(f"the graph refers to array {value['array']!r}, which the file does not hold")
        return np.asarray(arrays[value["array"]])
    if "tuple" in value:
        return tuple(_decode(v, arrays) for v in value["tuple"])
    if "dict" in value:
        return {k: _decode(v, arrays) for k, v in value["dict"].items()}
    kind = value.get("type")
    if kind == "QParams":
        scale = np.asarray(value["scale"], np.float32).reshape(value["scale_shape"])
        return QParams(scale, value["zero_point"], value["bits"], value["narrow"], value["axis"])
    if kind in VALUE_TYPES:
        names = {f.name for f in dataclasses.fields(VALUE_TYPES[kind])}
        return VALUE_TYPES[kind](**{k: _decode(v, arrays) for k, v in value.items() if k in names})
    raise GraphFormatError(f"unknown value in the graph description: {sorted(value)[:4]}")


def _fields(node) -> list[str]:
    return [f.name for f in dataclasses.fields(node) if f.init]


def describe(graph: QGraph, weights: dict | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    """(description, arrays): JSON-ready description of ``graph`` and the integer arrays it refers to by
    key (``<node>.weight``, ``<node>.bias``); ``weights`` replaces stored integers (trained ones)."""
    weights = weights or {}
    arrays: dict[str, np.ndarray] = {}
    nodes = []
    for node in graph.nodes:
        entry = {"op": type(node).__name__}
        for name in _fields(node):
            value = getattr(node, name)
            key = ""
            if isinstance(node, WeightedNode) and name in ("weight", "bias"):
                key = node.weight_key if name == "weight" else node.bias_key
                value = np.asarray(weights.get(key, value), dtype=value.dtype)
            entry[name] = _encode(value, key, arrays)
        nodes.append(entry)
    description = {"format": FORMAT, "input_name": graph.input_name,
                   "input_params": _encode(graph.input_params, "", arrays), "output_name": graph.output_name,
                   "rounding": graph.rounding, "bits": graph.bits, "metadata": _encode(graph.metadata, "", arrays),
                   "nodes": nodes}
    return description, arrays


def _check_weighted(node: WeightedNode) -> None:
    """The arrays a description names must fit its params, or the kernels would fail far from the cause."""
    if node.weight.dtype != np.dtype(node.w_params.dtype) or node.bias.dtype not in (np.int32, np.int64):
        raise GraphFormatError(f"node {node.name!r}: weight {node.weight.dtype} and bias {node.bias.dtype} do not "
                               f"fit {node.w_params.bits}-bit weights with int32/int64 biases")
    channels = node.weight.shape[0]
    if node.bias.shape != (channels,) or node.w_params.scale.size not in (1, channels):
        raise GraphFormatError(f"node {node.name!r}: weight {node.weight.shape}, bias {node.bias.shape} and "
                               f"{node.w_params.scale.size} weight scales do not fit together")
    if np.abs(node.weight.astype(np.int64)).max(initial=0) > node.w_params.qmax:
        raise GraphFormatError(f"node {node.name!r}: weights outside the {node.w_params.bits}-bit range")


def rebuild(description: dict, arrays: Mapping[str, np.ndarray]) -> QGraph:
    """The QGraph a :func:`describe` output stands for (a GraphFormatError names what does not fit)."""
    if not isinstance(description, dict) or description.get("format") != FORMAT:
        found = description.get("format") if isinstance(description, dict) else type(description).__name__
        raise GraphFormatError(f"not a {FORMAT} description (format {found!r})")
    try:
        nodes = []
        for entry in description["nodes"]:
            cls = NODE_TYPES.get(entry.get("op"))
            if cls is None:
                raise GraphFormatError(f"unknown node type {entry.get('op')!r}: known {', '.join(NODE_TYPES)}")
            allowed = {f.name for f in dataclasses.fields(cls) if f.init}
            node = cls(**{k: _decode(v, arrays) for k, v in entry.items() if k in allowed})
            if isinstance(node, WeightedNode):
                _check_weighted(node)
            nodes.append(node)
        return QGraph(nodes, description["input_name"], _decode(description["input_params"], arrays),
                      description["output_name"], description["rounding"], description["bits"],
                      _decode(description["metadata"], arrays))
    except GraphFormatError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise GraphFormatError(f"damaged graph description ({type(err).__name__}: {err})") from None
