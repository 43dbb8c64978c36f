"""fwdgrad tune: a seeded Optuna study over lr / eps / m, trained through the executors, resumable."""
import json
import tomllib

import pytest

from conftest import serve_residual_net
from fwdgrad.config import TrainConfig
from fwdgrad.trainer import Trainer
from fwdgrad.tune import default_space, load_study, tune

pytest.importorskip("optuna")

STUDY = """
[base]
dataset = "digits"
bits = "w8a8"
selection = "last-layer"
epochs = 1
batch_size = 100
[search]
lr = {low = 0.1, high = 10.0, log = true}
eps = {low = 0.5, high = 2.0}
m = {choices = [1, 2]}
[tune]
trials = 3
seed = 7
"""


pytestmark = pytest.mark.usefixtures("private_cache")


@pytest.fixture
def residual_task(residual_net, monkeypatch):
    serve_residual_net(monkeypatch, residual_net, train=300, test_end=1700)


def write(tmp_path, text):
    path = tmp_path / "study.toml"
    path.write_text(text)
    return path


def test_study_runs_writes_best_config_and_continues(tmp_path, residual_task, monkeypatch):
    path = write(tmp_path, STUDY)
    result = tune(path, tmp_path / "out", workers=1)
    assert len(result["trials"]) == 3 and all("value" in t for t in result["trials"])
    assert {tuple(sorted(t["params"])) for t in result["trials"]} == {("eps", "lr", "m")}
    best = result["best"]
    assert best["value"] == max(t["value"] for t in result["trials"])
    with open(tmp_path / "out" / "best.toml", "rb") as f:
        cfg = TrainConfig.from_dict(tomllib.load(f)["train"])
    assert (cfg.lr, cfg.eps, cfg.m) == (best["params"]["lr"], best["params"]["eps"], best["params"]["m"])
    assert "| trial | lr | eps | m |" in (tmp_path / "out" / "report.md").read_text()

    runs = []
    real_run = Trainer.run
    monkeypatch.setattr(Trainer, "run", lambda self, **k: runs.append(1) or real_run(self, **k))
    more = tune(path, tmp_path / "out", trials=4, workers=1)  # continues the study: one new trial only
    assert len(more["trials"]) == 4 and len(runs) == 1
    assert [t["params"] for t in more["trials"][:3]] == [t["params"] for t in result["trials"]]

    again = tune(path, tmp_path / "fresh", trials=3, workers=1)  # same seed, same suggestions
    assert [t["params"] for t in again["trials"]] == [t["params"] for t in result["trials"]]
    assert json.loads((tmp_path / "fresh" / "tune.json").read_text())["best"]["trial"] == best["trial"]


@pytest.mark.parametrize("text, message", [
    ("[search]\nlearning_rate = {low = 0.1, high = 1.0}\n", "not a training setting"),
    ("[search]\nlr = [0.1, 1.0]\n", "needs a range or choices"),
    ("[search]\nlr = {low = 1.0, high = 0.1}\n", "low < high"),
    ("[search]\nm = {choices = [0, 2]}\n", "m = 0: must be >= 1"),
    ("[tune]\nmetric = 'loss'\n", "bad metric"),
    ("[study]\ntrials = 3\n", "unknown sections")])
def test_bad_studies_fail_before_training(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        load_study(write(tmp_path, text))


def test_default_space_is_lr_eps_m_around_the_base():
    names = [(p.name, p.low, p.high, p.choices) for p in default_space(TrainConfig(lr=1.0, eps=2.0))]
    assert names == [("lr", 0.1, 10.0, None), ("eps", 0.2, 20.0, None), ("m", None, None, (1, 2, 4, 8))]
