import itertools
import re
from pathlib import Path

import numpy as np
import pytest

from xvila.world import (
    ATTRIBUTES,
    COLOURS,
    HARMONICS,
    MOTIONS,
    NOTE_HZ,
    PALETTE,
    SHAPES,
    SIZES,
    SPLITS,
    Scene,
    WorldConfig,
    caption,
    caption_vocabulary,
    partial_caption,
    probe_text,
    render_image,
    render_sample,
    render_video,
    sample_scene,
    split_allowed,
    split_sample,
    split_scene,
    split_seed,
)
from xvila.world.geometry import UNIT_AREA, coverage, rotated_bounds
from xvila.world.scene import scene_rngs

CFG = WorldConfig()
DOC = Path(__file__).resolve().parents[1] / "docs" / "toy_world.md"


@pytest.fixture(scope="module")
def scenes():
    return [split_scene("train", i, CFG) for i in range(300)]


# ---- config ---------------------------------------------------------------------------------------------------


def test_config_round_trips_through_json(tmp_path):
    cfg = WorldConfig(canvas=48, held_out_pairs=(("circle", "red"),))
    cfg.save(tmp_path / "world.json")
    assert WorldConfig.load(tmp_path / "world.json") == cfg


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"canvas": 8}, "canvas"),
        ({"frames": 16}, "aligned in time"),
        ({"colours": ("red", "teal")}, "colours"),
        ({"size_extents": (0.5, 0.3125)}, "increasing"),
        ({"size_extents": (0.2, 0.5)}, "quarter"),
        ({"travel": 0.6}, "does not fit"),
        ({"held_out_pairs": (("circle", "red"), ("circle", "red"))}, "distinct"),
        ({"held_out_pairs": tuple(("circle", c) for c in COLOURS)}, "every shape"),
        ({"val_seeds": (500, 2000)}, "overlap"),
    ],
)
def test_config_rejects_bad_values(changes, message):
    with pytest.raises(ValueError, match=message):
        WorldConfig(**changes)


def test_scene_round_trips_and_validates():
    scene = split_scene("val", 3, CFG)
    assert Scene.from_dict(scene.to_dict()) == scene
    with pytest.raises(ValueError, match="unknown shape"):
        scene.replace(shape="star")


# ---- determinism ----------------------------------------------------------------------------------------------


def test_same_seed_same_bytes_for_every_view():
    for seed in (0, 7, 123_456):
        a, b = render_sample(seed, CFG), render_sample(seed, CFG)
        assert a.scene == b.scene and a.caption == b.caption
        for view in ("image", "video", "audio"):
            assert getattr(a, view).tobytes() == getattr(b, view).tobytes()
    a, b = render_sample(1, CFG), render_sample(2, CFG)
    assert a.video.tobytes() != b.video.tobytes() and a.audio.tobytes() != b.audio.tobytes()


def test_image_is_the_first_video_frame(scenes):
    for scene in scenes[:50]:
        assert np.array_equal(render_image(scene, CFG), render_video(scene, CFG)[0])


def test_views_have_repo_conventions():
    s = split_sample("test", 0, CFG)
    assert s.image.shape == (3, 32, 32) and s.image.dtype == np.float32
    assert s.video.shape == (8, 3, 32, 32) and s.video.dtype == np.float32
    assert s.audio.shape == (16000,) and s.audio.dtype == np.float32
    assert s.video.min() >= 0.0 and s.video.max() <= 1.0
    assert np.abs(s.audio).max() <= 1.0 and np.abs(s.audio).max() > 0.1
    assert np.array_equal(s.image, s.video[0])
    other = WorldConfig(canvas=48, frames=16, fps=16.0, sample_rate=8000)
    s = render_sample(0, other)
    assert s.video.shape == (16, 3, 48, 48) and s.audio.shape == (8000,)


