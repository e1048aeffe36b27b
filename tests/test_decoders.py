"""Decoders: interface, losses, sampling, reference architectures (meta device), loading from local folders."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from xvila.decoders import (
    AudioDecoderConfig,
    ImageDecoderConfig,
    SchedulerConfig,
    VideoDecoderConfig,
    build_decoder,
    use_minilm,
)
from xvila.decoders.audio import SAMPLE_RATE, AudioDecoder, AudioDecoderConfig, MelConfig, mel_to_magnitude
from xvila.highway import HighwayResiduals

TINY = {
    "image": ImageDecoderConfig.tiny,
    "video": VideoDecoderConfig.tiny,
    "audio": AudioDecoderConfig.tiny,
}


def build(config, seed: int = 0):
    torch.manual_seed(seed)
    return build_decoder(config)


@pytest.fixture(scope="module")
def decoders():
    return {name: build(make()) for name, make in TINY.items()}


def media_for(decoder, batch: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    cfg = decoder.config
    if decoder.modality == "image":
        return torch.rand(batch, 3, cfg.height, cfg.width, generator=g)
    if decoder.modality == "video":
        return torch.rand(batch, cfg.num_frames, 3, cfg.height, cfg.width, generator=g)
    t = torch.arange(cfg.num_samples) / 16_000
    freqs = torch.tensor([220.0, 440.0, 330.0, 550.0])[:batch, None]
    return 0.5 * torch.sin(2 * math.pi * freqs * t)  # (B, S)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize(
    "config",
    [
        ImageDecoderConfig.tiny(),
        ImageDecoderConfig.tiny(with_vae=True),
        VideoDecoderConfig.tiny(),
        VideoDecoderConfig.tiny(unet3d=True, with_vae=True, num_frames=4, size=16),
        AudioDecoderConfig.tiny(),
        AudioDecoderConfig.tiny(with_vae=True, with_vocoder=True),
        ImageDecoderConfig.tiny_latent(),
        VideoDecoderConfig.tiny_latent(),
        AudioDecoderConfig.tiny_latent(),
        ImageDecoderConfig.sd15("/some/folder"),
        VideoDecoderConfig.zeroscope(),
        AudioDecoderConfig.audioldm(),
    ],
    ids=lambda c: type(c).__name__,
)
def test_config_json_round_trip(config):
    assert type(config).from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_config_validation_errors():
    tiny = ImageDecoderConfig.tiny()
    with pytest.raises(ValueError, match="cross_attention_dim"):
        tiny.replace(unet={**tiny.unet, "cross_attention_dim": 32})
    with pytest.raises(ValueError, match="in/out_channels"):
        tiny.replace(unet={**tiny.unet, "in_channels": 4})
    with pytest.raises(ValueError, match="complete"):
        tiny.replace(unet={k: v for k, v in tiny.unet.items() if k != "block_out_channels"})
    with pytest.raises(ValueError, match="multiples"):
        tiny.replace(height=30)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        tiny.replace(text_encoder={**tiny.text_encoder, "max_position_embeddings": 8})
    with pytest.raises(ValueError, match="v_prediction"):
        SchedulerConfig(rescale_betas_zero_snr=True)
    with pytest.raises(ValueError, match="sampler"):
        SchedulerConfig(sampler="euler")
    video = VideoDecoderConfig.tiny()
    with pytest.raises(ValueError, match="in/out_channels"):
        video.replace(num_frames=4)  # stacked: channels are tied to the frame count
    with pytest.raises(ValueError, match="3D"):
        video.replace(frame_layout="unet3d")
    audio = AudioDecoderConfig.tiny(with_vocoder=True)
    with pytest.raises(ValueError, match="num_samples"):
        audio.replace(num_samples=16_100)
    with pytest.raises(ValueError, match="model_in_dim"):
        audio.replace(vocoder={**audio.vocoder, "model_in_dim": 80})
    with pytest.raises(ValueError, match="projection"):
        audio.replace(unet={**audio.unet, "projection_class_embeddings_input_dim": 32})
    with pytest.raises(ValueError, match="no decoder"):
        build_decoder(SchedulerConfig())


# --------------------------------------------------------------------------------------------- interface
@pytest.mark.parametrize("name, cond_shape", [("image", (16, 64)), ("video", (16, 64)), ("audio", (1, 64))])
def test_cond_shape_and_encode_text(decoders, name, cond_shape):
    d = decoders[name]
    assert d.modality == name
    assert d.cond_shape == cond_shape
    e = d.encode_text(["a large red circle drifting left", "a small green square"])
    assert e.shape == (2, *cond_shape) and not e.requires_grad
    assert torch.equal(e, d.encode_text(["a large red circle drifting left", "a small green square"]))
    assert not torch.allclose(e[0], e[1])
    if name == "audio":  # AudioLDM feeds L2-normalised CLAP embeddings
        torch.testing.assert_close(e.norm(dim=-1), torch.ones(2, 1))
    with pytest.raises(ValueError, match="list of strings"):
        d.encode_text("not a list")


@pytest.mark.parametrize("name", list(TINY))
def test_denoising_loss_backprops_to_cond_and_unet_only(decoders, name):
    d = decoders[name]
    d.zero_grad(set_to_none=True)
    cond = d.encode_text(["a red circle", "a blue square"]).requires_grad_()
    loss = d.denoising_loss(media_for(d), cond, generator=gen())
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert cond.grad is not None and cond.grad.abs().sum() > 0
    unet_grads = [p.grad for p in d.denoiser.parameters()]
    assert all(g is not None for g in unet_grads) and sum(g.abs().sum() for g in unet_grads) > 0
    assert d.frozen_parts(), "every decoder has a frozen text encoder"
    for part in d.frozen_parts():
        assert all(not p.requires_grad and p.grad is None for p in part.parameters())
    d.zero_grad(set_to_none=True)


LATENT = {"image": ImageDecoderConfig.tiny_latent, "video": VideoDecoderConfig.tiny_latent,
          "audio": AudioDecoderConfig.tiny_latent}


@pytest.mark.parametrize("name", ["image", "video", "audio"])
def test_vae_trains_on_its_media_and_calibrates_its_latents(name):
    decoder = build(LATENT[name]())
    decoder.vae.requires_grad_(True)
    media = media_for(decoder, batch=4)
    optimizer = torch.optim.Adam(decoder.vae.parameters(), lr=2e-3)
    losses = []
    for _ in range(8):
        loss = decoder.autoencode_loss(media, 1e-4, max_inputs=6, generator=gen(len(losses)))
        assert all(p.grad is None for p in decoder.unet.parameters())  # only the VAE learns here
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]

    values = decoder.calibrate_latents(media)
    assert decoder.config.vae["latents_mean"] == values["latents_mean"] == list(decoder.vae.config.latents_mean)
    channels = decoder.vae.config.latent_channels
    z = decoder.media_to_latents(media, gen(0))  # the posterior samples calibration measured: unit per channel
    z = z.view(z.shape[0], -1, channels, *z.shape[-2:]).permute(2, 0, 1, 3, 4).reshape(channels, -1)
    torch.testing.assert_close(z.mean(1), torch.zeros(channels), atol=1e-4, rtol=0)
    torch.testing.assert_close(z.std(1), torch.ones(channels), atol=2e-3, rtol=0)
    raw = decoder.vae.encode(decoder.vae_inputs(media)).latent_dist.sample(gen(1))
    expected = decoder.vae.decode(raw).sample
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in (values["latents_mean"], values["latents_std"]))
    from xvila.decoders.base import vae_decode

    torch.testing.assert_close(vae_decode(decoder.vae, (raw - mean) / std), expected, atol=1e-4, rtol=1e-4)


def test_autoencode_needs_a_vae(decoders):
    with pytest.raises(ValueError, match="no VAE"):
        decoders["image"].autoencode_loss(media_for(decoders["image"]), 1e-4)


def test_loss_is_seeded(decoders):
    d = decoders["image"]
    cond = d.encode_text(["a", "b"])
    a = d.denoising_loss(media_for(d), cond, generator=gen(3))
    b = d.denoising_loss(media_for(d), cond, generator=gen(3))
    assert torch.equal(a, b)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_min_snr_weights(decoders, prediction_type):
    d = decoders["image"]
    t = torch.tensor([0, 10, 100, 500, 999])
    alphas = d.noise_scheduler.alphas_cumprod[t]
    snr = alphas / (1 - alphas)
    weights = d._min_snr_weights(t, prediction_type, 5.0)
    # each prediction type's error is the x0 error times 1 (sample), 1 / SNR (epsilon), 1 / (SNR + 1) (v): the
    # weights turn each into min(SNR, 5) times the x0 error
    per_x0 = {"sample": torch.ones_like(snr), "epsilon": snr, "v_prediction": snr + 1}[prediction_type]
    torch.testing.assert_close(weights.double() * per_x0.double(), snr.double().clamp(max=5.0), rtol=1e-5, atol=1e-8)
    assert snr[0] > 5 > snr[-1]  # the clip is active at the clean end and not at the noisy one


def test_min_snr_loss_reweights_the_same_draws(decoders):
    d = decoders["image"]
    cond = d.encode_text(["a", "b", "c", "d"])
    media = media_for(d, 4)
    plain = d.denoising_loss(media, cond, generator=gen(3))
    huge = d.denoising_loss(media, cond, generator=gen(3), min_snr_gamma=1e9)
    small = d.denoising_loss(media, cond, generator=gen(3), min_snr_gamma=0.01)
    assert d.config.scheduler.prediction_type == "v_prediction"  # weights below 1, larger with gamma
    assert 0 < small < huge < plain
    with pytest.raises(ValueError, match="min_snr_gamma"):
        d.denoising_loss(media, cond, min_snr_gamma=0.0)


@pytest.mark.parametrize("name", list(TINY))
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_sample_shapes_and_ranges(decoders, name, guidance):
    d = decoders[name]
    cond = d.encode_text(["a red circle", "a blue square"])
    out = d.sample(cond, guidance_scale=guidance, num_inference_steps=2, generator=gen())
    cfg = d.config
    if name == "image":
        assert out.shape == (2, 3, cfg.height, cfg.width) and out.min() >= 0 and out.max() <= 1
    elif name == "video":
        assert out.shape == (2, cfg.num_frames, 3, cfg.height, cfg.width) and out.min() >= 0 and out.max() <= 1
    else:
        assert out.shape == (2, cfg.num_samples) and out.abs().max() <= 1
    assert torch.isfinite(out).all() and not out.requires_grad


def test_classifier_free_guidance_path(decoders):
    d = decoders["image"]
    cond = d.encode_text(["a red circle", "a blue square"])
    null = d.null_embeds()
    assert null.shape == (1, *d.cond_shape) and d.null_embeds() is null  # computed once
    default = d.sample(cond, guidance_scale=3.0, num_inference_steps=2, generator=gen())
    explicit = d.sample(cond, negative_embeds=null, guidance_scale=3.0, num_inference_steps=2, generator=gen())
    assert torch.equal(default, explicit)
    other = d.sample(cond, negative_embeds=cond.flip(0), guidance_scale=3.0, num_inference_steps=2, generator=gen())
    assert not torch.equal(default, other)
    unguided = d.sample(cond, guidance_scale=1.0, num_inference_steps=2, generator=gen())
    assert not torch.equal(default, unguided)
    with pytest.raises(ValueError, match="negative_embeds"):
        d.sample(cond, negative_embeds=cond[:, :4], guidance_scale=3.0, num_inference_steps=1)


@pytest.mark.parametrize(
    "prediction_type, sampler, spacing", [("epsilon", "dpmsolver++", "leading"), ("v_prediction", "ddim", "trailing")]
)
def test_prediction_types_and_samplers(prediction_type, sampler, spacing):
    cfg = ImageDecoderConfig.tiny()
    sched = cfg.scheduler.replace(prediction_type=prediction_type, sampler=sampler, timestep_spacing=spacing)
    d = build(cfg.replace(scheduler=sched))
    cond = d.encode_text(["a", "b"])
    assert torch.isfinite(d.denoising_loss(media_for(d), cond, generator=gen()))
    assert d.sample(cond, num_inference_steps=3, generator=gen()).shape == (2, 3, 32, 32)


def test_train_mode_keeps_frozen_parts_in_eval(decoders):
    d = decoders["audio"]
    d.train()
    assert d.unet.training and all(not p.training for p in d.frozen_parts())
    d.eval()


def test_lora_target_modules_exist(decoders):
    from peft import LoraConfig, inject_adapter_in_model

    for name in ("image", "audio"):
        unet = build(TINY[name]()).denoiser
        unet = inject_adapter_in_model(LoraConfig(r=2, target_modules=decoders[name].lora_target_modules), unet)
        assert any("lora_A" in n for n, _ in unet.named_parameters())


# ----------------------------------------------------------------------------------------- wrong inputs
def test_wrong_media_shapes_raise(decoders):
    img, vid, aud = decoders["image"], decoders["video"], decoders["audio"]
    cond2 = {k: d.encode_text(["a", "b"]) for k, d in decoders.items()}
    bad = [
        (img, torch.rand(2, 32, 32)),
        (img, torch.rand(2, 1, 32, 32)),
        (img, torch.rand(2, 3, 30, 30)),
        (vid, torch.rand(2, 3, 32, 32)),
        (vid, torch.rand(2, 4, 3, 32, 32)),  # the stacked decoder takes exactly 8 frames
        (aud, torch.rand(2, 1, 16_000)),
        (aud, torch.rand(2, 16_100)),
    ]
    for d, media in bad:
        with pytest.raises(ValueError, match=f"{d.modality} decoder"):
            d.denoising_loss(media, cond2[d.modality])


def test_wrong_cond_shapes_raise(decoders):
    for d in decoders.values():
        q, dim = d.cond_shape
        media = media_for(d)
        for shape in ((2, q + 1, dim), (2, q, dim + 1), (3, q, dim), (q, dim)):
            cond = torch.zeros(shape)
            with pytest.raises(ValueError, match="cond_embeds must be"):
                d.denoising_loss(media, cond)
        with pytest.raises(ValueError, match="cond_embeds must be"):
            d.sample(torch.zeros(2, q, dim + 1), num_inference_steps=1)


def test_audio_rejects_highway(decoders):
    d = decoders["audio"]
    with pytest.raises(ValueError, match="image and video"):
        d.residual_shapes(32, 32)
    res = HighwayResiduals([torch.zeros(2, 32, 64, 64)], torch.zeros(2, 64, 16, 16))
    with pytest.raises(ValueError, match="no highway"):
        d.denoising_loss(media_for(d), d.encode_text(["a", "b"]), residuals=res)


# ---------------------------------------------------------------------------------- audio signal path
def test_log_mel_and_griffin_lim_keep_pitch(decoders):
    d = decoders["audio"]
    notes = torch.tensor([262.0, 294.0, 523.0])  # C4, D4 (a whole step above), C5
    t = torch.arange(16_000) / 16_000
    wave = 0.5 * torch.sin(2 * math.pi * notes[:, None] * t)  # (3, S)
    mel = d.wave_to_mel(wave)
    assert mel.shape == (3, 16_000 // d.config.mel.hop_length, d.config.mel.n_mels)
    back = d.mel_to_wave(mel, gen())
    assert back.shape == wave.shape and back.abs().max() <= 1
    peak_hz = torch.fft.rfft(back).abs().argmax(dim=-1).float()  # 1 s of audio: bin index == Hz
    assert ((peak_hz - notes).abs() < 16).all(), peak_hz  # nearer its own note than the next one


@pytest.fixture(scope="module")
def log_band_decoder() -> AudioDecoder:
    """The tiny audio decoder on log-spaced bands, as xvila-tiny's (150 Hz - 4 kHz)."""
    base = AudioDecoderConfig.tiny()
    return build(base.replace(mel=base.mel.replace(frequency_scale="log", fmin=150.0, fmax=4000.0)))


