"""Reading and writing media files in the repository's tensor conventions (numpy, PIL, PyAV, soundfile only).

- image: (3, H, W) float in [0, 1]
- video: (T, 3, H, W) float in [0, 1]
- audio: (S,) float waveform in [-1, 1], mono

Every problem with an input file (missing, unsupported ending, undecodable, empty, silent, too large) raises
:class:`MediaError`, a ``ValueError`` whose one-line message names the file and the problem.
"""

from __future__ import annotations

import logging
import math
import warnings
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import soundfile as sf
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from scipy.signal import resample_poly

from xvila.modalities import MODALITIES, modality_of_path

logger = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 50_000_000  # refuse images (and video frames) above 50 megapixels before decoding them
SILENCE_PEAK = 1e-5  # a peak amplitude below this (-100 dBFS) counts as silence

IMAGE_SUFFIXES = MODALITIES["image"].suffixes
VIDEO_SUFFIXES = MODALITIES["video"].suffixes
AUDIO_SUFFIXES = MODALITIES["audio"].suffixes


class MediaError(ValueError):
    """A media file that cannot be used, with a one-line message naming the file and the problem."""


def _fail(path: str | Path, problem: str) -> MediaError:
    return MediaError(f"{path}: {problem}")


def _check_input(path: str | Path, suffixes: tuple[str, ...], what: str) -> Path:
    path = Path(path)
    if not str(path).lower().endswith(suffixes):
        raise _fail(path, f"unsupported file ending for {what} (supported: {', '.join(suffixes)})")
    if not path.is_file():
        raise _fail(path, "file not found")
    if path.stat().st_size == 0:
        raise _fail(path, "file is empty")
    return path


def _check_pixels(path: Path, width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise _fail(
            path,
            f"{width}x{height} is {width * height / 1e6:.1f} megapixels, over the limit of {max_pixels / 1e6:g} "
            "(raise max_pixels to allow it)",
        )
    if width <= 0 or height <= 0:
        raise _fail(path, f"invalid size {width}x{height}")


# -------------------------------------------------------------------------------------------------------- images


def _to_rgb_array(image: Image.Image) -> np.ndarray:
    """Any PIL mode -> (H, W, 3) uint8. Transparency is composited over white; 16-bit data is scaled down."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        gray = np.asarray(image, dtype=np.float64)
        gray = np.clip(gray / 65535.0 * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if image.mode == "F":
        gray = np.clip(np.asarray(image, dtype=np.float64), 0.0, 1.0) * 255.0 + 0.5
        return np.repeat(gray.astype(np.uint8)[:, :, None], 3, axis=2)
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
    return np.asarray(image.convert("RGB"))


def _resize_center_crop(rgb: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3) uint8: bicubic resize of the shorter side to ``size``, centre crop."""
    image = Image.fromarray(rgb)
    w, h = image.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)))


def _to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """(..., H, W, 3) uint8 -> (..., 3, H, W) float in [0, 1]."""
    # np.array copies: arrays from PIL are read-only.
    return torch.from_numpy(np.array(rgb, dtype=np.uint8)).movedim(-1, -3).float() / 255.0


