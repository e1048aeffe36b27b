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


class CLIError(Exception):
    """A problem with the user's input: printed as one line, exit code 2."""


def load_model(spec: str, seed: int = 0):
    import torch

    from xvila.config import XVilaConfig
    from xvila.model import XVilaModel

    if spec == TINY_RANDOM:
        torch.manual_seed(seed)
        return XVilaModel(XVilaConfig.tiny()).eval()
    if not Path(spec).is_dir():
        raise CLIError(f"--model {spec!r}: not a model folder (expected a directory written by save_pretrained, "
                       f"or {TINY_RANDOM!r})")
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

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for item in answer.media:
        if item.data is None:
            continue
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xvila", description="X-VILA: any-to-any text, image, video and audio")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="one turn: a prompt (and media) in, text and media out")
    g.add_argument("--prompt", required=True)
    g.add_argument("--image", action="append", help="an input image (repeatable)")
    g.add_argument("--video", action="append", help="an input video (repeatable)")
    g.add_argument("--audio", action="append", help="an input audio file (repeatable)")
    g.add_argument("--outputs", default="", help="modalities the answer must include, e.g. image,audio")
    g.add_argument("--out", default="out", help="folder for generated media")
    g.add_argument("--model", default=TINY_RANDOM, help=f"a saved model folder, or {TINY_RANDOM!r}")
    g.add_argument("--max-new-tokens", type=int, default=48)
    g.add_argument("--steps", type=int, default=None, help="diffusion steps (default: the decoder's)")
    g.add_argument("--no-highway", action="store_true", help="disable the Visual Embedding Highway")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--json", action="store_true", help="print the answer and written files as JSON")
    g.set_defaults(func=cmd_generate)
    return parser


COMMANDS = {"generate": cmd_generate}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return COMMANDS[args.command](args)
    except CLIError as e:
        print(f"xvila: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("xvila: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
