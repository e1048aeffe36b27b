"""Tensor surgery for interleaving media tokens with text tokens. Pure, vectorised functions.

Shape legend: B batch, L text length, L2 spliced length, D hidden size, N media items, K tokens per item.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

IGNORE_INDEX = -100


@dataclass
class SpliceOutput:
    inputs_embeds: Tensor  # (B, L2, D)
    attention_mask: Tensor  # (B, L2) 1 for real positions
    labels: Tensor | None  # (B, L2) IGNORE_INDEX at media and padding positions
    input_ids: Tensor  # (B, L2) text ids where text stands, the placeholder id where media tokens stand, pad_id elsewhere
    media_mask: Tensor  # (B, L2) True where a media token stands


def splice_media(
    token_embeds: Tensor,
    input_ids: Tensor,
    attention_mask: Tensor,
    media: dict[int, Tensor],
    labels: Tensor | None = None,
    pad_id: int = 0,
    padding_side: str = "right",
) -> SpliceOutput:
    """Replace each placeholder token by its media item's K projected tokens.

    token_embeds: (B, L, D) embeddings of ``input_ids`` (placeholder rows are ignored).
    input_ids, attention_mask: (B, L). media: placeholder id -> (N, K, D), items in row-major order of appearance.
    Padding tokens (attention_mask 0) are kept where they are; the rows are padded to the longest spliced row
    on ``padding_side``.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    B, L, D = token_embeds.shape
    if input_ids.shape != (B, L) or attention_mask.shape != (B, L):
        raise ValueError(f"input_ids and attention_mask must be {(B, L)}, got {tuple(input_ids.shape)} and "
                         f"{tuple(attention_mask.shape)}")
    if labels is not None and labels.shape != (B, L):
        raise ValueError(f"labels must be {(B, L)}, got {tuple(labels.shape)}")

    counts = torch.ones_like(input_ids)  # (B, L) output positions each input token takes
    is_media = torch.zeros_like(input_ids, dtype=torch.bool)
    for pid, embeds in media.items():
        if embeds.ndim != 3 or embeds.shape[-1] != D:
            raise ValueError(f"media embeddings for placeholder {pid} must be (N, K, {D}), got {tuple(embeds.shape)}")
        is_ph = input_ids == pid
        found = int(is_ph.sum())
        if found != embeds.shape[0]:
            raise ValueError(f"the prompt holds {found} placeholder(s) with id {pid} but {embeds.shape[0]} media "
                             f"item(s) were given for it: each item needs exactly one placeholder")
        counts = torch.where(is_ph, embeds.shape[1], counts)
        is_media |= is_ph

    new_len = counts.sum(1)  # (B,)
    L2 = int(new_len.max())
    start = counts.cumsum(1) - counts  # (B, L) first output position of each input token
    if padding_side == "left":
        start = start + (L2 - new_len)[:, None]

    out_embeds = token_embeds.new_zeros(B, L2, D)
    out_mask = attention_mask.new_zeros(B, L2)
    out_ids = input_ids.new_full((B, L2), pad_id)
    out_labels = None if labels is None else labels.new_full((B, L2), IGNORE_INDEX)
    media_mask = torch.zeros(B, L2, dtype=torch.bool, device=input_ids.device)

    b, l = (~is_media).nonzero(as_tuple=True)  # text tokens
    dest = start[b, l]
    out_embeds[b, dest] = token_embeds[b, l]
    out_mask[b, dest] = attention_mask[b, l]
    out_ids[b, dest] = input_ids[b, l]
    if out_labels is not None:
        out_labels[b, dest] = labels[b, l]

    for pid, embeds in media.items():
        b, l = (input_ids == pid).nonzero(as_tuple=True)  # (N,) row-major: the order of the items
        K = embeds.shape[1]
        pos = start[b, l][:, None] + torch.arange(K, device=input_ids.device)  # (N, K)
        rows = b[:, None].expand(-1, K)
        out_embeds[rows, pos] = embeds.to(out_embeds.dtype)
        out_mask[rows, pos] = 1
        out_ids[rows, pos] = pid
        media_mask[rows, pos] = True

    return SpliceOutput(out_embeds, out_mask, out_labels, out_ids, media_mask)


