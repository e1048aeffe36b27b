"""Visual Embedding Highway: residual layouts, exact no-op at init, effect once trained, temporal choices."""

from __future__ import annotations

import pytest
import torch

from xvila.decoders import ImageDecoderConfig, VideoDecoderConfig, build_decoder
from xvila.highway import HighwayConfig, HighwayResiduals, ResidualLayout, VisualHighway

PATCH_DIM = 24
GRID = (1, 4, 4)  # one clip of 4x4 patches (an image)


def build(config, seed: int = 0):
    torch.manual_seed(seed)
    return build_decoder(config)


@pytest.fixture(scope="module")
def decoders():
    return {
        "image": build(ImageDecoderConfig.tiny()),
        "stacked": build(VideoDecoderConfig.tiny()),
        "unet3d": build(VideoDecoderConfig.tiny(unet3d=True, num_frames=4, size=16)),
    }


def highway_for(decoder, seed: int = 0, **config) -> VisualHighway:
    torch.manual_seed(seed)
    cfg = decoder.config
    layout = decoder.residual_shapes(cfg.height, cfg.width)
    return VisualHighway(HighwayConfig(hidden_channels=16, **config), PATCH_DIM, layout)


def perturb(highway: VisualHighway, seed: int = 1) -> VisualHighway:
    """Stand-in for training: give the zero-initialised output convs non-zero weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for conv in [*highway.down_convs, highway.mid_conv]:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.1)
    return highway


def patches(batch: int = 2, grid=GRID, seed: int = 0) -> torch.Tensor:
    t, h, w = grid
    return torch.randn(batch, t * h * w, PATCH_DIM, generator=torch.Generator().manual_seed(seed))


def media_for(decoder, batch: int = 2) -> torch.Tensor:
    cfg, g = decoder.config, torch.Generator().manual_seed(0)
    if decoder.modality == "image":
        return torch.rand(batch, 3, cfg.height, cfg.width, generator=g)
    return torch.rand(batch, cfg.num_frames, 3, cfg.height, cfg.width, generator=g)


def frames_arg(decoder) -> int | None:
    return decoder.config.num_frames if decoder.modality == "video" else None


def loss_and_sample(decoder, residuals):
    cond = decoder.encode_text(["a red circle", "a blue square"])
    g = torch.Generator().manual_seed(0)
    loss = decoder.denoising_loss(media_for(decoder), cond, residuals=residuals, generator=g)
    out = decoder.sample(
        cond, guidance_scale=3.0, num_inference_steps=2, residuals=residuals, generator=torch.Generator().manual_seed(0)
    )
    return loss, out


# ------------------------------------------------------------------------------------------------- layouts
def test_sd15_layout_on_meta():
    with torch.device("meta"):
        decoder = build_decoder(ImageDecoderConfig.sd15())
        layout = decoder.residual_shapes(512, 512)
        expected = (
            [(320, 64, 64)] * 3 + [(320, 32, 32)] + [(640, 32, 32)] * 2 + [(640, 16, 16)]
            + [(1280, 16, 16)] * 2 + [(1280, 8, 8)] * 3
        )  # fmt: skip
        assert list(layout.down) == expected and layout.mid == (1280, 8, 8)
        highway = VisualHighway(HighwayConfig(hidden_channels=320), 1280, layout)
        res = highway(torch.zeros(2, 256, 1280), (1, 16, 16))  # ViT-H/14 patch tokens of a 224px image
    assert [tuple(r.shape) for r in res.down] == [(2, *s) for s in expected]
    assert tuple(res.mid.shape) == (2, 1280, 8, 8)


def test_zeroscope_layout_is_per_frame_on_meta():
    with torch.device("meta"):
        layout = build_decoder(VideoDecoderConfig.zeroscope()).residual_shapes(320, 576)
    assert layout.frame_mode == "per_frame" and layout.down[0] == (320, 40, 72) and layout.mid == (1280, 5, 9)


@pytest.mark.parametrize("name, batch", [("image", 2), ("stacked", 2), ("unet3d", 2 * 4)])
def test_residuals_match_layout_and_the_unet(decoders, name, batch):
    decoder = decoders[name]
    highway = perturb(highway_for(decoder))
    res = highway(patches(), GRID, frames_arg(decoder))
    layout = highway.layout
    assert [tuple(r.shape) for r in res.down] == [(batch, *s) for s in layout.down]
    assert tuple(res.mid.shape) == (batch, *layout.mid)
    # the UNet accepts them (its own shape checks would fail otherwise) and gradients reach the highway
    cond = decoder.encode_text(["a", "b"])
    decoder.denoising_loss(media_for(decoder), cond, residuals=res).backward()
    assert all(p.grad is not None for p in highway.parameters())
    decoder.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------------------- no-op and effect
@pytest.mark.parametrize("name", ["image", "stacked", "unet3d"])
def test_zero_init_is_bit_identical_and_training_changes_output(decoders, name):
    decoder = decoders[name]
    highway = highway_for(decoder)
    with torch.no_grad():
        res = highway(patches(), GRID, frames_arg(decoder))
    plain_loss, plain_out = loss_and_sample(decoder, None)
    loss, out = loss_and_sample(decoder, res)
    assert torch.equal(loss, plain_loss) and torch.equal(out, plain_out)
    with torch.no_grad():
        trained = perturb(highway)(patches(), GRID, frames_arg(decoder))
    loss, out = loss_and_sample(decoder, trained)
    assert not torch.equal(loss, plain_loss) and not torch.equal(out, plain_out)


def test_strength_zero_is_a_no_op(decoders):
    decoder = decoders["image"]
    plain_loss, plain_out = loss_and_sample(decoder, None)
    off_by_config, off_by_call = perturb(highway_for(decoder, strength=0.0)), perturb(highway_for(decoder))
    for highway, strength in ((off_by_config, None), (off_by_call, 0.0)):
        with torch.no_grad():
            res = highway(patches(), GRID, strength=strength)
        loss, out = loss_and_sample(decoder, res)
        assert torch.equal(loss, plain_loss) and torch.equal(out, plain_out)
    # strength scales the residuals linearly
    highway = perturb(highway_for(decoder))
    with torch.no_grad():
        one, half = highway(patches(), GRID), highway(patches(), GRID, strength=0.5)
    torch.testing.assert_close(half.mid, one.mid * 0.5)


@pytest.mark.parametrize(
    "end, guided", [(1.0, [True] * 4), (0.5, [True, True, False, False]), (0.3, [True, False, False, False])]
)
def test_residuals_end_guides_only_the_noisiest_steps(decoders, monkeypatch, end, guided):
    decoder = decoders["image"]
    with torch.no_grad():
        res = perturb(highway_for(decoder))(patches(), GRID)
    seen, denoise = [], decoder._denoise

    def spy(x, t, cond, residuals):
        seen.append((int(t), residuals is not None))
        return denoise(x, t, cond, residuals)

    monkeypatch.setattr(decoder, "_denoise", spy)
    decoder.sample(decoder.encode_text(["a", "b"]), num_inference_steps=4, residuals=res, residuals_end=end)
    assert [on for _, on in seen] == guided
    assert [t for t, _ in seen] == sorted((t for t, _ in seen), reverse=True)  # noisiest first
    with pytest.raises(ValueError, match="residuals_end"):
        decoder.sample(decoder.encode_text(["a"]), num_inference_steps=1, residuals=res, residuals_end=0.0)
    with pytest.raises(ValueError, match="end must be"):
        HighwayConfig(end=1.5)


@pytest.mark.parametrize("name", ["image", "unet3d"])
def test_residuals_can_guide_the_conditional_half_of_guidance_only(decoders, monkeypatch, name):
    decoder = decoders[name]
    with torch.no_grad():
        res = perturb(highway_for(decoder))(patches(), GRID, frames_arg(decoder))
    seen, denoise = [], decoder._denoise

    def spy(x, t, cond, residuals):
        seen.append(residuals)
        return denoise(x, t, cond, residuals)

    monkeypatch.setattr(decoder, "_denoise", spy)
    cond = decoder.encode_text(["a", "b"])
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    both = decoder.sample(cond, guidance_scale=3.0, num_inference_steps=2, residuals=res, generator=g())
    assert all(torch.equal(r.mid, torch.cat([res.mid, res.mid])) for r in seen)
    seen.clear()
    conditional = decoder.sample(cond, guidance_scale=3.0, num_inference_steps=2, residuals=res, generator=g(),
                                 residuals_unconditional=False)
    half = len(res.mid)  # (uncond, cond) halves: zeros, then the residuals
    for r in seen:
        for got, want in zip([*r.down, r.mid], [*res.down, res.mid], strict=True):
            assert not got[:half].any() and torch.equal(got[half:], want)
    assert not torch.equal(both, conditional)
    # without guidance there is no unconditional half: the same sample either way
    plain = [decoder.sample(cond, guidance_scale=1.0, num_inference_steps=2, residuals=res, generator=g(),
                            residuals_unconditional=u) for u in (True, False)]
    assert torch.equal(*plain)


def test_end_per_output_modality():
    cfg = HighwayConfig(end={"image": 0.5, "video": 0.7})
    assert (cfg.end_for("image"), cfg.end_for("video")) == (0.5, 0.7)
    assert HighwayConfig(end={"image": 0.5}).end_for("video") == 1.0 and HighwayConfig(end=0.6).end_for("video") == 0.6
    assert HighwayConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="'audio' is not a visual output modality"):
        HighwayConfig(end={"audio": 0.5})
    with pytest.raises(ValueError, match="end must be in"):
        HighwayConfig(end={"video": 0.0})


# --------------------------------------------------------------------------------------- temporal choices
def test_video_input_guiding_an_image_uses_its_first_clip(decoders):
    highway = perturb(highway_for(decoders["image"]))
    video_tokens = patches(grid=(3, 4, 4))  # (B, 3 clips * 16 patches, C)
    with torch.no_grad():
        from_video = highway(video_tokens, (3, 4, 4))
        from_first_clip = highway(video_tokens[:, :16], (1, 4, 4))
    assert all(torch.equal(a, b) for a, b in zip(from_video.down, from_first_clip.down, strict=True))


def test_image_input_guiding_a_video_repeats_over_frames(decoders):
    per_frame = perturb(highway_for(decoders["unet3d"]))
    with torch.no_grad():
        res = per_frame(patches(), GRID, num_frames=4)  # (B*F, C, h, w)
    first = res.down[0].reshape(2, 4, *res.down[0].shape[1:])
    assert torch.equal(first, first[:, :1].expand_as(first))
    stacked = perturb(highway_for(decoders["stacked"]))
    with torch.no_grad():
        image_guided = stacked(patches(), GRID)
        still_video = stacked(patches().repeat(1, 2, 1), (2, 4, 4))  # two identical clips
    assert torch.equal(image_guided.mid, still_video.mid)


def test_video_clips_are_resampled_to_frames(decoders):
    highway = perturb(highway_for(decoders["unet3d"]))
    tokens = patches(grid=(2, 4, 4))
    with torch.no_grad():
        res = highway(tokens, (2, 4, 4), num_frames=4).mid.reshape(2, 4, -1)  # frames 0,1 <- clip 0; 2,3 <- clip 1
    assert torch.equal(res[:, 0], res[:, 1]) and torch.equal(res[:, 2], res[:, 3])
    assert not torch.equal(res[:, 1], res[:, 2])


# ----------------------------------------------------------------------------------------------- errors
def test_highway_errors(decoders):
    image_highway = highway_for(decoders["image"])
    with pytest.raises(ValueError, match="t\\*h\\*w"):
        image_highway(patches()[:, :15], GRID)
    with pytest.raises(ValueError, match="num_frames must be None"):
        image_highway(patches(), GRID, num_frames=4)
    with pytest.raises(ValueError, match="needs num_frames"):
        highway_for(decoders["unet3d"])(patches(), GRID)
    with pytest.raises(ValueError, match="8 frames"):
        highway_for(decoders["stacked"])(patches(), GRID, num_frames=4)
    with pytest.raises(ValueError, match="halves"):
        VisualHighway(HighwayConfig(), 8, ResidualLayout(((8, 32, 32), (8, 8, 8)), (8, 8, 8)))
    with pytest.raises(ValueError, match="num_frames is required"):
        ResidualLayout(((8, 8, 8),), (8, 8, 8), "stacked")
    with pytest.raises(ValueError, match="strength"):
        HighwayConfig(strength=-1.0)
    # residuals built for another decoder are refused with a clear message
    decoder = decoders["image"]
    cond = decoder.encode_text(["a", "b"])
    wrong = highway_for(decoders["stacked"])(patches(), GRID)
    with pytest.raises(ValueError, match="residual"):
        decoder.denoising_loss(media_for(decoder), cond, residuals=wrong)
    short = HighwayResiduals(wrong.down[:2], wrong.mid)
    with pytest.raises(ValueError, match="down residuals"):
        decoder.sample(cond, num_inference_steps=1, residuals=short)


def test_highway_config_round_trip():
    cfg = HighwayConfig(hidden_channels=32, blocks_per_level=2, strength=0.5, unpatchify=2, loss_timestep_power=2.0,
                        loss_draws=2, end=0.4, unconditional=False)
    assert HighwayConfig.from_dict(cfg.to_dict()) == cfg


def test_unpatchify_gives_each_token_its_own_block_of_cells(decoders):
    layout = ResidualLayout(down=((8, 8, 8), (8, 4, 4)), mid=(8, 4, 4))  # an 8x8 latent, as in xvila-tiny
    torch.manual_seed(0)
    plain = VisualHighway(HighwayConfig(hidden_channels=16), PATCH_DIM, layout)
    split = VisualHighway(HighwayConfig(hidden_channels=16, unpatchify=2), PATCH_DIM, layout)
    one_token = torch.zeros(1, 16, PATCH_DIM)
    one_token[0, 1 * 4 + 2] = torch.randn(PATCH_DIM)  # row 1, column 2 of the 4x4 grid
    with torch.no_grad():
        split.token_proj.bias.zero_()
        plain.token_proj.bias.zero_()
        cells = split.token_map(one_token, GRID, None)[0].abs().sum(0)  # (8, 8): no resize needed
        blurred = plain.token_map(one_token, GRID, None)[0].abs().sum(0)  # 4x4, then resized to 8x8
    assert cells[2:4, 4:6].min() > 0 and cells.sum() == cells[2:4, 4:6].sum()  # exactly the token's 2x2 block
    assert len(set(cells[2:4, 4:6].flatten().tolist())) == 4  # four different cells, not one value repeated
    assert (blurred > 0).sum() > 4  # one cell per token, then a bilinear resize: it spreads to the neighbours
    # any decoder resolution still works: the map is resized to it (here a 32x32 pixel-space UNet)
    res = perturb(highway_for(decoders["image"], unpatchify=2))(patches(), GRID)
    assert [tuple(r.shape[1:]) for r in res.down] == list(decoders["image"].residual_shapes(32, 32).down)
    with pytest.raises(ValueError, match="unpatchify"):
        HighwayConfig(unpatchify=0)


def drawn_timesteps(decoder, monkeypatch, batch: int = 512, **kwargs) -> torch.Tensor:
    """The timesteps one denoising_loss call draws (the call stops there)."""
    seen = []

    class Drawn(Exception):
        pass

    def add_noise(latents, noise, timesteps):
        seen.append(timesteps)
        raise Drawn

    monkeypatch.setattr(decoder.noise_scheduler, "add_noise", add_noise)
    cond = decoder.encode_text(["a red circle"]).expand(batch, -1, -1)
    with pytest.raises(Drawn):
        decoder.denoising_loss(media_for(decoder, batch), cond, generator=torch.Generator().manual_seed(0), **kwargs)
    return seen[0]


def test_timestep_power_favours_the_noisiest_steps(decoders, monkeypatch):
    decoder = decoders["image"]
    num_train = decoder.noise_scheduler.config.num_train_timesteps
    uniform = drawn_timesteps(decoder, monkeypatch)
    noisy = drawn_timesteps(decoder, monkeypatch, timestep_power=3.0)
    assert noisy.dtype == uniform.dtype and 0 <= noisy.min() and noisy.max() < num_train
    # p = 3: P(t > T/2) = 1 - 0.5**3 = 0.875, against 0.5 for uniform draws
    assert (noisy > num_train / 2).float().mean() > 0.8 > 0.6 > (uniform > num_train / 2).float().mean() > 0.4
    with pytest.raises(ValueError, match="timestep_power"):
        drawn_timesteps(decoder, monkeypatch, timestep_power=0.0)
    with pytest.raises(ValueError, match="loss_timestep_power"):
        HighwayConfig(loss_timestep_power=-1.0)
    with pytest.raises(ValueError, match="loss_draws"):
        HighwayConfig(loss_draws=0)
