"""Check the memory planner against the engine: planned vs measured activation memory of MobileNetV2.

The planner (devices/planner.py) models what an MCU holds: int8/int16 activation tensors by lifetime.
Our numba engine holds the same tensors (QGraph.run_nodes frees each one after its last reader), so the
measured peak of live activation bytes, tracked by tracemalloc over one batch-1 forward, must sit at the
plan: above the live-bytes lower bound, at or below the greedy arena. Also reported, for honesty: the
whole-process tracemalloc peak of the forward, which adds the engine's float32 temporaries (BLAS operands,
im2col, the float copies of weights), a host artefact an MCU kernel does not have.
Results go to docs/devices.md between markers.
"""
from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np

from devices.planner import engine_activation_peak, greedy_arena, live_peak, tensor_lifetimes
from fwdgrad.data.photos import real_photos
from fwdgrad.models.zoo import model_onnx
from quant.convert import convert

from doc_sections import write_section

DOC = Path(__file__).resolve().parent.parent / "docs" / "devices.md"
BEGIN, END = "<!-- measure_memory:begin -->", "<!-- measure_memory:end -->"


def traced_forward_peak(graph, x: np.ndarray) -> int:
    graph.forward(x)  # compile and warm caches outside the measurement
    tracemalloc.start()
    graph.forward(x)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def main() -> None:
    lines = [BEGIN, "## Planner vs the engine (`scripts/measure_memory.py`)", "",
             "MobileNetV2 w8a8, batch 1. *Measured live* is the peak of integer activation bytes the numba engine "
             "holds during a forward (it frees each tensor after its last reader); the plan's arena must cover it "
             "(within 20% is the check). *tracemalloc forward* is the whole Python heap peak of that forward, "
             "which adds the engine's float32 temporaries and float copies of weights (host-only costs).", "",
             "| width | res | planned arena KB | live lower bound KB | measured live KB | plan / measured | "
             "tracemalloc forward KB |", "|---|---|---|---|---|---|---|"]
    for width, resolution in [(1.0, 96), (1.0, 160), (1.0, 224), (0.5, 128)]:
        graph = convert(model_onnx("mobilenetv2", width=width, resolution=resolution),
                        real_photos(16, resolution, seed=1), bits="w8a8")
        x = real_photos(1, resolution, seed=0)
        tensors = tensor_lifetimes(graph, (3, resolution, resolution))
        tensors = [t for t in tensors if not t.name.endswith(":scratch")]  # the engine has no CMSIS scratch
        arena, bound = greedy_arena(tensors), live_peak(tensors)
        measured = engine_activation_peak(graph, x)
        lines.append(f"| {width} | {resolution} | {arena / 1024:.0f} | {bound / 1024:.0f} | {measured / 1024:.0f} | "
                     f"{arena / measured:.2f} | {traced_forward_peak(graph, x) / 1024:,.0f} |")
    lines.append(END)
    section = "\n".join(lines)
    write_section(DOC, section, BEGIN, END)
    print(section)


if __name__ == "__main__":
    main()
