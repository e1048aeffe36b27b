"""Real video corpora -> aligned clips: a keyframe, a clip, its audio track and its caption, cut with PyAV.

Two annotation layouts are read (the format is told by the files in ``source``, or by ``format=``):

- **webvid**: a CSV with WebVid's columns ``videoid``, ``name`` (the caption) and optionally ``page_dir``,
  ``duration``, ``contentUrl``. One clip per video (group = videoid, index 0), the whole video unless
  ``clip_seconds`` is set. The video of row ``videoid`` is looked for, in this order, as
  ``videos/{page_dir}/{videoid}.EXT``, ``{page_dir}/{videoid}.EXT``, ``videos/{videoid}.EXT`` and
  ``{videoid}.EXT`` under ``source``, for EXT in .mp4, .avi, .mov, .mkv, .webm (.mp4 first).
- **activitynet**: a JSON ``{video_id: {"duration": s, "timestamps": [[start, end], ...], "sentences": [...]}}``
  (ActivityNet Captions). Every timestamped segment is one clip (group = video id, index = segment order), so the
  consecutive clips of one long video can feed interleaved training. The video is looked for as ``{id}.EXT``,
  ``v_{id}.EXT`` and (for ids that start with ``v_``) ``{id without v_}.EXT``, in ``videos/`` and then directly
  under ``source``.

``source`` may also name the CSV or JSON file itself; its folder is then where the videos are looked for. All
``*.csv`` (or ``*.json``) files directly in ``source`` are read, in name order; an item listed twice is kept once.

Per clip (:func:`cut_clip`): the segment [start, end) in seconds from the video's start (the container's start
time), its end clamped to the video stream's duration; ``num_frames`` frames at the centres of equal parts of the
segment; the keyframe is the frame shown at the segment's **middle**; frames are resized (shorter side) and centre
cropped to ``size`` x ``size`` like :func:`xvila.media.load_image`. The audio is ``audio_seconds`` of the track
centred on the segment's middle (shifted to stay inside the file; zero-padded only where the file is shorter),
mixed to mono and resampled to ``sample_rate`` (``audio_seconds=None``: exactly the segment). Stored as
:class:`~xvila.data.records.AlignedClip` (uint8 image/video, int16 audio) with ``meta`` naming the source file, the
segment, and the original size, frame rate and audio format.

Runs in ``workers`` processes (the parent writes the shards, in listing order, so the result does not depend on the
number of workers), resumable and idempotent:

- the truth of what is done is the dataset itself: an item whose clip key is in a shard the manifest lists is done;
  new clips go to new shards (:class:`~xvila.data.records.ShardWriter` ``append=True``);
- ``ingest_ledger.jsonl`` in ``out`` gets one line per item: skips at once, ``done`` lines only once the item's shard
  is complete and listed in the manifest, so a killed run loses at most the shard it was writing and the rerun
  redoes exactly those items;
- items skipped before are not retried (``retry_skipped=True`` retries them), except a missing file that has
  appeared since;
- a rerun with nothing new leaves shards, manifest and ledger untouched (only ``ingest_report.json`` is rewritten).

Nothing about one item stops the run: missing, empty, corrupt, truncated or unsupported files, files without a video
or audio stream, silent audio, segments outside the video and bad annotation rows are skipped with a category and a
reason (:class:`IngestReport`, also written to ``out/ingest_report.json``); a worker process that crashes is
replaced and the item that crashed it is skipped.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import multiprocessing
import os
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any

import av
import numpy as np
from scipy.signal import resample_poly

from xvila.data.records import MANIFEST, AlignedClip, ShardWriter
from xvila.media import DEFAULT_MAX_PIXELS, SILENCE_PEAK, VIDEO_SUFFIXES, MediaError, _check_pixels, _resize_center_crop

logger = logging.getLogger(__name__)

FORMATS = ("webvid", "activitynet")
LEDGER = "ingest_ledger.jsonl"
REPORT = "ingest_report.json"
KEYFRAME = "middle"  # the keyframe is the frame shown at the middle of the segment

# Skip categories (the first word of every reason in the report).
MISSING = "missing file"
EMPTY = "empty file"
UNSUPPORTED = "unsupported file"
CORRUPT = "corrupt file"
TRUNCATED = "truncated file"
NO_VIDEO = "no video stream"
NO_AUDIO = "no audio stream"
SILENT = "silent audio"
OUTSIDE = "segment outside video"
BAD_ANNOTATION = "bad annotation"
DUPLICATE = "duplicate item"
CRASHED = "worker crashed"
ERROR = "error"

END_TOLERANCE = 0.25  # seconds a stream may fall short of where its header says it ends before we call it truncated
MIN_SEGMENT = 0.05  # seconds: shorter (after clamping to the video) is no clip
AUDIO_PREROLL = 0.2  # seconds decoded before an audio window that starts after a seek


class SkipItem(ValueError):
    """An item that cannot become a clip; ``category`` is one of this module's skip categories."""

    def __init__(self, category: str, reason: str):
        super().__init__(reason)
        self.category = category


