"""The spoken-keyword sets: real synthesized speech, two synthesizer domains, a sound front end."""
import numpy as np
import pytest

from fwdgrad.data import keywords
from fwdgrad.data.datasets import load_dataset
from fwdgrad.data.logmel import BANDS, SAMPLE_RATE, log_mel, mel_filters


def test_a_tone_lands_in_its_mel_band():
    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    for freq in (300.0, 1000.0, 4000.0):
        band = int(np.argmax(log_mel(np.sin(2 * np.pi * freq * t).astype(np.float32)).mean(axis=1)))
        centre = np.argmax(mel_filters(), axis=1)[band] * SAMPLE_RATE / 2 / (mel_filters().shape[1] - 1)
        assert abs(centre - freq) / freq < 0.15
    assert mel_filters().shape == (BANDS, 257)


@pytest.mark.parametrize("name, train, test", [("keywords-espeak", 480, 240), ("keywords", 100, 200)])
def test_keyword_sets_are_balanced_log_mel_images(name, train, test):
    a, b = load_dataset(name, "train"), load_dataset(name, "test")
    assert (len(a), len(b)) == (train, test) and a.images.shape[1:] == (1, 40, 48)
    assert a.class_names == keywords.WORDS
    assert np.all(np.bincount(a.labels) == train // 10) and np.all(np.bincount(b.labels) == test // 10)
    assert 0.1 < a.images.mean() < 0.6  # speech energy, not silence or clipping
    # every clip is a different rendition: no two images are equal
    assert len({img.tobytes() for img in np.concatenate([a.images, b.images])}) == train + test


def test_domains_differ():
    """espeak-ng and flite voices are a real shift: their mean spectra differ clearly."""
    espeak, flite = load_dataset("keywords-espeak", "train"), load_dataset("keywords", "train")
    gap = np.abs(espeak.images.mean(axis=(0, 3)) - flite.images.mean(axis=(0, 3))).mean()
    assert gap > 0.02


def test_missing_synthesizer_names_the_install_command(monkeypatch):
    monkeypatch.setattr(keywords.shutil, "which", lambda tool: None)
    with pytest.raises(FileNotFoundError, match="sudo apt-get install -y espeak-ng flite"):
        keywords.build_flite()
