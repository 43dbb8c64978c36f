"""The training loop: select channels each period, step, evaluate each epoch, checkpoint, summarize.

The step itself is ``fwdgrad.zo_step.ZOStep`` (forward gradients, the head's exact gradient) or the
backprop reference's (``fwdgrad.backprop``); device fit is ``fwdgrad.fit``, layer ranking
``fwdgrad.ranking``, the files ``fwdgrad.rundir``. Every random number derives from (seed, step, ...), so a
run killed at any point resumes from its last checkpoint and ends on exactly the integers an uninterrupted
run ends on. Checkpoints are written atomically (temp file + rename; the state file last).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from quant.graph import QGraph, check_input_shape

from .channels import Selection, selection_bytes, selection_count
from .config import TrainConfig
from .data.split import TrainData
from .fit import check_device
from .loss import cross_entropy, top1
from .perturb import selection_masks
from .ranking import layer_rgn
from .rundir import (atomic_write_bytes, atomic_write_json, load_checkpoint, read_json, save_checkpoint, save_graph,
                     weights_digest)
from .selection import ChannelSampler, channel_rgn, preselect_layers
from .zo_step import ZOStep


def evaluate(graph: QGraph, weights: dict, x: np.ndarray, y: np.ndarray, backend: str, batch_size: int = 256) -> tuple[float, float]:
    """(mean loss, top-1) of the graph with ``weights`` on a data set."""
    losses, correct = [], 0
    for start in range(0, len(x), batch_size):
        logits = graph.forward(x[start:start + batch_size], weights=weights, backend=backend)
        losses.append(cross_entropy(logits, graph.output_params, y[start:start + batch_size]) * len(logits))
        correct += top1(logits, y[start:start + batch_size]) * len(logits)
    return float(sum(losses) / len(x)), float(correct / len(x))


class Trainer:
    progress_label = "zo-train"

    def __init__(self, graph: QGraph, data: TrainData, config: TrainConfig, out: str | Path):
        self.graph, self.data, self.config = graph, data, config
        self.out = Path(out)
        self.ckpt = self.out / "checkpoint"
        self.budget_note = None
        self.steps_per_epoch = -(-len(data.x_train) // config.batch_size)
        self.total_steps = self.steps_per_epoch * config.epochs
        check_input_shape(data.x_train.shape, graph.metadata.get("input_shape"), graph.input_name, "x_train")
        self.node_macs = list(graph.macs((1,) + data.x_train.shape[1:]).values())  # per sample
        classes = graph.shapes((1,) + data.x_train.shape[1:])[graph.output_name][-1]
        if (top := int(max(np.max(data.y_train), np.max(data.y_test)))) >= classes:
            raise ValueError(f"labels go up to {top} but the model has "
                             f"{classes} outputs: give it a head with one output per class")
        self.zo = ZOStep(graph, config, self.total_steps)

    @property
    def limits(self) -> dict:
        return self.zo.limits

    @property
    def reserved(self) -> list[str]:
        """Layers every selection trains whole: the head, when its gradient is exact."""
        return [self.zo.head.name] if self.zo.head is not None else []

    def step(self, weights, momentum, masks, selection: Selection, x, y, step: int) -> tuple[float, int]:
        """One step; updates ``weights`` (and ``momentum``) in place; (mean loss, forward calls)."""
        return self.zo(weights, momentum, masks, x, y, step)

    def step_macs(self, masks: dict, calls: int) -> tuple[int, int]:
        """(MACs a step computes with the shared prefix, MACs of ``calls`` full passes), per sample."""
        first = self.graph.index(self.zo.start(masks))
        prefix, suffix = sum(self.node_macs[:first]), sum(self.node_macs[first:])
        return prefix + calls * suffix, calls * (prefix + suffix)

    def evaluate(self, weights: dict, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        return evaluate(self.graph, weights, x, y, self.config.backend)

    def check_device(self, selection: Selection | None = None) -> None:
        layers = [n.name for n in (self.zo.head, self.zo.last.node if self.zo.last else None) if n is not None]
        check_device(self.graph, self.data.x_train.shape[1:], self.config, selection, tuple(layers))

    def integer_weights(self, weights: dict) -> dict:
        """The trained state as the graph's integers (the ZO trainer already trains integers)."""
        return weights

    def deployed_top1(self, weights: dict, top1: float) -> float:
        """Test top-1 of the integers a device would run, given the trainer's own ``top1`` of ``weights``
        (the same number here: forward gradients train the integers themselves)."""
        return top1

    # ---- state ----------------------------------------------------------------------------------------
    def initial_weights(self) -> dict:
        """Every layer's weights and bias (trained or not, so a checkpoint is the whole model): the graph's own
        read-only arrays, which updates replace rather than edit, so that the kernels' packings of the layers
        a run never trains are the graph's, made once."""
        return {k: v for n in self.graph.weighted_nodes() for k, v in ((n.weight_key, n.weight), (n.bias_key, n.bias))}

    def save(self, state: dict, weights: dict, momentum: dict) -> None:
        save_checkpoint(self.ckpt, state, weights, momentum)

    def load(self) -> tuple[dict, dict, dict]:
        return load_checkpoint(self.out)

    # ---- channel selection ----------------------------------------------------------------------------
    def sampler(self) -> ChannelSampler:
        cfg = self.config
        rgn = preselected = None
        if cfg.selection in ("trady", "s-topk-random", "s-det-rgn", "d-det-rgn"):
            n = min(cfg.rgn_samples, len(self.data.x_train))
            rgn = layer_rgn(self.graph, self.initial_weights(), self.data.x_train[:n], self.data.y_train[:n], self.out,
                            cfg.backend)
            preselected = preselect_layers(rgn)
        preferred = [self.zo.last.node.name] if self.zo.last is not None else []
        return ChannelSampler(self.graph, cfg.selection, cfg.budget_bytes, cfg.seed, preselected, rgn, cfg.train_bias,
                              self.reserved, preferred)

    def period_of(self, step: int) -> int:
        every = self.config.resample_every
        return step // every if every else step // self.steps_per_epoch

    # ---- the loop -------------------------------------------------------------------------------------
    def run(self, resume: bool = False) -> dict:
        cfg, graph, data = self.config, self.graph, self.data
        self.check_device()
        self.ckpt.mkdir(parents=True, exist_ok=True)
        sources = cfg.source_fingerprints()
        sampler = self.sampler()  # a budget it cannot fill is refused before any checkpoint exists
        if resume:
            state, weights, momentum = self.load()
            if state["config_digest"] != cfg.digest():
                stored = read_json(self.out / "config.json", "run configuration")
                raise ValueError(f"{self.out} holds a run of another configuration{cfg.changes_from(stored)}: "
                                 f"resume it with its own settings (config.json), or train into a new --out")
            check_sources(state.get("sources", {}), sources, self.out)
            # rows written after the checkpoint (a kill between the two) are replayed, not repeated
            atomic_write_bytes(self.out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in state["history"]).encode())
        else:
            atomic_write_json(self.out / "config.json", cfg.to_dict())
            save_graph(self.ckpt, graph)
            weights, momentum = self.initial_weights(), {}
            zero_loss, zero_top1 = self.evaluate(weights, data.x_test, data.y_test)
            state = {"step": 0, "forward_calls": 0, "epochs_done": 0, "history": [], "config_digest": cfg.digest(),
                     "zero_shot_top1": zero_top1, "zero_shot_loss": zero_loss, "train_seconds": 0.0,
                     "integer_zero_shot_top1": self.deployed_top1(weights, zero_top1), "sources": sources}
            (self.out / "metrics.jsonl").write_text("")
            self.save(state, weights, momentum)
        self.report_budget(sampler)
        if "selection" in state:  # resuming inside a selection period: keep that period's channels
            period = state["period"]
            selection = {k: np.array(v, dtype=np.int64) for k, v in state["selection"].items()}
        else:
            period, selection = None, None
        masks = selection_masks(graph, selection, cfg.train_bias) if selection else None
        epoch_losses = list(state.get("epoch_losses", []))
        started = time.perf_counter() - state["train_seconds"]
        bar = tqdm(total=self.total_steps, initial=state["step"], desc=self.progress_label, unit="step", disable=None)
        while state["step"] < self.total_steps:
            step = state["step"]
            if self.period_of(step) != period:
                period = self.period_of(step)
                rgn_now = channel_rgn(graph, data.x_train[:cfg.rgn_samples], data.y_train[:cfg.rgn_samples],
                                      self.integer_weights(weights)) if cfg.selection == "d-det-rgn" else None
                selection = sampler.select(period, rgn_now)
                self.check_device(selection)
                momentum = {}  # newly selected channels start from rest
                state["period"], state["selection"] = period, {k: v.tolist() for k, v in selection.items()}
                masks = selection_masks(graph, selection, cfg.train_bias)
            batch = self.batch_indices(step)
            try:  # the checkpoint on disk predates this step: it stays good whatever the step did
                loss, calls = self.step(weights, momentum, masks, selection, data.x_train[batch],
                                        data.y_train[batch], step)
                if not np.isfinite(loss):
                    raise FloatingPointError("the loss is NaN/inf: lower --lr (--bp-lr for backprop) or --eps")
            except FloatingPointError as err:
                kept = read_json(self.ckpt / "state.json", "checkpoint")["step"]
                raise FloatingPointError(f"training diverged at step {step + 1} of {self.total_steps}: {err}; "
                                         f"the last checkpoint (step {kept}) is kept in {self.ckpt}; train again "
                                         f"into a new --out with the lower setting") from err
            epoch_losses.append(loss)
            state["step"] += 1
            state["forward_calls"] += calls
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
            if state["step"] % self.steps_per_epoch == 0:
                state["epochs_done"] += 1
                test_loss, test_top1 = self.evaluate(weights, data.x_test, data.y_test)
                record = {"epoch": state["epochs_done"], "train_loss": float(np.mean(epoch_losses)),
                          "test_loss": test_loss, "test_top1": test_top1,
                          "integer_top1": self.deployed_top1(weights, test_top1), "forward_calls": state["forward_calls"],
                          "selected_channels": selection_count(selection),
                          "step_macs_per_sample": self.step_macs(masks, calls)[0],
                          "full_pass_macs_per_sample": self.step_macs(masks, calls)[1],
                          "trainable_bytes": selection_bytes(graph, selection, cfg.momentum > 0, cfg.train_bias),
                          "wall_seconds": time.perf_counter() - started}
                state["history"].append(record)
                with open(self.out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
                epoch_losses = []
            if state["step"] % self.steps_per_epoch == 0 or (cfg.checkpoint_every and state["step"] % cfg.checkpoint_every == 0):
                state["train_seconds"] = time.perf_counter() - started
                state["epoch_losses"] = epoch_losses
                self.save(state, weights, momentum)
        bar.close()
        return self.summarize(state, weights)

    def batch_indices(self, step: int) -> np.ndarray:
        """The training samples of ``step``: a seeded permutation per epoch, cut into batches."""
        epoch, index = divmod(step, self.steps_per_epoch)
        order = np.random.default_rng([self.config.seed, 0xDA7A, epoch]).permutation(len(self.data.x_train))
        return order[index * self.config.batch_size:(index + 1) * self.config.batch_size]

    def report_budget(self, sampler: ChannelSampler) -> None:
        """Say at the start when the layers a selection may draw from hold less than the budget: the run
        then trains all of them, and a larger budget would change nothing."""
        available = sampler.available_bytes()
        if self.config.selection not in ("all", "last-layer") and available < self.config.budget_bytes:
            layers = sampler.layers()
            self.budget_note = (f"the {len(layers)} layer(s) {self.config.selection} draws from ({', '.join(layers)}) "
                                f"hold {available} trainable bytes, less than the {self.config.budget_bytes}-byte "
                                f"budget: every epoch trains all of them, and a larger --budget changes nothing")
            tqdm.write(f"note: {self.budget_note}", file=sys.stderr)

    def summarize(self, state: dict, weights: dict) -> dict:
        history = state["history"]
        zero = state.get("integer_zero_shot_top1", state["zero_shot_top1"])
        summary = {"zero_shot_top1": state["zero_shot_top1"],
                   "final_top1": history[-1]["test_top1"] if history else state["zero_shot_top1"],
                   "best_top1": max([h["test_top1"] for h in history] + [state["zero_shot_top1"]]),
                   "integer_zero_shot_top1": zero,
                   "integer_top1": history[-1].get("integer_top1", history[-1]["test_top1"]) if history else zero,
                   "integer_best_top1": max([h.get("integer_top1", h["test_top1"]) for h in history] + [zero]),
                   "epochs": state["epochs_done"], "forward_calls": state["forward_calls"],
                   "trainable_bytes": max([h["trainable_bytes"] for h in history], default=0),
                   "budget_bytes": self.config.budget_bytes,
                   "budget_used_bytes": max([h["trainable_bytes"] for h in history], default=0),
                   "budget_note": self.budget_note, "head_update": self.zo.head_update,
                   "train_seconds": state["train_seconds"], "config": self.config.to_dict(),
                   "sources": state.get("sources", {}), "weights_sha256": weights_digest(weights)}
        atomic_write_json(self.out / "summary.json", summary)
        return summary


def check_sources(stored: dict, now: dict, out: Path) -> None:
    """Refuse to continue a run on a model or data file that changed since it started."""
    for kind in ("model", "data"):
        if stored.get(kind) != now.get(kind):
            raise ValueError(f"the {kind} file of the run in {out} changed since it started (sha256 "
                             f"{str(stored.get(kind))[:12]}..., now {str(now.get(kind))[:12]}...): restore it, or "
                             f"train into a new --out")
