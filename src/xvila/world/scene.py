"""The toy world's vocabularies, its config, one scene, how scenes are drawn, and the splits.

A scene is one coloured shape on a dark, lightly tinted and textured background. Shape, colour, size and motion
are what a caption names; the start position, the small rotation and the background are hidden details that no
caption mentions (the start position is the one the visual embedding highway must carry).

Coordinates are canvas fractions: x from 0 (left edge) to 1 (right edge), y from 0 (top) to 1 (bottom), so a
scene means the same thing at any canvas size.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from xvila.configuration import Config
from xvila.world.geometry import SHAPES, rotated_bounds

# Well separated hues (about 50-75 degrees apart), bright against the dark background.
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.15, 0.15),
    "yellow": (0.95, 0.85, 0.10),
    "green": (0.15, 0.78, 0.20),
    "cyan": (0.10, 0.85, 0.85),
    "blue": (0.20, 0.30, 1.00),
    "magenta": (0.88, 0.18, 0.85),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
SIZES: tuple[str, ...] = ("small", "large")
MOTIONS: tuple[str, ...] = ("still", "left", "right", "up", "down")
# Unit direction of each motion on the canvas (y points down, so "up" decreases y).
MOTION_VECTORS: dict[str, tuple[int, int]] = {
    "still": (0, 0),
    "left": (-1, 0),
    "right": (1, 0),
    "up": (0, -1),
    "down": (0, 1),
}
ATTRIBUTES: tuple[str, ...] = ("shape", "colour", "size", "motion")
SPLITS: tuple[str, ...] = ("train", "val", "test", "compositional")

# One held-out colour per shape (green is never held out): every shape and every colour still occurs in training.
HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("circle", "blue"),
    ("square", "yellow"),
    ("triangle", "magenta"),
    ("diamond", "cyan"),
    ("cross", "red"),
)


@dataclass(frozen=True)
class WorldConfig(Config):
    """Everything that fixes the world's pixels, samples and splits. Lengths are canvas fractions."""

    canvas: int = 32  # H = W, pixels
    frames: int = 8  # T
    fps: float = 8.0
    audio_seconds: float = 1.0  # must equal frames / fps: the views are aligned in time
    sample_rate: int = 16000
    shapes: tuple[str, ...] = SHAPES
    colours: tuple[str, ...] = COLOURS
    sizes: tuple[str, ...] = SIZES
    motions: tuple[str, ...] = MOTIONS
    size_extents: tuple[float, ...] = (0.3125, 0.5)  # side of the unrotated bounding box, one per size (10, 16 px)
    travel: float = 0.25  # distance a moving shape covers from the first to the last frame (8 px)
    margin: float = 0.03  # smallest gap between the shape and the canvas edge, on every frame
    max_rotation: float = 8.0  # degrees; rotation is uniform in [-max, max]
    background_level: float = 0.12  # grey level of the background
    background_tint: float = 0.04  # per-channel tint, uniform in [-tint, tint]
    background_texture: float = 0.03  # amplitude of a faint sinusoidal texture
    supersample: int = 4  # anti-aliasing: supersample^2 samples per pixel
    held_out_pairs: tuple[tuple[str, str], ...] = HELD_OUT_PAIRS
    train_seeds: tuple[int, int] = (0, 1_000_000)  # [start, end)
    val_seeds: tuple[int, int] = (1_000_000, 1_100_000)
    test_seeds: tuple[int, int] = (1_100_000, 1_200_000)
    compositional_seeds: tuple[int, int] = (1_200_000, 1_300_000)

    def __post_init__(self) -> None:
        if self.canvas < 16:
            raise ValueError(f"canvas must be at least 16 pixels (small shapes stay recognisable), got {self.canvas}")
        if self.frames < 2:
            raise ValueError(f"frames must be at least 2 so that motion is visible, got {self.frames}")
        if self.fps <= 0 or self.audio_seconds <= 0:
            raise ValueError(f"fps and audio_seconds must be positive, got {self.fps} and {self.audio_seconds}")
        if not math.isclose(self.frames / self.fps, self.audio_seconds, rel_tol=1e-6):
            raise ValueError(
                f"the video lasts frames / fps = {self.frames / self.fps:g} s but audio_seconds is "
                f"{self.audio_seconds:g}: set them equal so that the views stay aligned in time"
            )
        if self.sample_rate < 8000:
            raise ValueError(f"sample_rate must be at least 8000 Hz (harmonics reach ~3 kHz), got {self.sample_rate}")
        for name, values, known in (
            ("shapes", self.shapes, SHAPES),
            ("colours", self.colours, COLOURS),
            ("sizes", self.sizes, SIZES),
            ("motions", self.motions, MOTIONS),
        ):
            if not values or len(set(values)) != len(values) or not set(values) <= set(known):
                raise ValueError(f"{name} must be distinct values from {list(known)}, got {list(values)}")
        if len(self.size_extents) != len(self.sizes) or list(self.size_extents) != sorted(set(self.size_extents)):
            raise ValueError(
                f"size_extents must give one increasing extent per size {list(self.sizes)}, got {self.size_extents}"
            )
        if min(self.size_extents) < 0.25:
            raise ValueError(f"the smallest extent must span at least a quarter of the canvas, got {self.size_extents}")
        if not 0 < self.travel < 1 or not 0 <= self.margin < 0.25 or not 0 <= self.max_rotation <= 20:
            raise ValueError(
                f"need 0 < travel < 1, 0 <= margin < 0.25 and 0 <= max_rotation <= 20 degrees "
                f"(more would blur square and diamond), got {self.travel}, {self.margin}, {self.max_rotation}"
            )
        for shape in self.shapes:  # every shape must fit, moving, at the largest size and the worst rotation
            for rotation in (-self.max_rotation, 0.0, self.max_rotation):
                for motion in self.motions:
                    lo, hi = start_range(shape, max(self.size_extents), rotation, motion, self)
                    if not (lo[0] <= hi[0] and lo[1] <= hi[1]):
                        raise ValueError(
                            f"a large {shape} moving {motion} does not fit on the canvas: lower travel, margin or "
                            f"size_extents (got {self.travel}, {self.margin}, {self.size_extents})"
                        )
        if self.supersample < 1:
            raise ValueError(f"supersample must be at least 1, got {self.supersample}")
        if not 0 < self.background_level < 0.5 or self.background_tint < 0 or self.background_texture < 0:
            raise ValueError("the background must stay dark (0 < background_level < 0.5, tint and texture >= 0)")
        if self.background_level + self.background_tint + self.background_texture > 0.3:
            raise ValueError("background_level + background_tint + background_texture must stay <= 0.3 (dark)")
        pairs = list(self.held_out_pairs)
        if len(set(pairs)) != len(pairs) or not all(s in self.shapes and c in self.colours for s, c in pairs):
            raise ValueError(f"held_out_pairs must be distinct (shape, colour) pairs of the vocabularies, got {pairs}")
        kept = {(s, c) for s in self.shapes for c in self.colours} - set(pairs)
        if {s for s, _ in kept} != set(self.shapes) or {c for _, c in kept} != set(self.colours):
            raise ValueError("held_out_pairs must leave every shape and every colour at least one training pair")
        ranges = sorted((self.seed_range(split), split) for split in SPLITS)
        for (a, name_a), (b, name_b) in itertools.pairwise(ranges):
            if a[1] > b[0]:
                raise ValueError(f"seed ranges of {name_a} {a} and {name_b} {b} overlap: splits must be disjoint")
        if any(r[0] < 0 or r[0] >= r[1] for r, _ in ranges):
            raise ValueError(f"each seed range must be [start, end) with 0 <= start < end, got {ranges}")

    def extent(self, size: str) -> float:
        return self.size_extents[self.sizes.index(size)]

    def seed_range(self, split: str) -> tuple[int, int]:
        """[start, end) of the seeds of ``split``."""
        ranges = {
            "train": self.train_seeds,
            "val": self.val_seeds,
            "test": self.test_seeds,
            "compositional": self.compositional_seeds,
        }
        if split not in ranges:
            raise ValueError(f"unknown split {split!r}; known splits: {list(SPLITS)}")
        return ranges[split]


