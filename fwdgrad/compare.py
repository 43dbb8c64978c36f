"""`fwdgrad compare`: a grid of training runs, run in parallel, summarised in one report.

A grid file (TOML) has three parts:

    [base]            # TrainConfig settings shared by every run
    model = "small-cnn"
    dataset = "mnist"
    [grid]            # lists: every combination is a row (seeds are repetitions of a row, not rows)
    selection = ["trady", "all"]
    seed = [0, 1, 2]
    [[row]]           # optional named rows, each crossed with the grid: the paper-style table
    name = "BP fp32 full"
    method = "bp"
    selection = "all"

Every run writes its own directory (``DIR/runs/<row>-seed<k>``) like ``fwdgrad train`` does, so a finished
run is reused and a killed one resumes; a run that fails is reported with its error, never dropped.
Runs execute in worker processes here or as Ray tasks (``fwdgrad.executors``); results.json is the same.
"""
from __future__ import annotations

import itertools
import json
import re
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import TrainConfig, read_settings_file
from .executors import make_executor


@dataclass(frozen=True)
class RunSpec:
    row: str
    settings: dict  # TrainConfig fields

    @property
    def seed(self) -> int:
        return int(self.settings.get("seed", 0))

    @property
    def dirname(self) -> str:
        return f"{re.sub(r'[^A-Za-z0-9.]+', '-', self.row).strip('-').lower()}-seed{self.seed}"


def load_grid(path: str | Path) -> list[RunSpec]:
    """The runs of a grid file, validated up front (a typo fails before hours of training)."""
    spec = read_settings_file(path, ("base", "grid", "row"))
    base, grid, rows = spec.get("base", {}), dict(spec.get("grid", {})), spec.get("row", [{}])
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"{path}: [grid] {key} must be a non-empty list, e.g. {key} = [{json.dumps(values)}]")
    seeds = grid.pop("seed", [base.get("seed", 0)])
    runs = []
    for row in rows:
        overrides = {k: v for k, v in row.items() if k != "name"}
        for combo in itertools.product(*grid.values()):
            varied = dict(zip(grid, combo))
            label = " ".join(filter(None, [row.get("name", ""), " ".join(f"{k}={v}" for k, v in varied.items())]))
            for seed in seeds:
                settings = base | overrides | varied | {"seed": seed}
                TrainConfig.from_dict(settings)  # validates names and values now
                runs.append(RunSpec(label or "run", settings))
    dirs = [r.dirname for r in runs]
    clashes = sorted({d for d in dirs if dirs.count(d) > 1})
    if clashes:
        raise ValueError(f"{path}: rows {clashes} would share a run directory: give the rows distinct names")
    return runs


def run_one(settings: dict, out: str) -> dict:
    """Train one configuration into ``out``: reuse it if finished, resume it if killed."""
    from .backprop import trainer_for
    from .locks import run_writer
    from .rundir import load_graph
    from .task import prepare_data, prepare_graph

    out = Path(out)
    cfg = TrainConfig.from_dict(settings)
    with run_writer(out):
        summary = finished_summary(settings, out)
        if summary is not None:
            return summary
        resume = (out / "checkpoint" / "state.json").exists()
        data = prepare_data(cfg)
        graph = load_graph(out) if resume else prepare_graph(cfg, data, out)
        return trainer_for(cfg)(graph, data, cfg, out).run(resume=resume)


def finished_summary(settings: dict, out: str | Path) -> dict | None:
    """The summary of the finished run of ``settings`` in ``out``, or None if it has not finished."""
    summary_path = Path(out) / "summary.json"
    if not summary_path.exists():
        return None
    summary = json.loads(summary_path.read_text())
    wanted = TrainConfig.from_dict(settings)
    if TrainConfig.from_dict(summary["config"]).digest() != wanted.digest():
        raise ValueError(f"{out} holds a run of another configuration{wanted.changes_from(summary['config'])}: "
                         f"delete it or use another compare --out")
    return summary


def _run_safely(settings: dict, out: str) -> dict:
    try:
        return {"summary": run_one(settings, out)}
    except Exception as err:  # reported in results.json and report.md, and the command fails
        return {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}


