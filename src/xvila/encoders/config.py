"""Configuration of the ImageBind-architecture encoders.

One :class:`EncoderConfig` holds a config per tower (vision for image and video, audio, optional text) and the shared
embedding size. ``EncoderConfig.imagebind_huge()`` is the published ImageBind-Huge architecture (its parameter names
and shapes match ``imagebind_huge.pth``); ``EncoderConfig.tiny()`` is a few-hundred-thousand-parameter copy of the
same design for tests and the toy world.
"""

from __future__ import annotations

from dataclasses import dataclass

from xvila.configuration import Config

# CLIP's image normalisation, which ImageBind's vision tower was trained with.
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

# ImageBind's log-mel normalisation (AudioSet statistics of the Kaldi fbank features).
IMAGEBIND_MEL_MEAN = -4.268
IMAGEBIND_MEL_STD = 9.138


def _check_positive(owner: str, **values: float) -> None:
    for name, value in values.items():
        if value <= 0:
            raise ValueError(f"{owner}.{name} must be positive, got {value}")


@dataclass
class TrunkConfig(Config):
    """A pre-norm transformer trunk (ImageBind's ``SimpleTransformer``)."""

    width: int
    layers: int
    heads: int
    mlp_ratio: int = 4
    pre_layernorm: bool = False  # LayerNorm(eps=1e-6) before the first block; ImageBind uses it for vision only
    add_bias_kv: bool = False  # a learned key/value token appended in attention (audio, depth, thermal, imu)
    drop_path: float = 0.0  # stochastic depth, rising linearly from 0 (first block) to this value (last block)

    def __post_init__(self) -> None:
        _check_positive("TrunkConfig", width=self.width, layers=self.layers, heads=self.heads, mlp_ratio=self.mlp_ratio)
        if self.width % self.heads:
            raise ValueError(f"TrunkConfig.width ({self.width}) must be divisible by heads ({self.heads})")
        if not 0.0 <= self.drop_path < 1.0:
            raise ValueError(f"TrunkConfig.drop_path must be in [0, 1), got {self.drop_path}")


@dataclass
class VisionTowerConfig(Config):
    """Images and videos through one Conv3d patch stem: an image is a clip of ``clip_frames`` copies of itself."""

    trunk: TrunkConfig
    image_size: int = 224
    patch_size: int = 14
    clip_frames: int = 2  # the Conv3d stem's temporal kernel (= stride): a video is cut into clips of this many frames
    video_frames: int = 8  # the default T of a video item, used by num_patches()/patch_grid() when T is not given
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self) -> None:
        _check_positive(
            "VisionTowerConfig",
            image_size=self.image_size,
            patch_size=self.patch_size,
            clip_frames=self.clip_frames,
            video_frames=self.video_frames,
        )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"VisionTowerConfig.image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})"
            )
        if self.video_frames % self.clip_frames:
            raise ValueError(
                f"VisionTowerConfig.video_frames ({self.video_frames}) must be a multiple of clip_frames "
                f"({self.clip_frames})"
            )
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("VisionTowerConfig.mean/std must be 3 values each, std positive")

    @property
    def grid_size(self) -> int:
        """Patches per side of one frame."""
        return self.image_size // self.patch_size


@dataclass
class AudioTowerConfig(Config):
    """16 kHz waveforms -> Kaldi-style log-mel fbank (computed in torch) -> Conv2d patches."""

    trunk: TrunkConfig
    sample_rate: int = 16000
    num_mel_bins: int = 128
    target_frames: int = 204  # log-mel frames after padding/cropping (ImageBind: 2 s clips = 198 frames, padded)
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0
    patch_size: int = 16
    patch_stride: int = 10
    mel_mean: float = IMAGEBIND_MEL_MEAN
    mel_std: float = IMAGEBIND_MEL_STD
    logit_scale_init: float = 20.0
    logit_scale_learnable: bool = False

    def __post_init__(self) -> None:
        _check_positive(
            "AudioTowerConfig",
            sample_rate=self.sample_rate,
            num_mel_bins=self.num_mel_bins,
            target_frames=self.target_frames,
            frame_length_ms=self.frame_length_ms,
            frame_shift_ms=self.frame_shift_ms,
            patch_size=self.patch_size,
            patch_stride=self.patch_stride,
            mel_std=self.mel_std,
            logit_scale_init=self.logit_scale_init,
        )
        if self.num_mel_bins < self.patch_size or self.target_frames < self.patch_size:
            raise ValueError(
                f"AudioTowerConfig: num_mel_bins ({self.num_mel_bins}) and target_frames ({self.target_frames}) "
                f"must be at least patch_size ({self.patch_size})"
            )

    @property
    def frame_length(self) -> int:
        """Samples per analysis window (400 at 16 kHz)."""
        return int(self.sample_rate * self.frame_length_ms / 1000)

    @property
    def frame_shift(self) -> int:
        """Samples between windows (160 at 16 kHz)."""
        return int(self.sample_rate * self.frame_shift_ms / 1000)

    @property
    def grid(self) -> tuple[int, int]:
        """(mel rows, time columns) of the patch grid."""
        rows = (self.num_mel_bins - self.patch_size) // self.patch_stride + 1
        cols = (self.target_frames - self.patch_size) // self.patch_stride + 1
        return rows, cols

    @property
    def clip_samples(self) -> int:
        """Waveform samples that fill exactly ``target_frames`` log-mel frames."""
        return (self.target_frames - 1) * self.frame_shift + self.frame_length


