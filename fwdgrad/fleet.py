"""`fwdgrad fleet`: N devices fine-tune one deployed integer model on their own data, in Flower's simulation.

Each device (a Flower ClientApp on a Ray actor) holds its own non-IID slice of the training data
(``fwdgrad.partition``) and a copy of the global integer weights. A round: the server sends the round's
channel selection and last round's aggregate; every device brings its copy up to date, reports the digest
of its integers (so divergence between copies is caught, not assumed away), runs ``local_steps``
forward-gradient steps with the trainer's own step (``Trainer.gradient``), and uploads either its
(seed, projected gradient) pairs or its trained channels (``fwdgrad.exchange``). The server aggregates,
evaluates the global model on the test set and counts the bytes both ways: the update payload (the arrays
the protocol needs) and Flower's serialized messages (payload plus metadata, the selection and the checks).

Both protocols run in one simulation over the same devices, data, selections and local training, so their
accuracy and traffic compare like for like. The learning-rate schedule spans ``rounds * local_steps``.
Everything is seeded: devices' step seeds derive from (seed, device), their batch order from their seed.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from quant.serialize import rebuild

from .config import TrainConfig, read_settings_file
from .exchange import (PROTOCOLS, SeedSteps, as_sent, average_values, fold_exact, payload_bytes, replay,
                       set_values, trained_values)
from .partition import SPLITS, client_indices
from .perturb import selection_masks
from .data.split import TrainData
from .rundir import atomic_write_bytes, atomic_write_json, npz_bytes, read_json, read_npz, save_graph, weights_digest
from .trainer import Trainer, evaluate
from .node_perturbation import OUTPUTS
from .update import apply_update

FLWR_INSTALL = "pip install 'flwr[simulation]==1.41.0' (or pip install -e '.[test]', which installs it)"


@dataclass
class FleetConfig:
    clients: int = 3
    rounds: int = 5
    local_steps: int = 0  # forward-gradient steps per device per round; 0 = one pass over the smallest device's data
    split: str = "labels"  # labels | voices | iid (fwdgrad.partition)
    protocols: list[str] = field(default_factory=lambda: list(PROTOCOLS))
    cpus: int = 2  # Ray CPUs for the simulation; each device holds one while it trains

    def __post_init__(self):
        if self.split not in SPLITS:
            raise ValueError(f"unknown split {self.split!r}: use one of {', '.join(SPLITS)}")
        bad = [p for p in self.protocols if p not in PROTOCOLS]
        if bad or not self.protocols:
            raise ValueError(f"unknown protocols {bad}: use {' and/or '.join(PROTOCOLS)}")
        for name in ("clients", "rounds", "cpus"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.local_steps < 0:
            raise ValueError(f"local_steps must be >= 0, got {self.local_steps}")


def load_fleet(path: str | Path | None, train_overrides: dict | None = None,
               fleet_overrides: dict | None = None) -> tuple[TrainConfig, FleetConfig]:
    """A fleet file: a ``[train]`` table (TrainConfig settings) and a ``[fleet]`` table (FleetConfig)."""
    spec = {}
    if path:
        spec = read_settings_file(path, ("train", "fleet"))
    known = set(FleetConfig.__dataclass_fields__)
    fleet_values = spec.get("fleet", {}) | (fleet_overrides or {})
    unknown = sorted(set(fleet_values) - known)
    if unknown:
        raise ValueError(f"unknown fleet settings {unknown}; known: {sorted(known)}")
    cfg = TrainConfig.from_dict(spec.get("train", {}) | (train_overrides or {}))
    fleet = FleetConfig(**fleet_values)
    check_fleet(cfg)
    return cfg, fleet


def check_fleet(cfg: TrainConfig) -> None:
    """Refuse settings the fleet does not implement, before any work."""
    if cfg.method != "zo":
        raise ValueError(f"a fleet trains with forward gradients: method = 'zo', not {cfg.method!r}")
    if cfg.momentum:
        raise ValueError("a fleet replays plain SGD steps: set momentum = 0 (momentum state would have to travel)")
    if cfg.zo_params == OUTPUTS:
        raise ValueError("a fleet replays steps from seeds, and node perturbation's step needs each device's inputs: "
                         "use zo_params = 'weights' or 'scale-bias'")
    if cfg.selection == "d-det-rgn":
        raise ValueError("selection d-det-rgn needs gradients of the global model on all data: use trady or another")


def device_seed(seed: int, device: int) -> int:
    """Each device's own seed (its perturbations and batch order), derived from the run's seed."""
    return int(np.random.default_rng([seed, 0xF1EE7, device]).integers(0, 2 ** 31))


# ---- the device side (runs in Ray actors) -----------------------------------------------------------------

class Device:
    """What stays on a device: its data and a trainer over it (the weights travel through Flower's state)."""

    def __init__(self, setup: dict, k: int):
        cfg = TrainConfig.from_dict(setup["config"])
        x, y = setup["clients"][k]
        self.config = replace(cfg, seed=device_seed(cfg.seed, k))
        self.graph, self.x, self.y = setup["graph"], x, y
        self.trainer = Trainer(self.graph, TrainData(x, y, x[:1], y[:1]), self.config, Path(setup["dir"]) / f"device-{k}")
        # the schedule spans every round's local steps
        self.trainer.total_steps = self.trainer.zo.total_steps = setup["total_steps"]
        self.local_steps = setup["local_steps"]

    def local_round(self, weights: dict, masks: dict, round_: int) -> tuple[dict, dict, float]:
        """``local_steps`` forward-gradient steps from ``weights``: the new weights, the seeds upload (the
        steps as (seed, g) pairs, and with the exact head the sum of its integer steps), and the mean loss.
        The local update applies the float32 g's that travel."""
        zo = self.trainer.zo
        seeds, projected, losses = [], [], []
        exact_sum = {k: np.zeros(weights[k].shape, np.int64) for k in zo.exact_keys}
        for j in range(self.local_steps):
            step = round_ * self.local_steps + j
            batch = self.trainer.batch_indices(step)
            est, seed, exact = zo.gradient(weights, masks, self.x[batch], self.y[batch], step)
            est = as_sent(est)
            if est.perturbations:
                weights = apply_update(self.graph, weights, est, zo.learning_rate(step), self.config.eps, zo.limits,
                                       seed)
            before = {k: weights[k].astype(np.int64) for k in exact_sum}
            weights = dict(weights)
            zo.apply_exact(weights, exact, step, seed)
            for k in exact_sum:
                exact_sum[k] += weights[k].astype(np.int64) - before[k]
            seeds.append(seed)
            projected.append(est.projected)
            losses.append(float(np.mean(est.losses)))
        upload = {"seeds": np.array(seeds, np.int64), "projected": np.array(projected, np.float32)}
        upload |= {f"exact:{k}": v.astype(np.int32) for k, v in exact_sum.items()}
        return weights, upload, float(np.mean(losses))


def fold_seeds(zo, weights: dict, masks: dict, aggregate: dict, first_step: int, total_steps: int) -> dict:
    """Every device's round of steps replayed onto ``weights`` (their seeds in device order, each at lr / N),
    then the mean of their exact layers' steps: what the server and every device compute alike."""
    directions = zo.directions(masks, weights)
    devices = len(aggregate["seeds"])
    for c in range(devices):
        weights = replay(zo.graph, weights, directions, zo.limits, zo.config,
                         SeedSteps(aggregate["seeds"][c], aggregate["projected"][c]), first_step, total_steps,
                         1.0 / devices)
    steps = {key[len("exact:"):]: values for key, values in aggregate.items() if key.startswith("exact:")}
    return fold_exact(weights, steps, zo.limits)


def write_setup(folder: Path, graph, values: dict, clients: list) -> None:
    """What every device needs, as data (the graph's description, JSON, .npz): nothing a device reads can
    run code."""
    folder.mkdir(parents=True, exist_ok=True)
    save_graph(folder, graph)
    atomic_write_bytes(folder / "clients.npz", npz_bytes({f"{kind}{k}": v for k, (x, y) in enumerate(clients)
                                                          for kind, v in (("x", x), ("y", y))}))
    atomic_write_json(folder / "setup.json", values | {"clients": len(clients)})


def read_setup(folder: Path) -> dict:
    values = read_json(folder / "setup.json", "fleet setup")
    arrays = read_npz(folder / "clients.npz", "fleet setup")
    return values | {"graph": rebuild(read_json(folder / "graph.json", "fleet setup"), read_npz(folder / "graph.npz")),
                     "clients": [(arrays[f"x{k}"], arrays[f"y{k}"]) for k in range(values["clients"])]}


_SETUPS: dict[str, dict] = {}
_DEVICES: dict[tuple[str, int], Device] = {}


def _device(setup_path: str, k: int) -> Device:
    """One Device per (fleet, device) per actor process: data and compiled kernels stay warm across rounds."""
    if setup_path not in _SETUPS:
        _SETUPS[setup_path] = read_setup(Path(setup_path))
    if (setup_path, k) not in _DEVICES:
        _DEVICES[(setup_path, k)] = Device(_SETUPS[setup_path], k)
    return _DEVICES[(setup_path, k)]


def _arrays(record) -> dict[str, np.ndarray]:
    return {key: array.numpy() for key, array in record.items()}


def _record(arrays: dict[str, np.ndarray]):
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({key: Array(np.ascontiguousarray(value)) for key, value in arrays.items()})


def _selection(record) -> dict[str, np.ndarray]:
    return {name: values.astype(np.int64) for name, values in _arrays(record).items()}


def device_round(message, context):
    """A device's round: apply last round's aggregate to its copy, report the copy's digest, train, upload."""
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

    config = message.content["config"]
    k = int(context.node_config["partition-id"])
    device = _device(str(config["setup"]), k)
    protocol, round_ = str(config["protocol"]), int(config["round"])
    weights_key, selection_key = f"{protocol}.weights", f"{protocol}.selection"
    graph, cfg = device.graph, device.config
    weights = _arrays(context.state[weights_key]) if weights_key in context.state else device.trainer.initial_weights()
    if round_ > 0:  # last round's aggregate, on last round's selection
        masks = selection_masks(graph, _selection(context.state[selection_key]), cfg.train_bias)
        aggregate = _arrays(message.content["aggregate"])
        if protocol == "seeds":
            weights = fold_seeds(device.trainer.zo, weights, masks, aggregate, (round_ - 1) * device.local_steps,
                                 device.trainer.total_steps)
        else:
            weights = set_values(weights, masks, aggregate)
    reply = {"config": ConfigRecord({"device": k, "digest": weights_digest(weights)})}
    context.state[weights_key] = _record(weights)
    if not bool(config["sync_only"]):
        selection = _selection(message.content["selection"])
        context.state[selection_key] = message.content["selection"]
        masks = selection_masks(graph, selection, cfg.train_bias)
        trained, seeds, loss = device.local_round(weights, masks, round_)
        upload = seeds if protocol == "seeds" else trained_values(trained, masks)
        reply |= {"update": _record(upload), "metrics": MetricRecord({"loss": loss})}
    return Message(RecordDict(reply), reply_to=message)


def _client_app():
    from flwr.clientapp import ClientApp

    app = ClientApp()
    app.train()(device_round)
    return app


# ---- the server side (runs in this process, in Flower's server thread) -----------------------------------

def message_bytes(message) -> int:
    """Bytes of a Flower message as serialized for transport (every object in its tree, once)."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())


@dataclass
class Plan:
    """Everything the server knows before the first round."""

    graph: object
    config: TrainConfig
    fleet: FleetConfig
    data: TrainData
    selections: list[dict]
    setup_path: str
    local_steps: int
    results: dict = field(default_factory=dict)
    error: BaseException | None = None


def _server(plan: Plan):
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def main(grid, context) -> None:
        try:
            nodes = _wait_for_nodes(grid, plan.fleet.clients)
            for protocol in plan.fleet.protocols:
                plan.results[protocol] = _run_protocol(grid, nodes, plan, protocol)
        except BaseException as err:  # Flower runs this in a thread: hand the error to run_fleet
            plan.error = err

    return app


def _wait_for_nodes(grid, count: int, timeout: float = 300.0) -> list[int]:
    start = time.monotonic()
    while len(nodes := sorted(grid.get_node_ids())) < count:
        if time.monotonic() - start > timeout:
            raise RuntimeError(f"only {len(nodes)} of {count} simulated devices registered in {timeout:.0f} s")
        time.sleep(0.1)
    return nodes


def _send(grid, nodes, plan: Plan, protocol: str, round_: int, aggregate: dict | None, sync_only: bool):
    from flwr.app import ConfigRecord, Message, RecordDict

    content = {"config": ConfigRecord({"setup": plan.setup_path, "protocol": protocol, "round": round_,
                                       "devices": len(nodes), "sync_only": sync_only})}
    if not sync_only:
        content["selection"] = _record({k: v.astype(np.int32) for k, v in plan.selections[round_].items()})
    if aggregate is not None:
        content["aggregate"] = _record(aggregate)
    messages = [Message(RecordDict(dict(content)), dst_node_id=node, message_type="train",
                        group_id=f"{protocol}-{round_}") for node in nodes]
    sent = sum(message_bytes(m) for m in messages)
    replies = list(grid.send_and_receive(messages))
    failed = [r.error.reason for r in replies if r.has_error()]
    if failed or len(replies) != len(nodes):
        raise RuntimeError(f"{protocol} round {round_}: {len(failed)} device(s) failed "
                           f"({len(replies)} of {len(nodes)} replied): {failed[:1]}")
    replies.sort(key=lambda r: int(r.content["config"]["device"]))
    return replies, sent, sum(message_bytes(r) for r in replies)


def _run_protocol(grid, nodes, plan: Plan, protocol: str) -> dict:
    cfg, graph, data = plan.config, plan.graph, plan.data
    trainer = Trainer(graph, data, cfg, Path(plan.setup_path).parent)
    weights, devices = trainer.initial_weights(), len(nodes)
    total_steps = plan.fleet.rounds * plan.local_steps
    zero_loss, zero_top1 = evaluate(graph, weights, data.x_test, data.y_test, cfg.backend)
    rounds, aggregate, started = [], None, time.perf_counter()
    for round_ in tqdm(range(plan.fleet.rounds + 1), desc=f"fleet {protocol}", unit="round", disable=None):
        sync_only = round_ == plan.fleet.rounds  # devices fetch the final model; nobody trains
        downlink = payload_bytes(aggregate) * devices if aggregate is not None else 0
        replies, sent, received = _send(grid, nodes, plan, protocol, round_, aggregate, sync_only)
        digest = weights_digest(weights)
        in_sync = all(str(r.content["config"]["digest"]) == digest for r in replies)
        if not in_sync:
            raise RuntimeError(f"{protocol} round {round_}: a device's integers differ from the server's")
        record = {"round": round_, "in_sync": in_sync, "downlink_payload_bytes": downlink,
                  "downlink_message_bytes": sent, "uplink_message_bytes": received}
        if sync_only:
            rounds.append(record | {"uplink_payload_bytes": 0})
            continue
        masks = selection_masks(graph, plan.selections[round_], cfg.train_bias)
        uploads = [_arrays(r.content["update"]) for r in replies]
        if protocol == "seeds":
            aggregate = {key: np.stack([u[key] for u in uploads]) for key in uploads[0]}
            weights = fold_seeds(trainer.zo, weights, masks, aggregate, round_ * plan.local_steps, total_steps)
        else:
            aggregate = average_values(uploads)
            weights = set_values(weights, masks, aggregate)
        test_loss, test_top1 = evaluate(graph, weights, data.x_test, data.y_test, cfg.backend)
        rounds.append(record | {"uplink_payload_bytes": sum(payload_bytes(u) for u in uploads),
                                "train_loss": float(np.mean([float(r.content["metrics"]["loss"]) for r in replies])),
                                "test_loss": test_loss, "test_top1": test_top1,
                                "wall_seconds": time.perf_counter() - started})
    trained = [r for r in rounds if "test_top1" in r]
    return {"zero_shot_top1": zero_top1, "zero_shot_loss": zero_loss, "final_top1": trained[-1]["test_top1"],
            "rounds": rounds, "weights_sha256": weights_digest(weights), "in_sync": all(r["in_sync"] for r in rounds),
            "uplink_payload_bytes_per_round": float(np.mean([r["uplink_payload_bytes"] for r in trained])),
            "downlink_payload_bytes_per_round": sum(r["downlink_payload_bytes"] for r in rounds) / len(trained),
            "uplink_message_bytes_per_round": float(np.mean([r["uplink_message_bytes"] for r in trained])),
            "downlink_message_bytes_per_round": sum(r["downlink_message_bytes"] for r in rounds) / len(trained),
            "seconds": time.perf_counter() - started}


def run_fleet(cfg: TrainConfig, fleet: FleetConfig, out: str | Path) -> dict:
    """Prepare the task as ``fwdgrad train`` would, split its data over the devices, simulate every protocol,
    and write ``OUT/fleet.json`` and ``OUT/report.md``."""
    from . import task
    from .executors import import_ray, start_local_ray

    check_fleet(cfg)
    try:
        from flwr.simulation import run_simulation
    except ImportError as err:
        from .executors import MissingDependency

        raise MissingDependency(f"fwdgrad fleet needs Flower's simulation engine, which is not installed: "
                                f"{FLWR_INSTALL}") from err
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = task.prepare_data(cfg)
    graph = task.prepare_graph(cfg, data, out)
    parts = client_indices(cfg, data.y_train, fleet.clients, fleet.split)
    local_steps = fleet.local_steps or -(-min(len(p) for p in parts) // cfg.batch_size)
    sampler = Trainer(graph, data, cfg, out).sampler()
    selections = [sampler.select(round_) for round_ in range(fleet.rounds)]  # period = round
    setup_path = out / "fleet-setup"
    write_setup(setup_path, graph, {"config": cfg.to_dict(), "dir": str(out), "local_steps": local_steps,
                                    "total_steps": fleet.rounds * local_steps},
                [(data.x_train[p], data.y_train[p]) for p in parts])
    plan = Plan(graph, cfg, fleet, data, selections, str(setup_path.resolve()), local_steps)
    ray = import_ray()
    if ray.is_initialized():
        raise RuntimeError("Ray is already running in this process: the fleet starts its own (ray.shutdown() first)")
    started = time.perf_counter()
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    flwr_logger.setLevel(logging.ERROR)  # Flower's INFO lines and its run_simulation deprecation notice
    try:
        start_local_ray(fleet.cpus)
        run_simulation(server_app=_server(plan), client_app=_client_app(), num_supernodes=fleet.clients,
                       backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    finally:
        flwr_logger.setLevel(level)
        if ray.is_initialized():
            ray.shutdown()
    if plan.error is not None:
        raise plan.error
    missing = [p for p in fleet.protocols if p not in plan.results]
    if missing:
        raise RuntimeError(f"the simulation ended without results for {missing} (see Flower's log above)")
    result = {"config": cfg.to_dict(), "fleet": asdict(fleet), "local_steps": local_steps,
              "device_samples": [int(len(p)) for p in parts],
              "device_classes": [sorted(int(c) for c in np.unique(data.y_train[p])) for p in parts],
              "trainable_weights": int(sum(m.sum() for m in selection_masks(graph, selections[0], cfg.train_bias).values())),
              "simulation_seconds": time.perf_counter() - started, "protocols": plan.results}
    atomic_write_json(out / "fleet.json", result)
    write_report(result, out)
    return result


def write_report(result: dict, out: Path) -> Path:
    """OUT/report.md: accuracy and traffic of each protocol, and a plot of top-1 against uplink bytes."""
    from .compare import _pyplot

    fleet, protocols = result["fleet"], result["protocols"]
    lines = ["# Fleet", "", f"{fleet['clients']} devices, split `{fleet['split']}` (samples per device "
             f"{result['device_samples']}), {fleet['rounds']} rounds of {result['local_steps']} local "
             f"forward-gradient steps (m = {result['config']['m']}), {result['trainable_weights']} trained "
             "integers per round. Bytes per round, summed over devices: payload = the arrays the protocol "
             "needs; messages = Flower's serialized messages (payload, metadata, the selection, checks).", "",
             "| protocol | zero-shot top-1 | final top-1 | uplink payload B/round | downlink payload B/round | "
             "uplink messages B/round | downlink messages B/round | copies in sync |", "|---|---|---|---|---|---|---|---|"]
    for name, p in protocols.items():
        lines.append(f"| {name} | {100 * p['zero_shot_top1']:.1f} | {100 * p['final_top1']:.1f} | "
                     f"{p['uplink_payload_bytes_per_round']:.0f} | {p['downlink_payload_bytes_per_round']:.0f} | "
                     f"{p['uplink_message_bytes_per_round']:.0f} | {p['downlink_message_bytes_per_round']:.0f} | "
                     f"{'yes' if p['in_sync'] else 'NO'} |")
    plt = _pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, p in protocols.items():
        trained = [r for r in p["rounds"] if "test_top1" in r]
        top1 = [100 * p["zero_shot_top1"]] + [100 * r["test_top1"] for r in trained]
        axes[0].plot(range(len(top1)), top1, marker="o", label=name)
        uplink = np.cumsum([r["uplink_payload_bytes"] for r in trained])
        axes[1].plot(uplink, top1[1:], marker="o", label=name)
    axes[0].set_xlabel("round")
    axes[1].set_xlabel("cumulative uplink payload (bytes, all devices)")
    axes[1].set_xscale("log")
    for axis in axes:
        axis.set_ylabel("global test top-1 (%)")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out / "fleet.png", dpi=120)
    plt.close(figure)
    lines += ["", "![top-1 per round and per uplink byte](fleet.png)"]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report