def run_grid(runs: list[RunSpec], out: Path, workers: int = 1, executor: str = "local",
             address: str | None = None, job=None) -> list[dict]:
    """Every run's result (``summary`` or ``error``, and ``attempts``: 0 for a finished run reused), in grid
    order. Finished runs are read here; the others go to the executor (``fwdgrad.executors``), which calls
    ``job(settings, out)`` (default: train the run; a picklable stand-in lets tests train a tiny model)."""
    out = Path(out)
    jobs = [(r.settings, str(out / "runs" / r.dirname)) for r in runs]
    results: list[dict | None] = [None] * len(runs)
    todo = []
    for i, (settings, run_dir) in enumerate(jobs):
        try:
            summary = finished_summary(settings, run_dir)
        except ValueError as err:
            results[i] = {"error": f"ValueError: {err}", "attempts": 0}
            continue
        if summary is None:
            todo.append(i)
        else:
            results[i] = {"summary": summary, "attempts": 0}
    if todo:
        done = make_executor(executor, workers, address).run(job or _run_safely, [jobs[i] for i in todo],
                                                              desc="compare")
        for i, result in zip(todo, done):
            results[i] = result
    return [{"row": r.row, "seed": r.seed, "dir": str(out / "runs" / r.dirname)} | result
            for r, result in zip(runs, results)]


def _mean_std(values) -> str:
    values = np.asarray(values, dtype=float) * 100
    return f"{values.mean():.1f} ± {values.std():.1f}" if len(values) > 1 else f"{values[0]:.1f}"


def _rows(results: list[dict]) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {}
    for result in results:
        rows.setdefault(result["row"], []).append(result)
    return rows


def write_report(results: list[dict], out: Path) -> Path:
    """DIR/report.md (table + plots) and DIR/results.json."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    lines = ["# Comparison", "", "Top-1 on the test set (%), mean ± std over seeds, of the integers a device "
             "runs: a backprop row's float weights rounded onto the graph's grids and run by the engine, beside "
             "its float top-1. Device memory: the planned peak SRAM of ZO training and of backprop with the "
             "run's last channel selection, batch 1, on the run's `device` profile (`devices/planner.py`).", "",
             "| row | seeds | zero-shot | final | best | BP float final | forward calls | trainable bytes | "
             "ZO memory KB | BP memory KB | train s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    memory = {}
    failures = []
    for row, items in _rows(results).items():
        done = [r["summary"] for r in items if "summary" in r]
        failures += [r for r in items if "error" in r]
        if not done:
            lines.append(f"| {row} | 0 of {len(items)} | failed | | | | | | | | |")
            continue
        memory[row] = planned_memory(next(r["dir"] for r in items if "summary" in r))
        backprop = done[0]["config"]["method"] != "zo"
        lines.append(f"| {row} | {len(done)} | {_mean_std([integer(s, 'zero_shot') for s in done])} | "
                     f"{_mean_std([integer(s, 'final') for s in done])} | "
                     f"{_mean_std([integer(s, 'best') for s in done])} | "
                     f"{_mean_std([s['final_top1'] for s in done]) if backprop else ''} | "
                     f"{int(np.mean([s['forward_calls'] for s in done]))} | {done[0]['trainable_bytes']} | "
                     f"{memory[row]['zo'] / 1024:.1f} | {memory[row]['bp'] / 1024:.1f} | "
                     f"{np.mean([s['train_seconds'] for s in done]):.0f} |")
    _plot_curves(results, out / "accuracy_vs_epoch.png")
    lines += ["", "![test top-1 vs epoch](accuracy_vs_epoch.png)"]
    if _plot_budgets(results, out / "accuracy_vs_budget.png"):
        lines += ["", "![test top-1 vs memory budget](accuracy_vs_budget.png)"]
    if memory:
        _plot_memory(memory, out / "memory.png")
        lines += ["", "![planned device memory](memory.png)"]
    if failures:
        lines += ["", "## Failed runs", ""] + [f"- `{r['dir']}`: {r['error']}" for r in failures]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def integer(summary: dict, which: str) -> float:
    """A run's ``zero_shot`` / ``final`` / ``best`` top-1 of its deployable integers (summaries written
    before fwdgrad reported them hold only the trainer's own number, which for ZO runs is the same)."""
    key = "integer_top1" if which == "final" else f"integer_{which}_top1"
    return summary.get(key, summary[f"{which}_top1"])


