"""Real-corpus ingestion on small videos written here with PyAV (h264 + aac), broken ones included; ShardWriter append.

Every test video shows a 16x16 square moving left to right over a dark background, one colour per second, with a
sine tone of one frequency per second, so a keyframe's colour and an audio clip's pitch tell which second they
came from.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import textwrap
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from xvila.data import ingest
from xvila.data.ingest import (
    IngestReport,
    SkipItem,
    build_dataset,
    cut_clip,
    find_annotations,
    list_webvid,
    safe_key,
)
from xvila.data.records import AlignedClip, ShardWriter, read_clips, read_manifest
from xvila.media import load_audio, load_video

COLOURS = {"red": (230, 30, 30), "green": (30, 220, 30), "blue": (40, 40, 230)}
TONES = {"red": 440.0, "green": 880.0, "blue": 1320.0}
FPS = 10


def write_video(path: Path, colours: list[str], *, audio: bool = True, silent: bool = False, rate: int = 44100,
                layout: str = "stereo", faststart: bool = True, size: tuple[int, int] = (64, 48),
                gop: int | None = None) -> Path:
    """One second per colour: h264 video (the square moves across) and an aac tone (TONES[colour])."""
    W, H = size
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", options={"movflags": "+faststart"} if faststart else {}) as container:
        video = container.add_stream("libx264", rate=Fraction(FPS))
        video.width, video.height, video.pix_fmt = W, H, "yuv420p"
        if gop is not None:
            video.codec_context.gop_size = gop  # keyframes every `gop` frames: seeks land inside the video
        sound = container.add_stream("aac", rate=rate) if audio else None
        if sound is not None:
            sound.layout = layout
        total = FPS * len(colours)
        for i in range(total):
            frame = np.full((H, W, 3), 20, np.uint8)
            x = round(i / (total - 1) * (W - 16))
            frame[H // 2 - 8 : H // 2 + 8, x : x + 16] = COLOURS[colours[i // FPS]]
            container.mux(video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(video.encode())
        if sound is not None:
            t = np.arange(rate) / rate
            signal = np.concatenate([0.5 * np.sin(2 * np.pi * TONES[c] * t) for c in colours]).astype(np.float32)
            if silent:
                signal[:] = 0
            channels = 2 if layout == "stereo" else 1
            for start in range(0, signal.size, 1024):
                piece = np.ascontiguousarray(np.repeat(signal[None, start : start + 1024], channels, axis=0))
                frame = av.AudioFrame.from_ndarray(piece, format="fltp", layout=layout)
                frame.sample_rate, frame.pts, frame.time_base = rate, start, Fraction(1, rate)
                container.mux(sound.encode(frame))
            container.mux(sound.encode())
    return path


def colour_of(image: np.ndarray) -> str:
    """The colour of the square in an (H, W, 3) uint8 image: the nearest reference to its brightest pixels."""
    pixels = image.reshape(-1, 3).astype(float)
    bright = pixels[pixels.max(axis=1) > 120]
    assert len(bright) > 10, "no square in the image"
    mean = bright.mean(axis=0)
    return min(COLOURS, key=lambda c: np.linalg.norm(mean - COLOURS[c]))


def pitch_of(audio: np.ndarray, rate: int = 16000) -> float:
    spectrum = np.abs(np.fft.rfft(audio.astype(float) * np.hanning(audio.size)))
    return float(np.argmax(spectrum) * rate / audio.size)


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["videoid", "contentUrl", "duration", "page_dir", "name"])
        writer.writeheader()
        for row in rows:
            writer.writerow({"contentUrl": f"https://example.com/{row['videoid']}.mp4", "duration": "PT00H00M03S",
                             **row})


def file_bytes(folder: Path, skip=(ingest.REPORT,)) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name not in skip}


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    """Good and broken videos, written once per module; tests copy what they need."""
    d = tmp_path_factory.mktemp("media")
    write_video(d / "red.mp4", ["red", "red"])
    write_video(d / "blue.mp4", ["blue", "blue"], rate=22050, layout="mono")
    write_video(d / "green.mp4", ["green", "green"])
    write_video(d / "rgb.mp4", ["red", "green", "blue"], gop=4)  # ActivityNet: one segment per colour
    write_video(d / "noaudio.mp4", ["red", "red"], audio=False)
    write_video(d / "silent.mp4", ["red", "red"], silent=True)
    write_video(d / "full.mp4", ["red", "green", "blue"])
    data = (d / "full.mp4").read_bytes()
    (d / "truncated.mp4").write_bytes(data[: len(data) // 2])  # moov at the front: frames stop at ~1.5 s
    write_video(d / "moov_end.mp4", ["red", "green"], faststart=False)
    data = (d / "moov_end.mp4").read_bytes()
    (d / "truncated_moov.mp4").write_bytes(data[: len(data) // 2])  # moov at the end, cut off
    (d / "empty.mp4").write_bytes(b"")
    (d / "text.mp4").write_text("this is not a video\n")
    return d


def webvid_corpus(root: Path, media: Path, good=("red", "blue"), broken: bool = True) -> Path:
    """videos/{id}.mp4 (one under videos/{page_dir}/, one flat in root) and results.csv."""
    rows = []
    for i, name in enumerate(good):
        videoid = f"100{i}"
        page = "p1" if i == 1 else ""
        folder = root / "videos" / page if page else root / "videos"
        if i == 2:
            folder = root  # a flat folder works too
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(media / f"{name}.mp4", folder / f"{videoid}.mp4")
        rows.append({"videoid": videoid, "page_dir": page, "name": f"a {name} square moves right"})
    if broken:
        for name in ("noaudio", "silent", "truncated", "truncated_moov", "empty", "text"):
            shutil.copy(media / f"{name}.mp4", root / "videos" / f"{name}.mp4")
            rows.append({"videoid": name, "page_dir": "", "name": f"broken {name}"})
        rows.append({"videoid": "gone", "page_dir": "", "name": "its file is missing"})
        rows.append({"videoid": "nocaption", "page_dir": "", "name": "  "})
    write_csv(root / "results.csv", rows)
    return root


def activitynet_corpus(root: Path, media: Path) -> Path:
    (root / "videos").mkdir(parents=True)
    shutil.copy(media / "rgb.mp4", root / "videos" / "v_abc.mp4")
    shutil.copy(media / "green.mp4", root / "def.mp4")  # id "v_def" finds def.mp4 (flat)
    annotations = {
        "v_abc": {"duration": 3.0, "timestamps": [[0, 1], [1, 2], [2, 3.4], [3.5, 6.0]],
                  "sentences": ["A red square.", "A green square.", "A blue square.", "After the end."]},
        "v_def": {"duration": 2.0, "timestamps": [[0.2, 1.8]], "sentences": ["A green square moves."]},
        "v_bad": {"duration": 2.0, "timestamps": [[0, 1]], "sentences": ["one", "two"]},
        "v_none": {"duration": 2.0, "timestamps": [[0, 1]], "sentences": ["no file"]},
    }
    (root / "captions.json").write_text(json.dumps(annotations))
    return root


# ---------------------------------------------------------------------------------------------------- one clip


def test_cut_clip_frames_keyframe_and_audio(media):
    clip = cut_clip(media / "rgb.mp4", 1.0, 2.0, num_frames=4, size=32)
    assert clip.image.shape == (32, 32, 3) and clip.image.dtype == np.uint8
    assert clip.video.shape == (4, 32, 32, 3) and clip.video.dtype == np.uint8
    assert clip.audio.shape == (16000,) and clip.audio.dtype == np.int16
    assert colour_of(clip.image) == "green" and all(colour_of(f) == "green" for f in clip.video)
    assert abs(pitch_of(clip.audio) - 880) < 10
    # The square moves right: its column grows over the clip's frames.
    columns = [np.nonzero(f.max(axis=(0, 2)) > 120)[0].mean() for f in clip.video]
    assert all(a < b for a, b in zip(columns, columns[1:]))
    assert clip.meta["width"] == 64 and clip.meta["height"] == 48 and clip.meta["fps"] == FPS
    assert clip.meta["audio_rate"] == 44100 and clip.meta["audio_channels"] == 2
    assert clip.meta["keyframe_time"] == 1.5 and clip.meta["duration"] == pytest.approx(3.0)

    # Frames after a seek are those a decode from the start shows at the same times (every frame: 30 at 10 fps).
    every = cut_clip(media / "rgb.mp4", num_frames=30).video
    clip = cut_clip(media / "rgb.mp4", 1.25, 2.85, num_frames=5)
    assert np.array_equal(clip.video, every[[14, 17, 20, 23, 26]]) and np.array_equal(clip.image, every[20])
    # Over a whole video the frames are load_video's.
    loaded = load_video(media / "red.mp4", 4, 32)
    assert np.array_equal(cut_clip(media / "red.mp4", num_frames=4).video,
                          (loaded * 255).round().byte().permute(0, 2, 3, 1).numpy())

    # Audio is centred on the segment's middle: a 1 s window over 0.5-1.5 s switches from 440 to 880 Hz halfway.
    clip = cut_clip(media / "rgb.mp4", 0.5, 1.5, audio_seconds=1.0)
    assert abs(pitch_of(clip.audio[:7000]) - 440) < 10 and abs(pitch_of(clip.audio[9000:]) - 880) < 10
    # Whole video, 2 s of audio at 8 kHz, a 1 s clip cut from the middle of the segment.
    clip = cut_clip(media / "rgb.mp4", sample_rate=8000, audio_seconds=2.0, clip_seconds=1.0)
    assert clip.audio.shape == (16000,) and clip.meta["start"] == 1.0 and clip.meta["end"] == 2.0
    # A window past the end is shifted back inside the file; audio_seconds=None takes exactly the segment.
    clip = cut_clip(media / "rgb.mp4", 2.5, 3.0)
    assert clip.meta["audio_end"] == pytest.approx(3.0) and abs(pitch_of(clip.audio) - 1320) < 10
    clip = cut_clip(media / "rgb.mp4", 2.0, 2.5, audio_seconds=None)
    assert clip.audio.shape == (8000,) and abs(pitch_of(clip.audio) - 1320) < 10
    # After a seek the samples are those of the whole track decoded and resampled at once (media.load_audio).
    whole = load_audio(media / "rgb.mp4").numpy()
    for start in (1.3, 1.75):
        clip = cut_clip(media / "rgb.mp4", start, start + 1.0)
        first = round(clip.meta["audio_start"] * 16000)
        assert np.abs(clip.audio / 32767 - whole[first : first + 16000]).max() < 1e-4  # int16 rounding


@pytest.mark.parametrize(
    "name, category",
    [("noaudio", ingest.NO_AUDIO), ("silent", ingest.SILENT), ("truncated", ingest.TRUNCATED),
     ("truncated_moov", ingest.CORRUPT), ("empty", ingest.EMPTY), ("text", ingest.CORRUPT),
     ("missing", ingest.MISSING)],
)
def test_cut_clip_refuses_broken_files(media, name, category):
    with pytest.raises(SkipItem) as info:
        cut_clip(media / f"{name}.mp4")
    assert info.value.category == category and f"{name}.mp4" in str(info.value)


def test_cut_clip_segments_and_silence(media, tmp_path):
    with pytest.raises(SkipItem, match="outside") as info:
        cut_clip(media / "rgb.mp4", 3.5, 6.0)
    assert info.value.category == ingest.OUTSIDE
    clip = cut_clip(media / "rgb.mp4", 2.0, 3.4)  # past the end: clamped to the video
    assert clip.meta["end"] == pytest.approx(3.0) and colour_of(clip.image) == "blue"
    clip = cut_clip(media / "noaudio.mp4", allow_silent=True)
    assert clip.audio.shape == (16000,) and not clip.audio.any() and clip.meta["audio_channels"] == 0
    shutil.copy(media / "text.mp4", tmp_path / "clip.gif")
    with pytest.raises(SkipItem, match="unsupported file ending"):
        cut_clip(tmp_path / "clip.gif")


# ----------------------------------------------------------------------------------------------------- corpora


def test_webvid_corpus_with_broken_files(media, tmp_path):
    source = webvid_corpus(tmp_path / "src", media, good=("red", "blue", "green"))
    report = build_dataset(source, tmp_path / "out", workers=0, num_frames=4, size=32, progress=False)
    clips = list(read_clips(tmp_path / "out"))
    assert [c.key for c in clips] == ["1000", "1001", "1002"] and report.done == 3 and report.num_clips == 3
    assert [colour_of(c.image) for c in clips] == ["red", "blue", "green"]
    assert [round(pitch_of(c.audio)) for c in clips] == [440, 1320, 880]
    for c in clips:
        assert c.video.shape == (4, 32, 32, 3) and c.audio.shape == (16000,) and c.audio.dtype == np.int16
        assert c.group == c.key and c.index == 0 and c.caption.startswith("a ")
        assert c.meta["dataset"] == "webvid" and c.meta["start"] == 0 and c.meta["end"] == pytest.approx(2.0)
    assert [c.meta["source"] for c in clips] == ["videos/1000.mp4", "videos/p1/1001.mp4", "1002.mp4"]
    assert clips[1].meta["audio_rate"] == 22050 and clips[1].meta["page_dir"] == "p1"
    assert clips[0].meta["url"].endswith("/1000.mp4") and clips[0].meta["annotated_duration"] == "PT00H00M03S"

    expected = {"noaudio": ingest.NO_AUDIO, "silent": ingest.SILENT, "truncated": ingest.TRUNCATED,
                "truncated_moov": ingest.CORRUPT, "empty": ingest.EMPTY, "text": ingest.CORRUPT,
                "gone": ingest.MISSING, "nocaption": ingest.BAD_ANNOTATION}
    assert {r["item"]: r["category"] for r in report.reasons} == expected
    assert [r["item"] for r in report.reasons] == list(expected)  # in listing order
    assert report.skipped == len(expected) and report.items == 3 + len(expected)
    missing = next(r["reason"] for r in report.reasons if r["item"] == "gone")
    assert "gone.{mp4" in missing and "videos/" in missing
    written = json.loads((tmp_path / "out" / ingest.REPORT).read_text())
    assert written["done"] == 3 and written["skip_counts"][ingest.CORRUPT] == 2 and len(written["reasons"]) == 8
    ledger = [json.loads(line) for line in (tmp_path / "out" / ingest.LEDGER).read_text().splitlines()]
    assert sorted(e["item"] for e in ledger) == sorted(["1000", "1001", "1002", *expected])
    assert all(e["shard"] == "shard-000000.tar" for e in ledger if e["status"] == "done")
    assert read_manifest(tmp_path / "out")["info"]["format"] == "webvid"


def test_activitynet_segments(media, tmp_path):
    source = activitynet_corpus(tmp_path / "src", media)
    report = build_dataset(source, tmp_path / "out", workers=0, num_frames=3, progress=False)
    clips = list(read_clips(tmp_path / "out"))
    assert [(c.key, c.group, c.index) for c in clips] == [
        ("v_abc-000", "v_abc", 0), ("v_abc-001", "v_abc", 1), ("v_abc-002", "v_abc", 2), ("v_def-000", "v_def", 0)]
    assert [colour_of(c.image) for c in clips] == ["red", "green", "blue", "green"]
    assert [round(pitch_of(c.audio)) for c in clips] == [440, 880, 1320, 880]
    assert clips[1].caption == "A green square." and clips[1].meta["annotated"] == [1.0, 2.0]
    assert clips[2].meta["end"] == pytest.approx(3.0) and clips[2].meta["annotated"] == [2.0, 3.4]  # clamped
    assert clips[3].meta["source"] == "def.mp4" and clips[3].meta["start"] == pytest.approx(0.2)
    reasons = {r["item"]: r["category"] for r in report.reasons}
    assert reasons == {"v_abc#3": ingest.OUTSIDE, "v_bad#*": ingest.BAD_ANNOTATION, "v_none#0": ingest.MISSING}
    assert "1 timestamps but 2 sentences" in next(r["reason"] for r in report.reasons if r["item"] == "v_bad#*")


def test_format_detection(tmp_path, media):
    with pytest.raises(ValueError, match="no annotations found"):
        find_annotations(tmp_path)
    with pytest.raises(FileNotFoundError):
        find_annotations(tmp_path / "nowhere")
    (tmp_path / "a.csv").write_text("videoid,name\n1,x\n")
    (tmp_path / "b.json").write_text("{}")
    with pytest.raises(ValueError, match="both CSV and JSON"):
        find_annotations(tmp_path)
    assert find_annotations(tmp_path, format="webvid")[:2] == ("webvid", [tmp_path / "a.csv"])
    assert find_annotations(tmp_path / "b.json")[:2] == ("activitynet", [tmp_path / "b.json"])
    with pytest.raises(ValueError, match="unknown format"):
        find_annotations(tmp_path, format="youtube")
    (tmp_path / "c.csv").write_text("id,caption\n1,x\n")
    with pytest.raises(ValueError, match="not a WebVid-style CSV"):
        build_dataset(tmp_path, tmp_path / "out", format="webvid", progress=False)
    # Ids from the annotations never leave the source folder, and keys stay valid.
    write_csv(tmp_path / "evil.csv", [{"videoid": "../a.csv", "name": "x"}, {"videoid": "1", "page_dir": "..",
                                                                             "name": "y"}])
    items = list_webvid(tmp_path / "evil.csv", tmp_path)
    assert all(i.path is None and "bad" in i.problem for i in items)
    assert safe_key("abc_1-2") == "abc_1-2" and safe_key("a b") != safe_key("a_b")
    AlignedClip(safe_key("ü/x y"), "", np.zeros((1, 1, 3), np.uint8), np.zeros((1, 1, 1, 3), np.uint8),
                np.zeros(1, np.int16))


# ---------------------------------------------------------------------------------------- resume, kill, workers


def test_resume_adds_only_new_items_and_rerun_changes_nothing(media, tmp_path):
    source = webvid_corpus(tmp_path / "src", media, good=("red", "blue"), broken=False)
    out = tmp_path / "out"
    rows = [{"videoid": "1000", "name": "a red square"}, {"videoid": "1001", "page_dir": "p1", "name": "a blue one"},
            {"videoid": "late", "name": "arrives later"}]
    write_csv(source / "results.csv", rows)
    first = build_dataset(source, out, workers=0, shard_size=10, progress=False)
    assert (first.done, first.skipped) == (2, 1) and first.reasons[0]["category"] == ingest.MISSING
    before = file_bytes(out)

    # A new row with its video, and the missing video turns up: only those two are processed, in a new shard.
    shutil.copy(media / "green.mp4", source / "videos" / "1002.mp4")
    shutil.copy(media / "red.mp4", source / "videos" / "late.mp4")
    write_csv(source / "results.csv", rows + [{"videoid": "1002", "name": "a green square"}])
    seen = []
    second = build_dataset(source, out, workers=0, shard_size=10, progress=False,
                           on_item=lambda item, status: seen.append((item.item_id, status)))
    assert seen == [("late", "written"), ("1002", "written")]
    assert (second.done, second.skipped, second.already_done, second.num_clips) == (2, 0, 2, 4)
    after = file_bytes(out)
    assert after["shard-000000.tar"] == before["shard-000000.tar"] and "shard-000001.tar" in after
    assert [c.key for c in read_clips(out)] == ["1000", "1001", "late", "1002"]

    # Nothing new: shards, manifest and ledger stay byte-identical and untouched.
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    third = build_dataset(source, out, workers=0, shard_size=10, progress=False)
    assert (third.done, third.skipped, third.already_done) == (0, 0, 4)
    assert file_bytes(out) == after
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != ingest.REPORT} == \
        {k: v for k, v in mtimes.items() if k != ingest.REPORT}

    # Other clip settings would mix shapes in one dataset: refused.
    with pytest.raises(ValueError, match="size"):
        build_dataset(source, out, workers=0, size=48, progress=False)


def test_skipped_items_are_remembered_and_retried_on_request(media, tmp_path):
    source = webvid_corpus(tmp_path / "src", media, good=("red",), broken=False)
    shutil.copy(media / "noaudio.mp4", source / "videos" / "quiet.mp4")
    write_csv(source / "results.csv", [{"videoid": "1000", "name": "red"}, {"videoid": "quiet", "name": "no sound"}])
    out = tmp_path / "out"
    assert build_dataset(source, out, workers=0, progress=False).skipped == 1
    again = build_dataset(source, out, workers=0, progress=False, allow_silent=True)
    assert (again.done, again.already_skipped) == (0, 1) and again.reasons[0]["category"] == ingest.NO_AUDIO
    retried = build_dataset(source, out, workers=0, progress=False, allow_silent=True, retry_skipped=True)
    assert (retried.done, retried.reasons) == (1, [])
    assert [c.key for c in read_clips(out)] == ["1000", "quiet"]


KILL_SCRIPT = """
import os, sys
from xvila.data.ingest import build_dataset
count = 0
def hook(item, status):
    global count
    count += status == "written"
    if count == int(sys.argv[3]):
        os._exit(9)  # a hard kill: no cleanup, no flush beyond what was already flushed