def load_image(path: str | Path, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Read an image file -> (3, size, size) in [0, 1] (shorter side resized to ``size``, centre crop).

    The pixel count is checked from the header before any pixel is decoded; EXIF orientation is applied; any mode
    (palette, grey, 16-bit, CMYK, alpha over white) becomes RGB; an animated file gives its first frame.
    """
    path = _check_input(path, IMAGE_SUFFIXES, "an image")
    try:
        with warnings.catch_warnings():
            # PIL's own decompression-bomb guard warns above ~89 MP and raises above ~179 MP; ours is stricter.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:  # lazy: reads the header only
                _check_pixels(path, image.width, image.height, max_pixels)
                image.load()
                image = ImageOps.exif_transpose(image)
                rgb = _to_rgb_array(image)
    except Image.DecompressionBombError as error:
        raise _fail(path, f"image is too large to decode safely ({error})") from None
    except UnidentifiedImageError:
        raise _fail(path, "not a readable image (unknown or corrupt format)") from None
    except (OSError, SyntaxError, ValueError) as error:
        if isinstance(error, MediaError):
            raise
        raise _fail(path, f"corrupt or truncated image ({error})") from None
    return _to_tensor(_resize_center_crop(rgb, size))


def save_image(path: str | Path, image: torch.Tensor) -> Path:
    """Write (3, H, W) in [0, 1] (clamped) as an image file (PNG unless the ending says otherwise)."""
    path = Path(path)
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"save_image: expected a tensor of shape (3, H, W), got {tuple(image.shape)}")
    if not str(path).lower().endswith(IMAGE_SUFFIXES):
        raise _fail(path, f"unsupported file ending for an image (supported: {', '.join(IMAGE_SUFFIXES)})")
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_to_uint8(image).permute(1, 2, 0).numpy()).save(path)
    return path


def _to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    return (pixels.detach().float().cpu().clamp(0, 1) * 255.0).round().to(torch.uint8)


# -------------------------------------------------------------------------------------------------------- videos


def _open_container(path: Path) -> av.container.InputContainer:
    try:
        return av.open(str(path), mode="r")
    except (av.FFmpegError, OSError, UnicodeDecodeError) as error:
        raise _fail(path, f"cannot open as a media container (corrupt or unsupported: {error})") from None


def _sample_indices(total: int, count: int) -> list[int]:
    """``count`` frame indices spread uniformly over ``total`` frames (centres of equal segments)."""
    return [min(total - 1, int((i + 0.5) * total / count)) for i in range(count)]


def load_video(
    path: str | Path, num_frames: int, size: int, max_pixels: int = DEFAULT_MAX_PIXELS
) -> torch.Tensor:
    """Read a video file -> (num_frames, 3, size, size) in [0, 1], frames sampled uniformly over the whole clip.

    Videos with fewer frames than ``num_frames`` repeat frames. Each frame is resized (shorter side) and centre
    cropped like :func:`load_image`.
    """
    if num_frames <= 0:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    path = _check_input(path, VIDEO_SUFFIXES, "a video")
    with _open_container(path) as container:
        if not container.streams.video:
            raise _fail(path, "has no video stream")
        stream = container.streams.video[0]
        _check_pixels(path, stream.codec_context.width, stream.codec_context.height, max_pixels)
        total = stream.frames  # from the container's index; 0 when it does not say
        if total <= 0:
            try:  # count packets: demuxing without decoding (one packet per frame for the codecs we read)
                total = sum(1 for packet in container.demux(stream) if packet.size > 0)
            except av.FFmpegError as error:
                raise _fail(path, f"corrupt video stream ({error})") from None
    if total == 0:
        raise _fail(path, "video has no frames")
    wanted = _sample_indices(total, num_frames)
    wanted_set = set(wanted)
    picked: dict[int, np.ndarray] = {}
    last_frame: av.VideoFrame | None = None
    with _open_container(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            for index, frame in enumerate(container.decode(stream)):
                last_frame = frame
                if index in wanted_set:
                    picked[index] = _resize_center_crop(frame.to_ndarray(format="rgb24"), size)
                if index >= wanted[-1]:
                    break
        except av.FFmpegError as error:
            if last_frame is None:
                raise _fail(path, f"cannot decode video frames ({error})") from None
            logger.warning("%s: decoding stopped early (%s); repeating the last good frame", path, error)
    if last_frame is None:
        raise _fail(path, "video has no decodable frames")
    # Indices past the end of a short or damaged stream repeat its last decoded frame.
    tail = _resize_center_crop(last_frame.to_ndarray(format="rgb24"), size)
    frames = [picked.get(index, tail) for index in wanted]
    return _to_tensor(np.stack(frames))  # (T, 3, size, size)


def save_video(
    path: str | Path,
    video: torch.Tensor,
    fps: int = 8,
    audio: torch.Tensor | None = None,
    sample_rate: int = 16000,
    upscale: int = 1,
    crf: int = 18,
) -> Path:
    """Write (T, 3, H, W) in [0, 1] as an H.264/yuv420p MP4 that browsers play (``+faststart``).

    ``upscale`` enlarges each frame by an integer factor with nearest-neighbour (tiny 32x32 videos become visible);
    odd sizes are padded to even by repeating the last row/column (yuv420p needs even sizes). ``audio`` (S,) at
    ``sample_rate`` is added as an AAC track.
    """
    path = Path(path)
    if video.ndim != 4 or video.shape[1] != 3 or video.shape[0] == 0:
        raise ValueError(f"save_video: expected a tensor of shape (T, 3, H, W) with T > 0, got {tuple(video.shape)}")
    if upscale < 1:
        raise ValueError(f"save_video: upscale must be a positive integer, got {upscale}")
    if not str(path).lower().endswith(".mp4"):
        raise _fail(path, "save_video writes MP4 files: use the .mp4 ending")
    frames = _to_uint8(video).permute(0, 2, 3, 1).numpy()  # (T, H, W, 3)
    if upscale > 1:
        frames = frames.repeat(upscale, axis=1).repeat(upscale, axis=2)
    _, H, W, _ = frames.shape
    frames = np.pad(frames, ((0, 0), (0, H % 2), (0, W % 2), (0, 0)), mode="edge")  # even sizes for yuv420p
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w", options={"movflags": "+faststart"}) as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf)}
        audio_stream = None
        if audio is not None:
            if audio.ndim != 1:
                raise ValueError(f"save_video: audio must have shape (S,), got {tuple(audio.shape)}")
            audio_stream = container.add_stream("aac", rate=sample_rate)
            audio_stream.layout = "mono"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
        if audio_stream is not None:
            samples = audio.detach().float().cpu().clamp(-1, 1).numpy()[None, :]  # (1, S)
            chunk = 1024  # AAC frame size
            for start in range(0, samples.shape[1], chunk):
                piece = np.ascontiguousarray(samples[:, start : start + chunk])
                frame = av.AudioFrame.from_ndarray(piece, format="fltp", layout="mono")
                frame.sample_rate = sample_rate
                frame.pts = start
                frame.time_base = Fraction(1, sample_rate)
                container.mux(audio_stream.encode(frame))
            container.mux(audio_stream.encode())
    return path


# --------------------------------------------------------------------------------------------------------- audio


def _decode_with_soundfile(path: Path) -> tuple[np.ndarray, int] | None:
    """(S, channels) float32 and the sample rate, or None when libsndfile does not read this file."""
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError):
        return None
    return data, rate


def _decode_with_pyav(path: Path) -> tuple[np.ndarray, int]:
    with _open_container(path) as container:
        if not container.streams.audio:
            raise _fail(path, "has no audio stream")
        stream = container.streams.audio[0]
        to_float = av.AudioResampler(format="fltp")  # sample format only: rate and layout are kept
        chunks, rate = [], stream.codec_context.sample_rate
        try:
            for frame in container.decode(stream):
                for converted in to_float.resample(frame):
                    chunks.append(converted.to_ndarray())  # (channels, n)
                    rate = converted.sample_rate
            for converted in to_float.resample(None):
                chunks.append(converted.to_ndarray())
        except av.FFmpegError as error:
            if not chunks:
                raise _fail(path, f"cannot decode audio ({error})") from None
            logger.warning("%s: audio decoding stopped early (%s); keeping what was decoded", path, error)
    if not chunks:
        raise _fail(path, "audio stream has no samples")
    channels = max(c.shape[0] for c in chunks)
    data = np.concatenate([np.broadcast_to(c, (channels, c.shape[1])) for c in chunks], axis=1)
    return data.T.astype(np.float32), rate  # (S, channels)


def load_audio(
    path: str | Path,
    sample_rate: int = 16000,
    seconds: float | None = None,
    allow_silent: bool = False,
) -> torch.Tensor:
    """Read an audio file (or the audio track of a video file) -> mono (S,) in [-1, 1] at ``sample_rate``.

    Channels are averaged; the rate is converted with ``scipy.signal.resample_poly``; with ``seconds`` the result
    is cropped or zero-padded to exactly ``round(seconds * sample_rate)`` samples. Digital silence is refused
    unless ``allow_silent``.
    """
    path = _check_input(path, AUDIO_SUFFIXES + VIDEO_SUFFIXES, "audio")
    decoded = _decode_with_soundfile(path) if str(path).lower().endswith(AUDIO_SUFFIXES) else None
    data, rate = decoded if decoded is not None else _decode_with_pyav(path)
    if data.shape[0] == 0:
        raise _fail(path, "audio has no samples")
    if not np.isfinite(data).all():
        raise _fail(path, "audio contains NaN or infinite samples")
    mono = data.mean(axis=1, dtype=np.float64)  # (S,)
    if rate != sample_rate:
        g = math.gcd(int(rate), int(sample_rate))
        mono = resample_poly(mono, sample_rate // g, int(rate) // g)
    if not allow_silent and (mono.size == 0 or np.abs(mono).max() < SILENCE_PEAK):
        raise _fail(path, "audio is silent (pass allow_silent=True to accept it)")
    if seconds is not None:
        if seconds <= 0:
            raise ValueError(f"seconds must be positive, got {seconds}")
        target = round(seconds * sample_rate)
        mono = np.pad(mono[:target], (0, max(0, target - mono.size)))
    return torch.from_numpy(np.clip(mono, -1.0, 1.0).astype(np.float32))


def save_audio(path: str | Path, audio: torch.Tensor, sample_rate: int = 16000) -> Path:
    """Write mono (S,) in [-1, 1] (clamped) as 16-bit PCM (WAV unless the ending says FLAC/OGG)."""
    path = Path(path)
    if audio.ndim != 1 or audio.shape[0] == 0:
        raise ValueError(f"save_audio: expected a non-empty tensor of shape (S,), got {tuple(audio.shape)}")
    lower = str(path).lower()
    if not lower.endswith((".wav", ".flac", ".ogg")):
        raise _fail(path, "save_audio writes .wav, .flac or .ogg files")
    path.parent.mkdir(parents=True, exist_ok=True)
    subtype = "VORBIS" if lower.endswith(".ogg") else "PCM_16"
    sf.write(str(path), audio.detach().float().cpu().clamp(-1, 1).numpy(), sample_rate, subtype=subtype)
    return path


# ------------------------------------------------------------------------------------------------------ dispatch


def load_media(
    path: str | Path,
    modality: str | None = None,
    *,
    size: int = 224,
    num_frames: int = 8,
    sample_rate: int = 16000,
    seconds: float | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> torch.Tensor:
    """Load a file as ``modality`` (by default the one its ending names): image (3, size, size), video
    (num_frames, 3, size, size) or audio (S,). ``load_media("clip.mp4", "audio")`` reads a video's sound track."""
    if modality is None:
        try:
            modality = modality_of_path(str(path)).name
        except ValueError:
            known = sorted(IMAGE_SUFFIXES + VIDEO_SUFFIXES + AUDIO_SUFFIXES)
            raise _fail(path, f"unsupported file ending (supported: {', '.join(known)})") from None
    if modality == "image":
        return load_image(path, size, max_pixels=max_pixels)
    if modality == "video":
        return load_video(path, num_frames, size, max_pixels=max_pixels)
    if modality == "audio":
        return load_audio(path, sample_rate=sample_rate, seconds=seconds)
    raise ValueError(f"unknown modality {modality!r}; known modalities: {sorted(MODALITIES)}")


def save_media(path: str | Path, modality: str, media: torch.Tensor, **kwargs) -> Path:
    """Save one item in the conventions of ``modality`` (image, video or audio)."""
    savers = {"image": save_image, "video": save_video, "audio": save_audio}
    if modality not in savers:
        raise ValueError(f"unknown modality {modality!r}; known modalities: {sorted(savers)}")
    return savers[modality](path, media, **kwargs)


__all__ = [
    "DEFAULT_MAX_PIXELS",
    "MediaError",
    "load_audio",
    "load_image",
    "load_media",
    "load_video",
    "save_audio",
    "save_image",
    "save_media",
    "save_video",
]
