"""Two CPU processes on gloo (torchrun) train like one process with the same global batch: DDP to float precision,
FSDP2 closely (it gives AdamW a zero gradient where DDP gives none, for parameters no process used in a step)."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from xvila.train.loop import train
from xvila.train.recipe import recipe_from_dict

STEPS = 3


def recipe_dict(out, **phase):
    return {
        "model": "tiny", "output_dir": str(out), "seed": 2,
        "phases": [{
            "name": "p", "steps": STEPS, "batch_size": 2, "schedule": {"kind": "constant"},
            "trainable": {"groups": {"input_projections": "full", "token_rows": "full", "output_projections": "full",
                                     "llm": "lora"}, "lora": {"rank": 4, "alpha": 8}},
            "losses": {"lm": 1.0, "align": 1.0, "denoise": 1.0},
            "data": {"source": "world:16", "tasks": {"image->text": 1, "audio->text": 1, "text->image": 1,
                                                     "text->audio": 1}},
            "optimizer": {"lr": 1e-3},
            **phase,
        }],
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(tmp_path, out, *arguments):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(out)))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "xvila.train.cli", str(path), *arguments, "--no-progress"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def curve(out):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["loss"], r["losses"]) for r in records if r["event"] == "step"]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process, micro-batch 2, two accumulation steps: a global batch of 4."""
    out = tmp_path_factory.mktemp("single") / "run"
    train(recipe_from_dict(recipe_dict(out, grad_accum=2)))
    return out


def assert_same_curves(a, b, rel):
    assert len(a) == len(b) == STEPS
    for (loss_a, parts_a), (loss_b, parts_b) in zip(a, b):
        assert loss_a == pytest.approx(loss_b, rel=rel)
        assert parts_a.keys() == parts_b.keys()
        for k in parts_a:
            assert parts_a[k] == pytest.approx(parts_b[k], rel=rel, abs=rel), k


def test_two_ddp_processes_match_one_process(single, tmp_path):
    out = tmp_path / "ddp"
    torchrun(tmp_path, out)  # micro-batch 2 on each of 2 processes: a global batch of 4
    assert_same_curves(curve(single), curve(out), rel=1e-5)
    for name in ("input_projections", "output_projections", "llm"):
        a, b = (load_file(str(d / "phase-p" / f"{name}.safetensors")) for d in (single, out))
        for k in a:
            # Adam turns float-noise differences of near-zero gradients into steps of up to lr: atol ~ lr * steps
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=2e-3 * STEPS)


def test_two_fsdp_processes_match_one_process(single, tmp_path):
    out = tmp_path / "fsdp"
    torchrun(tmp_path, out, "distributed.strategy=fsdp", "phases.0.checkpoint_every=2")
    assert_same_curves(curve(single), curve(out), rel=1e-2)
    a, b = (load_file(str(d / "phase-p" / "input_projections.safetensors")) for d in (single, out))
    for k in a:  # the exported model is whole (gathered from the shards)
        assert a[k].shape == b[k].shape
        torch.testing.assert_close(a[k], b[k], rtol=0.05, atol=2e-3 * STEPS)
    ckpt = out / "checkpoints" / "p" / "step-00000002"
    assert (ckpt / "optimizer-rank1.pt").is_file()  # sharded optimizer states, one file per process
    torchrun(tmp_path, out, "distributed.strategy=fsdp", "--resume", str(ckpt))  # sharded states, uneven shards
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = [r["loss"] for r in records if r["event"] == "step" and r["step"] == STEPS]
    assert len(last) == 2 and last[1] == pytest.approx(last[0], rel=1e-6)  # the resumed step equals the original
