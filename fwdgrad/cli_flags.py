"""Command-line flags for every training setting, shared by `fwdgrad train`, `fleet` and the scale-out
commands (one flag per TrainConfig field: ``--budget 64KB``, ``--m 4``, ...; an unset flag keeps the config's
value, so only what the user typed overrides a TOML file)."""
from __future__ import annotations

import argparse
from dataclasses import fields

from .config import TrainConfig

ALIASES = {"dataset": ["--data"]}  # `--data my.npz` reads as the data set it names


def add_config_flags(parser) -> None:
    for f in fields(TrainConfig):
        kind = parse_bool if isinstance(f.default, bool) else type(f.default)
        parser.add_argument(f"--{f.name.replace('_', '-')}", *ALIASES.get(f.name, []), dest=f.name, type=kind,
                            default=None, help=f"default: {f.default}")


def train_overrides(args) -> dict:
    """The settings given on the command line."""
    return {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name, None) is not None}


def parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def count(text: str) -> int:
    """An integer >= 1 (trials, devices, rounds, workers)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value
