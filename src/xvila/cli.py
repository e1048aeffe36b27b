"""The ``xvila`` command line. The only place (with recipes) that parses argv; the library takes typed arguments."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TINY_RANDOM = "tiny-random"
DEFAULT_MODEL = "xvila-tiny"  # the embedded model (xvila.embedded)
MODEL_HELP = f"a saved model folder, {DEFAULT_MODEL!r} (the embedded model, default) or {TINY_RANDOM!r}"


class CLIError(Exception):
    """A problem with the user's input: printed as one line, exit code 2."""


def load_model(spec: str, seed: int = 0):
    import torch

    from xvila.config import XVilaConfig
    from xvila.model import XVilaModel

    if spec == TINY_RANDOM:
        torch.manual_seed(seed)
        model = XVilaModel(XVilaConfig.tiny())
        model.load_decoders()  # now, so that the seed alone fixes their random weights (not what ran before)
        return model.eval()
    if spec == DEFAULT_MODEL:
        from xvila.embedded import load_embedded

        try:
            return load_embedded()
        except FileNotFoundError as e:
            raise CLIError(str(e)) from None
    if not Path(spec).is_dir():
        raise CLIError(f"--model {spec!r}: not a model folder (expected a directory written by save_pretrained, "
                       f"{DEFAULT_MODEL!r} or {TINY_RANDOM!r})")
    return XVilaModel.from_pretrained(spec).eval()


def input_item(model, path: str, modality: str):
    from xvila.conversation import MediaItem
    from xvila.media import MediaError, load_media

    try:
        data = load_media(path, modality, **model.media_sizes(modality))
    except MediaError as e:
        raise CLIError(str(e)) from None
    return MediaItem(modality, data)


def save_outputs(answer, out_dir: Path) -> list[dict]:
    from xvila.media import save_media
    from xvila.modalities import get_modality

    written = []
    for item in answer.media:
        if item.data is None:
            continue
        out_dir.mkdir(parents=True, exist_ok=True)
        suffix = get_modality(item.modality).suffixes[0]
        path = save_media(out_dir / f"{item.modality}_{item.index}{suffix}", item.modality, item.data)
        written.append({"modality": item.modality, "marker": item.marker, "path": str(path)})
    return written


def cmd_generate(args: argparse.Namespace) -> int:
    from xvila.conversation import Message
    from xvila.generation import GenerationConfig

    if not args.prompt.strip():
        raise CLIError("--prompt is empty: say what you want")
    model = load_model(args.model, args.seed)
    media = [input_item(model, p, m) for m, paths in (("image", args.image), ("video", args.video),
                                                       ("audio", args.audio)) for p in paths or ()]
    outputs = tuple(o for o in (args.outputs or "").split(",") if o)
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, seed=args.seed, outputs=outputs,
                              num_inference_steps=args.steps, highway=not args.no_highway)
    try:
        answer = model.generate([Message("user", args.prompt, media)], config)
    except ValueError as e:
        raise CLIError(str(e)) from None
    written = save_outputs(answer, Path(args.out))
    if args.json:
        print(json.dumps({"text": answer.text, "files": written}, indent=2))
    else:
        print(answer.text)
        for w in written:
            print(f"{w['marker']}: {w['path']}")
    return 0


CHAT_HELP = """Type a message; attach media by path with @, e.g. `what is this? @cat.png`.
Generated media are saved and their paths printed. Commands: /reset (forget the conversation), /quit."""


def parse_chat_line(model, line: str):
    """Split a chat line into text and attached items (``@path`` words); raises CLIError for bad media."""
    from xvila.modalities import modality_of_path

    words, media = [], []
    for word in line.split():
        if word.startswith("@") and len(word) > 1:
            try:
                modality = modality_of_path(word[1:]).name
            except ValueError as e:
                raise CLIError(str(e)) from None
            media.append(input_item(model, word[1:], modality))
        else:
            words.append(word)
    return " ".join(words), media


def cmd_chat(args: argparse.Namespace) -> int:
    from xvila.conversation import Message
    from xvila.generation import GenerationConfig

    model = load_model(args.model, args.seed)
    out_dir = Path(args.out)
    interactive = sys.stdin.isatty()
    if interactive:
        print(CHAT_HELP)
    history: list[Message] = []
    turn = 0
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            history, turn = [], 0
            print("(conversation cleared)")
            continue
        try:
            text, media = parse_chat_line(model, line)
        except CLIError as e:
            print(f"xvila: error: {e}", file=sys.stderr)
            continue
        if not text and not media:
            continue
        history.append(Message("user", text, media))
        config = GenerationConfig(max_new_tokens=args.max_new_tokens, seed=args.seed + turn,
                                  num_inference_steps=args.steps)
        answer = model.generate(history, config)
        history.append(answer.as_message())
        written = save_outputs(answer, out_dir / f"turn_{turn:03d}")
        turn += 1
        print(f"xvila> {answer.text}")
        for w in written:
            print(f"  {w['marker']}: {w['path']}")
    return 0


EVAL_SECTIONS = "generation,understanding,highway,compositional,chat"  # xvila.evaluation.SECTIONS (no torch import)


