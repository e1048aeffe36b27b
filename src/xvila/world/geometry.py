"""Shape geometry shared by the renderer and the probes.

Shapes live in shape-local units: extent 1 (the side of the unrotated bounding box), the area centroid at the
origin, ``v`` pointing down (image rows). A scene position is therefore the shape's area centroid, which is what
the probes measure (an alpha-weighted mean), so position has no per-shape offset.

Rotation ``r`` (degrees) maps a local point (u, v) to canvas offset ``extent * R(r) @ (u, v)``; with y pointing
down a positive angle turns the shape clockwise on screen.
"""

from __future__ import annotations

import math

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")

CROSS_ARM = 1.0 / 3.0  # arm width of the cross, as a fraction of its extent

# Exact areas in shape-local units (extent 1); the probes turn a measured area into an extent with these.
UNIT_AREA: dict[str, float] = {
    "circle": math.pi / 4.0,
    "square": 1.0,
    "triangle": 0.5,  # base 1, height 1
    "diamond": 0.5,  # a square with diagonal 1
    "cross": 2.0 * CROSS_ARM - CROSS_ARM**2,
}

_A = CROSS_ARM / 2.0
# Outline vertices (u, v), used for the rotated bounding box that keeps a shape on the canvas.
_VERTICES: dict[str, np.ndarray] = {
    "circle": np.stack([0.5 * np.cos(np.linspace(0, 2 * np.pi, 73)), 0.5 * np.sin(np.linspace(0, 2 * np.pi, 73))], 1),
    "square": np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]]),
    # apex up; the centroid is a third of the height above the base
    "triangle": np.array([[0.0, -2.0 / 3.0], [0.5, 1.0 / 3.0], [-0.5, 1.0 / 3.0]]),
    "diamond": np.array([[0.0, -0.5], [0.5, 0.0], [0.0, 0.5], [-0.5, 0.0]]),
    "cross": np.array(
        [
            [-_A, -0.5],
            [_A, -0.5],
            [_A, -_A],
            [0.5, -_A],
            [0.5, _A],
            [_A, _A],
            [_A, 0.5],
            [-_A, 0.5],
            [-_A, _A],
            [-0.5, _A],
            [-0.5, -_A],
            [-_A, -_A],
        ]
    ),
}


def check_shape(shape: str) -> None:
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known shapes: {list(SHAPES)}")


def shape_inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of the local points (u, v) that lie inside ``shape`` (any broadcastable shapes)."""
    if shape == "circle":
        return u * u + v * v <= 0.25
    au, av = np.abs(u), np.abs(v)
    if shape == "square":
        return np.maximum(au, av) <= 0.5
    if shape == "diamond":
        return au + av <= 0.5
    if shape == "cross":
        return (np.maximum(au, av) <= 0.5) & (np.minimum(au, av) <= _A)
    if shape == "triangle":
        # half-width grows linearly from 0 at the apex (v = -2/3) to 1/2 at the base (v = 1/3)
        return (v <= 1.0 / 3.0) & (au <= 0.5 * (v + 2.0 / 3.0))
    check_shape(shape)
    raise AssertionError("unreachable")


def rotated_bounds(shape: str, rotation: float) -> tuple[float, float, float, float]:
    """(xmin, xmax, ymin, ymax) of the shape rotated by ``rotation`` degrees, in units of its extent."""
    check_shape(shape)
    c, s = math.cos(math.radians(rotation)), math.sin(math.radians(rotation))
    u, v = _VERTICES[shape][:, 0], _VERTICES[shape][:, 1]
    x, y = c * u - s * v, s * u + c * v
    return float(x.min()), float(x.max()), float(y.min()), float(y.max())


def coverage(
    shape: str,
    centres: np.ndarray,
    extent: float,
    rotation: float | np.ndarray,
    canvas: int,
    supersample: int,
) -> np.ndarray:
    """Anti-aliased coverage of ``shape`` on a square canvas, one map per centre.

    centres: (T, 2) area centroids (x, y) in canvas fractions; rotation: degrees, one for all or one per centre (T,).
    Returns (T, H, W) float32 in [0, 1]: the fraction of the ``supersample``^2 sub-pixel samples of each pixel that
    fall inside the shape. Only a box around the shape is sampled (the same box size on every frame), which makes
    this several times faster than sampling the full canvas.
    """
    centres = np.asarray(centres, dtype=np.float64).reshape(-1, 2)
    frames, n = len(centres), canvas * supersample
    rotation = np.broadcast_to(np.asarray(rotation, dtype=np.float64), (frames,))  # (T,)
    bounds = np.array([rotated_bounds(shape, r) for r in np.unique(rotation)])  # (R, 4)
    bx0, by0 = bounds[:, 0].min(), bounds[:, 2].min()
    bx1, by1 = bounds[:, 1].max(), bounds[:, 3].max()
    box = min(canvas, math.ceil(canvas * extent * max(bx1 - bx0, by1 - by0)) + 2)  # pixels, covers the shape
    first_x = np.clip(np.floor(canvas * (centres[:, 0] + bx0 * extent)).astype(int) - 1, 0, canvas - box)  # (T,)
    first_y = np.clip(np.floor(canvas * (centres[:, 1] + by0 * extent)).astype(int) - 1, 0, canvas - box)
    sub = np.arange(box * supersample)
    # sample positions in canvas fractions, computed as (j + 0.5) / n for global sub-sample index j (exactly as a
    # full-canvas grid would), so a frame's coverage does not depend on which other frames are rendered with it
    xs = (first_x[:, None] * supersample + sub[None] + 0.5) / n  # (T, b)
    ys = (first_y[:, None] * supersample + sub[None] + 0.5) / n
    radians = np.radians(rotation)[:, None, None]  # (T, 1, 1)
    c, s = np.cos(radians), np.sin(radians)
    dx = ((xs - centres[:, :1]) / extent)[:, None, :]  # (T, 1, b)
    dy = ((ys - centres[:, 1:]) / extent)[:, :, None]  # (T, b, 1)
    inside = shape_inside(shape, dx * c + dy * s, dy * c - dx * s)  # (T, b, b), the inverse rotation
    counts = inside.reshape(frames, box, supersample, box, supersample).sum(axis=(2, 4), dtype=np.int32)
    out = np.zeros((frames, canvas, canvas), dtype=np.float32)
    rows = (first_y[:, None] + np.arange(box))[:, :, None]  # (T, box, 1)
    cols = (first_x[:, None] + np.arange(box))[:, None, :]  # (T, 1, box)
    out[np.arange(frames)[:, None, None], rows, cols] = counts / np.float32(supersample * supersample)
    return out  # (T, H, W)
