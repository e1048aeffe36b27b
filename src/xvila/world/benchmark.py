"""Measurements of the world: rendering throughput and probe accuracy (clean and degraded).

python -c "from xvila.world.benchmark import report; print(report())"
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from xvila.world.captions import caption
from xvila.world.degrade import degrade_audio, degrade_image, degrade_video
from xvila.world.probes import MODALITY_ATTRIBUTES, probe_audio, probe_image, probe_text, probe_video
from xvila.world.render import render_audio, render_image, render_sample, render_video
from xvila.world.scene import WorldConfig, scene_rngs, split_scene


def _rate(fn: Callable[[int], object], count: int) -> float:
    start = time.perf_counter()
    for i in range(count):
        fn(i)
    return count / (time.perf_counter() - start)


def measure_throughput(count: int = 500, config: WorldConfig | None = None) -> dict[str, float]:
    """Items per second (one thread) for drawing scenes, each view, all four views of a seed, and each probe."""
    config = config or WorldConfig()
    scenes = [split_scene("test", i, config) for i in range(count)]
    images = [render_image(s, config) for s in scenes[: count // 5]]
    videos = [render_video(s, config) for s in scenes[: count // 5]]
    audios = [render_audio(s, config) for s in scenes[: count // 5]]
    return {
        "scene": _rate(lambda i: split_scene("test", i, config), count),
        "image": _rate(lambda i: render_image(scenes[i], config), count),
        "video": _rate(lambda i: render_video(scenes[i], config), count),
        "audio": _rate(lambda i: render_audio(scenes[i], config), count),
        "caption": _rate(lambda i: caption(scenes[i], scene_rngs(i)[1]), count),
        "all_views": _rate(lambda i: render_sample(i, config), count),
        "probe_image": _rate(lambda i: probe_image(images[i], config), len(images)),
        "probe_video": _rate(lambda i: probe_video(videos[i], config), len(videos)),
        "probe_audio": _rate(lambda i: probe_audio(audios[i], config), len(audios)),
    }


def measure_probe_accuracy(
    count: int = 500,
    degraded: bool = False,
    config: WorldConfig | None = None,
    split: str = "test",
) -> dict[str, dict[str, float]]:
    """Per view and attribute, the fraction of ``count`` scenes of ``split`` that the probe reads right.

    ``degraded``: pass each view through ``xvila.world.degrade`` first (text is never degraded). Also reports
    "position" for image and video: the fraction within 0.05 of the canvas of the true (start) position.
    """
    config = config or WorldConfig()
    attrs = {
        view: MODALITY_ATTRIBUTES[view] + (("position",) if view in ("image", "video") else ())
        for view in ("image", "video", "audio", "text")
    }
    right = {view: dict.fromkeys(a, 0) for view, a in attrs.items()}
    for i in range(count):
        scene = split_scene(split, i, config)
        rng = np.random.default_rng(i)
        image, video, audio = render_image(scene, config), render_video(scene, config), render_audio(scene, config)
        if degraded:
            image, video, audio = degrade_image(image, rng), degrade_video(video, rng), degrade_audio(audio, rng)
        preds = {
            "image": probe_image(image, config),
            "video": probe_video(video, config),
            "audio": probe_audio(audio, config),
            "text": probe_text(caption(scene, scene_rngs(i)[1]), config),
        }
        for view, pred in preds.items():
            for a in attrs[view]:
                if a == "position":
                    p = pred["position"]
                    right[view][a] += bool(p is not None and np.hypot(p[0] - scene.x, p[1] - scene.y) <= 0.05)
                else:
                    right[view][a] += bool(pred[a] == getattr(scene, a))
    return {view: {a: n / count for a, n in r.items()} for view, r in right.items()}


def report(count: int = 500, config: WorldConfig | None = None) -> str:
    """A plain-text table of throughput and of clean and degraded probe accuracy."""
    lines = [f"throughput (items/s, 1 thread, {count} scenes):"]
    lines += [f"  {k:12s} {v:8.0f}" for k, v in measure_throughput(count, config).items()]
    for degraded in (False, True):
        lines.append(f"probe accuracy, {'degraded' if degraded else 'clean'} ({count} test scenes):")
        for view, accs in measure_probe_accuracy(count, degraded, config).items():
            lines.append(f"  {view:6s} " + "  ".join(f"{a} {v:.3f}" for a, v in accs.items()))
    return "\n".join(lines)
