"""Probes: deterministic, classical analysers that read a scene's attributes back from each view.

They judge generated media, so they read the content and nothing else: no learned weights, no access to the
scene. Every probe returns a dict with one entry per attribute its view can carry (``None`` where it finds no
recognisable content) and ``"confidence"``, a dict of floats in [0, 1] for the same attributes (0 for ``None``).

- image: segment by colour distance from the background (the median colour), estimate a soft coverage (alpha)
  along the background -> shape colour axis, then shape and size by matching shape templates scaled to the
  measured area (soft IoU, best of a few rotations, sharp or blurred), colour by hue, position by the
  alpha-weighted centroid.
- video: the image probe on every frame; votes for shape, colour and size; a line fitted to the centroid track
  gives the start position and the motion.
- audio: short-time spectra; pitch of the fundamental -> colour, strength of harmonics 2-5 -> shape, 6 Hz
  amplitude pulsing -> size, pitch glide and loudness trend -> motion.
- text: attribute words and their synonyms (the caption tables plus extra words).

Shape legend: T frames, H, W pixels, S audio samples.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from xvila.world.captions import COLOUR_WORDS, EXTRA_WORDS, SHAPE_WORDS, SIZE_WORDS
from xvila.world.geometry import UNIT_AREA, coverage
from xvila.world.render import FADE_FLOOR, GLIDE_SEMITONES, HARMONIC_LEVEL, HARMONICS, NOTE_HZ, PULSE_HZ
from xvila.world.scene import ATTRIBUTES, MOTION_VECTORS, PALETTE, Scene, WorldConfig

# What each view can carry; ``score`` is given one of these (or a subset, or with "position" added).
MODALITY_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "image": ("shape", "colour", "size"),
    "video": ATTRIBUTES,
    "audio": ATTRIBUTES,
    "text": ATTRIBUTES,
}

# ---- image thresholds (colour distances are Euclidean in RGB; areas are fractions of the canvas) -------------
DETECT_DISTANCE = 0.3  # distance of a 3x3-denoised pixel from the background above this: a candidate shape pixel
MIN_CONTRAST = 0.3  # the shape colour must differ at least this much from the background
MAX_BACKGROUND_SPREAD = 0.15  # 90th percentile of the 5x5-denoised distance of background pixels from their median
MIN_AREA = 0.02  # a blob smaller than this is noise (a small diamond covers ~4.9%)
MAX_AREA = 0.45  # a blob larger than this is not one shape (a large square covers ~25%)
MIN_IOU = 0.55  # best template soft IoU below this: no recognisable shape (clean samples score > 0.9)
MIN_CHROMA = 0.2  # max(rgb) - min(rgb) of the shape colour below this: no colour (a grey shape)
ROTATION_STEPS = 5  # template rotations tried, evenly from -max_rotation to max_rotation
TEMPLATE_SUPERSAMPLE = 2
# ---- audio thresholds ----------------------------------------------------------------------------------------
WINDOW, HOP, NFFT = 2048, 512, 8192  # samples at 16 kHz
MIN_RMS = 1e-3  # quieter than this is silence
MAX_PITCH_JITTER = 0.5  # semitones (weighted RMS) of the pitch track around its fitted line; clean is ~0.01
MIN_TONALITY = 10.0  # a frame's fundamental must hold this many times the noise floor's energy in its band
PULSE_THRESHOLD = 0.3  # envelope modulation index (std of envelope / its one-period moving average)


def _fade_log_ratio() -> float:
    """log(RMS of the last third / RMS of the first third) of a "right" fade-in (minus that for "left")."""
    f = np.linspace(0.0, 1.0, 3001)
    amp = FADE_FLOOR + (1.0 - FADE_FLOOR) * f
    return math.log(math.sqrt(np.mean(amp[f >= 2 / 3] ** 2)) / math.sqrt(np.mean(amp[f <= 1 / 3] ** 2)))


FADE_LOG_RATIO = _fade_log_ratio()  # ~1.05


def _hue(rgb: np.ndarray) -> float:
    """Hue in degrees [0, 360) of one RGB colour."""
    r, g, b = (float(v) for v in rgb)
    hi, lo = max(r, g, b), min(r, g, b)
    if hi - lo < 1e-9:
        return 0.0
    if hi == r:
        h = (g - b) / (hi - lo)
    elif hi == g:
        h = 2.0 + (b - r) / (hi - lo)
    else:
        h = 4.0 + (r - g) / (hi - lo)
    return (60.0 * h) % 360.0


_PALETTE_HUES = {name: _hue(np.asarray(rgb)) for name, rgb in PALETTE.items()}


def _to_numpy(x: Any, ndim: int, name: str) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, possibly on an accelerator or requiring grad
        x = x.detach().to("cpu").float().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name}: contains NaN or infinite values")
    return arr


def _empty(attributes: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {a: None for a in attributes}
    out["confidence"] = {a: 0.0 for a in attributes}
    return out


# ======================================================================================================== image


def _blur3(x: np.ndarray) -> np.ndarray:
    """3x3 box blur over the last two axes, edges replicated."""
    return ndimage.uniform_filter(x, size=(1,) * (x.ndim - 2) + (3, 3), mode="nearest")


def _segment(img: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Find the one shape of a (3, H, W) image: (alpha (H, W), shape colour (3,), background colour (3,)) or None."""
    x = np.clip(img, 0.0, 1.0)
    bg = np.median(x.reshape(3, -1), axis=1)  # (3,) the shape covers well under half the canvas
    diff = x - bg[:, None, None]  # (3, H, W)
    dist = np.sqrt((diff**2).sum(0))  # (H, W)
    smooth_dist = np.sqrt(((_blur3(x) - bg[:, None, None]) ** 2).sum(0))  # (H, W) distance after a 3x3 denoise
    labels, count = ndimage.label(smooth_dist > DETECT_DISTANCE)
    if count == 0:
        return None
    sizes = np.bincount(labels.ravel())[1:]
    blob = labels == (int(np.argmax(sizes)) + 1)  # (H, W) the largest connected candidate
    if not MIN_AREA <= blob.mean() <= MAX_AREA:
        return None
    near = ndimage.binary_dilation(blob, iterations=2)  # (H, W) the shape and its anti-aliased / blurred rim
    # the rest must be a plain background (not a second object, a photo or smooth noise); a 5x5 mean keeps pixel
    # noise (a generator's grain) out of this test and lets large-scale structure in
    denoised = ndimage.uniform_filter(x, size=(1, 5, 5), mode="nearest")  # (3, H, W)
    spread = np.sqrt(((denoised - bg[:, None, None]) ** 2).sum(0))[~near]
    if spread.size and np.quantile(spread, 0.9) > MAX_BACKGROUND_SPREAD:
        return None
    core = blob & (dist >= np.median(dist[blob]))  # the inner half: pure shape colour, no edge blend
    fg = np.median(x[:, core], axis=1)  # (3,)
    axis = fg - bg
    contrast = float(np.sqrt((axis**2).sum()))
    if contrast < MIN_CONTRAST:
        return None
    alpha = np.clip(np.tensordot(axis, diff, axes=1) / contrast**2, 0.0, 1.0)  # (H, W) soft coverage
    return alpha * near, fg, bg  # background noise away from the shape dropped


