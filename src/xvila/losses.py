"""X-VILA's training losses, each a small function; the model returns them separately and as a weighted total.

- ``lm``: next-token cross-entropy on answer tokens only (logits computed only where a label exists);
- ``align``: the projected generation embeddings against the decoder text encoder's embedding of the caption;
- ``denoise``: the decoder's denoising loss on the target media, conditioned on the projected embeddings;
- ``highway``: the same denoising loss with the Visual Embedding Highway's residuals added.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xvila.configuration import Config
from xvila.splice import IGNORE_INDEX

LOSS_NAMES = ("lm", "align", "denoise", "highway")


@dataclass
class LossWeights(Config):
    lm: float = 1.0
    align: float = 1.0
    denoise: float = 1.0
    highway: float = 0.0

    def __post_init__(self):
        for name in LOSS_NAMES:
            if getattr(self, name) < 0:
                raise ValueError(f"loss weight {name} must be >= 0, got {getattr(self, name)}")

    def active(self, name: str) -> bool:
        return getattr(self, name) > 0


def lm_loss(head: nn.Module, hidden: Tensor, labels: Tensor) -> Tensor:
    """hidden (B, L, D), labels (B, L): mean cross-entropy of predicting labels[t+1] from hidden[t]."""
    targets = labels[:, 1:]  # (B, L-1)
    mask = targets != IGNORE_INDEX
    if not mask.any():
        return hidden.sum() * 0.0  # keeps the graph (and DDP) connected when a batch has no answer
    logits = head(hidden[:, :-1][mask])  # (M, V): only the positions that carry a label
    return F.cross_entropy(logits.float(), targets[mask])


def align_loss(cond_embeds: Tensor, text_embeds: Tensor) -> Tensor:
    """cond_embeds, text_embeds (N, Q, D_cond): mean squared error, as NExT-GPT's textual alignment."""
    if cond_embeds.shape != text_embeds.shape:
        raise ValueError(f"alignment needs equal shapes, got {tuple(cond_embeds.shape)} and {tuple(text_embeds.shape)}")
    return F.mse_loss(cond_embeds.float(), text_embeds.float())


def total_loss(losses: dict[str, Tensor], weights: LossWeights) -> Tensor:
    parts = [getattr(weights, name) * losses[name] for name in LOSS_NAMES if name in losses]
    if not parts:
        raise ValueError("no loss was computed: every weight is 0 or the batch holds nothing to train on")
    return torch.stack(parts).sum()
