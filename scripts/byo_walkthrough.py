"""Writes docs/byo.md: a user's own model and data from `torch.onnx.export` to a verified integer file trained
on their data, every command run here and shown with the output it printed.

The user: a PyTorch CNN on 16x16 grey images (depthwise conv, residual Add, ReLU6, MaxPool, ReduceMean, a
Linear head), trained on scikit-learn's digit scans and exported with a fixed batch of 1; their device then
meets the digits with inverted contrast (x -> 1 - x), a real input shift that a new head alone cannot undo.
Their data is an .npz of float64 arrays, as numpy makes them, and the same images as a folder of PNGs.

    python scripts/byo_walkthrough.py [--work DIR]   # DIR default: a fresh temporary directory
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

MODEL_CODE = '''import torch
from torch import nn


class UserCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU())
        self.pw = nn.Conv2d(16, 16, 1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.pw(self.dw(x)))
        return self.fc(self.pool(x).mean(dim=(2, 3)))
'''

EXPORT_CODE = '''torch.onnx.export(net.eval(), torch.zeros(1, 1, 16, 16), "user.onnx", input_names=["image"],
                  output_names=["scores"], dynamo=False, opset_version=17)
np.savez("shifted.npz", x_train=1 - x[:1200], y_train=y[:1200], x_test=1 - x[1200:], y_test=y[1200:])
'''

API_CODE = '''import fwdgrad.api as fg

report = fg.quantize("user.onnx", "shifted.npz", bits="w16a8", out="user-w16a8.onnx")
print(report["table"])                                     # float and integer top-1 on the labels
run = fg.train("user-w16a8.onnx", "shifted.npz", out="runs/py-zo", epochs=10)   # forward gradients only
bp = fg.train("user.onnx", "shifted.npz", out="runs/py-bp", method="bp", epochs=10)  # the reference
print(run.summary["integer_top1"], bp.summary["integer_top1"])   # deployable integers, side by side
path = run.export("user-trained-py.onnx")                  # qop: onnxruntime computes the engine's integers
print(run.verify(path, data="shifted.npz")["mismatch"])     # [] : the file is the trained model
'''


def make_user_files(work: Path) -> None:
    """The user's model file, their data as .npz and as a folder of PNGs (what they would already have)."""
    import torch
    from PIL import Image
    from sklearn.datasets import load_digits
    from torch import nn

    namespace = {}
    exec(MODEL_CODE, namespace)  # the very code the page shows
    digits = load_digits()
    x = nn.functional.interpolate(torch.tensor(digits.images[:, None] / 16.0, dtype=torch.float32), size=16,
                                  mode="bilinear").numpy().astype(np.float64)
    y = digits.target
    order = np.random.default_rng(0).permutation(len(y))
    x, y = x[order], y[order]
    torch.manual_seed(0)
    torch.set_num_threads(2)
    net = namespace["UserCNN"]()
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(40):
        for i in range(0, 1200, 32):
            opt.zero_grad()
            batch = torch.tensor(x[i:i + 32], dtype=torch.float32)
            nn.functional.cross_entropy(net(batch), torch.tensor(y[i:i + 32])).backward()
            opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        cwd = os.getcwd()
        os.chdir(work)
        try:
            exec(EXPORT_CODE, {"torch": torch, "np": np, "net": net, "x": x, "y": y})
        finally:
            os.chdir(cwd)
    for split, part in (("train", slice(0, 1200)), ("test", slice(1200, None))):
        for i, (image, label) in enumerate(zip(1 - x[part], y[part])):
            folder = work / "images" / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray((image[0] * 255).round().astype(np.uint8)).save(folder / f"{i:04d}.png")


def run(work: Path, command: str) -> str:
    """Run one `fwdgrad ...` command line in ``work`` and return what it printed (stderr, then stdout)."""
    env = dict(os.environ, FWDGRAD_CACHE=str(work / "cache"))
    started = time.perf_counter()
    argv = [sys.executable, "-m", "fwdgrad.cli", *command.split()[1:]]
    result = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    print(f"$ {command}  ({seconds:.0f} s, exit {result.returncode})", flush=True)
    text = (result.stderr + result.stdout).strip()
    return f"```\n$ {command}\n{text}\n```\n(exit code {result.returncode}, {seconds:.0f} s)\n"


def run_python(work: Path, code: str) -> str:
    env = dict(os.environ, FWDGRAD_CACHE=str(work / "cache"))
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True)
    print(f"python API ({time.perf_counter() - started:.0f} s, exit {result.returncode})", flush=True)
    return f"```\n{(result.stderr + result.stdout).strip()}\n```\n"


EPOCHS = 10


