import numpy as np
import pytest
import torch

from xvila.data.records import AlignedClip, ShardWriter, read_clips, read_manifest


def clip(i, rng):
    return AlignedClip(
        f"c{i}", f"caption {i}", rng.integers(0, 255, (8, 8, 3), dtype=np.uint8),
        rng.integers(0, 255, (4, 8, 8, 3), dtype=np.uint8), rng.integers(-3000, 3000, 160).astype(np.int16),
        group=f"g{i // 2}", index=i % 2, meta={"shape": "circle"},
    )


def test_shards_round_trip_and_manifest(tmp_path):
    rng = np.random.default_rng(0)
    clips = [clip(i, rng) for i in range(5)]
    with ShardWriter(tmp_path, shard_size=2, info={"source": "test"}) as w:
        for c in clips:
            w.write(c)
    manifest = read_manifest(tmp_path)
    assert manifest["num_clips"] == 5 and [s["count"] for s in manifest["shards"]] == [2, 2, 1]
    assert not list(tmp_path.glob("*.tmp"))
    back = list(read_clips(tmp_path))
    assert [c.key for c in back] == [c.key for c in clips]
    for a, b in zip(clips, back):
        assert a.caption == b.caption and a.group == b.group and a.index == b.index and a.meta == b.meta
        for k in ("image", "video", "audio"):
            assert np.array_equal(getattr(a, k), getattr(b, k))


def test_tensor_conversion_round_trip():
    image, video, audio = torch.rand(3, 8, 8), torch.rand(4, 3, 8, 8), torch.rand(100) * 2 - 1
    c = AlignedClip.from_tensors("k", "x", image, video, audio)
    t = c.tensors()
    assert t["image"].shape == (3, 8, 8) and t["video"].shape == (4, 3, 8, 8) and t["audio"].shape == (100,)
    assert (t["image"] - image).abs().max() <= 0.5 / 255 + 1e-6
    assert (t["audio"] - audio).abs().max() <= 1e-4


def test_record_errors(tmp_path):
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="key"):
        AlignedClip("a/b", "x", *[getattr(clip(0, rng), k) for k in ("image", "video", "audio")])
    with pytest.raises(ValueError, match="uint8"):
        AlignedClip("a", "x", np.zeros((8, 8, 3)), np.zeros((1, 8, 8, 3), np.uint8), np.zeros(4, np.int16))
    with pytest.raises(FileNotFoundError, match="manifest"):
        read_manifest(tmp_path)
    w = ShardWriter(tmp_path)
    w.write(clip(0, rng))
    with pytest.raises(ValueError, match="duplicate"):
        w.write(clip(0, rng))
