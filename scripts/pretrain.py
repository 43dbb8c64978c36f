"""Pretrain the small CNN on Fashion-MNIST (what `fwdgrad train --model small-cnn` fine-tunes from).

Trains only if the cache lacks these weights (`pretrained_small_cnn` does the same on first use), then
prints what was measured: test top-1 and seconds. Options change the recipe, hence the cache name.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import fields

from fwdgrad.models.pretrained import Recipe, pretrain_report, weights_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    for f in fields(Recipe):
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=type(f.default), default=f.default)
    recipe = Recipe(**vars(parser.parse_args()))
    report = pretrain_report(recipe)
    print(json.dumps(report, indent=2))
    print(f"weights: {weights_path(recipe)}")


if __name__ == "__main__":
    main()
