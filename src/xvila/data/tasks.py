"""X-VILA's training conversations, built from aligned clips (toy world or real corpora).

Every task is a builder ``build(clips, rng, spec) -> list[Message]`` registered by name in :data:`TASKS`:
``clips[-1]`` is the clip the sample is about and ``clips[:-1]`` the earlier clips of its group (its long video),
which only the ``interleaved`` task reads. The same (clips, seed, spec) always give the same conversation.

Phases (:data:`TASKS_BY_PHASE`):
1. alignment: ``image->text``, ``video->text``, ``audio->text`` (captioning) and ``text->image``, ``text->video``,
   ``text->audio`` (generation), one turn each;
2. ``interleaved``: consecutive clips of one group with their captions, several media items per sample;
3. X-to-X instruction tuning: media->media pairs (``video->image`` ... ``image+audio->video``,
   ``image->video+audio``), text->X, X->text, attribute questions (``image-qa`` ...) and ``edit``, each followed
   by up to ``spec.follow_ups`` further turns about the same subject (describe it, ask about it, make it in
   another modality, edit it).

``chat`` (in no phase's default mixture) is ordinary text chat without media: general questions with the base
LLM's own answers (``TaskSpec.chat``, see :mod:`xvila.data.chat`), mixed into X-to-X tuning so the LLM keeps
answering them.

Answers that produce media hold the generation tokens (``[VID0]..``) and carry their targets as
:class:`~xvila.conversation.MediaItem` s with the target caption; items taken from a stored clip have the key
``"{clip.key}/{modality}"`` (for feature caches), re-rendered items (edits) have none. Attribute questions and
edits need toy-world clips (their scene is in ``clip.meta``); the other tasks work on any corpus. Stored media
are fitted to ``spec``'s input / output shapes (:func:`fit_media`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from xvila.conversation import MediaItem, Message, gen_run_text
from xvila.data.records import AlignedClip
from xvila.data.world import quantise, world_scene
from xvila.modalities import get_modality
from xvila.world import (
    ATTRIBUTES,
    MODALITY_ATTRIBUTES,
    Scene,
    WorldConfig,
    caption,
    render_audio,
    render_image,
    render_video,
    split_allowed,
)
from xvila.world.captions import COLOUR_WORDS, MOTION_PHRASES, SHAPE_WORDS, SIZE_WORDS
from xvila.world.scene import start_range

MEDIA = ("image", "video", "audio")


# ============================================================================================ spec and media sizes
@dataclass
class TaskSpec:
    """What the model reads and writes: the conversations are built for it.

    gen_tokens: output modality -> K generation tokens per item (only these modalities are generated).
    inputs: the modalities the model reads.
    input_shapes / output_shapes: modality -> one item's shape (repo conventions); stored media of another size
        are resized. A modality missing here keeps its stored size.
    follow_ups: at most this many extra turns after a phase-3 conversation's first (uniform in 0..follow_ups).
    max_context: ``interleaved`` shows at most this many earlier clips of the group.
    media_tokens: LLM positions one input item takes once spliced (its placeholder becomes this many tokens);
        the loader counts them against ``max_length``.
    chat: (question, answer) pairs of ordinary text chat for the ``chat`` task (the base LLM's own answers,
        ``xvila.data.chat.rehearsal_pairs``); empty: the task is unavailable.
    """

    gen_tokens: dict[str, int]
    inputs: tuple[str, ...] = MEDIA
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    output_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    follow_ups: int = 0
    max_context: int = 3
    media_tokens: int = 1
    chat: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        for m in list(self.gen_tokens) + list(self.inputs):
            if m not in MEDIA:
                raise ValueError(f"unknown modality {m!r}; known: {list(MEDIA)}")
        if any(k < 1 for k in self.gen_tokens.values()):
            raise ValueError(f"gen_tokens must be >= 1 per modality, got {self.gen_tokens}")
        if self.follow_ups < 0 or self.max_context < 1 or self.media_tokens < 1:
            raise ValueError(f"need follow_ups >= 0, max_context >= 1 and media_tokens >= 1, got {self.follow_ups}, "
                             f"{self.max_context}, {self.media_tokens}")

    @property
    def outputs(self) -> tuple[str, ...]:
        return tuple(m for m in MEDIA if m in self.gen_tokens)

    @classmethod
    def from_model(cls, model, follow_ups: int = 0, max_context: int = 3) -> TaskSpec:
        """The spec of an :class:`~xvila.model.XVilaModel`: its generation tokens and media shapes."""
        outputs = model.config.output_modalities
        return cls(
            gen_tokens=dict(model.config.gen_tokens),
            inputs=tuple(model.config.input_modalities),
            input_shapes={m: tuple(model.input_shape(m)) for m in model.config.input_modalities},
            output_shapes={m: tuple(model.output_shape(m)) for m in outputs},
            follow_ups=follow_ups,
            max_context=max_context,
            media_tokens=model.config.input_projection.num_tokens,
        )

    def replace(self, **changes) -> TaskSpec:
        return dataclasses.replace(self, **changes)


def _centre_crop_aspect(x: Tensor, height: int, width: int) -> Tensor:
    """(..., H, W) -> the centred crop with the aspect ratio of height x width."""
    H, W = x.shape[-2:]
    if H * width > W * height:  # too tall
        h = max(1, round(W * height / width))
        top = (H - h) // 2
        return x[..., top : top + h, :]
    w = max(1, round(H * width / height))
    left = (W - w) // 2
    return x[..., left : left + w]


def _resize_frames(x: Tensor, height: int, width: int) -> Tensor:
    """(N, 3, H, W) -> (N, 3, height, width): centre crop to the aspect ratio, then bilinear (antialiased)."""
    if x.shape[-2:] == (height, width):
        return x
    x = _centre_crop_aspect(x, height, width)
    return F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)


def fit_media(modality: str, x: Tensor, shape: tuple[int, ...] | None) -> Tensor:
    """Resize one item to ``shape`` (None: unchanged).

    image (3, H, W): centre crop to the aspect ratio, bilinear; video (T, 3, H, W): frames picked at the centres
    of T' equal segments (repeating frames when T' > T), each resized like an image; audio (S,): cropped or
    zero-padded at the end.
    """
    if shape is None or tuple(x.shape) == tuple(shape):
        return x
    if modality == "image":
        return _resize_frames(x[None], shape[1], shape[2])[0]
    if modality == "video":
        T = x.shape[0]
        idx = [min(T - 1, int((i + 0.5) * T / shape[0])) for i in range(shape[0])]
        return _resize_frames(x[idx], shape[2], shape[3])
    if modality == "audio":
        (S,) = shape
        return x[:S] if x.shape[0] >= S else F.pad(x, (0, S - x.shape[0]))
    raise ValueError(f"unknown modality {modality!r}")


def _to_float(modality: str, stored: np.ndarray) -> Tensor:
    if modality == "audio":
        return torch.from_numpy(stored.astype(np.float32) / np.float32(32767))
    return torch.from_numpy(np.moveaxis(stored, -1, -3).astype(np.float32, order="C") / np.float32(255))


def clip_tensor(clip: AlignedClip, modality: str) -> Tensor:
    """One stored item as float media, equal to ``clip.tensors()[modality]`` (computed in numpy: tiny torch ops
    cost milliseconds each when the cores are busy, and this runs between training steps)."""
    return _to_float(modality, getattr(clip, modality))


# ============================================================================================ words and templates
NOUNS: dict[str, tuple[str, ...]] = {
    "image": ("image", "picture", "photo", "frame"),
    "video": ("video", "clip", "animation"),
    "audio": ("sound", "audio clip", "audio", "soundtrack"),
}
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth")

CAPTION_PROMPTS: dict[str, tuple[str, ...]] = {
    "image": ("Describe this image.", "What is in this picture?", "What do you see?", "Caption this picture.",
              "Give a short caption for the image.", "Tell me what the image shows.", "What does this photo show?"),
    "video": ("Describe this video.", "What happens in this clip?", "What is going on in the video?",
              "Caption this clip.", "Summarise the video in one sentence.", "Tell me what you see in this video."),
    "audio": ("What scene does this sound come from?", "Describe what you hear.", "Listen and describe the scene.",
              "Caption this sound.", "What could be making this sound?", "Tell me what this audio describes."),
}
DESCRIBE_FOLLOW_UPS = ("Describe it.", "What is it?", "Now describe it in words.", "Can you caption it?",
                       "What does it show?", "Tell me what it is.")
TEXT_TO_X: tuple[str, ...] = (
    "Generate {a_t} of this: {c}", "Make {a_t} showing this: {c}", "{c} Show me this as {a_t}.",
    "Can you create {a_t} for the following description? {c}", "Please produce {a_t}. Description: {c}",
    "I want {a_t} of this scene: {c}", "Turn this description into {a_t}: {c}",
)
TEXT_TO_X_SPECIAL: dict[str, tuple[str, ...]] = {
    "image": ("Draw this: {c}", "Paint a picture of this: {c}"),
    "video": ("Animate this: {c}", "Film this scene: {c}"),
    "audio": ("What would this sound like? {c}", "Make the sound of this scene: {c}"),
}
X_TO_X: tuple[str, ...] = (
    "Turn this {s} into {a_t}.", "Make {a_t} from this {s}.", "Generate {a_t} that matches this {s}.",
    "Here is {a_s}. Can you give me {a_t} of the same scene?", "Convert the {s} to {a_t}.",
    "Show me this {s} as {a_t}.", "Give me the {t} that goes with this {s}.",
)
X_TO_X_SPECIAL: dict[tuple[str, str], tuple[str, ...]] = {
    ("video", "image"): ("Give me a still frame of this video.", "Show the first frame of this clip as a picture."),
    ("image", "video"): ("Animate this picture.", "Bring this image to life as a video."),
    ("video", "audio"): ("What does this video sound like? Play it.", "Give this clip a soundtrack."),
    ("audio", "video"): ("Show me a video of what makes this sound.", "Make a video that goes with this sound."),
    ("image", "audio"): ("Make a sound for this picture.", "What would this image sound like?"),
    ("audio", "image"): ("Draw what this sound looks like.", "Picture this sound for me."),
    ("image+audio", "video"): (
        "Animate this picture so that it matches the sound.", "Here is a frame and its sound. Make the video.",
        "Combine this image and this audio into a video.",
        "Make a video that looks like the picture and sounds like the audio.",
    ),
    ("image", "video+audio"): ("Turn this picture into a video with its sound.", "Make a video and a sound of this.",
                               "Animate this picture and give it a soundtrack."),
}
GENERATE_FOLLOW_UPS: tuple[str, ...] = (
    "Now make {a_t} of it.", "Can you also show it as {a_t}?", "Give me {a_t} of the same thing.",
    "And {a_t}, please.", "Now generate the matching {t}.",
)
ONE_ANSWER: tuple[str, ...] = ("{d} {r}", "Here is the {t}. {d} {r}", "Sure! {d} {r}", "Here you go. {d} {r}",
                               "{d} Here is {a_t} of it: {r}", "I made {a_t}. {d} {r}")
EDIT_ANSWERS: tuple[str, ...] = ("{d} {r}", "Here it is. {d} {r}", "Done. {d} {r}",
                                 "Sure, here is the edited {t}. {d} {r}")
QUESTIONS: dict[str, tuple[str, ...]] = {
    "shape": ("What shape is it?", "What shape do you see?", "Which shape is this?", "What kind of shape is it?"),
    "colour": ("What colour is it?", "What color is the shape?", "Which colour does it have?",
               "What colour is the shape?"),
    "size": ("Is it big or small?", "How big is the shape?", "Is the shape large or small?", "What size is it?"),
    "motion": ("How does it move?", "Which way is it moving?", "Does it move? Which way?", "What is the shape doing?"),
}
ANSWERS: dict[str, tuple[str, ...]] = {
    "shape": ("It is a {w}.", "A {w}.", "That is a {w}.", "It's a {w}."),
    "colour": ("It is {w}.", "{W}.", "The shape is {w}.", "It's {w}."),
    "size": ("It is {w}.", "{W}.", "It's a {w} one.", "The shape is {w}."),
    "motion": ("It {w}.", "The shape {w}.", "It {w}, as far as I can tell."),
}
EDIT_PROMPTS: dict[str, tuple[str, ...]] = {
    "colour": ("Now make it {w}.", "Make it {w}.", "Change the colour to {w}.", "Can you make it {w} instead?",
               "Recolour it {w}.", "Same thing, but {w}."),
    "shape": ("Turn it into a {w}.", "Make it a {w} instead.", "Change the shape to a {w}.",
              "Same thing, but as a {w}.", "Replace the shape with a {w}."),
    "size": ("Make it {w}.", "Now make it {w}.", "Same thing, but {w}.", "Change its size: make it {w}."),
    "motion": ("Make it {w}.", "Now let it {w}.", "Have it {w} instead.", "Change the motion: make it {w}."),
}
EDIT_SIZE_WORDS = {"small": ("smaller", "small", "little"), "large": ("bigger", "large", "big")}
MOTION_VERBS = {
    "still": ("stay still", "stand still", "hold still"),
    "left": ("move left", "drift left", "slide to the left"),
    "right": ("move right", "drift right", "slide to the right"),
    "up": ("move up", "rise", "float up"),
    "down": ("move down", "fall", "sink"),
}
EDIT_LEADS = ("", "Edit this {s}: ", "Here is {a_s}. ", "Look at this {s}. ")
STILL_TEMPLATES = ("a {S} {C} {N}", "A {S} {C} {N}.", "There is a {S} {C} {N}.", "A {N}, {S} and {C}.",
                   "We see a {S} {C} {N}.", "A {S} {N} in {C}.", "{Cc} {N}, {S}.", "A picture of a {S} {C} {N}.")
INTERLEAVED_OPENERS = ("Here is the first part of a long video.", "A long video, clip by clip. The first one:",
                       "Let's go through this video part by part.", "Here is how the video starts.")
INTERLEAVED_NEXT = ("And the next part?", "What happens next?", "The {o} clip:", "Now this one.",
                    "Describe the {o} part.", "Continue.")
INTERLEAVED_DOC = ("Consecutive clips of one video, with their captions:", "A video in parts:",
                   "Here are the parts of a long video.")
INTERLEAVED_LAST = ("What happens in the last clip?", "Describe the last part.", "Caption the final clip.",
                    "And what about the last one?")
INTERLEAVED_GENERATE = ("Next: {c} Show me this part as {a_t}.", "Then: {c} Make {a_t} of it.",
                        "The story goes on: {c} Generate {a_t} for this part.", "Continue with {a_t}: {c}")
INTERLEAVED_RECALL = ("What happened in the {o} clip?", "Remind me what the {o} part showed.",
                      "Describe the {o} clip again.")

_AN = re.compile(r"\b([Aa]) (?=[aeiouAEIOU])")


def _pick(rng: np.random.Generator, options: Sequence):
    return options[int(rng.integers(len(options)))]


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _fill(template: str, **fields: str) -> str:
    """Format a template with the fields it uses, and fix "a" before vowels."""
    return _AN.sub(r"\1n ", template.format(**fields)).strip()


def _word(rng: np.random.Generator, words: tuple[str, ...]) -> str:
    """The canonical word (first) half of the time, a synonym otherwise."""
    return words[0] if len(words) == 1 or rng.random() < 0.5 else _pick(rng, words[1:])


def _sentence(text: str) -> str:
    """A caption as a sentence inside a prompt: capitalised, ending in punctuation."""
    text = text.strip()
    text = text[:1].upper() + text[1:]
    return text if text.endswith((".", "!", "?")) else text + "."


def _ordinal(i: int) -> str:
    return ORDINALS[i] if i < len(ORDINALS) else f"number {i + 1}"


def still_caption(scene: Scene, rng: np.random.Generator) -> str:
    """A caption of what a single frame shows: shape, colour and size, no motion."""
    size, colour = _word(rng, SIZE_WORDS[scene.size]), _word(rng, COLOUR_WORDS[scene.colour])
    return _fill(_pick(rng, STILL_TEMPLATES), S=size, C=colour, Cc=colour.capitalize(),
                 N=_word(rng, SHAPE_WORDS[scene.shape]))


def attribute_words(attribute: str, value: str) -> tuple[str, ...]:
    """Words an answer may use for an attribute value (motion: finite verb phrases, e.g. "drifts left")."""
    if attribute == "motion":
        return MOTION_PHRASES[value][1]
    return {"shape": SHAPE_WORDS, "colour": COLOUR_WORDS, "size": SIZE_WORDS}[attribute][value]


# ================================================================================================ the subject
class Dialogue:
    """A conversation being built about one subject: a stored clip, or a re-rendered edit of its toy-world scene.

    ``known`` is the set of toy-world attributes the user's inputs so far can carry: questions and descriptions
    only ask for those (an image shows no motion).
    """

    def __init__(self, clip: AlignedClip, rng: np.random.Generator, spec: TaskSpec):
        self.clip, self.rng, self.spec = clip, rng, spec
        world = world_scene(clip)
        self.scene: Scene | None = world[0] if world else None
        self.world: WorldConfig | None = world[1] if world else None
        self.split: str | None = world[2] if world else None
        self.caption = clip.caption
        self.edited = False
        self.known: set[str] = set()
        self.messages: list[Message] = []
        self.last_output: str | None = None

    # ------------------------------------------------------------------------------------ media of the subject
    def item(self, modality: str, output: bool) -> MediaItem:
        shape = (self.spec.output_shapes if output else self.spec.input_shapes).get(modality)
        if self.edited:
            data, key = self._render(modality), None
        else:
            data, key = clip_tensor(self.clip, modality), f"{self.clip.key}/{modality}"
        return MediaItem(modality, fit_media(modality, data, shape), self.caption if output else None, key)

    def _render(self, modality: str) -> Tensor:
        """The edited scene rendered, quantised like stored clips (uint8 pixels, int16 samples)."""
        render = {"image": render_image, "video": render_video, "audio": render_audio}[modality]
        stored = quantise(modality, render(self.scene, self.world))
        return _to_float(modality, stored)

    def describe(self) -> str:
        """The subject's caption; for toy-world subjects whose motion is unknown, a still caption."""
        if self.scene is not None and "motion" not in self.known:
            return still_caption(self.scene, self.rng)
        return self.caption

    def can_describe(self) -> bool:
        return self.scene is None or set(ATTRIBUTES) - {"motion"} <= self.known

    def sees(self, modalities) -> None:
        """The user gave these inputs: what they carry becomes known."""
        for m in modalities:
            self.known |= set(MODALITY_ATTRIBUTES[m])

    # ------------------------------------------------------------------------------------------------- turns
    def add(self, user: str, user_media: list[MediaItem], answer: str, answer_media: list[MediaItem] = ()) -> None:
        self.messages.append(Message("user", user, list(user_media)))
        self.messages.append(Message("assistant", answer, list(answer_media)))

    def user_text(self, instruction: str, media: list[MediaItem]) -> str:
        """The instruction with the items' placeholders before it (usually) or after it."""
        if not media or self.rng.random() < 0.7:
            return instruction  # placeholders go before the text (see xvila.conversation)
        return instruction + "\n" + "".join(get_modality(i.modality).placeholder for i in media)

    def answer_runs(self, targets: list[MediaItem], templates: tuple[str, ...] = ONE_ANSWER,
                    description: str | None = None) -> str:
        """The answer that generates ``targets``: the subject's description, then the generation runs. Written in
        that order, the runs' hidden states can read the description; the output projections map them to the
        decoders' conditioning, and from runs that came first they learned one conditioning for every caption."""
        runs = [gen_run_text(t.modality, self.spec.gen_tokens[t.modality]) for t in targets]
        if len(targets) == 1:
            noun = _pick(self.rng, NOUNS[targets[0].modality])
            d = description if description is not None else self.describe()
            return _fill(_pick(self.rng, templates), r=runs[0], t=noun, a_t=_a(noun), d=d)
        nouns = [NOUNS[t.modality][0] for t in targets]
        d = description if description is not None else self.describe()
        style = int(self.rng.integers(3))
        if style == 0:
            return d + " " + " ".join(runs)
        if style == 1:
            return f"Here they are. {d} " + " ".join(f"{n.capitalize()}: {r}" for n, r in zip(nouns, runs))
        return f"{d} Sure: " + ", and ".join(f"the {n} {r}" for n, r in zip(nouns, runs))

    def generate(self, sources: tuple[str, ...], targets: tuple[str, ...]) -> None:
        """One turn: the user gives the subject as ``sources`` (none: its caption) and asks for ``targets``."""
        rng = self.rng
        t_nouns = [_pick(rng, NOUNS[t]) for t in targets]
        t_phrase = " and ".join(_a(n) for n in t_nouns)
        if not sources:
            options = TEXT_TO_X + (TEXT_TO_X_SPECIAL.get(targets[0], ()) if len(targets) == 1 else ())
            instruction = _fill(_pick(rng, options), a_t=t_phrase, c=_sentence(self.caption))
            self.known |= set(ATTRIBUTES)
            media = []
        else:
            key = ("+".join(sources), "+".join(targets))
            s_nouns = [_pick(rng, NOUNS[s]) for s in sources]
            generic = X_TO_X if len(sources) == 1 and len(targets) == 1 else ()
            options = generic + X_TO_X_SPECIAL.get(key, ())
            instruction = _fill(_pick(rng, options), s=" and this ".join(s_nouns), a_s=_a(s_nouns[0]),
                                t=t_nouns[0], a_t=t_phrase)
            media = [self.item(s, output=False) for s in sources]
            self.sees(sources)
        outputs = [self.item(t, output=True) for t in targets]
        self.add(self.user_text(instruction, media), media, self.answer_runs(outputs), outputs)
        self.last_output = targets[-1]

    def caption_turn(self, source: str | None) -> None:
        """The user gives the subject as ``source`` (None: a follow-up about "it") and asks for a description."""
        if source is None:
            self.add(_pick(self.rng, DESCRIBE_FOLLOW_UPS), [], self.describe())
            return
        media = [self.item(source, output=False)]
        self.sees([source])
        self.add(self.user_text(_pick(self.rng, CAPTION_PROMPTS[source]), media), media, self.describe())

    def question(self, source: str | None) -> None:
        """An attribute question, about the subject given as ``source`` or (None) about "it"."""
        media = []
        if source is not None:
            media = [self.item(source, output=False)]
            self.sees([source])
        attribute = _pick(self.rng, sorted(self.known & set(ATTRIBUTES)))
        value = getattr(self.scene, attribute)
        w = _word(self.rng, attribute_words(attribute, value))
        answer = _fill(_pick(self.rng, ANSWERS[attribute]), w=w, W=w.capitalize())
        text = _pick(self.rng, QUESTIONS[attribute])
        self.add(self.user_text(text, media) if media else text, media, answer)

    def edits(self, modality: str) -> list[tuple[str, str]]:
        """(attribute, new value) edits that a ``modality`` item shows, that keep the scene's position valid and
        its (shape, colour) pair inside its split (a training edit never makes a held-out pair)."""
        if self.scene is None:
            return []
        config, scene = self.world, self.scene
        allowed = split_allowed(self.split, config)
        vocab = {"shape": config.shapes, "colour": config.colours, "size": config.sizes, "motion": config.motions}
        out = []
        for attribute in MODALITY_ATTRIBUTES[modality]:
            for value in vocab[attribute]:
                if value == getattr(scene, attribute):
                    continue
                new = dataclasses.replace(scene, **{attribute: value})
                if (new.shape, new.colour) not in allowed:
                    continue
                lo, hi = start_range(new.shape, config.extent(new.size), new.rotation, new.motion, config)
                if lo[0] <= new.x <= hi[0] and lo[1] <= new.y <= hi[1]:
                    out.append((attribute, value))
        return out

    def edit(self, modality: str, given: bool) -> tuple[str, str]:
        """Change one attribute of the scene, everything else kept (position included), and re-render.

        ``given``: the user gives the subject as a ``modality`` item; otherwise the edit is a follow-up about "it".
        The answer is the edited ``modality`` item with the edited scene's caption. Returns (attribute, value).
        """
        rng = self.rng
        options = self.edits(modality)
        attributes = sorted({a for a, _ in options})
        attribute = _pick(rng, attributes)
        value = _pick(rng, [v for a, v in options if a == attribute])
        if attribute == "size":
            w = _pick(rng, EDIT_SIZE_WORDS[value])
        elif attribute == "motion":
            w = _pick(rng, MOTION_VERBS[value])
        else:
            w = _word(rng, attribute_words(attribute, value))
        instruction = _fill(_pick(rng, EDIT_PROMPTS[attribute]), w=w)
        media = []
        if given:
            media = [self.item(modality, output=False)]
            self.sees([modality])
            s = _pick(rng, NOUNS[modality])
            instruction = _fill(_pick(rng, EDIT_LEADS), s=s, a_s=_a(s)) + " " + instruction
            instruction = instruction.strip()
        self.scene = dataclasses.replace(self.scene, **{attribute: value})
        self.caption = caption(self.scene, rng)
        self.edited = True
        self.known.add(attribute)
        target = self.item(modality, output=True)
        self.add(self.user_text(instruction, media), media, self.answer_runs([target], EDIT_ANSWERS), [target])
        self.last_output = modality
        return attribute, value

    # ---------------------------------------------------------------------------------------------- follow-ups
    def follow_up(self) -> None:
        """One more turn about the subject: describe it, ask about it, make it in another modality, or edit it."""
        rng = self.rng
        choices = []
        if self.spec.outputs:
            choices.append("generate")
        if self.can_describe():
            choices.append("describe")
        if self.scene is not None and self.known & set(ATTRIBUTES):
            choices.append("question")
        edit_modality = self.last_output if self.last_output in self.spec.outputs else None
        if edit_modality is not None and self.edits(edit_modality):
            choices.append("edit")
        if not choices:  # a model without outputs, a subject it cannot describe or be asked about
            return
        kind = _pick(rng, choices)
        if kind == "generate":
            target = _pick(rng, self.spec.outputs)
            noun = _pick(rng, NOUNS[target])
            item = self.item(target, output=True)
            text = _fill(_pick(rng, GENERATE_FOLLOW_UPS), a_t=_a(noun), t=noun)
            self.add(text, [], self.answer_runs([item]), [item])
            self.last_output = target
        elif kind == "describe":
            self.caption_turn(None)
        elif kind == "question":
            self.question(None)
        else:
            self.edit(edit_modality, given=False)

    def follow_ups(self) -> list[Message]:
        for _ in range(int(self.rng.integers(self.spec.follow_ups + 1))):
            self.follow_up()
        return self.messages


