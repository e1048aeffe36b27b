"""The decoders' ceiling benchmark runs on the tiny random model and scores media against their captions."""

import importlib.util
import json
from pathlib import Path

import torch

from xvila.evaluation import world_clips
from xvila.world import WorldConfig

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "decoder_ceiling.py"


def load_script():
    spec = importlib.util.spec_from_file_location("decoder_ceiling", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_accuracy_compares_the_probes_with_the_caption():
    bench = load_script()
    clips = world_clips("test", 3, WorldConfig())
    video = [c.tensors()["video"] for c in clips]
    assert bench.accuracy(torch.stack(video), [c.caption for c in clips], "video") == {
        "shape": 1.0, "colour": 1.0, "size": 1.0, "motion": 1.0}
    shifted = [clips[1].caption, clips[2].caption, clips[0].caption]  # each video against another scene's caption
    assert min(bench.accuracy(torch.stack(video), shifted, "video").values()) < 1.0


def test_decoder_ceiling_reports_each_modality(capsys):
    bench = load_script()
    results = bench.main(["--model", "tiny-random", "--n", "2", "--steps", "2", "--modalities", "image", "audio",
                          "--json"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == results
    assert set(results) == {"image", "audio"}
    for m, rows in results.items():
        assert rows["truth"] and all(v == 1.0 for v in rows["truth"].values()), m
        assert "vae reconstruction" not in rows  # the tiny random model's decoders have no VAE
        assert all(0.0 <= v <= 1.0 for v in rows["text->X from the true caption"].values())