def gather_runs(hidden: Tensor, input_ids: Tensor, run_ids: Tensor) -> Tensor:
    """Hidden states at every run of generation tokens, as (N, K, D).

    hidden: (B, L, D); input_ids: (B, L); run_ids: (K,) the generation token ids of one modality, in order.
    Each run must be the K tokens in order; runs are returned in row-major order of appearance.
    """
    return hidden[_run_positions(input_ids, run_ids)].view(-1, run_ids.numel(), hidden.shape[-1])


def _run_positions(input_ids: Tensor, run_ids: Tensor) -> Tensor:
    """(B, L) True at the generation tokens, after checking that they form complete runs of ``run_ids`` in order."""
    K = run_ids.numel()
    is_gen = torch.isin(input_ids, run_ids)  # (B, L)
    total = int(is_gen.sum())
    if total % K:
        raise ValueError(f"found {total} generation tokens, not a whole number of runs of {K}")
    ids = input_ids[is_gen].view(-1, K)  # (N, K)
    if not torch.equal(ids, run_ids.expand_as(ids)):
        raise ValueError(f"generation tokens must appear as complete runs {run_ids.tolist()} in order")
    return is_gen


def gather_run_windows(hidden: Tensor, input_ids: Tensor, run_ids: Tensor, context: int) -> tuple[Tensor, Tensor]:
    """Each generation run with the ``context`` positions before it: ((N, context + K, D) hidden states, (N,
    context + K) mask, False where a window reaches before its row's first position, whose states are zeros).
    ``context=0`` gives :func:`gather_runs` with an all-True mask. Runs in row-major order of appearance."""
    if context == 0:
        runs = gather_runs(hidden, input_ids, run_ids)
        return runs, torch.ones(runs.shape[:2], dtype=torch.bool, device=hidden.device)
    if context < 0:
        raise ValueError(f"context must be >= 0, got {context}")
    _run_positions(input_ids, run_ids)  # checks the runs
    rows, starts = (input_ids == run_ids[0]).nonzero(as_tuple=True)  # (N,) each, row-major like gather_runs
    offsets = torch.arange(-context, run_ids.numel(), device=hidden.device)  # (C + K,)
    positions = starts[:, None] + offsets  # (N, C + K)
    mask = positions >= 0
    windows = hidden[rows[:, None], positions.clamp(min=0)] * mask[..., None].to(hidden.dtype)
    return windows, mask


@dataclass
class Packing:
    """Right-padded rows packed into fewer rows (see :func:`pack_rows`).

    Shape legend: B rows of length L before, R rows of length C after.
    """

    source: Tensor  # (R, C) each packed position's index in the flattened (B * L) rows; B * L at padding
    target: Tensor  # (B, L) each position's index in the flattened (R * C) packed rows; R * C at padding
    position_ids: Tensor  # (R, C) 0, 1, ... within each sequence, and again over a packed row's trailing padding

    @staticmethod
    def _take(x: Tensor, index: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])
        return torch.cat([flat, flat.new_zeros(1, flat.shape[-1])])[index]  # the extra zero row fills padding

    def pack(self, x: Tensor) -> Tensor:
        """(B, L, D) -> (R, C, D)."""
        return self._take(x, self.source)

    def unpack(self, y: Tensor) -> Tensor:
        """(R, C, D) -> (B, L, D), zeros at the padding."""
        return self._take(y, self.target)