def test_caption_stream_is_independent_of_the_scene_stream():
    scene_rng, caption_rng = scene_rngs(5)
    scene = sample_scene(scene_rng, CFG)
    assert render_sample(5, CFG).caption == caption(scene, caption_rng)


# ---- scenes ---------------------------------------------------------------------------------------------------


def test_attributes_cover_their_ranges(scenes):
    for name, values in zip(ATTRIBUTES, (SHAPES, COLOURS, SIZES, MOTIONS), strict=True):
        assert {getattr(s, name) for s in scenes} == set(values)
    assert len(SHAPES) >= 5 and len(COLOURS) >= 6 and len(MOTIONS) >= 5
    rot = np.array([s.rotation for s in scenes])
    assert np.abs(rot).max() <= CFG.max_rotation and rot.std() > 1.0
    bg = np.array([s.background for s in scenes])
    assert np.all(np.abs(bg - CFG.background_level) <= CFG.background_tint)
    # hidden details vary continuously
    assert len({round(s.x, 4) for s in scenes}) > 250 and len({round(s.y, 4) for s in scenes}) > 250


def test_small_shapes_span_a_quarter_of_the_canvas():
    assert min(CFG.size_extents) * CFG.canvas >= CFG.canvas / 4


def test_shapes_stay_on_the_canvas_on_every_frame(scenes):
    for scene in scenes:
        extent = CFG.extent(scene.size)
        x0, x1, y0, y1 = rotated_bounds(scene.shape, scene.rotation)
        track = scene.track(CFG)  # (T, 2)
        assert np.all(track[:, 0] + x0 * extent >= CFG.margin - 1e-9)
        assert np.all(track[:, 0] + x1 * extent <= 1 - CFG.margin + 1e-9)
        assert np.all(track[:, 1] + y0 * extent >= CFG.margin - 1e-9)
        assert np.all(track[:, 1] + y1 * extent <= 1 - CFG.margin + 1e-9)
    # and the rendered coverage keeps the whole area on every frame (nothing is cut off at an edge)
    for scene in scenes[:60]:
        alpha = coverage(scene.shape, scene.track(CFG), CFG.extent(scene.size), scene.rotation, 32, 4)  # (T, H, W)
        area = UNIT_AREA[scene.shape] * (CFG.extent(scene.size) * 32) ** 2
        np.testing.assert_allclose(alpha.sum(axis=(1, 2)), area, rtol=0.04)


def test_motion_moves_the_centroid_by_the_travel(scenes):
    for scene in scenes[:40]:
        track = scene.track(CFG)
        step = track[-1] - track[0]
        if scene.motion == "still":
            assert np.allclose(step, 0)
        else:
            assert np.isclose(np.abs(step).max(), CFG.travel) and np.isclose(np.abs(step).min(), 0)
    video = render_video(next(s for s in scenes if s.motion == "right"), CFG)
    bright = video.max(axis=1)  # (T, H, W)
    cols = [np.average(np.arange(32), weights=f.sum(0) - f.sum(0).min()) for f in bright]
    assert cols[-1] - cols[0] > 5  # ~8 px to the right


def test_audio_mapping_constants():
    semis = sorted(12 * np.log2(np.array(list(NOTE_HZ.values()))))
    assert np.min(np.diff(semis)) >= 3 - 1e-3  # notes at least three semitones apart
    codes = np.array(list(HARMONICS.values()))
    assert min(np.abs(a - b).sum() for i, a in enumerate(codes) for b in codes[i + 1 :]) >= 2


# ---- splits ---------------------------------------------------------------------------------------------------


def test_split_seed_ranges_are_disjoint():
    ranges = sorted(CFG.seed_range(s) for s in SPLITS)
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(ranges))
    assert split_seed("val", 0, CFG) == CFG.val_seeds[0]
    with pytest.raises(ValueError, match="outside split"):
        split_seed("test", CFG.test_seeds[1] - CFG.test_seeds[0], CFG)
    with pytest.raises(ValueError, match="unknown split"):
        split_seed("dev", 0, CFG)


