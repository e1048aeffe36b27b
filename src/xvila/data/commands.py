"""``xvila data ...``: write a toy world, build a real corpus, probe and show a dataset.

Plain functions that take typed arguments and return what they print (the CLI prints it), plus
:func:`register`, which adds the ``data`` sub-command to the CLI's parser. Problems with the user's input raise
``xvila.cli.CLIError`` (one line, exit code 2).
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any


def _cli_error(message: str) -> Exception:
    from xvila.cli import CLIError

    return CLIError(message)


def _manifest(data_dir: str | Path) -> dict[str, Any]:
    from xvila.data.records import read_manifest

    try:
        return read_manifest(data_dir)
    except (FileNotFoundError, ValueError) as e:
        raise _cli_error(str(e)) from None


# ============================================================================================== world / build
def world(out: str | Path, n: int, split: str = "train", seed: int | None = None, shard_size: int = 1000,
          samples: int = 4, progress: bool = False) -> dict[str, Any]:
    """Render ``n`` toy-world scenes of ``split`` into ``out``. ``seed`` shifts the split's seed range (same
    split rules, other scenes); returns a summary."""
    from xvila.data.world import write_world
    from xvila.world import SPLITS, WorldConfig

    if n < 1:
        raise _cli_error(f"--n must be at least 1, got {n}")
    if split not in SPLITS:
        raise _cli_error(f"--split {split!r}: choose one of {', '.join(SPLITS)}")
    config = WorldConfig()
    if seed is not None:
        config = _shifted(config, seed)
    try:
        manifest = write_world(out, n, split=split, config=config, shard_size=shard_size, samples=samples,
                               progress=progress)
    except (FileExistsError, ValueError) as e:
        raise _cli_error(str(e)) from None
    return {"out": str(out), "split": split, "clips": manifest["num_clips"], "shards": len(manifest["shards"]),
            "samples": str(Path(out) / "samples") if samples else None}


def _shifted(config, seed: int):
    """The config with every split's seed range moved by ``seed`` split-widths (they stay disjoint)."""
    if seed < 0:
        raise _cli_error(f"--seed must be >= 0, got {seed}")
    span = max(config.seed_range(s)[1] for s in ("train", "val", "test", "compositional"))
    shift = seed * span
    return config.replace(**{f"{s}_seeds": (a + shift, b + shift) for s, (a, b) in
                             ((s, config.seed_range(s)) for s in ("train", "val", "test", "compositional"))})


def build(source: str | Path, out: str | Path, **kwargs) -> dict[str, Any]:
    """Ingest a real video corpus (``xvila.data.ingest.build_dataset``, keyword arguments passed on); returns its
    report as a dict (at most 20 skip reasons listed; all are in ``out/ingest_report.json``)."""
    try:
        from xvila.data.ingest import build_dataset
    except ImportError as e:
        raise _cli_error(f"real-corpus ingestion is not available in this install ({e})") from None
    if not Path(source).exists():
        raise _cli_error(f"--source {source}: no such folder or annotation file")
    try:
        report = build_dataset(source, out, **kwargs)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        raise _cli_error(str(e)) from None
    result = report.to_dict()
    if len(result.get("reasons", [])) > 20:
        result["reasons"] = result["reasons"][:20] + [{"item": "...", "category": "more", "reason":
                                                       f"{len(result['reasons']) - 20} more in the report file"}]
    return result


# ===================================================================================================== probe
def probe(data_dir: str | Path, n: int | None = None) -> dict[str, Any]:
    """Per-attribute accuracy of the probes on the first ``n`` clips (all by default): image, video, audio and
    caption against the stored scene; position within 0.1 canvas fractions."""
    from xvila.data.records import read_clips
    from xvila.data.world import world_scene
    from xvila.world import MODALITY_ATTRIBUTES, probe_audio, probe_image, probe_text, probe_video

    _manifest(data_dir)
    if n is not None and n < 1:
        raise _cli_error(f"--n must be at least 1, got {n}")
    probes = {"image": probe_image, "video": probe_video, "audio": probe_audio}
    views = {"image": MODALITY_ATTRIBUTES["image"] + ("position",),
             "video": MODALITY_ATTRIBUTES["video"] + ("position",),
             "audio": MODALITY_ATTRIBUTES["audio"], "text": MODALITY_ATTRIBUTES["text"]}
    right = {v: Counter() for v in views}
    count = 0
    for clip in read_clips(data_dir):
        if n is not None and count == n:
            break
        world = world_scene(clip)
        if world is None:
            raise _cli_error(f"{data_dir}: clip {clip.key} has no toy-world attributes; probe reads toy-world data")
        scene, config, _ = world
        tensors = clip.tensors()
        preds = {m: fn(tensors[m], config) for m, fn in probes.items()}
        preds["text"] = probe_text(clip.caption, config)
        for view, attributes in views.items():
            for a in attributes:
                value = preds[view].get(a)
                if a == "position":
                    ok = value is not None and math.hypot(value[0] - scene.x, value[1] - scene.y) <= 0.1
                else:
                    ok = value == getattr(scene, a)
                right[view][a] += bool(ok)
        count += 1
    if count == 0:
        raise _cli_error(f"{data_dir}: the dataset holds no clips")
    accuracy = {v: {a: round(right[v][a] / count, 4) for a in attributes} for v, attributes in views.items()}
    return {"clips": count, "accuracy": accuracy,
            "min": min(x for per in accuracy.values() for x in per.values())}


