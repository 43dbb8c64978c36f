"""Executors: local processes and a 2-worker local Ray give the same results; dead workers are retried and
reported; `fwdgrad compare --executor ray` writes the same results.json as the local executor."""
import functools
import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest

from fwdgrad.compare import load_grid, run_grid, write_report
from fwdgrad.executors import make_executor

pytest.importorskip("ray")

GRID = """
[base]
dataset = "digits"
bits = "w8a8"
budget = "2KB"
epochs = 1
batch_size = 100
m = 2
lr = 1.0
eps = 1.0
[grid]
selection = ["last-layer", "s-full-random"]
seed = [0]
"""


def flaky_job(settings: dict, out: str) -> dict:
    """Doubles x; dies once when asked to (the retry must finish it), always when asked to."""
    marker = Path(out + ".started")
    if settings.get("die_once") and not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("died")
        os._exit(3)
    if settings.get("always_die"):
        os._exit(4)
    if settings.get("raise"):
        return {"error": "ValueError: reported by the job itself"}
    if settings.get("raise_exception"):
        raise KeyError("not reported by the job")
    return {"summary": {"x": 2 * settings["x"]}}


def residual_job(task_file: str, settings: dict, out: str) -> dict:
    """Train a run on the conftest residual net instead of the model zoo (in whatever process runs it)."""
    import fwdgrad.task
    from fwdgrad.compare import _run_safely
    from fwdgrad.data.split import TrainData
    from quant.convert import convert

    arrays = np.load(task_file)
    x, y = arrays["x"], arrays["y"]
    proto = onnx.load_from_string(arrays["proto"].tobytes())
    fwdgrad.task.prepare_data = lambda cfg: TrainData(x[:400], y[:400], x[1500:1700], y[1500:1700])

    def prepare_graph(cfg, data, run_dir):
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        onnx.save(proto, Path(run_dir) / "model.onnx")
        return convert(proto, x[:200], bits=cfg.bits)

    fwdgrad.task.prepare_graph = prepare_graph
    return _run_safely(settings, out)


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FWDGRAD_CACHE", str(tmp_path / "cache"))  # Ray workers inherit it


@pytest.fixture
def task_file(residual_net, tmp_path):
    _, x, y, proto = residual_net
    path = tmp_path / "task.npz"
    np.savez(path, x=x, y=y, proto=np.frombuffer(proto.SerializeToString(), np.uint8))
    return str(path)


def jobs(tmp_path, name):
    settings = [{"x": 0}, {"x": 1, "die_once": True}, {"x": 2, "raise": True}, {"x": 3, "always_die": True},
                {"x": 4, "raise_exception": True}]
    return [(s, str(tmp_path / name / f"job{i}")) for i, s in enumerate(settings)]


def test_local_and_ray_agree_and_retry_dead_workers(tmp_path):
    local = make_executor("local", workers=2, retries=1).run(flaky_job, jobs(tmp_path, "local"))
    ray_results = make_executor("ray", workers=2, retries=1).run(flaky_job, jobs(tmp_path, "ray"))
    for results in (local, ray_results):
        assert results[0] == {"summary": {"x": 0}, "attempts": 1}
        assert results[1] == {"summary": {"x": 2}, "attempts": 2}  # died once, retried, finished
        assert results[2] == {"error": "ValueError: reported by the job itself", "attempts": 1}  # not retried
        assert results[3]["attempts"] == 2 and results[3]["error"].startswith("WorkerDied")  # reported, not dropped
        assert results[4]["attempts"] == 1 and results[4]["error"] == "KeyError: 'not reported by the job'"
    import ray

    assert not ray.is_initialized()  # the executor shut down the Ray instance it started


def test_compare_on_ray_writes_the_same_results_as_local(tmp_path, private_cache, task_file):
    grid = tmp_path / "grid.toml"
    grid.write_text(GRID)
    job = functools.partial(residual_job, task_file)
    local = run_grid(load_grid(grid), tmp_path / "local", workers=2, executor="local", job=job)
    remote = run_grid(load_grid(grid), tmp_path / "ray", workers=2, executor="ray", job=job)
    assert all("summary" in r for r in local + remote), [r.get("error") for r in local + remote]

    def comparable(results, root):
        text = json.dumps(results).replace(str(root), "OUT")
        return [{k: v for k, v in r.items() if k != "summary"} |
                {"summary": {k: v for k, v in r["summary"].items() if k != "train_seconds"}}
                for r in json.loads(text)]

    assert comparable(local, tmp_path / "local") == comparable(remote, tmp_path / "ray")
    report = write_report(remote, tmp_path / "ray").read_text()
    assert "| selection=last-layer | 1 |" in report

    again = run_grid(load_grid(grid), tmp_path / "ray", workers=2, executor="ray", job=job)  # no Ray needed
    assert [r["attempts"] for r in again] == [0, 0]
    assert [r["summary"]["weights_sha256"] for r in again] == [r["summary"]["weights_sha256"] for r in remote]


def test_bad_executor_settings_fail_clearly():
    with pytest.raises(ValueError, match="unknown executor"):
        make_executor("dask")
    with pytest.raises(ValueError, match="--executor ray"):
        make_executor("local", address="auto")
