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
    source: Literal["pooled", "patch"] = "patch"  # the shared-space embedding, or the trunk's patch tokens
    num_tokens: int = 4  # LLM tokens per media item

    def __post_init__(self):
        if self.kind not in ("linear", "mlp"):
            raise ValueError(f"input projection kind must be 'linear' or 'mlp', got {self.kind!r}")
        if self.source not in ("pooled", "patch"):
            raise ValueError(f"input projection source must be 'pooled' or 'patch', got {self.source!r}")
        if self.num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {self.num_tokens}")


class InputProjection(nn.Module):
    """Maps one encoder output to ``num_tokens`` LLM input embeddings per item."""

    def __init__(self, config: InputProjectionConfig, in_dim: int, llm_dim: int):
        super().__init__()
        self.config = config
        k = config.num_tokens
        # pooled: one E-vector expands to K tokens; patch: N tokens are average-pooled to K, then projected.
        out = llm_dim * k if config.source == "pooled" else llm_dim
        if config.kind == "linear":
            self.proj = nn.Linear(in_dim, out)
        else:
            self.proj = nn.Sequential(nn.Linear(in_dim, llm_dim), nn.GELU(), nn.Linear(llm_dim, out))
        self.llm_dim = llm_dim

    def forward(self, patch_embeds: Tensor, pooled_embeds: Tensor) -> Tensor:
        """patch_embeds (B, N, C), pooled_embeds (B, E) -> (B, K, D)."""
        k = self.config.num_tokens
        if self.config.source == "pooled":
            return self.proj(pooled_embeds).view(-1, k, self.llm_dim)
        pooled = F.adaptive_avg_pool1d(patch_embeds.transpose(1, 2), k).transpose(1, 2)  # (B, K, C)
        return self.proj(pooled)


@dataclass
class OutputProjectionConfig(Config):
    """NExT-GPT-style: Linear(D -> P), a small encoder-decoder transformer with Q learned queries, Linear(P -> D_cond)."""

    width: int = 512
    heads: int = 8
    encoder_layers: int = 2
    decoder_layers: int = 2
    dropout: float = 0.0

    def __post_init__(self):
        if self.width % self.heads:
            raise ValueError(f"output projection width {self.width} must be divisible by heads {self.heads}")


class OutputProjection(nn.Module):
    """Maps the K generation tokens' hidden states to the decoder's conditioning (Q, D_cond)."""

    def __init__(self, config: OutputProjectionConfig, llm_dim: int, cond_shape: tuple[int, int]):
        super().__init__()
        q, d_cond = cond_shape
        p = config.width
        self.cond_shape = (q, d_cond)
        # Per-feature statistics of the LLM hidden states it reads (identity until ``standardize`` sets them): an
        # LLM's final hidden features differ in scale by orders of magnitude, and unstandardized inputs made the
        # tiny projections collapse to one output for every caption.
        self.register_buffer("input_mean", torch.zeros(llm_dim))
        self.register_buffer("input_std", torch.ones(llm_dim))
        self.proj_in = nn.Linear(llm_dim, p)
        self.queries = nn.Parameter(torch.randn(q, p) * 0.02)
        layer = dict(d_model=p, nhead=config.heads, dim_feedforward=4 * p, dropout=config.dropout,
                     batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(**layer), config.encoder_layers,
                                             norm=nn.LayerNorm(p), enable_nested_tensor=False)
        self.decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(**layer), config.decoder_layers,
                                             norm=nn.LayerNorm(p))
        self.proj_out = nn.Linear(p, d_cond)

    @torch.no_grad()
    def standardize(self, gen_hidden: Tensor, eps: float = 1e-3) -> None:
        """Set the input statistics from example hidden states (N, K, D) of generation tokens."""
        flat = gen_hidden.reshape(-1, gen_hidden.shape[-1]).float()
        self.input_mean.copy_(flat.mean(0))
        self.input_std.copy_(flat.std(0) + eps)

    def forward(self, gen_hidden: Tensor) -> Tensor:
        """gen_hidden (B, K, D) -> (B, Q, D_cond)."""
        x = (gen_hidden - self.input_mean.to(gen_hidden.dtype)) / self.input_std.to(gen_hidden.dtype)
        src = self.proj_in(x)  # (B, K, P)
        tgt = self.queries.expand(src.shape[0], -1, -1)  # (B, Q, P)
        memory = self.encoder(src)  # (B, K, P)
        return self.proj_out(self.decoder(tgt, memory))  # (B, Q, D_cond)
