"""Training-step performance, every figure a ratio measured in one run on this machine.

For small CNNs of growing width on Fashion-MNIST inputs (28x28, w8a8 so that every backend runs it):
- ZO step time / one inference forward of the same batch on the same backend (numba). A step makes
  2m = 8 forward calls; caching the prefix makes it cheaper when the trained channels are late;
- our ZO step vs a PyTorch backprop step (float32, SGD, whole network) on the same model and batch: time,
  and peak memory (each measured in a fresh process: peak RSS above the process's own baseline);
- the onnxruntime backend's ZO step vs the numba one.
Selections: "last-layer" (the prefix cache covers everything but the head) and "all" (no prefix).
Writes a table to docs/benchmarks.md (between markers) and docs/bench_train.png.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from doc_sections import write_section

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench_train:begin -->", "<!-- bench_train:end -->"


def _setup(width: int, batch: int):
    import numpy as np
    import torch

    from fwdgrad.data.datasets import load_dataset
    from fwdgrad.models.onnx_export import export_onnx
    from fwdgrad.models.small_cnn import SmallCNN
    from fwdgrad.task import model_inputs
    from quant.convert import convert

    torch.manual_seed(0)
    net = SmallCNN(1, 10, width).eval()
    data = load_dataset("fashion-mnist", "train")
    x = model_inputs("small-cnn", data.images[:max(256, batch)], 28)
    path = Path(f"/tmp/fwdgrad-bench-cnn{width}.onnx")
    export_onnx(net, (1, 1, 28, 28), path)
    graph = convert(path, x[:256], bits="w8a8")
    return net, graph, x[:batch], np.asarray(data.labels[:batch])


def best_seconds(fn, repeats: int) -> float:
    """The fastest of ``repeats`` calls of ``fn``, after one call to warm it up."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times, default=0.0)


def zo_step_seconds(graph, x, y, selection: str, backend: str, repeats: int, head_update: str = "zo") -> float:
    """Seconds of one step: pure ZO (every selected weight perturbed, the head too), or with ``head_update``
    auto the forward-only hybrid (exact head and last layer from the same calls)."""
    import numpy as np

    from fwdgrad.channels import input_channels
    from fwdgrad.config import TrainConfig
    from fwdgrad.perturb import selection_masks
    from fwdgrad.data.split import TrainData
    from fwdgrad.trainer import Trainer

    cfg = TrainConfig(bits="w8a8", selection=selection, m=4, space="real", eps=0.01, lr=0.001, backend=backend,
                      batch_size=len(x), epochs=1, head_update=head_update)
    trainer = Trainer(graph, TrainData(x, y, x, y), cfg, "/tmp/fwdgrad-bench-run")
    nodes = graph.weighted_nodes() if selection == "all" else graph.weighted_nodes()[-1:]
    chosen = {n.name: np.arange(input_channels(n)) for n in nodes}
    masks = selection_masks(graph, chosen, cfg.train_bias)
    weights = trainer.initial_weights()
    return best_seconds(lambda: trainer.step(dict(weights), {}, masks, chosen, x, y, 0), repeats)


def torch_step_seconds(net, x, y, repeats: int) -> float:
    import torch

    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)

    def step():
        loss = torch.nn.functional.cross_entropy(net(xt), yt)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    net.train()
    return best_seconds(step, repeats)


def peak_memory(kind: str, width: int, batch: int) -> int:
    """Peak memory (bytes) of one step above the process's resting memory, in a fresh process."""
    # a fixed mmap threshold makes glibc return every large buffer when it is freed, so resident memory
    # follows live memory instead of keeping the first step's buffers for the next one
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, __file__, "--memory", kind, str(width), str(batch)], capture_output=True,
                         text=True, check=True, env=env)
    return int(out.stdout.strip().splitlines()[-1])


def _rss_kb(field: str) -> int:
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(status[field].split()[0])


def _memory_child(kind: str, width: int, batch: int) -> None:
    """Peak RSS above the resting RSS during one step on the whole batch, after a warm-up step (numba's
    compilation and PyTorch's allocator start-up are not the model's memory). Linux resets the peak
    (VmHWM) when 5 is written to /proc/self/clear_refs, so set-up's own peak does not hide the step's."""
    net, graph, x, y = _setup(width, batch)
    run = {"zo": lambda: zo_step_seconds(graph, x, y, "all", "numba", 0),
           "bp": lambda: torch_step_seconds(net, x, y, 0),
           "forward": lambda: graph.forward(x)}[kind]
    run()
    Path("/proc/self/clear_refs").write_text("5")
    resting = _rss_kb("VmRSS")
    run()
    print((_rss_kb("VmHWM") - resting) * 1024)