def _soft_iou(alpha: np.ndarray, templates: np.ndarray) -> np.ndarray:
    """alpha (H, W), templates (K, H, W) -> (K,) soft IoU."""
    inter = np.minimum(alpha[None], templates).sum(axis=(1, 2))
    union = np.maximum(alpha[None], templates).sum(axis=(1, 2))
    return inter / np.maximum(union, 1e-9)


def _match_shape(
    alpha: np.ndarray, centre: tuple[float, float], config: WorldConfig
) -> tuple[str | None, float, float, float]:
    """(shape or None, best soft IoU, IoU margin over the runner-up shape, extent of the best match)."""
    h, _ = alpha.shape
    area = float(alpha.sum()) / alpha.size  # canvas fraction
    rotations = np.unique(np.linspace(-config.max_rotation, config.max_rotation, ROTATION_STEPS))  # (R,)
    centres = np.repeat(np.array([centre]), len(rotations), axis=0)  # (R, 2)
    best: dict[str, tuple[float, float]] = {}
    for shape in config.shapes:
        extent = math.sqrt(area / UNIT_AREA[shape])
        templates = coverage(shape, centres, extent, rotations, h, TEMPLATE_SUPERSAMPLE)  # (R, H, W)
        # match sharp, blurred and twice blurred templates: a blurry input (a small generator's output) matches
        # a blurred template better than the right sharp one
        blurred = _blur3(templates)
        iou = max(_soft_iou(alpha, t).max() for t in (templates, blurred, _blur3(blurred)))
        best[shape] = (float(iou), extent)
    ranked = sorted(best, key=lambda s: best[s][0], reverse=True)
    top = best[ranked[0]][0]
    margin = top - best[ranked[1]][0] if len(ranked) > 1 else top
    return (ranked[0] if top >= MIN_IOU else None), top, margin, best[ranked[0]][1]


