"""Audio decoder in the AudioLDM layout: a UNet2DConditionModel over (time x mel) latents, conditioned through
``class_labels`` on one 512-d CLAP text vector (``class_embed_type="simple_projection"``, no cross-attention:
``encoder_hidden_states=None``), a 1-channel mel VAE and a SpeechT5HifiGan vocoder.

Facts taken from diffusers' AudioLDMPipeline and its conversion script: CLAP ``text_embeds`` are L2-normalised and
fed as ``class_labels`` (B, 512); the mel is HiFi-GAN's log-mel (magnitude STFT, n_fft 1024, hop 160, 64 slaney mel
bins over 0-8 kHz, natural log of max(x, 1e-5)), laid out (B, 1, frames, mels); VAE latents are scaled by the VAE's
learnt ``scaling_factor`` (0.9228); the vocoder takes (B, frames, mels) and gives (B, frames * 160) at 16 kHz.

The tiny variant diffuses the normalised log-mel itself (no VAE) and turns mels into waveforms with Griffin-Lim:
a random HiFi-GAN outputs noise until it is GAN-trained on real audio, while Griffin-Lim needs no training and
keeps pitch, timbre, loudness and envelopes, which is what the toy world's sounds carry. Both paths share the same
interface (``vocoder=None`` selects Griffin-Lim).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import ClapTextConfig, ClapTextModelWithProjection, SpeechT5HifiGan, SpeechT5HifiGanConfig
from transformers.audio_utils import mel_filter_bank

from xvila.configuration import Config
from xvila.decoders.base import (
    BUILT_SPECIAL_IDS,
    Decoder,
    SchedulerConfig,
    TokenizerConfig,
    check_arch,
    check_scheduler_folder,
    check_text_source,
    diffusers_part,
    downscale_of,
    freeze,
    scale_factor_of,
    transformers_part,
    vae_decode,
)
from xvila.decoders.image import VAE_KEYS, tiny_vae
from xvila.highway import HighwayResiduals, ResidualLayout

SAMPLE_RATE = 16_000
UNET_KEYS = (
    "in_channels",
    "out_channels",
    "block_out_channels",
    "down_block_types",
    "up_block_types",
    "layers_per_block",
    "class_embed_type",
    "projection_class_embeddings_input_dim",
)
GRIFFIN_LIM_MOMENTUM = 0.99  # "fast Griffin-Lim" (Perraudin et al. 2013), as torchaudio's default
MEL_INVERSION_ITERS = 200  # multiplicative NNLS updates
LOBE_OVERSAMPLE = 2  # sinusoid frequencies per STFT bin in the mel inversion's dictionary


@dataclass
class MelConfig(Config):
    """HiFi-GAN-style log-mel at 16 kHz. The latent map sees ``(log_mel - offset) / scale`` (identity for AudioLDM,
    whose VAE takes the raw log-mel; roughly [-1, 1] for the tiny mel-space model)."""

    n_fft: int = 1024
    hop_length: int = 160
    win_length: int = 1024
    n_mels: int = 64
    fmin: float = 0.0
    fmax: float = 8000.0
    offset: float = 0.0
    scale: float = 1.0
    # "mel": librosa's slaney mel bands (HiFi-GAN, AudioLDM); "log": bands evenly spaced in log frequency
    # (log_filter_bank), where a pitch change moves a harmonic pattern along the axis without stretching it
    frequency_scale: str = "mel"

    def __post_init__(self) -> None:
        if self.frequency_scale not in ("mel", "log"):
            raise ValueError(f"mel.frequency_scale must be 'mel' or 'log', got {self.frequency_scale!r}")
        if self.frequency_scale == "log" and self.fmin <= 0:
            raise ValueError(f"mel: a log frequency scale needs fmin > 0, got {self.fmin}")
        if self.win_length > self.n_fft:
            raise ValueError(f"mel.win_length ({self.win_length}) must be <= n_fft ({self.n_fft})")
        if (self.n_fft - self.hop_length) % 2:
            raise ValueError("mel: n_fft - hop_length must be even (the signal is padded by half of it on each side)")
        if not 0 <= self.fmin < self.fmax <= SAMPLE_RATE / 2:
            raise ValueError(f"mel: need 0 <= fmin < fmax <= {SAMPLE_RATE // 2}, got {self.fmin}, {self.fmax}")
        if self.scale <= 0:
            raise ValueError(f"mel.scale must be positive, got {self.scale}")


@dataclass
class AudioDecoderConfig(Config):
    """unet: UNet2DConditionModel kwargs (class-label conditioned); text_encoder: ClapTextConfig kwargs;
    vae: 1-channel AutoencoderKL kwargs or None (the normalised mel is the latent); vocoder: SpeechT5HifiGanConfig
    kwargs or None (Griffin-Lim); num_samples: the sampled length at 16 kHz; weights_path: a local folder."""

    unet: dict[str, Any]
    text_encoder: dict[str, Any]
    tokenizer: TokenizerConfig
    mel: MelConfig = field(default_factory=MelConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    vae: dict[str, Any] | None = None
    vocoder: dict[str, Any] | None = None
    griffin_lim_iters: int = 32
    num_samples: int = 163_840
    weights_path: str | None = None
    text_encoder_source: str = "own"  # "own": the CLAP tower above; "minilm": see xvila.decoders.sentence

    @property
    def cond_shape(self) -> tuple[int, int]:
        """(Q, D_cond): the conditioning the decoder's UNet reads (and its text encoder produces)."""
        if self.text_encoder_source == "minilm":
            return (1, self.text_encoder["hidden_size"])
        return (1, self.text_encoder["projection_dim"])

    @property
    def media_shape(self) -> tuple[int, ...]:
        """One generated item, in the repo's media conventions."""
        return (self.num_samples,)

    def __post_init__(self) -> None:
        check_arch("unet", self.unet, UNET_KEYS)
        if self.text_encoder_source == "own":
            check_arch("text_encoder", self.text_encoder, ("projection_dim", "pad_token_id"))
            # RoBERTa-style positions start after the pad id
            check_text_source(self, self.tokenizer.max_length + self.text_encoder["pad_token_id"] + 1)
        else:
            check_text_source(self, self.tokenizer.max_length)
        if self.unet["class_embed_type"] != "simple_projection":
            raise ValueError("the audio UNet is conditioned through class_labels: class_embed_type='simple_projection'")
        if self.unet["projection_class_embeddings_input_dim"] != self.cond_shape[1]:
            raise ValueError("unet.projection_class_embeddings_input_dim must equal the conditioning width "
                             f"({self.cond_shape[1]})")
        if self.vae is not None:
            check_arch("vae", self.vae, VAE_KEYS)
            if self.vae["in_channels"] != 1 or self.vae["out_channels"] != 1:
                raise ValueError("the mel VAE takes and gives 1 channel")
        latent_channels = 1 if self.vae is None else self.vae["latent_channels"]
        if self.unet["in_channels"] != latent_channels or self.unet["out_channels"] != latent_channels:
            raise ValueError(f"unet in/out_channels must equal the latent channels ({latent_channels})")
        if self.vocoder is not None:
            check_arch("vocoder", self.vocoder, ("model_in_dim", "upsample_rates", "sampling_rate"))
            if self.vocoder["model_in_dim"] != self.mel.n_mels:
                raise ValueError("vocoder.model_in_dim must equal mel.n_mels")
            if math.prod(self.vocoder["upsample_rates"]) != self.mel.hop_length:
                raise ValueError("the product of vocoder.upsample_rates must equal mel.hop_length")
            if self.vocoder["sampling_rate"] != SAMPLE_RATE:
                raise ValueError(f"vocoder.sampling_rate must be {SAMPLE_RATE}")
        if self.griffin_lim_iters < 1:
            raise ValueError("griffin_lim_iters must be >= 1")
        factor = scale_factor_of(self.vae) * downscale_of(self.unet)
        frames, rest = divmod(self.num_samples, self.mel.hop_length)
        if rest or frames % factor or self.mel.n_mels % factor:
            raise ValueError(
                f"num_samples must be a multiple of hop_length * {factor} = {self.mel.hop_length * factor} and "
                f"mel.n_mels a multiple of {factor} (VAE x UNet downsampling)"
            )

    @classmethod
    def tiny(cls, *, with_vae: bool = False, with_vocoder: bool = False) -> AudioDecoderConfig:
        """1 s at 16 kHz as a 64-frame x 64-mel log-mel (hop 250); mel space and Griffin-Lim by default,
        a 2x tiny VAE and a tiny random HiFi-GAN with the flags (for tests of the AudioLDM path)."""
        latent = 4 if with_vae else 1
        unet = {
            "sample_size": 32 if with_vae else 64,
            "in_channels": latent,
            "out_channels": latent,
            "block_out_channels": [32, 64, 64],
            # attention only at the coarsest level: self-attention over the 32x32 level's 1024 cells made a
            # training step 4x costlier than the image decoder's
            "down_block_types": ["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
            "layers_per_block": 1,
            "norm_num_groups": 8,
            "attention_head_dim": 4,
            "cross_attention_dim": [32, 64, 64],  # attn2 runs as self-attention (no encoder_hidden_states)
            "class_embed_type": "simple_projection",
            "projection_class_embeddings_input_dim": 64,
            "class_embeddings_concat": True,
        }
        text_encoder = {
            "vocab_size": 512,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 32,
            "type_vocab_size": 1,
            "projection_dim": 64,
            "projection_hidden_act": "relu",
            **BUILT_SPECIAL_IDS,
        }
        vocoder = {
            "model_in_dim": 64,
            "sampling_rate": SAMPLE_RATE,
            "upsample_initial_channel": 32,
            "upsample_rates": [5, 5, 5, 2],
            "upsample_kernel_sizes": [11, 11, 11, 4],
            "resblock_kernel_sizes": [3],
            "resblock_dilation_sizes": [[1, 3]],
            "normalize_before": False,
        }
        # log-mels span ln(1e-5) = -11.5 (silence) to about +2.5 (a full-scale tone): mapped to about [-1, 1]
        mel = MelConfig(n_fft=1024, hop_length=250, win_length=1000, n_mels=64, offset=-4.5, scale=7.0)
        return cls(
            unet=unet,
            text_encoder=text_encoder,
            tokenizer=TokenizerConfig(max_length=16, vocab_size=512),
            mel=mel,
            scheduler=SchedulerConfig(
                beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", timestep_spacing="trailing",
                steps_offset=0, num_inference_steps=25, guidance_scale=3.0,
            ),  # fmt: skip
            vae=tiny_vae(in_channels=1) if with_vae else None,
            vocoder=vocoder if with_vocoder else None,
            num_samples=SAMPLE_RATE,
        )

    @classmethod
    def tiny_latent(cls) -> AudioDecoderConfig:
        """The tiny log-mel through a 4x tiny VAE (16 x 16 x 4 latents; trained on the toy world, then frozen)
        and a (48, 96) UNet, attention at the 8 x 8 level; Griffin-Lim."""
        config = cls.tiny()
        unet = dict(config.unet, sample_size=16, in_channels=4, out_channels=4, block_out_channels=[48, 96],
                    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                    up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], cross_attention_dim=[48, 96])
        return config.replace(unet=unet, vae=tiny_vae(in_channels=1, block_out_channels=(32, 64, 64)))

    @classmethod
    def audioldm(cls, weights_path: str | None = None) -> AudioDecoderConfig:
        """AudioLDM-S full v2 (cvssp/audioldm-s-full-v2): 10.24 s as 1024 x 64 log-mels, 8 x 256 x 16 latents."""
        channels = [128, 256, 384, 640]
        unet = {
            "sample_size": 128,
            "in_channels": 8,
            "out_channels": 8,
            "block_out_channels": channels,
            "down_block_types": ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 3,
            "up_block_types": ["CrossAttnUpBlock2D"] * 3 + ["UpBlock2D"],
            "layers_per_block": 2,
            "cross_attention_dim": channels,
            "class_embed_type": "simple_projection",
            "projection_class_embeddings_input_dim": 512,
            "class_embeddings_concat": True,
        }
        vae = {
            "in_channels": 1,
            "out_channels": 1,
            "down_block_types": ["DownEncoderBlock2D"] * 3,
            "up_block_types": ["UpDecoderBlock2D"] * 3,
            "block_out_channels": [128, 256, 512],
            "latent_channels": 8,
            "layers_per_block": 2,
            "sample_size": 512,
            "scaling_factor": 0.9227914214134216,
        }
        text_encoder = {  # laion/clap-htsat-unfused text branch (RoBERTa-base + projection)
            "vocab_size": 50265,
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "max_position_embeddings": 514,
            "type_vocab_size": 1,
            "projection_dim": 512,
            "projection_hidden_act": "relu",
            "pad_token_id": 1,
        }
        vocoder = {
            "model_in_dim": 64,
            "sampling_rate": SAMPLE_RATE,
            "upsample_initial_channel": 1024,
            "upsample_rates": [5, 4, 2, 2, 2],
            "upsample_kernel_sizes": [16, 16, 8, 4, 4],
            "resblock_kernel_sizes": [3, 7, 11],
            "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]],
            "normalize_before": False,
        }
        return cls(
            unet=unet,
            text_encoder=text_encoder,
            # CLAP pools the first token and masks padding, so 77 instead of the tokenizer's 512 changes nothing
            # for captions up to 77 tokens and keeps the text encoder cheap.
            tokenizer=TokenizerConfig(max_length=77),
            mel=MelConfig(),
            scheduler=SchedulerConfig(
                beta_schedule="scaled_linear", beta_start=0.0015, beta_end=0.0195, prediction_type="epsilon",
                timestep_spacing="leading", steps_offset=1, num_inference_steps=10, guidance_scale=2.5,
            ),  # fmt: skip
            vae=vae,
            vocoder=vocoder,
            num_samples=163_840,
            weights_path=weights_path,
        )