def cmd_eval(args: argparse.Namespace) -> int:
    from xvila.evaluation import EvalConfig, evaluate

    sections = tuple(s.strip() for s in args.sections.split(",") if s.strip())
    try:
        config = EvalConfig(n=args.n, start=args.start, sections=sections, seed=args.seed,
                            num_inference_steps=args.steps)
        if args.baseline:
            config.check_baseline()  # before the models load
    except ValueError as e:
        raise CLIError(str(e)) from None
    model = load_model(args.model, args.seed)
    baseline = load_model(args.baseline, args.seed) if args.baseline else None
    results = evaluate(model, config, baseline=baseline, progress=not args.json)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0

    def pm(r: dict, key: str, sign: str = "") -> str:  # mean ± standard error over the scenes
        return f"{r[key]:{sign}.3f} ± {r[key + '_se']:.3f}"

    for section in ("generation", "baseline"):
        for task, r in results.get(section, {}).items():
            print(f"{section:<13} {task:<20} accuracy {pm(r, 'accuracy')}  alignment {pm(r, 'alignment')}  "
                  f"n={r['n']}")
    for task, r in results.get("versus_baseline", {}).items():  # the differences, scene by scene
        print(f"{'vs baseline':<13} {task:<20} accuracy {pm(r, 'accuracy', '+')}  "
              f"alignment {pm(r, 'alignment', '+')}  n={r['n']}")
    for task, r in results.get("understanding", {}).items():
        print(f"{'understanding':<13} {task:<20} accuracy {pm(r, 'accuracy')}  n={r['n']}")
    for task, r in results.get("highway", {}).items():
        print(f"{'highway':<13} {task:<20} iou with {pm(r, 'iou_with')}  without {pm(r, 'iou_without')}  "
              f"n={r['n']}")
    c = results.get("compositional", {})
    if c.get("tasks"):
        print(f"{'compositional':<13} {'held-out pairs':<20} accuracy {pm(c, 'accuracy')}  n={c['n']}")
    if "chat" in results:
        print(f"{'chat':<13} {'ordinary questions':<20} accuracy {pm(results['chat'], 'accuracy')}  "
              f"n={results['chat']['n']}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from xvila.demo import DemoConfig, write_demo

    try:
        config = DemoConfig(seed=args.seed, max_new_tokens=args.max_new_tokens, num_inference_steps=args.steps)
    except ValueError as e:
        raise CLIError(str(e)) from None
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {args.out!r}: exists and is not a folder (give a folder for the gallery)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CLIError(f"--out {args.out!r}: cannot create the folder ({e.strerror or e})") from None
    model = load_model(args.model, args.seed)
    index = write_demo(model, out, config, progress=True, title=f"X-VILA demo: {args.model}")
    print(index)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xvila", description="X-VILA: any-to-any text, image, video and audio")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="one turn: a prompt (and media) in, text and media out")
    g.add_argument("--prompt", required=True)
    g.add_argument("--image", action="append", help="an input image (repeatable)")
    g.add_argument("--video", action="append", help="an input video (repeatable)")
    g.add_argument("--audio", action="append", help="an input audio file (repeatable)")
    g.add_argument("--outputs", default="", help="the modalities the answer writes, exactly, e.g. image,audio (default: what the model chooses)")
    g.add_argument("--out", default="out", help="folder for generated media")
    g.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    g.add_argument("--max-new-tokens", type=int, default=48)
    g.add_argument("--steps", type=int, default=None, help="diffusion steps (default: the decoder's)")
    g.add_argument("--no-highway", action="store_true", help="disable the Visual Embedding Highway")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--json", action="store_true", help="print the answer and written files as JSON")
    g.set_defaults(func=cmd_generate)
    from xvila.data.commands import register as register_data  # xvila data ... (light import)

    register_data(sub)

    c = sub.add_parser("chat", help="an interactive multi-turn conversation (attach media with @path)")
    c.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    c.add_argument("--out", default="chat_out", help="folder for generated media")
    c.add_argument("--max-new-tokens", type=int, default=48)
    c.add_argument("--steps", type=int, default=None, help="diffusion steps (default: the decoder's)")
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(func=cmd_chat)

    e = sub.add_parser("eval", help="score every modality pair on held-out toy-world scenes")
    e.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    e.add_argument("--baseline", default=None, help="a second model folder, scored on generation")
    e.add_argument("--n", type=int, default=20, help="test scenes per task")
    e.add_argument("--start", type=int, default=0, help="first scene of each split (scenes START .. START+N-1)")
    e.add_argument("--sections", default=EVAL_SECTIONS,
                   help=f"comma-separated parts to run (default: all of {EVAL_SECTIONS})")
    e.add_argument("--steps", type=int, default=None, help="diffusion steps (default: the decoder's)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.set_defaults(func=cmd_eval)

    d = sub.add_parser("demo", help="every task pair on held-out toy-world scenes, as an HTML gallery")
    d.add_argument("--out", required=True, help="folder for index.html, demo.json and the media")
    d.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    d.add_argument("--max-new-tokens", type=int, default=48)
    d.add_argument("--steps", type=int, default=None, help="diffusion steps (default: the decoder's)")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_demo)
    from xvila.train.cli import register as register_train  # xvila train ... (light import)

    register_train(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    # `xvila train RECIPE --phase P key=value`: argparse leaves overrides that follow the options unparsed (its
    # intermixed parsing refuses sub-commands), so they join the ones before the options, in order
    if extras and hasattr(args, "overrides") and not any(e.startswith("-") for e in extras):
        args.overrides = [*args.overrides, *extras]
    elif extras:
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except CLIError as e:
        print(f"xvila: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("xvila: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