# ------------------------------------------------------------------------------------------------ listing items


@dataclass(frozen=True)
class IngestItem:
    """One clip to cut: a segment of a video file with its caption."""

    item_id: str  # unique within the annotations: "{videoid}" (webvid), "{video_id}#{segment}" (activitynet)
    key: str  # the clip key derived from item_id
    caption: str
    group: str
    index: int
    path: Path | None  # the video file; None when it was not found
    start: float | None = None  # seconds from the video's start; None: from the start
    end: float | None = None  # None: to the end
    meta: dict[str, Any] = field(default_factory=dict, compare=False)  # annotation facts kept in the clip's meta
    problem: str = ""  # an annotation problem: the item is skipped without being decoded
    searched: str = ""  # where the file was looked for (for the missing-file reason)


def safe_key(text: str) -> str:
    """A clip key for ``text``: itself when it is made of letters, digits, '-' and '_', else a cleaned name plus a
    short hash (so distinct ids never share a key)."""
    clean = "".join(c if c.isascii() and (c.isalnum() or c in "-_") else "_" for c in text)
    if clean == text and text:
        return text
    return f"{clean[:80]}-{hashlib.sha1(text.encode()).hexdigest()[:10]}"


def _is_plain_name(text: str) -> bool:
    """A single path component without traversal (ids and page_dirs come from untrusted annotation files)."""
    return bool(text) and text not in (".", "..") and "/" not in text and "\\" not in text and "\0" not in text


def _find_video(root: Path, folders: list[str], names: list[str]) -> tuple[Path | None, str]:
    for folder in folders:
        for name in names:
            for suffix in VIDEO_SUFFIXES:
                path = root / folder / f"{name}{suffix}"
                if path.is_file():
                    return path, ""
    exts = "{" + ",".join(s.lstrip(".") for s in VIDEO_SUFFIXES) + "}"
    where = ", ".join(f"{folder}/" if folder != "." else "./" for folder in folders)
    return None, f"looked for {' or '.join(f'{n}.{exts}' for n in names)} in {where} under {root}"


def list_webvid(csv_path: str | Path, root: str | Path) -> list[IngestItem]:
    """The items of a WebVid-style CSV (columns ``videoid``, ``name``; optional ``page_dir``, ``duration``,
    ``contentUrl``); videos are looked for under ``root`` as the module docstring says."""
    csv_path, root = Path(csv_path), Path(root)
    items = []
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"videoid", "name"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{csv_path}: not a WebVid-style CSV: no {sorted(missing)} column(s) (columns: "
                             f"{reader.fieldnames}); expected videoid, name[, page_dir, duration, contentUrl]")
        for row_number, row in enumerate(reader, start=2):
            videoid = (row.get("videoid") or "").strip()
            caption = (row.get("name") or "").strip()
            page_dir = (row.get("page_dir") or "").strip()
            item_id = videoid or f"{csv_path.name}:row{row_number}"
            meta = {name: row[column] for column, name in
                    (("page_dir", "page_dir"), ("duration", "annotated_duration"), ("contentUrl", "url"))
                    if row.get(column)}
            problem = ""
            if not _is_plain_name(videoid):
                problem = f"row {row_number} of {csv_path.name}: bad videoid {videoid!r}"
            elif page_dir and not _is_plain_name(page_dir):
                problem = f"row {row_number} of {csv_path.name}: bad page_dir {page_dir!r}"
            elif not caption:
                problem = f"row {row_number} of {csv_path.name}: empty caption"
            path, searched = None, ""
            if not problem:
                folders = ([f"videos/{page_dir}", page_dir] if page_dir else []) + ["videos", "."]
                path, searched = _find_video(root, folders, [videoid])
            items.append(IngestItem(item_id, safe_key(item_id), caption, group=videoid or item_id, index=0,
                                    path=path, meta=meta, problem=problem, searched=searched))
    return items


