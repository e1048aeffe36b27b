"""Aligned clips and their sharded storage.

An :class:`AlignedClip` is X-VILA's unit of data: a keyframe, a video clip, its audio track and its caption, all
describing the same moment. Toy-world scenes and clips cut from real videos are both stored as aligned clips in
tar shards with a manifest; the conversation builders (``xvila.data.tasks``) turn them into training data.

Stored per clip (``{key}.json``, ``{key}.image.npy``, ``{key}.video.npy``, ``{key}.audio.npy``):
image uint8 (H, W, 3), video uint8 (T, H, W, 3), audio int16 (S,) at 16 kHz. Converting to float happens once on
read (:meth:`AlignedClip.tensors`), so shards stay 4x smaller than float32.
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


@dataclass
class AlignedClip:
    key: str  # unique within a dataset; letters, digits, '-', '_' only
    caption: str
    image: np.ndarray  # uint8 (H, W, 3): the keyframe
    video: np.ndarray  # uint8 (T, H, W, 3)
    audio: np.ndarray  # int16 (S,) 16 kHz mono
    group: str = ""  # the long video this clip was cut from (consecutive clips share it)
    index: int = 0  # the clip's position within its group
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. toy-world attributes, source file, timestamps

    def __post_init__(self):
        if not self.key or not all(c.isalnum() or c in "-_" for c in self.key):
            raise ValueError(f"clip key {self.key!r} must be non-empty letters, digits, '-' or '_'")
        for name, dtype, ndim in (("image", np.uint8, 3), ("video", np.uint8, 4), ("audio", np.int16, 1)):
            value = getattr(self, name)
            if value.dtype != dtype or value.ndim != ndim:
                raise ValueError(f"clip {self.key}: {name} must be {np.dtype(dtype).name} with {ndim} dims, got "
                                 f"{value.dtype} {value.shape}")

    @classmethod
    def from_tensors(cls, key: str, caption: str, image, video, audio, **kwargs) -> AlignedClip:
        """From float media in the repo conventions (image (3,H,W), video (T,3,H,W) in [0,1]; audio (S,) in [-1,1])."""
        def u8(x):
            x = torch.as_tensor(x).float().clamp(0, 1)
            return (x * 255).round().to(torch.uint8).numpy()
        a = torch.as_tensor(audio).float().clamp(-1, 1)
        return cls(key, caption, u8(image).transpose(1, 2, 0).copy(), u8(video).transpose(0, 2, 3, 1).copy(),
                   (a * 32767).round().to(torch.int16).numpy(), **kwargs)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Float media in the repo conventions: image (3,H,W), video (T,3,H,W) in [0,1], audio (S,) in [-1,1]."""
        return {
            "image": torch.from_numpy(self.image).permute(2, 0, 1).float() / 255,
            "video": torch.from_numpy(self.video).permute(0, 3, 1, 2).float() / 255,
            "audio": torch.from_numpy(self.audio).float() / 32767,
        }


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


