"""A scripted showcase of every task pair on held-out toy-world scenes, written as a self-contained HTML gallery.

Each case is one held-out ``test`` scene put to the model through the same generation API as ``xvila generate``
and ``xvila chat``: text->X, X->text, every X->Y among the media, image+audio->video, and a multi-turn edit
("show me ..." then "now make it ..."). The prompts come from the training task builders (``xvila.data.tasks``).
Inputs, outputs and the ground truth are saved as PNG / MP4 / WAV next to ``index.html`` (one row per turn:
prompt and inputs | answer and outputs | reference) and ``demo.json`` (the same, machine-readable).
"""

from __future__ import annotations

import html
import json
import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from xvila.configuration import Config
from xvila.conversation import Message
from xvila.data.records import AlignedClip
from xvila.data.tasks import TASKS, Dialogue, TaskSpec
from xvila.data.world import sample_clip
from xvila.decoders.audio import SAMPLE_RATE
from xvila.evaluation import prompt_of
from xvila.generation import Answer, GenerationConfig
from xvila.media import save_media
from xvila.modalities import MODALITIES, get_modality
from xvila.world import WorldConfig, split_sample

logger = logging.getLogger(__name__)

MEDIA: tuple[str, ...] = tuple(MODALITIES)
EDIT_CASE = "multi-turn edit"
CASES: tuple[str, ...] = (
    *(f"text->{m}" for m in MEDIA),
    *(f"{m}->text" for m in MEDIA),
    *(f"{s}->{t}" for s in MEDIA for t in MEDIA if s != t),
    "image+audio->video",
    EDIT_CASE,
)
DISPLAY_PX = 256  # on-page width of images and videos; small MP4s are written enlarged to about this width


@dataclass
class DemoConfig(Config):
    seed: int = 0  # picks the test scenes, the prompt wording and the sampling
    max_new_tokens: int = 48
    num_inference_steps: int | None = None  # None: each decoder's default
    guidance_scale: float | None = None
    cases: tuple[str, ...] = CASES

    def __post_init__(self):
        unknown = [c for c in self.cases if c not in CASES]
        if unknown:
            raise ValueError(f"unknown demo case(s) {unknown}; cases: {list(CASES)}")
        if self.seed < 0 or self.max_new_tokens < 1:
            raise ValueError(f"need seed >= 0 and max_new_tokens >= 1, got {self.seed} and {self.max_new_tokens}")
        if self.num_inference_steps is not None and self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {self.num_inference_steps}")


@dataclass
class SavedMedia:
    modality: str
    path: str  # relative to the demo folder
    marker: str | None = None  # for generated items: where the item stands in the answer, e.g. "<video 0>"


@dataclass
class DemoTurn:
    prompt: str
    inputs: list[SavedMedia]
    answer: str  # the answer text, with markers such as "<video 0>"
    outputs: list[SavedMedia]
    reference: str  # the ground truth: the target's caption, or the description the data would give
    reference_media: list[SavedMedia] = field(default_factory=list)


@dataclass
class DemoCase:
    name: str
    scene: str  # the test clip's key
    caption: str  # the scene's caption
    turns: list[DemoTurn]


def _slug(name: str) -> str:
    """``"image+audio->video"`` -> ``"image_and_audio_to_video"``."""
    return re.sub(r"[^a-z0-9]+", "_", name.replace("->", " to ").replace("+", " and ").lower()).strip("_")


