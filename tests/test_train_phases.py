"""The smoke recipe end to end through the CLI function: every phase runs 2 steps, changes exactly the parameters of
its trainable groups, keeps frozen parts out of the optimizer and unused decoders out of memory, and reports."""

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

from xvila.config import XVilaConfig
from xvila.model import XVilaModel
from xvila.train import loop
from xvila.train.cli import run_cli
from xvila.train.loop import derive_seed, seed_everything
from xvila.train.recipe import read_recipe
from xvila.trainability import group_parameters

SMOKE = Path(__file__).resolve().parents[1] / "recipes" / "smoke.yaml"


def recording_optimizer(record):
    """``loop.build_optimizer`` that also calls ``record(model, ids of the parameters the optimizer holds)``."""
    build_optimizer = loop.build_optimizer

    def recording(model, config, **kwargs):
        optimizer = build_optimizer(model, config, **kwargs)
        record(model, {id(p) for g in optimizer.param_groups for p in g["params"]})
        return optimizer

    return recording


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """Run recipes/smoke.yaml once; record, per phase, the decoders built and the optimizer's parameters."""
    out = tmp_path_factory.mktemp("smoke") / "run"
    seen = []

    def record(model, in_optimizer):
        seen.append({"decoders": sorted(model.decoders),
                     "frozen_in_optimizer": [n for n, p in model.named_parameters()
                                             if id(p) in in_optimizer and not p.requires_grad],
                     "trainable_missing": [n for n, p in model.named_parameters()
                                           if p.requires_grad and id(p) not in in_optimizer]})

    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout):
        mp.setattr(loop, "build_optimizer", recording_optimizer(record))
        rc = run_cli([str(SMOKE), f"output_dir={out}", "--no-progress"])
    return {"rc": rc, "out": out, "recipe": read_recipe(SMOKE, [f"output_dir={out}"]), "seen": seen,
            "stdout": stdout.getvalue()}


def test_smoke_runs_every_phase_and_reports(smoke):
    assert smoke["rc"] == 0
    out, recipe = smoke["out"], smoke["recipe"]
    lines = smoke["stdout"].splitlines()  # one line per phase as it ends, then the total
    assert [line.split(":")[0] for line in lines[:-1]] == [f"phase {p.name}" for p in recipe.phases]
    assert all(" steps (to step " in line and " s setting up)" in line for line in lines[:-1])
    assert lines[-1].startswith(f"xvila train: {len(recipe.phases)} phases in ") and str(out) in lines[-1]
    for phase in recipe.phases:
        summary = json.loads((out / f"phase-{phase.name}" / "train_summary.json").read_text())
        assert summary["steps"] == phase.steps and summary["samples_per_s"] > 0 and summary["final_losses"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["event"] == "step"]
    assert len(steps) == sum(p.steps for p in recipe.phases)
    for r in steps:
        assert {"loss", "losses", "lr", "grad_norm", "samples_per_s"} <= set(r) and r["lr"]
    assert [r["phase"] for r in records if r["event"] == "summary"] == [p.name for p in recipe.phases]
    foundation = next(r for r in steps if r["phase"] == "foundation")
    assert {"contrastive/image-text", "contrastive/video-audio", "denoise/image", "denoise/audio"} <= set(
        foundation["losses"])
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


def test_frozen_parts_stay_out_of_the_optimizer_and_unused_decoders_out_of_memory(smoke):
    assert len(smoke["seen"]) == len(smoke["recipe"].phases)
    for phase, seen in zip(smoke["recipe"].phases, smoke["seen"]):
        assert seen["frozen_in_optimizer"] == [] and seen["trainable_missing"] == [], phase.name
    by_name = {p.name: s["decoders"] for p, s in zip(smoke["recipe"].phases, smoke["seen"])}
    assert by_name["interleaved"] == []  # lm loss only: no decoder is ever built
    assert by_name["foundation"] == ["audio", "image", "video"]


def start_model(smoke, index):
    recipe = smoke["recipe"]
    if index == 0:  # the seeded tiny model the loop builds
        seed_everything(derive_seed(recipe.seed, 0))
        model = XVilaModel(XVilaConfig.tiny())
    else:
        model = XVilaModel.from_pretrained(smoke["out"] / f"phase-{recipe.phases[index - 1].name}")
    model.load_decoders()
    return model


