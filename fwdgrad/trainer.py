"""The forward-gradient training loop: select channels, estimate, update, evaluate, checkpoint.

A step (MeZO's shape, in the integer grid): run the graph's prefix before the first selected layer once,
draw m seeded perturbations of the selected channels, two forward calls each from the cached prefix,
then one seeded stochastic-rounding update. Every random number derives from (seed, step, ...), so a run
killed at any point resumes from its last checkpoint and ends on exactly the integers an uninterrupted
run ends on. Checkpoints are written atomically (temp file + rename; the state file last).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from quant.graph import QGraph, check_input_shape

from .channels import Selection, selection_bytes, selection_count
from .config import TrainConfig
from .estimators import Estimate, estimate
from .loss import LOSS_FRACTION_BITS, cross_entropy, integer_cross_entropy, top1
from .data.split import TrainData
from .perturb import integer_limits, perturbation_units, selection_masks
from .rundir import (atomic_write_bytes, atomic_write_json, load_checkpoint, read_json, save_checkpoint, save_graph,
                     weights_digest)
from .selection import ChannelSampler, channel_rgn, channel_rgn_zo, preselect_layers
from .update import apply_update, learning_rate


def evaluate(graph: QGraph, weights: dict, x: np.ndarray, y: np.ndarray, backend: str, batch_size: int = 256) -> tuple[float, float]:
    """(mean loss, top-1) of the graph with ``weights`` on a data set."""
    losses, correct = [], 0
    for start in range(0, len(x), batch_size):
        logits = graph.forward(x[start:start + batch_size], weights=weights, backend=backend)
        losses.append(cross_entropy(logits, graph.output_params, y[start:start + batch_size]) * len(logits))
        correct += top1(logits, y[start:start + batch_size]) * len(logits)
    return float(sum(losses) / len(x)), float(correct / len(x))


class Trainer:
    def __init__(self, graph: QGraph, data: TrainData, config: TrainConfig, out: str | Path):
        self.graph, self.data, self.config = graph, data, config
        self.out = Path(out)
        self.ckpt = self.out / "checkpoint"
        self.limits = integer_limits(graph)
        self._units = (None, {})
        self.budget_note = None
        self.steps_per_epoch = -(-len(data.x_train) // config.batch_size)
        self.total_steps = self.steps_per_epoch * config.epochs
        check_input_shape(data.x_train.shape, graph.metadata.get("input_shape"), graph.input_name, "x_train")
        self.node_macs = list(graph.macs((1,) + data.x_train.shape[1:]).values())  # per sample
        classes = graph.shapes((1,) + data.x_train.shape[1:])[graph.output_name][-1]
        if (top := int(max(np.max(data.y_train), np.max(data.y_test)))) >= classes:
            raise ValueError(f"labels go up to {top} but the model has "
                             f"{classes} outputs: give it a head with one output per class")

    def step_macs(self, selection: Selection, calls: int) -> tuple[int, int]:
        """(MACs a step computes with the shared prefix, MACs of ``calls`` full passes), per sample."""
        first = min(self.graph.index(name) for name in selection)
        prefix, suffix = sum(self.node_macs[:first]), sum(self.node_macs[first:])
        return prefix + calls * suffix, calls * (prefix + suffix)

    progress_label = "zo-train"

    def evaluate(self, weights: dict, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        return evaluate(self.graph, weights, x, y, self.config.backend)

    def check_device(self, selection: Selection | None = None) -> None:
        """Refuse a run the target device cannot hold: first for the worst selection the budget allows
        (before any work), then for each selection drawn. Caching the prefix is preferred; recomputing
        it is the fallback that needs less memory."""
        from devices.planner import budget_shape, require_fit, selection_shape
        from devices.profiles import load_profile
        from quant.convert import parse_bits

        cfg = self.config
        profile = load_profile(cfg.device)
        if profile.sram_bytes is None and profile.flash_bytes is None:
            return
        sample = self.data.x_train.shape[1:]
        method = "zo" if cfg.method == "zo" else "bp"
        if selection:
            shape = selection_shape(self.graph, selection, m=cfg.m, batch=cfg.batch_size, momentum=cfg.momentum > 0,
                                    bias=cfg.train_bias)
        else:
            shape = budget_shape(self.graph, sample, cfg.budget_bytes, method=method, m=cfg.m, batch=cfg.batch_size,
                                 momentum=cfg.momentum > 0, bits=parse_bits(cfg.bits)[0])
        try:
            require_fit(self.graph, sample, profile, shape, method)
        except ValueError:
            shape.cache_prefix = False
            require_fit(self.graph, sample, profile, shape, method)

    def integer_weights(self, weights: dict) -> dict:
        """The trained state as the graph's integers (the ZO trainer already trains integers)."""
        return weights

    def deployed_top1(self, weights: dict, top1: float) -> float:
        """Test top-1 of the integers a device would run, given the trainer's own ``top1`` of ``weights``
        (the same number here: forward gradients train the integers themselves)."""
        return top1

    # ---- state ----------------------------------------------------------------------------------------
    def initial_weights(self) -> dict:
        """Every layer's weights and bias (trained or not, so a checkpoint is the whole model)."""
        return {k: v.copy() for n in self.graph.weighted_nodes() for k, v in ((n.weight_key, n.weight),
                                                                               (n.bias_key, n.bias))}

    def save(self, state: dict, weights: dict, momentum: dict) -> None:
        save_checkpoint(self.ckpt, state, weights, momentum)

    def load(self) -> tuple[dict, dict, dict]:
        return load_checkpoint(self.out)

    # ---- channel selection ----------------------------------------------------------------------------
    def sampler(self) -> ChannelSampler:
        cfg = self.config
        rgn = preselected = None
        if cfg.selection in ("trady", "s-topk-random", "s-det-rgn", "d-det-rgn"):
            rgn = self.layer_rgn()
            preselected = preselect_layers(rgn)
        return ChannelSampler(self.graph, cfg.selection, cfg.budget_bytes, cfg.seed, preselected, rgn, cfg.train_bias)

    def layer_rgn(self) -> dict[str, np.ndarray]:
        """Channel RGN of this model on this task's first ``rgn_samples`` training samples, kept in the cache
        and copied into OUT/rgn.json with the run. From the PyTorch float twin, or from forward-only estimates
        where torch is not installed. The cache key is everything the numbers depend on (architecture,
        weights, samples): keyed by architecture alone, the layers a run trains would depend on which task
        happened to fill the cache first, and two machines would train different channels from one seed."""
        n = min(self.config.rgn_samples, len(self.data.x_train))
        x, y = self.data.x_train[:n], self.data.y_train[:n]
        key = hashlib.sha256("|".join([architecture_digest(self.graph), weights_digest(self.initial_weights()),
                                       hashlib.sha256(x.tobytes() + y.tobytes()).hexdigest()]).encode())
        path = rgn_cache_dir() / f"{key.hexdigest()[:16]}.json"
        if not path.exists():
            try:
                import torch  # noqa: F401  (the twin needs it)
                rgn, source = channel_rgn(self.graph, x, y), "pytorch-twin"
            except ImportError:
                rgn, source = channel_rgn_zo(self.graph, x, y, backend=self.config.backend), "zo-estimate"
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path, {"source": source, "rgn": {k: v.tolist() for k, v in rgn.items()}})
        stored = json.loads(path.read_text())
        atomic_write_json(self.out / "rgn.json", stored)
        return {k: np.array(v) for k, v in stored["rgn"].items()}

    def period_of(self, step: int) -> int:
        every = self.config.resample_every
        return step // every if every else step // self.steps_per_epoch

    # ---- the loop -------------------------------------------------------------------------------------
    def run(self, resume: bool = False) -> dict:
        cfg, graph, data = self.config, self.graph, self.data
        self.check_device()
        self.ckpt.mkdir(parents=True, exist_ok=True)
        sources = cfg.source_fingerprints()
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
        sampler = self.sampler()
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
                          "step_macs_per_sample": self.step_macs(selection, calls)[0],
                          "full_pass_macs_per_sample": self.step_macs(selection, calls)[1],
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

    def step(self, weights, momentum, masks, selection: Selection, x, y, step: int) -> tuple[float, int]:
        """One forward-gradient step; updates ``weights`` (and ``momentum``) in place.

        Returns the mean loss of the perturbed calls and the number of forward calls made."""
        cfg = self.config
        est, seed = self.gradient(weights, masks, selection, x, y, step)
        new = apply_update(self.graph, weights, est, self.learning_rate(step), cfg.eps, self.limits, seed,
                           momentum if cfg.momentum > 0 else None, cfg.momentum)
        weights.update(new)
        return float(np.mean(est.losses)), est.forward_calls

    def gradient(self, weights, masks, selection: Selection, x, y, step: int) -> tuple[Estimate, int]:
        """The step's estimate and its seed. The seed regenerates every perturbation and the rounding noise,
        so (seed, projected gradients) is the whole update: a fleet device uploads only that."""
        cfg, graph = self.config, self.graph
        first = min(graph.index(name) for name in selection)
        start = graph.nodes[first].name
        cache = graph.prefix(x, until=start, weights=weights, backend=cfg.backend)

        loss_fn = cross_entropy if cfg.loss == "float" else integer_loss

        def loss_at(w):
            return loss_fn(graph.forward(cache, start=start, weights=w, backend=cfg.backend), graph.output_params, y)

        seed = step_seed(cfg.seed, step)
        if self._units[0] is not masks:  # integer steps per unit of eps: once per selection
            self._units = (masks, perturbation_units(graph, masks, cfg.space))
        est = estimate(loss_at, weights, masks, self._units[1], self.limits, step_seed=seed, m=cfg.m, eps=cfg.eps,
                       distribution=cfg.distribution, method=cfg.estimator, rho=cfg.rho)
        return est, seed

    def learning_rate(self, step: int) -> float:
        """The update size of ``step`` for the current selection (after ``gradient`` drew it)."""
        return step_learning_rate(self.config, step, self.total_steps, self._units[1])

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
                   "budget_note": self.budget_note,
                   "train_seconds": state["train_seconds"], "config": self.config.to_dict(),
                   "sources": state.get("sources", {}), "weights_sha256": weights_digest(weights)}
        atomic_write_json(self.out / "summary.json", summary)
        return summary