# ================================================================================================ the registry
Builder = Callable[[Sequence[AlignedClip], np.random.Generator, TaskSpec], list[Message]]


@dataclass(frozen=True)
class Task:
    """A registered task: call it like its builder, ``task(clips, rng, spec) -> list[Message]``."""

    name: str
    build: Builder
    inputs: tuple[str, ...] = ()  # media the user gives (the model must read them)
    outputs: tuple[str, ...] = ()  # media the first answer generates (the model must write them)
    world_only: bool = False  # needs toy-world attributes (questions, edits)
    needs_context: bool = False  # needs earlier clips of the group (interleaved)

    def __call__(self, clips: Sequence[AlignedClip], rng: np.random.Generator, spec: TaskSpec) -> list[Message]:
        return self.build(clips, rng, spec)

    def supported(self, spec: TaskSpec) -> str | None:
        """None if a model with ``spec`` can train on this task, else why not."""
        missing_in = [m for m in self.inputs if m not in spec.inputs]
        missing_out = [m for m in self.outputs if m not in spec.gen_tokens]
        if missing_in:
            return f"task {self.name!r} needs {missing_in} input(s); the model reads {list(spec.inputs)}"
        if missing_out:
            return f"task {self.name!r} needs {missing_out} output(s); the model writes {list(spec.outputs)}"
        if self.name == "edit" and not set(spec.outputs) & set(spec.inputs):
            return "task 'edit' needs a modality the model both reads and writes"
        if self.name == "chat" and not spec.chat:
            return "task 'chat' needs rehearsal answers (TaskSpec.chat, from xvila.data.chat.rehearsal_pairs)"
        return None

    def applies(self, clips: Sequence[AlignedClip], spec: TaskSpec) -> bool:
        """Whether this sample (``clips[-1]`` with its earlier group clips) can be built for this task."""
        if self.needs_context and len(clips) < 2:
            return False
        if self.world_only:
            if world_scene(clips[-1]) is None:
                return False
            if self.name == "edit":
                dialogue = Dialogue(clips[-1], np.random.default_rng(0), spec)
                return any(dialogue.edits(m) for m in _edit_modalities(spec))
        return True