@pytest.mark.parametrize("scale", ["mel", "log"])
def test_mel_inversion_keeps_a_tone_between_two_mel_bands(decoders, log_band_decoder, scale):
    """A tone between two mel bands' centres has nearly the mel of two tones on the centres; the inversion must
    put the peak at the tone. (A fit of free STFT bins put tones 1.2-1.3 bins off for about a tenth of these
    frequencies, so glides came back as steps.)"""
    d = decoders["audio"] if scale == "mel" else log_band_decoder
    bin_hz = SAMPLE_RATE / d.config.mel.n_fft  # 15.6 Hz; the mel bands' centres here are 3 bins apart
    tones = torch.arange(180.0, 460.0, 2.0)  # every 2 Hz over the toy world's notes
    t = torch.arange(8_000) / SAMPLE_RATE
    mel = d.wave_to_mel(0.5 * torch.sin(2 * math.pi * tones[:, None] * t))  # (N, frames, n_mels)
    magnitude = mel_to_magnitude(mel.exp().transpose(1, 2), d.mel_lobes, d.lobes)  # (N, n_freq, frames)
    peak_hz = magnitude[..., 4:-4].argmax(dim=1).float() * bin_hz  # (N, frames), away from the edges
    off = (peak_hz - tones[:, None]).abs().amax(dim=1) / bin_hz  # (N,) in bins
    assert (off <= 0.75).all(), tones[off > 0.75]


