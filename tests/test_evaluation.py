"""The evaluation: its judge must reward the truth and punish blanks; the whole run yields the promised keys."""

import json

import pytest
import torch

from xvila.cli import main
from xvila.config import XVilaConfig
from xvila.data.tasks import TaskSpec
from xvila.evaluation import (GENERATION_TASKS, EvalConfig, carried_attributes, judge, prompt_of, summarize,
                               world_clips)
from xvila.model import XVilaModel
from xvila.world import WorldConfig


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return XVilaModel(XVilaConfig.tiny()).eval()


def test_carried_attributes():
    assert carried_attributes("image->video") == ("shape", "colour", "size")  # an image shows no motion
    assert carried_attributes("audio->image") == ("shape", "colour", "size")
    assert carried_attributes("text->audio") == ("shape", "colour", "size", "motion")
    assert carried_attributes("image+audio->video") == ("shape", "colour", "size", "motion")


@pytest.mark.parametrize("task", GENERATION_TASKS)
def test_judge_rewards_ground_truth_and_rejects_blank(model, task):
    clip = world_clips("test", 3, WorldConfig())[2]
    _, answer = prompt_of(task, clip, TaskSpec.from_model(model), 0)
    truth = answer.media[0].data
    accuracy, align = judge(model, task, clip, truth, truth)
    assert accuracy == 1.0 and align == pytest.approx(1.0, abs=1e-5)
    blank = torch.zeros_like(truth) + (0.5 if truth.min() >= 0 else 0.0)
    accuracy, _ = judge(model, task, clip, blank, truth)
    assert accuracy == 0.0
    assert judge(model, task, clip, None, truth) == (0.0, 0.0)


def test_cli_eval_json_has_every_section(capsys):
    assert main(["eval", "--model", "tiny-random", "--n", "1", "--steps", "1", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert set(results) == {"generation", "understanding", "highway", "compositional", "chat"}
    assert set(results["generation"]) == set(GENERATION_TASKS)
    for r in results["generation"].values():
        assert 0 <= r["accuracy"] <= 1 and -1 <= r["alignment"] <= 1 and r["n"] == 1
        assert r["accuracy_se"] == r["alignment_se"] == 0.0  # one scene: no spread to measure
    assert set(results["understanding"]) == {"image->text", "video->text", "audio->text"}
    assert set(results["highway"]) == {"image->video", "video->image"}
    assert {"iou_with", "iou_with_se", "iou_without", "iou_without_se"} <= set(results["highway"]["image->video"])
    assert 0 <= results["compositional"]["accuracy"] <= 1 and "accuracy_se" in results["compositional"]
    assert results["compositional"]["n"] == len(GENERATION_TASKS)
    assert 0 <= results["chat"]["accuracy"] <= 1 and results["chat"]["n"] == len(results["chat"]["answers"]) == 10


def test_baseline_is_scored_on_the_same_scenes_and_compared_scene_by_scene(capsys):
    # the same random model twice (same seed): every paired difference must be exactly zero
    args = ["eval", "--model", "tiny-random", "--baseline", "tiny-random", "--n", "2", "--steps", "1"]
    assert main(args + ["--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert set(results["baseline"]) == set(results["versus_baseline"]) == set(GENERATION_TASKS)
    for task, r in results["baseline"].items():
        assert (r["accuracy"], r["alignment"]) == (results["generation"][task]["accuracy"],
                                                   results["generation"][task]["alignment"])
        gain = results["versus_baseline"][task]
        assert gain["accuracy"] == gain["alignment"] == gain["alignment_se"] == 0.0 and gain["n"] == 2
    assert main(args) == 0
    assert "vs baseline   image->video         accuracy +0.000 ± 0.000  alignment +0.000 ± 0.000  n=2" in (
        capsys.readouterr().out)


def test_summarize_gives_each_mean_its_standard_error_over_scenes():
    r = summarize([(1.0, 0.5), (0.0, 0.5), (1.0, 0.5), (1.0, 0.5)], ("accuracy", "alignment"))
    # accuracy: mean 0.75, sample std 0.5, over sqrt(4) scenes; alignment: no spread
    assert r == {"accuracy": 0.75, "accuracy_se": 0.25, "alignment": 0.5, "alignment_se": 0.0, "n": 4}
    assert summarize([0.3], ("iou",)) == {"iou": 0.3, "iou_se": 0.0, "n": 1}


def test_eval_config_rejects_zero():
    with pytest.raises(ValueError, match="n must be"):
        EvalConfig(n=0)


def test_cli_eval_runs_the_chosen_sections_on_the_chosen_scenes(capsys, monkeypatch):
    from xvila import cli
    from xvila.evaluation import SECTIONS, Evaluator

    assert cli.EVAL_SECTIONS == ",".join(SECTIONS)
    args = ["eval", "--model", "tiny-random", "--n", "2", "--start", "5", "--sections", "understanding"]
    assert main(args + ["--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert set(results) == {"understanding"} and results["understanding"]["image->text"]["n"] == 2
    assert main(args) == 0
    assert "understanding image->text" in " ".join(capsys.readouterr().out.split())
    # which scenes, and their prompts: scene 5 keeps its prompt and seed whatever window it is scored in
    seen = []

    def recording(self, clips):
        seen.append([(c.key, prompt_of("image->text", c, self.spec, self._seed(i))[0][0].text, self._seed(i))
                     for i, c in enumerate(clips)])
        return {}

    monkeypatch.setattr(Evaluator, "understanding", recording)
    for start, n in ((5, 2), (4, 3)):
        assert main(["eval", "--model", "tiny-random", "--n", str(n), "--start", str(start), "--sections",
                     "understanding", "--json"]) == 0
    assert [key for key, _, _ in seen[0]] == [c.key for c in world_clips("test", 7, WorldConfig())[5:]]
    assert seen[0] == seen[1][1:]
    capsys.readouterr()
    for bad, why in ((["--sections", "understanding,speed"], "sections must be"), (["--start", "-1"], "start"),
                     (["--sections", "highway", "--baseline", "tiny-random"], "generation")):
        assert main(["eval", "--model", "tiny-random", "--n", "1", *bad]) == 2
        err = capsys.readouterr().err
        assert why in err and len(err.strip().splitlines()) == 1
