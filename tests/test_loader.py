"""The loader (determinism, rank sharding, workers, streaming, packing, max_length) and the feature cache
(same losses with and without it; changed weights or items never reuse entries)."""

from itertools import islice

import numpy as np
import pytest
import torch

from xvila.config import XVilaConfig
from xvila.conversation import MediaItem, Message, collate
from xvila.data.cache import FeatureCache, media_keys
from xvila.data.loader import Loader
from xvila.data.records import AlignedClip, read_clips
from xvila.data.tasks import Sample, TaskSpec
from xvila.data.world import write_world
from xvila.losses import LossWeights
from xvila.model import XVilaModel
from xvila.splice import IGNORE_INDEX

ALL = LossWeights(lm=1, align=1, denoise=1, highway=1)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = XVilaModel(XVilaConfig.tiny()).eval()
    model.encoder.requires_grad_(False)  # a frozen encoder: its features can be cached
    return model


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    write_world(out, 26, shard_size=5, samples=0)
    return out


def loader(model, data, **kwargs):
    kwargs.setdefault("phase", 3)
    kwargs.setdefault("batch_size", 4)
    return Loader.from_model(model, data, **kwargs)


def keys_of(batches):
    return [k for b in batches for ks in b[1].values() for k in ks]


def same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.labels, y.labels)
        assert x.media.keys() == y.media.keys() and all(torch.equal(x.media[m], y.media[m]) for m in x.media)
        assert x.targets.keys() == y.targets.keys()
        for m in x.targets:
            assert x.targets[m].captions == y.targets[m].captions and x.targets[m].guides == y.targets[m].guides
            assert torch.equal(x.targets[m].media, y.targets[m].media)


def test_batches_are_deterministic_by_seed_and_epoch(model, data_dir):
    a, b = loader(model, data_dir, seed=1), loader(model, data_dir, seed=1)
    first = list(a)
    same_batches(first, list(b))
    assert len(first) == len(a) == 26 // 4
    a.set_epoch(1)
    assert [s.clip_keys for s in a.samples()] != [s.clip_keys for s in loader(model, data_dir, seed=1).samples()]
    assert a.stats == {"too_long": 0, "skipped": 0, "conversations": 4 * len(first)}


def test_ranks_see_disjoint_equal_parts(model, data_dir):
    ranks = [loader(model, data_dir, seed=3, rank=r, world_size=3) for r in range(3)]
    orders = [r.rank_order(0) for r in ranks]
    assert len({len(o) for o in orders}) == 1 and len(orders[0]) == 26 // 3
    flat = [i for o in orders for i in o]
    assert len(flat) == len(set(flat))
    # a clip's conversation does not depend on the rank count
    single = {s.clip_keys[-1]: s for s in loader(model, data_dir, seed=3).samples()}
    for s in ranks[1].samples():
        assert [m.text for m in s.messages] == [m.text for m in single[s.clip_keys[-1]].messages]


def test_workers_give_the_same_batches(model, data_dir):
    same_batches(list(loader(model, data_dir, seed=2, num_workers=2)), list(loader(model, data_dir, seed=2)))


def test_streaming_reads_every_clip_once_and_ranks_are_disjoint(model, data_dir):
    # phase 1: every task applies to every clip, so an epoch visits every clip
    one = loader(model, data_dir, phase=1, streaming=True, shuffle_buffer=4, drop_last=False, seed=4)
    keys = [s.clip_keys[-1] for s in one.samples()]
    assert sorted(keys) == sorted(c.key for c in read_clips(data_dir))
    batches = list(one)
    assert sum(b.input_ids.shape[0] for b in batches) == 26
    assert keys != sorted(keys)  # shuffled
    parts = [[s.clip_keys[-1] for s in loader(model, data_dir, phase=1, streaming=True, rank=r, world_size=2,
                                             seed=4).samples()] for r in range(2)]
    assert len(parts[0]) == len(parts[1]) and not set(parts[0]) & set(parts[1])
    # interleaved sees earlier clips of the group within a shard
    inter = list(loader(model, data_dir, phase=2, streaming=True, seed=4).samples())
    assert inter and all(len(s.clip_keys) >= 2 for s in inter)


