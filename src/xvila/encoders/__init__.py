"""Media encoders into one shared embedding space (ImageBind architecture)."""

from xvila.encoders.config import (
    AudioTowerConfig,
    EncoderConfig,
    TextTowerConfig,
    TrunkConfig,
    VisionTowerConfig,
)
from xvila.encoders.imagebind import (
    IMAGEBIND_TOWERS,
    EncoderOutput,
    ImageBindEncoder,
    LoadReport,
    build_encoder,
    load_imagebind_state_dict,
)
from xvila.encoders.mel import LogMelFilterbank, kaldi_mel_filterbank, mel_center_frequencies

__all__ = [
    "IMAGEBIND_TOWERS",
    "AudioTowerConfig",
    "EncoderConfig",
    "EncoderOutput",
    "ImageBindEncoder",
    "LoadReport",
    "LogMelFilterbank",
    "TextTowerConfig",
    "TrunkConfig",
    "VisionTowerConfig",
    "build_encoder",
    "kaldi_mel_filterbank",
    "load_imagebind_state_dict",
    "mel_center_frequencies",
]
