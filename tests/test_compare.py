"""fwdgrad compare: grids expand as written, runs are reused, failures are reported, the report is whole."""
import json

import pytest

from conftest import serve_residual_net
from fwdgrad.compare import compare, load_grid, run_grid, write_report
from fwdgrad.trainer import Trainer

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
bp_lr = 0.02
rgn_samples = 128

[grid]
selection = ["trady", "last-layer"]
seed = [0, 1]

[[row]]
name = "ZO"

[[row]]
name = "BP"
method = "bp"
"""


pytestmark = pytest.mark.usefixtures("private_cache")


@pytest.fixture
def residual_task(residual_net, monkeypatch):
    """The grid trains the conftest residual net on sklearn digits (in this process)."""
    serve_residual_net(monkeypatch, residual_net, train=400, test_end=1700)


def write(tmp_path, text):
    path = tmp_path / "grid.toml"
    path.write_text(text)
    return path


def test_grid_expands_rows_times_combinations_times_seeds(tmp_path):
    runs = load_grid(write(tmp_path, GRID))
    assert len(runs) == 2 * 2 * 2
    assert {r.row for r in runs} == {"ZO selection=trady", "ZO selection=last-layer", "BP selection=trady",
                                     "BP selection=last-layer"}
    assert len({r.dirname for r in runs}) == len(runs)
    assert all(r.settings["dataset"] == "digits" for r in runs)


@pytest.mark.parametrize("text, message", [
    ("[base]\nlr = 1.0\n[grid]\nselection = 'trady'\n", "must be a non-empty list"),
    ("[base]\nlearning_rate = 1.0\n", "unknown config keys"),
    ("[grid]\nselection = ['topk']\n", "bad selection"),
    ("[runs]\nx = 1\n", "unknown sections"),
    ("[[row]]\nname = 'a b'\n[[row]]\nname = 'a-b'\n", "share a run directory")])
def test_bad_grids_fail_before_training(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        load_grid(write(tmp_path, text))


def test_compare_writes_the_report_and_reuses_finished_runs(tmp_path, residual_task, monkeypatch):
    report, results = compare(write(tmp_path, GRID), tmp_path / "out", workers=1)
    assert all("summary" in r for r in results), [r.get("error") for r in results]
    text = report.read_text()
    assert "| BP selection=last-layer | 2 |" in text and "| ZO selection=trady | 2 |" in text
    assert (tmp_path / "out" / "accuracy_vs_epoch.png").stat().st_size > 10_000
    assert (tmp_path / "out" / "memory.png").stat().st_size > 10_000
    row = next(line for line in text.splitlines() if line.startswith("| BP selection=trady"))
    zo_kb, bp_kb = (float(v) for v in row.split("|")[9:11])  # the ZO and BP memory columns
    assert 0 < zo_kb < bp_kb  # backprop on the same selection needs more memory than ZO
    stored = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["seed"] for r in stored] == [r["seed"] for r in results]
    bp = [r["summary"] for r in results if r["row"].startswith("BP")]
    assert all(s["forward_calls"] == 4 for s in bp)  # 400 samples / 100 per step, one forward each

    monkeypatch.setattr(Trainer, "run", lambda *a, **k: pytest.fail("a finished run was trained again"))
    again = run_grid(load_grid(write(tmp_path, GRID)), tmp_path / "out", workers=1)
    assert [r["summary"]["weights_sha256"] for r in again] == [r["summary"]["weights_sha256"] for r in results]


def test_failed_runs_are_reported_not_dropped(tmp_path):
    grid = write(tmp_path, '[base]\ndataset = "gone/no-such-data.npz"\nepochs = 1\n[grid]\nseed = [0, 1]\n')
    results = run_grid(load_grid(grid), tmp_path / "out", workers=2)  # two worker processes
    assert len(results) == 2 and all("no-such-data" in r["error"] for r in results)
    report = write_report(results, tmp_path / "out").read_text()
    assert "## Failed runs" in report and report.count("no-such-data") == 2


def test_a_finished_run_of_other_settings_is_refused_naming_them(tmp_path):
    """A grid whose settings changed since a run finished must not reuse it, and must say what changed;
    settings the stored run predates count at their defaults (lr_scale here)."""
    from fwdgrad.compare import finished_summary
    from fwdgrad.config import TrainConfig

    old = TrainConfig(lr=0.003).to_dict()
    del old["lr_scale"]
    (tmp_path / "summary.json").write_text(json.dumps({"config": old, "final_top1": 0.5}))
    assert finished_summary(TrainConfig(lr=0.003).to_dict(), tmp_path)["final_top1"] == 0.5
    with pytest.raises(ValueError) as err:
        finished_summary(TrainConfig(lr=3.0, lr_scale="dimension").to_dict(), tmp_path)
    message = str(err.value)
    assert "lr: the run has 0.003, now 3.0" in message and "lr_scale: the run has 'none', now 'dimension'" in message
    assert "another compare --out" in message
