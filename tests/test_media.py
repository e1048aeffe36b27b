"""Media I/O: round trips, resizing, sampling, and a clear MediaError for every kind of bad input."""

from __future__ import annotations

import struct
import zlib
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from xvila.media import (
    MediaError,
    load_audio,
    load_image,
    load_media,
    load_video,
    save_audio,
    save_image,
    save_video,
)


def _write_mp4(path: Path, frames: np.ndarray, fps: int = 8, audio: np.ndarray | None = None, rate: int = 16000):
    """frames (T, H, W, 3) uint8 -> H.264 (+ AAC) MP4 written with PyAV directly (moov atom at the end)."""
    with av.open(str(path), mode="w") as container:
        video = container.add_stream("libx264", rate=Fraction(fps))
        video.width, video.height, video.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        sound = container.add_stream("aac", rate=rate) if audio is not None else None
        if sound is not None:
            sound.layout = "mono"
        for frame in frames:
            container.mux(video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(video.encode())
        if sound is not None:
            for start in range(0, len(audio), 1024):
                container.mux(sound.encode(_audio_frame(audio[start : start + 1024], start, rate)))
            container.mux(sound.encode())


def _audio_frame(samples: np.ndarray, start: int, rate: int) -> av.AudioFrame:
    frame = av.AudioFrame.from_ndarray(samples[None].copy(), format="fltp", layout="mono")  # (1, n) planar
    frame.sample_rate, frame.pts, frame.time_base = rate, start, Fraction(1, rate)
    return frame


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims width x height (greyscale) without the pixel data to back it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)


def _tone(freq: float, seconds: float, rate: int, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _peak_frequency(wave: torch.Tensor, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(wave.numpy()))
    return float(np.fft.rfftfreq(len(wave), 1 / rate)[spectrum.argmax()])


# ---------------------------------------------------------------------------------------------------- images


def test_image_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    image = torch.rand(3, 24, 24)
    path = save_image(tmp_path / "out" / "image.png", image)
    loaded = load_image(path, size=24)
    assert loaded.shape == (3, 24, 24) and loaded.dtype == torch.float32
    assert (loaded - image).abs().max() <= 0.5 / 255 + 1e-6


def test_a_photo_is_resized_and_centre_cropped(tmp_path: Path) -> None:
    rows = np.linspace(0, 255, 480, dtype=np.uint8)[:, None, None]  # dark top, bright bottom
    photo = np.broadcast_to(rows, (480, 640, 3)).copy()
    photo[:, :40] = (255, 0, 0)  # red left edge, cropped away by the centre crop (it starts near x = 79)
    Image.fromarray(photo).save(tmp_path / "photo.jpg", quality=95)
    image = load_image(tmp_path / "photo.jpg", size=224)
    assert image.shape == (3, 224, 224) and 0 <= image.min() and image.max() <= 1
    assert image[:, :4].mean() < 0.05 and image[:, -4:].mean() > 0.95  # the whole height survives
    assert (image[0] - image[1]).abs().max() < 0.1  # no red: the width was cropped at the centre


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "L", "1", "CMYK", "I;16"])
def test_any_mode_becomes_rgb(tmp_path: Path, mode: str) -> None:
    base = Image.fromarray(np.full((16, 16, 3), 200, dtype=np.uint8))
    image = base.convert(mode) if mode != "I;16" else Image.fromarray(np.full((16, 16), 51400, dtype=np.uint16))
    if mode in ("RGBA", "LA"):
        image.putalpha(0)  # fully transparent: composited over white
    suffix = ".jpg" if mode == "CMYK" else ".png"
    image.save(tmp_path / f"image{suffix}")
    loaded = load_image(tmp_path / f"image{suffix}", size=16)
    expected = 1.0 if mode in ("RGBA", "LA") else 200 / 255  # "1" dithers 200 to ~78% white pixels
    assert loaded.shape == (3, 16, 16)
    assert loaded.mean().item() == pytest.approx(expected, abs=0.05 if mode == "1" else 0.02)