@dataclass
class TextTowerConfig(Config):
    """A causal CLIP-style text transformer, pooled at the end-of-text token."""

    trunk: TrunkConfig
    vocab_size: int = 49408
    context_length: int = 77
    eos_token_id: int = 49407  # pooled at the first occurrence (CLIP BPE's <|endoftext|>, its highest id)
    causal: bool = True
    logit_scale_init: float = 1 / 0.07
    logit_scale_learnable: bool = True

    def __post_init__(self) -> None:
        _check_positive(
            "TextTowerConfig",
            vocab_size=self.vocab_size,
            context_length=self.context_length,
            logit_scale_init=self.logit_scale_init,
        )
        if not 0 <= self.eos_token_id < self.vocab_size:
            raise ValueError(f"TextTowerConfig.eos_token_id ({self.eos_token_id}) must be in [0, {self.vocab_size})")


@dataclass
class EncoderConfig(Config):
    """The ImageBind-architecture encoders into one shared, L2-normalised embedding space of size ``embed_dim``."""

    vision: VisionTowerConfig
    audio: AudioTowerConfig
    text: TextTowerConfig | None = None  # the tower the shared space is anchored to (optional)
    embed_dim: int = 1024
    max_logit_scale: float = 100.0
    gradient_checkpointing: bool = False  # torch.utils.checkpoint per transformer block while gradients are on
    weights_path: str | None = None  # a local imagebind_huge.pth that build_encoder() loads; never downloaded

    def __post_init__(self) -> None:
        _check_positive("EncoderConfig", embed_dim=self.embed_dim, max_logit_scale=self.max_logit_scale)

    @classmethod
    def imagebind_huge(cls, weights_path: str | None = None, with_text: bool = True) -> EncoderConfig:
        """The published ImageBind-Huge (``imagebind_huge()`` in facebookresearch/ImageBind)."""
        vision = VisionTowerConfig(
            trunk=TrunkConfig(width=1280, layers=32, heads=16, pre_layernorm=True, add_bias_kv=False, drop_path=0.0),
            image_size=224,
            patch_size=14,
            clip_frames=2,
        )
        audio = AudioTowerConfig(
            trunk=TrunkConfig(width=768, layers=12, heads=12, pre_layernorm=False, add_bias_kv=True, drop_path=0.1),
            num_mel_bins=128,
            target_frames=204,
            patch_size=16,
            patch_stride=10,
            logit_scale_init=20.0,
            logit_scale_learnable=False,
        )
        text = TextTowerConfig(
            trunk=TrunkConfig(width=1024, layers=24, heads=16, pre_layernorm=False, add_bias_kv=False, drop_path=0.0),
            vocab_size=49408,
            context_length=77,
            eos_token_id=49407,
            logit_scale_init=1 / 0.07,
            logit_scale_learnable=True,
        )
        text = text if with_text else None
        return cls(vision=vision, audio=audio, text=text, embed_dim=1024, weights_path=weights_path)

    @classmethod
    def tiny(cls, with_text: bool = True) -> EncoderConfig:
        """A tiny random-weight copy: 32x32 images (4x4 patches of 8 px), 1 s of audio (64 mel bins x 100 frames).

        Patch grids: image (1, 4, 4); video of 4 frames (2, 4, 4); audio (1, 5, 9); trunk widths 64; embed_dim 64.
        The text tower fits ``xvila.text.build_tokenizer()`` (vocab 512, ``</s>`` = 2).
        """
        vision = VisionTowerConfig(
            trunk=TrunkConfig(width=64, layers=2, heads=4, pre_layernorm=True),
            image_size=32,
            patch_size=8,
            clip_frames=2,
            video_frames=4,
        )
        audio = AudioTowerConfig(
            trunk=TrunkConfig(width=64, layers=2, heads=4, add_bias_kv=True, drop_path=0.1),
            num_mel_bins=64,
            target_frames=100,
            patch_size=16,
            patch_stride=10,
        )
        text = TextTowerConfig(
            trunk=TrunkConfig(width=64, layers=2, heads=4),
            vocab_size=512,
            context_length=32,
            eos_token_id=2,
        )
        return cls(vision=vision, audio=audio, text=text if with_text else None, embed_dim=64)


__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "IMAGEBIND_MEL_MEAN",
    "IMAGEBIND_MEL_STD",
    "AudioTowerConfig",
    "EncoderConfig",
    "TextTowerConfig",
    "TrunkConfig",
    "VisionTowerConfig",
]
