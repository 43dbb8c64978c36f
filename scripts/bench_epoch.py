"""One forward-only epoch of grid (a), timed with this tree's code and with an earlier commit's, in one run.

Grid (a) is MobileNetV2 (ImageNet) -> Fashion-MNIST at 96 px, 800 images, batch 16, TraDy under 64 KB, the
hybrid step (experiments/imagenet-to-fmnist.toml). Each side trains the same epoch (same seed, selection and
data) in its own process, in turns (before, after, before, ...), so both see the same machine; the figure
is each side's fastest ``train_seconds`` (the epoch and its test evaluation, not the data preparation) and
their ratio. The earlier code runs from a temporary ``git worktree`` of ``--before``. Writes a table to
docs/benchmarks.md (between markers).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from doc_sections import markdown_table, write_section

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench_epoch:begin -->", "<!-- bench_epoch:end -->"
SETTINGS = dict(model="mobilenetv2", dataset="fashion-mnist", resolution=96, bits="w16a8", budget="64KB",
                selection="trady", probe_samples=100, train_samples=800, test_samples=1000, calibration_samples=128,
                rgn_samples=128, epochs=1, batch_size=16, m=4, space="real", eps=0.01, lr=0.3, lr_scale="dimension",
                schedule="cosine", head_update="exact-last", seed=0)
RUN = "import json, sys; from fwdgrad.api import train; train(out=sys.argv[1], **json.loads(sys.argv[2]))"


def epoch_seconds(tree: Path, out: Path) -> float:
    """Train the epoch with the code in ``tree`` (a fresh run directory ``out``); its train_seconds."""
    env = os.environ | {"PYTHONPATH": str(tree)}
    subprocess.run([sys.executable, "-c", RUN, str(out), json.dumps(SETTINGS)], env=env, cwd=tree, check=True,
                   stdout=subprocess.DEVNULL)
    return float(json.loads((out / "summary.json").read_text())["train_seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--before", required=True, help="the commit to compare with (e.g. the last release)")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    before = subprocess.run(["git", "rev-parse", "--short", args.before], cwd=ROOT, check=True, capture_output=True,
                            text=True).stdout.strip()
    after = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, check=True, capture_output=True,
                           text=True).stdout.strip()
    times = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "before"
        subprocess.run(["git", "worktree", "add", "--detach", str(old), before], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            for r in range(args.rounds):
                for side, tree in (("before", old), ("after", ROOT)):
                    times[side].append(epoch_seconds(tree, Path(tmp) / f"{side}-{r}"))
                    print(side, times[side][-1])
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=ROOT, check=False)
    best = {side: min(t) for side, t in times.items()}
    lines = [BEGIN, "## One forward-only epoch of grid (a) (`scripts/bench_epoch.py`)", "",
             f"MobileNetV2 -> Fashion-MNIST at 96 px, 800 images, batch 16, TraDy under 64 KB, the hybrid step "
             f"(exact head and last layer, ZO on the other channels, m = 4), seed 0: one epoch and its test "
             f"evaluation, this machine ({platform.machine()}), each side's fastest of {args.rounds} runs taken "
             f"in turns.", ""]
    lines += markdown_table(["code", "epoch s", "speed-up"],
                            [[f"before ({before})", f"{best['before']:.1f}", "1.00x"],
                             [f"after ({after})", f"{best['after']:.1f}", f"{best['before'] / best['after']:.2f}x"]])
    lines += ["", END]
    write_section(DOC, "\n".join(lines), BEGIN, END)
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