@dataclass(frozen=True)
class Scene(Config):
    """One scene. The first four fields are what a caption says; the rest are hidden details."""

    shape: str
    colour: str
    size: str
    motion: str
    x: float  # area centroid on the first frame, canvas fractions
    y: float
    rotation: float  # degrees, clockwise on screen
    background: tuple[float, float, float]  # RGB of the tinted background
    texture: tuple[float, float, float]  # background texture: orientation (rad), cycles per canvas, phase (rad)

    def __post_init__(self) -> None:
        for name, value, known in (
            ("shape", self.shape, SHAPES),
            ("colour", self.colour, COLOURS),
            ("size", self.size, SIZES),
            ("motion", self.motion, MOTIONS),
        ):
            if value not in known:
                raise ValueError(f"unknown {name} {value!r}; known: {list(known)}")

    def attributes(self) -> dict[str, str]:
        """The captionable attributes: shape, colour, size, motion."""
        return {name: getattr(self, name) for name in ATTRIBUTES}

    def track(self, config: WorldConfig) -> np.ndarray:
        """(T, 2) area centroid (x, y) on every frame, canvas fractions; linear from the first to the last frame."""
        dx, dy = MOTION_VECTORS[self.motion]
        t = np.arange(config.frames) / (config.frames - 1)  # (T,) from 0 to 1
        return np.stack([self.x + dx * config.travel * t, self.y + dy * config.travel * t], axis=1)


