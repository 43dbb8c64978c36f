"""Where a batch of training runs executes: worker processes on this machine, or Ray tasks.

A sweep (``fwdgrad compare``, ``fwdgrad tune``) is a list of independent jobs ``(settings, out)`` and one
function that trains a job into ``out`` and returns a dict (``{"summary": ...}`` or ``{"error": ...}``: the
function reports its own Python errors). What an executor adds is placement and survival:

- ``local``: a pool of ``workers`` spawned processes on this machine (or this process when ``workers`` is
  1), each given its share of the cores for numba and BLAS;
- ``ray``: one Ray task per job, on a local Ray instance started with small resources, or on the cluster at
  ``address``; when the cluster is remote, each task sends its run directory back, so the report and the
  reuse of finished runs work the same on the driver.

A worker that dies (killed, out of memory, a crash in native code) is not a Python error the job can
report: the executor resubmits the job up to ``retries`` more times (a killed run resumes from its last
checkpoint) and records ``attempts`` in the result; a job that keeps dying is reported with an error,
never dropped. Results come back in job order whichever executor ran them, so ``results.json`` does not
depend on the executor.
"""
from __future__ import annotations

import os
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Sequence

from tqdm import tqdm

EXECUTORS = ("local", "ray")
Job = tuple  # (settings: dict, out: str)
JobFn = Callable[[dict, str], dict]

RAY_VERSION = "2.55.1"  # the version flwr[simulation] pins; one Ray serves sweeps and fleets
RAY_INSTALL = f"pip install 'ray=={RAY_VERSION}' (or pip install -e '.[test]', which installs it)"
RAY_OBJECT_STORE_BYTES = 96 * 1024 ** 2  # jobs pass settings and summaries, not tensors: keep the store small


class MissingDependency(ValueError):
    """An optional package a chosen feature needs is not installed (a ValueError, so the command line
    reports it in one line with the install command instead of a traceback)."""