class _Writer:
    """Saves items under one case's folder and returns their paths relative to the demo folder."""

    def __init__(self, root: Path, folder: str, world: WorldConfig):
        self.root, self.folder, self.world = root, folder, world

    def save(self, name: str, modality: str, data: torch.Tensor, sample_rate: int, marker: str | None = None
             ) -> SavedMedia:
        kwargs = {}
        if modality == "video":
            # nearest-neighbour upscaling: H.264's 4:2:0 chroma would smear the colours of 32x32 frames
            kwargs = {"fps": round(self.world.fps), "upscale": max(1, DISPLAY_PX // data.shape[-1])}
        elif modality == "audio":
            kwargs = {"sample_rate": sample_rate}
        relative = f"{self.folder}/{name}{get_modality(modality).suffixes[0]}"
        save_media(self.root / relative, modality, data.detach().float().cpu(), **kwargs)
        return SavedMedia(modality, relative, marker)


def _turn(model, history: list[Message], truth: Message, config: GenerationConfig, writer: _Writer,
          prefix: str) -> tuple[DemoTurn, Answer]:
    """Answer the user message ending ``history``; ``truth`` is the answer the data would give."""
    user = history[-1]
    answer = model.generate(history, config)
    inputs = [writer.save(f"{prefix}input_{item.modality}_{i}", item.modality, item.data, writer.world.sample_rate)
              for i, item in enumerate(user.media)]
    outputs = [writer.save(f"{prefix}output_{item.modality}_{item.index}", item.modality, item.data, SAMPLE_RATE,
                           item.marker)
               for item in answer.media if item.data is not None]
    reference_media = [writer.save(f"{prefix}reference_{item.modality}", item.modality, item.data,
                                   writer.world.sample_rate) for item in truth.media]
    reference = truth.media[0].caption if truth.media else truth.text
    return DemoTurn(user.text, inputs, answer.text, outputs, reference, reference_media), answer


def _edit_modality(spec: TaskSpec, dialogue: Dialogue) -> str | None:
    """The first output modality the subject can be edited in (image first: "show me ..." then "now make it ...")."""
    return next((m for m in spec.outputs if dialogue.edits(m)), None)


def _generation(config: DemoConfig, seed: int, outputs: tuple[str, ...]) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=config.max_new_tokens, seed=seed, outputs=outputs,
                            num_inference_steps=config.num_inference_steps, guidance_scale=config.guidance_scale)


def run_case(model, name: str, clip: AlignedClip, spec: TaskSpec, config: DemoConfig, seed: int,
             writer: _Writer) -> DemoCase | None:
    """One demo case about ``clip``; None when the model cannot do it."""
    if name != EDIT_CASE:
        if why := TASKS[name].supported(spec):
            logger.warning("skipping %s: %s", name, why)
            return None
        messages, truth = prompt_of(name, clip, spec, seed)
        target = name.split("->")[1]
        outputs = (target,) if target in MEDIA else ()
        turn, _ = _turn(model, messages, truth, _generation(config, seed, outputs), writer, "")
        return DemoCase(name, clip.key, clip.caption, [turn])

    dialogue = Dialogue(clip, np.random.default_rng(seed), spec)
    modality = _edit_modality(spec, dialogue)
    if modality is None:
        logger.warning("skipping %s: the model writes no modality the scene can be edited in", name)
        return None
    dialogue.generate((), (modality,))  # "show me ..."
    dialogue.edit(modality, given=False)  # "now make it ..."
    user1, truth1, user2, truth2 = dialogue.messages
    first, answer = _turn(model, [user1], truth1, _generation(config, seed, (modality,)), writer, "turn0_")
    second, _ = _turn(model, [user1, answer.as_message(), user2], truth2, _generation(config, seed + 1, (modality,)),
                      writer, "turn1_")
    return DemoCase(name, clip.key, clip.caption, [first, second])


@torch.no_grad()
def run_demo(model, out_dir: str | Path, config: DemoConfig | None = None, world: WorldConfig | None = None,
             progress: bool = False) -> list[DemoCase]:
    """Run every case of ``config``, each on its own held-out test scene, saving media under ``out_dir``."""
    config = config or DemoConfig()
    world = world or WorldConfig()
    model.eval()
    spec = TaskSpec.from_model(model)
    cases = []
    for name in tqdm(config.cases, desc="demo", unit="case", disable=not progress):
        index = CASES.index(name)
        start, end = world.seed_range("test")
        scene = (config.seed * len(CASES) + index) % (end - start)  # each seed shows its own scenes
        clip = sample_clip(split_sample("test", scene, world), "test", scene, world)
        writer = _Writer(Path(out_dir), f"{index + 1:02d}_{_slug(name)}", world)
        case = run_case(model, name, clip, spec, config, config.seed + index, writer)
        if case is not None:
            cases.append(case)
    return cases


def write_demo(model, out_dir: str | Path, config: DemoConfig | None = None, world: WorldConfig | None = None,
               progress: bool = False, title: str = "X-VILA demo") -> Path:
    """Run the demo and write ``out_dir/index.html`` (returned) and ``out_dir/demo.json``."""
    config = config or DemoConfig()
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"{out_dir} exists and is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    cases = run_demo(model, out_dir, config, world, progress)
    record = {"title": title, "config": config.to_dict(), "cases": [asdict(c) for c in cases]}
    (out_dir / "demo.json").write_text(json.dumps(record, indent=2) + "\n")
    index = out_dir / "index.html"
    index.write_text(render_html(cases, title, config))
    return index


# ================================================================================================ the page
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 72em; color: #222; }
section { margin-bottom: 2.5em; }
h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; }
table { border-collapse: collapse; width: 100%; table-layout: fixed; }
th, td { border: 1px solid #ddd; padding: .6em; vertical-align: top; text-align: left; }
th { background: #f4f4f4; }
.text { white-space: pre-wrap; margin: 0 0 .5em; }
.media { display: inline-block; margin: .3em .6em .3em 0; font-size: .8em; color: #666; }
.media img, .media video { display: block; width: DISPLAYpx; height: auto; image-rendering: pixelated;
  background: #000; }
.media audio { display: block; width: DISPLAYpx; }
.note { color: #666; font-size: .9em; }
""".replace("DISPLAY", str(DISPLAY_PX))


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # not allowed in HTML text


def _text(text: str) -> str:
    text = html.escape(_CONTROL.sub("\N{REPLACEMENT CHARACTER}", text))
    return f'<p class="text">{text}</p>' if text else ""


def _media(item: SavedMedia) -> str:
    src = html.escape(item.path, quote=True)
    tag = {
        "image": f'<img src="{src}" alt="{html.escape(item.marker or "image", quote=True)}">',
        "video": f'<video src="{src}" controls loop muted playsinline></video>',
        "audio": f'<audio src="{src}" controls></audio>',
    }[item.modality]
    label = html.escape(item.marker or item.modality)
    return f'<div class="media">{tag}{label}</div>'


def _row(turn: DemoTurn) -> str:
    cells = (
        _text(turn.prompt) + "".join(_media(m) for m in turn.inputs),
        _text(turn.answer) + "".join(_media(m) for m in turn.outputs),
        _text(turn.reference) + "".join(_media(m) for m in turn.reference_media),
    )
    return "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"


def render_html(cases: list[DemoCase], title: str, config: DemoConfig) -> str:
    """The gallery: one section per case, one row per turn (prompt and inputs | answer and outputs | reference)."""
    head = "<tr><th>prompt and inputs</th><th>answer and outputs</th><th>ground truth</th></tr>"
    sections = "\n".join(
        f'<section id="{html.escape(_slug(c.name), quote=True)}"><h2>{html.escape(c.name)}</h2>'
        f'<p class="note">test scene {html.escape(c.scene)}: {html.escape(c.caption)}</p>'
        f"<table>{head}{''.join(_row(t) for t in c.turns)}</table></section>"
        for c in cases
    )
    contents = " · ".join(f'<a href="#{html.escape(_slug(c.name), quote=True)}">{html.escape(c.name)}</a>'
                          for c in cases)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>\n"
        f"<h1>{html.escape(title)}</h1>\n"
        f'<p class="note">Held-out toy-world test scenes, seed {config.seed}. '
        "Small media are shown enlarged.</p>\n"
        f"<p>{contents}</p>\n{sections}\n</body></html>\n"
    )
