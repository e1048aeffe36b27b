"""Toy-world datasets (deterministic shards, splits) and ``xvila data world / probe / show / build`` end to end."""

import json

import numpy as np
import pytest

from xvila.cli import main
from xvila.data.records import AlignedClip, ShardWriter, read_clips, read_manifest
from xvila.data.world import world_scene, write_world
from xvila.world import WorldConfig, split_allowed


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "world"
    assert main(["data", "world", "--n", "20", "--out", str(out), "--shard-size", "8", "--samples", "2"]) == 0
    return out


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_world_shards_are_deterministic(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_world(a, 7, shard_size=3, samples=1)
    write_world(b, 7, shard_size=3, samples=0)
    names = sorted(p.name for p in a.glob("shard-*.tar"))
    assert names == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    for name in names + ["manifest.json"]:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    manifest = read_manifest(a)
    assert manifest["info"]["split"] == "train" and manifest["info"]["world_config"] == WorldConfig().to_dict()
    clip = next(read_clips(a))
    scene, config, split = world_scene(clip)
    assert clip.key == "train-000000" and split == "train" and config == WorldConfig()
    assert set(clip.meta["scene"]) >= {"shape", "colour", "size", "motion", "x", "y"}
    assert clip.caption and clip.image.shape == (32, 32, 3) and clip.video.shape == (8, 32, 32, 3)
    with pytest.raises(FileExistsError, match="already holds"):
        write_world(a, 2)


def test_splits_hold_out_attribute_combinations_and_seeds(tmp_path):
    config = WorldConfig()
    held_out = set(config.held_out_pairs)
    write_world(tmp_path / "train", 80, samples=0)
    write_world(tmp_path / "comp", 12, split="compositional", samples=0)
    write_world(tmp_path / "val", 5, split="val", samples=0)
    train = [world_scene(c) for c in read_clips(tmp_path / "train")]
    assert not {(s.shape, s.colour) for s, _, _ in train} & held_out
    assert len({(s.shape, s.colour) for s, _, _ in train}) > 10
    comp = [world_scene(c)[0] for c in read_clips(tmp_path / "comp")]
    assert {(s.shape, s.colour) for s in comp} <= held_out == split_allowed("compositional", config)
    seeds = {name: {c.meta["seed"] for c in read_clips(tmp_path / name)} for name in ("train", "comp", "val")}
    lo, hi = config.seed_range("val")
    assert all(lo <= s < hi for s in seeds["val"]) and not seeds["val"] & seeds["train"]
    assert [c.meta["split"] for c in read_clips(tmp_path / "val")] == ["val"] * 5


def test_world_command_writes_shards_and_browsable_samples(world_dir):
    manifest = read_manifest(world_dir)
    assert manifest["num_clips"] == 20 and [s["count"] for s in manifest["shards"]] == [8, 8, 4]
    files = sorted(p.name for p in (world_dir / "samples").iterdir())
    assert files == ["captions.txt", "train-000000.mp4", "train-000000.png", "train-000000.wav",
                     "train-000001.mp4", "train-000001.png", "train-000001.wav"]
    assert (world_dir / "samples" / "train-000000.mp4").stat().st_size > 1000


def test_probe_reports_every_attribute_above_99_percent(world_dir, capsys):
    code, out, _ = run(capsys, "data", "probe", str(world_dir))
    assert code == 0
    report = json.loads(out)
    assert report["clips"] == 20
    for view in ("image", "video", "audio", "text"):
        assert report["accuracy"][view], view
        for attribute, accuracy in report["accuracy"][view].items():
            assert accuracy >= 0.99, (view, attribute)
    assert set(report["accuracy"]["video"]) == {"shape", "colour", "size", "motion", "position"}
    code, out, _ = run(capsys, "data", "probe", str(world_dir), "--n", "3")
    assert json.loads(out)["clips"] == 3


def test_show_counts_tasks_per_phase_with_examples(world_dir, capsys):
    code, out, _ = run(capsys, "data", "show", str(world_dir), "--json")
    assert code == 0
    report = json.loads(out)
    assert set(report["phases"]) == {"1", "2", "3"}
    assert sum(report["phases"]["1"]["tasks"].values()) == 20
    assert report["phases"]["2"]["tasks"] == {"interleaved": 15}  # the first clip of each group has no context
    assert report["phases"]["3"]["turns"] > 1
    assert all(p["examples"] for p in report["phases"].values())
    code, out, _ = run(capsys, "data", "show", str(world_dir), "--examples", "1")
    assert code == 0 and "phase 3:" in out and "edit" in out and "user:" in out and "assistant:" in out


def test_commands_fail_with_one_line(tmp_path, world_dir, capsys):
    real = tmp_path / "real"
    rng = np.random.default_rng(0)
    with ShardWriter(real, shard_size=4) as w:
        w.write(AlignedClip("v0", "a man talks", rng.integers(0, 255, (16, 16, 3), dtype=np.uint8),
                            rng.integers(0, 255, (2, 16, 16, 3), dtype=np.uint8), np.zeros(100, np.int16)))
    cases = [
        (("data", "probe", str(real)), "no toy-world attributes"),
        (("data", "probe", str(tmp_path / "missing")), "not an xvila dataset"),
        (("data", "world", "--n", "2", "--out", str(world_dir)), "already holds"),
        (("data", "world", "--n", "0", "--out", str(tmp_path / "w")), "--n must be"),
        (("data", "world", "--n", "2", "--split", "dev", "--out", str(tmp_path / "w")), "--split"),
        (("data", "show", str(tmp_path)), "not an xvila dataset"),
        (("data", "build", "--source", str(tmp_path / "nope"), "--out", str(tmp_path / "b")), ""),
    ]
    for argv, message in cases:
        code, out, err = run(capsys, *argv)
        assert code == 2, argv
        assert err.startswith("xvila: error:") and message in err and err.count("\n") == 1, err
        assert "Traceback" not in err
    code, out, _ = run(capsys, "data", "show", str(real))  # real corpora: general tasks only
    assert code == 0 and "edit" in out


def test_world_seed_option_draws_other_scenes(tmp_path, capsys):
    code, out, _ = run(capsys, "data", "world", "--n", "3", "--out", str(tmp_path / "s1"), "--seed", "1",
                       "--samples", "0")
    assert code == 0 and json.loads(out)["clips"] == 3
    write_world(tmp_path / "s0", 3, samples=0)
    a = [c.meta["seed"] for c in read_clips(tmp_path / "s1")]
    b = [c.meta["seed"] for c in read_clips(tmp_path / "s0")]
    assert not set(a) & set(b)
    assert all(world_scene(c)[2] == "train" for c in read_clips(tmp_path / "s1"))


def test_build_a_real_corpus_then_show_it(tmp_path, capsys):
    import torch

    from xvila.media import save_video

    source = tmp_path / "corpus"
    (source / "videos").mkdir(parents=True)
    t = torch.linspace(0, 1, 16)
    for i, name in enumerate(("v1", "v2")):
        video = torch.rand(1, 3, 1, 1).expand(16, 3, 40, 48) * 0.5 + t[:, None, None, None] * 0.5
        tone = 0.3 * torch.sin(2 * torch.pi * (300 + 100 * i) * torch.arange(32000) / 16000)
        save_video(source / "videos" / f"{name}.mp4", video.contiguous(), fps=8, audio=tone)
    (source / "captions.csv").write_text("videoid,name\nv1,a grey wall fades to white\nv2,a hum over a fade\n")
    out = tmp_path / "built"
    code, stdout, err = run(capsys, "data", "build", "--source", str(source), "--out", str(out), "--workers", "0")
    assert code == 0, err
    assert json.loads(stdout)["num_clips"] == 2
    clips = list(read_clips(out))
    assert [c.caption for c in clips] == ["a grey wall fades to white", "a hum over a fade"]
    code, stdout, _ = run(capsys, "data", "show", str(out), "--json")
    report = json.loads(stdout)
    assert report["phases"]["3"]["tasks"]["edit"] == 0 and report["phases"]["1"]["conversations"] == 2
    code, _, err = run(capsys, "data", "probe", str(out))
    assert code == 2 and "no toy-world attributes" in err