# ====================================================================================================== show
def _render_message(message) -> str:
    """A message as text, generation runs shortened to ``[VID0..7]`` and items listed."""
    import re

    text = re.sub(r"\[([A-Z]+)0\](?:\[\1\d+\])*\[\1(\d+)\]", r"[\g<1>0..\2]", message.text)
    lines = [f"{message.role}: {text}"]
    for item in message.media:
        shape = "x".join(str(s) for s in item.data.shape)
        what = f"target caption: {item.caption!r}" if item.caption is not None else "input"
        lines.append(f"    [{item.modality} {shape} key={item.key}] {what}")
    return "\n".join(lines)


def show(data_dir: str | Path, n: int | None = 200, examples: int = 2, seed: int = 0) -> dict[str, Any]:
    """Counts per task for each phase's default mixture over (the first ``n``) clips, and example conversations."""
    from xvila.config import default_gen_tokens
    from xvila.data.loader import Loader
    from xvila.data.records import read_clips
    from xvila.data.tasks import PHASE_FOLLOW_UPS, TASKS_BY_PHASE, TaskSpec, phase_mixture

    manifest = _manifest(data_dir)
    clips = []
    for clip in read_clips(data_dir):
        if n is not None and len(clips) == n:
            break
        clips.append(clip)
    if not clips:
        raise _cli_error(f"{data_dir}: the dataset holds no clips")
    from xvila.llm import ChatTemplate

    tokenizer = _show_tokenizer()

    report: dict[str, Any] = {"data": str(data_dir), "clips": manifest["num_clips"], "shown_clips": len(clips),
                              "info": {k: v for k, v in manifest["info"].items() if k != "world_config"},
                              "groups": len({c.group for c in clips if c.group}), "phases": {}}
    for phase in sorted(TASKS_BY_PHASE):
        spec = TaskSpec(gen_tokens=default_gen_tokens(), follow_ups=PHASE_FOLLOW_UPS[phase])
        loader = Loader(clips, tokenizer=tokenizer, template=ChatTemplate(), spec=spec,
                        mixture=phase_mixture(phase), seed=seed) if _any_applies(clips, phase, spec) else None
        samples = list(loader.samples(0)) if loader is not None else []
        counts = Counter(s.task for s in samples)
        report["phases"][phase] = {
            "conversations": len(samples),
            "tasks": {t: counts.get(t, 0) for t in TASKS_BY_PHASE[phase]},
            "turns": round(sum(len(s.messages) for s in samples) / 2 / max(1, len(samples)), 2),
            "tokens": _token_stats(loader, samples),
            "examples": [{"task": s.task, "text": "\n".join(_render_message(m) for m in s.messages)}
                         for s in _spread(samples, examples)],
        }
    return report


def _token_stats(loader, samples) -> dict[str, float]:
    lengths = [loader.length(s.messages) for s in samples]
    if not lengths:
        return {"mean": 0, "max": 0}
    return {"mean": round(sum(lengths) / len(lengths), 1), "max": max(lengths)}


def _any_applies(clips, phase, spec) -> bool:
    from xvila.data.tasks import TASKS, TASKS_BY_PHASE

    by_group: dict[str, list] = {}
    for c in clips:
        by_group.setdefault(c.group, []).append(c)
    for c in clips:
        window = [x for x in by_group.get(c.group, []) if c.group and x.index < c.index] + [c]
        if any(TASKS[t].applies(window, spec) for t in TASKS_BY_PHASE[phase]):
            return True
    return False


def _spread(samples, k: int):
    """Up to ``k`` samples of different tasks, in order."""
    seen, out = set(), []
    for s in samples:
        if s.task not in seen and len(out) < k:
            seen.add(s.task)
            out.append(s)
    return out


