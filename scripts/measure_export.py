"""Measure what an exported file computes in onnxruntime against the engine: the numbers in docs/export.md.

ImageNet MobileNetV2 (the zoo's pretrained weights) quantized on real photo crops, exported as qop and qdq
at each bit width, run in onnxruntime at its basic and full ("all", its default) graph optimization
levels, and at "int8" (full, with qdq groups fused into its int8 kernels: fwdgrad.deploy.session_options),
on other crops of the same photos. Per row: top-1 agreement with the engine, the largest integer
difference of the logits on the output grid, and the fraction of logits that differ at all. Then qdq node
by node: each node fed the engine's own integers (basic level), how many of its outputs land elsewhere
than the engine's; this separates float rounding in one node from its propagation through the graph.

    python scripts/measure_export.py --resolution 224 --images 96 --calibration 128
    python scripts/measure_export.py --scales pow2    # the same for power-of-two scales
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort

from fwdgrad.data.photos import real_photos
from fwdgrad.deploy import OPTIMIZATION_LEVELS, session_options
from fwdgrad.models.zoo import model_onnx
from quant.convert import convert
from quant.equalize import EQUALIZE_MODES
from quant.export import ExportError, export, qdq_nodes_against_engine
from quant.tensor import quantize


def onnxruntime_logits(model, level: str, x: np.ndarray, graph, batch_size: int = 16) -> np.ndarray:
    """The file's logits on the engine's output grid (qop: its integers; qdq: its floats quantized)."""
    session = ort.InferenceSession(model.SerializeToString(), session_options(level), providers=["CPUExecutionProvider"])
    names = {o.name for o in session.get_outputs()}
    out = []
    for i in range(0, len(x), batch_size):
        if "logits_int" in names:
            out.append(session.run(["logits_int"], {"input": x[i:i + batch_size]})[0])
        else:
            out.append(quantize(session.run(["logits"], {"input": x[i:i + batch_size]})[0], graph.output_params))
    return np.concatenate(out).astype(np.int64)


def node_by_node(graph, x: np.ndarray) -> tuple[int, int, int, int]:
    """(outputs differing, outputs, largest difference, nodes with a difference) of the qdq file's nodes
    run one at a time in onnxruntime on the engine's own input integers, against the engine's outputs."""
    differing = total = largest = nodes = 0
    for _, _, theirs, ours in qdq_nodes_against_engine(graph, x):
        steps = np.abs(theirs.astype(np.int64) - ours)
        differing, total = differing + np.count_nonzero(steps), total + steps.size
        largest, nodes = max(largest, int(steps.max())), nodes + bool(steps.any())
    return differing, total, largest, nodes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--calibration", type=int, default=128)
    parser.add_argument("--bits", nargs="+", default=["w8a8", "w16a8", "w8a16"])
    parser.add_argument("--node-images", type=int, default=16, help="crops for the node-by-node comparison")
    parser.add_argument("--scales", default="float", choices=["float", "pow2"], help="quantize with these scales")
    parser.add_argument("--equalize", default="all", choices=EQUALIZE_MODES, help="activation equalization")
    args = parser.parse_args()
    path = model_onnx("mobilenetv2", resolution=args.resolution)
    calibration = real_photos(args.calibration, args.resolution, seed=1)
    x = real_photos(args.images, args.resolution, seed=0)
    print(f"MobileNetV2 {args.resolution}px, {args.scales} scales, equalize {args.equalize}, {args.images} crops of "
          f"real photos\n")
    print("| bits | format | onnxruntime level | top-1 agreement | max integer difference | logits differing |")
    print("|---|---|---|---|---|---|")
    for bits in args.bits:
        graph = convert(path, calibration, bits=bits, scales=args.scales, equalize_channels=args.equalize)
        ours = np.concatenate([graph.forward(x[i:i + 16]) for i in range(0, len(x), 16)]).astype(np.int64)
        for fmt in ("qop", "qdq"):
            try:
                model = export(graph, x.shape[1:], fmt)
            except ExportError as err:
                print(f"| {bits} | {fmt} | | not exportable: {str(err).split(':')[0]} | | |")
                continue
            for level in OPTIMIZATION_LEVELS:
                started = time.perf_counter()
                theirs = onnxruntime_logits(model, level, x, graph)
                diff = np.abs(theirs - ours)
                print(f"| {bits} | {fmt} | {level} | {np.mean(theirs.argmax(1) == ours.argmax(1)):.1%} | {diff.max()} "
                      f"| {np.mean(diff > 0):.2%} |  ({time.perf_counter() - started:.1f} s)", flush=True)
    print(f"\nqdq node by node on the engine's integers ({args.node_images} crops, onnxruntime basic level)\n")
    print("| bits | outputs differing | of | rate | largest difference | nodes with a difference |")
    print("|---|---|---|---|---|---|")
    for bits in args.bits:
        graph = convert(path, calibration, bits=bits, scales=args.scales, equalize_channels=args.equalize)
        differing, total, largest, nodes = node_by_node(graph, x[:args.node_images])
        print(f"| {bits} | {differing} | {total} | {differing / total:.1e} | {largest} | {nodes} |", flush=True)


if __name__ == "__main__":
    main()
