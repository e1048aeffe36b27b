"""X-to-X conversations: every task builds valid, deterministic conversations; edits change exactly one attribute;
stored media are fitted to the model; the tiny model trains on a batch of each phase."""

import re

import numpy as np
import pytest
import torch

from xvila.config import XVilaConfig
from xvila.conversation import collate, gen_run_text
from xvila.data.loader import Loader
from xvila.data.records import AlignedClip, read_clips
from xvila.data.tasks import (
    TASKS,
    TASKS_BY_PHASE,
    Dialogue,
    TaskSpec,
    build_sample,
    check_mixture,
    fit_media,
    phase_mixture,
)
from xvila.data.world import world_scene, write_world
from xvila.losses import LossWeights
from xvila.model import XVilaModel
from xvila.splice import IGNORE_INDEX
from xvila.world import ATTRIBUTES, probe_audio, probe_image, probe_video, split_allowed

RUN = re.compile(r"\[(IMG|VID|AUD)0\](?:\[\1\d+\])*")
PREFIX = {"IMG": "image", "VID": "video", "AUD": "audio"}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return XVilaModel(XVilaConfig.tiny())


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    write_world(out, 12, shard_size=5, samples=0)
    return list(read_clips(out))


@pytest.fixture(scope="module")
def spec(model):
    chat = (("Hi there?", "Hello."), ("What is 2 plus 2?", "4."))  # the chat task's pairs (the base LLM's answers)
    return TaskSpec.from_model(model, follow_ups=2).replace(chat=chat)


def window(clips, i):
    """Clip i with the earlier clips of its group."""
    c = clips[i]
    return [x for x in clips if x.group == c.group and x.index < c.index] + [c]


def real_clip(key, group="", index=0, size=40, frames=12, samples=20000):
    """A clip of a 'real' corpus: no toy-world meta, stored at other sizes than the model's."""
    rng = np.random.default_rng(abs(hash(key)) % 2**32)
    return AlignedClip(key, f"someone talks about {key}", rng.integers(0, 255, (size, size + 8, 3), dtype=np.uint8),
                       rng.integers(0, 255, (frames, size, size + 8, 3), dtype=np.uint8),
                       rng.integers(-9000, 9000, samples).astype(np.int16), group=group, index=index,
                       meta={"source_file": "x.mp4"})


