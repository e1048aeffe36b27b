"""The toy audio-visual world: one coloured shape moving on a dark background, seen as an aligned caption, image,
video and audio clip, and the probes that read its attributes back from each view (the judge of generated media).
The constants are documented in docs/toy_world.md.

Shape legend: T frames, H, W pixels, S audio samples. image (3, H, W) and video (T, 3, H, W) float32 in [0, 1];
audio (S,) float32 in [-1, 1] at 16 kHz.
"""

from xvila.world.captions import caption, caption_vocabulary, partial_caption
from xvila.world.degrade import degrade_audio, degrade_image, degrade_video
from xvila.world.geometry import SHAPES
from xvila.world.probes import (
    MEDIA_PROBES,
    MODALITY_ATTRIBUTES,
    caption_accuracy,
    mask_iou,
    probe_audio,
    probe_image,
    probe_text,
    probe_video,
    score,
    shape_mask,
)
from xvila.world.render import (
    HARMONICS,
    NOTE_HZ,
    WorldSample,
    render_audio,
    render_image,
    render_sample,
    render_video,
    split_sample,
)
from xvila.world.scene import (
    ATTRIBUTES,
    COLOURS,
    HELD_OUT_PAIRS,
    MOTIONS,
    PALETTE,
    SIZES,
    SPLITS,
    Scene,
    WorldConfig,
    sample_scene,
    scene_from_seed,
    split_allowed,
    split_scene,
    split_seed,
)

__all__ = [
    "ATTRIBUTES",
    "COLOURS",
    "HARMONICS",
    "HELD_OUT_PAIRS",
    "MEDIA_PROBES",
    "MODALITY_ATTRIBUTES",
    "MOTIONS",
    "NOTE_HZ",
    "PALETTE",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "Scene",
    "WorldConfig",
    "WorldSample",
    "caption",
    "caption_accuracy",
    "caption_vocabulary",
    "partial_caption",
    "degrade_audio",
    "degrade_image",
    "degrade_video",
    "mask_iou",
    "probe_audio",
    "probe_image",
    "probe_text",
    "probe_video",
    "render_audio",
    "render_image",
    "render_sample",
    "render_video",
    "sample_scene",
    "scene_from_seed",
    "score",
    "shape_mask",
    "split_allowed",
    "split_sample",
    "split_scene",
    "split_seed",
]
