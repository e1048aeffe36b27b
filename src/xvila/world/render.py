"""The four aligned views of a scene: video, image (its first frame), audio and caption.

Shape legend: T frames, H = W = canvas, S audio samples. Images (3, H, W) and videos (T, 3, H, W) are float32 in
[0, 1]; audio (S,) is float32 in [-1, 1] at ``config.sample_rate``. Everything is a pure function of the scene
(and, for captions, of a seeded generator), so the same seed gives the same bytes.

The sound of a scene carries every captionable attribute, none of the hidden ones:
- colour -> pitch of the fundamental (notes three semitones apart, A3 to C5);
- shape  -> timbre, i.e. which of harmonics 2-5 sound (a code where any two shapes differ in at least two);
- size   -> rhythm and loudness: a small shape pulses (6 Hz), a large one sustains at twice the level;
- motion -> up / down glide the pitch 3 semitones up / down (centred on the note); left fades out, right fades
            in; still is steady.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from xvila.world.captions import caption
from xvila.world.geometry import coverage
from xvila.world.scene import PALETTE, Scene, WorldConfig, scene_from_seed, scene_rngs, split_allowed, split_seed

# ---- the audio mapping --------------------------------------------------------------------------------------------
NOTE_HZ: dict[str, float] = {  # colour -> fundamental (Hz), a ladder of minor thirds in hue order
    "red": 220.00,  # A3
    "yellow": 261.63,  # C4
    "green": 311.13,  # D#4
    "cyan": 369.99,  # F#4
    "blue": 440.00,  # A4
    "magenta": 523.25,  # C5
}
HARMONIC_LEVEL = 0.7  # amplitude of a sounding overtone, relative to the fundamental
HARMONICS: dict[str, tuple[int, ...]] = {  # shape -> which of harmonics 2, 3, 4, 5 sound (1 = on)
    "circle": (0, 0, 0, 0),  # pure sine
    "square": (0, 1, 0, 1),  # odd harmonics: hollow, square-wave like
    "triangle": (1, 1, 0, 0),  # harmonics 2, 3
    "diamond": (1, 0, 1, 0),  # octaves 2, 4: organ like
    "cross": (1, 1, 1, 1),  # all of 2-5: buzzy, sawtooth like
}
SIZE_LEVEL: dict[str, float] = {"small": 0.45, "large": 0.9}  # peak level
PULSE_HZ = 6.0  # a small shape's sound is amplitude-gated at this rate (raised cosine, full depth)
GLIDE_SEMITONES = 3.0  # total pitch glide of "up" / "down" over the clip, centred on the note
FADE_FLOOR = 0.15  # "left" fades from 1 to this level, "right" from this level to 1 (linear amplitude)
EDGE_SECONDS = 0.01  # raised-cosine ramps at both ends of the clip (no clicks)


def render_background(scene: Scene, config: WorldConfig) -> np.ndarray:
    """(3, H, W) float32: the tinted background with its faint sinusoidal texture."""
    n = config.canvas
    grid = (np.arange(n) + 0.5) / n  # (W,)
    angle, cycles, phase = scene.texture
    wave = np.sin(2 * np.pi * cycles * (grid[None, :] * math.cos(angle) + grid[:, None] * math.sin(angle)) + phase)
    bg = np.asarray(scene.background)[:, None, None] + config.background_texture * wave[None]  # (3, H, W)
    return bg.astype(np.float32)


def _composite(scene: Scene, config: WorldConfig, centres: np.ndarray) -> np.ndarray:
    alpha = coverage(scene.shape, centres, config.extent(scene.size), scene.rotation, config.canvas, config.supersample)
    alpha = alpha[:, None]  # (T, 1, H, W)
    colour = np.asarray(PALETTE[scene.colour], dtype=np.float32)[None, :, None, None]  # (1, 3, 1, 1)
    bg = render_background(scene, config)[None]  # (1, 3, H, W)
    return bg * (1 - alpha) + colour * alpha  # (T, 3, H, W)


def render_video(scene: Scene, config: WorldConfig) -> np.ndarray:
    """(T, 3, H, W) float32 in [0, 1]: the shape moving over the static background."""
    return _composite(scene, config, scene.track(config))


def render_image(scene: Scene, config: WorldConfig) -> np.ndarray:
    """(3, H, W) float32: the keyframe, bit-identical to ``render_video(scene, config)[0]``."""
    return _composite(scene, config, scene.track(config)[:1])[0]


def render_audio(scene: Scene, config: WorldConfig) -> np.ndarray:
    """(S,) float32 in [-1, 1]: the scene's sound (see the module docstring for the mapping)."""
    sr = config.sample_rate
    n = int(round(config.audio_seconds * sr))
    t = np.arange(n) / sr  # (S,) seconds
    frac = t / config.audio_seconds  # 0 .. 1 over the clip
    glide = {"up": 1.0, "down": -1.0}.get(scene.motion, 0.0) * GLIDE_SEMITONES * (frac - 0.5)
    freq = NOTE_HZ[scene.colour] * 2.0 ** (glide / 12.0)  # (S,) instantaneous fundamental
    phase = 2 * np.pi * (np.cumsum(freq) - freq[0]) / sr  # (S,) starts at 0
    amps = np.array((1.0,) + tuple(HARMONIC_LEVEL * h for h in HARMONICS[scene.shape]))  # (5,)
    k = np.arange(1, len(amps) + 1)
    tone = (amps[:, None] * np.sin(k[:, None] * phase[None])).sum(0) / amps.sum()  # (S,) peak <= 1
    env = np.full(n, SIZE_LEVEL[scene.size])
    if scene.size == "small":
        env *= 0.5 - 0.5 * np.cos(2 * np.pi * PULSE_HZ * t)
    if scene.motion == "left":
        env *= 1.0 + (FADE_FLOOR - 1.0) * frac
    elif scene.motion == "right":
        env *= FADE_FLOOR + (1.0 - FADE_FLOOR) * frac
    ramp = np.clip(np.minimum(t, config.audio_seconds - t) / EDGE_SECONDS, 0.0, 1.0)
    env *= 0.5 - 0.5 * np.cos(np.pi * ramp)
    return (tone * env).astype(np.float32)


@dataclass(frozen=True)
class WorldSample:
    """All four aligned views of one seed."""

    seed: int
    scene: Scene
    caption: str
    image: np.ndarray  # (3, H, W) float32 [0, 1], the first video frame
    video: np.ndarray  # (T, 3, H, W) float32 [0, 1]
    audio: np.ndarray  # (S,) float32 [-1, 1]


def render_sample(seed: int, config: WorldConfig, allowed: frozenset[tuple[str, str]] | None = None) -> WorldSample:
    """Scene, caption, image, video and audio of ``seed`` (the caption has its own generator stream)."""
    scene = scene_from_seed(seed, config, allowed)
    video = render_video(scene, config)
    return WorldSample(
        seed=seed,
        scene=scene,
        caption=caption(scene, scene_rngs(seed)[1]),
        image=video[0].copy(),
        video=video,
        audio=render_audio(scene, config),
    )


def split_sample(split: str, index: int, config: WorldConfig) -> WorldSample:
    """The ``index``-th sample of ``split`` ("train", "val", "test" or "compositional")."""
    return render_sample(split_seed(split, index, config), config, split_allowed(split, config))