def check_conversation(sample, model, spec):
    msgs = sample.messages
    assert msgs and [m.role for m in msgs] == ["user", "assistant"] * (len(msgs) // 2)
    for m in msgs:
        if m.role == "user":
            for item in m.media:
                assert tuple(item.data.shape) == model.input_shape(item.modality)
                assert item.caption is None
                assert item.key is None or re.fullmatch(r"[\w-]+/(image|video|audio)", item.key)
        else:
            runs = [(PREFIX[r.group(1)], r.group(0)) for r in RUN.finditer(m.text)]
            assert [modality for modality, _ in runs] == [i.modality for i in m.media], m.text
            for (modality, run), item in zip(runs, m.media):
                assert run == gen_run_text(modality, spec.gen_tokens[modality])
                assert tuple(item.data.shape) == model.output_shape(modality)
                assert isinstance(item.caption, str) and item.caption


def test_every_task_builds_valid_conversations(model, clips, spec):
    template = model.config.llm.template
    built = set()
    for name, task in TASKS.items():
        for i in range(len(clips)):
            w = window(clips, i)
            if not task.applies(w, spec):
                continue
            sample = build_sample(name, w, np.random.default_rng(i), spec)
            assert sample.task == name and sample.clip_keys[-1] == clips[i].key
            check_conversation(sample, model, spec)
            batch = collate([sample.messages], model.tokenizer, template)
            # labels: exactly the answers' tokens (with the stop suffix), nothing of the prompts
            expected = [t for m in sample.messages if m.role == "assistant"
                        for t in model.tokenizer(m.text + template.assistant_suffix,
                                                 add_special_tokens=False).input_ids]
            assert batch.labels[batch.labels != IGNORE_INDEX].tolist() == expected
            targets = [it for m in sample.messages if m.role == "assistant" for it in m.media]
            for m in {it.modality for it in targets}:
                assert batch.targets[m].captions == [it.caption for it in targets if it.modality == m]
            built.add(name)
    assert built == set(TASKS)


def test_conversations_are_deterministic_and_varied(clips, spec):
    w = window(clips, 7)
    for name in ("edit", "interleaved", "image+audio->video", "video-qa"):
        a = build_sample(name, w, np.random.default_rng(5), spec)
        b = build_sample(name, w, np.random.default_rng(5), spec)
        assert [m.text for m in a.messages] == [m.text for m in b.messages]
        for ma, mb in zip(a.messages, b.messages):
            assert all(torch.equal(x.data, y.data) for x, y in zip(ma.media, mb.media))
    prompts = {build_sample("video->audio", w, np.random.default_rng(s), spec).messages[0].text for s in range(60)}
    answers = {build_sample("text->video", w, np.random.default_rng(s), spec).messages[1].text for s in range(60)}
    assert len(prompts) >= 6 and len(answers) >= 5


def test_keys_name_stored_items_and_not_rerendered_ones(clips, spec):
    sample = build_sample("edit", window(clips, 2), np.random.default_rng(0), spec)
    user, answer = sample.messages[:2]
    assert user.media[0].key == f"{clips[2].key}/{user.media[0].modality}"
    assert answer.media[0].key is None  # re-rendered: never cached


@pytest.mark.parametrize("modality", ["image", "video", "audio"])
def test_edits_keep_position_and_change_exactly_the_named_attribute(clips, spec, modality):
    probe = {"image": probe_image, "video": probe_video, "audio": probe_audio}[modality]
    carried = {"image": ("shape", "colour", "size"), "video": ATTRIBUTES, "audio": ATTRIBUTES}[modality]
    seen = set()
    for i, clip in enumerate(clips):
        scene, config, split = world_scene(clip)
        d = Dialogue(clip, np.random.default_rng(100 + i), spec)
        before = probe(clip.tensors()[modality], config)
        attribute, value = d.edit(modality, given=True)
        seen.add(attribute)
        target = d.messages[-1].media[0]
        after = probe(target.data, config)
        assert after[attribute] == value != before[attribute]
        for other in set(carried) - {attribute}:
            assert after[other] == before[other] == getattr(scene, other), (other, attribute)
        if modality != "audio":
            assert np.hypot(*np.subtract(after["position"], before["position"])) < 0.03
        assert (d.scene.x, d.scene.y, d.scene.rotation) == (scene.x, scene.y, scene.rotation)
        assert (d.scene.shape, d.scene.colour) in split_allowed(split, config)  # never a held-out pair
        assert target.caption == d.caption and target.caption != clip.caption
    assert len(seen) >= 2


def test_fit_media_resizes_stored_media():
    image = torch.rand(3, 48, 64)
    assert fit_media("image", image, (3, 32, 32)).shape == (3, 32, 32)
    flat = torch.full((3, 50, 70), 0.25)
    torch.testing.assert_close(fit_media("image", flat, (3, 32, 32)), torch.full((3, 32, 32), 0.25))
    video = torch.arange(16.0)[:, None, None, None].expand(16, 3, 8, 8) / 16
    out = fit_media("video", video, (8, 3, 4, 4))
    assert out.shape == (8, 3, 4, 4)
    assert out[:, 0, 0, 0].tolist() == pytest.approx([(2 * i + 1) / 16 for i in range(8)])  # segment centres
    assert fit_media("video", video[:3], (6, 3, 8, 8)).shape == (6, 3, 8, 8)  # short clips repeat frames
    audio = torch.linspace(-1, 1, 100)
    assert torch.equal(fit_media("audio", audio, (60,)), audio[:60])
    padded = fit_media("audio", audio, (130,))
    assert padded.shape == (130,) and torch.equal(padded[100:], torch.zeros(30))
    assert fit_media("image", image, None) is image


def test_real_corpus_clips_get_every_general_task_at_the_models_sizes(model, spec):
    group = [real_clip(f"v1-{i}", group="v1", index=i) for i in range(3)]
    for name, task in TASKS.items():
        applies = task.applies(group, spec)
        assert applies == (not task.world_only), name
        if applies:
            check_conversation(build_sample(name, group, np.random.default_rng(1), spec), model, spec)
    lone = [real_clip("solo")]
    assert not TASKS["interleaved"].applies(lone, spec)
    with pytest.raises(ValueError, match="does not apply"):
        build_sample("edit", lone, np.random.default_rng(0), spec)


def test_mixtures_and_spec_errors(spec):
    assert set(phase_mixture(3)) == set(TASKS_BY_PHASE[3])
    assert sum(check_mixture({"edit": 2, "text->video": 2}, spec).values()) == pytest.approx(1)
    with pytest.raises(ValueError, match="unknown task"):
        check_mixture({"video->smell": 1}, spec)
    images_only = spec.replace(gen_tokens={"image": 4})
    with pytest.raises(ValueError, match="needs \\['audio'\\] output"):
        check_mixture({"text->audio": 1}, images_only)
    with pytest.raises(ValueError, match="unknown modality"):
        TaskSpec(gen_tokens={"smell": 2})
    every = {n for p in TASKS_BY_PHASE.values() for n in p}
    assert every | {"chat"} == set(TASKS)  # chat: rehearsal any phase may add (it needs the base LLM's answers)
    for name in ("video->image", "image->video", "video->audio", "audio->video", "image->audio", "audio->image",
                 "image+audio->video", "text->video", "image->text", "interleaved", "edit"):
        assert name in TASKS


@pytest.mark.parametrize("phase", [1, 2, 3])
def test_the_tiny_model_trains_on_a_batch_of_each_phase(model, clips, phase):
    loader = Loader.from_model(model, clips, phase=phase, batch_size=4, seed=phase)
    batch = next(iter(loader))
    assert batch.input_ids.shape[0] == 4
    weights = LossWeights(lm=1, align=1, denoise=1, highway=1)
    out = model(batch, weights)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    model.zero_grad(set_to_none=True)


def test_generation_answers_describe_the_subject_before_the_runs(clips, spec):
    """The output projections read the runs' hidden states: the description must come before them to be read."""
    from xvila.world.captions import COLOUR_WORDS

    colours = {w for words in COLOUR_WORDS.values() for w in words}
    checked = 0
    for name in ("text->image", "image->video", "audio->image", "image->video+audio", "edit"):
        for i in range(len(clips)):
            w = window(clips, i)
            if not TASKS[name].applies(w, spec):
                continue
            sample = build_sample(name, w, np.random.default_rng(i), spec)
            for message in sample.messages:
                if message.role == "assistant" and message.media:
                    before = message.text[: RUN.search(message.text).start()].lower()
                    assert colours & set(re.findall(r"[a-z]+", before)), (name, message.text)
                    checked += 1
    assert checked >= 10