def harmonic_peaks(decoder, f0: float, harmonics=(1, 2, 3, 4, 5)) -> list[int]:
    """The band holding each harmonic's peak in the decoder's log-mel of a steady tone at f0 (one harmonic at a time)."""
    t = torch.arange(8_000) / SAMPLE_RATE
    waves = torch.stack([0.3 * torch.sin(2 * math.pi * k * f0 * t) for k in harmonics])
    return decoder.wave_to_mel(waves)[:, 8].argmax(dim=-1).tolist()


def test_log_bands_move_a_harmonic_pattern_without_stretching_it(decoders, log_band_decoder):
    """On log-spaced bands, raising the pitch by a whole number of bands moves every harmonic by that number of
    bands, so a timbre keeps its pattern at any pitch; on slaney mel bands the upper harmonics move further."""
    log, mel = log_band_decoder, decoders["audio"]
    ratio = (4000 / 150) ** (1 / 63)
    f0 = 150 * ratio**12  # on a band centre, above the bands' one-STFT-bin floor for every harmonic but the first
    for steps in (3, 6, 9):
        low, high = harmonic_peaks(log, f0), harmonic_peaks(log, f0 * ratio**steps)
        assert [h - l for l, h in zip(low, high)] == [steps] * 5, (steps, low, high)
    low, high = harmonic_peaks(mel, 220.0), harmonic_peaks(mel, 220.0 * 2 ** (6 / 12))
    assert len({h - l for l, h in zip(low, high)}) > 1  # the mel axis stretches the pattern


