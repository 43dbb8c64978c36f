"""The backprop reference: TraDy with gradients, the setting forward-gradient results are compared against.

It shares everything with the forward-gradient trainer except the step: the same data order, the same
channel selection per period (same sampler, same seed), the same learning-rate schedule, checkpoints and
outputs (metrics.jsonl, summary.json). The step is plain SGD on the float twin of the quantized graph,
masked to the selected channels, so the only difference left in a comparison is the gradient itself.

Two variants:
- ``bp``: float32 weights and activations (what a server would do);
- ``bp-fq``: fake-quantized forward (input, weights and activations on the graph's integer grids,
  straight-through gradients), float shadow weights; evaluated by the integer engine on the rounded
  weights, so its accuracy is measured with exactly the arithmetic the ZO runs are measured with.
"""
from __future__ import annotations

import numpy as np

from quant.tensor import quantize

from .channels import Selection
from .loss import top1
from .reference import FloatTwin, float_weights
from .trainer import Trainer, evaluate
from .update import learning_rate


class BackpropTrainer(Trainer):
    progress_label = "bp-train"

    def __init__(self, graph, data, config, out):
        super().__init__(graph, data, config, out)
        self.twin = FloatTwin(graph, fake_quant=config.method == "bp-fq")

    def initial_weights(self) -> dict:
        return float_weights(self.graph)

    def integer_weights(self, weights: dict) -> dict:
        return rounded_weights(self.graph, weights)

    def deployed_top1(self, weights: dict, top1: float) -> float:
        """The float weights rounded onto the graph's grids and run by the integer engine: what the device
        would deploy, and what forward-gradient rows are compared with (bp-fq already evaluates that)."""
        if self.twin.fake_quant:
            return top1
        return evaluate(self.graph, self.integer_weights(weights), self.data.x_test, self.data.y_test,
                        self.config.backend)[1]

    def logits(self, weights: dict, x: np.ndarray, grad_keys=()):
        import torch

        params = {k: torch.tensor(v, requires_grad=k in grad_keys) for k, v in weights.items()}
        return self.twin(x, params), params

    def evaluate(self, weights: dict, x: np.ndarray, y: np.ndarray, batch_size: int = 256) -> tuple[float, float]:
        if self.twin.fake_quant:
            return evaluate(self.graph, self.integer_weights(weights), x, y, self.config.backend)
        import torch
        import torch.nn.functional as F

        loss, correct = 0.0, 0.0
        with torch.inference_mode():
            for start in range(0, len(x), batch_size):
                logits = self.logits(weights, x[start:start + batch_size])[0]
                labels = torch.as_tensor(y[start:start + batch_size])
                loss += float(F.cross_entropy(logits, labels, reduction="sum"))
                correct += top1(logits.numpy(), y[start:start + batch_size]) * len(labels)
        return loss / len(x), correct / len(x)

    def step(self, weights, momentum, masks, selection: Selection, x, y, step: int) -> tuple[float, int]:
        """One SGD step on the selected channels; one forward and one backward call."""
        import torch
        import torch.nn.functional as F

        cfg = self.config
        logits, params = self.logits(weights, x, grad_keys=masks)
        loss = F.cross_entropy(logits, torch.as_tensor(y))
        loss.backward()
        lr = learning_rate(cfg.bp_lr, cfg.schedule, step, self.total_steps, cfg.warmup_steps)
        for key, mask in masks.items():
            direction = params[key].grad.numpy() * mask
            if cfg.momentum > 0:
                momentum[key] = cfg.momentum * momentum.get(key, 0.0) + direction
                direction = momentum[key]
            weights[key] = (weights[key] - lr * direction).astype(np.float32)
        return float(loss.detach()), 1

    def step_macs(self, masks: dict, calls: int) -> tuple[int, int]:
        """Forward over the whole graph plus a backward (about twice the forward) over the trained suffix."""
        first = min(self.graph.index(key.rsplit(".", 1)[0]) for key in masks)
        prefix, suffix = sum(self.node_macs[:first]), sum(self.node_macs[first:])
        return prefix + 3 * suffix, 3 * (prefix + suffix)


def rounded_weights(graph, weights: dict) -> dict:
    """Float weights and biases rounded onto the graph's grids (what the device would store)."""
    out = {}
    for n in graph.weighted_nodes():
        out[n.weight_key] = quantize(weights[n.weight_key], n.w_params)
        bias_scale = np.float64(n.in_params.scale) * n.w_params.scale.astype(np.float64)
        limit = np.iinfo(n.bias.dtype).max
        out[n.bias_key] = np.clip(np.rint(weights[n.bias_key] / bias_scale), -limit, limit).astype(n.bias.dtype)
    return out


def trainer_for(config) -> type[Trainer]:
    """The trainer class of a configuration's ``method``."""
    return Trainer if config.method == "zo" else BackpropTrainer
