"""Where an integer forward's time goes, node kind by node kind, beside onnxruntime int8's own profile.

Same model (ImageNet MobileNetV2, real photo crops), same batch, same process: our numba backend timed node
by node (the minimum over repeats of each node's kernel call), grouped by kind (1x1 convolutions, kxk
convolutions, depthwise, the classifier, element-wise adds, pools, the rest), and onnxruntime's int8
QOperator model (quantize_static, as in bench_engine.py) timed by its own profiler per operator type.
Writes a table to docs/engine.md (between markers).
"""
from __future__ import annotations

import argparse
import json
import re
import platform
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from bench_engine import int8_features, onnxruntime_int8
from bench_train import best_seconds
from doc_sections import markdown_table, write_section
from fwdgrad.data.photos import real_photos
from fwdgrad.models.zoo import model_onnx
from quant.backends import get_backend
from quant.convert import convert
from quant.ops import QConv, QLinear

DOC = Path(__file__).resolve().parent.parent / "docs" / "engine.md"
BEGIN, END = "<!-- profile_nodes:begin -->", "<!-- profile_nodes:end -->"
WALL = "whole forward"  # one call's wall time (fastest of the repeats), beside the sum of its nodes


def kind(node) -> str:
    if isinstance(node, QConv):
        o, cg, kh, kw = node.weight.shape
        if node.geometry.groups > 1:
            return "depthwise conv" if cg == 1 else "grouped conv"
        return "1x1 conv" if kh * kw == 1 else f"{kh}x{kw} conv"
    if isinstance(node, QLinear):
        return "linear"
    return node.op_type.lower()


def our_profile(graph, x: np.ndarray, repeats: int) -> dict[str, float]:
    """Seconds per kind: each node's fastest call over ``repeats`` forwards (node inputs as in a forward)."""
    kernels = get_backend("numba")
    for _ in range(3):  # compile and pack first
        graph.forward(x)
    best = defaultdict(lambda: float("inf"))
    for _ in range(repeats):
        env = {graph.input_name: graph.quantize_input(x)}
        for i, node in enumerate(graph.nodes):
            xs = [env[t] for t in node.inputs]
            start = time.perf_counter()
            env[node.output] = node.run(kernels, xs, graph.rounding)
            best[i] = min(best[i], time.perf_counter() - start)
    totals = defaultdict(float)
    for i, seconds in best.items():
        totals[kind(graph.nodes[i])] += seconds
    totals[WALL] = best_seconds(lambda: graph.forward(x), repeats)
    return dict(totals)


def onnx_kinds(model: Path) -> dict[str, str]:
    """Node name -> the kind ``kind`` gives our node of the same job (QLinearConv by its group and kernel)."""
    proto = onnx.load(str(model))
    shapes = {t.name: tuple(t.dims) for t in proto.graph.initializer}
    kinds = {}
    for node in proto.graph.node:
        if node.op_type == "QLinearConv":
            o, cg, kh, kw = shapes[node.input[3]]
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            kinds[node.name] = ("depthwise conv" if cg == 1 else "grouped conv") if group > 1 else \
                "1x1 conv" if kh * kw == 1 else f"{kh}x{kw} conv"
        else:
            kinds[node.name] = {"QGemm": "linear", "QLinearAdd": "add",
                                "QLinearGlobalAveragePool": "averagepool"}.get(node.op_type, node.op_type)
    return kinds


def onnxruntime_profile(model: Path, x: np.ndarray, repeats: int) -> dict[str, float]:
    """Seconds per node kind of one run (median over ``repeats`` runs), from onnxruntime's profiler."""
    kinds = onnx_kinds(model)
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(model.parent / "profile")  # beside the model, in its temporary folder
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    for _ in range(repeats + 1):
        session.run(None, {"input": x})
    events = json.loads(Path(session.end_profiling()).read_text())
    runs = defaultdict(lambda: defaultdict(float))  # op type -> run index -> microseconds
    index = -1
    for event in events:
        if event.get("cat") == "Session" and event.get("name") == "model_run":
            index += 1
        elif event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            name = re.sub(r"(_token_\d+)?_kernel_time$", "", event["name"])
            runs[kinds.get(name, event["args"]["op_name"])][index] += event["dur"]
    profile = {op: float(np.median(list(per_run.values())[1:] or list(per_run.values()))) * 1e-6
               for op, per_run in runs.items()}
    plain = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])  # timed without the profiler
    return profile | {WALL: best_seconds(lambda: plain.run(None, {"input": x}), repeats)}


