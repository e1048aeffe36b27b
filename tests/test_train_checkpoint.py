"""Checkpoints and faults: SIGKILL mid-run then resume, atomic writes under a crash, NaN/inf handling."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from xvila.train import checkpoint as ckpt_io
from xvila.train import objectives
from xvila.train.cli import run_cli
from xvila.train.loop import NonFiniteLossError, TrainingError, train
from xvila.train.recipe import recipe_from_dict


def recipe_dict(out, **phase):
    return {
        "model": "tiny", "output_dir": str(out), "seed": 1,
        "phases": [{
            "name": "align", "steps": 4, "batch_size": 2, "checkpoint_every": 1, "keep_checkpoints": 100,
            "schedule": {"kind": "cosine", "warmup_steps": 1},
            "trainable": {"groups": {"input_projections": "full", "token_rows": "full", "output_projections": "full"}},
            "losses": {"lm": 1.0, "align": 1.0, "denoise": 0.0},  # no UNet: cheap
            "data": {"source": "world:8", "tasks": {"image->text": 1.0, "text->image": 1.0}, "modalities": ["image"]},
            "optimizer": {"lr": 1e-3, "weight_decay": 0.01},
            **phase,
        }],
    }


def steps_of(out):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records if r["event"] == "step"}


def assert_complete(ckpt):
    state = ckpt_io.read_state(ckpt)
    weights = load_file(str(ckpt / ckpt_io.WEIGHTS_FILE))
    assert sorted(weights) == state["trainable"]
    torch.load(ckpt / ckpt_io.OPTIMIZER_FILE, weights_only=True)
    torch.load(ckpt / "rng-rank0.pt", weights_only=False)


def test_resume_after_sigkill_loses_at_most_one_interval_and_continues_exactly(tmp_path):
    steps, every = 9, 2
    ref = tmp_path / "ref"
    denoise = {"lm": 1.0, "align": 1.0, "denoise": 1.0}  # diffusion noise must continue exactly too
    train(recipe_from_dict(recipe_dict(ref, steps=steps, checkpoint_every=every, losses=denoise)))
    reference = steps_of(ref)

    killed = tmp_path / "killed"
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(killed, steps=steps, checkpoint_every=every, losses=denoise)))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "xvila.train.cli", str(path), "--no-progress"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if (killed / "metrics.jsonl").exists() and max(steps_of(killed), default=0) >= 4:
                break
            time.sleep(0.01)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    last_logged = max(steps_of(killed))
    assert last_logged < steps and not (killed / "phase-align").exists()
    done = ckpt_io.list_checkpoints(killed / "checkpoints" / "align")
    for ckpt in done:  # whatever the instant of the kill, every checkpoint under a final name is whole
        assert_complete(ckpt)
    latest = ckpt_io.read_state(done[-1])["step"]
    assert latest >= last_logged - every  # at most one checkpoint interval is lost

    assert run_cli(["--resume", str(killed), "--no-progress"]) == 0  # the run's own recipe.json
    resumed = steps_of(killed)
    for step in range(latest + 1, steps + 1):  # the same steps, the same numbers as the uninterrupted run
        assert resumed[step]["loss"] == pytest.approx(reference[step]["loss"], rel=1e-5, abs=1e-6), step
    final, expected = (load_file(str(d / "phase-align" / "input_projections.safetensors")) for d in (killed, ref))
    for k in expected:
        torch.testing.assert_close(final[k], expected[k], rtol=1e-5, atol=1e-6)
    assert not [p for p in (killed / "checkpoints" / "align").iterdir() if p.name.startswith(ckpt_io.TMP_PREFIX)]


def test_a_crash_while_writing_leaves_the_older_checkpoints_whole(tmp_path, monkeypatch):
    save_file = ckpt_io.save_file
    calls = []

    def crashing(tensors, filename):
        calls.append(filename)
        if len(calls) == 2:  # the second checkpoint dies half way through its weights file
            with open(filename, "wb") as f:
                f.write(b"half a file")
            raise OSError("disk on fire")
        save_file(tensors, filename)

    monkeypatch.setattr(ckpt_io, "save_file", crashing)
    out = tmp_path / "run"
    with pytest.raises(OSError, match="disk on fire"):
        train(recipe_from_dict(recipe_dict(out, steps=4)))
    folder = out / "checkpoints" / "align"
    assert [p.name for p in ckpt_io.list_checkpoints(folder)] == ["step-00000001"]
    assert_complete(folder / "step-00000001")
    assert not (folder / "step-00000002").exists()  # only the temporary folder holds the half file
    assert (folder / ".tmp-step-00000002").exists()

    monkeypatch.setattr(ckpt_io, "save_file", save_file)
    summaries = train(recipe_from_dict(recipe_dict(out, steps=4)), resume=out)
    assert summaries[0].steps == 3  # resumed after step 1
    assert not (folder / ".tmp-step-00000002").exists()  # the leftover is cleaned up


def poison_second_call(monkeypatch):
    forward = objectives.XVilaObjective.forward
    calls = []

    def poisoned(self, batch):
        out = forward(self, batch)
        calls.append(1)
        if len(calls) == 2:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(objectives.XVilaObjective, "forward", poisoned)


def test_nonfinite_loss_stops_without_a_poisoned_checkpoint(tmp_path, monkeypatch):
    poison_second_call(monkeypatch)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match="step 2.*not finite.*nonfinite: skip"):
        train(recipe_from_dict(recipe_dict(out, steps=4)))
    assert [p.name for p in ckpt_io.list_checkpoints(out / "checkpoints" / "align")] == ["step-00000001"]
    assert not (out / "phase-align").exists()


def test_nonfinite_loss_can_skip_the_step(tmp_path, monkeypatch):
    poison_second_call(monkeypatch)
    out = tmp_path / "run"
    (summary,) = train(recipe_from_dict(recipe_dict(out, steps=3, nonfinite="skip")))
    assert summary.skipped_steps == 1 and steps_of(out)[2]["skipped"]
    weights = load_file(str(out / "phase-align" / "output_projections.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_a_fresh_run_refuses_a_used_output_dir_and_one_phase_can_rerun(tmp_path):
    out = tmp_path / "run"
    train(recipe_from_dict(recipe_dict(out, steps=1)))
    with pytest.raises(TrainingError, match="already holds a run"):
        train(recipe_from_dict(recipe_dict(out, steps=1)))
    (summary,) = train(recipe_from_dict(recipe_dict(out, steps=2)), phase="align")  # rerun that phase in place
    assert summary.final_step == 2
    assert json.loads((out / "phase-align" / "train_summary.json").read_text())["final_step"] == 2


def test_rng_state_round_trip():
    state = ckpt_io.rng_state()
    a = (torch.rand(3), __import__("random").random(), __import__("numpy").random.rand())
    ckpt_io.set_rng_state(state)
    b = (torch.rand(3), __import__("random").random(), __import__("numpy").random.rand())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


def test_atomic_write_replaces_whole_files_only(tmp_path):
    target = tmp_path / "f.txt"
    ckpt_io.atomic_write_text(target, "one")

    def broken(tmp):
        open(tmp, "w").write("half")
        raise OSError("crash")

    with pytest.raises(OSError):
        ckpt_io.atomic_write(target, broken)
    assert target.read_text() == "one" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]
