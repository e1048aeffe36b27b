"""Video decoder: ZeroScope v2 / TextToVideoSD layout (UNet3DConditionModel + AutoencoderKL + CLIP text 1024-d),
or, for the tiny model, a 2D UNet that sees the frames stacked in channels.

Facts taken from diffusers' TextToVideoSDPipeline: frames are encoded by the image VAE one by one (scaling 0.18215)
and the UNet3D takes latents (B, c, F, h, w) with CLIP last_hidden_state (B, 77, 1024); inside, UNet3D folds the
frames into the batch, so ControlNet-style residuals are per frame, (B*F, C, h, w).

Why the tiny model stacks frames (``frame_layout="stacked"``): at 8x32x32 a UNet3D step costs ~23x a 2D UNet with the
frames in channels (measured, ENVIRONMENT.md), which would make the video decoder the slowest part of every toy
training step. The stacked 2D UNet mixes all frames from its first conv on, so it can model the simple motions of
the toy world; its price is a fixed frame count (``num_frames``). ``frame_layout="unet3d"`` with ``.zeroscope()``
(or a tiny UNet3D) uses the same interface.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel, UNet3DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from xvila.configuration import Config
from xvila.decoders.base import (
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
from xvila.decoders.image import UNET_KEYS, VAE_KEYS, sd_vae, tiny_clip_text, tiny_scheduler, tiny_vae
from xvila.highway import HighwayResiduals, ResidualLayout

FRAME_LAYOUTS = ("unet3d", "stacked")


@dataclass
class VideoDecoderConfig(Config):
    """unet: UNet3DConditionModel kwargs ("unet3d") or UNet2DConditionModel kwargs ("stacked": F*c channels in and
    out); vae: AutoencoderKL kwargs (applied per frame) or None for pixel space; num_frames: the generated frame
    count (fixed for "stacked"); weights_path: a local diffusers-format folder."""

    unet: dict[str, Any]
    text_encoder: dict[str, Any]
    tokenizer: TokenizerConfig
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    vae: dict[str, Any] | None = None
    frame_layout: str = "unet3d"
    num_frames: int = 24
    height: int = 320
    width: int = 576
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
        return (self.num_frames, 3, self.height, self.width)

    def __post_init__(self) -> None:
        if self.frame_layout not in FRAME_LAYOUTS:
            raise ValueError(f"frame_layout must be one of {FRAME_LAYOUTS}, got {self.frame_layout!r}")
        if self.num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {self.num_frames}")
        check_arch("unet", self.unet, UNET_KEYS)
        want = "3D" if self.frame_layout == "unet3d" else "2D"
        if not all(b.endswith(want) for b in self.unet["down_block_types"] + self.unet["up_block_types"]):
            raise ValueError(f"frame_layout={self.frame_layout!r} needs {want} UNet blocks")
        if self.vae is not None:
            check_arch("vae", self.vae, VAE_KEYS)
        latent_channels = 3 if self.vae is None else self.vae["latent_channels"]
        if self.frame_layout == "stacked":
            latent_channels *= self.num_frames
        if self.unet["in_channels"] != latent_channels or self.unet["out_channels"] != latent_channels:
            raise ValueError(
                f"unet in/out_channels must be {latent_channels} (latent channels"
                f"{' x num_frames, frames stacked' if self.frame_layout == 'stacked' else ''})"
            )
        check_text_source(self, self.tokenizer.max_length)
        if self.unet["cross_attention_dim"] != self.text_encoder["hidden_size"]:
            raise ValueError("unet.cross_attention_dim must equal text_encoder.hidden_size (the conditioning width)")
        if self.frame_layout == "unet3d" and self.unet.get("class_embed_type") is not None:
            raise ValueError("unet.class_embed_type needs a 2D UNet (frame_layout='stacked'): UNet3D has no class "
                             "embedding")
        check_pooled_conditioning(self.unet, self.cond_shape)
        factor = scale_factor_of(self.vae) * downscale_of(self.unet)
        if self.height % factor or self.width % factor:
            raise ValueError(f"height and width must be multiples of {factor} (VAE x UNet downsampling)")

    @classmethod
    def tiny(
        cls, *, with_vae: bool = False, unet3d: bool = False, num_frames: int = 8, size: int = 32
    ) -> VideoDecoderConfig:
        """num_frames x size x size videos. Default: pixel space, frames stacked in a 2D UNet's channels
        (in_channels = 3 * num_frames). ``unet3d``: a tiny UNet3D (slow; for tests of that path)."""
        latent = 4 if with_vae else 3
        if unet3d:
            unet = {
                "sample_size": size // (2 if with_vae else 1),
                "in_channels": latent,
                "out_channels": latent,
                "block_out_channels": [16, 32],
                "down_block_types": ["CrossAttnDownBlock3D", "DownBlock3D"],
                "up_block_types": ["UpBlock3D", "CrossAttnUpBlock3D"],
                "layers_per_block": 1,
                "norm_num_groups": 8,
                "attention_head_dim": 4,
                "cross_attention_dim": 64,
            }
        else:
            unet = {
                "sample_size": size // (2 if with_vae else 1),
                "in_channels": latent * num_frames,
                "out_channels": latent * num_frames,
                "block_out_channels": [64, 96, 96],
                "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                "layers_per_block": 1,
                "norm_num_groups": 16,
                "attention_head_dim": 4,
                "cross_attention_dim": 64,
            }
        return cls(
            unet=unet,
            text_encoder=tiny_clip_text(),
            tokenizer=TokenizerConfig(max_length=16, vocab_size=512),
            scheduler=tiny_scheduler(),
            vae=tiny_vae() if with_vae else None,
            frame_layout="unet3d" if unet3d else "stacked",
            num_frames=num_frames,
            height=size,
            width=size,
        )

    @classmethod
    def tiny_latent(cls, num_frames: int = 8) -> VideoDecoderConfig:
        """num_frames x 32 x 32 videos through a per-frame 4x tiny VAE (8x8x4 latents per frame, trained on the
        toy world, then frozen), the frames' latents stacked in the channels of a (64, 128) 2D UNet."""
        config = cls.tiny(num_frames=num_frames)
        c = 4 * num_frames
        unet = dict(config.unet, sample_size=8, in_channels=c, out_channels=c, block_out_channels=[64, 128],
                    down_block_types=["CrossAttnDownBlock2D"] * 2, up_block_types=["CrossAttnUpBlock2D"] * 2)
        return config.replace(unet=unet, vae=tiny_vae(block_out_channels=(32, 64, 64)))

    @classmethod
    def zeroscope(cls, weights_path: str | None = None) -> VideoDecoderConfig:
        """ZeroScope v2 576w (cerspense/zeroscope_v2_576w; the damo text-to-video-ms-1.7b architecture):
        1.41B-param UNet3D, OpenCLIP ViT-H text tower (1024-d), SD VAE; 24 frames of 320x576."""
        unet = {
            "sample_size": 32,
            "in_channels": 4,
            "out_channels": 4,
            "block_out_channels": [320, 640, 1280, 1280],
            "down_block_types": ["CrossAttnDownBlock3D"] * 3 + ["DownBlock3D"],
            "up_block_types": ["UpBlock3D"] + ["CrossAttnUpBlock3D"] * 3,
            "layers_per_block": 2,
            "attention_head_dim": 64,
            "cross_attention_dim": 1024,
            "downsample_padding": 1,
            "mid_block_scale_factor": 1,
            "norm_eps": 1e-5,
            "norm_num_groups": 32,
            "act_fn": "silu",
        }
        text_encoder = {  # OpenCLIP ViT-H/14 text tower (as in Stable Diffusion 2)
            "vocab_size": 49408,
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 23,
            "num_attention_heads": 16,
            "max_position_embeddings": 77,
            "hidden_act": "gelu",
        }
        scheduler = SchedulerConfig(
            beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="epsilon",
            timestep_spacing="leading", steps_offset=1, sampler="dpmsolver++", num_inference_steps=40,
            guidance_scale=9.0,
        )  # fmt: skip
        return cls(
            unet=unet,
            text_encoder=text_encoder,
            tokenizer=TokenizerConfig(max_length=77),
            scheduler=scheduler,
            vae=sd_vae(),
            frame_layout="unet3d",
            num_frames=24,
            height=320,
            width=576,
            weights_path=weights_path,
        )