def _show_tokenizer():
    """The tiny model's tokenizer (trained locally in milliseconds) with the media tokens added: lengths in
    tokens are indicative only, a real LLM's tokenizer gives other counts."""
    from xvila.config import default_gen_tokens
    from xvila.modalities import MODALITIES
    from xvila.text import build_tokenizer

    tokenizer = build_tokenizer(512, ("<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"))
    added = [m.placeholder for m in MODALITIES.values()]
    added += [t for name, k in default_gen_tokens().items() for t in MODALITIES[name].gen_tokens(k)]
    tokenizer.add_tokens(added, special_tokens=True)
    return tokenizer


def format_show(report: dict[str, Any]) -> str:
    lines = [f"{report['data']}: {report['clips']} clips ({report['shown_clips']} read), "
             f"{report['groups']} groups; {json.dumps(report['info'])}"]
    for phase, p in report["phases"].items():
        lines.append(f"\nphase {phase}: {p['conversations']} conversations, {p['turns']} turns and "
                     f"{p['tokens']['mean']} tokens on average (max {p['tokens']['max']}, tiny tokenizer, one "
                     f"position per media item)")
        width = max(len(t) for t in p["tasks"])
        lines += [f"  {t:<{width}}  {c}" for t, c in p["tasks"].items()]
        for ex in p["examples"]:
            lines.append(f"  --- example: {ex['task']}")
            lines += ["    " + line for line in ex["text"].splitlines()]
    return "\n".join(lines)


# ======================================================================================================= CLI
def register(subparsers) -> None:
    """Add ``data`` (world, build, probe, show) to the CLI's sub-commands."""
    d = subparsers.add_parser("data", help="datasets: toy world, real corpora, probes, task conversations")
    sub = d.add_subparsers(dest="data_command", required=True)

    w = sub.add_parser("world", help="render toy-world scenes into shards (plus browsable samples)")
    w.add_argument("--n", type=int, required=True, help="number of scenes")
    w.add_argument("--out", required=True, help="an empty output folder")
    w.add_argument("--split", default="train", help="train, val, test or compositional (held-out pairs)")
    w.add_argument("--seed", type=int, default=None, help="shift the seed ranges: other scenes, same split rules")
    w.add_argument("--shard-size", type=int, default=1000)
    w.add_argument("--samples", type=int, default=4, help="clips also written as PNG/MP4/WAV to OUT/samples")
    w.set_defaults(data_func=_cmd_world)

    b = sub.add_parser("build", help="ingest a real video corpus (videos + captions) into shards")
    b.add_argument("--source", required=True, help="a folder of videos with a WebVid CSV or ActivityNet JSON")
    b.add_argument("--out", required=True)
    b.add_argument("--format", choices=("webvid", "activitynet"), default=None, help="default: told by the files")
    b.add_argument("--num-frames", type=int, default=8)
    b.add_argument("--size", type=int, default=32, help="frames are resized and centre-cropped to SIZE x SIZE")
    b.add_argument("--clip-seconds", type=float, default=None)
    b.add_argument("--audio-seconds", type=float, default=1.0)
    b.add_argument("--workers", type=int, default=2)
    b.add_argument("--shard-size", type=int, default=1000)
    b.add_argument("--retry-skipped", action="store_true", help="retry items an earlier run skipped")
    b.add_argument("--allow-silent", action="store_true", help="keep clips whose audio is silent")
    b.set_defaults(data_func=_cmd_build)

    p = sub.add_parser("probe", help="probe accuracy per attribute on a toy-world dataset, as JSON")
    p.add_argument("dir")
    p.add_argument("--n", type=int, default=None, help="probe the first N clips (default: all)")
    p.set_defaults(data_func=_cmd_probe)

    s = sub.add_parser("show", help="task counts per phase and example conversations")
    s.add_argument("dir")
    s.add_argument("--n", type=int, default=200, help="clips to read (default 200)")
    s.add_argument("--examples", type=int, default=2, help="example conversations per phase")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--json", action="store_true")
    s.set_defaults(data_func=_cmd_show)
    d.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """The CLI's entry for ``xvila data ...``."""
    return args.data_func(args)


def _cmd_world(args) -> int:
    summary = world(args.out, args.n, args.split, args.seed, args.shard_size, args.samples, progress=True)
    print(json.dumps(summary, indent=2))
    return 0


def _cmd_build(args) -> int:
    result = build(args.source, args.out, format=args.format, num_frames=args.num_frames, size=args.size,
                   clip_seconds=args.clip_seconds, audio_seconds=args.audio_seconds, workers=args.workers,
                   shard_size=args.shard_size, retry_skipped=args.retry_skipped, allow_silent=args.allow_silent)
    print(json.dumps(result, indent=2))
    return 0


def _cmd_probe(args) -> int:
    print(json.dumps(probe(args.dir, args.n), indent=2))
    return 0


def _cmd_show(args) -> int:
    report = show(args.dir, args.n, args.examples, args.seed)
    print(json.dumps(report, indent=2) if args.json else format_show(report))
    return 0
