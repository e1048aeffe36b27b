"""Input projections (encoder features -> LLM tokens) and output projections (LLM hidden states -> decoder
conditioning). One module of each kind per modality; the modality is data, not code.

Shape legend: B items, N patch tokens, C encoder width, E shared embedding size, K tokens per item,
D LLM hidden size, Q decoder conditioning tokens, P output projection width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xvila.configuration import Config


@dataclass
class InputProjectionConfig(Config):
    kind: Literal["linear", "mlp"] = "linear"  # the paper uses one linear layer
    # "pooled": the shared-space embedding; "patch": the trunk's patch tokens; "both": one token from the pooled
    # embedding, then num_tokens - 1 from the patch tokens (the pooled one carries what contrastive training
    # concentrated there, e.g. a shape; the patch groups keep where and when, e.g. a motion)
    source: Literal["pooled", "patch", "both"] = "patch"
    num_tokens: int = 4  # LLM tokens per media item
    # > 0: each token becomes a softmax mixture of the LLM's own word embeddings, weighted by cosine similarity times
    # this scale, so the LLM reads media as (soft) words it already knows; 0: the projected vectors as they are
    vocabulary_scale: float = 0.0

    def __post_init__(self):
        if self.kind not in ("linear", "mlp"):
            raise ValueError(f"input projection kind must be 'linear' or 'mlp', got {self.kind!r}")
        if self.source not in ("pooled", "patch", "both"):
            raise ValueError(f"input projection source must be 'pooled', 'patch' or 'both', got {self.source!r}")
        if self.num_tokens < (2 if self.source == "both" else 1):
            raise ValueError(f"num_tokens must be >= {2 if self.source == 'both' else 1} for source "
                             f"{self.source!r}, got {self.num_tokens}")
        if self.vocabulary_scale < 0:
            raise ValueError(f"vocabulary_scale must be >= 0 (0: off), got {self.vocabulary_scale}")


class InputProjection(nn.Module):
    """Maps one encoder output to ``num_tokens`` LLM input embeddings per item."""

    def __init__(self, config: InputProjectionConfig, patch_dim: int, llm_dim: int, pooled_dim: int | None = None,
                 out_std: float | None = None):
        """``out_std``: the initial per-element std of the output tokens, e.g. that of the LLM's word embeddings
        (None: PyTorch's default init, which gives media tokens several times the norm of word embeddings)."""
        super().__init__()
        self.config = config
        k = config.num_tokens
        # pooled: one E-vector expands to K tokens; patch: N tokens are average-pooled to K, then projected;
        # both: the E-vector gives one token (``pooled_proj``) and the patch tokens the other K - 1 (``proj``).
        # Patch tokens come out of a LayerNorm (about unit variance per element); pooled embeddings have unit norm.
        if config.source == "pooled":
            self.proj = self._layer(pooled_dim, llm_dim, llm_dim * k, out_std, in_norm=1.0)
        else:
            self.proj = self._layer(patch_dim, llm_dim, llm_dim, out_std, in_norm=patch_dim**0.5)
        if config.source == "both":
            self.pooled_proj = self._layer(pooled_dim, llm_dim, llm_dim, out_std, in_norm=1.0)
        self.llm_dim = llm_dim

    def _layer(self, in_dim: int | None, llm_dim: int, out: int, out_std: float | None, in_norm: float) -> nn.Module:
        if in_dim is None:
            raise ValueError(f"input projection source {self.config.source!r} needs the pooled embedding's size")
        if self.config.kind == "linear":
            layer = last = nn.Linear(in_dim, out)
        else:
            layer = nn.Sequential(nn.Linear(in_dim, llm_dim), nn.GELU(), nn.Linear(llm_dim, out))
            last, in_norm = layer[2], (llm_dim / 2) ** 0.5  # about half the GELU's inputs pass
        if out_std is not None:
            nn.init.normal_(last.weight, std=out_std / in_norm)
            nn.init.zeros_(last.bias)
        return layer

    def forward(self, patch_embeds: Tensor, pooled_embeds: Tensor, words: Tensor | None = None) -> Tensor:
        """patch_embeds (B, N, C), pooled_embeds (B, E) -> (B, K, D). ``words`` (V, D): the LLM's word embeddings,
        needed when ``vocabulary_scale`` is set."""
        tokens = self.project(patch_embeds, pooled_embeds)
        if not self.config.vocabulary_scale:
            return tokens
        if words is None:
            raise ValueError("an input projection with vocabulary_scale > 0 needs the LLM's word embeddings")
        return self.mix_words(tokens, words)

    def project(self, patch_embeds: Tensor, pooled_embeds: Tensor) -> Tensor:
        """The projected vectors (B, K, D), before any mixing of words."""
        k = self.config.num_tokens
        if self.config.source == "pooled":
            return self.proj(pooled_embeds).view(-1, k, self.llm_dim)
        groups = k - 1 if self.config.source == "both" else k
        pooled = F.adaptive_avg_pool1d(patch_embeds.transpose(1, 2), groups).transpose(1, 2)  # (B, k', C)
        tokens = self.proj(pooled)
        if self.config.source == "both":
            tokens = torch.cat([self.pooled_proj(pooled_embeds).unsqueeze(1), tokens], dim=1)
        return tokens

    def word_logits(self, tokens: Tensor, words: Tensor) -> Tensor:
        """(B, K, D) vectors -> (B, K, V): scaled cosine similarity to each word embedding (V, D)."""
        return self.config.vocabulary_scale * F.normalize(tokens.float(), dim=-1) @ self._unit_words(words).T

    def _unit_words(self, words: Tensor) -> Tensor:
        """The word table (V, D), rows normalized: computed again only when the table is another tensor or has
        changed in place (the LLM's word embeddings are frozen, so once per device in practice)."""
        if words.requires_grad:
            return F.normalize(words.float(), dim=-1)
        key = (words.data_ptr(), words._version, tuple(words.shape), words.dtype, words.device)
        cached = getattr(self, "_unit_words_cache", None)  # (the table, its key, the normalized table)
        if cached is None or cached[1] != key:
            # the table is held, so its memory cannot go to another tensor with the same address
            cached = (words, key, F.normalize(words.float(), dim=-1))
            self._unit_words_cache = cached  # a plain attribute: never saved, never moved with the module
        return cached[2]

    def mix_words(self, tokens: Tensor, words: Tensor) -> Tensor:
        """(B, K, D) vectors -> (B, K, D) softmax mixtures of the word embeddings (V, D)."""
        return (self.word_logits(tokens, words).softmax(-1) @ words.float()).to(tokens.dtype)


@dataclass
class OutputProjectionConfig(Config):
    """NExT-GPT-style: Linear(D -> P), a small encoder-decoder transformer with Q learned queries, Linear(P -> D_cond)."""

    width: int = 512
    heads: int = 8
    encoder_layers: int = 2
    decoder_layers: int = 2
    dropout: float = 0.0
    # hidden states before each generation run that the projection reads too (0: the run's K tokens alone, as in
    # NExT-GPT and X-VILA). The answer's own words come before its runs ("A red circle moving left. [VID0]..."):
    # reading them, xvila-tiny's projections explained 84-85% of the caption embeddings' variance instead of 55-58%
    # (docs/training.md, "What the output projections read")
    context: int = 0

    def __post_init__(self):
        if self.width % self.heads:
            raise ValueError(f"output projection width {self.width} must be divisible by heads {self.heads}")
        if self.context < 0:
            raise ValueError(f"output projection context must be >= 0, got {self.context}")


class OutputProjection(nn.Module):
    """Maps a generation run's hidden states (its K tokens, after ``config.context`` states before it) to the
    decoder's conditioning (Q, D_cond)."""

    def __init__(self, config: OutputProjectionConfig, llm_dim: int, cond_shape: tuple[int, int], run_length: int):
        super().__init__()
        q, d_cond = cond_shape
        p = config.width
        self.cond_shape = (q, d_cond)
        self.window = config.context + run_length  # hidden states read per run
        # Per-feature statistics of the LLM hidden states it reads (identity until ``standardize`` sets them): an
        # LLM's final hidden features differ in scale by orders of magnitude, and unstandardized inputs made the
        # tiny projections collapse to one output for every caption.
        self.register_buffer("input_mean", torch.zeros(llm_dim))
        self.register_buffer("input_std", torch.ones(llm_dim))
        self.proj_in = nn.Linear(llm_dim, p)
        # where each state sits in the window: the context states are any words of the answer, told apart only by
        # where they are (the run's own tokens differ anyway)
        self.position = nn.Parameter(torch.zeros(self.window, p)) if config.context else None
        self.queries = nn.Parameter(torch.randn(q, p) * 0.02)
        layer = dict(d_model=p, nhead=config.heads, dim_feedforward=4 * p, dropout=config.dropout,
                     batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(**layer), config.encoder_layers,
                                             norm=nn.LayerNorm(p), enable_nested_tensor=False)
        self.decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(**layer), config.decoder_layers,
                                             norm=nn.LayerNorm(p))
        self.proj_out = nn.Linear(p, d_cond)

    @torch.no_grad()
    def standardize(self, states: Tensor, mask: Tensor | None = None, eps: float = 1e-3) -> None:
        """Set the input statistics from example run windows (N, W, D), over the positions ``mask`` (N, W) keeps."""
        flat = (states if mask is None else states[mask]).reshape(-1, states.shape[-1]).float()
        self.input_mean.copy_(flat.mean(0))
        self.input_std.copy_(flat.std(0) + eps)

    def forward(self, states: Tensor, mask: Tensor | None = None) -> Tensor:
        """states (B, W, D), W = context + K, and mask (B, W), False where a window has no state -> (B, Q, D_cond)."""
        if states.shape[1] != self.window:
            raise ValueError(f"the output projection reads {self.window} hidden states per run (context + run "
                             f"tokens), got {states.shape[1]}")
        x = (states - self.input_mean.to(states.dtype)) / self.input_std.to(states.dtype)
        src = self.proj_in(x)  # (B, W, P)
        if self.position is not None:
            src = src + self.position.to(src.dtype)
        padding = None if mask is None or bool(mask.all()) else ~mask
        tgt = self.queries.expand(src.shape[0], -1, -1)  # (B, Q, P)
        memory = self.encoder(src, src_key_padding_mask=padding)  # (B, W, P)
        return self.proj_out(self.decoder(tgt, memory, memory_key_padding_mask=padding))  # (B, Q, D_cond)
