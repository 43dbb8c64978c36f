"""The scale-out commands: `fwdgrad tune` (Optuna search over lr / eps / m) and `fwdgrad fleet` (devices that
train one model on their own data, exchanging seeds or weights). Kept apart from ``cli.py`` so the main
command table stays short; ``build_parser`` registers them with ``add_scale_commands`` (the dependency goes
one way: cli -> cli_scale -> cli_flags)."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def _cmd_tune(args) -> int:
    """Search learning rate, perturbation size and perturbations per step (Optuna TPE) for your task."""
    from fwdgrad.tune import tune

    result = tune(args.config, args.out, trials=args.trials, workers=args.workers, executor=args.executor,
                  address=args.address, metric=args.metric, seed=args.seed)
    print((Path(args.out) / "report.md").read_text())
    best = result["best"]
    if best is None:
        print("fwdgrad: error: every trial failed (see report.md)", file=sys.stderr)
        return 1
    print(f"best: trial {best['trial']} {json.dumps(best['params'])} -> {result['metric']} {best['value']:.4f}; "
          f"train with: fwdgrad train --config {args.out}/best.toml --out RUN")
    return 0


def _cmd_fleet(args) -> int:
    """Simulate N devices fine-tuning on their own data (Flower), exchanging seeds or weights."""
    from fwdgrad.cli_flags import train_overrides
    from fwdgrad.fleet import load_fleet, run_fleet

    names = ("clients", "rounds", "local_steps", "split", "protocols", "cpus")
    fleet_overrides = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    cfg, fleet = load_fleet(args.config, train_overrides(args), fleet_overrides)
    result = run_fleet(cfg, fleet, args.out)
    print((Path(args.out) / "report.md").read_text())
    return 0 if all(p["in_sync"] for p in result["protocols"].values()) else 1


def add_scale_commands(sub) -> None:
    from fwdgrad.cli_flags import add_config_flags, count

    tune = sub.add_parser("tune", help=_cmd_tune.__doc__)
    tune.add_argument("--config", required=True, help="study TOML: [base] settings, [search] ranges, optional [tune]")
    tune.add_argument("--out", required=True, help="study directory (study.journal, trials/, tune.json, best.toml)")
    tune.add_argument("--trials", type=count, help="total trials (default: the file's [tune] trials, else 20)")
    tune.add_argument("--workers", type=count, default=2, help="trials trained at once")
    tune.add_argument("--executor", default="local", choices=["local", "ray"])
    tune.add_argument("--address", help="Ray cluster to submit to (default: a local Ray instance)")
    tune.add_argument("--metric", choices=["final_top1", "best_top1"], help="objective (default final_top1)")
    tune.add_argument("--seed", type=int, help="sampler seed (default: the file's, else 0)")
    tune.set_defaults(run=_cmd_tune)

    fleet = sub.add_parser("fleet", help=_cmd_fleet.__doc__)
    fleet.add_argument("--config", help="TOML with a [train] table (training settings) and a [fleet] table")
    fleet.add_argument("--out", required=True, help="directory: fleet.json, report.md, fleet.png, model.onnx")
    fleet.add_argument("--clients", type=count, help="simulated devices (default 3)")
    fleet.add_argument("--rounds", type=count, help="communication rounds (default 5)")
    fleet.add_argument("--local-steps", dest="local_steps", type=int,
                       help="forward-gradient steps per device per round (default: one pass over its data)")
    fleet.add_argument("--split", choices=["labels", "voices", "iid"], help="how data is dealt (default labels)")
    fleet.add_argument("--protocols", nargs="+", choices=["seeds", "weights"], help="default: both")
    fleet.add_argument("--cpus", type=count, help="Ray CPUs for the simulation (default 2)")
    add_config_flags(fleet)
    fleet.set_defaults(run=_cmd_fleet)