def planned_memory(run_dir: str, device: str | None = None) -> dict:
    """What a finished run costs on a device (its own ``device`` profile, or ``device``): the planned peak
    bytes of ZO training, backprop and inference for its last selection at batch 1, and the estimated
    seconds and joules of all its steps at its own batch size (forward-gradient steps for a ZO run, with
    its exact updates; backprop steps for a BP run)."""
    from devices.planner import plan, selection_shape
    from devices.profiles import load_profile

    from .rundir import load_checkpoint, load_graph
    from .fit import node_layers
    from .zo_step import exact_layers

    cfg = TrainConfig.from_dict(json.loads((Path(run_dir) / "config.json").read_text()))
    graph = load_graph(run_dir)
    state, _, _ = load_checkpoint(run_dir)
    selection = {k: np.array(v) for k, v in state["selection"].items()}
    sample, profile = tuple(graph.metadata["input_shape"][1:]), load_profile(device or cfg.device)
    head, last = exact_layers(graph, cfg.head_update) if cfg.method == "zo" else (None, None)
    exact = tuple(n.name for n in (head, last.node if last else None) if n is not None)
    shapes = {batch: selection_shape(graph, selection, m=cfg.m, batch=batch, momentum=cfg.momentum > 0,
                                     bias=cfg.train_bias) for batch in (1, cfg.batch_size)}
    for shape in shapes.values():
        shape.exact_layers = exact
        shape.node_layers = node_layers(cfg, selection, exact)
    memory, cost = plan(graph, sample, profile, shapes[1]), plan(graph, sample, profile, shapes[cfg.batch_size])
    kind = "zo" if cfg.method == "zo" else "bp"
    return {"zo": memory.zo_peak, "bp": memory.bp_peak, "inference": memory.inference_peak,
            "device": profile.name, "train_seconds": getattr(cost, f"{kind}_step_seconds") * state["step"],
            "train_joules": getattr(cost, f"{kind}_step_joules") * state["step"]}


def _plot_memory(memory: dict, path: Path) -> None:
    """Bars: planned inference, ZO and backprop peak per row."""
    figure, axis = _pyplot().subplots(figsize=(7, 4.5))
    rows = list(memory)
    positions = np.arange(len(rows))
    for i, key in enumerate(["inference", "zo", "bp"]):
        axis.bar(positions + (i - 1) * 0.27, [memory[r][key] / 1024 for r in rows], 0.27,
                 label={"inference": "inference", "zo": "ZO training", "bp": "backprop"}[key])
    axis.set_xticks(positions, rows, rotation=30, ha="right", fontsize=7)
    axis.set_ylabel("planned peak memory (KB)")
    _save(figure, axis, path)


def _history(run_dir: str) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, axis, path: Path) -> None:
    if axis.get_legend_handles_labels()[0]:  # a grid whose runs all failed plots nothing to label
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    _pyplot().close(figure)


def _plot_curves(results: list[dict], path: Path) -> None:
    """Mean test top-1 per epoch of every row (epoch 0 is the zero-shot start)."""
    figure, axis = _pyplot().subplots(figsize=(7, 4.5))
    for row, items in _rows(results).items():
        curves = [[r["summary"]["zero_shot_top1"]] + [h["test_top1"] for h in _history(r["dir"])]
                  for r in items if "summary" in r]
        if curves:
            length = min(len(c) for c in curves)
            axis.plot(range(length), np.mean([c[:length] for c in curves], axis=0) * 100, marker="o", label=row)
    axis.set_xlabel("epoch")
    axis.set_ylabel("test top-1 (%)")
    _save(figure, axis, path)


def _plot_budgets(results: list[dict], path: Path) -> bool:
    """Final top-1 against the memory budget, one line per (method, selection), when budgets vary."""
    from .config import parse_bytes

    points: dict[str, dict[int, list[float]]] = {}
    for r in results:
        if "summary" in r:
            cfg = r["summary"]["config"]
            key = f"{cfg['method']} {cfg['bits']} {cfg['selection']}"
            points.setdefault(key, {}).setdefault(parse_bytes(cfg["budget"]), []).append(r["summary"]["final_top1"])
    if all(len(by_budget) < 2 for by_budget in points.values()):
        return False
    figure, axis = _pyplot().subplots(figsize=(7, 4.5))
    for key, by_budget in points.items():
        budgets = sorted(by_budget)
        axis.plot([b / 1024 for b in budgets], [np.mean(by_budget[b]) * 100 for b in budgets], marker="o", label=key)
    axis.set_xscale("log", base=2)
    axis.set_xlabel("memory budget (KB)")
    axis.set_ylabel("final test top-1 (%)")
    _save(figure, axis, path)
    return True


def compare(grid_file: str | Path, out: str | Path, workers: int = 1, executor: str = "local",
            address: str | None = None) -> tuple[Path, list[dict]]:
    runs = load_grid(grid_file)
    results = run_grid(runs, Path(out), workers, executor, address)
    return write_report(results, Path(out)), results
