"""One builder at a time for things cached on first use.

`fwdgrad compare` starts its runs in parallel processes; on a fresh machine each of them finds the
pretrained weights (or a synthesized data set) missing. Without a lock every process builds its own copy,
on cores the others need; with it the first builds, the rest wait and then read what it wrote.
"""
from __future__ import annotations

import fcntl
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def exclusive(path: str | Path):
    """Hold an inter-process lock named after ``path`` (``.path.lock`` next to it) for the block."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
