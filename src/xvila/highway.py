"""The Visual Embedding Highway (VEH): visual patch tokens of an input image or video guide a visual decoder.

X-VILA lets visual features bypass the LLM: the visual encoder's patch tokens of the conversation's input image or
video are turned into residuals added to the decoder UNet's down-block and mid-block outputs (the ControlNet
interface of diffusers: ``down_block_additional_residuals`` / ``mid_block_additional_residual``).

Design (a light ControlNet / T2I-Adapter): tokens -> Linear -> (h, w) patch map (with ``unpatchify`` u > 1 an
(h*u, w*u) map: each token's features fill a u x u block of cells, so a token can say where inside its patch the
content lies) -> bilinear resize to the decoder's latent resolution -> a small conv pyramid with one level per UNet
resolution -> one zero-initialised 1x1 conv per UNet residual, times ``strength`` when sampling. The residuals do not
depend on the timestep, so they are computed once per sample and reused at every denoising step (sampling stays
cheap). Zero-initialised output convs make a new highway an exact no-op, so training starts from the text-only
decoder.

Temporal handling (a ``grid`` of t clips, h x w patches):
- image decoder ("image" layout): a video input uses its FIRST clip. In video-to-image tasks the target image is the
  video's keyframe, which the toy world (and most keyframe extractors) take at the start of the clip; the first
  clip also keeps the map sharp, where averaging clips would blur moving content.
- stacked-frames video decoder ("stacked" layout, a 2D UNet with the F frames in channels): clips are resampled to
  the F frames (nearest: frame f uses clip floor(f * t / F)) and stacked in channels, matching how that UNet sees
  video; an image input (t = 1) therefore repeats over the frames.
- UNet3D video decoder ("per_frame" layout): the same resampling, with the frames moved into the batch,
  residuals (B*F, C, h, w) as UNet3DConditionModel expects them.

Shapes: B batch, N patch tokens (= t*h*w, no CLS token), C channels, F decoder frames.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from xvila.configuration import Config
from xvila.modalities import MODALITIES

FRAME_MODES = ("image", "stacked", "per_frame")


@dataclass(frozen=True)
class ResidualLayout:
    """Shapes of every residual a decoder UNet accepts, per item (no batch dimension).

    ``down`` lists (C, h, w) in the UNet's order: the conv_in output, then each resnet of each down block, then that
    block's downsampler. ``frame_mode`` says how frames meet the batch: "image" one map per item; "stacked" one map
    per item for a 2D UNet that sees ``num_frames`` frames stacked in channels; "per_frame" one map per frame
    (UNet3D), i.e. residuals of batch B*F.
    """

    down: tuple[tuple[int, int, int], ...]
    mid: tuple[int, int, int]
    frame_mode: str = "image"
    num_frames: int | None = None  # the fixed F of a "stacked" layout; None otherwise

    def __post_init__(self) -> None:
        if self.frame_mode not in FRAME_MODES:
            raise ValueError(f"frame_mode must be one of {FRAME_MODES}, got {self.frame_mode!r}")
        if (self.frame_mode == "stacked") != (self.num_frames is not None):
            raise ValueError("num_frames is required for a 'stacked' layout and must be None otherwise")
        if not self.down:
            raise ValueError("a residual layout needs at least one down residual")

    def check(self, residuals: HighwayResiduals, batch: int) -> None:
        """Raise ValueError unless ``residuals`` match this layout for ``batch`` rows (B, or B*F for per_frame)."""
        if len(residuals.down) != len(self.down):
            raise ValueError(
                f"expected {len(self.down)} down residuals for this decoder, got {len(residuals.down)}; build the "
                "highway from decoder.residual_shapes(height, width)"
            )
        for i, (res, shape) in enumerate(zip(residuals.down, self.down, strict=True)):
            if tuple(res.shape) != (batch, *shape):
                raise ValueError(f"down residual {i}: expected shape {(batch, *shape)}, got {tuple(res.shape)}")
        if tuple(residuals.mid.shape) != (batch, *self.mid):
            raise ValueError(f"mid residual: expected shape {(batch, *self.mid)}, got {tuple(residuals.mid.shape)}")


@dataclass
class HighwayResiduals:
    """What the highway hands to a decoder: ``down`` (one tensor per down residual) and ``mid``."""

    down: list[torch.Tensor]
    mid: torch.Tensor

    def repeat_batch(self, times: int) -> HighwayResiduals:
        """Stack ``times`` copies along the batch, e.g. for the two halves of classifier-free guidance."""
        return HighwayResiduals([torch.cat([d] * times) for d in self.down], torch.cat([self.mid] * times))

    def after_zeros(self) -> HighwayResiduals:
        """Zeros, then these residuals, along the batch: classifier-free guidance whose unconditional half they
        leave alone (adding zeros changes nothing)."""
        return HighwayResiduals([torch.cat([torch.zeros_like(d), d]) for d in self.down],
                                torch.cat([torch.zeros_like(self.mid), self.mid]))


@dataclass
class HighwayConfig(Config):
    hidden_channels: int = 64  # width of every level of the conv pyramid
    blocks_per_level: int = 1  # 3x3 conv + SiLU blocks per UNet resolution
    # residuals are multiplied by it when sampling (0 switches the highway off); the highway loss trains at 1.0.
    # > 1 lets the visual input weigh more against classifier-free guidance, which amplifies only the text
    strength: float = 1.0
    # each patch token becomes a u x u block of map cells (depth-to-space) before the resize; 1: one cell per token.
    # Pick u = latent size / patch grid (e.g. a 4x4 grid for an 8x8 latent: 2) so that no resize blurs the map.
    unpatchify: int = 1
    # training: the highway's denoising loss draws timesteps t = T * u^(1/p) (Decoder.denoising_loss); p > 1 favours
    # the noisiest steps, where the sample's layout (what the highway can tell) is decided; 1: uniform
    loss_timestep_power: float = 1.0
    # training: the highway's denoising loss draws this many (noise, timestep) pairs for each target, so a step sees
    # that many denoising samples for one pass of the frozen LLM over its conversations (most of a step's cost)
    loss_draws: int = 1
    # sampling: the fraction of the denoising steps, noisiest first, that the residuals guide (diffusers' ControlNet
    # ``control_guidance_end``); the later steps then follow the text alone. 1: every step. A mapping sets it per
    # output modality ({"image": 0.5, "video": 0.7}); a visual modality it leaves out gets 1
    end: float | dict[str, float] = 1.0
    # sampling: whether the residuals also guide the unconditional half of classifier-free guidance. True: guidance
    # amplifies the text alone and the visual input counts once, so it needs a strength > 1 to hold its own. False:
    # the visual input is part of the condition that guidance amplifies, with the text, in the proportion the loss
    # trained them (diffusers' ControlNet does this in its guess mode), and a strength below 1 suffices
    unconditional: bool = True

    def __post_init__(self) -> None:
        if self.hidden_channels < 1:
            raise ValueError(f"hidden_channels must be positive, got {self.hidden_channels}")
        if self.blocks_per_level < 1:
            raise ValueError(f"blocks_per_level must be at least 1, got {self.blocks_per_level}")
        if self.strength < 0:
            raise ValueError(f"strength must be >= 0, got {self.strength}")
        if self.unpatchify < 1:
            raise ValueError(f"unpatchify must be at least 1, got {self.unpatchify}")
        if self.loss_timestep_power <= 0:
            raise ValueError(f"loss_timestep_power must be > 0, got {self.loss_timestep_power}")
        if self.loss_draws < 1:
            raise ValueError(f"loss_draws must be at least 1, got {self.loss_draws}")
        ends = self.end if isinstance(self.end, dict) else {"every output": self.end}
        visual = sorted(name for name, spec in MODALITIES.items() if spec.visual)
        for name, end in ends.items():
            if isinstance(self.end, dict) and name not in visual:
                raise ValueError(f"end: {name!r} is not a visual output modality; use one of {visual}")
            if not 0.0 < end <= 1.0:
                raise ValueError(f"end must be in (0, 1], got {end} for {name}")

    def end_for(self, modality: str) -> float:
        """The fraction of the sampling steps the residuals guide for ``modality``'s decoder."""
        return self.end.get(modality, 1.0) if isinstance(self.end, dict) else self.end