def step_seed(seed: int, step: int) -> int:
    """The seed of everything random in a step: perturbations and stochastic-rounding noise."""
    return int(np.random.default_rng([seed, 0x57E9, step]).integers(0, 2 ** 62))


def step_learning_rate(cfg: TrainConfig, step: int, total_steps: int, units: dict) -> float:
    """Schedule value at ``step``; with ``lr_scale = dimension`` divided by the number of perturbed weights
    (``units`` holds one entry per perturbed weight), since ZO's stable step shrinks like m / d."""
    lr = learning_rate(cfg.lr, cfg.schedule, step, total_steps, cfg.warmup_steps)
    if cfg.lr_scale == "dimension":
        lr /= sum(len(u) for u in units.values())
    return lr


def rgn_cache_dir() -> Path:
    root = os.environ.get("FWDGRAD_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "fwdgrad") / "rgn"


def architecture_digest(graph: QGraph) -> str:
    """Identity of an architecture at a bit width: node types, names and weight shapes (not values)."""
    parts = [graph.bits] + [f"{n.op_type}:{n.name}:{getattr(n, 'weight', np.empty(0)).shape}" for n in graph.nodes]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def integer_loss(logits_int, params, labels) -> float:
    """The integer-only loss, as the float the estimator divides (the device would keep it in Q.16)."""
    return integer_cross_entropy(logits_int, params, labels) / (1 << LOSS_FRACTION_BITS)


def check_sources(stored: dict, now: dict, out: Path) -> None:
    """Refuse to continue a run on a model or data file that changed since it started."""
    for kind in ("model", "data"):
        if stored.get(kind) != now.get(kind):
            raise ValueError(f"the {kind} file of the run in {out} changed since it started (sha256 "
                             f"{str(stored.get(kind))[:12]}..., now {str(now.get(kind))[:12]}...): restore it, or "
                             f"train into a new --out")