def list_activitynet(json_path: str | Path, root: str | Path) -> list[IngestItem]:
    """The items of an ActivityNet-Captions-style JSON, one per timestamped segment; videos are looked for under
    ``root`` as the module docstring says."""
    json_path, root = Path(json_path), Path(root)
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{json_path}: not readable as JSON ({error})") from None
    if not isinstance(data, dict) or (data and not all(isinstance(v, dict) for v in data.values())):
        raise ValueError(f"{json_path}: not an ActivityNet-Captions-style JSON "
                         '({video_id: {"duration": s, "timestamps": [[start, end], ...], "sentences": [...]}})')
    items = []
    for video_id, annotation in data.items():
        timestamps, sentences = annotation.get("timestamps"), annotation.get("sentences")
        video_problem = ""
        if not _is_plain_name(video_id):
            video_problem = f"bad video id {video_id!r}"
        elif not isinstance(timestamps, list) or not isinstance(sentences, list):
            video_problem = "no timestamps or sentences lists"
        elif len(timestamps) != len(sentences):
            video_problem = f"{len(timestamps)} timestamps but {len(sentences)} sentences"
        if video_problem:
            item_id = f"{video_id}#*"
            items.append(IngestItem(item_id, safe_key(item_id), "", video_id, 0, None,
                                    problem=f"{json_path.name}: video {video_id!r}: {video_problem}"))
            continue
        names = [video_id, f"v_{video_id}"] + ([video_id[2:]] if video_id.startswith("v_") and video_id[2:] else [])
        path, searched = _find_video(root, ["videos", "."], names)
        meta = {"annotated_duration": annotation.get("duration")}
        for index, (span, sentence) in enumerate(zip(timestamps, sentences)):
            item_id = f"{video_id}#{index}"
            problem, start, end = "", None, None
            try:
                start, end = (float(x) for x in span)
                if not (math.isfinite(start) and math.isfinite(end) and start < end):
                    raise ValueError
            except (TypeError, ValueError):
                problem = f"{json_path.name}: video {video_id!r} segment {index}: bad timestamps {span!r}"
            caption = sentence.strip() if isinstance(sentence, str) else ""
            if not problem and not caption:
                problem = f"{json_path.name}: video {video_id!r} segment {index}: empty sentence"
            items.append(IngestItem(item_id, f"{safe_key(video_id)}-{index:03d}", caption, video_id, index, path,
                                    start=start, end=end, meta=meta, problem=problem, searched=searched))
    return items


_LISTERS = {"webvid": (".csv", list_webvid), "activitynet": (".json", list_activitynet)}


def find_annotations(source: str | Path, format: str | None = None) -> tuple[str, list[Path], Path]:
    """(format, annotation files, video root) for ``source``: a folder with ``*.csv`` (webvid) or ``*.json``
    (activitynet) files, or one such file."""
    source = Path(source)
    if format is not None and format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; known formats: {', '.join(FORMATS)}")
    if source.is_file():
        found = {fmt: [source] for fmt, (suffix, _) in _LISTERS.items() if source.suffix.lower() == suffix}
        root = source.parent
    elif source.is_dir():
        ours = {MANIFEST, REPORT}
        found = {fmt: sorted(p for p in source.iterdir() if p.suffix.lower() == suffix and p.is_file()
                             and p.name not in ours)
                 for fmt, (suffix, _) in _LISTERS.items()}
        found = {fmt: files for fmt, files in found.items() if files}
        root = source
    else:
        raise FileNotFoundError(f"source {source} does not exist")
    if format is None:
        if len(found) > 1:
            raise ValueError(f"{source} holds both CSV and JSON files; pass format='webvid' (CSV) or "
                             "format='activitynet' (JSON), or name the annotation file as the source")
        if not found:
            raise ValueError(f"{source}: no annotations found: expected a WebVid-style .csv (videoid, name, ...) or "
                             "an ActivityNet-Captions-style .json ({video_id: {timestamps, sentences}}) in it")
        format = next(iter(found))
    if not found.get(format):
        raise ValueError(f"{source}: no {_LISTERS[format][0]} annotation file for format {format!r}")
    return format, found[format], root


# ------------------------------------------------------------------------------------------------- cutting clips


@dataclass
class ClipMedia:
    """The media cut from one segment: image uint8 (size, size, 3), video uint8 (T, size, size, 3), audio int16 (S,)
    and facts about the source (JSON-ready)."""

    image: np.ndarray
    video: np.ndarray
    audio: np.ndarray
    meta: dict[str, Any]


def _seconds(value, time_base) -> float | None:
    return None if value is None or time_base is None else float(value * time_base)


def _stream_end(stream, zero: float) -> float | None:
    """Where a stream ends, in seconds from the container's start, by its header; None when it does not say."""
    duration = _seconds(stream.duration, stream.time_base)
    if duration is None or duration <= 0:
        return None
    start = _seconds(stream.start_time, stream.time_base)
    return duration + (start - zero if start is not None else 0.0)


def _frame_time(frame, zero: float, previous: float | None, fps: float) -> float:
    if frame.time is not None:
        return frame.time - zero
    return 0.0 if previous is None else previous + 1.0 / fps


