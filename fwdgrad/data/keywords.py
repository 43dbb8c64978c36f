"""Spoken keywords, synthesized offline: the audio domain of the last mile, with a real voice shift.

No keyword-spotting corpus ships offline, so the words are spoken by two different speech synthesizers:
espeak-ng (formant synthesis; six English accents, each with voice variants, speeds and pitches) makes
``keywords-espeak``, the source domain a model is pretrained on; flite (concatenative/statistical
voices kal, kal16, awb, rms, slt) makes ``keywords``, the target domain a deployed model must adapt to,
split by voice rendition (speed, pitch) into adaptation (train) and test clips. Clips are padded or
trimmed to one second at 16 kHz and turned into log-mel spectrograms (``logmel.py``) scaled with fixed
constants, so both domains share one input mapping.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import wave
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .logmel import SAMPLE_RATE, log_mel_image

WORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
INSTALL = "sudo apt-get install -y espeak-ng flite"  # scripts/install_data.sh does it
ESPEAK_VOICES = ("en-us", "en-gb-x-gbclan", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbcwmd", "en-029")
ESPEAK_VARIANTS = ("", "+m3", "+f2", "+f4")
ESPEAK_RENDITIONS = ((130, 40), (160, 55), (190, 70))  # (words per minute, pitch 0-99)
FLITE_VOICES = ("kal", "kal16", "awb", "rms", "slt")
FLITE_RENDITIONS = (1.0, 0.8, 1.25, 0.9, 1.1, 1.4)  # duration stretch (not every flite voice honours f0 settings)
FLITE_TRAIN_RENDITIONS = (0, 3)  # the adaptation clips; the other renditions are the test clips


def _require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise FileNotFoundError(f"the keyword data set needs {tool}, which is not installed: run `{INSTALL}` "
                                f"(or `make test`, which installs it)")
    return path


def _read_wav(path: Path) -> np.ndarray:
    """Mono 16-bit PCM -> float waveform at 16 kHz (linear resampling), one second long."""
    with wave.open(str(path)) as w:
        rate, frames = w.getframerate(), w.readframes(w.getnframes())
        if w.getsampwidth() != 2 or w.getnchannels() != 1:
            raise ValueError(f"{path}: expected mono 16-bit PCM")
    audio = np.frombuffer(frames, dtype="<i2").astype(np.float32) / 32768.0
    if rate != SAMPLE_RATE:
        times = np.arange(int(len(audio) * SAMPLE_RATE / rate)) / SAMPLE_RATE
        audio = np.interp(times, np.arange(len(audio)) / rate, audio).astype(np.float32)
    out = np.zeros(SAMPLE_RATE, np.float32)
    start = max(0, (len(audio) - SAMPLE_RATE) // 2)  # centre long clips, pad short ones at the end
    clip = audio[start:start + SAMPLE_RATE]
    out[:len(clip)] = clip
    return out


OUT = "{wav}"  # where a synthesis command writes its file


def _synthesize(command: list[str], workdir: str, index: int) -> np.ndarray:
    path = Path(workdir) / f"{index}.wav"
    subprocess.run([str(path) if arg == OUT else arg for arg in command], check=True, capture_output=True)
    return _read_wav(path)


def _espeak_jobs(espeak: str) -> list[tuple[list[str], int, int]]:
    """(command, label, rendition group) for every espeak-ng clip."""
    jobs = []
    for voice in ESPEAK_VOICES:
        for variant in ESPEAK_VARIANTS:
            for speed, pitch in ESPEAK_RENDITIONS:
                for label, word in enumerate(WORDS):
                    jobs.append(([espeak, "-v", voice + variant, "-s", str(speed), "-p", str(pitch), "-w", OUT, word],
                                 label, 0))
    return jobs


def _flite_jobs(flite: str) -> list[tuple[list[str], int, int]]:
    jobs = []
    for voice in FLITE_VOICES:
        for group, stretch in enumerate(FLITE_RENDITIONS):
            for label, word in enumerate(WORDS):
                jobs.append(([flite, "-voice", voice, "--setf", f"duration_stretch={stretch}", "-t", word, "-o", OUT],
                             label, group))
    return jobs


def _render(jobs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Log-mel images (N, 1, 40, 48), labels, rendition groups; two synthesizer processes at a time."""
    with tempfile.TemporaryDirectory() as workdir, ThreadPoolExecutor(max(2, os.cpu_count() or 2)) as pool:
        waves = list(pool.map(lambda item: _synthesize(item[1][0], workdir, item[0]), enumerate(jobs)))
    images = np.stack([log_mel_image(w) for w in waves])[:, None]
    return images, np.array([j[1] for j in jobs]), np.array([j[2] for j in jobs])


def build_espeak() -> dict:
    """The source domain: 720 clips of 24 espeak-ng voices; train/test split by speed/pitch rendition."""
    images, labels, _ = _render(_espeak_jobs(_require("espeak-ng")))
    rendition = np.arange(len(labels)) // len(WORDS) % len(ESPEAK_RENDITIONS)
    test = rendition == 1
    return {"train_images": images[~test], "train_labels": labels[~test], "test_images": images[test],
            "test_labels": labels[test], "classes": WORDS, "sources": _sources("espeak-ng")}


def build_flite() -> dict:
    """The target domain: 300 clips of 5 flite voices; adaptation (train) and test renditions."""
    images, labels, groups = _render(_flite_jobs(_require("flite")))
    train = np.isin(groups, FLITE_TRAIN_RENDITIONS)
    return {"train_images": images[train], "train_labels": labels[train], "test_images": images[~train],
            "test_labels": labels[~train], "classes": WORDS, "sources": _sources("flite")}


def _sources(tool: str) -> dict:
    version = subprocess.run([_require(tool), "--version"], capture_output=True, text=True).stdout.strip()
    return {tool: version.splitlines()[0] if version else "unknown"}