@pytest.mark.parametrize("index", range(6))
def test_each_phase_changes_exactly_its_trainable_groups(smoke, index):
    phase = smoke["recipe"].phases[index]
    before = dict(start_model(smoke, index).named_parameters())
    after_model = XVilaModel.from_pretrained(smoke["out"] / f"phase-{phase.name}")
    after_model.load_decoders()
    group_of = {n: g for g, named in group_parameters(after_model).items() for n, _ in named}
    changed_groups = set()
    for name, param in after_model.named_parameters():
        old = before.get(name.replace(".base_layer.", "."), before.get(name))  # LoRA wraps its base layer
        if old is None:  # LoRA adapters injected by this phase
            assert "lora_" in name and phase.trainable.mode(group_of[name]) == "lora", name
            if "lora_B" in name and param.abs().sum() > 0:  # B starts at zero
                changed_groups.add(group_of[name])
            continue
        changed = not torch.equal(param, old)
        group = group_of.get(name)  # None: a decoder's VAE / text encoder / vocoder, always frozen
        mode = phase.trainable.mode(group) if group else "frozen"
        trainable = mode == "full" or (mode == "lora" and "lora_" in name)
        if changed:
            assert trainable, f"phase {phase.name}: frozen parameter {name} ({group}) changed"
            changed_groups.add(group)
    assert changed_groups == {g for g, m in phase.trainable.groups.items() if m != "frozen"}, phase.name


def test_bf16_activation_checkpointing_accumulation_and_eval(tmp_path):
    """The speed and memory options run together and stay finite; eval reads held-out batches."""
    from xvila.train.loop import train

    recipe = read_recipe(SMOKE, [f"output_dir={tmp_path}", "phases.interleaved.precision=bf16",
                                 "phases.interleaved.activation_checkpointing=true", "phases.interleaved.grad_accum=2",
                                 "phases.interleaved.eval_every=1", "phases.interleaved.eval_batches=1"])
    (summary,) = train(recipe, phase="interleaved", init=_tiny_dir(tmp_path))
    assert summary.final_step == 2 and all(v == v for v in summary.final_losses.values())
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["event"] == "eval"]
    assert [r["step"] for r in evals] == [1, 2] and all(r["losses"]["loss"] > 0 for r in evals)


def _tiny_dir(tmp_path):
    seed_everything(0)
    XVilaModel(XVilaConfig.tiny()).save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


def test_feature_cache_gives_the_same_losses(tmp_path):
    """data.cache_features attaches frozen-encoder features and caption embeddings: same numbers, fewer passes."""
    from test_train_checkpoint import recipe_dict, steps_of

    from xvila.train.loop import train
    from xvila.train.recipe import recipe_from_dict

    runs = {}
    for name, cached in (("plain", False), ("cached", True)):
        data = {"source": "world:8", "tasks": {"image->text": 1.0, "text->image": 1.0}, "modalities": ["image"],
                "cache_features": cached}
        train(recipe_from_dict(recipe_dict(tmp_path / name, steps=2, checkpoint_every=0, data=data)))
        runs[name] = steps_of(tmp_path / name)
    for step in (1, 2):
        assert runs["cached"][step]["loss"] == pytest.approx(runs["plain"][step]["loss"], rel=1e-5)
    assert list((tmp_path / "cached" / "feature-cache").rglob("*.safetensors"))