def gains(work: Path) -> str:
    """What the two runs just made recovered, in the words of their summaries (never written by hand)."""
    zo, bp = (json.loads((work / "runs" / name / "summary.json").read_text()) for name in ("zo", "bp"))
    exact = {"exact-last": "the head's and the last 1x1 conv's exact gradients (through the residual add, the "
                           "ReLU and the max pool), ZO on the other channels",
             "exact": "the head's exact gradient, ZO on the other channels", "zo": "ZO on every channel"}
    start = zo["integer_zero_shot_top1"]
    return (f"On this model and shift, in {EPOCHS} epochs: forward-only {start:.1%} -> {zo['integer_top1']:.1%} "
            f"({exact[zo['head_update']]}), backprop {bp['integer_zero_shot_top1']:.1%} -> "
            f"{bp['integer_top1']:.1%} on its integers ({bp['final_top1']:.1%} in float).\n")


def page(work: Path) -> str:
    train = f"--model user.onnx --data shifted.npz --epochs {EPOCHS}"
    parts = [
        "# Your model, your data",
        "",
        "From `torch.onnx.export` to an integer ONNX file trained on your own data and verified in onnxruntime. "
        "Every command below was run on this machine by `python scripts/byo_walkthrough.py`, which rewrites "
        "this page; the outputs are what the commands printed (the progress bars, which only show on a "
        "terminal, aside).",
        "",
        "## 1. Your model and your data",
        "",
        "A PyTorch CNN for 16x16 grey images, trained on scikit-learn's digit scans:",
        "", "```python", MODEL_CODE.rstrip(), "```", "",
        "exported as it usually is (here with a fixed batch of 1, which fwdgrad handles), with the data the "
        "device will meet: the same digits with inverted contrast, saved as numpy's float64 arrays:",
        "", "```python", EXPORT_CODE.rstrip(), "```", "",
        "What fwdgrad reads: a float ONNX classifier with one input, (N, C, H, W) or (N, F), and one logits "
        "output; an `.npz` with `x_train, y_train, x_test, y_test` (optionally `x_calibration`) in the model's "
        "input format (float32; float64 and uint8 are converted and the conversion is said), or a folder of "
        "class folders of images (ImageFolder: `DIR/<class>/*.png`, or `DIR/train/<class>/` and "
        "`DIR/test/<class>/`). Everything is checked against the model's declared input before any work.",
        "",
        "## 2. Quantize, and see what the integers cost",
        "", run(work, "fwdgrad quantize user.onnx --data shifted.npz --bits w8a8 w16a8"),
        "The file `quantize --out` writes is the model training starts from (same calibration, same "
        "equalization default as `train`), and `verify-onnx` checks any file fwdgrad wrote on its own:",
        "", run(work, "fwdgrad quantize user.onnx --data shifted.npz --bits w16a8 --out user-w16a8.onnx"),
        run(work, "fwdgrad verify-onnx user-w16a8.onnx --data shifted.npz"),
        "## 3. Will training fit the chip?",
        "", run(work, "fwdgrad plan --model user-w16a8.onnx --device cortex-m4 --budget 8KB"),
        "## 4. Train with forward calls only, and with backprop for reference",
        "",
        "Forward gradients with the default settings (TraDy channels under an 8 KB budget, w16a8, the "
        "exact gradients its forward calls give: the head's, and the last 1x1 conv's), then the backprop reference on the same channels, "
        "data order and schedule; both report the top-1 of the integers a device would run "
        "(`integer_top1`):",
        "", run(work, f"fwdgrad train {train} --out runs/zo"),
        run(work, f"fwdgrad train {train} --out runs/bp --method bp"),
        gains(work),
        "A killed run continues from its last checkpoint with `fwdgrad train --resume runs/zo` and ends on the "
        "same integers.",
        "",
        "## 5. Take it to the edge",
        "", run(work, "fwdgrad export runs/zo --format qop --out user-trained.onnx"),
        run(work, "fwdgrad verify-onnx user-trained.onnx --data shifted.npz"),
        "`verify-onnx` exits 1 when the file is not the model that was trained: an edited graph, other "
        "initializers, or onnxruntime integers that differ where the format computes the engine's exactly.",
        "",
        "## 6. The same from a folder of images",
        "", run(work, f"fwdgrad train --model user.onnx --data images --epochs {EPOCHS} --out runs/folder"),
        "## 7. From Python",
        "", "```python", API_CODE.rstrip(), "```", "", run_python(work, API_CODE),
        "## 8. When something is wrong",
        "",
        "Each mistake is one line that says what is wrong and how to fix it, exit code 2:",
        "",
        run(work, "fwdgrad train --model user.onnx --data digits --out runs/bad"),
        run(work, "fwdgrad verify-onnx user.onnx --data shifted.npz"),
    ]
    return "\n".join(parts) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", help="working directory (default: a fresh temporary one)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="fwdgrad-byo-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"working in {work}")
    make_user_files(work)
    text = page(work)
    (Path(__file__).resolve().parents[1] / "docs" / "byo.md").write_text(text)
    print("wrote docs/byo.md")


if __name__ == "__main__":
    main()
