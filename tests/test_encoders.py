"""ImageBind-architecture encoders: shapes, definitions, checkpoint layout, log-mel features."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from xvila.encoders import (
    EncoderConfig,
    ImageBindEncoder,
    build_encoder,
    kaldi_mel_filterbank,
    load_imagebind_state_dict,
    mel_center_frequencies,
)
from xvila.encoders.imagebind import SelfAttention
from xvila.encoders.mel import LogMelFilterbank

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def encoder() -> ImageBindEncoder:
    torch.manual_seed(0)
    return ImageBindEncoder(EncoderConfig.tiny()).eval()


def _inputs(config: EncoderConfig, batch: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    size = config.vision.image_size
    inputs = {
        "image": torch.rand(batch, 3, size, size, generator=g),
        "video": torch.rand(batch, 4, 3, size, size, generator=g),
        "audio": torch.rand(batch, config.audio.sample_rate, generator=g) * 2 - 1,
    }
    if config.text is not None:
        inputs["text"] = torch.randint(4, config.text.vocab_size, (batch, 12), generator=g)
        inputs["text"][:, 9] = config.text.eos_token_id
    return inputs


# ---------------------------------------------------------------------------------------------------- shapes


def test_tiny_shapes_and_unit_norm(encoder: ImageBindEncoder) -> None:
    config = encoder.config
    assert encoder.modalities == ("image", "video", "audio", "text")
    assert encoder.embed_dim == 64
    assert encoder.patch_grid("image") == (1, 4, 4)
    assert encoder.patch_grid("video") == (2, 4, 4)
    assert encoder.patch_grid("video", num_frames=8) == (4, 4, 4)
    assert encoder.patch_grid("audio") == (1, 5, 9)
    expected_tokens = {"image": 16, "video": 32, "audio": 45, "text": 12}
    with torch.no_grad():
        for modality, media in _inputs(config).items():
            out = encoder(modality, media)
            assert out.patch_embeds.shape == (2, expected_tokens[modality], encoder.patch_dim(modality)), modality
            assert out.pooled_embeds.shape == (2, 64), modality
            torch.testing.assert_close(out.pooled_embeds.norm(dim=-1), torch.ones(2))
            if modality != "text":
                assert encoder.num_patches(modality) == expected_tokens[modality]


def test_video_pools_the_normalised_mean_of_its_clips(encoder: ImageBindEncoder) -> None:
    video = _inputs(encoder.config)["video"]  # (2, 4, 3, 32, 32)
    with torch.no_grad():
        whole = encoder("video", video)
        first, second = encoder("video", video[:, :2]), encoder("video", video[:, 2:])
    mean = F.normalize((first.pooled_embeds + second.pooled_embeds) / 2, dim=-1)
    torch.testing.assert_close(whole.pooled_embeds, mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(whole.patch_embeds, torch.cat([first.patch_embeds, second.patch_embeds], dim=1))


def test_image_is_a_still_two_frame_clip(encoder: ImageBindEncoder) -> None:
    image = _inputs(encoder.config)["image"]
    with torch.no_grad():
        as_image = encoder("image", image)
        as_video = encoder("video", image.unsqueeze(1).expand(-1, 2, -1, -1, -1))
    torch.testing.assert_close(as_image.pooled_embeds, as_video.pooled_embeds, atol=1e-5, rtol=1e-5)


def test_text_pools_at_the_first_eos_and_is_causal(encoder: ImageBindEncoder) -> None:
    ids = _inputs(encoder.config)["text"]
    changed = ids.clone()
    changed[:, 10:] = 7  # after the EOS at position 9
    with torch.no_grad():
        a, b = encoder("text", ids), encoder("text", changed)
    torch.testing.assert_close(a.pooled_embeds, b.pooled_embeds)
    torch.testing.assert_close(a.patch_embeds[:, :10], b.patch_embeds[:, :10])


def test_gradients_reach_every_tower() -> None:
    torch.manual_seed(0)
    encoder = ImageBindEncoder(EncoderConfig.tiny()).train()
    loss = sum(
        out.pooled_embeds.square().sum() * 0 + out.pooled_embeds[:, 0].sum() + out.patch_embeds.mean()
        for out in (encoder(m, x) for m, x in _inputs(encoder.config).items())
    )
    loss.backward()
    for name, p in encoder.named_parameters():
        if name.endswith("log_logit_scale"):  # not used by forward (exposed through logit_scale())
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert encoder.modality_preprocessors["vision"].rgbt_stem.proj[1].weight.grad.abs().sum() > 0


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    torch.manual_seed(0)
    plain = ImageBindEncoder(EncoderConfig.tiny(with_text=False)).eval()
    ckpt = ImageBindEncoder(EncoderConfig.tiny(with_text=False).replace(gradient_checkpointing=True)).eval()
    ckpt.load_state_dict(plain.state_dict())
    image = _inputs(plain.config)["image"]
    for model in (plain, ckpt):
        model("image", image).pooled_embeds.sum().backward()
    weight = "modality_trunks.vision.blocks.0.mlp.fc1.weight"
    torch.testing.assert_close(
        dict(plain.named_parameters())[weight].grad, dict(ckpt.named_parameters())[weight].grad
    )


@pytest.mark.parametrize("add_bias_kv", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_matches_nn_multihead_attention(add_bias_kv: bool, causal: bool) -> None:
    torch.manual_seed(0)
    ours = SelfAttention(32, 4, add_bias_kv)
    reference = nn.MultiheadAttention(32, 4, bias=True, add_bias_kv=add_bias_kv)
    reference.load_state_dict(ours.state_dict(), strict=True)  # same parameter names and shapes
    x = torch.randn(2, 7, 32)  # (B, N, C)
    mask = torch.full((7, 7), float("-inf")).triu(1) if causal else None
    expected = reference(x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1), attn_mask=mask, need_weights=False)
    torch.testing.assert_close(ours(x, causal=causal), expected[0].transpose(0, 1), atol=1e-5, rtol=1e-5)


def test_logit_scales_follow_imagebind(encoder: ImageBindEncoder) -> None:
    assert encoder.logit_scale("image").item() == 1.0
    assert encoder.logit_scale("audio").item() == pytest.approx(20.0)
    assert encoder.logit_scale("text").item() == pytest.approx(1 / 0.07, rel=1e-5)
    assert encoder.logit_scale("text").requires_grad and not encoder.logit_scale("audio").requires_grad


# ---------------------------------------------------------------------------------------------------- errors


def test_errors_name_what_is_expected(encoder: ImageBindEncoder) -> None:
    with pytest.raises(ValueError, match="known modalities.*image.*video.*audio"):
        encoder("depth", torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):
        encoder("image", torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="float pixels"):
        encoder("image", torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="multiple of 2"):
        encoder("video", torch.zeros(1, 3, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, S\)"):
        encoder("audio", torch.zeros(1, 1, 16000))
    with pytest.raises(ValueError, match="end-of-text"):
        encoder("text", torch.full((1, 5), 9))
    with pytest.raises(ValueError, match="L <= 32"):
        encoder("text", torch.full((1, 40), 2))
    no_text = ImageBindEncoder(EncoderConfig.tiny(with_text=False))
    with pytest.raises(ValueError, match="known modalities"):
        no_text("text", torch.full((1, 5), 2))
    with pytest.raises(ValueError, match="divisible"):
        EncoderConfig.tiny().vision.trunk.replace(heads=5)


def test_config_round_trips(tmp_path: Path) -> None:
    for config in (EncoderConfig.tiny(), EncoderConfig.imagebind_huge(), EncoderConfig.tiny(with_text=False)):
        config.save(tmp_path / "encoder.json")
        assert EncoderConfig.load(tmp_path / "encoder.json") == config


# --------------------------------------------------------------------------------------------- checkpoints


def _published_layout() -> dict[str, list[int]]:
    return json.loads((FIXTURES / "imagebind_huge_keys.json").read_text())["keys"]


@pytest.fixture(scope="module")
def huge_on_meta() -> ImageBindEncoder:
    with torch.device("meta"):
        return ImageBindEncoder(EncoderConfig.imagebind_huge())


def test_huge_matches_the_published_checkpoint_layout(huge_on_meta: ImageBindEncoder) -> None:
    layout = _published_layout()
    ours = {k: list(v.shape) for k, v in huge_on_meta.state_dict().items()}
    expected = {k: s for k, s in layout.items() if k.split(".")[1] in ("vision", "audio", "text")}
    assert sorted(set(ours) - set(expected)) == [] and sorted(set(expected) - set(ours)) == []
    mismatched = {k: (ours[k], expected[k]) for k in expected if ours[k] != expected[k]}
    assert mismatched == {}

    state_dict = {k: torch.empty(shape, device="meta") for k, shape in layout.items()}
    report = load_imagebind_state_dict(huge_on_meta, state_dict, assign=True)
    assert report.dropped_towers == ("depth", "imu", "thermal")
    assert set(report.dropped_keys) == set(layout) - set(expected)
    assert report.loaded_keys == len(expected)

    vision_trunk = sum(p.numel() for p in huge_on_meta.modality_trunks["vision"].parameters())
    assert vision_trunk == pytest.approx(630e6, rel=0.02)
    total = sum(p.numel() for p in huge_on_meta.parameters())
    assert total == pytest.approx(1.1e9, rel=0.05)  # vision + audio + text of the 1.2B published model


def test_a_single_wrong_name_or_shape_fails_the_strict_load(huge_on_meta: ImageBindEncoder) -> None:
    layout = _published_layout()
    bad_shape = {k: torch.empty(s, device="meta") for k, s in layout.items()}
    bad_shape["modality_trunks.audio.blocks.3.attn.bias_k"] = torch.empty(1, 1, 769, device="meta")
    with pytest.raises(RuntimeError, match="bias_k"):
        load_imagebind_state_dict(huge_on_meta, bad_shape, assign=True)
    bad_name = {k: torch.empty(s, device="meta") for k, s in layout.items()}
    bad_name["modality_heads.vision.1.weight"] = bad_name.pop("modality_heads.vision.2.weight")
    with pytest.raises(RuntimeError, match="modality_heads.vision"):
        load_imagebind_state_dict(huge_on_meta, bad_name, assign=True)


def test_huge_shapes_on_the_meta_device(huge_on_meta: ImageBindEncoder) -> None:
    huge_on_meta.reset_nonpersistent_buffers("meta")  # shape propagation only: no memory, no compute
    with torch.no_grad():
        image = huge_on_meta("image", torch.empty(2, 3, 224, 224, device="meta"))
        video = huge_on_meta("video", torch.empty(2, 4, 3, 224, 224, device="meta"))
        audio_tokens = huge_on_meta.modality_preprocessors["audio"](torch.empty(2, 1, 128, 204, device="meta"))
    assert image.patch_embeds.shape == (2, 256, 1280) and image.pooled_embeds.shape == (2, 1024)
    assert video.patch_embeds.shape == (2, 512, 1280) and huge_on_meta.patch_grid("video", 4) == (2, 16, 16)
    assert audio_tokens.shape == (2, 1 + 12 * 19, 768) and huge_on_meta.patch_grid("audio") == (1, 12, 19)
    assert huge_on_meta.config.audio.clip_samples == 32880  # 2 s clips give 198 frames, padded to 204


def test_build_encoder_loads_local_weights(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = EncoderConfig.tiny(with_text=False)
    source = ImageBindEncoder(config).eval()
    state_dict = dict(source.state_dict())
    state_dict["modality_trunks.depth.blocks.0.norm_1.weight"] = torch.ones(8)  # a tower we do not build
    state_dict["modality_postprocessors.text.1.log_logit_scale"] = torch.tensor(2.0)  # text is off here
    torch.save(state_dict, tmp_path / "imagebind.pth")
    loaded = build_encoder(config.replace(weights_path=str(tmp_path / "imagebind.pth"))).eval()
    assert all(p.requires_grad and not p.is_meta for p in loaded.parameters())
    assert not any(b.is_meta for b in loaded.buffers())
    media = _inputs(config)
    with torch.no_grad():
        for modality in ("image", "audio"):
            torch.testing.assert_close(
                loaded(modality, media[modality]).pooled_embeds, source(modality, media[modality]).pooled_embeds
            )
    with pytest.raises(FileNotFoundError, match="weights_path"):
        build_encoder(config.replace(weights_path=str(tmp_path / "missing.pth")))


# --------------------------------------------------------------------------------------------------- log-mel


@pytest.mark.parametrize("frequency", [440.0, 1000.0, 3000.0])
def test_log_mel_of_a_pure_tone_peaks_at_its_mel_bin(frequency: float) -> None:
    mel = LogMelFilterbank(16000, 128, 400, 160)
    t = torch.arange(32000) / 16000
    log_mel = mel((0.5 * torch.sin(2 * math.pi * frequency * t))[None])  # (1, 128, 198)
    assert log_mel.shape == (1, 128, 198)
    peak = int(log_mel[0].mean(dim=1).argmax())
    centres = mel_center_frequencies(128, 16000)
    assert abs(peak - int(np.abs(centres - frequency).argmin())) <= 1
    assert abs(centres[peak] - frequency) / frequency < 0.05


@pytest.mark.filterwarnings("ignore:At least one mel filter has all zero values")
def test_log_mel_matches_an_independent_kaldi_implementation() -> None:
    audio_utils = pytest.importorskip("transformers.audio_utils")
    rng = np.random.default_rng(0)
    wave = (rng.standard_normal(16000) * 0.1).astype(np.float32)
    # transformers' numpy path of the AST feature extractor (Kaldi fbank without torchaudio)
    filters = audio_utils.mel_filter_bank(
        num_frequency_bins=257,
        num_mel_filters=128,
        min_frequency=20,
        max_frequency=8000,
        sampling_rate=16000,
        norm=None,
        mel_scale="kaldi",
        triangularize_in_mel_space=True,
    )
    np.testing.assert_allclose(kaldi_mel_filterbank(128, 512, 16000).T, filters, atol=1e-5)
    reference = audio_utils.spectrogram(
        wave,
        audio_utils.window_function(400, "hann", periodic=False),
        frame_length=400,
        hop_length=160,
        fft_length=512,
        power=2.0,
        center=False,
        preemphasis=0.97,
        mel_filters=filters,
        log_mel="log",
        mel_floor=1.192092955078125e-07,
        remove_dc_offset=True,
    )  # (M, F)
    ours = LogMelFilterbank(16000, 128, 400, 160)(torch.from_numpy(wave)[None])[0].numpy()
    assert ours.shape == reference.shape == (128, 98)
    np.testing.assert_allclose(ours, reference, atol=1e-3)


def test_audio_features_are_normalised_and_padded(encoder: ImageBindEncoder) -> None:
    features = encoder.audio_features(torch.zeros(1, 16000) + 0.1)  # a constant: centred to silence
    assert features.shape == (1, 1, 64, 100)
    padded = (0 - encoder.config.audio.mel_mean) / encoder.config.audio.mel_std
    torch.testing.assert_close(features[0, 0, :, 98:], torch.full((64, 2), padded))