def run_one_phase(tmp_path, config: XVilaConfig, phase: dict, run: str = "run") -> tuple[list[str], list[dict]]:
    """Run a one-phase recipe on ``config`` through the CLI; returns the names of the parameters its optimizer held
    and its step records from metrics.jsonl. The output lands in ``tmp_path / run``."""
    import yaml

    recipe = tmp_path / f"{run}.yaml"
    recipe.write_text(yaml.safe_dump({"model": config.to_dict(), "output_dir": str(tmp_path / run),
                                      "phases": [phase]}))
    trained_names = []

    def record(model, in_optimizer):
        trained_names.extend(n for n, p in model.named_parameters() if id(p) in in_optimizer)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop, "build_optimizer", recording_optimizer(record))
        assert run_cli([str(recipe), "--no-progress"]) == 0
    records = [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
    return trained_names, [r for r in records if r["event"] == "step"]


def test_foundation_with_pairs_and_words_runs_each_encoder_tower_once_a_step():
    """The contrastive loss and the word loss read the same encoder outputs: one pass per modality and step."""
    from collections import Counter

    from xvila.train.config import FoundationConfig
    from xvila.train.data import ClipBatch
    from xvila.train.objectives import FoundationObjective

    config = XVilaConfig.tiny()
    model = XVilaModel(config.replace(input_projection=config.input_projection.replace(vocabulary_scale=20.0)))
    objective = FoundationObjective(model, FoundationConfig(contrastive=1.0, denoise=0.0, words=1.0), ())
    calls = []
    forward = model.encoder.forward
    model.encoder.forward = lambda m, *args, **kwargs: (calls.append(m), forward(m, *args, **kwargs))[1]
    media = {m: torch.randn(4, *model.input_shape(m)) for m in ("image", "video", "audio")}
    out = objective(ClipBatch(media, ["a red circle moves left"] * 4))
    assert {"contrastive", "words/image", "words/video", "words/audio"} <= set(out.losses)
    counts = Counter(calls)
    assert {"image", "video", "audio"} <= set(counts) and max(counts.values()) == 1, counts


def test_vae_phase_trains_only_the_vaes_and_saves_their_latent_statistics(tmp_path):
    """A foundation phase with ``autoencode``: the VAEs learn (the UNets do not), and each VAE's per-channel latent
    statistics land in the saved config, so the next phase's denoisers and a reloaded model use them."""
    from xvila.config import DecodersConfig
    from xvila.decoders import AudioDecoderConfig, ImageDecoderConfig, VideoDecoderConfig

    config = XVilaConfig.tiny()
    config = config.replace(decoders=DecodersConfig(ImageDecoderConfig.tiny(with_vae=True),
                                                    VideoDecoderConfig.tiny(with_vae=True),
                                                    AudioDecoderConfig.tiny(with_vae=True)))
    phase = {"name": "vaes", "objective": "foundation", "steps": 2, "batch_size": 2, "log_every": 1,
             "foundation": {"contrastive": 0.0, "denoise": 0.0, "autoencode": 1.0, "vae_inputs": 3},
             "trainable": {"groups": {"vaes": "full"}}, "data": {"source": "world:16", "tasks": {"clips": 1.0}}}
    trained_names, steps = run_one_phase(tmp_path, config, phase)
    assert trained_names and {n.split(".")[2] for n in trained_names} == {"vae"}  # decoders.<m>.vae.*
    assert {n.split(".")[1] for n in trained_names} == {"image", "video", "audio"}
    out = tmp_path / "run" / "phase-vaes"
    losses = steps[0]["losses"]
    assert {"autoencode/image", "autoencode/video", "autoencode/audio"} <= set(losses)
    trained = XVilaModel.from_pretrained(out)
    saved = json.loads((out / "config.json").read_text())
    for m in ("image", "video", "audio"):
        vae = trained.decoder(m).vae
        assert saved["decoders"][m]["vae"]["latents_mean"] == list(vae.config.latents_mean)
        assert len(vae.config.latents_std) == vae.config.latent_channels


def test_words_phase_trains_only_the_input_projections_and_lowers_the_word_loss(tmp_path):
    """A foundation phase with ``words``: no LLM pass; the input projections alone learn to name each caption's
    words through the LLM's word table; it needs projections that mix words."""
    config = XVilaConfig.tiny()
    config = config.replace(input_projection=config.input_projection.replace(vocabulary_scale=20.0))
    phase = {"name": "words", "objective": "foundation", "steps": 12, "batch_size": 8, "log_every": 1,
             "foundation": {"contrastive": 0.0, "denoise": 0.0, "words": 1.0},
             "optimizer": {"lr": 1.0e-2}, "schedule": {"kind": "constant"},
             "trainable": {"groups": {"input_projections": "full"}},
             "data": {"source": "world:8", "tasks": {"clips": 1.0}}}
    trained_names, steps = run_one_phase(tmp_path, config, phase)
    assert trained_names and {n.split(".")[0] for n in trained_names} == {"input_projections"}
    assert {"words", "words/image", "words/video", "words/audio"} <= set(steps[0]["losses"])
    # 8 clips, seen again and again: the projections learn to name their words
    assert steps[-1]["losses"]["words"] < 0.8 * steps[0]["losses"]["words"]

    with pytest.raises(ValueError, match="vocabulary_scale"):  # plain vectors: nothing to name words with
        run_one_phase(tmp_path, XVilaConfig.tiny(), {**phase, "name": "plain"}, run="run2")


def test_a_phase_closes_the_clip_sources_no_later_phase_reads(tmp_path, monkeypatch):
    """The encoders' many rendered scenes must not stay in memory through the phases that read other sources."""
    from xvila.train import data

    overrides = [f"output_dir={tmp_path / 'run'}", 'phases.foundation.data.source="world:12"',
                 'phases.alignment.data.source="world:10"']
    recipe = read_recipe(SMOKE, overrides)
    open_at_start = []

    def fake_phase(recipe, index, *args, **kwargs):
        open_at_start.append(set(data._OPEN_SOURCES))
        for name in data.sources_of(recipe.phases[index].data):
            data.open_source(name)
        return None

    monkeypatch.setattr(loop, "run_phase", fake_phase)
    data.release_sources()
    loop.train(recipe)
    names = [p.name for p in recipe.phases]
    assert open_at_start[1] == open_at_start[2] == set()  # world:12, then world:10: no later phase reads them
    assert open_at_start[3] == {"world:16", "world:val:16"}  # read by phase 2 and the phases after it
    for k in range(1, len(names)):  # everything still open is read by this phase or a later one
        later = {s for p in recipe.phases[k:] for s in data.sources_of(p.data)}
        assert open_at_start[k] <= later
    assert not data._OPEN_SOURCES  # the last phase closes them all
    assert data.open_source("world:4") is data.open_source("world:4")  # opened once, shared
    assert data.release_sources() == ["world:4"]