def _classify_colour(fg: np.ndarray, config: WorldConfig) -> tuple[str | None, float]:
    if float(fg.max() - fg.min()) < MIN_CHROMA:
        return None, 0.0
    hue = _hue(fg)
    gaps = {c: abs((hue - _PALETTE_HUES[c] + 180.0) % 360.0 - 180.0) for c in config.colours}
    ranked = sorted(gaps, key=gaps.get)
    if len(ranked) == 1:
        return ranked[0], 1.0
    # confidence: 1 on the palette hue, 0 half-way to the next nearest palette hue
    first, second = gaps[ranked[0]], gaps[ranked[1]]
    return ranked[0], float(np.clip(1.0 - 2.0 * first / max(first + second, 1e-9), 0.0, 1.0))


def _classify_size(extent: float, config: WorldConfig) -> tuple[str, float]:
    logs = np.log(np.asarray(config.size_extents))
    d = np.abs(logs - math.log(max(extent, 1e-6)))
    i = int(np.argmin(d))
    if len(logs) == 1:
        return config.sizes[0], 1.0
    half_gap = float(np.min(np.diff(logs))) / 2.0
    return config.sizes[i], float(np.clip(1.0 - d[i] / half_gap, 0.0, 1.0))


def _probe_frame(img: np.ndarray, config: WorldConfig) -> dict[str, Any]:
    out = _empty(("shape", "colour", "size", "position"))
    seg = _segment(img)
    if seg is None:
        return out
    alpha, fg, _ = seg
    h, w = alpha.shape
    total = float(alpha.sum())
    cy = float((alpha.sum(1) * (np.arange(h) + 0.5)).sum() / total / h)
    cx = float((alpha.sum(0) * (np.arange(w) + 0.5)).sum() / total / w)
    shape, iou, margin, extent = _match_shape(alpha, (cx, cy), config)
    if shape is None:  # a blob, but not one of our shapes: nothing recognisable
        return out
    colour, colour_conf = _classify_colour(fg, config)
    size, size_conf = _classify_size(extent, config)
    out.update(shape=shape, colour=colour, size=size, position=(cx, cy))
    out["confidence"] = {
        "shape": float(np.clip(margin / 0.1, 0.0, 1.0) * min(1.0, iou / 0.8)),
        "colour": colour_conf,
        "size": size_conf,
        "position": float(min(1.0, iou / 0.8)),
    }
    return out


def _check_frames(arr: np.ndarray, name: str) -> None:
    """arr: (..., 3, H, W) with H == W (the world's canvas is square)."""
    if arr.shape[-3] != 3 or arr.shape[-1] != arr.shape[-2] or arr.shape[-1] < 8:
        raise ValueError(f"{name}: expected channels first (..., 3, H, W) with H == W >= 8, got shape {arr.shape}")