def measure(resolution: int, batch: int, repeats: int) -> dict:
    path = model_onnx("mobilenetv2", resolution=resolution)
    x = real_photos(batch, resolution, seed=0)
    calibration = real_photos(32, resolution, seed=1)
    ours = {bits: our_profile(convert(path, calibration, bits=bits), x, repeats) for bits in ("w8a8", "w16a8")}
    with tempfile.TemporaryDirectory() as tmp:
        onnxruntime_int8(path, calibration, Path(tmp))
        peer = onnxruntime_profile(Path(tmp) / "ort_int8.onnx", x, repeats)
    return {"resolution": resolution, "batch": batch, "ours": ours, "onnxruntime": peer}


def render(results: list[dict]) -> str:
    lines = [BEGIN, "## Where the time goes (`scripts/profile_nodes.py`)", "",
             f"MobileNetV2 (ImageNet) on this machine ({platform.processor() or platform.machine()} "
             f"{int8_features()}), one forward, measured in one run: our numba backend node by node (each node's "
             "fastest call over the repeats, summed by kind; the whole call beside it), onnxruntime int8 (its own "
             "quantize_static QOperator model, u8 activations, s8 per-channel weights) by its profiler (median run), "
             "its nodes put in the same kinds. Ratio = "
             "onnxruntime's time / ours (below 1: we are slower). Kinds only one engine has (onnxruntime's "
             "QuantizeLinear / Transpose at the model's edges, our Reshape) are listed as they are.", ""]
    for r in results:
        walls = {"w8a8": r["ours"]["w8a8"][WALL], "w16a8": r["ours"]["w16a8"][WALL], "peer": r["onnxruntime"][WALL]}
        ours = {b: {k: v for k, v in t.items() if k != WALL} for b, t in r["ours"].items()}
        peer = {k: v for k, v in r["onnxruntime"].items() if k != WALL}
        kinds = sorted(set(ours["w8a8"]) | set(peer), key=lambda k: -ours["w8a8"].get(k, peer.get(k, 0)))
        totals = {bits: sum(t.values()) for bits, t in ours.items()} | {"peer": sum(peer.values())}

        def cell(seconds, total):
            return f"{seconds * 1e3:.2f} ({100 * seconds / total:.0f}%)" if seconds else ""

        def ratio(a, b):
            return f"{b / a:.2f}x" if a and b else ""

        rows = [[k, cell(ours["w8a8"].get(k, 0), totals["w8a8"]), cell(ours["w16a8"].get(k, 0), totals["w16a8"]),
                 cell(peer.get(k, 0), totals["peer"]), ratio(ours["w8a8"].get(k, 0), peer.get(k, 0)),
                 ratio(ours["w16a8"].get(k, 0), peer.get(k, 0))] for k in kinds]
        rows.append(["**sum of the nodes**"] + [f"**{totals[b] * 1e3:.2f}**" for b in ("w8a8", "w16a8", "peer")]
                    + [f"**{ratio(totals[b], totals['peer'])}**" for b in ("w8a8", "w16a8")])
        rows.append([f"**{WALL}** (wall)"] + [f"**{walls[b] * 1e3:.2f}**" for b in ("w8a8", "w16a8", "peer")]
                    + [f"**{ratio(walls[b], walls['peer'])}**" for b in ("w8a8", "w16a8")])
        lines += [f"### {r['resolution']} px, batch {r['batch']}", ""]
        lines += markdown_table(["node kind", "ours w8a8 ms (share)", "ours w16a8 ms (share)",
                                 "onnxruntime int8 ms (share)", "w8a8 vs onnxruntime", "w16a8 vs onnxruntime"], rows)
        lines.append("")
    lines.append(END)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--resolutions", type=int, nargs="+", default=[128])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    results = [measure(res, batch, args.repeats) for res in args.resolutions for batch in args.batches]
    write_section(DOC, render(results), BEGIN, END)
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
