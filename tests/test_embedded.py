"""The committed embedded model (xvila-tiny): it loads offline by default, stays small, understands and generates
toy-world scenes, and its SmolLM2 still answers ordinary questions."""

import json

import pytest
import torch

from xvila.cli import DEFAULT_MODEL, main
from xvila.config import XVilaConfig
from xvila.conversation import MediaItem, Message
from xvila.data.chat import ask_probes
from xvila.data.world import sample_clip, world_scene
from xvila.embedded import EMBEDDED_NAME, embedded_dir, load_embedded
from xvila.generation import GenerationConfig
from xvila.world import WorldConfig, split_sample
from xvila.world.probes import mask_iou, probe_text, shape_mask


@pytest.fixture(scope="module")
def model():
    return load_embedded()


def test_embedded_is_the_default_small_and_complete():
    assert DEFAULT_MODEL == EMBEDDED_NAME
    folder = embedded_dir()
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size <= 40 * 2**20, f"{size / 2**20:.1f} MiB"
    assert (folder / "MODEL_CARD.md").is_file()
    saved = XVilaConfig.load(folder / "config.json").to_dict()
    measured = ("latents_mean", "latents_std", "scaling_factor", "shift_factor")  # set by the `vaes` phase
    for decoder in saved["decoders"].values():
        assert decoder["vae"]["latents_mean"] is not None  # the denoisers were trained on calibrated latents
        for key in measured:
            decoder["vae"].pop(key)
    library = XVilaConfig.embedded().to_dict()
    for decoder in library["decoders"].values():
        for key in measured:
            decoder["vae"].pop(key, None)
    assert saved == library  # the card's architecture is the library's


def test_answers_ordinary_questions(model):
    """Ten held-out questions (none in the chat rehearsal): SmolLM2 must still answer them, without media."""
    results = ask_probes(model)
    assert not any(r["media"] for r in results)
    sensible = [r["question"] for r in results if r["sensible"]]
    # measured when committed: 8 of 10 (the model card lists the answers; the base SmolLM2: 10)
    assert len(sensible) >= 7, [(r["question"], r["answer"]) for r in results if not r["sensible"]]


def test_reads_test_scenes_better_than_chance(model):
    """A regression guard, not the target: the model card reports the measured understanding (eval, n=10)."""
    world = WorldConfig()
    questions = {"colour": "What colour is it?", "shape": "What shape is it?", "size": "Is it big or small?"}
    right = 0
    for i in range(8):
        clip = sample_clip(split_sample("test", i, world), "test", i, world)
        scene = world_scene(clip)[0]
        for modality in ("image", "audio"):
            for attribute, question in questions.items():
                answer = model.generate([Message("user", question, [MediaItem(modality, clip.tensors()[modality])])],
                                        GenerationConfig(max_new_tokens=12, decode_media=False))
                right += probe_text(answer.text)[attribute] == getattr(scene, attribute)
    # chance: 2 * (8/6 + 8/5 + 8/2) = 13.9 of 48; measured when committed: 43 (image 20, audio 23)
    assert right >= 36


def test_highway_carries_the_shape_position_into_the_image(model):
    """A regression guard: the model card reports the highway's measured IoU gain (eval, n=10)."""
    world, ious = WorldConfig(), {True: [], False: []}
    for i in range(3):
        clip = sample_clip(split_sample("test", i, world), "test", i, world)
        video = clip.tensors()["video"]
        for on in (True, False):
            answer = model.generate([Message("user", "Show me one frame of this video as a picture.",
                                             [MediaItem("video", video)])],
                                    GenerationConfig(outputs=("image",), seed=i, highway=on, max_new_tokens=16))
            image = next(m.data for m in answer.media if m.modality == "image")
            ious[on].append(mask_iou(shape_mask(video[0]), shape_mask(image)))
    # measured when committed: mean IoU 0.843 with the highway, 0.295 without
    assert sum(ious[True]) / 3 > sum(ious[False]) / 3 + 0.05, ious


def test_outputs_are_exactly_the_ones_asked_for(model):
    """Asked for video and audio, the model once added an image as well ("Here is the image. ...")."""
    answer = model.generate([Message("user", "Show me a red circle moving left, with its sound.")],
                            GenerationConfig(outputs=("video", "audio"), decode_media=False))
    assert sorted(m.modality for m in answer.media) == ["audio", "video"]


def test_cli_generate_uses_the_embedded_model(tmp_path, capsys):
    rc = main(["generate", "--prompt", "Make a video of a red circle moving left, with its sound.", "--outputs",
               "video,audio", "--out", str(tmp_path), "--json"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert sorted(f["modality"] for f in result["files"]) == ["audio", "video"]
    assert all((tmp_path / f["path"].split("/")[-1]).stat().st_size > 0 for f in result["files"])


def test_missing_embedded_weights_is_a_one_line_error(monkeypatch, tmp_path, capsys):
    import xvila.embedded

    monkeypatch.setattr(xvila.embedded, "embedded_dir", lambda: tmp_path / "nowhere")
    assert main(["generate", "--prompt", "hi", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "embedded model is missing" in err[0]


def test_loads_without_touching_the_network(monkeypatch):
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("network access while loading the embedded model")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    assert load_embedded() is not None
    assert torch.get_default_dtype() == torch.float32