def test_packing_fills_rows_and_keeps_each_conversations_guides(model, data_dir):
    plain = loader(model, data_dir, seed=5, batch_size=2, drop_last=False, max_length=1000)
    packed = loader(model, data_dir, seed=5, batch_size=2, drop_last=False, max_length=1000, packing=True)
    samples = list(plain.samples())
    rows = [b.input_ids.shape[0] for b in packed]
    assert sum(rows) < len(samples) / 2  # several conversations per row
    batches = list(packed)
    answer_tokens = sum(int((b.labels != IGNORE_INDEX).sum()) for b in list(plain))
    assert sum(int((b.labels != IGNORE_INDEX).sum()) for b in batches) == answer_tokens
    assert max(int(b.attention_mask.sum(1).max()) for b in batches) <= 1000  # ids; media positions come on top
    # a text->video conversation packed after one with an input image gets no visual guide from it
    image_turn = Sample("x", [Message("user", "look", [MediaItem("image", torch.rand(3, 32, 32))]),
                              Message("assistant", "ok")])
    text_to_video = next(s for s in samples if s.task == "text->video")
    batch, _ = plain.collate([[image_turn, text_to_video]])
    assert batch.targets["video"].guides == [None]
    unpacked = collate([image_turn.messages + text_to_video.messages], model.tokenizer, model.config.llm.template)
    assert unpacked.targets["video"].guides == [("image", 0)]  # what one long conversation would have said


def test_max_length_counts_spliced_media_and_errors_or_drops(model, data_dir):
    with pytest.raises(ValueError, match="over max_length=60"):
        list(loader(model, data_dir, max_length=60))
    dropping = loader(model, data_dir, max_length=140, too_long="drop", seed=1)
    kept = list(dropping)
    assert dropping.stats["too_long"] > 0 and kept
    for b in kept:
        n_items = sum(x.shape[0] for x in b.media.values())
        assert int(b.attention_mask.sum()) + n_items * (dropping.spec.media_tokens - 1) <= 140 * b.input_ids.shape[0]
    with pytest.raises(ValueError, match="packing needs max_length"):
        loader(model, data_dir, packing=True)
    with pytest.raises(ValueError, match="rank"):
        loader(model, data_dir, rank=2, world_size=2)


# ================================================================================================ feature cache
def losses(model, batch):
    torch.manual_seed(7)  # the denoising noise
    with torch.no_grad():
        return {k: float(v) for k, v in model(batch, ALL).losses.items()}


def test_cache_gives_the_same_losses_and_reads_from_disk(model, data_dir, tmp_path):
    ld = loader(model, data_dir, seed=6, batch_size=3)
    raw = list(islice(ld, 2))
    cached_loader = loader(model, data_dir, seed=6, batch_size=3, cache_dir=tmp_path)
    cache = cached_loader.cache
    first = list(islice(cached_loader, 2))
    misses = cache.stats["feature_misses"]
    assert misses > 0 and cache.stats["caption_misses"] > 0
    fresh = FeatureCache(tmp_path, model)  # a new process: reads the disk
    cached_loader.cache = fresh
    again = list(islice(cached_loader, 2))
    assert fresh.stats["feature_misses"] == 0 and fresh.stats["feature_hits"] > 0
    assert fresh.stats["caption_misses"] == 0
    for r, c1, c2 in zip(raw, first, again):
        assert c1.encoded is not None and all(t.text_embeds is not None for t in c1.targets.values())
        expected = losses(model, r)
        for c in (c1, c2):
            got = losses(model, c)
            assert got.keys() == expected.keys()
            for k in expected:
                assert got[k] == pytest.approx(expected[k], rel=1e-4, abs=1e-5), k