def test_held_out_pairs_never_appear_outside_the_compositional_split():
    held = set(CFG.held_out_pairs)
    all_pairs = {(s, c) for s in SHAPES for c in COLOURS}
    assert split_allowed("train", CFG) == split_allowed("test", CFG) == frozenset(all_pairs - held)
    assert split_allowed("compositional", CFG) == frozenset(held)
    for split in ("train", "val", "test"):
        pairs = {(s.shape, s.colour) for s in (split_scene(split, i, CFG) for i in range(400))}
        assert not pairs & held
        assert len(pairs) == len(all_pairs) - len(held)  # every other pair does occur
    comp = {(s.shape, s.colour) for s in (split_scene("compositional", i, CFG) for i in range(100))}
    assert comp == held


def test_sample_scene_respects_allowed():
    rng = np.random.default_rng(0)
    allowed = frozenset({("cross", "green")})
    assert all((s.shape, s.colour) == ("cross", "green") for s in (sample_scene(rng, CFG, allowed) for _ in range(20)))
    with pytest.raises(ValueError, match="allowed"):
        sample_scene(rng, CFG, frozenset({("star", "green")}))


# ---- captions -------------------------------------------------------------------------------------------------


def test_captions_vary_and_never_mention_hidden_details(scenes):
    texts = [render_sample(i, CFG).caption for i in range(300)]
    assert len(set(texts)) > 250
    hidden = re.compile(r"\b(top|bottom|corner|cent(er|re)|middle|edge|rotat\w*|tilt\w*|tint\w*|texture\w*)\b")
    assert not [t for t in texts if hidden.search(t.lower())]
    vocab = set(caption_vocabulary())
    assert {w for t in texts for w in re.findall(r"[a-z]+", t.lower())} <= vocab


def test_partial_captions_name_exactly_the_chosen_attributes(scenes):
    rng = np.random.default_rng(0)
    vocab = set(caption_vocabulary())
    subsets = set()
    for scene in scenes[:100]:
        text = partial_caption(scene, rng)
        read = probe_text(text)
        named = tuple(a for a in ATTRIBUTES if read[a] is not None)
        subsets.add(named)
        assert 0 < len(named) < len(ATTRIBUTES), text
        assert all(read[a] == getattr(scene, a) for a in named), (text, scene)
        assert set(re.findall(r"[a-z]+", text.lower())) <= vocab, text
    assert len(subsets) >= 12  # of the 14 non-empty proper subsets
    whole = partial_caption(scenes[0], rng, ATTRIBUTES)
    assert all(probe_text(whole)[a] == getattr(scenes[0], a) for a in ATTRIBUTES)
    with pytest.raises(ValueError, match="non-empty subset"):
        partial_caption(scenes[0], rng, ("position",))


def test_render_100_scenes_all_views():
    samples = [render_sample(i, CFG) for i in range(100)]
    assert len({s.audio.tobytes() for s in samples}) > 50


# ---- docs -----------------------------------------------------------------------------------------------------


def test_doc_lists_the_constants_of_the_code():
    doc = DOC.read_text()
    line = next(ln for ln in doc.splitlines() if ln.startswith("Held-out pairs:"))
    listed = set(re.findall(r"(\w+)-(\w+)", line.split(":", 1)[1]))
    assert listed == set(CFG.held_out_pairs)
    for name, rgb in PALETTE.items():
        assert f"| {name} | ({rgb[0]:.2f}, {rgb[1]:.2f}, {rgb[2]:.2f}) |" in doc, name
    for name, hz in NOTE_HZ.items():
        assert f"{hz:.2f} Hz" in doc, name
    for split in SPLITS:
        start, end = CFG.seed_range(split)
        assert f"| {split} | [{start:_}, {end:_}) |" in doc, split
