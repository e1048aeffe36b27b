"""Degradations that mimic a small generative model's output, for checking that the probes are robust.

Images and video: a 3x3 box blur, a slight per-channel colour shift (gain and offset) and Gaussian noise,
clipped back to [0, 1]. Audio: a gain change, a gentle low-pass and Gaussian noise, clipped to [-1, 1].
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.signal import lfilter


def degrade_image(
    img: np.ndarray,
    rng: np.random.Generator,
    noise: float = 0.07,
    blur: bool = True,
    colour_shift: float = 0.05,
) -> np.ndarray:
    """(3, H, W) -> (3, H, W) float32: blurred, colour-shifted by up to ``colour_shift``, noise of std ``noise``."""
    return degrade_video(np.asarray(img)[None], rng, noise, blur, colour_shift)[0]


def degrade_video(
    video: np.ndarray,
    rng: np.random.Generator,
    noise: float = 0.07,
    blur: bool = True,
    colour_shift: float = 0.05,
) -> np.ndarray:
    """(T, 3, H, W) -> (T, 3, H, W) float32; one colour shift for the clip, fresh noise on every frame."""
    x = np.asarray(video, dtype=np.float64)
    if blur:
        x = ndimage.uniform_filter(x, size=(1, 1, 3, 3), mode="nearest")
    gain = 1.0 + rng.uniform(-colour_shift, colour_shift, size=(1, 3, 1, 1))
    offset = rng.uniform(-colour_shift, colour_shift, size=(1, 3, 1, 1)) / 2
    x = x * gain + offset + rng.normal(0.0, noise, size=x.shape)
    return np.clip(x, 0.0, 1.0).astype(np.float32)


def degrade_audio(
    wave: np.ndarray,
    rng: np.random.Generator,
    noise: float = 0.03,
    gain: tuple[float, float] = (0.7, 1.3),
    lowpass: float = 0.3,
) -> np.ndarray:
    """(S,) -> (S,) float32: gain uniform in ``gain``, a one-pole low-pass (coefficient ``lowpass``), white noise."""
    x = np.asarray(wave, dtype=np.float64) * rng.uniform(*gain)
    if lowpass > 0:
        # y[n] = (1 - a) x[n] + a y[n-1]: about -3 dB at 4.4 kHz for a = 0.3 at 16 kHz
        x = lfilter([1.0 - lowpass], [1.0, -lowpass], x)
    x = x + rng.normal(0.0, noise, size=x.shape)
    return np.clip(x, -1.0, 1.0).astype(np.float32)