def measure(widths, batches, repeats: int) -> list[dict]:
    rows = []
    for width in widths:
        for batch in batches:
            net, graph, x, y = _setup(width, batch)
            forward = best_seconds(lambda: graph.forward(x), repeats)
            row = {"width": width, "batch": batch, "forward_s": forward,
                   "zo_all_s": zo_step_seconds(graph, x, y, "all", "numba", repeats),
                   "zo_last_s": zo_step_seconds(graph, x, y, "last-layer", "numba", repeats),
                   "zo_all_ort_s": zo_step_seconds(graph, x, y, "all", "onnxruntime", repeats),
                   "hybrid_all_s": zo_step_seconds(graph, x, y, "all", "numba", repeats, "auto"),
                   "torch_bp_s": torch_step_seconds(net, x, y, repeats)}
            rows.append(row)
            print(json.dumps(row))
    return rows


def write(rows: list[dict], memory: dict) -> None:
    lines = [BEGIN, "## Training-step performance (`scripts/bench_train.py`)", "",
             "Small CNN (Fashion-MNIST 28x28, w8a8), m = 4 (8 forward calls per ZO step), best of repeated steps. "
             "Ratios of times measured in the same run. A ZO step over all channels costs 2m = 8 forwards plus "
             "regenerating each perturbation and the update from its seed, for every weight; with the last layer "
             "alone the prefix is computed once per step and only the head runs 2m times. ZO columns: pure ZO (every "
             "selected weight perturbed, the head too); hybrid: the exact head and last layer from the same calls, "
             "ZO on the rest (fwdgrad train's default).", "",
             "| width | batch | forward ms | ZO step / forward (all) | ZO step / forward (last layer, cached prefix) | "
             "ZO step / PyTorch BP step | onnxruntime ZO / numba ZO | hybrid step / forward (all) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['width']} | {r['batch']} | {r['forward_s'] * 1e3:.2f} | {r['zo_all_s'] / r['forward_s']:.1f} | "
                     f"{r['zo_last_s'] / r['forward_s']:.1f} | {r['zo_all_s'] / r['torch_bp_s']:.2f} | "
                     f"{r['zo_all_ort_s'] / r['zo_all_s']:.2f} | {r['hybrid_all_s'] / r['forward_s']:.1f} |")
    if memory:
        lines += ["", f"Peak memory growth of one step (width {memory['width']}, batch {memory['batch']}, fresh "
                  "process each, peak RSS above resting RSS, Linux VmHWM): inference forward "
                  f"{memory['forward'] / 2**20:.1f} MB, pure ZO step (all channels) {memory['zo'] / 2**20:.1f} MB, "
                  f"PyTorch backprop step {memory['bp'] / 2**20:.1f} MB: ZO / inference "
                  f"**{memory['zo'] / memory['forward']:.2f}x**, backprop / inference "
                  f"**{memory['bp'] / memory['forward']:.2f}x**, backprop / ZO {memory['bp'] / memory['zo']:.2f}x."]
    lines += ["", "![training step ratios](bench_train.png)", END]
    section = "\n".join(lines)
    write_section(DOC, section, BEGIN, END)
    plot(rows)
    print(section)


def plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for batch in sorted({r["batch"] for r in rows}):
        part = [r for r in rows if r["batch"] == batch]
        widths = [r["width"] for r in part]
        axes[0].plot(widths, [r["zo_all_s"] / r["forward_s"] for r in part], marker="o", label=f"all, batch {batch}")
        axes[0].plot(widths, [r["zo_last_s"] / r["forward_s"] for r in part], marker="s", linestyle="--",
                     label=f"last layer, batch {batch}")
        axes[1].plot(widths, [r["zo_all_s"] / r["torch_bp_s"] for r in part], marker="o", label=f"batch {batch}")
    axes[0].axhline(8, color="grey", linewidth=0.8)
    axes[0].set_title("ZO step / one forward (a step makes 2m = 8 calls)")
    axes[1].set_title("our ZO step / PyTorch backprop step")
    for axis in axes:
        axis.set_xlabel("CNN width")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(ROOT / "docs" / "bench_train.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--widths", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory:
        _memory_child(args.memory[0], int(args.memory[1]), int(args.memory[2]))
        return
    rows = measure(args.widths, args.batches, args.repeats)
    width, batch = args.widths[-1], args.batches[-1]
    memory = {"width": width, "batch": batch, **{k: peak_memory(k, width, batch) for k in ("forward", "zo", "bp")}}
    write(rows, memory)


if __name__ == "__main__":
    main()