build_dataset(sys.argv[1], sys.argv[2], workers=0, shard_size=2, num_frames=2, progress=False, on_item=hook)
"""


def test_killed_run_resumes_without_duplicates(media, tmp_path):
    source = webvid_corpus(tmp_path / "src", media, good=("red", "blue", "green"), broken=True)
    reference = build_dataset(source, tmp_path / "clean", workers=0, shard_size=2, num_frames=2, progress=False)
    out = tmp_path / "out"
    # Killed after the 3rd clip: shard 0 (2 clips) is complete, shard 1 holds 1 clip in a .tmp file.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(KILL_SCRIPT), str(source), str(out), "3"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 9, result.stderr
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-000000.tar", "shard-000001.tar.tmp"]
    ledger = [json.loads(line) for line in (out / ingest.LEDGER).read_text().splitlines()]
    assert sorted(e["item"] for e in ledger if e["status"] == "done") == ["1000", "1001"]  # not 1002

    resumed = build_dataset(source, out, workers=0, shard_size=2, num_frames=2, progress=False)
    assert (resumed.done, resumed.already_done) == (1, 2)
    assert not list(out.glob("*.tmp"))
    keys = [c.key for c in read_clips(out)]
    assert keys == ["1000", "1001", "1002"] == [c.key for c in read_clips(tmp_path / "clean")]
    assert file_bytes(out, skip=(ingest.REPORT, ingest.LEDGER)) == \
        file_bytes(tmp_path / "clean", skip=(ingest.REPORT, ingest.LEDGER))
    assert {r["item"] for r in resumed.reasons} == {r["item"] for r in reference.reasons}


def test_exception_drops_the_open_shard(media, tmp_path):
    source = webvid_corpus(tmp_path / "src", media, good=("red", "blue", "green"), broken=False)
    out = tmp_path / "out"

    def hook(item, status):
        if item.item_id == "1002":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_dataset(source, out, workers=0, shard_size=2, num_frames=2, progress=False, on_item=hook)
    assert [p.name for p in out.glob("shard-*")] == ["shard-000000.tar"]
    assert read_manifest(out)["num_clips"] == 2
    report = build_dataset(source, out, workers=0, shard_size=2, num_frames=2, progress=False)
    assert (report.done, report.already_done) == (1, 2)
    assert [c.key for c in read_clips(out)] == ["1000", "1001", "1002"]


def test_workers_give_the_same_clips(media, tmp_path):
    source = activitynet_corpus(tmp_path / "src", media)
    one = build_dataset(source, tmp_path / "w1", workers=1, shard_size=2, num_frames=4, progress=False)
    two = build_dataset(source, tmp_path / "w2", workers=2, shard_size=2, num_frames=4, progress=False)
    assert one.done == two.done == 4 and one.reasons == two.reasons
    skip = (ingest.REPORT,)
    assert file_bytes(tmp_path / "w1", skip) == file_bytes(tmp_path / "w2", skip)
    zero = build_dataset(source, tmp_path / "w0", workers=0, shard_size=2, num_frames=4, progress=False)
    assert [c.key for c in read_clips(tmp_path / "w0")] == [c.key for c in read_clips(tmp_path / "w1")]
    assert zero.done == 4


def _square_or_die(job: int) -> int:
    if job == 3:
        os._exit(1)  # a worker dying (as on an FFmpeg crash)
    return job * job


def test_a_crashing_worker_skips_only_its_item():
    results = list(ingest._run_jobs(range(7), _square_or_die, workers=2, crashed=lambda job: "crashed", window=4))
    assert results == [(0, 0), (1, 1), (2, 4), (3, "crashed"), (4, 16), (5, 25), (6, 36)]


def _always_die(job: int) -> int:
    os._exit(1)


def test_workers_that_always_die_stop_the_run():
    with pytest.raises(RuntimeError, match="in a row"):
        list(ingest._run_jobs(range(10), _always_die, workers=2, crashed=lambda job: "crashed", window=4))


def test_report_round_trip(tmp_path):
    report = IngestReport("src", "out", "webvid", ["a.csv"], items=3, done=2, seconds=4.0,
                          reasons=[{"item": "x", "category": ingest.EMPTY, "reason": "x: file is empty"}])
    report.write(tmp_path / "r.json")
    d = json.loads((tmp_path / "r.json").read_text())
    assert d["clips_per_second"] == 0.5 and d["skip_counts"] == {ingest.EMPTY: 1} and d["reasons"][0]["item"] == "x"


# ------------------------------------------------------------------------------------------- ShardWriter append


def _clip(i: int) -> AlignedClip:
    rng = np.random.default_rng(i)
    return AlignedClip(f"c{i}", f"caption {i}", rng.integers(0, 255, (4, 4, 3), dtype=np.uint8),
                       rng.integers(0, 255, (2, 4, 4, 3), dtype=np.uint8), np.arange(8, dtype=np.int16))


def test_shard_writer_append(tmp_path):
    with ShardWriter(tmp_path, shard_size=2, info={"a": 1}) as w:
        for i in range(3):
            w.write(_clip(i))
    first = file_bytes(tmp_path, skip=())
    # A crash leaves a .tmp shard and maybe a shard the manifest never listed: appending removes both.
    (tmp_path / "shard-000002.tar.tmp").write_bytes(b"partial")
    (tmp_path / "shard-000002.tar").write_bytes(b"orphan")
    with ShardWriter(tmp_path, shard_size=2, info={"a": 1}, append=True) as w:
        assert w.keys == {"c0", "c1", "c2"} and not (tmp_path / "shard-000002.tar.tmp").exists()
        with pytest.raises(ValueError, match="duplicate"):
            w.write(_clip(1))
        for i in range(3, 6):
            w.write(_clip(i))
    manifest = read_manifest(tmp_path)
    assert [s["name"] for s in manifest["shards"]] == [f"shard-00000{i}.tar" for i in range(4)]
    assert [s["count"] for s in manifest["shards"]] == [2, 1, 2, 1] and manifest["num_clips"] == 6
    assert [c.key for c in read_clips(tmp_path)] == [f"c{i}" for i in range(6)]
    assert all(file_bytes(tmp_path)[k] == v for k, v in first.items() if k.startswith("shard"))

    # Appending nothing touches nothing; other info is refused; None keeps the info.
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in tmp_path.iterdir()}
    ShardWriter(tmp_path, append=True, info={"a": 1}).close()
    ShardWriter(tmp_path, append=True).close()
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in tmp_path.iterdir()} == before
    with pytest.raises(ValueError, match="other settings"):
        ShardWriter(tmp_path, append=True, info={"a": 2})

    # append=True on an empty folder starts a dataset; abort drops the open shard and its keys.
    w = ShardWriter(tmp_path / "new", shard_size=2, append=True)
    w.write(_clip(0))
    w.write(_clip(1))
    w.write(_clip(2))
    w.abort()
    assert w.keys == {"c0", "c1"} and not list((tmp_path / "new").glob("*.tmp"))
    assert read_manifest(tmp_path / "new")["num_clips"] == 2