def _pick_frames(container, stream, zero: float, times: list[float], end: float, size: int, fps: float,
                 path: Path) -> dict[float, np.ndarray]:
    """The frame shown at each of ``times`` (sorted seconds), resized and cropped. Decodes forward from the keyframe
    before the first time; keeps only the frames it returns."""
    wanted = deque(times)
    picked: dict[float, np.ndarray] = {}
    if wanted[0] > 1.0:
        container.seek(int((wanted[0] + zero) / stream.time_base), stream=stream, backward=True)
    previous, previous_time, previous_rgb = None, None, None

    def rgb(frame):
        return _resize_center_crop(frame.to_ndarray(format="rgb24"), size)

    try:
        for frame in container.decode(stream):
            t = _frame_time(frame, zero, previous_time, fps)
            while wanted and wanted[0] < t:  # shown before this frame: the previous one (or this, if none yet)
                if previous is None:
                    previous, previous_time = frame, t
                if previous_rgb is None:
                    previous_rgb = rgb(previous)
                picked[wanted.popleft()] = previous_rgb
            if not wanted:
                break
            if frame is not previous:
                previous, previous_time, previous_rgb = frame, t, None
    except av.FFmpegError as error:
        if previous is None:
            raise SkipItem(CORRUPT, f"{path}: cannot decode video frames ({error})") from None
        logger.debug("%s: video decoding stopped at %.2f s (%s)", path, previous_time, error)
    if wanted:
        if previous is None:
            raise SkipItem(CORRUPT, f"{path}: video has no decodable frames")
        # The last frame stays on screen for 1/fps; past that the stream ended before its header said.
        if wanted[-1] > previous_time + max(2.0 / fps, END_TOLERANCE):
            raise SkipItem(TRUNCATED, f"{path}: video frames end at {previous_time:.2f} s but the stream claims "
                                      f"{end:.2f} s (truncated or damaged file)")
        last = previous_rgb if previous_rgb is not None else rgb(previous)
        picked.update({t: last for t in wanted})
    return picked


