"""Parts that ship in PyPI packages (SmolLM2, MiniLM): decoders conditioned on MiniLM, saving a model without those
parts and loading them back from the packages; plus the EMA and conditioning dropout that train the decoders."""

import json

import pytest
import torch
from safetensors.torch import load_file

from xvila.config import XVilaConfig
from xvila.decoders import ImageDecoderConfig, build_decoder, use_minilm
from xvila.decoders.sentence import load_minilm
from xvila.llm import LLMConfig
from xvila.model import XVilaModel
from xvila.train.config import FoundationConfig
from xvila.train.ema import EMA
from xvila.trainability import TrainabilitySpec, apply_trainability


def test_minilm_conditioning_is_one_unit_rms_vector_and_shared():
    a = build_decoder(use_minilm(ImageDecoderConfig.tiny()))
    b = build_decoder(use_minilm(ImageDecoderConfig.tiny()))
    assert a.text_encoder is b.text_encoder  # one frozen copy per process
    assert a.cond_shape == (1, 384) and a.unet.config.cross_attention_dim == 384
    cond = a.encode_text(["a small red circle moving left", "a huge blue star sitting still", ""])
    assert cond.shape == (3, 1, 384)
    torch.testing.assert_close(cond.pow(2).mean(-1).sqrt(), torch.ones(3, 1))
    # padding must not change a caption's embedding (the mean is over real tokens only)
    short = a.encode_text(["a red circle"])
    torch.testing.assert_close(short, a.encode_text(["a red circle", "a much longer caption " * 4])[:1])
    # meaning, not wording: a paraphrase lands nearer than a caption that changes the colour and shape
    para = a.encode_text(["a tiny scarlet circle drifting to the left"])
    other = a.encode_text(["a large green triangle rising"])
    assert (cond[0] * para[0]).sum() > (cond[0] * other[0]).sum()


def test_minilm_config_is_checked():
    config = use_minilm(ImageDecoderConfig.tiny())
    with pytest.raises(ValueError, match="minilm_architecture"):
        config.replace(text_encoder={**config.text_encoder, "hidden_size": 64})
    with pytest.raises(ValueError, match="text_encoder_source"):
        config.replace(text_encoder_source="bert")


@pytest.fixture(scope="module")
def embedded_model():
    torch.manual_seed(0)
    model = XVilaModel(XVilaConfig.embedded())
    model.load_decoders()
    apply_trainability(model, TrainabilitySpec.from_dict(
        {"groups": {"llm": "lora", "token_rows": "full", "decoders": "full"}, "lora": {"rank": 4, "alpha": 8}}))
    with torch.no_grad():  # as if trained: the additions are no longer at their initial values
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.01)
    return model


def test_saved_model_leaves_out_shipped_weights_and_round_trips(embedded_model, tmp_path):
    embedded_model.save_pretrained(tmp_path)
    llm_keys = set(load_file(str(tmp_path / "llm.safetensors")))
    assert llm_keys and all("lora_" in k or k.endswith("new_rows") for k in llm_keys)
    assert not any(k.startswith("text_encoder.") for k in load_file(str(tmp_path / "decoder-image.safetensors")))
    assert not (tmp_path / "tokenizer-image").exists()  # MiniLM's tokenizer comes with its package
    loaded = XVilaModel.from_pretrained(tmp_path)
    loaded.load_decoders()
    want, got = embedded_model.state_dict(), loaded.state_dict()
    assert set(want) == set(got)
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_float16_save_halves_the_files_and_loads_close(embedded_model, tmp_path):
    embedded_model.save_pretrained(tmp_path / "fp32")
    embedded_model.save_pretrained(tmp_path / "fp16", dtype=torch.float16)
    size = {d: sum(f.stat().st_size for f in (tmp_path / d).glob("*.safetensors")) for d in ("fp32", "fp16")}
    assert size["fp16"] < 0.55 * size["fp32"]
    loaded = XVilaModel.from_pretrained(tmp_path / "fp16")
    loaded.load_decoders()
    for k, v in embedded_model.state_dict().items():
        got = loaded.state_dict()[k]
        assert got.dtype == v.dtype
        torch.testing.assert_close(got, v, rtol=1e-3, atol=1e-4)