def probe_image(img: Any, config: WorldConfig | None = None) -> dict[str, Any]:
    """Read shape, colour, size and position (x, y canvas fractions) from one (3, H, W) image in [0, 1]."""
    config = config or WorldConfig()
    arr = _to_numpy(img, 3, "probe_image")
    _check_frames(arr, "probe_image")
    return _probe_frame(arr, config)


def shape_mask(img: Any) -> np.ndarray:
    """(H, W) bool: the pixels at least half covered by the image's shape (all False when there is none)."""
    arr = _to_numpy(img, 3, "shape_mask")
    _check_frames(arr, "shape_mask")
    seg = _segment(arr)
    if seg is None:
        return np.zeros(arr.shape[1:], dtype=bool)
    return seg[0] > 0.5


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two boolean masks; 0 when both are empty."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


# ======================================================================================================== video


def _vote(frames: list[dict[str, Any]], attribute: str) -> tuple[Any, float]:
    """Confidence-weighted vote over frames; the confidence is the winner's share of the frames' weight."""
    weights: dict[Any, float] = {}
    for f in frames:
        if f[attribute] is not None:
            weights[f[attribute]] = weights.get(f[attribute], 0.0) + 0.1 + f["confidence"][attribute]
    if not weights:
        return None, 0.0
    winner = max(weights, key=weights.get)
    total = sum(0.1 + f["confidence"][attribute] for f in frames)
    return winner, float(weights[winner] / total)


def probe_video(video: Any, config: WorldConfig | None = None) -> dict[str, Any]:
    """Read shape, colour, size, motion and start position from one (T, 3, H, W) video in [0, 1]."""
    config = config or WorldConfig()
    arr = _to_numpy(video, 4, "probe_video")
    _check_frames(arr, "probe_video")
    if arr.shape[0] < 2:
        raise ValueError(f"probe_video: expected at least 2 frames, got shape {arr.shape}")
    out = _empty(ATTRIBUTES + ("position",))
    frames = [_probe_frame(f, config) for f in arr]
    seen = [(t, f) for t, f in enumerate(frames) if f["shape"] is not None]
    if 2 * len(seen) < len(frames):  # a shape on fewer than half the frames: not a clip of our world
        return out
    for attribute in ("shape", "colour", "size"):
        out[attribute], out["confidence"][attribute] = _vote([f for _, f in seen], attribute)
    # a straight line through the centroid track: x(t) = x0 + vx t, with t from 0 (first) to 1 (last frame)
    t = np.array([i for i, _ in seen]) / (len(frames) - 1)  # (N,)
    pos = np.array([f["position"] for _, f in seen])  # (N, 2)
    design = np.stack([np.ones_like(t), t], axis=1)  # (N, 2)
    (x0, y0), (vx, vy) = np.linalg.lstsq(design, pos, rcond=None)[0]
    out["position"] = (float(x0), float(y0))
    out["confidence"]["position"] = len(seen) / len(frames)
    # motion: displacement over the clip against half the world's travel
    speed = math.hypot(vx, vy)
    if speed < config.travel / 2:
        motion = "still"
        conf = 1.0 - speed / (config.travel / 2)
    else:
        direction = (int(np.sign(vx)), 0) if abs(vx) >= abs(vy) else (0, int(np.sign(vy)))
        motion = next(m for m, v in MOTION_VECTORS.items() if v == direction)
        conf = min(1.0, (speed - config.travel / 2) / (config.travel / 2)) * max(abs(vx), abs(vy)) / speed
    out["motion"] = motion if motion in config.motions else None
    out["confidence"]["motion"] = float(conf) if out["motion"] is not None else 0.0
    return out


# ======================================================================================================== audio