def _audio_window(container, stream, zero: float, a0: float, a1: float, sample_rate: int, available: float,
                  path: Path) -> tuple[np.ndarray, int, int]:
    """Mono float64 samples of [a0, a1) at ``sample_rate`` (zero-padded past the end of the track), the track's
    native rate and channel count."""
    if a0 > 1.0:  # from a little before: audio decoders (AAC's overlapping windows) need a frame or two to settle
        container.seek(int((a0 - AUDIO_PREROLL + zero) / stream.time_base), stream=stream, backward=True)
    to_float = av.AudioResampler(format="fltp")  # sample format only: rate and layout are kept
    chunks, first_time, rate, decoded = [], None, stream.codec_context.sample_rate, 0
    try:
        for frame in container.decode(stream):
            if first_time is None:
                first_time = frame.time - zero if frame.time is not None else 0.0
            for converted in to_float.resample(frame):
                chunks.append(converted.to_ndarray())  # (channels, n)
                rate = converted.sample_rate
                decoded += converted.samples
            if first_time + decoded / rate >= a1 + 0.1:
                break
        for converted in to_float.resample(None):
            chunks.append(converted.to_ndarray())
            decoded += converted.samples
    except av.FFmpegError as error:
        if not chunks:
            raise SkipItem(CORRUPT, f"{path}: cannot decode audio ({error})") from None
        logger.debug("%s: audio decoding stopped early (%s)", path, error)
    if not chunks:
        raise SkipItem(CORRUPT, f"{path}: audio track has no samples")
    channels = max(c.shape[0] for c in chunks)
    data = np.concatenate([np.broadcast_to(c, (channels, c.shape[1])) for c in chunks], axis=1)  # (channels, S)
    covered = first_time + data.shape[1] / rate
    if covered < min(a1, available) - END_TOLERANCE:
        raise SkipItem(TRUNCATED, f"{path}: audio ends at {covered:.2f} s but the track claims {available:.2f} s "
                                  "(truncated or damaged file)")
    if not np.isfinite(data).all():
        raise SkipItem(CORRUPT, f"{path}: audio contains NaN or infinite samples")
    # Crop at the native rate with a margin, resample, then cut exactly at the target rate. The crop starts on a
    # sample that falls on the target rate's grid too, so the result equals resampling the whole track.
    margin = 0.05
    step = int(rate) // math.gcd(int(rate), int(sample_rate))
    first_sample = round(first_time * rate)
    i0 = max(0, int((a0 - margin - first_time) * rate))
    i0 = (first_sample + i0) // step * step - first_sample
    i0 += step if i0 < 0 else 0
    i1 = max(i0, int(math.ceil((a1 + margin - first_time) * rate)))
    mono = data[:, i0:i1].mean(axis=0, dtype=np.float64)  # (S,)
    piece_start = first_time + i0 / rate
    if rate != sample_rate:
        g = math.gcd(int(rate), int(sample_rate))
        mono = resample_poly(mono, sample_rate // g, int(rate) // g)
    n = round((a1 - a0) * sample_rate)
    offset = round((a0 - piece_start) * sample_rate)  # >= 0 unless the track starts after a0
    mono = np.pad(mono, (max(0, -offset), 0))[max(0, offset):][:n]
    return np.pad(mono, (0, n - mono.size)), rate, channels


def cut_clip(
    path: str | Path,
    start: float | None = None,
    end: float | None = None,
    *,
    num_frames: int = 8,
    size: int = 32,
    clip_seconds: float | None = None,
    sample_rate: int = 16000,
    audio_seconds: float | None = 1.0,
    allow_silent: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    threads: int = 0,
) -> ClipMedia:
    """Cut one aligned clip out of a video file: the segment [start, end) seconds (None: the video's start/end),
    shortened to its middle ``clip_seconds`` when longer. See the module docstring for what is taken.

    Raises :class:`SkipItem` (with a category) for every problem with the file or the segment.
    ``threads``: decoder threads (0: FFmpeg's choice).
    """
    if num_frames < 1 or size < 1:
        raise ValueError(f"num_frames and size must be positive, got {num_frames} and {size}")
    path = Path(path)
    if not path.is_file():
        raise SkipItem(MISSING, f"{path}: file not found")
    if not path.name.lower().endswith(VIDEO_SUFFIXES):
        raise SkipItem(UNSUPPORTED, f"{path}: unsupported file ending (supported: {', '.join(VIDEO_SUFFIXES)})")
    if path.stat().st_size == 0:
        raise SkipItem(EMPTY, f"{path}: file is empty")

    def open_container():
        try:
            return av.open(str(path), mode="r")
        except (av.FFmpegError, OSError, UnicodeDecodeError) as error:
            raise SkipItem(CORRUPT, f"{path}: cannot open as a media container (corrupt or unsupported: {error})") \
                from None

    with open_container() as container:
        if not container.streams.video:
            raise SkipItem(NO_VIDEO, f"{path}: has no video stream")
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        try:
            _check_pixels(path, width, height, max_pixels)
        except MediaError as error:
            raise SkipItem(UNSUPPORTED, str(error)) from None
        has_audio = bool(container.streams.audio)
        if not has_audio and not allow_silent:
            raise SkipItem(NO_AUDIO, f"{path}: has no audio track (pass allow_silent=True to keep it with silence)")
        zero = container.start_time / av.time_base if container.start_time is not None else 0.0
        fps = float(stream.average_rate) if stream.average_rate else 25.0
        video_end = _stream_end(stream, zero)
        if video_end is None and container.duration is not None:
            video_end = container.duration / av.time_base
        if video_end is None:
            raise SkipItem(UNSUPPORTED, f"{path}: the container does not say how long the video is")
        s = 0.0 if start is None else max(0.0, float(start))
        e = video_end if end is None else min(float(end), video_end)
        if s >= video_end or e - s < MIN_SEGMENT:
            raise SkipItem(OUTSIDE, f"{path}: segment {s:.2f}-{float(end if end is not None else e):.2f} s is outside "
                                    f"the video (0-{video_end:.2f} s)")
        if clip_seconds is not None and e - s > clip_seconds:
            middle = (s + e) / 2
            s, e = middle - clip_seconds / 2, middle + clip_seconds / 2
        times = [s + (i + 0.5) * (e - s) / num_frames for i in range(num_frames)]  # centres of equal parts
        key_time = (s + e) / 2
        stream.thread_type = "AUTO"
        if threads:
            stream.codec_context.thread_count = threads
        frames = _pick_frames(container, stream, zero, sorted(set(times) | {key_time}), video_end, size, fps, path)

    meta: dict[str, Any] = {
        "start": round(s, 4), "end": round(e, 4), "keyframe": KEYFRAME, "keyframe_time": round(key_time, 4),
        "width": width, "height": height, "fps": round(fps, 4), "duration": round(video_end, 4),
    }
    a0, a1 = (s, e) if audio_seconds is None else (key_time - audio_seconds / 2, key_time + audio_seconds / 2)
    n = round((a1 - a0) * sample_rate)
    if has_audio:
        with open_container() as container:
            audio_stream = container.streams.audio[0]
            available = _stream_end(audio_stream, zero)
            if available is None:
                available = container.duration / av.time_base if container.duration is not None else video_end
            if a1 > available:  # shift the window back inside the file, then clip it at the file's start
                a0, a1 = a0 - (a1 - available), available
            if a0 < 0:
                a0, a1 = 0.0, a1 - a0
            audio, rate, channels = _audio_window(container, audio_stream, zero, a0, a1, sample_rate, available, path)
        if not allow_silent and np.abs(audio).max(initial=0.0) < SILENCE_PEAK:
            raise SkipItem(SILENT, f"{path}: the clip's audio is silent (pass allow_silent=True to keep it)")
        meta.update({"audio_start": round(a0, 4), "audio_end": round(a1, 4), "audio_rate": rate,
                     "audio_channels": channels})
    else:
        audio = np.zeros(n)
        meta.update({"audio_start": None, "audio_end": None, "audio_rate": None, "audio_channels": 0})
    image = frames[key_time]
    video = np.stack([frames[t] for t in times])  # (T, size, size, 3)
    audio16 = np.round(np.clip(audio, -1.0, 1.0) * 32767).astype(np.int16)  # the AlignedClip convention
    return ClipMedia(np.ascontiguousarray(image), video, audio16, meta)


# ----------------------------------------------------------------------------------------------- parallel running


@dataclass
class _Outcome:
    media: ClipMedia | None = None
    category: str = ""
    reason: str = ""


def _cut_item(item: IngestItem, options: dict[str, Any]) -> _Outcome:
    """Worker body: never raises (a crash of the whole process is handled by :func:`_run_jobs`)."""
    try:
        return _Outcome(cut_clip(item.path, item.start, item.end, **options))
    except SkipItem as error:
        return _Outcome(category=error.category, reason=str(error))
    except Exception as error:  # noqa: BLE001 - one bad file must never stop the run
        return _Outcome(category=ERROR, reason=f"{item.path}: {type(error).__name__}: {error}")


MAX_CRASHES_IN_A_ROW = 3  # more isolated jobs than this killing their worker in a row: the pool, not the files


def _mp_context():
    # fork on Linux: workers start at once with this module imported, and never re-run the caller's main script
    # (forkserver and spawn do, which breaks a script without an `if __name__ == "__main__":` guard). The workers use
    # PyAV, numpy, PIL and scipy only, never torch, so forking a process that has imported torch is safe.
    if sys.platform.startswith("linux"):
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")  # the caller's script needs the __main__ guard here


def _start_pool(workers: int) -> ProcessPoolExecutor:
    executor = ProcessPoolExecutor(workers, mp_context=_mp_context())
    try:
        executor.submit(os.getpid).result()
    except BrokenProcessPool:
        executor.shutdown(wait=True, cancel_futures=True)
        raise RuntimeError("the worker processes died at start; on platforms that spawn them, the main script needs "
                           "an `if __name__ == \"__main__\":` guard (or pass workers=0)") from None
    return executor


def _run_jobs(jobs: Iterable[Any], fn: Callable[[Any], Any], workers: int, crashed: Callable[[Any], Any],
              window: int | None = None) -> Iterator[tuple[Any, Any]]:
    """(job, fn(job)) for every job, in order, computed in ``workers`` processes (0: in this process).

    When a worker process dies (e.g. FFmpeg crashing on a hostile file), the pool is replaced and the jobs that were
    in flight are rerun one at a time, so the one that kills its process is found: it yields ``crashed(job)``.
    Workers that die on several jobs in a row point at the pool itself: that raises RuntimeError.
    """
    if workers <= 0:
        for job in jobs:
            yield job, fn(job)
        return
    window = window or 4 * workers
    queue, in_flight = deque(jobs), deque()
    suspects = 0  # jobs to run alone since the last crash
    crashes = 0  # isolated jobs that killed their worker, in a row
    executor = _start_pool(workers)
    try:
        while queue or in_flight:
            limit = 1 if suspects else window
            while queue and len(in_flight) < limit:
                job = queue.popleft()
                in_flight.append((job, executor.submit(fn, job)))
            job, future = in_flight.popleft()
            try:
                result = future.result()
            except BrokenProcessPool:
                executor.shutdown(wait=True, cancel_futures=True)
                if suspects:
                    crashes += 1
                    if crashes >= MAX_CRASHES_IN_A_ROW:
                        raise RuntimeError(f"worker processes died on {crashes} jobs in a row (the last: {job!r}); "
                                           "out of memory? (try fewer workers)") from None
                    suspects -= 1
                    logger.warning("a worker process died on %r; skipping it", job)
                    executor = _start_pool(workers)
                    yield job, crashed(job)
                else:
                    rerun = [job] + [j for j, _ in in_flight]
                    in_flight.clear()
                    queue.extendleft(reversed(rerun))
                    suspects = len(rerun)
                    executor = _start_pool(workers)
                continue
            suspects, crashes = max(0, suspects - 1), 0
            yield job, result
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


# ------------------------------------------------------------------------------------------------ ledger, report


class _Ledger:
    """``ingest_ledger.jsonl``: one JSON line per item outcome; the last line about an item wins."""

    def __init__(self, path: Path):
        self.path = path
        self.entries: dict[str, dict[str, Any]] = {}
        if path.exists():
            raw = path.read_bytes()
            complete = raw[: raw.rfind(b"\n") + 1]
            if len(complete) != len(raw):  # a line cut by a kill: drop it, the rerun redoes its item
                with open(path, "r+b") as f:
                    f.truncate(len(complete))
            for line in complete.decode("utf-8", errors="replace").splitlines():
                try:
                    entry = json.loads(line)
                    self.entries[entry["item"]] = entry
                except (json.JSONDecodeError, KeyError, TypeError):
                    logger.warning("%s: ignoring an unreadable line: %.80s", path, line)
        self._file = None

    def record(self, entries: list[dict[str, Any]], sync: bool = False) -> None:
        if not entries:
            return
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")
        for entry in entries:
            self._file.write(json.dumps(entry, sort_keys=True) + "\n")
            self.entries[entry["item"]] = entry
        self._file.flush()
        if sync:
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


@dataclass
class IngestReport:
    """What a :func:`build_dataset` run did. ``reasons`` lists every listed item that is not in the dataset
    (skipped by this run or an earlier one): ``{"item", "category", "reason"}``."""

    source: str
    out: str
    format: str
    annotations: list[str]
    items: int = 0  # items listed by the annotations
    done: int = 0  # clips written by this run
    skipped: int = 0  # items skipped by this run
    already_done: int = 0  # items whose clip was in the dataset before this run
    already_skipped: int = 0  # items skipped by an earlier run and not retried
    num_clips: int = 0  # clips in the dataset after this run
    seconds: float = 0.0
    workers: int = 0
    reasons: list[dict[str, str]] = field(default_factory=list)

    @property
    def skip_counts(self) -> dict[str, int]:
        return dict(sorted(Counter(r["category"] for r in self.reasons).items()))

    @property
    def clips_per_second(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["seconds"] = round(self.seconds, 3)
        reasons = d.pop("reasons")
        d.update(skip_counts=self.skip_counts, clips_per_second=round(self.clips_per_second, 3), reasons=reasons)
        return d

    def write(self, path: str | Path) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        tmp.rename(path)


# ------------------------------------------------------------------------------------------------- the pipeline


def _skip_entry(report: IngestReport, item_id: str, category: str, reason: str) -> dict[str, Any]:
    """Note a skip in the report; return its ledger line."""
    report.reasons.append({"item": item_id, "category": category, "reason": reason})
    return {"item": item_id, "status": "skipped", "category": category, "reason": reason}


def _plan(items: list[IngestItem], existing: frozenset[str], ledger: _Ledger, report: IngestReport,
          retry_skipped: bool) -> list[IngestItem]:
    """The items to decode; the others are counted in ``report`` (and new skips recorded in the ledger)."""
    seen, keys, todo, skips = set(), set(), [], []
    for item in items:
        if item.item_id in seen:
            report.reasons.append({"item": item.item_id, "category": DUPLICATE,
                                   "reason": f"{item.item_id} is listed more than once; the first is kept"})
            continue
        seen.add(item.item_id)
        if item.key in keys:  # two ids that map to one key (only for ids that safe_key had to clean)
            report.reasons.append({"item": item.item_id, "category": DUPLICATE,
                                   "reason": f"{item.item_id}: its clip key {item.key} is taken by another item"})
            continue
        keys.add(item.key)
        if item.key in existing:
            report.already_done += 1
            continue
        before = ledger.entries.get(item.item_id)
        if before and before.get("status") == "skipped" and not retry_skipped \
                and not (before.get("category") == MISSING and item.path is not None):
            report.already_skipped += 1
            report.reasons.append({k: before.get(k, "") for k in ("item", "category", "reason")})
            continue
        if item.problem:
            skips.append(_skip_entry(report, item.item_id, BAD_ANNOTATION, item.problem))
        elif item.path is None:
            skips.append(_skip_entry(report, item.item_id, MISSING,
                                     f"{item.item_id}: video not found ({item.searched})"))
        else:
            todo.append(item)
    report.skipped += len(skips)
    ledger.record(skips)
    return todo


def build_dataset(
    source: str | Path,
    out: str | Path,
    *,
    format: str | None = None,
    num_frames: int = 8,
    size: int = 32,
    clip_seconds: float | None = None,
    sample_rate: int = 16000,
    audio_seconds: float | None = 1.0,
    allow_silent: bool = False,
    retry_skipped: bool = False,
    workers: int = 2,
    shard_size: int = 1000,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = True,
    on_item: Callable[[IngestItem, str], None] | None = None,
) -> IngestReport:
    """Cut the aligned clips of a video corpus in ``source`` into shards in ``out``; resumable (see the module
    docstring). Returns the run's :class:`IngestReport`, also written to ``out/ingest_report.json``.

    ``workers``: decoding processes (0: decode in this process). ``on_item(item, status)`` is called after each item
    is handled, with status "written" (in the open shard; done once that shard is complete) or "skipped".
    Settings that shape the clips (format, num_frames, size, clip_seconds, sample_rate, audio_seconds) must match
    those of the dataset already in ``out``.
    """
    t0 = time.perf_counter()
    if shard_size < 1 or workers < 0:
        raise ValueError(f"shard_size must be >= 1 and workers >= 0, got {shard_size} and {workers}")
    if (audio_seconds is not None and audio_seconds <= 0) or (clip_seconds is not None and clip_seconds <= 0):
        raise ValueError(f"audio_seconds and clip_seconds must be positive or None, got {audio_seconds} and "
                         f"{clip_seconds}")
    format, annotations, root = find_annotations(source, format)
    out = Path(out)
    lister = _LISTERS[format][1]
    items = [item for path in annotations for item in lister(path, root)]
    info = {"builder": __name__, "format": format, "num_frames": num_frames, "size": size,
            "clip_seconds": clip_seconds, "sample_rate": sample_rate, "audio_seconds": audio_seconds,
            "keyframe": KEYFRAME}
    writer = ShardWriter(out, shard_size=shard_size, info=info, append=True)  # raises if the settings differ
    ledger = _Ledger(out / LEDGER)
    report = IngestReport(str(source), str(out), format, [str(p) for p in annotations], items=len(items),
                          workers=workers)
    logger.info("%s: %d %s items from %s", source, len(items), format, ", ".join(p.name for p in annotations))

    todo = _plan(items, writer.keys, ledger, report, retry_skipped)
    skip = partial(_skip_entry, report)

    options = dict(num_frames=num_frames, size=size, clip_seconds=clip_seconds, sample_rate=sample_rate,
                   audio_seconds=audio_seconds, allow_silent=allow_silent, max_pixels=max_pixels,
                   threads=max(1, (os.cpu_count() or 1) // max(1, workers)))
    work = partial(_cut_item, options=options)

    def crashed(item):
        return _Outcome(category=CRASHED, reason=f"{item.path}: the decoding process died (crash in FFmpeg?)")

    pending: list[dict[str, Any]] = []  # items in the open shard: done once it is complete
    shards_before = len(writer.shards)

    def commit() -> None:
        nonlocal shards_before
        if len(writer.shards) > shards_before:
            shard = writer.shards[-1]["name"]
            ledger.record([dict(entry, shard=shard) for entry in pending], sync=True)
            pending.clear()
            shards_before = len(writer.shards)

    bar, outcomes = None, _run_jobs(todo, work, workers, crashed)
    if progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc=f"ingest {format}", unit="item")
    try:
        for item, outcome in outcomes:
            if outcome.media is None:
                ledger.record([skip(item.item_id, outcome.category, outcome.reason)])
                report.skipped += 1
                status = "skipped"
            else:
                media = outcome.media
                meta = {"dataset": format, "id": item.item_id, "source": _relative(item.path, root),
                        "annotated": [item.start, item.end] if item.start is not None else None,
                        **item.meta, **media.meta}
                writer.write(AlignedClip(item.key, item.caption, media.image, media.video, media.audio,
                                         group=item.group, index=item.index, meta=meta))
                pending.append({"item": item.item_id, "status": "done", "key": item.key})
                report.done += 1
                status = "written"
                commit()
            if bar is not None:
                bar.update()
            if on_item is not None:
                on_item(item, status)
        writer.close()
        commit()
    except BaseException:
        # Ctrl-C or a failing hook: the open shard is dropped, its items are not done, and the next run redoes them.
        writer.abort()
        raise
    finally:
        outcomes.close()
        ledger.close()
        if bar is not None:
            bar.close()
    order = {item.item_id: i for i, item in reversed(list(enumerate(items)))}
    report.reasons.sort(key=lambda r: order.get(r["item"], len(order)))  # listing order (stable for duplicates)
    report.num_clips = sum(s["count"] for s in writer.shards)
    report.seconds = time.perf_counter() - t0
    report.write(out / REPORT)
    logger.info("%s: %d clips written, %d skipped, %d already done, %d skipped before; %d clips in %s (%.1f s)",
                source, report.done, report.skipped, report.already_done, report.already_skipped, report.num_clips,
                out, report.seconds)
    return report


def _relative(path: Path, root: Path) -> str:
    try:
        return str(PurePosixPath(path.relative_to(root)))
    except ValueError:
        return str(path)


__all__ = [
    "FORMATS",
    "ClipMedia",
    "IngestItem",
    "IngestReport",
    "SkipItem",
    "build_dataset",
    "cut_clip",
    "find_annotations",
    "list_activitynet",
    "list_webvid",
    "safe_key",
]
