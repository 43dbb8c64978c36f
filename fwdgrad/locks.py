"""Inter-process locks (the ``filelock`` library: fcntl on POSIX, held by an open file, so a killed process
releases it): one builder at a time for what is cached on first use, one writer at a time per run directory.

`fwdgrad compare` starts its runs in parallel processes; on a fresh machine each of them finds the
pretrained weights (or a synthesized data set) missing. Without a lock every process builds its own copy,
on cores the others need; with it the first builds, the rest wait and then read what it wrote. A run
directory is held for the whole run: a second `train --out D` or a `--resume D` while D trains is refused
with the holder's process id, instead of two processes interleaving one run's files.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

WRITER = ".writer"  # the holder's pid, for the refusal message (the lock itself is .lock)


class RunBusyError(ValueError):
    """A run directory another process is writing."""


@contextmanager
def exclusive(path: str | Path):
    """Hold an inter-process lock named after ``path`` (``.path.lock`` next to it) for the block, waiting
    for another holder to finish."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path.with_name(f".{path.name}.lock")):
        yield


@contextmanager
def run_writer(out: str | Path):
    """Be the only writer of the run directory ``out`` for the block, or raise RunBusyError at once."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lock = FileLock(out / ".lock", timeout=0)
    try:
        lock.acquire()
    except Timeout:
        holder = (out / WRITER).read_text().strip() if (out / WRITER).exists() else "unknown"
        raise RunBusyError(f"{out} is being written by another fwdgrad process (pid {holder}): wait for it to "
                           f"finish (then --resume {out}), or train into another --out") from None
    try:
        (out / WRITER).write_text(str(os.getpid()))
        yield
    finally:
        (out / WRITER).unlink(missing_ok=True)
        lock.release()