class VideoDecoder(Decoder):
    """video (B, T, 3, H, W) in [0, 1] <-> latents (B, c, T, h, w) ("unet3d") or (B, T*c, h, w) ("stacked")."""

    modality = "video"

    def __init__(self, config: VideoDecoderConfig) -> None:
        super().__init__(config)
        wp = config.weights_path
        check_scheduler_folder(config.scheduler, wp)
        unet_cls = UNet3DConditionModel if config.frame_layout == "unet3d" else UNet2DConditionModel
        self.unet = diffusers_part(unet_cls, config.unet, wp, "unet")
        self.vae = None if config.vae is None else freeze(diffusers_part(AutoencoderKL, config.vae, wp, "vae"))
        self._build_text_encoder(
            lambda: transformers_part(CLIPTextModel, CLIPTextConfig, config.text_encoder, wp, "text_encoder")
        )
        self.stacked = config.frame_layout == "stacked"
        self.scale_factor = scale_factor_of(config.vae)
        self.downscale = downscale_of(config.unet)
        self.latent_channels = 3 if config.vae is None else config.vae["latent_channels"]


    def _encode_own_text(self, texts: list[str]) -> torch.Tensor:
        return clip_text_embeds(self, texts)

    def residual_shapes(self, height: int, width: int) -> ResidualLayout:
        f = self.scale_factor
        return self._layout((height // f, width // f))

    def _layout(self, latent_hw: tuple[int, int]) -> ResidualLayout:
        if self.stacked:
            return residual_layout(self.unet.config, latent_hw, "stacked", self.config.num_frames)
        return residual_layout(self.unet.config, latent_hw, "per_frame")

    def media_to_latents(self, media: torch.Tensor, generator: torch.Generator | None,
                         posterior: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        b, t = media.shape[:2]
        z = self._encode_media(media, generator, posterior)  # (B*T, c, h, w)
        z = z.view(b, t, *z.shape[1:])  # (B, T, c, h, w)
        return z.flatten(1, 2) if self.stacked else z.permute(0, 2, 1, 3, 4)  # (B, T*c, h, w) | (B, c, T, h, w)

    def vae_inputs(self, media: torch.Tensor) -> torch.Tensor:
        return media.flatten(0, 1) * 2 - 1  # (B*T, 3, H, W) in [-1, 1]: the VAE works per frame

    def latents_to_media(self, latents: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        if self.stacked:
            b, _, h, w = latents.shape
            z = latents.view(b, -1, self.latent_channels, h, w)  # (B, T, c, h, w)
        else:
            z = latents.permute(0, 2, 1, 3, 4)  # (B, T, c, h, w)
        b, t = z.shape[:2]
        frames = latents_to_images(self.vae, z.flatten(0, 1))  # (B*T, 3, H, W)
        return frames.view(b, t, *frames.shape[1:])

    def latent_shape(self, batch: int) -> tuple[int, ...]:
        f, c, n = self.scale_factor, self.latent_channels, self.config.num_frames
        h, w = self.config.height // f, self.config.width // f
        return (batch, n * c, h, w) if self.stacked else (batch, c, n, h, w)

    def _check_media(self, media: torch.Tensor) -> None:
        factor = self.scale_factor * self.downscale
        if media.ndim != 5 or media.shape[2] != 3:
            raise ValueError(f"video decoder: media must be (B, T, 3, H, W) in [0, 1], got {tuple(media.shape)}")
        if self.stacked and media.shape[1] != self.config.num_frames:
            raise ValueError(
                f"video decoder: this stacked-frames decoder takes exactly {self.config.num_frames} frames, "
                f"got {media.shape[1]}"
            )
        if media.shape[3] % factor or media.shape[4] % factor:
            raise ValueError(f"video decoder: H and W must be multiples of {factor}, got {tuple(media.shape[3:])}")

    def _layout_of_latents(self, latents: torch.Tensor) -> tuple[ResidualLayout, int]:
        layout = self._layout(tuple(latents.shape[-2:]))
        batch = latents.shape[0] if self.stacked else latents.shape[0] * latents.shape[2]  # B | B*F
        return layout, batch

    def _unet(
        self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, residuals: HighwayResiduals | None
    ) -> torch.Tensor:
        return self.unet(x, t, encoder_hidden_states=cond, **class_labels_kwargs(self.unet, cond),
                         **controlnet_kwargs(residuals)).sample