def test_float16_save_also_casts_decoders_copied_unbuilt(embedded_model, tmp_path):
    """A loaded model whose decoders were never built copies their files: with dtype, cast, not copied as fp32."""
    embedded_model.save_pretrained(tmp_path / "fp32")
    unbuilt = XVilaModel.from_pretrained(tmp_path / "fp32")
    assert not unbuilt.decoders
    unbuilt.save_pretrained(tmp_path / "fp16", dtype=torch.float16)
    for name in ("decoder-image.safetensors", "decoder-audio.safetensors"):
        tensors = load_file(str(tmp_path / "fp16" / name))
        assert {v.dtype for v in tensors.values() if v.is_floating_point()} == {torch.float16}, name
    loaded = XVilaModel.from_pretrained(tmp_path / "fp16")
    loaded.load_decoders()
    for k, v in embedded_model.decoders["image"].state_dict().items():
        torch.testing.assert_close(loaded.decoders["image"].state_dict()[k], v, rtol=1e-3, atol=1e-4)


def test_saving_refuses_a_changed_shipped_llm(tmp_path):
    model = XVilaModel(XVilaConfig.tiny().replace(llm=LLMConfig.smollm2()))
    with torch.no_grad():
        model.llm.model.layers[0].mlp.up_proj.weight[0, 0] += 1.0  # as if the llm group had trained "full"
    with pytest.raises(ValueError, match="pretrained weights changed"):
        model.save_pretrained(tmp_path)


