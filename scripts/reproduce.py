"""Reproduce docs/results.md: every experiment grid in experiments/, run with `fwdgrad compare`.

Each grid's leading comment says what it is and which settings are the papers' and which are ours. Runs
are cached under --out (finished runs are reused, killed ones resume), so rerunning after an interruption
only does the missing work. The tables and plots in docs/ are rewritten from what was measured.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from fwdgrad.compare import compare

from doc_sections import replace_between

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS = ROOT / "experiments"
DOCS = ROOT / "docs"

HEADER = """# Results

Every number on this page was measured on this machine by `python scripts/reproduce.py` (which runs each
grid in `experiments/` through `fwdgrad compare`). Top-1 is on the target task's test split, mean ± std
over seeds; "zero-shot" is the start of each run: the pretrained backbone with a logistic-regression
probe head (fitted on the images each grid names), quantized. Every top-1 is of the integers a device
runs (a BP row's weights rounded onto the graph's grids; its float top-1 beside it). Forward-only rows count
forward calls (2m per step, or one when only exact layers train); BP rows count one forward and one
backward per step.
"""


def describe(grid: Path) -> str:
    """The grid file's leading comment, as prose."""
    lines = []
    for line in grid.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("# "))
    return " ".join(lines)


def section(grid: Path, report: Path, out: Path) -> str:
    """The report's table and plots, with the plots copied next to docs/results.md."""
    figures = DOCS / "results"
    figures.mkdir(exist_ok=True)
    body = report.read_text().split("\n", 1)[1]
    for png in sorted(out.glob("*.png")):
        target = f"{grid.stem}-{png.name}"
        shutil.copyfile(png, figures / target)
        body = body.replace(f"({png.name})", f"(results/{target})")
    return f"## {grid.stem}\n\n{describe(grid)}\n\nGrid: `experiments/{grid.name}`.\n{body}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("grids", nargs="*", help="grid files (default: every experiments/*.toml)")
    parser.add_argument("--out", default=str(ROOT / ".bench-cache" / "results"), help="where runs are kept")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    grids = [Path(g) for g in args.grids] or sorted(EXPERIMENTS.glob("*.toml"))
    doc = DOCS / "results.md"
    text = doc.read_text() if doc.exists() else HEADER
    for grid in grids:
        out = Path(args.out) / grid.stem
        report, _ = compare(grid, out, args.workers)
        text = replace_section(text, grid.stem, section(grid, report, out))
        doc.write_text(text)
        print(f"updated {doc} with {grid.stem}")


def replace_section(text: str, name: str, body: str) -> str:
    """Swap one grid's section (between its markers) in place, or append it: other grids' sections stay."""
    begin, end = f"<!-- grid:{name} -->", f"<!-- /grid:{name} -->"
    return replace_between(text, begin, end, f"{begin}\n{body}\n{end}")


if __name__ == "__main__":
    main()
