"""Conversations: multi-turn, interleaved, any number of media items per turn; and their model-ready batches.

A user message's text holds a placeholder (``<image>``, ``<video>``, ``<audio>``) where each attached item
stands; items without a placeholder in the text are put before the text, in order. An assistant message that
produces media holds a run of generation tokens (``[IMG0]..[IMG3]``) where each item stands, and carries the
target (caption and media) for the training losses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from xvila.llm import ChatTemplate
from xvila.modalities import get_modality
from xvila.splice import IGNORE_INDEX


@dataclass
class MediaItem:
    modality: str
    data: Tensor  # one item in the repo conventions: image (3,H,W), video (T,3,H,W), audio (S,)
    caption: str | None = None  # the target caption (for generated items: the alignment loss target)
    key: str | None = None  # where the item came from (e.g. "clipkey/video"), for feature caches; None if unknown

    def __post_init__(self):
        m = get_modality(self.modality)
        if self.data.ndim != m.sample_ndim:
            raise ValueError(f"a {self.modality} item must have {m.sample_ndim} dimensions, got shape "
                             f"{tuple(self.data.shape)}")


@dataclass
class Message:
    role: Literal["user", "assistant"]
    text: str
    media: list[MediaItem] = field(default_factory=list)

    def __post_init__(self):
        if self.role not in ("user", "assistant"):
            raise ValueError(f"message role must be 'user' or 'assistant', got {self.role!r}")


@dataclass
class GenerationTargets:
    """The items an answer must produce, for one output modality, in row-major order of their runs."""

    media: Tensor  # (N, ...) one modality's items
    captions: list[str]
    guides: list[tuple[str, int] | None]  # the visual input (modality, item index) that guides each, for the highway
    text_embeds: Tensor | None = None  # (N, Q, D_cond) cached decoder-text-encoder embeddings of the captions


@dataclass
class Batch:
    input_ids: Tensor  # (B, L)
    attention_mask: Tensor  # (B, L)
    labels: Tensor  # (B, L) IGNORE_INDEX outside answers
    media: dict[str, Tensor]  # modality -> (N, ...) input items in row-major order of their placeholders
    targets: dict[str, GenerationTargets]
    encoded: dict[str, Any] | None = None  # modality -> cached EncoderOutput of ``media`` (frozen encoder only)

    def to(self, device) -> Batch:
        def move(x):
            return None if x is None else x.to(device)

        encoded = None
        if self.encoded is not None:
            encoded = {m: type(e)(move(e.patch_embeds), move(e.pooled_embeds)) for m, e in self.encoded.items()}
        return Batch(
            self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device),
            {m: x.to(device) for m, x in self.media.items()},
            {m: GenerationTargets(t.media.to(device), t.captions, t.guides, move(t.text_embeds))
             for m, t in self.targets.items()},
            encoded,
        )


def gen_run_text(modality: str, num_tokens: int) -> str:
    return "".join(get_modality(modality).gen_tokens(num_tokens))


def _user_text(message: Message) -> str:
    """Put a placeholder for every attached item that the text does not already place."""
    text = message.text
    missing = []
    for modality in dict.fromkeys(item.modality for item in message.media):
        ph = get_modality(modality).placeholder
        n_items = sum(item.modality == modality for item in message.media)
        n_text = text.count(ph)
        if n_text not in (0, n_items):
            raise ValueError(f"the message text has {n_text} {ph} placeholder(s) for {n_items} {modality} item(s): "
                             f"place all of them or none (then they go before the text)")
        if n_text == 0:
            missing += [ph] * n_items
    return "".join(missing) + "\n" + text if missing else text


def encode_conversation(
    messages: list[Message],
    tokenizer: PreTrainedTokenizerBase,
    template: ChatTemplate,
    add_generation_prompt: bool = False,
) -> tuple[list[int], list[int]]:
    """Token ids and labels (answers only, stop token included) of a conversation.

    With ``add_generation_prompt`` the ids end with the assistant prefix, ready for generation.
    """
    ids: list[int] = [tokenizer.bos_token_id] if template.add_bos and tokenizer.bos_token_id is not None else []
    labels: list[int] = [IGNORE_INDEX] * len(ids)

    def add(text: str, train: bool) -> None:
        piece = tokenizer(text, add_special_tokens=False).input_ids
        ids.extend(piece)
        labels.extend(piece if train else [IGNORE_INDEX] * len(piece))

    if template.system:
        add(template.system_format.format(content=template.system), False)
    for i, message in enumerate(messages):
        if message.role == "user":
            add(template.user_format.format(content=_user_text(message)), False)
        else:
            if i == 0 or messages[i - 1].role != "user":
                raise ValueError("an assistant message must follow a user message")
            add(template.assistant_prefix, False)
            add(message.text + template.assistant_suffix, True)
    if add_generation_prompt:
        if messages and messages[-1].role != "user":
            raise ValueError("a generation prompt needs the conversation to end with a user message")
        add(template.assistant_prefix, False)
    return ids, labels


def collate(
    conversations: list[list[Message]],
    tokenizer: PreTrainedTokenizerBase,
    template: ChatTemplate,
    max_length: int | None = None,
) -> Batch:
    """Right-padded batch of conversations, with their input media and generation targets gathered."""
    encoded = [encode_conversation(c, tokenizer, template) for c in conversations]
    if max_length is not None:
        too_long = [len(ids) for ids, _ in encoded if len(ids) > max_length]
        if too_long:
            raise ValueError(f"a conversation has {max(too_long)} tokens, over max_length={max_length}")
    L = max(len(ids) for ids, _ in encoded)
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(encoded), L), pad, dtype=torch.long)
    labels = torch.full((len(encoded), L), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), L), dtype=torch.long)
    for row, (ids, labs) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(ids)] = torch.tensor(labs)
        attention_mask[row, : len(ids)] = 1

    gathered = gather_media(conversations)
    for items in gathered.outputs.values():
        for item in items:
            if item.caption is None:
                raise ValueError(f"a generated {item.modality} item needs its caption as training target")
    media = {m: _stack(m, xs) for m, xs in gathered.inputs.items()}
    targets = {
        m: GenerationTargets(_stack(m, [it.data for it in items]), [it.caption for it in items], gathered.guides[m])
        for m, items in gathered.outputs.items()
    }
    return Batch(input_ids, attention_mask, labels, media, targets)


@dataclass
class GatheredMedia:
    inputs: dict[str, list[Tensor]]  # modality -> user items, in row-major order of their placeholders
    outputs: dict[str, list[MediaItem]]  # modality -> assistant items, in row-major order of their runs
    guides: dict[str, list[tuple[str, int] | None]]  # per output: the latest visual input (modality, index) before it
    last_visual: list[tuple[str, int] | None]  # per conversation: its latest visual input (guides its next answer)


def gather_media(conversations: list[list[Message]]) -> GatheredMedia:
    """The media of a batch of conversations, with indices counted across the whole batch."""
    gathered = GatheredMedia({}, {}, {}, [])
    for conversation in conversations:
        last_visual: tuple[str, int] | None = None
        for message in conversation:
            for item in message.media:
                if message.role == "user":  # placeholders follow the order of message.media (see _user_text)
                    inputs = gathered.inputs.setdefault(item.modality, [])
                    inputs.append(item.data)
                    if get_modality(item.modality).visual:
                        last_visual = (item.modality, len(inputs) - 1)
                else:
                    gathered.outputs.setdefault(item.modality, []).append(item)
                    gathered.guides.setdefault(item.modality, []).append(last_visual)
        gathered.last_visual.append(last_visual)
    return gathered


def _stack(modality: str, items: list[Tensor]) -> Tensor:
    shapes = {tuple(x.shape) for x in items}
    if len(shapes) > 1:
        raise ValueError(f"{modality} items in one batch must share a shape, got {sorted(shapes)}: resize them first")
    return torch.stack(items)
