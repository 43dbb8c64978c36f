"""Parallel runs on a fresh machine build a cached artefact once: the others wait and read it."""
import multiprocessing
import time
from pathlib import Path

from fwdgrad.locks import exclusive


def _build_if_missing(target: str, log: str) -> None:
    target = Path(target)
    with exclusive(target):
        if not target.exists():
            with open(log, "a") as f:
                f.write("built\n")
            time.sleep(2)  # a slow build: without the lock the other processes also find the file missing
            target.write_text("weights")


def test_only_one_of_several_processes_builds(tmp_path):
    target, log = tmp_path / "cache" / "weights.pt", tmp_path / "log"
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_build_if_missing, args=(str(target), str(log))) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(30)
    assert [w.exitcode for w in workers] == [0, 0, 0]
    assert log.read_text() == "built\n" and target.read_text() == "weights"
