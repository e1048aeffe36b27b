"""Diffusion decoders for the generated modalities: one interface (``Decoder``), one file per modality.

``build_decoder(config)`` picks the class from the config's type; reference configs (``ImageDecoderConfig.sd15``,
``VideoDecoderConfig.zeroscope``, ``AudioDecoderConfig.audioldm``) load weights from a local diffusers-format folder
given as ``weights_path``; ``.tiny()`` configs build small random decoders for tests and the embedded model.
"""

from __future__ import annotations

from xvila.decoders.audio import AudioDecoder, AudioDecoderConfig, MelConfig
from xvila.decoders.base import Decoder, SchedulerConfig, TokenizerConfig, residual_layout, use_minilm
from xvila.decoders.image import ImageDecoder, ImageDecoderConfig
from xvila.decoders.video import VideoDecoder, VideoDecoderConfig

DecoderConfig = ImageDecoderConfig | VideoDecoderConfig | AudioDecoderConfig

DECODERS: dict[type, type[Decoder]] = {
    ImageDecoderConfig: ImageDecoder,
    VideoDecoderConfig: VideoDecoder,
    AudioDecoderConfig: AudioDecoder,
}
CONFIGS: dict[str, type] = {"image": ImageDecoderConfig, "video": VideoDecoderConfig, "audio": AudioDecoderConfig}


def build_decoder(config: DecoderConfig) -> Decoder:
    """The decoder a config describes (random init, or ``config.weights_path`` loaded offline)."""
    try:
        cls = DECODERS[type(config)]
    except KeyError:
        raise ValueError(
            f"no decoder for config type {type(config).__name__}; expected one of {[c.__name__ for c in DECODERS]}"
        ) from None
    return cls(config)


__all__ = [
    "use_minilm",
    "CONFIGS",
    "AudioDecoder",
    "AudioDecoderConfig",
    "Decoder",
    "DecoderConfig",
    "ImageDecoder",
    "ImageDecoderConfig",
    "MelConfig",
    "SchedulerConfig",
    "TokenizerConfig",
    "VideoDecoder",
    "VideoDecoderConfig",
    "build_decoder",
    "residual_layout",
]