def _dialogue_builder(first_turn: Callable[[Dialogue], None]) -> Builder:
    """A conversation about the last clip: ``first_turn(dialogue)``, then the spec's follow-up turns."""

    def build(clips, rng, spec):
        d = Dialogue(clips[-1], rng, spec)
        first_turn(d)
        return d.follow_ups()

    return build


def _generation_builder(sources: tuple[str, ...], targets: tuple[str, ...]) -> Builder:
    return _dialogue_builder(lambda d: d.generate(sources, targets))


def _caption_builder(source: str) -> Builder:
    return _dialogue_builder(lambda d: d.caption_turn(source))


def _question_builder(source: str) -> Builder:
    return _dialogue_builder(lambda d: d.question(source))


def _edit_modalities(spec: TaskSpec) -> list[str]:
    return [m for m in MEDIA if m in spec.outputs and m in spec.inputs]


def build_edit(clips, rng, spec):
    d = Dialogue(clips[-1], rng, spec)
    modality = _pick(rng, [m for m in _edit_modalities(spec) if d.edits(m)])
    d.edit(modality, given=True)
    return d.follow_ups()


def build_interleaved(clips, rng, spec):
    """Consecutive clips of one group with their captions; the last clip is captioned or generated from its
    caption, or the conversation ends by recalling an earlier clip."""
    clips = list(clips[-(spec.max_context + 1):])
    inputs = [m for m in MEDIA if m in spec.inputs]
    weights = np.array([{"video": 3.0, "image": 1.0, "audio": 1.0}[m] for m in inputs])
    dialogues = [Dialogue(c, rng, spec) for c in clips]
    shown = [inputs[int(rng.choice(len(inputs), p=weights / weights.sum()))] for _ in clips]
    for d, m in zip(dialogues, shown):
        d.sees([m])
    variant = _pick(rng, ("turns", "document", "generate", "recall") if spec.outputs else
                    ("turns", "document", "recall"))
    messages: list[Message] = []
    last = len(clips) - 1
    context = clips if variant in ("turns", "recall") else clips[:-1]
    if variant == "document":
        media = [d.item(m, output=False) for d, m in zip(dialogues, shown)]
        lines = [_pick(rng, INTERLEAVED_DOC)]
        lines += [f"{get_modality(m).placeholder} {d.describe()}" for d, m in zip(dialogues[:-1], shown[:-1])]
        lines.append(get_modality(shown[-1]).placeholder + " " + _pick(rng, INTERLEAVED_LAST))
        return [Message("user", "\n".join(lines), media), Message("assistant", dialogues[-1].describe())]
    for i, (d, m) in enumerate(zip(dialogues[: len(context)], shown)):
        prompt = _pick(rng, INTERLEAVED_OPENERS) if i == 0 else _fill(_pick(rng, INTERLEAVED_NEXT), o=_ordinal(i))
        item = d.item(m, output=False)
        messages += [Message("user", d.user_text(prompt, [item]), [item]), Message("assistant", d.describe())]
    if variant == "generate":
        d = dialogues[last]
        target = _pick(rng, spec.outputs)
        noun = _pick(rng, NOUNS[target])
        item = d.item(target, output=True)
        text = _fill(_pick(rng, INTERLEAVED_GENERATE), c=_sentence(d.caption), a_t=_a(noun))
        messages += [Message("user", text), Message("assistant", d.answer_runs([item], description=d.caption),
                                                    [item])]
    elif variant == "recall":
        i = int(rng.integers(last))
        messages += [Message("user", _fill(_pick(rng, INTERLEAVED_RECALL), o=_ordinal(i))),
                     Message("assistant", dialogues[i].describe())]
    return messages


