"""ImageBind-architecture encoders: image, video, audio (and text) into one shared, L2-normalised space.

Our own implementation of the design of facebookresearch/ImageBind. Module and parameter names mirror the published
checkpoint (``modality_preprocessors.vision.rgbt_stem.proj.1.weight``, ``modality_trunks.audio.blocks.0.attn.bias_k``,
...) so that ``imagebind_huge.pth`` loads with ``strict=True`` (see :func:`load_imagebind_state_dict`).

Per tower: preprocessor (patch stem + CLS token + learned positions) -> trunk (pre-norm transformer) -> head
(LayerNorm, CLS/EOS token, linear projection to E) -> L2 normalisation. Attention runs through
``F.scaled_dot_product_attention`` while keeping ``nn.MultiheadAttention``'s parameter names.

Shape legend (see :mod:`xvila.modalities`): B batch, T video frames, S audio samples, L text tokens, N patch tokens,
C trunk width, E shared embedding size, M mel bins, F log-mel frames.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from xvila.encoders.config import EncoderConfig, TextTowerConfig, TrunkConfig
from xvila.encoders.mel import LogMelFilterbank, pad_or_crop_frames

logger = logging.getLogger(__name__)

# The towers of the published checkpoint; keys of the ones an encoder does not build are dropped on load.
IMAGEBIND_TOWERS: tuple[str, ...] = ("vision", "text", "audio", "depth", "thermal", "imu")
_TOP_LEVEL = ("modality_preprocessors", "modality_trunks", "modality_heads", "modality_postprocessors")
# Our media modalities -> the tower that encodes them.
TOWER_OF: dict[str, str] = {"image": "vision", "video": "vision", "audio": "audio", "text": "text"}


@dataclass
class EncoderOutput:
    """What an encoder returns for one batch of one modality.

    patch_embeds: (B, N, C) the trunk's output tokens after the head's LayerNorm, CLS token removed (for video the
        clips' tokens concatenated clip-major; for text all L tokens).
    pooled_embeds: (B, E) the L2-normalised shared-space embedding (logit scale not applied).
    """

    patch_embeds: torch.Tensor
    pooled_embeds: torch.Tensor


def materialisable_device() -> torch.device:
    """The default device for new tensors, or CPU while a ``with torch.device("meta")`` block is active."""
    device = torch.empty(0).device
    return torch.device("cpu") if device.type == "meta" else device


# ----------------------------------------------------------------------------------------------------------- blocks


class SelfAttention(nn.Module):
    """Multi-head self-attention with ``nn.MultiheadAttention``'s parameters, computed with SDPA.

    ``add_bias_kv`` appends one learned key and value token (``bias_k``/``bias_v``, (1, 1, C)) after the input
    projection, exactly as ``nn.MultiheadAttention(add_bias_kv=True)`` does; every query may attend to it.
    """

    def __init__(self, width: int, heads: int, add_bias_kv: bool) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty(1, 1, width))
            self.bias_v = nn.Parameter(torch.empty(1, 1, width))
        else:
            self.bias_k = self.bias_v = None
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)
        if add_bias_kv:
            nn.init.xavier_normal_(self.bias_k)
            nn.init.xavier_normal_(self.bias_v)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)  # (B, N, C) each
        mask = None
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(B, 1, C)], dim=1)  # (B, N + 1, C)
            v = torch.cat([v, self.bias_v.expand(B, 1, C)], dim=1)
            if causal:  # the bias token is visible to every query
                mask = torch.ones(N, N + 1, dtype=torch.bool, device=x.device).tril()
                mask[:, -1] = True
                causal = False
        q, k, v = (t.unflatten(-1, (self.heads, C // self.heads)).transpose(1, 2) for t in (q, k, v))  # (B, h, *, d)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)  # (B, h, N, d)
        return self.out_proj(y.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch for whole samples, rescaling the kept ones."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)  # (B, 1, 1)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Block(nn.Module):
    """Pre-norm transformer block (LayerNorm eps 1e-6, GELU MLP)."""

    def __init__(self, width: int, heads: int, mlp_ratio: int, add_bias_kv: bool, drop_path: float) -> None:
        super().__init__()
        self.norm_1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = SelfAttention(width, heads, add_bias_kv)
        self.norm_2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = Mlp(width, mlp_ratio * width)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm_1(x), causal))
        return x + self.drop_path(self.mlp(self.norm_2(x)))


class Trunk(nn.Module):
    """A stack of blocks on (B, N, C) tokens, optionally after a LayerNorm (``pre_transformer_layer.0``)."""

    def __init__(self, config: TrunkConfig, gradient_checkpointing: bool = False) -> None:
        super().__init__()
        self.gradient_checkpointing = gradient_checkpointing
        norm = nn.LayerNorm(config.width, eps=1e-6) if config.pre_layernorm else nn.Identity()
        self.pre_transformer_layer = nn.Sequential(norm)
        rates = torch.linspace(0, config.drop_path, config.layers, device="cpu").tolist()  # progressive
        self.blocks = nn.ModuleList(
            Block(config.width, config.heads, config.mlp_ratio, config.add_bias_kv, rate) for rate in rates
        )
        for module in self.modules():  # ImageBind's "jax" init: xavier-uniform linears, zero biases
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor, causal: bool = False) -> torch.Tensor:
        x = self.pre_transformer_layer(tokens)  # (B, N, C)
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, causal, use_reentrant=False)
            else:
                x = block(x, causal)
        return x


# ----------------------------------------------------------------------------------------------- preprocessors


class RepeatFrames(nn.Module):
    """(B, 3, H, W) or (B, 3, 1, H, W) -> (B, 3, frames, H, W) by repetition; clips already ``frames`` long pass."""

    def __init__(self, frames: int) -> None:
        super().__init__()
        self.frames = frames

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4:
            x = x.unsqueeze(2)  # (B, 3, 1, H, W)
        if x.shape[2] == 1:
            x = x.expand(-1, -1, self.frames, -1, -1)
        return x


class PatchStem(nn.Module):
    """A convolutional patch embedding: ``proj`` then an optional LayerNorm over channels -> (B, N, C)."""

    def __init__(self, proj: nn.Module, norm_layer: nn.Module | None = None) -> None:
        super().__init__()
        self.proj = proj
        self.norm_layer = norm_layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x).flatten(2).transpose(1, 2)  # (B, C, *grid) -> (B, N, C)
        return x if self.norm_layer is None else self.norm_layer(x)


class PositionalEmbedding(nn.Module):
    """Learned positions for the CLS token and the patches (``pos_embedding_helper.pos_embed``)."""

    def __init__(self, num_tokens: int, width: int) -> None:
        super().__init__()
        self.pos_embed = nn.Parameter(torch.randn(1, num_tokens, width) * width**-0.5)


class PatchPreprocessor(nn.Module):
    """Patch stem + CLS token + learned positions -> (B, 1 + N, C). ImageBind names the stem ``rgbt_stem``."""

    def __init__(self, stem: PatchStem, num_patches: int, width: int) -> None:
        super().__init__()
        self.rgbt_stem = stem
        self.cls_token = nn.Parameter(torch.randn(1, 1, width) * width**-0.5)
        self.pos_embedding_helper = PositionalEmbedding(1 + num_patches, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = self.rgbt_stem(x)  # (B, N, C)
        cls = self.cls_token.expand(patches.shape[0], -1, -1)  # (B, 1, C)
        return torch.cat([cls, patches], dim=1) + self.pos_embedding_helper.pos_embed  # (B, 1 + N, C)


class TextPreprocessor(nn.Module):
    """Token ids (B, L) -> embeddings + learned positions (B, L, C). ``mask`` is the checkpoint's causal mask."""

    def __init__(self, config: TextTowerConfig) -> None:
        super().__init__()
        width = config.trunk.width
        self.token_embedding = nn.Embedding(config.vocab_size, width)
        self.pos_embed = nn.Parameter(torch.empty(1, config.context_length, width))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)
        # Stored in the checkpoint; attention uses SDPA's is_causal, which is the same mask.
        mask = torch.full((config.context_length, config.context_length), float("-inf")).triu(1)
        self.register_buffer("mask", mask)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(ids) + self.pos_embed[:, : ids.shape[1]]  # (B, L, C)