def test_changed_weights_or_items_never_reuse_entries(model, data_dir, tmp_path):
    ld = loader(model, data_dir, seed=8, batch_size=2)
    conversations = [s.messages for s in list(ld.samples())[:2]]
    batch = collate(conversations, model.tokenizer, model.config.llm.template)
    keys = media_keys(conversations)
    cache = FeatureCache(tmp_path, model)
    a = cache.attach(batch, keys)
    fp = cache.encoder_fingerprint()
    m = next(iter(batch.media))
    saved = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    try:
        with torch.no_grad():
            for p in model.encoder.parameters():
                p.mul_(1.1)
        assert cache.encoder_fingerprint() != fp
        before = cache.stats["feature_misses"]
        b = cache.attach(batch, keys)
        assert cache.stats["feature_misses"] - before == sum(x.shape[0] for x in batch.media.values())
        assert not torch.allclose(a.encoded[m].patch_embeds, b.encoded[m].patch_embeds)
    finally:
        model.encoder.load_state_dict(saved)
    assert cache.encoder_fingerprint() == fp  # the same weights again: the same entries
    # the same key with other pixels (another dataset in the same cache folder) is recomputed, not reused
    other = batch.media[m].flip(0).clone() if batch.media[m].shape[0] > 1 else 1 - batch.media[m]
    hits = cache.stats["feature_hits"]
    c = cache.encode(m, other, keys[m])
    with torch.no_grad():
        expected = model.encode(m, other).patch_embeds
    torch.testing.assert_close(c.patch_embeds, expected, rtol=1e-4, atol=1e-5)
    assert cache.stats["feature_hits"] == hits
    # a trained encoder cannot be cached
    model.encoder.requires_grad_(True)
    try:
        with pytest.raises(ValueError, match="encoder is being trained"):
            cache.attach(batch, keys)
    finally:
        model.encoder.requires_grad_(False)


def test_caption_entries_follow_the_text_encoder(model, tmp_path):
    cache = FeatureCache(tmp_path, model, features=False)
    e1 = cache.text_embeds("image", ["a red circle", "a blue square", "a red circle"])
    assert cache.stats == {**cache.stats, "caption_misses": 2, "caption_hits": 1}
    torch.testing.assert_close(e1[0], e1[2])
    with torch.no_grad():
        torch.testing.assert_close(e1, model.decoder("image").encode_text(["a red circle", "a blue square",
                                                                           "a red circle"]))
    text_encoder = model.decoder("image").text_encoder
    p = next(text_encoder.parameters())
    fp = cache.text_fingerprint("image")
    saved = p.detach().clone()
    with torch.no_grad():
        p.mul_(1.5)
    try:
        assert cache.text_fingerprint("image") != fp
        e2 = cache.text_embeds("image", ["a red circle"])
        assert cache.stats["caption_misses"] == 3 and not torch.allclose(e2[0], e1[0])
    finally:
        with torch.no_grad():
            p.copy_(saved)
    assert cache.text_fingerprint("image") == fp


def test_in_memory_clips_and_a_spec_without_a_model(model):
    rng = np.random.default_rng(0)
    clips = [AlignedClip(f"c{i}", f"caption {i}", rng.integers(0, 255, (40, 40, 3), dtype=np.uint8),
                         rng.integers(0, 255, (4, 40, 40, 3), dtype=np.uint8),
                         rng.integers(-99, 99, 8000).astype(np.int16), group="g", index=i) for i in range(6)]
    spec = TaskSpec(gen_tokens=dict(model.config.gen_tokens), input_shapes={"image": (3, 32, 32)})
    ld = Loader(clips, tokenizer=model.tokenizer, template=model.config.llm.template, spec=spec,
                mixture={"image->text": 1, "edit": 1}, batch_size=2)
    batches = list(ld)
    assert len(batches) == 3 and all(b.media["image"].shape[1:] == (3, 32, 32) for b in batches)
    with pytest.raises(ValueError, match="fit the task mixture"):
        Loader(clips, tokenizer=model.tokenizer, template=model.config.llm.template, spec=spec,
               mixture={"edit": 1})