def test_log_band_inversion_keeps_pitch(log_band_decoder):
    d = log_band_decoder
    notes = torch.tensor([220.0, 262.0, 294.0, 523.0])
    t = torch.arange(16_000) / 16_000
    back = d.mel_to_wave(d.wave_to_mel(0.5 * torch.sin(2 * math.pi * notes[:, None] * t)), gen())
    peak_hz = torch.fft.rfft(back).abs().argmax(dim=-1).float()  # 1 s of audio: bin index == Hz
    assert ((peak_hz - notes).abs() < 10).all(), peak_hz


def test_mel_config_rejects_unknown_scales_and_a_log_scale_from_zero():
    with pytest.raises(ValueError, match="frequency_scale"):
        MelConfig(frequency_scale="bark")
    with pytest.raises(ValueError, match="fmin > 0"):
        MelConfig(frequency_scale="log", fmin=0.0)


def test_mel_conversions_run_in_float32_under_autocast(decoders):
    """bf16 autocast (CUDA or CPU) must not reach the STFTs and torch.polar (found on a GPU: a dtype error)."""
    d = decoders["audio"]
    wave = 0.5 * torch.sin(2 * math.pi * 440.0 * torch.arange(16_000) / 16_000)[None]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mel = d.wave_to_mel(wave)
        back = d.mel_to_wave(mel.bfloat16(), gen())
    assert mel.dtype == torch.float32 and back.dtype == torch.float32 and torch.isfinite(back).all()


