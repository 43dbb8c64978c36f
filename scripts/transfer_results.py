"""Forward-gradient transfer learning results for docs/results.md (issue: trainer).

Runs, on this machine, every row it reports:
(a) the small CNN pretrained on Fashion-MNIST, fine-tuned with forward gradients (w16a8, TraDy) on MNIST;
(b) the selection comparison on the same task: TraDy vs S-Full Random vs all channels vs last layer,
    same memory budget, 3 seeds, mean +- std;
(c) ImageNet MobileNetV2 fine-tuned on a Fashion-MNIST subset.
Each run writes its own directory (metrics.jsonl, summary.json) under --out and is reused if finished.
The table and a plot (test top-1 vs epoch) go into docs/results.md between markers.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from fwdgrad.config import TrainConfig
from fwdgrad.task import prepare_data, prepare_graph
from fwdgrad.trainer import Trainer, load_graph

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "results.md"
BEGIN, END = "<!-- transfer_results:begin -->", "<!-- transfer_results:end -->"

SMALL = dict(model="small-cnn", dataset="mnist", bits="w16a8", budget="8KB", epochs=6, batch_size=64, m=4,
             eps=1.0, lr=2.0, train_samples=4000, test_samples=2000)
MOBILE = dict(model="mobilenetv2", dataset="fashion-mnist", bits="w16a8", budget="64KB", resolution=96, epochs=3,
              batch_size=64, m=4, eps=1.0, lr=2.0, train_samples=1500, test_samples=1000)


def run(name: str, settings: dict, out_root: Path) -> dict:
    out = out_root / name
    if (out / "summary.json").exists():
        return json.loads((out / "summary.json").read_text())
    cfg = TrainConfig(**settings)
    data = prepare_data(cfg)
    resume = (out / "checkpoint" / "state.json").exists()
    graph = load_graph(out) if resume else prepare_graph(cfg, data, out)
    return Trainer(graph, data, cfg, out).run(resume=resume)


def history(out_root: Path, name: str) -> list[dict]:
    return [json.loads(l) for l in (out_root / name / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(ROOT / ".bench-cache" / "transfer"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--skip-mobilenet", action="store_true")
    args = parser.parse_args()
    out_root = Path(args.out)
    rows = []
    for selection in ["trady", "s-full-random", "all", "last-layer"]:
        summaries = [run(f"small-{selection}-{seed}", SMALL | dict(selection=selection, seed=seed), out_root)
                     for seed in range(args.seeds)]
        rows.append(("small CNN FMNIST -> MNIST", selection, summaries))
    if not args.skip_mobilenet:
        rows.append(("MobileNetV2 ImageNet -> FMNIST", "trady", [run("mobile-trady-0", MOBILE | dict(selection="trady"), out_root)]))
    write_doc(rows, out_root)


def fmt(values) -> str:
    values = np.asarray(values) * 100
    return f"{values.mean():.1f} ± {values.std():.1f}" if len(values) > 1 else f"{values[0]:.1f}"


def write_doc(rows, out_root: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [BEGIN, "## Forward-gradient transfer learning (`scripts/transfer_results.py`)", "",
             "Top-1 on the target test set (%), mean ± std over seeds; zero-shot is the pretrained backbone with a "
             "ridge-regression linear head fitted on the training images (the start of every run).", "",
             "| task | selection | seeds | zero-shot | final | best | trainable bytes | forward calls | train s |",
             "|---|---|---|---|---|---|---|---|---|"]
    figure, axis = plt.subplots(figsize=(6, 4))
    for task, selection, summaries in rows:
        lines.append(f"| {task} | {selection} | {len(summaries)} | {fmt([s['zero_shot_top1'] for s in summaries])} | "
                     f"{fmt([s['final_top1'] for s in summaries])} | {fmt([s['best_top1'] for s in summaries])} | "
                     f"{summaries[0]['trainable_bytes']} | {summaries[0]['forward_calls']} | "
                     f"{np.mean([s['train_seconds'] for s in summaries]):.0f} |")
        cfg = summaries[0]["config"]
        name = f"{'small' if cfg['model'] == 'small-cnn' else 'mobile'}-{selection}-{cfg['seed']}"
        curve = [summaries[0]["zero_shot_top1"]] + [h["test_top1"] for h in history(out_root, name)]
        axis.plot(range(len(curve)), np.array(curve) * 100, marker="o", label=f"{task.split()[0]} {selection}")
    axis.set_xlabel("epoch")
    axis.set_ylabel("test top-1 (%)")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(ROOT / "docs" / "transfer.png", dpi=120)
    settings = {"small CNN": SMALL, "MobileNetV2": MOBILE}
    lines += ["", "![test top-1 vs epoch](transfer.png)", "", "Settings (ours, not tuned per method): "
              + "; ".join(f"{k}: {json.dumps(v)}" for k, v in settings.items()), "", END]
    text = DOC.read_text() if DOC.exists() else "# Results\n\nEvery number here was measured by the script named in its section.\n"
    section = "\n".join(lines)
    text = text[:text.index(BEGIN)] + section + text[text.index(END) + len(END):] if BEGIN in text else text.rstrip() + "\n\n" + section + "\n"
    DOC.write_text(text)
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