def _band_energy(cum: np.ndarray, step: float, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Energy of each frame's spectrum between lo and hi (Hz). cum: (F, bins+1) cumulative power; lo, hi (F, ...)."""
    bins = cum.shape[1] - 1
    i0 = np.clip(np.floor(lo / step).astype(int), 0, bins)
    i1 = np.clip(np.ceil(hi / step).astype(int) + 1, 0, bins)
    rows = np.arange(len(cum)).reshape((-1,) + (1,) * (lo.ndim - 1))
    return cum[rows, i1] - cum[rows, i0]


def _half_width(f: np.ndarray, sr: int) -> np.ndarray:
    """Half-width (Hz) of the band read around a partial at f: 3% (a glide's smear) or the window's main lobe."""
    return np.maximum(0.03 * f, 2.5 * sr / WINDOW)


@dataclass
class _PitchTrack:
    """Short-time analysis of a clip: one row per frame of WINDOW samples, every HOP samples."""

    times: np.ndarray  # (F,) frame centres, clip fractions
    f0: np.ndarray  # (F,) fundamental, Hz
    partials: np.ndarray  # (F, 8) energy of harmonics 1..8 above the noise floor
    energy: np.ndarray  # (F,) total energy
    voiced: np.ndarray  # (F,) bool: loud, with a fundamental well above the local noise floor


def _pitch_track(w: np.ndarray, sr: int, lo_hz: float, hi_hz: float) -> _PitchTrack:
    frames = np.lib.stride_tricks.sliding_window_view(w, WINDOW)[::HOP] * np.hanning(WINDOW)  # (F, WINDOW)
    power = np.abs(np.fft.rfft(frames, n=NFFT, axis=1)) ** 2  # (F, bins)
    freqs = np.fft.rfftfreq(NFFT, 1.0 / sr)  # (bins,)
    step = float(freqs[1])
    cum = np.concatenate([np.zeros((len(power), 1)), np.cumsum(power, axis=1)], axis=1)  # (F, bins+1)
    rows = np.arange(len(power))
    energy = power.sum(1)  # (F,)
    # the fundamental: the strongest peak in the notes' range (parabolic interpolation on log power), moved down to
    # its third or half when that carries energy (our fundamental is the loudest partial, a model's may not be)
    band = (freqs >= lo_hz) & (freqs <= hi_hz)
    peak = int(np.argmax(band)) + np.argmax(power[:, band], axis=1)  # (F,) bin index
    left, mid, right = (np.log(power[rows, np.clip(peak + d, 0, len(freqs) - 1)] + 1e-30) for d in (-1, 0, 1))
    curve = left - 2 * mid + right
    shift = 0.5 * (left - right) / np.where(np.abs(curve) > 1e-12, curve, 1e-12)
    f0 = (peak + np.clip(shift, -1, 1)) * step  # (F,) Hz
    e_peak = _band_energy(cum, step, f0 - _half_width(f0, sr), f0 + _half_width(f0, sr))
    for k in (3, 2):
        sub = f0 / k
        e_sub = _band_energy(cum, step, sub - _half_width(sub, sr), sub + _half_width(sub, sr))
        f0 = np.where((sub >= lo_hz) & (e_sub >= 0.25 * e_peak), sub, f0)
    # energy of harmonics 1..8, less the noise floor (white noise: mean power per bin = median / ln 2)
    fk = f0[:, None] * np.arange(1, 9)[None]  # (F, 8)
    lo_k, hi_k = fk - _half_width(fk, sr), fk + _half_width(fk, sr)
    width_k = (np.ceil(hi_k / step) + 1 - np.floor(lo_k / step)).clip(1)  # (F, 8) bins per band
    audible = (freqs >= 80.0) & (freqs <= 5000.0)
    floor = np.median(power[:, audible], axis=1) / math.log(2)  # (F,)
    partials = np.maximum(_band_energy(cum, step, lo_k, hi_k) - floor[:, None] * width_k, 0.0)  # (F, 8)
    # tonality: the fundamental over the LOCAL floor (within half an octave), so that noise with a steep spectrum
    # (brown, pink) does not pass for a tone
    near = (freqs[None] >= f0[:, None] * 2**-0.5) & (freqs[None] <= f0[:, None] * 2**0.5)  # (F, bins)
    local_floor = np.nanmedian(np.where(near, power, np.nan), axis=1) / math.log(2)  # (F,)
    tonality = partials[:, 0] / np.maximum(local_floor * width_k[:, 0], 1e-30)  # (F,)
    loud = energy >= 0.1 * energy.max()  # frames worth reading (a fade-out's tail is not)
    times = (np.arange(len(power)) * HOP + WINDOW / 2) / len(w)  # (F,)
    return _PitchTrack(times, f0, partials, energy, loud & (tonality >= MIN_TONALITY))


def _band_pass(w: np.ndarray, sr: int, lo_hz: float, hi_hz: float) -> np.ndarray:
    spectrum = np.fft.rfft(w)
    freqs = np.fft.rfftfreq(len(w), 1.0 / sr)
    return np.fft.irfft(spectrum * ((freqs >= lo_hz) & (freqs <= hi_hz)), n=len(w))


def _pulse_modulation(signal: np.ndarray, sr: int) -> float:
    """Std of the 10 ms RMS envelope around its moving average over one pulse period (0 steady, ~0.7 pulsed)."""
    hop = sr // 100
    env = np.sqrt(np.mean(signal[: len(signal) // hop * hop].reshape(-1, hop) ** 2, axis=1))  # (E,)
    period = int(round(100 / PULSE_HZ))
    smooth = np.convolve(env, np.ones(period) / period, mode="valid")  # (E - period + 1,)
    centred = env[period // 2 : period // 2 + len(smooth)]
    return float(np.std(centred / np.maximum(smooth, 1e-12)))


def _nearest(value: float, centres: dict[str, float], half_gap: float) -> tuple[str, float]:
    """The centre nearest ``value`` and a confidence: 1 on it, 0 at ``half_gap`` away."""
    best = min(centres, key=lambda c: abs(centres[c] - value))
    return best, float(np.clip(1.0 - abs(centres[best] - value) / half_gap, 0.0, 1.0))


def probe_audio(wave: Any, config: WorldConfig | None = None) -> dict[str, Any]:
    """Read shape, colour, size and motion from one (S,) waveform in [-1, 1] at ``config.sample_rate``."""
    config = config or WorldConfig()
    w = _to_numpy(wave, 1, "probe_audio")
    out = _empty(ATTRIBUTES)
    sr = config.sample_rate
    if len(w) < 2 * WINDOW or math.sqrt(float(np.mean(w**2))) < MIN_RMS:
        return out  # too short, or silence
    w = w - w.mean()
    notes = {c: 12 * math.log2(NOTE_HZ[c] / NOTE_HZ["red"]) for c in config.colours}  # semitones above A3
    lo_hz = NOTE_HZ["red"] * 2 ** ((min(notes.values()) - 3) / 12)
    hi_hz = NOTE_HZ["red"] * 2 ** ((max(notes.values()) + 3) / 12)
    track = _pitch_track(w, sr, lo_hz, hi_hz)
    v = track.voiced
    if v.sum() < 3 or v.sum() < 0.5 * (track.energy >= 0.1 * track.energy.max()).sum():
        return out  # no steady pitched tone: noise, or not our world
    # pitch line: semitones against time, energy weighted; a world sound is a steady note or a straight glide
    weights = track.energy[v] / track.energy[v].sum()
    semis = 12 * np.log2(track.f0[v] / NOTE_HZ["red"])  # (V,)
    t = track.times[v]
    tm, sm = float((weights * t).sum()), float((weights * semis).sum())
    glide = float((weights * (t - tm) * (semis - sm)).sum() / max(float((weights * (t - tm) ** 2).sum()), 1e-9))
    jitter = math.sqrt(float((weights * (semis - sm - glide * (t - tm)) ** 2).sum()))
    if jitter > MAX_PITCH_JITTER:
        return out  # the pitch wanders: not a world sound
    # colour: the median pitch (a glide is centred on its note); notes are 3 semitones apart
    centre = float(np.median(semis))
    out["colour"], out["confidence"]["colour"] = _nearest(centre, notes, 1.5)
    # shape: which of harmonics 2..5 sound. Presence = sqrt(amplitude relative to the fundamental / HARMONIC_LEVEL),
    # clipped to [0, 1], against the on/off codes: the square root puts the on/off boundary 12 dB below a
    # sounding harmonic's level, so a duller (low-passed) copy keeps its timbre.
    ratios = np.sqrt(track.partials[v, 1:5] / np.maximum(track.partials[v, :1], 1e-30))  # (V, 4) amplitude ratios
    presence = np.sqrt(np.clip(np.median(ratios, axis=0) / HARMONIC_LEVEL, 0.0, 1.0))  # (4,)
    dists = {s: float(np.sqrt(((presence - np.asarray(HARMONICS[s])) ** 2).sum())) for s in config.shapes}
    ranked = sorted(dists, key=dists.get)
    out["shape"] = ranked[0]
    second = dists[ranked[1]] if len(ranked) > 1 else math.sqrt(2)  # any two codes are >= sqrt(2) apart
    out["confidence"]["shape"] = float(np.clip((second - dists[ranked[0]]) / math.sqrt(2), 0.0, 1.0))
    # size and the loudness trend, read on the fundamental alone (band-passed around the note, glide included) so
    # that broadband noise stays out; small shapes pulse, the trend is last third against first third
    reach = 2 ** ((GLIDE_SEMITONES / 2 + 1) / 12)
    f_centre = NOTE_HZ["red"] * 2 ** (centre / 12)
    fundamental = _band_pass(w, sr, f_centre / reach, f_centre * reach)  # (S,)
    modulation = _pulse_modulation(fundamental, sr)
    size = "small" if modulation >= PULSE_THRESHOLD else "large"
    if size in config.sizes:
        out["size"] = size
        out["confidence"]["size"] = float(np.clip(abs(modulation - PULSE_THRESHOLD) / PULSE_THRESHOLD, 0.0, 1.0))
    third = len(w) // 3
    trend = 0.5 * math.log(
        max(float(np.mean(fundamental[-third:] ** 2)), 1e-18) / max(float(np.mean(fundamental[:third] ** 2)), 1e-18)
    )
    # motion: the stronger of glide (up / down) and trend (right fades in, left fades out), each against half its
    # clean value; below both halves it is still
    glide_n, trend_n = glide / GLIDE_SEMITONES, trend / FADE_LOG_RATIO
    if max(abs(glide_n), abs(trend_n)) < 0.5:
        motion, conf = "still", 1.0 - 2 * max(abs(glide_n), abs(trend_n))
    elif abs(glide_n) >= abs(trend_n):
        motion, conf = ("up" if glide > 0 else "down"), min(1.0, 2 * abs(glide_n) - 1)
    else:
        motion, conf = ("right" if trend > 0 else "left"), min(1.0, 2 * abs(trend_n) - 1)
    if motion in config.motions:
        out["motion"], out["confidence"]["motion"] = motion, float(conf)
    return out


# ========================================================================================================= text


def _word_pattern(words: list[str]) -> re.Pattern[str]:
    alternatives = sorted({re.escape(w).replace(r"\ ", r"\s+") for w in words}, key=len, reverse=True)
    return re.compile(r"\b(?:" + "|".join(alternatives) + r")(?:s|es)?\b", re.IGNORECASE)


def _text_patterns() -> dict[str, dict[str, re.Pattern[str]]]:
    tables = {"shape": SHAPE_WORDS, "colour": COLOUR_WORDS, "size": SIZE_WORDS}
    patterns = {
        attribute: {
            value: _word_pattern(list(words) + list(EXTRA_WORDS[attribute].get(value, ())))
            for value, words in table.items()
        }
        for attribute, table in tables.items()
    }
    patterns["motion"] = {
        "left": re.compile(r"\b(?:left|leftwards?|westwards?)\b", re.IGNORECASE),
        "right": re.compile(r"\b(?:right|rightwards?|eastwards?)\b", re.IGNORECASE),
        "up": re.compile(r"\b(?:up|upwards?|ris(?:e|es|ing)|climb(?:s|ing)?|ascend(?:s|ing)?)\b", re.IGNORECASE),
        "down": re.compile(
            r"\b(?:down|downwards?|fall(?:s|ing)?|sink(?:s|ing)?|drop(?:s|ping)?|descend(?:s|ing)?)\b",
            re.IGNORECASE,
        ),
        "still": re.compile(
            r"\b(?:still|static|stationary|motionless|unmoving|immobile|not\s+moving|does\s*n[o']?t\s+move|"
            r"stays\s+put|in\s+place|at\s+rest)\b",
            re.IGNORECASE,
        ),
    }
    return patterns


_TEXT_PATTERNS = _text_patterns()


def probe_text(text: str, config: WorldConfig | None = None) -> dict[str, Any]:
    """Read the attribute words (synonyms included) from text; an attribute it does not mention is None.

    The first value mentioned wins; the confidence is 1 when the text names one value, 0.5 when it names several.
    A direction word beats a "still" word ("it is still moving left" moves left).
    """
    config = config or WorldConfig()
    if not isinstance(text, str):
        raise ValueError(f"probe_text: expected a str, got {type(text).__name__}")
    vocab = {"shape": config.shapes, "colour": config.colours, "size": config.sizes, "motion": config.motions}
    out = _empty(ATTRIBUTES)
    for attribute, patterns in _TEXT_PATTERNS.items():
        hits = {}
        for value, pattern in patterns.items():
            m = pattern.search(text)
            if m is not None and value in vocab[attribute]:
                hits[value] = m.start()
        if attribute == "motion" and len(hits) > 1:
            hits.pop("still", None)
        if hits:
            out[attribute] = min(hits, key=hits.get)
            out["confidence"][attribute] = 1.0 if len(hits) == 1 else 0.5
    return out


# ======================================================================================================== score


def score(
    pred: dict[str, Any] | None,
    truth: Scene,
    attributes: tuple[str, ...],
    position_tolerance: float = 0.1,
) -> float:
    """Fraction of ``attributes`` that ``pred`` gets right (0 for None or an empty prediction).

    Score only what the view can carry (``MODALITY_ATTRIBUTES``). "position" counts as right when the predicted
    (start) position is within ``position_tolerance`` (canvas fractions) of the scene's.
    """
    if not attributes:
        raise ValueError("score: give at least one attribute, e.g. MODALITY_ATTRIBUTES['image']")
    unknown = set(attributes) - set(ATTRIBUTES) - {"position"}
    if unknown:
        raise ValueError(f"score: unknown attributes {sorted(unknown)}; known: {list(ATTRIBUTES) + ['position']}")
    if pred is None:
        return 0.0
    right = 0
    for attribute in attributes:
        value = pred.get(attribute)
        if attribute == "position":
            right += value is not None and math.hypot(value[0] - truth.x, value[1] - truth.y) <= position_tolerance
        else:
            right += value is not None and value == getattr(truth, attribute)
    return right / len(attributes)


MEDIA_PROBES = {"image": probe_image, "video": probe_video, "audio": probe_audio}


def caption_accuracy(modality: str, media: Any, captions: list[str]) -> dict[str, float]:
    """Per attribute of ``modality``: the share of the items of ``media`` whose probe reading equals what their
    caption (read by :func:`probe_text`) names; attributes a caption leaves out are not counted for it."""
    right: dict[str, int] = {}
    seen: dict[str, int] = {}
    for x, caption in zip(media, captions, strict=True):
        truth, got = probe_text(caption), MEDIA_PROBES[modality](x)
        for a in MODALITY_ATTRIBUTES[modality]:
            if truth[a] is not None:
                seen[a] = seen.get(a, 0) + 1
                right[a] = right.get(a, 0) + (got.get(a) == truth[a])
    return {a: round(right[a] / seen[a], 3) for a in seen}