def test_ema_averages_and_resumes():
    p = torch.nn.Parameter(torch.zeros(3))
    ema = EMA({"p": p}, decay=0.5)
    values = []
    for step in range(1, 5):
        with torch.no_grad():
            p.fill_(float(step))
        ema.update()
        values.append(ema.shadow[0][0].item())
    # decay warms up as min(0.5, (1 + n) / (10 + n)): 2/11, 3/12, 4/13, 5/14
    expected, s = [], 0.0
    for n, v in enumerate((1.0, 2.0, 3.0, 4.0), start=1):
        d = min(0.5, (1 + n) / (10 + n))
        s = d * s + (1 - d) * v
        expected.append(s)
    assert values == pytest.approx(expected)
    other = EMA({"p": p}, decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 4 and torch.equal(other.shadow[0], ema.shadow[0])
    ema.copy_to_params()
    assert p.detach().tolist() == pytest.approx([expected[-1]] * 3)


def test_phase_saves_the_ema_weights(tmp_path):
    from xvila.train.cli import run_cli

    base = ["recipes/smoke.yaml", "phases.0.steps=3", "phases.0.foundation.contrastive=0", "--phase", "foundation",
            "--no-progress"]
    assert run_cli([base[0], f"output_dir={tmp_path / 'raw'}", *base[1:]]) == 0
    assert run_cli([base[0], f"output_dir={tmp_path / 'ema'}", "phases.0.ema_decay=0.9", *base[1:]]) == 0
    losses = {}
    for run in ("raw", "ema"):
        records = [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        losses[run] = [r["loss"] for r in records if r["event"] == "step"]
    assert losses["raw"] == losses["ema"]  # the average never feeds back into training
    raw = load_file(str(tmp_path / "raw" / "phase-foundation" / "decoder-image.safetensors"))
    ema = load_file(str(tmp_path / "ema" / "phase-foundation" / "decoder-image.safetensors"))
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)


def test_conditioning_dropout_blanks_some_captions(monkeypatch):
    from xvila.train.data import ClipBatch
    from xvila.train.objectives import FoundationObjective

    torch.manual_seed(0)
    model = XVilaModel(XVilaConfig.tiny())
    seen = []
    decoder = model.decoder("image")
    monkeypatch.setattr(decoder, "denoising_loss", lambda media, cond, **kw: seen.append(cond) or cond.sum() * 0)
    captions = [f"caption {i}" for i in range(64)]
    batch = ClipBatch(media={"image": torch.rand(64, 3, 32, 32)}, captions=captions)
    for dropout in (0.0, 0.25):
        objective = FoundationObjective(model, FoundationConfig(contrastive=0.0, cond_dropout=dropout), ("image",))
        objective.train()
        objective(batch)
    with torch.no_grad():
        null, clean = decoder.encode_text([""]), decoder.encode_text(captions)
    is_blank = [(cond - null).flatten(1).norm(dim=1) < 1e-4 for cond in seen]
    assert is_blank[0].sum() == 0 and 4 <= is_blank[1].sum() <= 32
    kept = ~is_blank[1]
    torch.testing.assert_close(seen[1][kept], clean[kept])


def test_conditioning_mix_and_noise_move_captioned_rows_only(monkeypatch):
    from xvila.train.data import ClipBatch
    from xvila.train.objectives import FoundationObjective

    torch.manual_seed(0)
    model = XVilaModel(XVilaConfig.tiny())
    decoder = model.decoder("image")
    seen = {}
    monkeypatch.setattr(decoder, "denoising_loss", lambda media, cond, **kw: seen.setdefault("cond", cond).sum() * 0)
    captions = [f"caption {i}" for i in range(8)]
    batch = ClipBatch(media={"image": torch.rand(8, 3, 32, 32)}, captions=captions)
    clean = decoder.encode_text(captions)
    for mix, noise in ((0.0, 0.0), (0.3, 0.0), (0.0, 0.5)):
        seen.clear()
        config = FoundationConfig(contrastive=0.0, cond_dropout=0.0, cond_mix=mix, cond_noise=noise)
        objective = FoundationObjective(model, config, ("image",))
        objective.train()
        objective(batch)
        moved = (seen["cond"] - clean).flatten(1).norm(dim=1)  # (8,)
        if mix == noise == 0:
            assert torch.equal(seen["cond"], clean)
        elif mix:  # towards other rows, by less than half the way to the farthest one
            others = torch.cdist(clean.flatten(1), clean.flatten(1)).amax(dim=1)
            assert (moved > 0).all() and (moved < 0.5 * others).all()
            a, b = clean.flatten(1).double(), seen["cond"].flatten(1).double()
            inside = torch.linalg.lstsq(a.T, b.T).solution.T @ a  # b's part in the span of the captions' rows
            assert (b - inside).norm() < 1e-4 * b.norm()  # a mix of captions, no noise
        else:
            assert moved.mean() == pytest.approx(0.5 * clean[0].numel() ** 0.5, rel=0.2)
        objective.eval()  # evaluation losses see the captions as they are
        seen.clear()
        objective(batch)
        assert torch.equal(seen["cond"], clean)
    blanked = ClipBatch(media=batch.media, captions=[""] * 4 + captions[4:])
    seen.clear()
    objective = FoundationObjective(model, FoundationConfig(contrastive=0.0, cond_dropout=0.0, cond_mix=0.3,
                                                            cond_noise=0.5), ("image",))
    objective.train()
    objective(blanked)
    torch.testing.assert_close(seen["cond"][:4], decoder.encode_text([""] * 4))
    with pytest.raises(ValueError, match="cond_mix"):
        FoundationConfig(cond_mix=0.5)
    with pytest.raises(ValueError, match="cond_noise"):
        FoundationConfig(cond_noise=-1.0)


def test_autoencode_names_a_decoder_without_a_vae():
    from xvila.train.objectives import FoundationObjective

    model = XVilaModel(XVilaConfig.tiny())  # pixel-space decoders
    with pytest.raises(ValueError, match="the image decoder has none"):
        FoundationObjective(model, FoundationConfig(contrastive=0.0, denoise=0.0, autoencode=1.0), ("image",))


def test_decoders_sharing_minilm_encode_the_captions_once(embedded_model, monkeypatch):
    from xvila.train.data import ClipBatch
    from xvila.train.objectives import FoundationObjective

    calls = []
    for m, decoder in embedded_model.decoders.items():
        encode = decoder.encode_text
        monkeypatch.setattr(decoder, "encode_text", lambda texts, m=m, encode=encode: calls.append(m) or encode(texts))
    objective = FoundationObjective(embedded_model, FoundationConfig(contrastive=0.0), ("image", "video", "audio"))
    media = {m: torch.rand(2, *embedded_model.output_shape(m)) for m in ("image", "video", "audio")}
    out = objective(ClipBatch(media=media, captions=["a red circle", "a blue star"]))
    assert len(calls) == 1 and {"denoise/image", "denoise/video", "denoise/audio"} <= set(out.losses)


def test_foundation_encodes_each_caption_once(embedded_model, monkeypatch):
    from xvila.train import objectives
    from xvila.train.data import ClipBatch
    from xvila.train.objectives import FoundationObjective

    decoder = embedded_model.decoder("image")
    seen, conds = [], []
    encode = decoder.encode_text
    monkeypatch.setattr(decoder, "encode_text", lambda texts: seen.append(list(texts)) or encode(texts))
    monkeypatch.setattr(decoder, "denoising_loss", lambda media, cond, **kw: conds.append(cond) or cond.sum() * 0)
    objective = FoundationObjective(embedded_model, FoundationConfig(contrastive=0.0, cond_dropout=0.0), ("image",))
    media = {"image": torch.rand(3, *embedded_model.output_shape("image"))}
    objective(ClipBatch(media, ["a red circle", "a blue star", "a red circle"]))
    objective(ClipBatch(media, ["a blue star", "a green square", "a red circle"]))
    assert seen == [["a red circle", "a blue star"], ["a green square"]]  # each distinct caption once
    with torch.no_grad():
        truth = encode(["a blue star", "a green square", "a red circle"])
    torch.testing.assert_close(conds[1], truth)
    # past the memory limit captions are still embedded, just not kept
    monkeypatch.setattr(objectives, "CAPTION_MEMO_BYTES", 0)
    seen.clear()
    full = FoundationObjective(embedded_model, FoundationConfig(contrastive=0.0, cond_dropout=0.0), ("image",))
    for _ in range(2):
        full(ClipBatch(media, ["a red circle", "a blue star", "a red circle"]))
    assert seen == [["a red circle", "a blue star"]] * 2 and not any(full._caption_memo.values())


def test_foundation_passes_its_timestep_settings_to_the_decoders(monkeypatch):
    from xvila.train.data import ClipBatch
    from xvila.train.objectives import FoundationObjective

    model = XVilaModel(XVilaConfig.tiny())
    seen = []
    decoder = model.decoder("image")
    monkeypatch.setattr(decoder, "denoising_loss", lambda media, cond, **kw: seen.append(kw) or cond.sum() * 0)
    batch = ClipBatch(media={"image": torch.rand(2, 3, 32, 32)}, captions=["a", "b"])
    FoundationObjective(model, FoundationConfig(contrastive=0.0), ("image",))(batch)
    config = FoundationConfig(contrastive=0.0, timestep_power=2.0, min_snr_gamma=5.0)
    FoundationObjective(model, config, ("image",))(batch)
    assert [(kw["timestep_power"], kw["min_snr_gamma"]) for kw in seen] == [(1.0, None), (2.0, 5.0)]
    with pytest.raises(ValueError, match="min_snr_gamma"):
        FoundationConfig(min_snr_gamma=0.0)
    with pytest.raises(ValueError, match="timestep_power"):
        FoundationConfig(timestep_power=-1.0)


def test_foundation_keeps_the_vae_posteriors_of_clips_it_has_seen(embedded_model, monkeypatch):
    from xvila.train.data import ClipBatch
    from xvila.train.objectives import FoundationObjective

    modalities = ("image", "video")
    encoded = []
    for m in modalities:
        vae = embedded_model.decoder(m).vae
        monkeypatch.setattr(vae, "encode", lambda x, m=m, f=vae.encode: encoded.append((m, x.shape[0])) or f(x))
    g = torch.Generator().manual_seed(0)
    media = {m: torch.rand(2, *embedded_model.output_shape(m), generator=g) for m in ("image", "video", "audio")}
    captions = ["a red circle", "a blue star"]
    config = FoundationConfig(contrastive=0.0, cond_dropout=0.0, posterior_cache=3)
    kept = FoundationObjective(embedded_model, config, modalities)
    kept(ClipBatch(media, captions, keys=["a", "b"]))
    assert [m for m, _ in encoded] == ["image", "video"]
    torch.manual_seed(1)
    again = kept(ClipBatch(media, captions, keys=["a", "b"])).losses
    assert len(encoded) == 2  # both clips were kept: no VAE ran
    torch.manual_seed(1)
    plain = FoundationObjective(embedded_model, config.replace(posterior_cache=0), modalities)(
        ClipBatch(media, captions, keys=["a", "b"])).losses
    assert len(encoded) == 4
    for name in ("denoise/image", "denoise/video"):
        torch.testing.assert_close(again[name], plain[name])  # the same loss as running the VAE

    kept(ClipBatch(media, captions, keys=["c", "d"]))  # at most 3 clips are kept: c, not d
    assert sorted(kept._posteriors["image"]) == sorted(kept._posteriors["video"]) == ["a", "b", "c"]
    encoded.clear()
    kept(ClipBatch(media, captions, keys=["c", "d"]))
    frames = embedded_model.output_shape("video")[0]
    assert encoded == [("image", 1), ("video", frames)]  # only d's media went through the VAEs
