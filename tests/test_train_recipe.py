"""Recipes: every YAML file under recipes/ loads against the dataclasses; overrides; validation; schedules."""

from pathlib import Path

import pytest
import torch

from xvila.train.config import DataSpec, FoundationConfig, PhaseConfig, RecipeConfig, ScheduleConfig
from xvila.train.loop import lr_factor
from xvila.train.recipe import RecipeError, apply_overrides, read_recipe
from xvila.trainability import TrainabilitySpec

TINY = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"
RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def test_there_are_recipes():
    assert {p.name for p in RECIPES} >= {"smoke.yaml"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_loads(path):
    recipe = read_recipe(path)
    assert isinstance(recipe, RecipeConfig) and recipe.phases
    assert RecipeConfig.from_dict(recipe.to_dict()) == recipe  # what runs write next to checkpoints reads back


def test_smoke_recipe_covers_every_phase_kind():
    recipe = read_recipe(RECIPES[[p.name for p in RECIPES].index("smoke.yaml")])
    assert [p.objective for p in recipe.phases] == ["foundation"] + ["xvila"] * 3 + ["projections", "xvila"]
    assert recipe.phases[2].losses.align == 0 and recipe.phases[5].losses.highway > 0
    assert all(p.steps <= 3 for p in recipe.phases)


def test_overrides_by_index_name_and_new_keys(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("""
phases:
  - name: a
    trainable: {groups: {input_projections: full}}
  - name: b
    trainable: {groups: {output_projections: full}}
""")
    recipe = read_recipe(path, ["seed=3", "phases.1.steps=5", "phases.a.optimizer.lr=3e-4",
                                "phases.b.trainable.groups.llm=lora", "phases.0.data.tasks={text->video: 2}",
                                "distributed.strategy=fsdp", "phases.-1.batch_size=7"])
    assert recipe.seed == 3 and recipe.distributed.strategy == "fsdp"
    assert recipe.phases[1].steps == 5 and recipe.phases[1].batch_size == 7
    assert recipe.phases[0].optimizer.lr == 3e-4
    assert recipe.phases[1].trainable.groups == {"output_projections": "full", "llm": "lora"}
    assert recipe.phases[0].data.tasks == {"text->video": 2}


@pytest.mark.parametrize("override, message", [
    ("phases.5.steps=1", "out of range"),
    ("phases.nope.steps=1", "no item named"),
    ("seed", "key=value"),
    ("phases.0.steps=0", "steps must be >= 1"),
    ("phases.0.stepz=3", "unknown field"),
    ("phases.0.trainable.groups.llm=half", "unknown mode"),
    ("phases.0.data.tasks={dance: 1}", "unknown data task"),
    ("phases.0.objective=foundation", "aligned clips"),
    ("phases.0.name.x=1", "is a value"),
    ("phases.0.steps=five", "phases.0.steps must be int"),
    ("seed={a: 1}", "seed must be int"),
])
def test_bad_overrides_say_what_is_wrong(tmp_path, override, message):
    path = tmp_path / "r.yaml"
    path.write_text("phases:\n  - {name: a, trainable: {groups: {input_projections: full}}}\n")
    with pytest.raises(RecipeError, match=message):
        read_recipe(path, [override])


def test_bad_files(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        read_recipe(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(RecipeError, match="mapping"):
        read_recipe(tmp_path / "list.yaml")
    (tmp_path / "bad.yaml").write_text("phases: [\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        read_recipe(tmp_path / "bad.yaml")


def test_an_override_changes_only_its_phase_where_phases_share_an_anchor(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("""
x-phase: &phase
  schedule: {kind: cosine, warmup_steps: 20}
  optimizer: {lr: 1.0e-3}
phases:
  - {<<: *phase, name: a, trainable: {groups: {input_projections: full}}}
  - {<<: *phase, name: b, trainable: {groups: {input_projections: full}}}
""")
    recipe = read_recipe(path, ["phases.a.schedule.warmup_steps=7", "phases.a.optimizer.lr=3e-3"])
    assert (recipe.phases[0].schedule.warmup_steps, recipe.phases[0].optimizer.lr) == (7, 3e-3)
    assert (recipe.phases[1].schedule.warmup_steps, recipe.phases[1].optimizer.lr) == (20, 1e-3)


def test_overrides_do_not_touch_the_input():
    data = {"phases": [{"name": "a"}]}
    apply_overrides(data, ["phases.0.steps=2"])
    assert data == {"phases": [{"name": "a"}]}


def test_phase_validation():
    spec = TrainabilitySpec({"input_projections": "full"})
    with pytest.raises(ValueError, match="nothing is trainable"):
        PhaseConfig(name="a", trainable=TrainabilitySpec({}))
    with pytest.raises(ValueError, match="phase name"):
        PhaseConfig(name="a b", trainable=spec)
    with pytest.raises(ValueError, match="cannot be mixed"):
        DataSpec(tasks={"clips": 1, "image->text": 1})
    with pytest.raises(ValueError, match="world:N"):
        DataSpec(source="world:x")
    with pytest.raises(ValueError, match="partial_captions must be in"):
        DataSpec(tasks={"clips": 1}, partial_captions=1.5)
    with pytest.raises(ValueError, match="task 'clips' only"):
        DataSpec(partial_captions=0.5)
    with pytest.raises(ValueError, match="unique"):
        RecipeConfig(phases=[PhaseConfig(name="a", trainable=spec)] * 2)
    with pytest.raises(ValueError, match="in a phase before the denoisers"):
        FoundationConfig(denoise=1.0, autoencode=1.0)
    with pytest.raises(ValueError, match="vae_inputs"):
        FoundationConfig(denoise=0.0, autoencode=1.0, vae_inputs=0)
    with pytest.raises(ValueError, match="posterior_cache"):
        FoundationConfig(posterior_cache=-1)
    with pytest.raises(ValueError, match="trainable groups|unknown component group"):
        TrainabilitySpec({"vae": "full"})
    with pytest.raises(ValueError, match="cannot use LoRA"):
        TrainabilitySpec({"vaes": "lora"})


def test_partial_captions_replace_a_share_of_clip_captions_with_true_partial_ones():
    from xvila.config import XVilaConfig
    from xvila.data.world import world_scene
    from xvila.model import XVilaModel
    from xvila.train.data import SampleStream, open_source
    from xvila.world import ATTRIBUTES, probe_text

    model, source = XVilaModel(XVilaConfig.tiny()), open_source("world:16")
    full = SampleStream(DataSpec(source="world:16", tasks={"clips": 1}), source, model, seed=3)
    spec = DataSpec(source="world:16", tasks={"clips": 1}, partial_captions=0.5)
    stream = SampleStream(spec, source, model, seed=3)
    partial = 0
    for i in range(64):
        caption, media, key = stream.sample(i)
        whole, media_whole, key_whole = full.sample(i)
        assert key == key_whole and all(torch.equal(media[m], media_whole[m]) for m in media)
        scene = world_scene(source.clip(stream.clip_index(i)))[0]
        read = probe_text(caption)
        named = [a for a in ATTRIBUTES if read[a] is not None]
        assert all(read[a] == getattr(scene, a) for a in named), caption
        partial += len(named) < len(ATTRIBUTES)
        assert caption == stream.sample(i)[0]  # a pure function of (seed, index)
    assert 20 <= partial <= 44  # about half of 64
    assert all(full.sample(i)[0] == source.clip(full.clip_index(i)).caption for i in range(16))


def test_world_clips_keep_each_rendered_clip_up_to_a_cap():
    from xvila.train.data import WorldClips

    clips = WorldClips("train", 24)
    assert clips.clip(3) is clips.clip(3)  # kept, not rendered again
    assert clips.clip.cache_info().maxsize == 24  # every scene of the source, not a fixed 8192
    assert WorldClips("train", 10**6).clip.cache_info().maxsize == WorldClips.MAX_KEPT


def test_schedules():
    cosine = ScheduleConfig(kind="cosine", warmup_steps=2, min_lr_ratio=0.1)
    factors = [lr_factor(cosine, 10, s) for s in range(11)]
    assert factors[:3] == [0.5, 1.0, 1.0]
    assert all(a >= b for a, b in zip(factors[2:], factors[3:]))  # decays after warm-up
    assert factors[-1] == pytest.approx(0.1)
    linear = ScheduleConfig(kind="linear", min_lr_ratio=0.0)
    assert [lr_factor(linear, 4, s) for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert lr_factor(ScheduleConfig(kind="constant"), 4, 3) == 1.0


def test_xvila_train_command_reports_user_errors_in_one_line(tmp_path, capsys):
    from xvila.cli import main

    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert main(["train", str(RECIPES[0]), "phases.0.steps=0"]) == 2
    assert main(["train"]) == 2  # neither a recipe nor --resume
    assert main(["train", str(RECIPES[0]), "--phase", "alignment", "phases.0.steps=0"]) == 2  # after the options
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("xvila: error:") for line in err)
    assert "not found" in err[0] and "steps must be >= 1" in err[1] and "--resume" in err[2]
    assert "steps must be >= 1" in err[3]
    with pytest.raises(SystemExit):
        main(["train", str(RECIPES[0]), "--phase", "alignment", "--bogus"])


def test_precision_auto_is_bf16_only_where_the_device_computes_it(monkeypatch):
    from xvila.train import distributed

    cpu = torch.device("cpu")
    for native, expected in ((False, "no"), (True, "bf16")):
        monkeypatch.setattr(distributed, "native_bf16", lambda device, native=native: native)
        assert distributed.resolve_precision("auto", cpu) == expected
        with distributed.autocast("auto", cpu):
            assert torch.is_autocast_enabled("cpu") == native
    assert distributed.resolve_precision("no", cpu) == "no" and distributed.resolve_precision("bf16", cpu) == "bf16"
    recipe = read_recipe(TINY, [])
    assert {p.precision for p in recipe.phases if p.name in ("alignment", "interleaved", "x2x-textual")} == {"auto"}
