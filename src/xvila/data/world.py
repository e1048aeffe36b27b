"""The toy world as a dataset: rendered scenes stored as aligned clips in tar shards (see ``xvila.data.records``).

Every clip's ``meta`` carries the scene (attributes and hidden details: position, rotation, background), the
world config and the split, so that a clip alone is enough to re-render an edited copy of its scene and to check
generated media with the probes. Toy-world scenes are independent; consecutive scenes are grouped into "long
videos" of ``group_size`` clips for the interleaved phase (the world has no real long videos).
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from xvila.data.records import AlignedClip, ShardWriter, read_manifest
from xvila.world import Scene, WorldConfig, WorldSample, split_sample

logger = logging.getLogger(__name__)

SOURCE = "xvila-world"  # meta["source"] and manifest info["source"] of toy-world data


def clip_key(split: str, index: int) -> str:
    return f"{split}-{index:06d}"


def world_meta(sample: WorldSample, split: str, config: WorldConfig) -> dict[str, Any]:
    """What a toy-world clip stores besides its media: enough to re-render it and to judge it."""
    return {
        "source": SOURCE,
        "split": split,
        "seed": sample.seed,
        "scene": sample.scene.to_dict(),  # shape, colour, size, motion, x, y, rotation, background, texture
        "world_config": config.to_dict(),
    }


def quantise(modality: str, x: np.ndarray) -> np.ndarray:
    """Float media (repo conventions) -> stored arrays, exactly as ``AlignedClip.from_tensors`` does, in numpy
    (tiny torch ops cost milliseconds each when the machine's cores are busy)."""
    if modality == "audio":
        return np.round(np.clip(x, -1, 1).astype(np.float32) * np.float32(32767)).astype(np.int16)
    u8 = np.round(np.clip(x, 0, 1).astype(np.float32) * np.float32(255)).astype(np.uint8)
    return np.ascontiguousarray(np.moveaxis(u8, -3, -1))  # channels last


def sample_clip(sample: WorldSample, split: str, index: int, config: WorldConfig, group_size: int = 4) -> AlignedClip:
    """One rendered world sample as an aligned clip (uint8 / int16 storage)."""
    return AlignedClip(
        clip_key(split, index), sample.caption, quantise("image", sample.image), quantise("video", sample.video),
        quantise("audio", sample.audio), group=f"{split}-group-{index // group_size:06d}", index=index % group_size,
        meta=world_meta(sample, split, config),
    )


@functools.lru_cache(maxsize=64)
def _parse_config(text: str) -> WorldConfig:
    return WorldConfig.from_dict(json.loads(text))


@functools.lru_cache(maxsize=65536)
def _parse_scene(text: str) -> Scene:
    return Scene.from_dict(json.loads(text))


def world_scene(clip: AlignedClip) -> tuple[Scene, WorldConfig, str] | None:
    """(scene, world config, split) of a toy-world clip; None for a clip of a real corpus."""
    meta = clip.meta
    if meta.get("source") != SOURCE:
        return None
    config = _parse_config(json.dumps(meta["world_config"], sort_keys=True))  # parsed (and validated) once
    return _parse_scene(json.dumps(meta["scene"], sort_keys=True)), config, meta["split"]


def is_world_dataset(data_dir: str | Path) -> bool:
    return read_manifest(data_dir)["info"].get("source") == SOURCE


def write_world(
    out_dir: str | Path,
    n: int,
    split: str = "train",
    config: WorldConfig | None = None,
    shard_size: int = 1000,
    samples: int = 4,
    group_size: int = 4,
    progress: bool = False,
) -> dict[str, Any]:
    """Render scenes 0..n-1 of ``split`` into shards plus a manifest under ``out_dir``; returns the manifest.

    Deterministic: the same arguments give the same shard and manifest bytes. The first ``samples`` clips are also
    written to ``out_dir/samples/`` as PNG, MP4 (with the sound, upscaled 8x) and WAV, with their captions in
    ``captions.txt``, for people to look at.
    """
    config = config or WorldConfig()
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if group_size < 1:
        raise ValueError(f"group_size must be at least 1, got {group_size}")
    start, end = config.seed_range(split)  # also checks the split name
    if n > end - start:
        raise ValueError(f"split {split!r} holds {end - start} scenes, asked for {n}")
    out_dir = Path(out_dir)
    if (out_dir / "manifest.json").exists() or any(out_dir.glob("shard-*.tar")):
        raise FileExistsError(f"{out_dir} already holds a dataset: choose an empty folder")
    info = {"source": SOURCE, "split": split, "num_scenes": n, "group_size": group_size,
            "world_config": config.to_dict()}
    indices = range(n)
    if progress:
        from tqdm import tqdm

        indices = tqdm(indices, desc=f"rendering {split}", unit="scene")
    shown = []
    with ShardWriter(out_dir, shard_size=shard_size, info=info) as writer:
        for i in indices:
            sample = split_sample(split, i, config)
            clip = sample_clip(sample, split, i, config, group_size)
            writer.write(clip)
            if i < samples:
                shown.append(clip)
    if shown:
        write_browsable(out_dir / "samples", shown, config)
    logger.info("wrote %d %s scenes to %s", n, split, out_dir)
    return read_manifest(out_dir)


def write_browsable(folder: Path, clips: list[AlignedClip], config: WorldConfig) -> None:
    """PNG, MP4 (with audio) and WAV files of ``clips``, and their captions, for people to look at."""
    from xvila.media import save_audio, save_image, save_video

    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for clip in clips:
        t = clip.tensors()
        save_image(folder / f"{clip.key}.png", t["image"])
        save_video(folder / f"{clip.key}.mp4", t["video"], fps=round(config.fps), audio=t["audio"],
                   sample_rate=config.sample_rate, upscale=8)
        save_audio(folder / f"{clip.key}.wav", t["audio"], config.sample_rate)
        lines.append(f"{clip.key}\t{clip.caption}")
    (folder / "captions.txt").write_text("\n".join(lines) + "\n")
