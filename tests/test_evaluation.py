"""The evaluation: its judge must reward the truth and punish blanks; the whole run yields the promised keys."""

import json

import pytest
import torch

from xvila.cli import main
from xvila.config import XVilaConfig
from xvila.data.tasks import TaskSpec
from xvila.evaluation import (GENERATION_TASKS, EvalConfig, carried_attributes, judge, prompt_of, world_clips)
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
    assert set(results["understanding"]) == {"image->text", "video->text", "audio->text"}
    assert set(results["highway"]) == {"image->video", "video->image"}
    assert {"iou_with", "iou_without"} <= set(results["highway"]["image->video"])
    assert 0 <= results["compositional"]["accuracy"] <= 1
    assert 0 <= results["chat"]["accuracy"] <= 1 and results["chat"]["n"] == len(results["chat"]["answers"]) == 10


def test_eval_config_rejects_zero():
    with pytest.raises(ValueError, match="n must be"):
        EvalConfig(n=0)
