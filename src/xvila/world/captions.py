"""Captions: natural text naming shape, colour, size and motion, from many templates and synonyms.

The word tables here are the single source for both the captions and the text probe (which also accepts the
extra words in ``EXTRA_WORDS``, so that free text from a language model is read too).
"""

from __future__ import annotations

import re

import numpy as np

from xvila.world.scene import ATTRIBUTES, Scene

# attribute value -> words a caption may use for it
SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc", "ball"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle", "wedge"),
    "diamond": ("diamond", "rhombus", "lozenge"),
    "cross": ("cross", "plus sign"),
}
COLOUR_WORDS: dict[str, tuple[str, ...]] = {
    "red": ("red", "crimson", "scarlet"),
    "yellow": ("yellow", "golden"),
    "green": ("green", "emerald"),
    "cyan": ("cyan", "turquoise", "aqua"),
    "blue": ("blue", "cobalt"),
    "magenta": ("magenta", "fuchsia"),
}
SIZE_WORDS: dict[str, tuple[str, ...]] = {
    "small": ("small", "little", "tiny"),
    "large": ("large", "big", "huge"),
}
# motion -> (participle phrases, finite-verb phrases)
MOTION_PHRASES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "still": (
        ("standing still", "staying still", "sitting still", "resting in place", "not moving", "holding still"),
        ("stands still", "stays still", "does not move", "rests in place", "stays put", "holds still"),
    ),
    "left": (
        (
            "drifting left",
            "moving left",
            "sliding to the left",
            "gliding leftward",
            "heading left",
            "travelling to the left",
        ),
        ("drifts left", "moves left", "slides to the left", "glides leftward", "heads left", "travels to the left"),
    ),
    "right": (
        (
            "drifting right",
            "moving right",
            "sliding to the right",
            "gliding rightward",
            "heading right",
            "travelling to the right",
        ),
        (
            "drifts right",
            "moves right",
            "slides to the right",
            "glides rightward",
            "heads right",
            "travels to the right",
        ),
    ),
    "up": (
        ("rising", "moving up", "drifting upward", "floating up", "climbing", "gliding upward"),
        ("rises", "moves up", "drifts upward", "floats up", "climbs", "glides upward"),
    ),
    "down": (
        ("falling", "moving down", "sinking", "drifting downward", "dropping", "gliding downward"),
        ("falls", "moves down", "sinks", "drifts downward", "drops", "glides downward"),
    ),
}

# Fields: {S} size, {C} colour, {N} shape noun, {P} participle phrase, {F} finite phrase; a capitalised field
# ({Sc}, {Cc}) starts a sentence. "a" becomes "an" before a vowel afterwards.
TEMPLATES: tuple[str, ...] = (
    "a {S} {C} {N} {P}",
    "A {S} {C} {N} {F}.",
    "A {S} {C} {N}, {P}.",
    "There is a {S} {C} {N} {P}.",
    "A {S} {C} {N} that {F}.",
    "This {S} {C} {N} {F}.",
    "{Sc} and {C}, a {N} {F}.",
    "A {N}, {S} and {C}, {P}.",
    "A {S} {N} in {C} {P}.",
    "We see a {S} {C} {N} {P}.",
    "The {S} {C} {N} {F}.",
    "{Cc} {N}, {S}, {P}.",
    "a {C} {N}, {S}, {P}",
    "Watch a {S} {C} {N} {P}.",
    "A {S} {C} {N} is {P}.",
)

# Extra words the text probe accepts beyond the caption words (free text from a model).
EXTRA_WORDS: dict[str, dict[str, tuple[str, ...]]] = {
    "shape": {
        "circle": ("disk", "orb"),
        "square": ("cube", "rectangle"),
        "triangle": ("pyramid", "triangular"),
        "diamond": ("rhomb",),
        "cross": ("plus",),
    },
    "colour": {
        "red": ("ruby",),
        "yellow": ("gold", "lemon"),
        "green": ("lime",),
        "cyan": ("teal",),
        "blue": ("navy", "azure", "sapphire"),
        "magenta": ("pink", "purple", "violet"),
    },
    "size": {"small": ("smaller", "mini"), "large": ("bigger", "larger", "giant")},
}

_AN = re.compile(r"\b([Aa]) (?=[aeiouAEIOU])")


def _picker(rng: np.random.Generator):
    """``pick(options)``: one of ``options``, drawn from ``rng`` (one integer draw per call)."""
    return lambda options: options[rng.integers(len(options))]


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A caption of ``scene``'s shape, colour, size and motion (never its position or other hidden details)."""
    pick = _picker(rng)
    template = pick(TEMPLATES)
    size, colour = pick(SIZE_WORDS[scene.size]), pick(COLOUR_WORDS[scene.colour])
    participles, finites = MOTION_PHRASES[scene.motion]
    text = template.format(
        S=size,
        Sc=size.capitalize(),
        C=colour,
        Cc=colour.capitalize(),
        N=pick(SHAPE_WORDS[scene.shape]),
        P=pick(participles),
        F=pick(finites),
    )
    return _AN.sub(r"\1n ", text)


GENERIC_NOUNS: tuple[str, ...] = ("shape", "thing", "object")  # the noun of a partial caption that omits the shape


def partial_caption(scene: Scene, rng: np.random.Generator, named: tuple[str, ...] | None = None) -> str:
    """A caption naming only the attributes in ``named`` (default: a random non-empty proper subset of
    ``ATTRIBUTES``), e.g. "a red shape", "A cross that drifts left.": what a caption of any scene that shares
    those attributes could say. With every attribute named it is a full caption of a short form."""
    if named is None:
        k = int(rng.integers(1, len(ATTRIBUTES)))
        named = tuple(ATTRIBUTES[i] for i in sorted(rng.choice(len(ATTRIBUTES), size=k, replace=False)))
    unknown = set(named) - set(ATTRIBUTES)
    if not named or unknown:
        raise ValueError(f"partial_caption: name a non-empty subset of {ATTRIBUTES}, got {named}")
    pick = _picker(rng)
    words = []
    if "size" in named:
        words.append(pick(SIZE_WORDS[scene.size]))
    if "colour" in named:
        words.append(pick(COLOUR_WORDS[scene.colour]))
    words.append(pick(SHAPE_WORDS[scene.shape]) if "shape" in named else pick(GENERIC_NOUNS))
    text = "a " + " ".join(words)
    if "motion" in named:
        participles, finites = MOTION_PHRASES[scene.motion]
        text = f"A {text[2:]} that {pick(finites)}." if rng.integers(2) else f"{text} {pick(participles)}"
    return _AN.sub(r"\1n ", text)


def caption_vocabulary() -> list[str]:
    """Every word a caption can contain, sorted (e.g. to extend a tokenizer's training corpus)."""
    parts = list(TEMPLATES)
    for table in (SHAPE_WORDS, COLOUR_WORDS, SIZE_WORDS):
        parts += [w for words in table.values() for w in words]
    parts += [p for pair in MOTION_PHRASES.values() for group in pair for p in group] + list(GENERIC_NOUNS)
    words = set(re.findall(r"[a-z]+", re.sub(r"\{\w+\}", " ", " ".join(parts)).lower()))
    return sorted(words | {"an"})