def build_chat(clips, rng, spec):
    """Ordinary text chat, no media: one question with the base LLM's answer (``spec.chat``), then up to
    ``spec.follow_ups`` more. The clip is not used."""
    messages = []
    for _ in range(1 + int(rng.integers(spec.follow_ups + 1))):
        question, answer = spec.chat[int(rng.integers(len(spec.chat)))]
        messages += [Message("user", question), Message("assistant", answer)]
    return messages


def _register() -> dict[str, Task]:
    tasks = []
    for m in MEDIA:
        tasks.append(Task(f"{m}->text", _caption_builder(m), inputs=(m,)))
        tasks.append(Task(f"text->{m}", _generation_builder((), (m,)), outputs=(m,)))
    pairs = [("video", "image"), ("image", "video"), ("video", "audio"), ("audio", "video"), ("image", "audio"),
             ("audio", "image")]
    for s, t in pairs:
        tasks.append(Task(f"{s}->{t}", _generation_builder((s,), (t,)), inputs=(s,), outputs=(t,)))
    tasks.append(Task("image+audio->video", _generation_builder(("image", "audio"), ("video",)),
                      inputs=("image", "audio"), outputs=("video",)))
    tasks.append(Task("image->video+audio", _generation_builder(("image",), ("video", "audio")),
                      inputs=("image",), outputs=("video", "audio")))
    for m in MEDIA:
        tasks.append(Task(f"{m}-qa", _question_builder(m), inputs=(m,), world_only=True))
    tasks.append(Task("edit", build_edit, world_only=True))
    tasks.append(Task("interleaved", build_interleaved, needs_context=True))
    tasks.append(Task("chat", build_chat))
    return {t.name: t for t in tasks}


