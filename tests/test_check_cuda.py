"""scripts/check_cuda.py runs only on a GPU; here: its recipe overrides, its loss comparison and its refusal without
a GPU."""

import pytest
import torch

from xvila.train.recipe import read_recipe


@pytest.fixture
def check_cuda(repo_script):
    return repo_script("scripts/check_cuda.py")


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_overrides_set_the_device_and_every_phase_precision(check_cuda, tmp_path, precision):
    recipe = read_recipe(check_cuda.SMOKE, check_cuda.smoke(tmp_path, "cuda", precision))
    assert recipe.device == "cuda" and recipe.output_dir == str(tmp_path)
    assert {p.precision for p in recipe.phases} == {precision}


def test_only_weight_and_data_determined_losses_are_compared(check_cuda):
    cpu = [{"phase": "foundation", "losses": {"contrastive/image-text": 1.0, "contrastive/video-audio": 1.0,
                                                "denoise/image": 1.0}},
           {"phase": "foundation", "losses": {"contrastive/image-text": 9.0}},  # not a first step
           {"phase": "alignment", "losses": {"lm": 2.0, "align/image": 1.0}}]
    gpu = [{"phase": "foundation", "losses": {"contrastive/image-text": 1.01, "contrastive/video-audio": 3.0,
                                                "denoise/image": 5.0}},
           {"phase": "foundation", "losses": {"contrastive/image-text": 1.0}},
           {"phase": "alignment", "losses": {"lm": 2.0, "align/image": 1.03}}]
    worst, where = check_cuda.max_relative_difference(cpu, gpu, check_cuda.DETERMINISTIC)
    assert worst == pytest.approx(0.03) and "align/image" in where
    worst, where = check_cuda.max_relative_difference(cpu, gpu, ("contrastive/image-text",))
    assert worst == pytest.approx(0.01) and "foundation" in where


def test_without_a_gpu_it_says_so(check_cuda, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("sys.argv", ["check_cuda.py"])
    assert check_cuda.main() == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_each_phase_alone_starts_from_the_cpu_runs_previous_phase(check_cuda, tmp_path, monkeypatch):
    calls = []

    def fake_train(recipe, phase=None, init=None, progress=False):
        calls.append((phase, init, recipe.output_dir, recipe.device))

    monkeypatch.setattr(check_cuda, "train", fake_train)
    monkeypatch.setattr(check_cuda, "steps_of", lambda out: [{"phase": out.name}])
    steps = check_cuda.run_phases_from(tmp_path / "cpu", tmp_path / "gpu", "cuda", "no")
    names = [p.name for p in read_recipe(check_cuda.SMOKE).phases]
    assert [c[0] for c in calls] == names and [s["phase"] for s in steps] == names
    assert [c[1] for c in calls] == [None] + [tmp_path / "cpu" / f"phase-{n}" for n in names[:-1]]
    assert {c[3] for c in calls} == {"cuda"} and calls[1][2] == str(tmp_path / "gpu" / names[1])