@contextmanager
def threads_per_worker(workers: int):
    """Give each worker process its share of the cores (numba and BLAS read these at import)."""
    share = str(max(1, (os.cpu_count() or 1) // max(1, workers)))
    names = ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
    saved = {n: os.environ.get(n) for n in names}
    os.environ.update({n: share for n in names})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def make_executor(name: str = "local", workers: int = 2, address: str | None = None, retries: int = 2):
    """The executor called ``name`` (``local`` or ``ray``); ``address`` only makes sense with ``ray``."""
    if name not in EXECUTORS:
        raise ValueError(f"unknown executor {name!r}: use one of {', '.join(EXECUTORS)}")
    if name == "local":
        if address:
            raise ValueError("--address is the Ray cluster to submit to: use it with --executor ray")
        return LocalExecutor(workers, retries)
    return RayExecutor(workers, address, retries)


def _died(attempts: int, reason: str) -> dict:
    return {"error": f"WorkerDied: the worker running this job died {attempts} time(s) ({reason}); "
                     f"its run directory keeps the last checkpoint, run the sweep again to resume it",
            "attempts": attempts}


class LocalExecutor:
    """Spawned worker processes on this machine; ``workers <= 1`` runs the jobs in this process."""

    name = "local"

    def __init__(self, workers: int = 2, retries: int = 2):
        self.workers, self.retries = workers, retries

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def run(self, fn: JobFn, jobs: Sequence[Job], desc: str = "runs") -> list[dict]:
        results: list[dict | None] = [None] * len(jobs)
        with tqdm(total=len(jobs), desc=desc, unit="run", disable=None) as bar:
            if self.workers <= 1:
                for i, job in enumerate(jobs):
                    results[i] = _call(fn, job) | {"attempts": 1}
                    bar.update(1)
            else:
                self._run_pool(fn, jobs, results, bar)
        return results

    def _run_pool(self, fn, jobs, results, bar) -> None:
        """One spawned process per job, at most ``workers`` at a time. (A ProcessPoolExecutor would reuse
        processes, but one dead worker breaks the whole pool and fails every job in it, so the job that
        died could not be told from its neighbours.)"""
        import multiprocessing
        from collections import deque
        from multiprocessing.connection import wait

        context = multiprocessing.get_context("spawn")
        attempts = [0] * len(jobs)
        queue, running = deque(range(len(jobs))), {}
        with threads_per_worker(self.workers):
            while queue or running:
                while queue and len(running) < self.workers:
                    i = queue.popleft()
                    receive, send = context.Pipe(duplex=False)
                    process = context.Process(target=_child, args=(fn, jobs[i], send), daemon=True)
                    process.start()
                    send.close()
                    attempts[i] += 1
                    running[process.sentinel] = (i, process, receive)
                for sentinel in wait(list(running)):
                    i, process, receive = running.pop(sentinel)
                    try:
                        result = receive.recv()
                    except EOFError:  # it died before sending
                        result = None
                    process.join()
                    receive.close()
                    if result is not None:
                        results[i] = result | {"attempts": attempts[i]}
                    elif attempts[i] > self.retries:
                        results[i] = _died(attempts[i], f"exit code {process.exitcode}")
                    else:
                        queue.append(i)
                        continue
                    bar.update(1)


def _child(fn: JobFn, job: Job, send) -> None:
    """A worker process: run one job and send its result (nothing is sent if the process dies)."""
    send.send(_call(fn, job))
    send.close()


def _call(fn: JobFn, job: Job) -> dict:
    """The job's result; an exception it raised instead of reporting becomes its error (never retried:
    it would fail again)."""
    import traceback

    try:
        return fn(*job)
    except Exception as err:  # noqa: BLE001
        return {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}


class RayExecutor:
    """One Ray task per job. Without ``address`` a local Ray instance is started (``workers`` CPUs, no
    dashboard, a small object store) and shut down afterwards; with one, the jobs go to that cluster
    (``auto``, ``HOST:6379`` or ``ray://HOST:10001``), whose nodes need fwdgrad installed."""

    name = "ray"

    def __init__(self, workers: int = 2, address: str | None = None, retries: int = 2):
        self.workers, self.address, self.retries = workers, address, retries
        self._started = False

    def __enter__(self):
        """Keep one Ray instance up for several ``run`` calls (a tuning study's batches)."""
        self._started = self._start(import_ray())
        return self

    def __exit__(self, *exc) -> None:
        if self._started:
            import_ray().shutdown()
            self._started = False

    def run(self, fn: JobFn, jobs: Sequence[Job], desc: str = "runs") -> list[dict]:
        ray = import_ray()
        started = self._start(ray)
        try:
            return self._run(ray, fn, jobs, desc)
        finally:
            if started:
                ray.shutdown()

    def _start(self, ray) -> bool:
        """Connect or start; False when Ray was already up in this process (then it is left running)."""
        if ray.is_initialized():
            return False
        share = str(1)  # each task holds one CPU: numba and BLAS get one thread
        env = {n: share for n in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
        if self.address:
            ray.init(address=self.address, runtime_env={"env_vars": env}, log_to_driver=False)
        else:
            start_local_ray(self.workers, env)
        return True

    def _run(self, ray, fn, jobs, desc) -> list[dict]:
        from ray.exceptions import RayError, RayTaskError

        ship = bool(self.address)  # a remote node's files are not on this disk: the task sends them back
        log = _attempt_log(ray)
        task = ray.remote(num_cpus=1, max_retries=self.retries, retry_exceptions=False)(_ray_job)
        refs = {task.remote(fn, job, log, i, ship): i for i, job in enumerate(jobs)}
        results: list[dict | None] = [None] * len(jobs)
        with tqdm(total=len(jobs), desc=f"{desc} (ray)", unit="run", disable=None) as bar:
            waiting = list(refs)
            while waiting:
                done, waiting = ray.wait(waiting, num_returns=1)
                i = refs[done[0]]
                attempts = ray.get(log.attempts.remote(i))
                try:
                    result = ray.get(done[0])
                    _write_files(jobs[i][1], result.pop("files", {}))
                    results[i] = result | {"attempts": attempts}
                except RayTaskError as err:  # the job raised instead of reporting: not retried, reported
                    results[i] = {"error": f"{type(err.cause).__name__}: {err.cause}", "attempts": attempts}
                except RayError as err:  # the worker or its node died more than ``retries`` times
                    results[i] = _died(max(attempts, self.retries + 1), f"{type(err).__name__}: {str(err)[:300]}")
                bar.update(1)
        return results


def import_ray():
    try:
        import ray
    except ImportError as err:
        raise MissingDependency(f"--executor ray needs Ray, which is not installed: {RAY_INSTALL}") from err
    return ray


def start_local_ray(cpus: int, env: dict | None = None, tries: int = 3) -> None:
    """A local Ray instance sized for this machine: ``cpus`` CPUs, no dashboard, a small object store.

    On a loaded machine the raylet can miss its 15 s wait for the node agent's port file and abort the
    start ("The current node timed out during startup"); starting again usually works, so try a few times."""
    ray = import_ray()
    # workers import what this process can (a script's own modules too), as Flower's simulation does
    env = (env or {}) | {"PYTHONPATH": os.pathsep.join([p for p in sys.path if p] +
                                                        [os.environ.get("PYTHONPATH", "")]).strip(os.pathsep)}
    for attempt in range(1, tries + 1):
        try:
            with threads_per_worker(cpus), warnings.catch_warnings():  # workers inherit the environment
                warnings.simplefilter("ignore", FutureWarning)  # a notice about GPU visibility defaults
                ray.init(num_cpus=cpus, include_dashboard=False, object_store_memory=RAY_OBJECT_STORE_BYTES,
                         log_to_driver=False, runtime_env={"env_vars": env})
            return
        except Exception as err:  # noqa: BLE001 (Ray raises a bare Exception for a failed start)
            ray.shutdown()
            if attempt == tries or "timed out during startup" not in str(err):
                raise


def _attempt_log(ray):
    """A tiny actor every task reports its start to, so the driver knows how often Ray retried a job."""

    @ray.remote(num_cpus=0)
    class AttemptLog:
        def __init__(self):
            self.counts = {}

        def begin(self, key) -> int:
            self.counts[key] = self.counts.get(key, 0) + 1
            return self.counts[key]

        def attempts(self, key) -> int:
            return self.counts.get(key, 0)

    return AttemptLog.remote()


def _ray_job(fn: JobFn, job: Job, log, key: int, ship: bool) -> dict:
    """The body of a Ray task: count the attempt, run the job, and send the run directory back if asked."""
    import ray

    ray.get(log.begin.remote(key))
    result = _call(fn, job)
    if ship:
        result["files"] = _read_files(job[1])
    return result


def _read_files(out: str) -> dict[str, bytes]:
    root = Path(out)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _write_files(out: str, files: dict[str, bytes]) -> None:
    """Write a remote run's files where the driver expects them (skipping what is already here)."""
    from .rundir import atomic_write_bytes

    root = Path(out)
    for name, data in sorted(files.items(), key=lambda item: item[0].endswith("state.json")):  # state last
        path = root / name
        if path.exists() and path.read_bytes() == data:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, data)