TASKS: dict[str, Task] = _register()

TASKS_BY_PHASE: dict[int, tuple[str, ...]] = {
    1: ("image->text", "video->text", "audio->text", "text->image", "text->video", "text->audio"),
    2: ("interleaved",),
    3: ("video->image", "image->video", "video->audio", "audio->video", "image->audio", "audio->image",
        "image+audio->video", "image->video+audio", "text->image", "text->video", "text->audio", "image->text",
        "video->text", "audio->text", "image-qa", "video-qa", "audio-qa", "edit"),
}
PHASE_FOLLOW_UPS: dict[int, int] = {1: 0, 2: 0, 3: 2}  # TaskSpec.follow_ups per phase


def phase_mixture(phase: int) -> dict[str, float]:
    """The default mixture of a phase: its tasks, equally weighted."""
    if phase not in TASKS_BY_PHASE:
        raise ValueError(f"unknown phase {phase}; phases: {sorted(TASKS_BY_PHASE)}")
    return {name: 1.0 for name in TASKS_BY_PHASE[phase]}


@dataclass
class Sample:
    task: str
    messages: list[Message]
    clip_keys: tuple[str, ...] = ()  # the clips it was built from, the subject last


def build_sample(task: str, clips: Sequence[AlignedClip], rng: np.random.Generator, spec: TaskSpec) -> Sample:
    """Build one conversation of ``task`` about ``clips[-1]`` (with earlier group clips before it)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; tasks: {sorted(TASKS)}")
    t = TASKS[task]
    why = t.supported(spec)
    if why:
        raise ValueError(why)
    if not t.applies(clips, spec):
        raise ValueError(f"task {task!r} does not apply to clip {clips[-1].key!r} "
                         f"({'needs toy-world attributes' if t.world_only else 'needs earlier clips of its group'})")
    return Sample(task, t(clips, rng, spec), tuple(c.key for c in clips))


def check_mixture(mixture: dict[str, float], spec: TaskSpec) -> dict[str, float]:
    """Validate a task mixture against the registry and the model: returns it with weights normalised."""
    if not mixture:
        raise ValueError("the task mixture is empty: give at least one task, e.g. phase_mixture(1)")
    for name, weight in mixture.items():
        if name not in TASKS:
            raise ValueError(f"unknown task {name!r} in the mixture; tasks: {sorted(TASKS)}")
        if weight < 0:
            raise ValueError(f"task {name!r} has a negative weight {weight}")
        why = TASKS[name].supported(spec)
        if why and weight > 0:
            raise ValueError(why)
    total = sum(mixture.values())
    if total <= 0:
        raise ValueError("the task mixture's weights sum to 0")
    return {name: w / total for name, w in mixture.items() if w > 0}


def choose_task(mixture: dict[str, float], clips: Sequence[AlignedClip], rng: np.random.Generator,
                spec: TaskSpec) -> str | None:
    """A task drawn from ``mixture`` among those that apply to ``clips`` (weights renormalised), or None."""
    names = [n for n in mixture if TASKS[n].applies(clips, spec)]
    if not names:
        return None
    p = np.array([mixture[n] for n in names])
    return names[int(rng.choice(len(names), p=p / p.sum()))]