def start_range(
    shape: str, extent: float, rotation: float, motion: str, config: WorldConfig
) -> tuple[tuple[float, float], tuple[float, float]]:
    """((xmin, ymin), (xmax, ymax)) of start centroids that keep the shape ``margin`` inside the canvas all clip."""
    bx0, bx1, by0, by1 = (b * extent for b in rotated_bounds(shape, rotation))
    dx, dy = (d * config.travel for d in MOTION_VECTORS[motion])
    lo = (config.margin - bx0 + max(0.0, -dx), config.margin - by0 + max(0.0, -dy))
    hi = (1 - config.margin - bx1 - max(0.0, dx), 1 - config.margin - by1 - max(0.0, dy))
    return lo, hi


def sample_scene(
    rng: np.random.Generator,
    config: WorldConfig,
    allowed: frozenset[tuple[str, str]] | None = None,
) -> Scene:
    """Draw one scene. ``allowed``: the (shape, colour) pairs to draw from (all pairs of the config if None).

    The (shape, colour) pair is uniform over ``allowed`` (with all pairs this is shape and colour drawn
    independently); size, motion and the hidden details are drawn independently of it.
    """
    pairs = sorted(allowed) if allowed is not None else [(s, c) for s in config.shapes for c in config.colours]
    bad = [p for p in pairs if p[0] not in config.shapes or p[1] not in config.colours]
    if not pairs or bad:
        raise ValueError(f"allowed must be a non-empty set of (shape, colour) pairs of the config; bad: {bad}")
    shape, colour = pairs[rng.integers(len(pairs))]
    size = config.sizes[rng.integers(len(config.sizes))]
    motion = config.motions[rng.integers(len(config.motions))]
    rotation = float(rng.uniform(-config.max_rotation, config.max_rotation))
    lo, hi = start_range(shape, config.extent(size), rotation, motion, config)
    x, y = (float(v) for v in rng.uniform(lo, hi))
    background = config.background_level + rng.uniform(-config.background_tint, config.background_tint, size=3)
    texture = (float(rng.uniform(0, math.pi)), float(rng.uniform(1.0, 3.0)), float(rng.uniform(0, 2 * math.pi)))
    return Scene(
        shape=shape,
        colour=colour,
        size=size,
        motion=motion,
        x=x,
        y=y,
        rotation=rotation,
        background=tuple(float(v) for v in background),
        texture=texture,
    )


def split_allowed(split: str, config: WorldConfig) -> frozenset[tuple[str, str]]:
    """The (shape, colour) pairs a split draws from: held-out pairs for ``compositional``, the rest otherwise."""
    all_pairs = {(s, c) for s in config.shapes for c in config.colours}
    held_out = set(config.held_out_pairs)
    if split == "compositional":
        return frozenset(held_out)
    if split in ("train", "val", "test"):
        return frozenset(all_pairs - held_out)
    raise ValueError(f"unknown split {split!r}; known splits: {list(SPLITS)}")


def split_seed(split: str, index: int, config: WorldConfig) -> int:
    """The seed of the ``index``-th scene of ``split``."""
    start, end = config.seed_range(split)
    if not 0 <= index < end - start:
        raise ValueError(f"index {index} is outside split {split!r}, which holds {end - start} scenes")
    return start + index


def scene_rngs(seed: int) -> tuple[np.random.Generator, np.random.Generator]:
    """Independent generators for a seed's scene and its caption (changing one never changes the other)."""
    if seed < 0:
        raise ValueError(f"seeds must be non-negative, got {seed}")
    return np.random.default_rng([seed, 0]), np.random.default_rng([seed, 1])


def scene_from_seed(seed: int, config: WorldConfig, allowed: frozenset[tuple[str, str]] | None = None) -> Scene:
    return sample_scene(scene_rngs(seed)[0], config, allowed)


def split_scene(split: str, index: int, config: WorldConfig) -> Scene:
    return scene_from_seed(split_seed(split, index, config), config, split_allowed(split, config))