def _zero_conv(in_channels: int, out_channels: int) -> nn.Conv2d:
    conv = nn.Conv2d(in_channels, out_channels, kernel_size=1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


def _levels_of(layout: ResidualLayout) -> tuple[list[tuple[int, int]], list[int]]:
    """The distinct resolutions of the down residuals (in order) and, for each residual, its level index."""
    sizes: list[tuple[int, int]] = []
    level_of: list[int] = []
    for _, h, w in layout.down:
        if not sizes or sizes[-1] != (h, w):
            if sizes:
                ph, pw = sizes[-1]
                if (h, w) != (math.ceil(ph / 2), math.ceil(pw / 2)):
                    raise ValueError(
                        f"residual layout goes from {sizes[-1]} to {(h, w)}; the highway supports UNets whose "
                        "resolution halves (rounding up) from one level to the next"
                    )
            sizes.append((h, w))
        level_of.append(len(sizes) - 1)
    if tuple(layout.mid[1:]) != sizes[-1]:
        raise ValueError(f"mid residual size {layout.mid[1:]} differs from the last down level {sizes[-1]}")
    return sizes, level_of


class VisualHighway(nn.Module):
    """Turns visual patch tokens into UNet residuals for one decoder (see the module docstring)."""

    def __init__(self, config: HighwayConfig, patch_dim: int, layout: ResidualLayout) -> None:
        super().__init__()
        self.config = config
        self.layout = layout
        self.level_sizes, self.level_of = _levels_of(layout)
        hid = config.hidden_channels
        frames_in_channels = layout.num_frames if layout.frame_mode == "stacked" else 1
        self.token_proj = nn.Linear(patch_dim, hid * config.unpatchify**2)
        self.stem = nn.Sequential(nn.Conv2d(hid * frames_in_channels, hid, 3, padding=1), nn.SiLU())
        levels = []
        for i in range(len(self.level_sizes)):
            blocks: list[nn.Module] = []
            for j in range(config.blocks_per_level):
                stride = 2 if (i > 0 and j == 0) else 1  # stride 2, padding 1: ceil(h / 2), as the UNet's downsamplers
                blocks += [nn.Conv2d(hid, hid, 3, stride=stride, padding=1), nn.SiLU()]
            levels.append(nn.Sequential(*blocks))
        self.levels = nn.ModuleList(levels)
        self.down_convs = nn.ModuleList([_zero_conv(hid, c) for c, _, _ in layout.down])
        self.mid_conv = _zero_conv(hid, layout.mid[0])

    def forward(
        self,
        patch_embeds: torch.Tensor,
        grid: tuple[int, int, int],
        num_frames: int | None = None,
        strength: float | None = None,
    ) -> HighwayResiduals:
        """patch_embeds (B, N, C_patch) with N = t*h*w for ``grid`` = (t, h, w).

        ``num_frames``: the F frames the video decoder generates; required for a "per_frame" layout, must be None or
        the layout's F for "stacked", and None for "image". ``strength`` overrides ``config.strength``.
        Returns residuals of batch B ("image", "stacked") or B*F ("per_frame").
        """
        if patch_embeds.ndim != 3:
            raise ValueError(f"patch_embeds must be (B, N, C), got shape {tuple(patch_embeds.shape)}")
        n = patch_embeds.shape[1]
        t, h, w = grid
        if n != t * h * w:
            raise ValueError(
                f"patch_embeds hold {n} tokens but grid {grid} needs t*h*w = {t * h * w}; pass patch tokens only "
                "(drop a CLS token) in (t, h, w) order"
            )
        x = self.token_map(patch_embeds, grid, self._frames(num_frames))
        x = self.stem(x)
        features = []
        for level in self.levels:
            x = level(x)
            features.append(x)
        scale = self.config.strength if strength is None else strength
        down = [conv(features[i]) * scale for conv, i in zip(self.down_convs, self.level_of, strict=True)]
        return HighwayResiduals(down=down, mid=self.mid_conv(features[-1]) * scale)

    def token_map(self, patch_embeds: torch.Tensor, grid: tuple[int, int, int], frames: int | None) -> torch.Tensor:
        """The map the conv pyramid starts from, at the first UNet resolution (h0, w0): (B, hid, h0, w0) for an
        image decoder, (B, F*hid, ...) stacked, (B*F, hid, ...) per frame."""
        b = patch_embeds.shape[0]
        t, h, w = grid
        u = self.config.unpatchify
        x = self.token_proj(patch_embeds)  # (B, N, hid * u * u)
        x = x.view(b, t, h, w, -1, u, u).permute(0, 1, 4, 2, 5, 3, 6)  # (B, t, hid, h, u, w, u)
        x = x.reshape(b, t, -1, h * u, w * u)  # (B, t, hid, h*u, w*u)
        if frames is None:
            x = x[:, 0]  # (B, hid, h*u, w*u): the first clip guides an image
        else:
            clip_of_frame = torch.arange(frames, device=x.device) * t // frames  # nearest clip for each frame
            x = x[:, clip_of_frame]  # (B, F, hid, h*u, w*u)
            if self.layout.frame_mode == "stacked":
                x = x.flatten(1, 2)  # (B, F*hid, h*u, w*u)
            else:
                x = x.flatten(0, 1)  # (B*F, hid, h*u, w*u)
        return F.interpolate(x, size=self.level_sizes[0], mode="bilinear", align_corners=False)  # (., ., h0, w0)

    def _frames(self, num_frames: int | None) -> int | None:
        mode = self.layout.frame_mode
        if mode == "image":
            if num_frames is not None:
                raise ValueError("this highway guides an image decoder: num_frames must be None")
            return None
        if mode == "stacked":
            if num_frames is not None and num_frames != self.layout.num_frames:
                raise ValueError(
                    f"this highway guides a stacked-frames decoder of {self.layout.num_frames} frames, "
                    f"got num_frames={num_frames}"
                )
            return self.layout.num_frames
        if num_frames is None or num_frames < 1:
            raise ValueError("a per-frame (UNet3D) highway needs num_frames, the number of frames to generate")
        return num_frames
