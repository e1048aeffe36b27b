"""Image decoder in the Stable Diffusion 1.5 layout: UNet2DConditionModel + AutoencoderKL + CLIPTextModel.

Facts taken from diffusers' StableDiffusionPipeline: prompts are padded to 77 tokens and encoded to CLIP's
last_hidden_state (B, 77, 768); images in [-1, 1] go through the VAE and are multiplied by its ``scaling_factor``
(0.18215); the UNet takes ``encoder_hidden_states``. The tiny variant works in pixel space (the VAE is optional:
``vae=None``) because an untrained tiny VAE would only blur; a trained tiny VAE plugs in through the same config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from xvila.configuration import Config
from xvila.decoders.base import (
    BUILT_SPECIAL_IDS,
    Decoder,
    SchedulerConfig,
    TokenizerConfig,
    check_arch,
    check_scheduler_folder,
    check_pooled_conditioning,
    check_text_source,
    class_labels_kwargs,
    clip_text_embeds,
    controlnet_kwargs,
    diffusers_part,
    downscale_of,
    freeze,
    latents_to_images,
    residual_layout,
    scale_factor_of,
    transformers_part,
)
from xvila.highway import HighwayResiduals, ResidualLayout

UNET_KEYS = (
    "in_channels",
    "out_channels",
    "block_out_channels",
    "down_block_types",
    "up_block_types",
    "layers_per_block",
    "cross_attention_dim",
)
VAE_KEYS = ("in_channels", "out_channels", "latent_channels", "block_out_channels", "scaling_factor")


def sd_vae() -> dict[str, Any]:
    """The Stable Diffusion (1.x / 2.x, also ZeroScope) AutoencoderKL, 83.7M parameters."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [128, 256, 512, 512],
        "layers_per_block": 2,
        "latent_channels": 4,
        "norm_num_groups": 32,
        "act_fn": "silu",
        "sample_size": 512,
        "scaling_factor": 0.18215,
    }


def tiny_clip_text(hidden_size: int = 64, max_length: int = 16, vocab_size: int = 512) -> dict[str, Any]:
    return {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": max_length,
        "hidden_act": "quick_gelu",
        **BUILT_SPECIAL_IDS,
    }


def tiny_vae(in_channels: int = 3, latent_channels: int = 4, block_out_channels: tuple[int, ...] = (16, 32)
             ) -> dict[str, Any]:
    """A tiny AutoencoderKL, downsampling 2 ** (len(block_out_channels) - 1) times: (16, 32) for tests, (32, 64, 64)
    for the toy world's 4x VAEs (trained by a ``foundation.autoencode`` phase)."""
    levels = len(block_out_channels)
    return {
        "in_channels": in_channels,
        "out_channels": in_channels,
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": list(block_out_channels),
        "layers_per_block": 1,
        "latent_channels": latent_channels,
        "norm_num_groups": 8,
        "sample_size": 32,
        "scaling_factor": 1.0,
    }


def tiny_scheduler() -> SchedulerConfig:
    """v-prediction + trailing spacing: what learned fast at tiny size (ENVIRONMENT.md); cosine betas suit pixels."""
    return SchedulerConfig(
        beta_schedule="squaredcos_cap_v2",
        prediction_type="v_prediction",
        timestep_spacing="trailing",
        steps_offset=0,
        num_inference_steps=25,
        guidance_scale=3.0,
    )