class ShardWriter:
    """Writes clips into ``shard-NNNNNN.tar`` files of ``shard_size`` clips, and the manifest.

    Each shard is written to a temporary name and renamed when complete, and the manifest is rewritten (atomically)
    after every completed shard, so a crash never leaves a half shard under a final name and loses at most the
    shard being written. Use as a context manager.

    With ``append=True`` an existing dataset in ``out_dir`` is continued: its shards stay as they are, new clips go
    to new shards numbered after them, keys already in the dataset are refused as duplicates (:attr:`keys` holds
    them), and leftovers of an interrupted run (``*.tar.tmp`` files, shards the manifest does not list) are removed.
    ``info`` must then match the existing manifest's info (or be None to keep it). Apart from removing such
    leftovers, a writer that writes nothing leaves the directory untouched. :meth:`abort` drops the open shard.
    """

    def __init__(self, out_dir: str | Path, shard_size: int = 1000, info: dict[str, Any] | None = None,
                 append: bool = False):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.shard_size = shard_size
        self.info = info or {}
        self.shards: list[dict[str, Any]] = []
        self._tar: tarfile.TarFile | None = None
        self._count = 0
        self._keys: set[str] = set()
        if append and (self.out_dir / MANIFEST).exists():
            self._resume(info)

    @property
    def keys(self) -> frozenset[str]:
        """The keys of every clip in the dataset so far (earlier runs included when appending)."""
        return frozenset(self._keys)

    def _resume(self, info: dict[str, Any] | None) -> None:
        manifest = read_manifest(self.out_dir)
        if info is not None:
            info = json.loads(json.dumps(info))  # as it reads back from the manifest (tuples become lists)
        if info is not None and info != manifest["info"]:
            changed = sorted(k for k in set(info) | set(manifest["info"]) if info.get(k) != manifest["info"].get(k))
            raise ValueError(
                f"{self.out_dir} holds a dataset written with other settings ({', '.join(changed)}: "
                f"{[manifest['info'].get(k) for k in changed]} there, {[info.get(k) for k in changed]} now); "
                "append with the same settings or write to a new directory"
            )
        self.info = manifest["info"]
        self.shards = list(manifest["shards"])
        listed = {s["name"] for s in self.shards}
        for path in sorted(self.out_dir.glob("shard-*.tar*")):
            if path.name not in listed and (path.name.endswith(".tar.tmp") or path.name.endswith(".tar")):
                logger.info("removing %s: not in the manifest (left by an interrupted run)", path)
                path.unlink()
        for shard in self.shards:
            with tarfile.open(self.out_dir / shard["name"], "r") as tar:
                self._keys.update(name.partition(".")[0] for name in tar.getnames())

    def write(self, clip: AlignedClip) -> None:
        if clip.key in self._keys:
            raise ValueError(f"duplicate clip key {clip.key!r}")
        if self._tar is None:
            self._open()
        self._keys.add(clip.key)
        self._open_keys.append(clip.key)
        meta = {"caption": clip.caption, "group": clip.group, "index": clip.index, "meta": clip.meta}
        files = {
            f"{clip.key}.json": json.dumps(meta, sort_keys=True).encode(),
            f"{clip.key}.image.npy": _npy_bytes(clip.image),
            f"{clip.key}.video.npy": _npy_bytes(clip.video),
            f"{clip.key}.audio.npy": _npy_bytes(clip.audio),
        }
        for name, data in files.items():
            member = tarfile.TarInfo(name)
            member.size = len(data)
            member.mtime = 0  # same content, same bytes
            self._tar.addfile(member, io.BytesIO(data))
        self._count += 1
        if self._count == self.shard_size:
            self._finish()

    def _open(self) -> None:
        listed = {s["name"] for s in self.shards}
        number = len(self.shards)
        while f"shard-{number:06d}.tar" in listed:
            number += 1
        self._name = f"shard-{number:06d}.tar"
        self._tmp = self.out_dir / (self._name + ".tmp")
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
        self._count = 0
        self._open_keys: list[str] = []

    def _finish(self) -> None:
        self._tar.close()
        self._tmp.rename(self.out_dir / self._name)
        self.shards.append({"name": self._name, "count": self._count})
        self._tar = None
        self._write_manifest()

    def _write_manifest(self) -> None:
        manifest = {"format_version": FORMAT_VERSION, "num_clips": sum(s["count"] for s in self.shards),
                    "shards": self.shards, "info": self.info}
        text = json.dumps(manifest, indent=2) + "\n"
        path = self.out_dir / MANIFEST
        if path.exists() and path.read_text() == text:
            return  # unchanged: leave the file (and its mtime) alone
        tmp = self.out_dir / (MANIFEST + ".tmp")
        tmp.write_text(text)
        tmp.rename(path)

    def close(self) -> None:
        if self._tar is not None:
            self._finish()
        else:
            self._write_manifest()

    def abort(self) -> None:
        """Drop the shard being written (its clips are lost; completed shards and the manifest stay)."""
        if self._tar is not None:
            self._tar.close()
            self._tmp.unlink(missing_ok=True)
            self._tar = None
            self._keys.difference_update(self._open_keys)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_manifest(data_dir: str | Path) -> dict[str, Any]:
    path = Path(data_dir) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{data_dir} is not an xvila dataset ({MANIFEST} missing)")
    manifest = json.loads(path.read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format version {manifest.get('format_version')}, this xvila reads {FORMAT_VERSION}")
    return manifest


def read_shard(path: str | Path) -> Iterator[AlignedClip]:
    """The clips of one shard, in the order they were written."""
    parts: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path, "r") as tar:
        for member in tar:
            key, _, kind = member.name.partition(".")
            parts.setdefault(key, {})[kind] = tar.extractfile(member).read()
            if len(parts[key]) == 4:
                p = parts.pop(key)
                meta = json.loads(p["json"])
                arrays = {k: np.load(io.BytesIO(p[f"{k}.npy"]), allow_pickle=False) for k in ("image", "video", "audio")}
                yield AlignedClip(key, meta["caption"], group=meta["group"], index=meta["index"], meta=meta["meta"],
                                  **arrays)
    if parts:
        raise ValueError(f"{path}: incomplete clip(s) {sorted(parts)[:3]}")


def read_clips(data_dir: str | Path) -> Iterator[AlignedClip]:
    """Every clip of a dataset, shard by shard."""
    for shard in read_manifest(data_dir)["shards"]:
        yield from read_shard(Path(data_dir) / shard["name"])
