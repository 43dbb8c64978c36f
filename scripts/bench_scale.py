"""Measure the scale-out features on this machine and write the numbers into docs/scale.md.

1. Sweep: the same grid of training runs with ``--executor local`` (2 worker processes), ``--executor ray``
   (a local 2-CPU Ray) and serially (1 process, the baseline): wall time of each and whether the runs'
   integers agree (they must: same seeds, same code).
2. Fleets: Flower simulations of devices on non-IID data, seeds-only exchange against FedAvg of the
   trained integers: accuracy and bytes per round, on MNIST (label split) and on spoken keywords (one
   voice per device).

Writes docs/scale.json (everything measured) and the section between the bench_scale markers in
docs/scale.md. Usage: python scripts/bench_scale.py [--quick] [--only sweep|fleet] [--out DIR]
(--quick: tiny sizes, to check the script; its numbers are not the ones to publish; --fleets NAME...:
simulate only these fleets, keeping the others' numbers).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

from doc_sections import write_section

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SWEEP = """
[base]
model = "small-cnn"
dataset = "mnist"
bits = "w16a8"
budget = "8KB"
probe_samples = 100
train_samples = {train}
test_samples = 500
epochs = {epochs}
batch_size = 8
m = 4
space = "real"
eps = 0.01
lr = 3.0
lr_scale = "dimension"
[grid]
selection = ["trady", "last-layer"]
seed = [0, 1]
"""

MNIST_TASK = dict(model="small-cnn", dataset="mnist", bits="w16a8", budget="8KB", probe_samples=100, train_samples=2000,
                  test_samples=2000, batch_size=8, m=4, space="real", eps=0.01, lr=3.0, lr_scale="dimension",
                  selection="trady")

FLEETS = {
    "mnist-labels": dict(train=MNIST_TASK, fleet=dict(clients=5, rounds=10, split="labels")),
    "mnist-labels-short-rounds": dict(train=MNIST_TASK, fleet=dict(clients=5, rounds=20, local_steps=8, split="labels")),
    "keywords-voices": dict(train=dict(model="audio-cnn", dataset="keywords", bits="w16a8", budget="8KB", batch_size=10,
                                       m=4, space="real", eps=0.01, lr=3.0, lr_scale="dimension", selection="trady",
                                       calibration_samples=100, rgn_samples=100),
                            fleet=dict(clients=5, rounds=30, split="voices")),
}


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def today() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def load() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


def bench_sweep(out: Path, quick: bool) -> dict:
    from fwdgrad.compare import compare

    load_start = load()
    grid = out / "sweep.toml"
    grid.write_text(SWEEP.format(train=200 if quick else 1000, epochs=1 if quick else 10))
    # Untimed warm-up: numba's on-disk kernel cache, the data set and RGN caches are built once here, so the
    # first timed executor does not pay for what the others then reuse.
    warmup = out / "sweep-warmup.toml"
    warmup.write_text(SWEEP.format(train=200 if quick else 1000, epochs=1).replace("seed = [0, 1]", "seed = [0]"))
    shutil.rmtree(out / "sweep-warmup", ignore_errors=True)
    compare(warmup, out / "sweep-warmup", workers=1)
    timings, digests = {}, {}
    for name, executor, workers in (("serial", "local", 1), ("local", "local", 2), ("ray", "ray", 2)):
        target = out / f"sweep-{name}"
        shutil.rmtree(target, ignore_errors=True)
        print(f"sweep with {name} ({executor}, {workers} workers), load {load()}", flush=True)
        started = time.perf_counter()
        _, results = compare(grid, target, workers=workers, executor=executor)
        timings[name] = time.perf_counter() - started
        failed = [r["error"] for r in results if "error" in r]
        if failed:
            raise RuntimeError(f"sweep with {name} failed: {failed}")
        digests[name] = [r["summary"]["weights_sha256"] for r in results]
        timings[f"{name}_train_seconds"] = sum(r["summary"]["train_seconds"] for r in results)
    return {"runs": len(digests["serial"]), "seconds": timings, "load": [load_start, load()], "date": today(),
            "speedup_local_vs_serial": timings["serial"] / timings["local"],
            "speedup_ray_vs_serial": timings["serial"] / timings["ray"],
            "speedup_ray_vs_local": timings["local"] / timings["ray"],
            "same_integers": digests["serial"] == digests["local"] == digests["ray"]}


def bench_fleets(out: Path, quick: bool, names: list[str]) -> dict:
    from fwdgrad.fleet import load_fleet, run_fleet

    results = {}
    for name in names:
        spec = FLEETS[name]
        train, fleet = dict(spec["train"]), dict(spec["fleet"])
        if quick:
            if "train_samples" in train:
                train.update(train_samples=300, test_samples=200)
            fleet.update(rounds=2, local_steps=3)
        cfg, fleet_cfg = load_fleet(None, train, fleet)
        print(f"fleet {name}, load {load()}", flush=True)
        load_start = load()
        result = run_fleet(cfg, fleet_cfg, out / f"fleet-{name}")
        results[name] = {"clients": fleet_cfg.clients, "rounds": fleet_cfg.rounds, "split": fleet_cfg.split,
                         "local_steps": result["local_steps"], "m": cfg.m, "device_samples": result["device_samples"],
                         "trainable_weights": result["trainable_weights"],
                         "simulation_seconds": result["simulation_seconds"], "load": [load_start, load()],
                         "date": today(),
                         "protocols": {p: {k: v for k, v in r.items() if k != "rounds"}
                                       for p, r in result["protocols"].items()},
                         "top1_per_round": {p: [r["test_top1"] for r in v["rounds"] if "test_top1" in r]
                                            for p, v in result["protocols"].items()}}
    return results


def markdown(result: dict) -> str:
    lines = [f"Measured by `python scripts/bench_scale.py` on {result['machine']} ({result['cpus']} cores). Other "
             "jobs shared the machine: each section gives the load average (1, 5, 15 min) at its start and end; "
             "wall times are indicative, bytes and accuracies are not affected.", ""]
    sweep = result.get("sweep")
    if sweep:
        s = sweep["seconds"]
        lines += ["### Sweep: the same grid on three executors", "",
                  f"{sweep['runs']} training runs (small CNN, MNIST, TraDy and last-layer, 2 seeds), "
                  f"{sweep['date']}, load {sweep['load'][0]} -> {sweep['load'][1]}, after an untimed warm-up run that "
                  "fills numba's kernel cache and the data and RGN caches. The serial process runs numba's kernels on "
                  "every core; each worker of the other two runs them on its share (one core here), so the speed-up "
                  "is that of runs side by side over threads within a run.", "",
                  "| executor | workers | wall s | speed-up vs serial | sum of runs' train s |", "|---|---|---|---|---|",
                  f"| serial (local, 1 process) | 1 | {s['serial']:.0f} | 1.00 | {s['serial_train_seconds']:.0f} |",
                  f"| local processes | 2 | {s['local']:.0f} | {sweep['speedup_local_vs_serial']:.2f} | "
                  f"{s['local_train_seconds']:.0f} |",
                  f"| ray (local instance, 2 CPUs) | 2 | {s['ray']:.0f} | {sweep['speedup_ray_vs_serial']:.2f} | "
                  f"{s['ray_train_seconds']:.0f} |", "",
                  f"Ray over local processes: **{sweep['speedup_ray_vs_local']:.2f}x**. Same final integers on all "
                  f"three: **{'yes' if sweep['same_integers'] else 'NO'}**.", ""]
    for name, fleet in result.get("fleets", {}).items():
        lines += [f"### Fleet `{name}`", "",
                  f"{fleet['clients']} devices, split `{fleet['split']}` (training samples per device "
                  f"{fleet['device_samples']}), {fleet['rounds']} rounds of {fleet['local_steps']} local steps "
                  f"(m = {fleet['m']}), {fleet['trainable_weights']} trained integers per round; simulation "
                  f"{fleet['simulation_seconds']:.0f} s for both protocols ({fleet['date']}, load "
                  f"{fleet['load'][0]} -> {fleet['load'][1]}).", "",
                  "| protocol | zero-shot top-1 | final top-1 | best round top-1 | uplink payload B/round | "
                  "downlink payload B/round | uplink messages B/round | downlink messages B/round | copies in sync |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for protocol, p in fleet["protocols"].items():
            lines.append(f"| {protocol} | {100 * p['zero_shot_top1']:.1f} | {100 * p['final_top1']:.1f} | "
                         f"{100 * max(fleet['top1_per_round'][protocol]):.1f} | "
                         f"{p['uplink_payload_bytes_per_round']:.0f} | {p['downlink_payload_bytes_per_round']:.0f} | "
                         f"{p['uplink_message_bytes_per_round']:.0f} | {p['downlink_message_bytes_per_round']:.0f} | "
                         f"{'yes' if p['in_sync'] else 'NO'} |")
        seeds, weights = fleet["protocols"].get("seeds"), fleet["protocols"].get("weights")
        if seeds and weights:
            ratio = weights["uplink_payload_bytes_per_round"] / seeds["uplink_payload_bytes_per_round"]
            per_step = seeds["uplink_payload_bytes_per_round"] / fleet["clients"] / fleet["local_steps"]
            lines += ["", f"Uplink payload: weights / seeds = **{ratio:.0f}x**; per device and step the seed "
                          f"protocol sends {per_step:.0f} bytes."]
        lines.append("")
    return "\n".join(lines)


def write_docs(result: dict, docs: Path) -> None:
    begin, end = "<!-- bench_scale:begin -->", "<!-- bench_scale:end -->"
    write_section(docs / "scale.md", f"{begin}\n{markdown(result)}\n{end}", begin, end, new_page="# Scale\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (checks the script; do not publish)")
    parser.add_argument("--only", choices=["sweep", "fleet"])
    parser.add_argument("--fleets", nargs="+", choices=list(FLEETS), default=list(FLEETS),
                        help="which fleets to simulate (the others keep their numbers in docs/scale.json)")
    parser.add_argument("--out", default="/tmp/fwdgrad-bench-scale", help="scratch directory for the runs")
    parser.add_argument("--docs", default=str(ROOT / "docs"), help="where scale.md and scale.json go")
    args = parser.parse_args()
    out, docs = Path(args.out), Path(args.docs)
    out.mkdir(parents=True, exist_ok=True)
    result = {"machine": cpu_name(), "cpus": os.cpu_count(), "quick": args.quick}
    previous = docs / "scale.json"
    if (args.only or args.fleets != list(FLEETS)) and previous.exists():  # keep the other numbers
        result = json.loads(previous.read_text()) | result
    if args.only in (None, "sweep"):
        result["sweep"] = bench_sweep(out, args.quick)
    if args.only in (None, "fleet"):
        fleets = bench_fleets(out, args.quick, args.fleets)
        result["fleets"] = {name: (fleets.get(name) or result.get("fleets", {}).get(name)) for name in FLEETS
                            if name in fleets or name in result.get("fleets", {})}
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "scale.json").write_text(json.dumps(result, indent=2))
    write_docs(result, docs)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