# --------------------------------------------------------------------------------- reference layouts
def count(module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


@pytest.mark.parametrize(
    "config, cond_shape, millions",
    [
        # published sizes: SD-1.5 UNet 859.5M, its VAE 83.7M, CLIP ViT-L/14 text 123.1M
        (ImageDecoderConfig.sd15(), (77, 768), {"unet": 859.5, "vae": 83.7, "text_encoder": 123.1}),
        # ModelScope / ZeroScope UNet3D 1.41B, OpenCLIP ViT-H text 340.4M
        (VideoDecoderConfig.zeroscope(), (77, 1024), {"unet": 1411.2, "vae": 83.7, "text_encoder": 340.4}),
        # AudioLDM-S: UNet 185.0M (diffusers conversion), mel VAE 55.4M, CLAP text 125.3M, HiFi-GAN 55.3M
        (
            AudioDecoderConfig.audioldm(),
            (1, 512),
            {"unet": 185.0, "vae": 55.4, "text_encoder": 125.3, "vocoder": 55.3},
        ),
    ],
    ids=["sd15", "zeroscope", "audioldm"],
)
def test_reference_architectures_on_meta(config, cond_shape, millions):
    with torch.device("meta"):
        d = build_decoder(config)
    assert d.cond_shape == cond_shape
    for part, expected in millions.items():
        assert count(getattr(d, part)) == pytest.approx(expected, rel=0.01), part


# ------------------------------------------------------------------------------------ save and load
@pytest.mark.parametrize(
    "config",
    [
        ImageDecoderConfig.tiny(with_vae=True),
        VideoDecoderConfig.tiny(unet3d=True, with_vae=True, num_frames=2, size=16),
        AudioDecoderConfig.tiny(with_vae=True, with_vocoder=True),
    ],
    ids=["image", "video-unet3d", "audio"],
)
def test_weights_path_loads_a_diffusers_folder(tmp_path, config):
    d = build(config)
    d.save_pretrained(tmp_path)
    has_vocoder = getattr(d, "vocoder", None) is not None
    expected = {"unet", "vae", "text_encoder", "tokenizer", "scheduler"} | ({"vocoder"} if has_vocoder else set())
    assert {p.name for p in tmp_path.iterdir()} == expected
    loaded = build(config.replace(weights_path=str(tmp_path)), seed=1)
    texts = ["a red circle", ""]
    torch.testing.assert_close(loaded.encode_text(texts), d.encode_text(texts), rtol=0, atol=1e-6)
    cond = d.encode_text(["a red circle", "a blue square"])
    media = media_for(d)
    torch.testing.assert_close(
        loaded.denoising_loss(media, cond, generator=gen()), d.denoising_loss(media, cond, generator=gen()),
        rtol=1e-5, atol=1e-6,
    )  # fmt: skip
    torch.testing.assert_close(
        loaded.sample(cond, num_inference_steps=2, generator=gen()),
        d.sample(cond, num_inference_steps=2, generator=gen()),
        rtol=1e-4, atol=1e-5,
    )  # fmt: skip
    # a config that does not describe the folder fails loudly
    wrong = {**config.unet, "layers_per_block": 2}
    with pytest.raises(ValueError, match="does not match"):
        build_decoder(config.replace(unet=wrong, weights_path=str(tmp_path)))
    with pytest.raises(ValueError, match="prediction_type"):
        epsilon = config.scheduler.replace(prediction_type="epsilon")
        build_decoder(config.replace(scheduler=epsilon, weights_path=str(tmp_path)))


def test_missing_weights_folder_raises(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        build_decoder(ImageDecoderConfig.tiny().replace(weights_path=str(tmp_path / "nowhere")))


def test_state_dict_round_trip_through_safetensors(tmp_path, decoders):
    d = decoders["audio"]
    path = tmp_path / "decoder.safetensors"
    save_file(d.state_dict(), str(path))
    fresh = build(d.config, seed=123)
    assert list(fresh.state_dict()) == list(d.state_dict())  # complete and deterministic keys
    cond = d.encode_text(["a", "b"])
    fresh.null_embeds()  # cached before loading: must be recomputed from the loaded weights
    fresh.load_state_dict(load_file(str(path)), strict=True)
    torch.testing.assert_close(fresh.null_embeds(), d.null_embeds(), rtol=0, atol=0)
    expected = d.sample(cond, num_inference_steps=2, generator=gen())
    assert torch.equal(fresh.sample(cond, num_inference_steps=2, generator=gen()), expected)


def test_tokenizer_save_and_reload(tmp_path, decoders):
    d = decoders["image"]
    d.save_tokenizer(tmp_path)
    cfg = d.config.replace(tokenizer=d.config.tokenizer.replace(path=str(tmp_path)))
    again = build(cfg)
    texts = ["a large red circle drifting left", ""]
    assert again.tokenizer(texts).input_ids == d.tokenizer(texts).input_ids
    assert d.tokenizer([""]).input_ids == [[1, 2]]  # <s> </s>: the empty prompt still has tokens


WITH_VAE = {"image": lambda: ImageDecoderConfig.tiny(with_vae=True),
            "video": lambda: VideoDecoderConfig.tiny(unet3d=True, with_vae=True, num_frames=4, size=16),
            "audio": lambda: AudioDecoderConfig.tiny(with_vae=True)}


@pytest.mark.parametrize("name", ["image", "video", "audio"])
def test_a_kept_posterior_gives_the_loss_of_running_the_vae(name):
    decoder = build(WITH_VAE[name]())
    media = media_for(decoder)
    cond = decoder.encode_text(["a", "b"])
    mean, std = decoder.vae_posterior(media)
    assert mean.shape == std.shape and mean.shape[0] == (2 * media.shape[1] if name == "video" else 2)
    direct = decoder.denoising_loss(media, cond, generator=gen(5))
    kept = decoder.denoising_loss(media, cond, generator=gen(5), posterior=(mean, std))
    torch.testing.assert_close(kept, direct)
    moved = decoder.denoising_loss(media, cond, generator=gen(5), posterior=(mean + 1, std))
    assert not torch.allclose(moved, direct)  # the posterior given is the one used


def test_vae_posterior_needs_a_vae(decoders):
    with pytest.raises(ValueError, match="no VAE"):
        decoders["image"].vae_posterior(media_for(decoders["image"]))


@pytest.mark.parametrize("name", ["image", "video"])
def test_pooled_conditioning_through_the_time_embedding(name):
    """class_embed_type on an image / video UNet: the one-vector conditioning is added to the timestep embedding
    too (as well as cross-attended), and it gets a gradient there."""
    base = TINY[name]()
    minilm = use_minilm(base)
    config = minilm.replace(unet={**minilm.unet, "class_embed_type": "projection",
                                  "projection_class_embeddings_input_dim": 384})
    assert use_minilm(config) == config
    d = build(config)
    cond = d.encode_text(["a red circle", "a blue square"])
    d.denoising_loss(media_for(d), cond, generator=gen()).backward()
    grad = d.unet.class_embedding.linear_1.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert build(minilm).unet.class_embedding is None
    with pytest.raises(ValueError, match="one-vector"):  # its own text tower gives 16 tokens
        base.replace(unet={**base.unet, "class_embed_type": "projection", "projection_class_embeddings_input_dim": 64})
    with pytest.raises(ValueError, match="conditioning width"):
        config.replace(unet={**config.unet, "projection_class_embeddings_input_dim": 64})
    for other in ("timestep", "simple_projection"):  # simple_projection: the AudioLDM layout, no cross-attention
        with pytest.raises(ValueError, match="class_embed_type must be"):
            config.replace(unet={**config.unet, "class_embed_type": other})


def test_pooled_conditioning_needs_a_2d_video_unet():
    unet3d = use_minilm(VideoDecoderConfig.tiny(unet3d=True, with_vae=True, num_frames=2, size=16))
    with pytest.raises(ValueError, match="2D UNet"):
        unet3d.replace(unet={**unet3d.unet, "class_embed_type": "projection",
                             "projection_class_embeddings_input_dim": 384})