@dataclass
class ImageDecoderConfig(Config):
    """unet: UNet2DConditionModel kwargs; text_encoder: CLIPTextConfig kwargs; vae: AutoencoderKL kwargs or None
    for pixel space; height/width: the sampled image size; weights_path: a local diffusers-format folder."""

    unet: dict[str, Any]
    text_encoder: dict[str, Any]
    tokenizer: TokenizerConfig
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    vae: dict[str, Any] | None = None
    height: int = 512
    width: int = 512
    weights_path: str | None = None
    text_encoder_source: str = "own"  # "own": the CLIP tower above; "minilm": see xvila.decoders.sentence

    @property
    def cond_shape(self) -> tuple[int, int]:
        """(Q, D_cond): the conditioning the decoder's UNet reads (and its text encoder produces)."""
        q = 1 if self.text_encoder_source == "minilm" else self.tokenizer.max_length
        return (q, self.text_encoder["hidden_size"])

    @property
    def media_shape(self) -> tuple[int, ...]:
        """One generated item, in the repo's media conventions."""
        return (3, self.height, self.width)

    def __post_init__(self) -> None:
        check_arch("unet", self.unet, UNET_KEYS)
        if self.vae is not None:
            check_arch("vae", self.vae, VAE_KEYS)
            if self.vae["in_channels"] != 3 or self.vae["out_channels"] != 3:
                raise ValueError("an image VAE takes and gives 3 channels")
        latent_channels = 3 if self.vae is None else self.vae["latent_channels"]
        if self.unet["in_channels"] != latent_channels or self.unet["out_channels"] != latent_channels:
            raise ValueError(
                f"unet in/out_channels must equal the latent channels ({latent_channels}: "
                f"{'pixels' if self.vae is None else 'vae.latent_channels'})"
            )
        check_text_source(self, self.tokenizer.max_length)
        if self.unet["cross_attention_dim"] != self.text_encoder["hidden_size"]:
            raise ValueError("unet.cross_attention_dim must equal text_encoder.hidden_size (the conditioning width)")
        check_pooled_conditioning(self.unet, self.cond_shape)
        factor = scale_factor_of(self.vae) * downscale_of(self.unet)
        if self.height % factor or self.width % factor:
            raise ValueError(f"height and width must be multiples of {factor} (VAE x UNet downsampling)")

    @classmethod
    def tiny(cls, *, with_vae: bool = False) -> ImageDecoderConfig:
        """32x32 images; pixel space (1.7M-param UNet), or a 2x tiny VAE (16x16x4 latents) with ``with_vae``."""
        latent = 4 if with_vae else 3
        unet = {
            "sample_size": 16 if with_vae else 32,
            "in_channels": latent,
            "out_channels": latent,
            "block_out_channels": [32, 64, 64],
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "layers_per_block": 1,
            "norm_num_groups": 8,
            "attention_head_dim": 4,
            "cross_attention_dim": 64,
        }
        return cls(
            unet=unet,
            text_encoder=tiny_clip_text(),
            tokenizer=TokenizerConfig(max_length=16, vocab_size=512),
            scheduler=tiny_scheduler(),
            vae=tiny_vae() if with_vae else None,
            height=32,
            width=32,
        )

    @classmethod
    def tiny_latent(cls) -> ImageDecoderConfig:
        """32x32 images through a 4x tiny VAE (8x8x4 latents; trained on the toy world, then frozen) and a
        (64, 128) UNet with cross-attention at both levels: each diffusion step costs a quarter of pixel space's."""
        config = cls.tiny()
        unet = dict(config.unet, sample_size=8, in_channels=4, out_channels=4, block_out_channels=[64, 128],
                    down_block_types=["CrossAttnDownBlock2D"] * 2, up_block_types=["CrossAttnUpBlock2D"] * 2)
        return config.replace(unet=unet, vae=tiny_vae(block_out_channels=(32, 64, 64)))

    @classmethod
    def sd15(cls, weights_path: str | None = None) -> ImageDecoderConfig:
        """Stable Diffusion 1.5 (runwayml/stable-diffusion-v1-5 configs): 859.5M-param UNet, 64x64x4 latents."""
        unet = {
            "sample_size": 64,
            "in_channels": 4,
            "out_channels": 4,
            "block_out_channels": [320, 640, 1280, 1280],
            "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
            "layers_per_block": 2,
            "attention_head_dim": 8,
            "cross_attention_dim": 768,
            "downsample_padding": 1,
            "flip_sin_to_cos": True,
            "freq_shift": 0,
            "mid_block_scale_factor": 1,
            "norm_eps": 1e-5,
            "norm_num_groups": 32,
            "act_fn": "silu",
            "center_input_sample": False,
        }
        text_encoder = {  # openai/clip-vit-large-patch14 text tower
            "vocab_size": 49408,
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "max_position_embeddings": 77,
            "hidden_act": "quick_gelu",
        }
        scheduler = SchedulerConfig(  # SD-1.5's PNDM betas, sampled with DDIM
            beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="epsilon",
            timestep_spacing="leading", steps_offset=1, num_inference_steps=50, guidance_scale=7.5,
        )  # fmt: skip
        return cls(
            unet=unet,
            text_encoder=text_encoder,
            tokenizer=TokenizerConfig(max_length=77),
            scheduler=scheduler,
            vae=sd_vae(),
            height=512,
            width=512,
            weights_path=weights_path,
        )


class ImageDecoder(Decoder):
    """image (B, 3, H, W) in [0, 1] <-> latents (B, c, H/f, W/f); CLIP conditioning (B, Q, D_cond)."""

    modality = "image"

    def __init__(self, config: ImageDecoderConfig) -> None:
        super().__init__(config)
        wp = config.weights_path
        check_scheduler_folder(config.scheduler, wp)
        self.unet = diffusers_part(UNet2DConditionModel, config.unet, wp, "unet")
        self.vae = None if config.vae is None else freeze(diffusers_part(AutoencoderKL, config.vae, wp, "vae"))
        self._build_text_encoder(
            lambda: transformers_part(CLIPTextModel, CLIPTextConfig, config.text_encoder, wp, "text_encoder")
        )
        self.scale_factor = scale_factor_of(config.vae)
        self.downscale = downscale_of(config.unet)


    def _encode_own_text(self, texts: list[str]) -> torch.Tensor:
        return clip_text_embeds(self, texts)

    def residual_shapes(self, height: int, width: int) -> ResidualLayout:
        f = self.scale_factor
        return residual_layout(self.unet.config, (height // f, width // f))

    def vae_inputs(self, media: torch.Tensor) -> torch.Tensor:
        return media * 2 - 1  # (B, 3, H, W) in [-1, 1]

    def latents_to_media(self, latents: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return latents_to_images(self.vae, latents)  # (B, 3, H, W)

    def latent_shape(self, batch: int) -> tuple[int, ...]:
        f = self.scale_factor
        return (batch, self.unet.config.in_channels, self.config.height // f, self.config.width // f)

    def _check_media(self, media: torch.Tensor) -> None:
        factor = self.scale_factor * self.downscale
        if media.ndim != 4 or media.shape[1] != 3:
            raise ValueError(f"image decoder: media must be (B, 3, H, W) in [0, 1], got {tuple(media.shape)}")
        if media.shape[2] % factor or media.shape[3] % factor:
            raise ValueError(f"image decoder: H and W must be multiples of {factor}, got {tuple(media.shape[2:])}")

    def _layout_of_latents(self, latents: torch.Tensor) -> tuple[ResidualLayout, int]:
        return residual_layout(self.unet.config, tuple(latents.shape[-2:])), latents.shape[0]

    def _unet(
        self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, residuals: HighwayResiduals | None
    ) -> torch.Tensor:
        return self.unet(x, t, encoder_hidden_states=cond, **class_labels_kwargs(self.unet, cond),
                         **controlnet_kwargs(residuals)).sample