def _right_padded_lengths(attention_mask: Tensor) -> list[int] | None:
    """Each row's length, or None when there is no row or a row is not right-padded (its real positions are not a
    prefix)."""
    if attention_mask.shape[0] == 0:
        return None
    real = attention_mask.bool()
    lengths = real.sum(1)
    if not torch.equal(real, torch.arange(real.shape[1], device=real.device) < lengths[:, None]):
        return None
    return lengths.tolist()


def _first_fit(sizes: list[int], capacity: int) -> tuple[list[tuple[int, int]], list[int]]:
    """First-fit decreasing: ((packed row, offset) of each sequence, the filled length of each packed row)."""
    used: list[int] = []
    place = [(0, 0)] * len(sizes)
    for b in sorted(range(len(sizes)), key=lambda b: -sizes[b]):  # stable: ties keep their order
        n = sizes[b]
        r = next((r for r, u in enumerate(used) if u + n <= capacity), len(used))
        if r == len(used):
            used.append(0)
        place[b] = (r, used[r])
        used[r] += n
    return place, used


def _packing(attention_mask: Tensor, place: list[tuple[int, int]], used: list[int]) -> Packing:
    """The index tensors of a plan from :func:`_first_fit`."""
    B, L = attention_mask.shape
    R, C = len(used), max(used)
    device = attention_mask.device
    real = attention_mask.bool()
    t = torch.arange(L, device=device)
    row, offset = (torch.tensor(v, device=device) for v in zip(*place))
    target = torch.where(real, (row * C + offset)[:, None] + t, R * C)  # (B, L)
    source = torch.full((R * C,), B * L, dtype=torch.long, device=device)
    source[target[real]] = (torch.arange(B, device=device)[:, None] * L + t).expand(B, L)[real]
    c = torch.arange(C, device=device)
    position_ids = (c - torch.tensor(used, device=device)[:, None]).flatten()  # trailing padding counts from 0
    position_ids[target[real]] = t.expand(B, L)[real]
    return Packing(source.view(R, C), target, position_ids.view(R, C))


def pack_rows(attention_mask: Tensor, capacity: int | None = None) -> Packing | None:
    """Place the sequences of right-padded rows (B, L) end to end in as few rows of at most ``capacity`` positions
    (default L) as first-fit decreasing finds, so that the LLM runs over fewer padding positions; None when that
    saves no position, or when a row is not right-padded. The packed rows are as long as the longest of them.

    The LLM must keep packed sequences apart: give it ``position_ids`` and no attention mask, and transformers
    (pinned) builds a block-diagonal causal mask from where the positions restart. Each sequence keeps its positions
    0..n-1, so its hidden states are those of its unpacked row (tests/test_splice.py checks this).
    """
    B, L = attention_mask.shape
    if (sizes := _right_padded_lengths(attention_mask)) is None:
        return None
    place, used = _first_fit(sizes, max(capacity or L, max(sizes)))
    if len(used) * max(used) >= B * L:
        return None
    return _packing(attention_mask, place, used)


def cheapest_packing(attention_mask: Tensor, pair_cost: float) -> Packing | None:
    """The packing of right-padded rows (B, L) with the least estimated LLM cost, rows of L, 2L, ... BL positions
    tried; None when the unpacked rows cost least. A row of C positions is taken to cost C * (1 + pair_cost * C):
    its linear layers per position, and its attention per pair of positions (a masked attention kernel computes
    every pair), ``pair_cost`` being the ratio of the two per-position costs. Only the chosen plan's index tensors
    are built."""
    B, L = attention_mask.shape
    if (sizes := _right_padded_lengths(attention_mask)) is None:
        return None
    best, best_cost = None, B * L * (1 + pair_cost * L)
    for j in range(1, B + 1):
        place, used = _first_fit(sizes, max(j * L, max(sizes)))
        R, C = len(used), max(used)
        if R * C < B * L and R * C * (1 + pair_cost * C) < best_cost:
            best, best_cost = (place, used), R * C * (1 + pair_cost * C)
        if R == 1:
            break
    return None if best is None else _packing(attention_mask, *best)
