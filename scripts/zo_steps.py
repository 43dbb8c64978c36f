"""How many steps do forward gradients need? The last layer of the MNIST task, in float, ZO vs backprop.

The integer runs in docs/results.md move slowly. This separates the estimator from the arithmetic: the
head of the fmnist-to-mnist task (the probe layer on the quantized small CNN's frozen features, read from
the integer engine and dequantized) is trained in float64 by
- SPSA, m = 4 Gaussian perturbations, eps = 0.01, the step lr / d (d = the head's weights and biases, as
  `lr_scale = "dimension"` does), cosine schedule: each step is 2m = 8 loss evaluations;
- SGD with the exact gradient, same batches and schedule.
for several step budgets (one run per budget: the cosine schedule depends on it), batch 8, one seed.
Top-1 on the task's 2000 test images against forward calls, as a table between markers in docs/method.md
and a plot, docs/zo_steps.png.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from tqdm import tqdm

from doc_sections import write_section

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "method.md"
BEGIN, END = "<!-- zo_steps:begin -->", "<!-- zo_steps:end -->"


def head_problem(cache_dir: Path):
    """(train features, train labels, test features, test labels, W0, b0) of the task's head, in float."""
    from fwdgrad.config import TrainConfig
    from fwdgrad.task import prepare_data, prepare_graph
    from fwdgrad.trainer import Trainer
    from quant.tensor import dequantize

    cfg = TrainConfig(model="small-cnn", dataset="mnist", selection="last-layer", probe_samples=100,
                      train_samples=2000, test_samples=2000, bits="w16a8")
    data = prepare_data(cfg)
    graph = prepare_graph(cfg, data, cache_dir)
    weights = Trainer(graph, data, cfg, cache_dir).initial_weights()
    head = graph.weighted_nodes()[-1]
    source = head.inputs[0]

    def features(x):
        env = graph.prefix(x, until=head.name, weights=weights)
        return dequantize(env[source], graph.params_of(source)).reshape(len(x), -1).astype(np.float64)

    w0 = weights[head.weight_key].astype(np.float64) * head.w_params.scale.reshape(-1, 1)
    b0 = weights[head.bias_key].astype(np.float64) * head.w_params.scale * graph.params_of(source).scale
    return features(data.x_train), data.y_train, features(data.x_test), data.y_test, w0, b0


def loss_and_gradient(w, b, x, y):
    logits = x @ w.T + b
    logits -= logits.max(1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(1, keepdims=True)
    loss = -np.mean(np.log(p[np.arange(len(y)), y] + 1e-12))
    p[np.arange(len(y)), y] -= 1
    p /= len(y)
    return loss, p.T @ x, p.sum(0)


def train(problem, method: str, lr: float, steps: int, seed: int, batch: int = 8, m: int = 4, eps: float = 0.01):
    """Top-1 after ``steps`` steps of ``method`` ("zo" or "bp") from the probe head."""
    x_train, y_train, x_test, y_test, w, b = problem
    w, b = w.copy(), b.copy()
    rng = np.random.default_rng(seed)
    step_size = lr / (w.size + b.size) if method == "zo" else lr
    for t in tqdm(range(steps), desc=f"{method} {steps} steps", unit="step", leave=False, mininterval=1, disable=None):
        pick = rng.integers(0, len(x_train), batch)
        x, y = x_train[pick], y_train[pick]
        rate = step_size * 0.5 * (1 + np.cos(np.pi * t / steps))
        if method == "bp":
            _, grad_w, grad_b = loss_and_gradient(w, b, x, y)
        else:
            grad_w, grad_b = np.zeros_like(w), np.zeros_like(b)
            for _ in range(m):
                zw, zb = rng.standard_normal(w.shape), rng.standard_normal(b.shape)
                plus = loss_and_gradient(w + eps * zw, b + eps * zb, x, y)[0]
                minus = loss_and_gradient(w - eps * zw, b - eps * zb, x, y)[0]
                g = (plus - minus) / (2 * eps)
                grad_w += g * zw / m
                grad_b += g * zb / m
        w -= rate * grad_w
        b -= rate * grad_b
    return float(np.mean((x_test @ w.T + b).argmax(1) == y_test))


def write(rows: list[dict], start: float, dimension: int) -> None:
    lines = [BEGIN, "", f"Measured by `python scripts/zo_steps.py`: the head of the fmnist-to-mnist task ({dimension} "
             f"weights and biases) from its probe start, {start:.1%} top-1, trained in float64, batch 8, cosine "
             "schedule, seed 0. ZO: SPSA, m = 4, eps = 0.01, step lr / d; BP: SGD on the exact gradient.", "",
             "| method | lr | steps | forward calls | test top-1 |", "|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['lr']:g} | {r['steps']} | {r['forward_calls']} | {r['top1']:.1%} |" for r in rows]
    lines += ["", "![top-1 against forward calls](zo_steps.png)", "", END]
    section = "\n".join(lines)
    write_section(DOC, section, BEGIN, END)
    print(section)


def plot(rows: list[dict], start: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for method, lr in sorted({(r["method"], r["lr"]) for r in rows}):
        part = sorted((r for r in rows if (r["method"], r["lr"]) == (method, lr)), key=lambda r: r["steps"])
        axis.plot([r["forward_calls"] for r in part], [100 * r["top1"] for r in part], marker="o",
                  label=f"{'ZO (m=4)' if method == 'zo' else 'backprop'}, lr {lr:g}")
    axis.axhline(100 * start, color="grey", linewidth=0.8, label="probe start")
    axis.set_xscale("log")
    axis.set_xlabel("forward calls (ZO: 2m per step; BP: 1 per step)")
    axis.set_ylabel("test top-1 (%)")
    axis.set_title("MNIST head from the probe start, float64")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(ROOT / "docs" / "zo_steps.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zo-steps", type=int, nargs="+", default=[1000, 2500, 10000, 25000, 100000])
    parser.add_argument("--bp-steps", type=int, nargs="+", default=[250, 1000, 2500])
    parser.add_argument("--zo-lr", type=float, nargs="+", default=[1.0, 3.0])
    parser.add_argument("--bp-lr", type=float, nargs="+", default=[0.05, 0.2])
    parser.add_argument("--cache", default=str(ROOT / ".bench-cache" / "zo-steps"))
    args = parser.parse_args()
    problem = head_problem(Path(args.cache))
    x_test, y_test, w0, b0 = problem[2], problem[3], problem[4], problem[5]
    start = float(np.mean((x_test @ w0.T + b0).argmax(1) == y_test))
    rows = []
    for method, rates, budgets, calls in (("zo", args.zo_lr, args.zo_steps, 8), ("bp", args.bp_lr, args.bp_steps, 1)):
        for lr in rates:
            for steps in budgets:
                top1 = train(problem, method, lr, steps, seed=0)
                rows.append({"method": method, "lr": lr, "steps": steps, "forward_calls": calls * steps, "top1": top1})
                print(rows[-1], flush=True)
    write(rows, start, w0.size + b0.size)
    plot(rows, start)


if __name__ == "__main__":
    main()
