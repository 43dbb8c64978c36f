"""`fwdgrad tune`: search the settings that make forward gradients converge (lr, eps, m) with Optuna.

The first thing a forward-gradient user needs is a learning rate and a perturbation size that work on their
model and data: too small and nothing moves, too large and the estimate's variance wrecks the head. A
study file (TOML) names the fixed settings and the search space:

    [base]                       # TrainConfig settings every trial shares
    dataset = "mnist"
    epochs = 4
    [search]                     # ranges (low/high, optionally log) or choices; default: lr, eps, m
    lr = {low = 0.3, high = 30.0, log = true}
    eps = {low = 0.001, high = 0.1, log = true}
    m = {choices = [1, 2, 4, 8]}
    [tune]                       # optional: trials, metric (final_top1 | best_top1), seed
    trials = 20

Trials are asked from a seeded TPE sampler in batches of ``workers`` and trained through the same executors
as ``fwdgrad compare`` (worker processes or Ray tasks), one run directory each (``DIR/trials/trial-<n>``).
The study lives in ``DIR/study.journal``: running the command again continues it, reusing finished runs
and resuming trials that were interrupted. Writes ``DIR/tune.json`` (every trial, the best), ``DIR/best.toml``
(a ``fwdgrad train --config`` file with the best settings) and ``DIR/report.md`` with a plot.

The objective is the run's test top-1 (the data set's test split, or its ``test_samples`` subset): pick
settings here, then report them with ``fwdgrad compare`` on fresh seeds, so the reported numbers are not
the maximum over trials.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from .compare import _run_safely, finished_summary
from .config import TrainConfig, read_settings_file
from .executors import MissingDependency, make_executor

METRICS = ("final_top1", "best_top1")
OPTUNA_INSTALL = "pip install 'optuna==5.0.0' (or pip install -e '.[test]', which installs it)"


@dataclass(frozen=True)
class Param:
    """One searched setting: a range (``low``..``high``, log-uniform if ``log``) or a list of ``choices``."""

    name: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple | None = None

    def suggest(self, trial):
        if self.choices is not None:
            return trial.suggest_categorical(self.name, list(self.choices))
        if isinstance(self.low, int) and isinstance(self.high, int):
            return trial.suggest_int(self.name, self.low, self.high, log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), log=self.log)


def default_space(base: TrainConfig) -> list[Param]:
    """A decade either side of the configured lr and eps, and m in 1..8: wide enough for a first study."""
    return [Param("lr", base.lr / 10, base.lr * 10, log=True), Param("eps", base.eps / 10, base.eps * 10, log=True),
            Param("m", choices=(1, 2, 4, 8))]


@dataclass
class Study:
    base: dict
    space: list[Param]
    trials: int = 20
    metric: str = "final_top1"
    seed: int = 0


def load_study(path: str | Path, trials: int | None = None, metric: str | None = None,
               seed: int | None = None) -> Study:
    """A study file, validated up front (every trial's settings are checked before any training)."""
    spec = read_settings_file(path, ("base", "search", "tune"))
    base = spec.get("base", {})
    base_cfg = TrainConfig.from_dict(base)
    known = set(base_cfg.to_dict())
    space = []
    for name, rule in spec.get("search", {}).items():
        if name not in known:
            raise ValueError(f"{path}: [search] {name} is not a training setting; known: {sorted(known)}")
        if not isinstance(rule, dict) or not ({"low", "high"} <= set(rule) or "choices" in rule):
            raise ValueError(f"{path}: [search] {name} needs a range or choices, e.g. "
                             f"{name} = {{low = 0.1, high = 10.0, log = true}} or {name} = {{choices = [1, 2, 4]}}")
        extra = sorted(set(rule) - {"low", "high", "log", "choices"})
        if extra:
            raise ValueError(f"{path}: [search] {name} has unknown keys {extra}: use low, high, log or choices")
        if "choices" in rule:
            space.append(Param(name, choices=tuple(rule["choices"])))
        else:
            if not rule["low"] < rule["high"] or (rule.get("log") and rule["low"] <= 0):
                raise ValueError(f"{path}: [search] {name} needs low < high (and low > 0 with log = true)")
            space.append(Param(name, rule["low"], rule["high"], bool(rule.get("log", False))))
    options = spec.get("tune", {})
    extra = sorted(set(options) - {"trials", "metric", "seed"})
    if extra:
        raise ValueError(f"{path}: [tune] has unknown keys {extra}: use trials, metric or seed")
    study = Study(base, space or default_space(base_cfg), int(trials or options.get("trials", 20)),
                  metric or options.get("metric", "final_top1"), int(seed if seed is not None else options.get("seed", 0)))
    if study.metric not in METRICS:
        raise ValueError(f"bad metric {study.metric!r}: use one of {', '.join(METRICS)}")
    if study.trials < 1:
        raise ValueError(f"trials must be >= 1, got {study.trials}")
    for param in study.space:  # every corner of the space must be a valid configuration
        for value in (param.choices or (param.low, param.high)):
            TrainConfig.from_dict(base | {param.name: value})
    return study


def _optuna():
    try:
        import optuna
    except ImportError as err:
        raise MissingDependency(f"fwdgrad tune needs Optuna, which is not installed: {OPTUNA_INSTALL}") from err
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def tune(study_file: str | Path, out: str | Path, trials: int | None = None, workers: int = 2,
         executor: str = "local", address: str | None = None, metric: str | None = None,
         seed: int | None = None) -> dict:
    """Run (or continue) the study; returns what ``DIR/tune.json`` holds."""
    optuna = _optuna()
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    from optuna.trial import TrialState

    spec = load_study(study_file, trials, metric, seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    storage = JournalStorage(JournalFileBackend(str(out / "study.journal")))
    study = optuna.create_study(study_name="fwdgrad-tune", storage=storage, direction="maximize",
                                sampler=optuna.samplers.TPESampler(seed=spec.seed), load_if_exists=True)
    errors: dict[int, dict] = {}
    with make_executor(executor, workers, address) as pool:
        # trials a killed study left running: train them again (their runs resume) before asking for more
        stale = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.RUNNING]
        while True:
            finished = sum(t.state in (TrialState.COMPLETE, TrialState.FAIL) for t in study.get_trials(deepcopy=False))
            wanted = spec.trials - finished
            if wanted <= 0 and not stale:
                break
            batch = stale[:workers] if stale else [study.ask() for _ in range(min(workers, wanted))]
            stale = stale[len(batch):] if stale else []
            params = [{p.name: p.suggest(t) for p in spec.space} if not isinstance(t, optuna.trial.FrozenTrial)
                      else dict(t.params) for t in batch]
            jobs = [(spec.base | p, str(out / "trials" / f"trial-{t.number:04d}")) for t, p in zip(batch, params)]
            results = pool.run(_run_safely, jobs, desc=f"tune trials {finished + 1}-{finished + len(jobs)}")
            for t, result in zip(batch, results):
                if "summary" in result:
                    study.tell(t.number, float(result["summary"][spec.metric]))
                else:
                    study.tell(t.number, state=TrialState.FAIL)
                    errors[t.number] = result
    return write_results(study, spec, out, errors)


def write_results(study, spec: Study, out: Path, errors: dict[int, dict]) -> dict:
    """DIR/tune.json, DIR/best.toml and DIR/report.md from the study's trials."""
    from optuna.trial import TrialState

    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.state not in (TrialState.COMPLETE, TrialState.FAIL):
            continue
        run_dir = out / "trials" / f"trial-{t.number:04d}"
        row = {"trial": t.number, "params": dict(t.params), "dir": str(run_dir)}
        if t.state == TrialState.COMPLETE:
            summary = finished_summary(spec.base | dict(t.params), run_dir) or {}
            row |= {"value": t.value, "zero_shot_top1": summary.get("zero_shot_top1"),
                    "train_seconds": summary.get("train_seconds")}
        else:
            error = errors.get(t.number, {}).get("error") or _run_error(spec.base | dict(t.params), run_dir)
            row |= {"error": error}
        rows.append(row)
    done = [r for r in rows if "value" in r]
    best = max(done, key=lambda r: (r["value"], -r["trial"])) if done else None
    result = {"metric": spec.metric, "trials": rows, "best": best, "seed": spec.seed}
    (out / "tune.json").write_text(json.dumps(result, indent=2))
    if best:
        (out / "best.toml").write_text(_toml({"train": spec.base | best["params"]},
                                             f"best of {len(done)} trials: {spec.metric} = {best['value']:.4f}"))
    _report(result, spec, out)
    return result


def _run_error(settings: dict, run_dir: Path) -> str:
    return "failed (its error was reported by the run that trained it; train it again with fwdgrad train " \
           f"--config {run_dir}/config.json --out {run_dir})"


def _toml(tables: dict, comment: str) -> str:
    """A minimal TOML writer (strings, numbers, booleans), enough for a TrainConfig."""
    lines = [f"# {comment}"]
    for table, values in tables.items():
        lines.append(f"[{table}]")
        for key, value in values.items():
            lines.append(f"{key} = {json.dumps(value) if not isinstance(value, float) else repr(value)}")
    return "\n".join(lines) + "\n"


def _report(result: dict, spec: Study, out: Path) -> None:
    from .compare import _pyplot

    done = sorted((r for r in result["trials"] if "value" in r), key=lambda r: -r["value"])
    failed = [r for r in result["trials"] if "error" in r]
    names = [p.name for p in spec.space]
    lines = ["# Tuning", "", f"{len(done)} finished and {len(failed)} failed trials; objective: {spec.metric} "
             "(test top-1, %). Best first.", "",
             "| trial | " + " | ".join(names) + f" | {spec.metric} | zero-shot |",
             "|---" * (len(names) + 3) + "|"]
    for r in done:
        values = [_fmt(r["params"].get(n)) for n in names]
        lines.append(f"| {r['trial']} | " + " | ".join(values) + f" | {100 * r['value']:.1f} | "
                     f"{100 * (r['zero_shot_top1'] or math.nan):.1f} |")
    if done:
        plt = _pyplot()
        figure, axis = plt.subplots(figsize=(7, 4))
        ordered = sorted(result["trials"], key=lambda r: r["trial"])
        xs = [r["trial"] for r in ordered if "value" in r]
        ys = [100 * r["value"] for r in ordered if "value" in r]
        axis.plot(xs, ys, "o", label="trial")
        axis.plot(xs, [max(ys[:i + 1]) for i in range(len(ys))], "-", label="best so far")
        axis.set_xlabel("trial")
        axis.set_ylabel(f"{spec.metric} (%)")
        axis.legend(fontsize=7)
        figure.tight_layout()
        figure.savefig(out / "trials.png", dpi=120)
        plt.close(figure)
        lines += ["", "![objective per trial](trials.png)"]
    if failed:
        lines += ["", "## Failed trials", ""] + [f"- trial {r['trial']} (`{r['dir']}`): {r['error']}" for r in failed]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
