"""Log-mel spectrograms in numpy: the audio front end, with fixed scaling shared by every domain.

25 ms Hann windows every 10 ms over one second at 16 kHz (98 frames), 512-point FFT, 40 triangular mel
bands (HTK mel scale, 20 Hz - 8 kHz), natural log of band power. Values map to [0, 1] with fixed
constants (not per-set statistics), so a model sees source and target domains through one mapping; frames
are averaged in pairs to 48, a compact image for integer inference.
"""
from __future__ import annotations

import numpy as np

SAMPLE_RATE = 16000
WINDOW, HOP, FFT, BANDS = 400, 160, 512, 40
LOG_FLOOR, LOG_SPAN = -14.0, 18.0  # log-power range mapped to [0, 1]


def mel_filters(bands: int = BANDS, fft: int = FFT, rate: int = SAMPLE_RATE, low: float = 20.0,
                high: float = 8000.0) -> np.ndarray:
    """(bands, fft // 2 + 1) triangular filters, equally spaced on the HTK mel scale."""
    def to_mel(f):
        return 2595.0 * np.log10(1.0 + f / 700.0)

    def to_hz(m):
        return 700.0 * (10 ** (m / 2595.0) - 1.0)

    edges = to_hz(np.linspace(to_mel(low), to_mel(high), bands + 2))
    freqs = np.linspace(0, rate / 2, fft // 2 + 1)
    rising = (freqs[None, :] - edges[:-2, None]) / (edges[1:-1, None] - edges[:-2, None])
    falling = (edges[2:, None] - freqs[None, :]) / (edges[2:, None] - edges[1:-1, None])
    return np.maximum(0.0, np.minimum(rising, falling))


def log_mel(audio: np.ndarray) -> np.ndarray:
    """(BANDS, frames) natural-log mel power of a mono float waveform at 16 kHz."""
    frames = 1 + (len(audio) - WINDOW) // HOP
    index = np.arange(WINDOW)[None, :] + HOP * np.arange(frames)[:, None]
    spectrum = np.abs(np.fft.rfft(audio[index] * np.hanning(WINDOW), FFT)) ** 2
    return np.log(mel_filters() @ spectrum.T + 1e-6)


def log_mel_image(audio: np.ndarray) -> np.ndarray:
    """(BANDS, 48) float32 in [0, 1]: the model's input for one clip."""
    values = log_mel(audio)
    pairs = values[:, :96].reshape(BANDS, 48, 2).mean(axis=2)
    return np.clip((pairs - LOG_FLOOR) / LOG_SPAN, 0.0, 1.0).astype(np.float32)