def test_image_errors(tmp_path: Path) -> None:
    with pytest.raises(MediaError, match="missing.png: file not found"):
        load_image(tmp_path / "missing.png", 32)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(MediaError, match="notes.txt: unsupported file ending"):
        load_image(tmp_path / "notes.txt", 32)
    (tmp_path / "fake.png").write_text("this is not a picture")
    with pytest.raises(MediaError, match="fake.png: not a readable image"):
        load_image(tmp_path / "fake.png", 32)
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(tmp_path / "cut.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "cut.png").read_bytes()[:60])
    with pytest.raises(MediaError, match="cut.png"):
        load_image(tmp_path / "cut.png", 32)


@pytest.mark.parametrize("side", [8000, 20000])
def test_huge_images_are_refused_before_decoding(tmp_path: Path, side: int) -> None:
    _png_header_only(tmp_path / "bomb.png", side, side)
    with pytest.raises(MediaError, match=r"bomb.png: .*(megapixels|too large)"):
        load_image(tmp_path / "bomb.png", 32)


# ---------------------------------------------------------------------------------------------------- videos


@pytest.fixture
def clip(tmp_path: Path) -> Path:
    """16 frames of 48x64 whose brightness encodes the frame index, with 2 s of a 440 Hz tone."""
    frames = np.stack([np.full((48, 64, 3), 8 + 15 * i, dtype=np.uint8) for i in range(16)])
    _write_mp4(tmp_path / "clip.mp4", frames, audio=_tone(440, 2.0, 16000))
    return tmp_path / "clip.mp4"


def test_video_frames_are_sampled_uniformly(clip: Path) -> None:
    video = load_video(clip, num_frames=4, size=32)
    assert video.shape == (4, 3, 32, 32) and 0 <= video.min() and video.max() <= 1
    levels = (video.mean(dim=(1, 2, 3)) * 255).numpy()
    np.testing.assert_allclose(levels, [8 + 15 * i for i in (2, 6, 10, 14)], atol=4)
    assert load_video(clip, num_frames=32, size=16).shape == (32, 3, 16, 16)  # more than it has: repeats


def test_audio_track_of_a_video(clip: Path) -> None:
    wave = load_audio(clip, seconds=1.5)
    assert wave.shape == (24000,)
    assert _peak_frequency(wave, 16000) == pytest.approx(440, abs=2)
    assert load_media(clip, "audio").shape[0] >= 32000


def test_video_round_trip(tmp_path: Path) -> None:
    ramp = torch.linspace(0, 1, 32)
    pattern = (ramp[:, None] * ramp[None, :]).expand(3, 32, 32)  # (3, H, W)
    video = torch.stack([pattern * (0.5 + t / 14) for t in range(8)])  # (T, 3, H, W), brightening
    path = save_video(tmp_path / "v.mp4", video, fps=8, audio=torch.from_numpy(_tone(220, 1.0, 16000)))
    loaded = load_video(path, num_frames=8, size=32)
    assert loaded.shape == (8, 3, 32, 32)
    assert (loaded - video).abs().mean() < 0.03
    assert load_audio(path).shape[0] >= 16000


def test_saved_videos_have_even_sizes_and_can_be_upscaled(tmp_path: Path) -> None:
    video = torch.rand(3, 3, 33, 31)
    for upscale, expected in ((1, (34, 32)), (2, (66, 62)), (4, (132, 124))):
        path = save_video(tmp_path / f"v{upscale}.mp4", video, upscale=upscale)
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            assert (stream.codec_context.height, stream.codec_context.width) == expected
            assert stream.codec_context.pix_fmt == "yuv420p"


def test_video_errors(tmp_path: Path, clip: Path) -> None:
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(clip.read_bytes()[: clip.stat().st_size // 2])  # moov atom lost
    with pytest.raises(MediaError, match="cut.mp4"):
        load_video(cut, 4, 32)
    (tmp_path / "noise.mp4").write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(MediaError, match="noise.mp4: cannot open"):
        load_video(tmp_path / "noise.mp4", 4, 32)
    with av.open(str(tmp_path / "empty.mp4"), mode="w") as container:  # a container without a single frame
        stream = container.add_stream("libx264", rate=8)
        stream.width = stream.height = 32
        container.start_encoding()
        container.mux(stream.encode())
    with pytest.raises(MediaError, match="empty.mp4: (video has no frames|has no video stream)"):
        load_video(tmp_path / "empty.mp4", 4, 32)
    _write_mp4(tmp_path / "mute.mp4", np.zeros((2, 32, 32, 3), dtype=np.uint8))
    with pytest.raises(MediaError, match="mute.mp4: has no audio stream"):
        load_audio(tmp_path / "mute.mp4")
    with pytest.raises(MediaError, match="audio_only.mp4: has no video stream"):
        load_video(_audio_only_mp4(tmp_path), 4, 32)


def _audio_only_mp4(tmp_path: Path) -> Path:
    path = tmp_path / "audio_only.mp4"
    with av.open(str(path), mode="w") as container:
        sound = container.add_stream("aac", rate=16000)
        sound.layout = "mono"
        wave = _tone(440, 0.2, 16000)
        for start in range(0, len(wave), 1024):
            container.mux(sound.encode(_audio_frame(wave[start : start + 1024], start, 16000)))
        container.mux(sound.encode())
    return path


# ----------------------------------------------------------------------------------------------------- audio


def test_audio_is_mixed_to_mono_and_resampled(tmp_path: Path) -> None:
    stereo = np.stack([_tone(440, 1.0, 44100), _tone(440, 1.0, 44100)], axis=1)  # (S, 2)
    sf.write(str(tmp_path / "tone.wav"), stereo, 44100)
    wave = load_audio(tmp_path / "tone.wav", sample_rate=16000)
    assert wave.shape == (16000,) and wave.dtype == torch.float32
    assert wave.abs().max() == pytest.approx(0.5, abs=0.02)
    assert _peak_frequency(wave, 16000) == pytest.approx(440, abs=2)
    padded = load_audio(tmp_path / "tone.wav", seconds=1.25)
    assert padded.shape == (20000,) and padded[16100:].abs().max() == 0


def test_audio_round_trip(tmp_path: Path) -> None:
    wave = torch.from_numpy(_tone(300, 0.5, 16000))
    path = save_audio(tmp_path / "a.wav", wave, 16000)
    loaded = load_audio(path)
    assert loaded.shape == wave.shape
    assert (loaded - wave).abs().max() < 1e-3
    assert load_media(path).shape == wave.shape


def test_audio_errors(tmp_path: Path) -> None:
    sf.write(str(tmp_path / "silence.wav"), np.zeros(16000, dtype=np.float32), 16000)
    with pytest.raises(MediaError, match="silence.wav: audio is silent"):
        load_audio(tmp_path / "silence.wav")
    assert load_audio(tmp_path / "silence.wav", allow_silent=True).shape == (16000,)
    sf.write(str(tmp_path / "empty.wav"), np.zeros(0, dtype=np.float32), 16000)
    with pytest.raises(MediaError, match="empty.wav: audio has no samples"):
        load_audio(tmp_path / "empty.wav")
    (tmp_path / "junk.wav").write_bytes(b"RIFF but not really a wave file" * 10)
    with pytest.raises(MediaError, match="junk.wav"):
        load_audio(tmp_path / "junk.wav")
    with pytest.raises(MediaError, match="gone.wav: file not found"):
        load_audio(tmp_path / "gone.wav")


# -------------------------------------------------------------------------------------------------- dispatch


def test_load_media_dispatches_by_suffix(tmp_path: Path, clip: Path) -> None:
    save_image(tmp_path / "i.png", torch.rand(3, 40, 30))
    assert load_media(tmp_path / "i.png", size=16).shape == (3, 16, 16)
    assert load_media(clip, size=16, num_frames=2).shape == (2, 3, 16, 16)
    (tmp_path / "data.xyz").write_text("?")
    with pytest.raises(MediaError, match="data.xyz: unsupported file ending"):
        load_media(tmp_path / "data.xyz")
    with pytest.raises(ValueError, match="known modalities"):
        load_media(clip, "depth")
