"""The media modalities, described once.

Tensor conventions used across the repository (the shape legend):

    B  batch (media items)        T  video frames           S  audio samples (16 kHz mono)
    C  channels                    H, W  height, width       L  token sequence length
    D  LLM hidden size             N  encoder patch tokens   E  shared embedding size
    K  generation tokens per item  Q  decoder conditioning tokens

- image: (B, 3, H, W) float in [0, 1]
- video: (B, T, 3, H, W) float in [0, 1]
- audio: (B, S) float waveform in [-1, 1], 16 kHz mono

Encoders take media in these conventions (they normalise / compute log-mels themselves) and decoders return them,
so generated media can be fed straight back into an encoder for evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Modality:
    name: str
    placeholder: str  # the prompt token that an input item's projected tokens replace
    gen_prefix: str  # generation tokens are [PREFIX0] .. [PREFIX{K-1}]
    visual: bool  # image and video take the Visual Embedding Highway
    suffixes: tuple[str, ...]  # file name endings we read (and the first one we write)
    sample_ndim: int  # dimensions of one item's tensor (without B)

    def gen_tokens(self, count: int) -> list[str]:
        return [f"[{self.gen_prefix}{i}]" for i in range(count)]

    def marker(self, index: int) -> str:
        """Where a generated item stands in the answer text, e.g. ``<video 0>``."""
        return f"<{self.name} {index}>"


MODALITIES: dict[str, Modality] = {
    m.name: m
    for m in (
        Modality("image", "<image>", "IMG", True, (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif"), 3),
        Modality("video", "<video>", "VID", True, (".mp4", ".avi", ".mov", ".mkv", ".webm"), 4),
        Modality("audio", "<audio>", "AUD", False, (".wav", ".mp3", ".flac", ".ogg", ".m4a"), 1),
    )
}


def get_modality(name: str) -> Modality:
    try:
        return MODALITIES[name]
    except KeyError:
        raise ValueError(f"unknown modality {name!r}; known modalities: {sorted(MODALITIES)}") from None


def check_modalities(names) -> None:
    for name in names:
        get_modality(name)


def modality_of_path(path: str) -> Modality:
    lower = str(path).lower()
    for m in MODALITIES.values():
        if lower.endswith(m.suffixes):
            return m
    known = sorted(s for m in MODALITIES.values() for s in m.suffixes)
    raise ValueError(f"cannot tell the modality of {path!r} from its file name; supported endings: {known}")