# ----------------------------------------------------------------------------------------------- heads / post


class TokenHead(nn.Sequential):
    """LayerNorm -> CLS token -> linear to E (``0``, ``1``, ``2`` as in the checkpoint)."""

    def __init__(self, width: int, embed_dim: int) -> None:
        super().__init__(nn.LayerNorm(width, eps=1e-6), nn.Identity(), nn.Linear(width, embed_dim, bias=False))

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (B, 1 + N, C) -> normalised patch tokens (B, N, C), projected CLS (B, E)."""
        normed = self[0](tokens)
        return normed[:, 1:], self[2](normed[:, 0])


class TextHead(nn.Module):
    """LayerNorm -> linear to E, pooled at the end-of-text token (``proj.0``, ``proj.1``)."""

    def __init__(self, width: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.LayerNorm(width, eps=1e-6), nn.Linear(width, embed_dim, bias=False))

    def forward(self, tokens: torch.Tensor, eos_positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (B, L, C), eos_positions (B,) -> normalised tokens (B, L, C), projected EOS token (B, E)."""
        normed = self.proj[0](tokens)
        eos = normed[torch.arange(tokens.shape[0], device=tokens.device), eos_positions]  # (B, C)
        return normed, self.proj[1](eos)


class Normalize(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1)


class LogitScale(nn.Module):
    """exp(log_logit_scale) clipped at ``max_scale``; a parameter when learnable, else a (saved) buffer."""

    def __init__(self, init: float, learnable: bool, max_scale: float) -> None:
        super().__init__()
        self.max_scale = max_scale
        value = torch.tensor(float(init)).log()
        if learnable:
            self.log_logit_scale = nn.Parameter(value)
        else:
            self.register_buffer("log_logit_scale", value)

    def scale(self) -> torch.Tensor:
        return self.log_logit_scale.exp().clamp(max=self.max_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale() * x


# ----------------------------------------------------------------------------------------------------- encoder


class ImageBindEncoder(nn.Module):
    """Image, video, audio (and text) -> patch tokens and L2-normalised shared-space embeddings.

    Inputs follow the repository conventions and are normalised here:
    ``"image"`` (B, 3, H, W) in [0, 1]; ``"video"`` (B, T, 3, H, W) in [0, 1] with T a multiple of
    ``config.vision.clip_frames`` (cut into clips, encoded independently, pooled by the normalised mean of the clip
    embeddings); ``"audio"`` (B, S) waveform at ``config.audio.sample_rate`` in [-1, 1] (log-mel computed here,
    padded/cropped to ``target_frames``); ``"text"`` (B, L) token ids, L <= ``context_length``, each row holding
    ``eos_token_id``.
    """

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        vision, audio, text = config.vision, config.audio, config.text
        ckpt = config.gradient_checkpointing
        E = config.embed_dim

        vision_stem = PatchStem(
            nn.Sequential(
                RepeatFrames(vision.clip_frames),
                nn.Conv3d(
                    3,
                    vision.trunk.width,
                    kernel_size=(vision.clip_frames, vision.patch_size, vision.patch_size),
                    stride=(vision.clip_frames, vision.patch_size, vision.patch_size),
                    bias=False,
                ),
            )
        )
        rows, cols = audio.grid
        audio_stem = PatchStem(
            nn.Conv2d(1, audio.trunk.width, kernel_size=audio.patch_size, stride=audio.patch_stride, bias=False),
            nn.LayerNorm(audio.trunk.width),
        )
        preprocessors = {
            "vision": PatchPreprocessor(vision_stem, vision.grid_size**2, vision.trunk.width),
            "audio": PatchPreprocessor(audio_stem, rows * cols, audio.trunk.width),
        }
        trunks = {"vision": Trunk(vision.trunk, ckpt), "audio": Trunk(audio.trunk, ckpt)}
        heads = {"vision": TokenHead(vision.trunk.width, E), "audio": TokenHead(audio.trunk.width, E)}
        post = {
            "vision": Normalize(),
            "audio": nn.Sequential(
                Normalize(), LogitScale(audio.logit_scale_init, audio.logit_scale_learnable, config.max_logit_scale)
            ),
        }
        if text is not None:
            preprocessors["text"] = TextPreprocessor(text)
            trunks["text"] = Trunk(text.trunk, ckpt)
            heads["text"] = TextHead(text.trunk.width, E)
            post["text"] = nn.Sequential(
                Normalize(), LogitScale(text.logit_scale_init, text.logit_scale_learnable, config.max_logit_scale)
            )
        self.modality_preprocessors = nn.ModuleDict(preprocessors)
        self.modality_trunks = nn.ModuleDict(trunks)
        self.modality_heads = nn.ModuleDict(heads)
        self.modality_postprocessors = nn.ModuleDict(post)
        self.log_mel = LogMelFilterbank(audio.sample_rate, audio.num_mel_bins, audio.frame_length, audio.frame_shift)
        self.reset_nonpersistent_buffers()

    def reset_nonpersistent_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)create the constants that are not in the checkpoint (pixel statistics, Hann window, mel filters).

        They are real tensors even when the model is built on the meta device (for loading with ``assign=True``).
        """
        device = materialisable_device() if device is None else device
        vision = self.config.vision
        shape = (1, 3, 1, 1, 1)  # broadcasts over (B, 3, t, H, W)
        self.register_buffer("pixel_mean", torch.tensor(vision.mean, device=device).view(shape), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(vision.std, device=device).view(shape), persistent=False)
        self.log_mel.reset_buffers(device)

    # ------------------------------------------------------------------------------------------------ helpers

    @property
    def towers(self) -> tuple[str, ...]:
        """The ImageBind towers this encoder builds ("vision", "audio"[, "text"])."""
        return tuple(self.modality_trunks.keys())

    @property
    def modalities(self) -> tuple[str, ...]:
        return ("image", "video", "audio") + (("text",) if self.config.text is not None else ())

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    def _check_modality(self, modality: str) -> str:
        if modality not in self.modalities:
            raise ValueError(f"unknown modality {modality!r} for this encoder; known modalities: {self.modalities}")
        return TOWER_OF[modality]

    def patch_dim(self, modality: str) -> int:
        """C of ``patch_embeds`` (the tower's trunk width)."""
        return self.modality_trunks[self._check_modality(modality)].blocks[0].norm_1.normalized_shape[0]

    def patch_grid(self, modality: str, num_frames: int | None = None) -> tuple[int, int, int]:
        """(t, h, w) layout of ``patch_embeds``: clips x rows x cols (t = 1 but for video; text: (1, 1, L_max)).

        For video, ``num_frames`` defaults to ``config.vision.video_frames``. Audio rows are mel bands (low to
        high), columns time.
        """
        self._check_modality(modality)
        vision = self.config.vision
        if modality == "image":
            return (1, vision.grid_size, vision.grid_size)
        if modality == "video":
            frames = vision.video_frames if num_frames is None else num_frames
            if frames <= 0 or frames % vision.clip_frames:
                raise ValueError(f"num_frames must be a positive multiple of {vision.clip_frames}, got {frames}")
            return (frames // vision.clip_frames, vision.grid_size, vision.grid_size)
        if modality == "audio":
            return (1, *self.config.audio.grid)
        return (1, 1, self.config.text.context_length)

    def num_patches(self, modality: str, num_frames: int | None = None) -> int:
        """N of ``patch_embeds`` (for text, the maximum L)."""
        t, h, w = self.patch_grid(modality, num_frames)
        return t * h * w

    def logit_scale(self, modality: str) -> torch.Tensor:
        """The modality's contrastive temperature (a scalar; 1 for image/video, which ImageBind leaves unscaled).

        ImageBind multiplies the normalised embedding of the non-vision side by it (text 1/0.07 learnable, audio 20
        fixed, both clipped at ``max_logit_scale``): ``logits = scale * pooled_a @ pooled_b.T``.
        """
        post = self.modality_postprocessors[self._check_modality(modality)]
        if isinstance(post, nn.Sequential):
            return post[1].scale()
        return torch.ones((), device=self.pixel_mean.device)

    # --------------------------------------------------------------------------------------------- forward

    def forward(self, modality: str, media: torch.Tensor) -> EncoderOutput:
        """Encode one batch of one modality (see the class docstring for the input conventions)."""
        self._check_modality(modality)
        if modality == "image":
            return self._encode_image(media)
        if modality == "video":
            return self._encode_video(media)
        if modality == "audio":
            return self._encode_audio(media)
        return self._encode_text(media)

    def _tower(self, tower: str, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens (B, 1 + N, C) through the trunk and head -> patch tokens (B, N, C), unit embeddings (B, E)."""
        hidden = self.modality_trunks[tower](tokens)  # (B, 1 + N, C)
        patches, pooled = self.modality_heads[tower](hidden)
        return patches, F.normalize(pooled, dim=-1)

    def _encode_clips(self, clips: torch.Tensor) -> EncoderOutput:
        """clips (B, 3, t, H, W) in [0, 1], t = 1 (an image, repeated by the stem) or clip_frames."""
        dtype = self.modality_preprocessors["vision"].cls_token.dtype
        pixels = ((clips - self.pixel_mean) / self.pixel_std).to(dtype)  # CLIP normalisation
        tokens = self.modality_preprocessors["vision"](pixels)  # (B, 1 + N, C)
        patches, pooled = self._tower("vision", tokens)
        return EncoderOutput(patch_embeds=patches, pooled_embeds=pooled)

    def _encode_image(self, image: torch.Tensor) -> EncoderOutput:
        size = self.config.vision.image_size
        if image.ndim != 4 or tuple(image.shape[1:]) != (3, size, size) or not image.is_floating_point():
            raise ValueError(
                f"image: expected float pixels in [0, 1] of shape (B, 3, {size}, {size}), "
                f"got {tuple(image.shape)} {image.dtype}"
            )
        return self._encode_clips(image.unsqueeze(2))  # (B, 3, 1, H, W), repeated to a clip by the stem

    def _encode_video(self, video: torch.Tensor) -> EncoderOutput:
        vision = self.config.vision
        size, k = vision.image_size, vision.clip_frames
        if (
            video.ndim != 5
            or tuple(video.shape[2:]) != (3, size, size)
            or video.shape[1] % k
            or video.shape[1] == 0
            or not video.is_floating_point()
        ):
            raise ValueError(
                f"video: expected float pixels in [0, 1] of shape (B, T, 3, {size}, {size}) with T a positive "
                f"multiple of {k}, got {tuple(video.shape)} {video.dtype}"
            )
        B, T = video.shape[:2]
        clips = video.reshape(B * T // k, k, 3, size, size).transpose(1, 2)  # (B * T/k, 3, k, H, W)
        out = self._encode_clips(clips)
        patches = out.patch_embeds.reshape(B, -1, out.patch_embeds.shape[-1])  # (B, T/k * N, C), clip-major
        pooled = out.pooled_embeds.reshape(B, T // k, -1).mean(dim=1)  # (B, E) mean of unit clip embeddings
        return EncoderOutput(patch_embeds=patches, pooled_embeds=F.normalize(pooled, dim=-1))

    def audio_features(self, waveform: torch.Tensor) -> torch.Tensor:
        """waveform (B, S) -> normalised log-mel image (B, 1, M, target_frames), as ImageBind feeds its stem."""
        audio = self.config.audio
        if waveform.ndim != 2 or waveform.shape[1] < audio.frame_length:
            raise ValueError(
                f"audio: expected a waveform of shape (B, S) at {audio.sample_rate} Hz with S >= {audio.frame_length} "
                f"(ideally S = {audio.clip_samples}), got {tuple(waveform.shape)}"
            )
        waveform = waveform.float()
        waveform = waveform - waveform.mean(dim=1, keepdim=True)  # ImageBind centres each clip
        log_mel = pad_or_crop_frames(self.log_mel(waveform), audio.target_frames)  # (B, M, F)
        return ((log_mel - audio.mel_mean) / audio.mel_std).unsqueeze(1)  # (B, 1, M, F)

    def _encode_audio(self, waveform: torch.Tensor) -> EncoderOutput:
        features = self.audio_features(waveform)
        dtype = self.modality_preprocessors["audio"].cls_token.dtype
        tokens = self.modality_preprocessors["audio"](features.to(dtype))  # (B, 1 + N, C)
        patches, pooled = self._tower("audio", tokens)
        return EncoderOutput(patch_embeds=patches, pooled_embeds=pooled)

    def _encode_text(self, ids: torch.Tensor) -> EncoderOutput:
        text = self.config.text
        if ids.ndim != 2 or not 0 < ids.shape[1] <= text.context_length or ids.is_floating_point():
            raise ValueError(
                f"text: expected integer token ids of shape (B, L) with 0 < L <= {text.context_length}, "
                f"got {tuple(ids.shape)} {ids.dtype}"
            )
        is_eos = ids == text.eos_token_id  # (B, L)
        if not bool(is_eos.any(dim=1).all()):
            raise ValueError(f"text: every row must contain the end-of-text token id {text.eos_token_id}")
        eos_positions = is_eos.int().argmax(dim=1)  # (B,) first occurrence
        tokens = self.modality_preprocessors["text"](ids)  # (B, L, C)
        hidden = self.modality_trunks["text"](tokens, causal=text.causal)
        patches, pooled = self.modality_heads["text"](hidden, eos_positions)
        return EncoderOutput(patch_embeds=patches, pooled_embeds=F.normalize(pooled, dim=-1))


# ------------------------------------------------------------------------------------------------ checkpoints


@dataclass
class LoadReport:
    """What :func:`load_imagebind_state_dict` did."""

    loaded_keys: int
    dropped_towers: tuple[str, ...]  # towers of the checkpoint this encoder does not build
    dropped_keys: list[str]


def tower_of_key(key: str) -> str | None:
    """``modality_trunks.audio.blocks.0...`` -> ``"audio"``; None for keys outside the four module dicts."""
    parts = key.split(".")
    return parts[1] if len(parts) > 2 and parts[0] in _TOP_LEVEL else None


def load_imagebind_state_dict(
    encoder: ImageBindEncoder, state_dict: dict[str, torch.Tensor], assign: bool = False
) -> LoadReport:
    """Load an ImageBind checkpoint (e.g. ``imagebind_huge.pth``) with ``strict=True``.

    Keys of the published towers this encoder does not build (depth, thermal, imu, and text when
    ``config.text is None``) are dropped and reported; any other mismatch in names or shapes raises.
    """
    keep = set(encoder.towers)
    dropped = [k for k in state_dict if tower_of_key(k) in IMAGEBIND_TOWERS and tower_of_key(k) not in keep]
    dropped_set = set(dropped)
    kept = {k: v for k, v in state_dict.items() if k not in dropped_set}
    towers = tuple(sorted({tower_of_key(k) for k in dropped}))
    encoder.load_state_dict(kept, strict=True, assign=assign)
    if dropped:
        logger.info("ImageBind checkpoint: dropped %d keys of towers %s not built here", len(dropped), list(towers))
    return LoadReport(loaded_keys=len(kept), dropped_towers=towers, dropped_keys=dropped)


def build_encoder(config: EncoderConfig) -> ImageBindEncoder:
    """Build the encoder; with ``config.weights_path`` load that local ImageBind checkpoint (never downloads).

    Weights are loaded into a meta-device model (``assign=True``), so a 1.2B-parameter checkpoint costs its own
    memory once, memory-mapped from disk.
    """
    if config.weights_path is None:
        return ImageBindEncoder(config)
    path = Path(config.weights_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"ImageBind weights not found at {str(path)!r}: download imagebind_huge.pth yourself and set "
            "EncoderConfig.weights_path to its local path"
        )
    with torch.device("meta"):
        encoder = ImageBindEncoder(config)
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # files in torch's legacy (pre-zip) format cannot be memory-mapped
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    report = load_imagebind_state_dict(encoder, state_dict, assign=True)
    on_meta = [name for name, t in [*encoder.named_parameters(), *encoder.named_buffers()] if t.is_meta]
    if on_meta:
        raise RuntimeError(f"{path}: these tensors were not loaded: {on_meta[:5]} ({len(on_meta)} in all)")
    logger.info("loaded %s: %d tensors, dropped towers %s", path, report.loaded_keys, list(report.dropped_towers))
    return encoder
