"""The second photo set: loaded from the data cache, fetched atomically, and a clear error without apt."""
from __future__ import annotations

import subprocess

import numpy as np
import pytest
import skimage.io

from fwdgrad.data import debian_photos as dp
from fwdgrad.cli import build_parser
from fwdgrad.data.photos import PHOTO_SETS, photo_set, real_photos_with_sources


@pytest.fixture
def cache(monkeypatch, tmp_path):
    monkeypatch.setenv("FWDGRAD_CACHE", str(tmp_path))
    monkeypatch.setattr(dp, "SYSTEM_ROOT", tmp_path / "no-packages-installed")
    dp.debian_photos.cache_clear()
    yield tmp_path
    dp.debian_photos.cache_clear()


def test_debian_photos_are_read_from_the_data_cache(cache):
    rng = np.random.default_rng(0)
    for folder, photos in dp.PACKAGES.values():
        for photo in photos:
            path = dp.photos_dir() / folder / photo
            path.parent.mkdir(parents=True, exist_ok=True)
            channels = 4 if photo.endswith(".png") else 3  # PNGs may carry alpha: it is dropped
            skimage.io.imsave(path, rng.integers(0, 256, (40, 56, channels), dtype=np.uint8), check_contrast=False)
    photos = photo_set("debian")
    assert len(photos) == sum(len(p) for _, p in dp.PACKAGES.values()) == 41
    assert all(image.shape == (40, 56, 3) and image.dtype == np.uint8 for _, image in photos)
    x, sources = real_photos_with_sources(45, 32, seed=0, photos="debian")
    assert x.shape == (45, 3, 32, 32) and sources[:41] == [name for name, _ in photos] and sources[41] == "aero1"


def test_without_apt_the_error_says_how_to_get_them(cache, monkeypatch):
    monkeypatch.setattr(dp.shutil, "which", lambda tool: None)
    with pytest.raises(FileNotFoundError, match="apt-get download opencv-doc mate-backgrounds.*sudo apt-get update"):
        photo_set("debian")


def test_a_failed_download_leaves_nothing_behind(cache, monkeypatch):
    monkeypatch.setattr(dp.shutil, "which", lambda tool: "/usr/bin/" + tool)
    monkeypatch.setattr(dp.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 100, "", "E: no network"))
    with pytest.raises(FileNotFoundError, match="could not download the Debian package opencv-doc .*E: no network"):
        photo_set("debian")
    assert not dp.photos_dir().exists() and list(dp.photos_dir().parent.iterdir()) == []


def test_ptq_demo_offers_every_photo_set():
    parser = build_parser()
    assert [parser.parse_args(["ptq-demo", "--photos", name]).photos for name in PHOTO_SETS] == list(PHOTO_SETS)


def test_an_unknown_photo_set_is_named():
    with pytest.raises(ValueError, match="unknown photo set 'imagenet': choose one of bundled, debian"):
        photo_set("imagenet")