def log_filter_bank(mel: MelConfig) -> torch.Tensor:
    """(n_mels, n_fft // 2 + 1) triangular bands whose centres are evenly spaced in log frequency from ``fmin`` to
    ``fmax``, each reaching its neighbours' centres (and at least one STFT bin each side, so that the narrow bands
    at low frequencies still see a bin), area-normalised like slaney mel bands."""
    bin_hz = SAMPLE_RATE / mel.n_fft
    freqs = torch.arange(mel.n_fft // 2 + 1, dtype=torch.float64) * bin_hz  # (n_freq,)
    centres = torch.logspace(math.log10(mel.fmin), math.log10(mel.fmax), mel.n_mels, dtype=torch.float64)
    ratio = (mel.fmax / mel.fmin) ** (1 / max(mel.n_mels - 1, 1))
    lower = torch.minimum(centres / ratio, centres - bin_hz)[:, None]
    upper = torch.maximum(centres * ratio, centres + bin_hz)[:, None]
    c = centres[:, None]
    rise, fall = (freqs - lower) / (c - lower), (upper - freqs) / (upper - c)
    bands = torch.minimum(rise, fall).clamp(min=0)  # (n_mels, n_freq)
    return (bands * (2 / (upper - lower))).float()


def log_mel(wave: torch.Tensor, window: torch.Tensor, mel_basis: torch.Tensor, mel: MelConfig) -> torch.Tensor:
    """(B, S) waveform -> (B, S // hop, n_mels) natural log of the magnitude STFT through ``mel_basis`` (slaney mel
    bands as HiFi-GAN / AudioLDM, or log-spaced bands: ``MelConfig.frequency_scale``)."""
    pad = (mel.n_fft - mel.hop_length) // 2
    x = F.pad(wave[:, None], (pad, pad), mode="reflect")[:, 0]  # (B, S + n_fft - hop)
    spec = torch.stft(
        x, mel.n_fft, mel.hop_length, mel.win_length, window=window, center=False, return_complex=True
    ).abs()  # (B, n_fft // 2 + 1, frames)
    return torch.log((mel_basis @ spec).clamp(min=1e-5)).transpose(1, 2)  # (B, frames, n_mels)


def window_lobes(win_length: int, n_fft: int, oversample: int = LOBE_OVERSAMPLE) -> torch.Tensor:
    """(n_freq, n_freq * oversample), on the CPU: column u is the STFT magnitude of a unit sinusoid at bin
    u / oversample, analysed by a Hann window of ``win_length`` zero-padded to ``n_fft``, kept within its main lobe
    (+-2 bins of the window's own length) and scaled to 1 at its peak."""
    n_freq, cpu = n_fft // 2 + 1, torch.device("cpu")
    reach = round(2 * n_fft / win_length * oversample)  # the main lobe's half-width, in 1 / oversample bins
    offsets = torch.arange(-reach, reach + 1, dtype=torch.float64, device=cpu) / oversample  # (K,) bins
    n = torch.arange(win_length, dtype=torch.float64, device=cpu)
    window = torch.hann_window(win_length, dtype=torch.float64, device=cpu)
    table = (window * torch.exp(-2j * math.pi * offsets[:, None] * n / n_fft)).sum(-1).abs()
    table = table / table.max()  # (K,)
    k = torch.arange(n_freq, device=cpu)[:, None] * oversample - torch.arange(n_freq * oversample, device=cpu)
    lobes = torch.where(k.abs() <= reach, table[(k + reach).clamp(0, 2 * reach)], 0.0)  # (n_freq, U)
    return lobes.float()


def mel_to_magnitude(mel_magnitude: torch.Tensor, mel_lobes: torch.Tensor, lobes: torch.Tensor) -> torch.Tensor:
    """(B, n_mels, frames) mel magnitudes -> (B, n_freq, frames) linear magnitudes S = lobes @ A whose mel
    ``mel_basis @ S`` fits the given one, ``mel_lobes = mel_basis @ lobes`` (``window_lobes``).

    A is non-negative: the amplitudes of sinusoids at every half STFT bin, fitted by multiplicative least-squares
    updates (Lee & Seung). Fitting the STFT bins themselves instead is ambiguous: a tone between two mel bands'
    centres has nearly the mel of two tones near the centres, and the fit often chose those (up to 1.3 bins off),
    so a glide came back as steps of about 1.5 semitones. On the true log-mels of 64 test scenes the toy-world probes read the sounds
    rebuilt that way at 0.95 (size 0.89; two glides rejected as not world sounds), rebuilt this way at 1.00; the
    tiny decoder sampled from the true captions, 0.91 -> 1.00 (``benchmarks/decoder_ceiling.py``).
    """
    target = mel_lobes.T @ mel_magnitude  # (B, U, frames)
    amplitude = target.clamp(min=1e-10)
    for _ in range(MEL_INVERSION_ITERS):
        amplitude = amplitude * target / (mel_lobes.T @ (mel_lobes @ amplitude) + 1e-10)
    return lobes @ amplitude


def griffin_lim(
    magnitude: torch.Tensor,
    window: torch.Tensor,
    mel: MelConfig,
    n_iter: int,
    length: int,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """(B, n_fft // 2 + 1, frames) linear magnitude -> (B, length) waveform, by fast Griffin-Lim.

    Our analysis frames sit half a hop after torch's centred frames; we reconstruct on centred frames (one more
    frame, the last repeated), which shifts the audio by half a hop (8 ms at hop 250): inaudible, and it lets
    ``torch.istft`` satisfy its overlap-add condition at the edges.
    """
    mag = torch.cat([magnitude, magnitude[..., -1:]], dim=-1)  # (B, F, frames + 1)
    stft_args = dict(n_fft=mel.n_fft, hop_length=mel.hop_length, win_length=mel.win_length, window=window)
    rand_device = generator.device if generator is not None else mag.device
    phase = torch.rand(mag.shape, generator=generator, device=rand_device).to(mag.device)
    angles = torch.polar(torch.ones_like(mag), 2 * math.pi * phase)
    previous = torch.zeros_like(angles)
    for _ in range(n_iter):
        wave = torch.istft(mag * angles, length=length, **stft_args)
        rebuilt = torch.stft(wave, return_complex=True, **stft_args)
        angles = rebuilt - previous * (GRIFFIN_LIM_MOMENTUM / (1 + GRIFFIN_LIM_MOMENTUM))
        angles = angles / angles.abs().clamp(min=1e-16)
        previous = rebuilt
    return torch.istft(mag * angles, length=length, **stft_args)


class AudioDecoder(Decoder):
    """audio (B, S) at 16 kHz <-> latents (B, c, frames/f, n_mels/f); CLAP conditioning (B, 1, D_cond)."""

    modality = "audio"

    def __init__(self, config: AudioDecoderConfig) -> None:
        super().__init__(config)
        wp = config.weights_path
        check_scheduler_folder(config.scheduler, wp)
        self.unet = diffusers_part(UNet2DConditionModel, config.unet, wp, "unet")
        self.vae = None if config.vae is None else freeze(diffusers_part(AutoencoderKL, config.vae, wp, "vae"))
        self._build_text_encoder(
            lambda: transformers_part(ClapTextModelWithProjection, ClapTextConfig, config.text_encoder, wp, "text_encoder")
        )
        self.vocoder = None
        if config.vocoder is not None:
            vocoder = transformers_part(SpeechT5HifiGan, SpeechT5HifiGanConfig, config.vocoder, wp, "vocoder")
            self.vocoder = freeze(vocoder)
        m = config.mel
        if m.frequency_scale == "log":
            basis = log_filter_bank(m).numpy()  # (n_mels, n_freq)
        else:
            basis = mel_filter_bank(
                num_frequency_bins=m.n_fft // 2 + 1, num_mel_filters=m.n_mels, min_frequency=m.fmin,
                max_frequency=m.fmax, sampling_rate=SAMPLE_RATE, norm="slaney", mel_scale="slaney",
            ).T  # fmt: skip  # (n_mels, n_freq), librosa's default filters as HiFi-GAN uses
        # Derived from the config, so not saved (non-persistent): state_dict holds weights only.
        self.register_buffer("mel_basis", torch.tensor(basis, dtype=torch.float32), persistent=False)
        self.register_buffer("window", torch.hann_window(m.win_length), persistent=False)
        lobes = window_lobes(m.win_length, m.n_fft)  # for the Griffin-Lim path's mel inversion (mel_to_magnitude)
        mel_lobes = torch.tensor(basis, dtype=torch.float32, device="cpu") @ lobes
        self.register_buffer("lobes", lobes.to(self.mel_basis.device), persistent=False)
        self.register_buffer("mel_lobes", mel_lobes.to(self.mel_basis.device), persistent=False)
        self.scale_factor = scale_factor_of(config.vae)
        self.downscale = downscale_of(config.unet)


    def _encode_own_text(self, texts: list[str]) -> torch.Tensor:
        """AudioLDM prompt encoding: L2-normalised CLAP text_embeds, as (B, 1, D_cond)."""
        with torch.no_grad():
            batch = self.tokenize(texts, self.text_encoder.device)
            embeds = self.text_encoder(**batch).text_embeds  # (B, D_cond)
            return F.normalize(embeds, dim=-1)[:, None]

    def residual_shapes(self, height: int, width: int) -> ResidualLayout:
        raise ValueError("the Visual Embedding Highway guides image and video decoders only, not audio")

    def wave_to_mel(self, wave: torch.Tensor) -> torch.Tensor:
        """(B, S) -> (B, S // hop, n_mels) log-mel."""
        with torch.autocast(wave.device.type, enabled=False):
            return log_mel(wave.float(), self.window, self.mel_basis, self.config.mel)

    def mel_to_wave(self, mel: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, frames, n_mels) log-mel -> (B, frames * hop) waveform in [-1, 1] (HiFi-GAN or Griffin-Lim)."""
        length = mel.shape[1] * self.config.mel.hop_length
        if self.vocoder is not None:
            wave = self.vocoder(mel.to(self.vocoder.dtype)).float()  # (B, ~length)
            wave = F.pad(wave, (0, max(0, length - wave.shape[-1])))[:, :length]
        else:  # float32 signal processing even under autocast (torch.polar and the STFTs refuse bf16)
            with torch.autocast(mel.device.type, enabled=False):
                mel_magnitude = mel.float().exp().transpose(1, 2)  # (B, n_mels, frames)
                # (B, n_freq, frames)
                magnitude = mel_to_magnitude(mel_magnitude, self.mel_lobes.float(), self.lobes.float())
                iters = self.config.griffin_lim_iters
                wave = griffin_lim(magnitude, self.window, self.config.mel, iters, length, generator)
        return wave.clamp(-1, 1)

    def vae_inputs(self, media: torch.Tensor) -> torch.Tensor:
        m = self.config.mel
        return (self.wave_to_mel(media)[:, None] - m.offset) / m.scale  # (B, 1, frames, n_mels), normalised

    def latents_to_media(self, latents: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        m = self.config.mel
        mel = latents if self.vae is None else vae_decode(self.vae, latents)  # (B, 1, frames, n_mels)
        return self.mel_to_wave(mel[:, 0].float() * m.scale + m.offset, generator)  # (B, S)

    def latent_shape(self, batch: int) -> tuple[int, ...]:
        f = self.scale_factor
        frames = self.config.num_samples // self.config.mel.hop_length
        return (batch, self.unet.config.in_channels, frames // f, self.config.mel.n_mels // f)

    def _check_media(self, media: torch.Tensor) -> None:
        step = self.config.mel.hop_length * self.scale_factor * self.downscale
        if media.ndim != 2:
            raise ValueError(f"audio decoder: media must be a (B, S) 16 kHz waveform, got {tuple(media.shape)}")
        if media.shape[1] % step:
            raise ValueError(
                f"audio decoder: S must be a multiple of {step} samples (pad or crop), got {media.shape[1]}"
            )

    def _layout_of_latents(self, latents: torch.Tensor) -> tuple[ResidualLayout, int]:
        raise ValueError("audio decoders take no highway residuals (the Visual Embedding Highway is visual only)")

    def _unet(
        self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, residuals: HighwayResiduals | None
    ) -> torch.Tensor:
        return self.unet(x, t, encoder_hidden_states=None, class_labels=cond[:, 0]).sample
