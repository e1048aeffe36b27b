"""A disk cache of what frozen parts compute from the data: encoder features and decoder caption embeddings.

Frozen encoders give the same features for the same item every epoch, and the decoders' frozen text encoders the
same embedding for the same caption; the cache computes each once and stores it as one safetensors file per
entry. Entries are keyed safely:

- encoder features (``EncoderOutput`` patch and pooled embeddings) by the item's ``MediaItem.key``, its modality
  and shape, under a folder named by the encoder's fingerprint (its config and a hash of its state dict), so
  changed weights never reuse stale entries; each entry also stores a digest of the item's pixels / samples and
  is recomputed when the item differs (two datasets with the same clip keys never mix). Items without a key
  (re-rendered edits) are computed every time.
- caption embeddings by the caption text, under a folder named by the output modality and its text encoder's
  fingerprint (class, config, state-dict hash, tokenizer vocabulary).

Weight changes through parameters (optimizer steps, ``load_state_dict``, ``torch.no_grad()`` in-place ops) are
seen through PyTorch's version counters and trigger a new fingerprint; writes through ``param.data`` bypass those
counters: call :meth:`FeatureCache.refresh` after them. A recent entry of each kind is also kept in memory.

Layout: ``DIR/encoder-<fp>/<modality>/<h[:2]>/<h>.safetensors``, ``DIR/text-<modality>-<fp>/<h[:2]>/<h>.safetensors``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from xvila.conversation import Batch, GenerationTargets, Message

logger = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when the code that computes features changes meaning


def state_fingerprint(module: nn.Module) -> str:
    """sha256 of a module's state dict (names, dtypes, shapes and bytes)."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # bf16 has no numpy
    return h.hexdigest()


def _sha(*parts: str) -> str:
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


def data_digest(x: Tensor) -> str:
    """A digest of an item's values (float32), to tell two items with the same key apart."""
    return hashlib.blake2b(x.detach().to("cpu", torch.float32).contiguous().numpy().tobytes(),
                           digest_size=16).hexdigest()


def media_keys(conversations: list[list[Message]]) -> dict[str, list[str | None]]:
    """modality -> the keys of the conversations' input items, in the order ``collate`` stacks them."""
    keys: dict[str, list[str | None]] = {}
    for conversation in conversations:
        for message in conversation:
            if message.role == "user":
                for item in message.media:
                    keys.setdefault(item.modality, []).append(item.key)
    return keys


class _Watched:
    """A module's fingerprint, recomputed only when a parameter or buffer was replaced or changed in place."""

    def __init__(self, module_fn, describe_fn):
        self.module_fn, self.describe_fn = module_fn, describe_fn
        self.signature = None
        self.value: str | None = None

    def get(self) -> str:
        module = self.module_fn()
        signature = tuple((id(t), t.data_ptr(), t._version) for t in (*module.parameters(), *module.buffers()))
        if signature != self.signature or self.value is None:
            self.value = _sha(str(CACHE_VERSION), self.describe_fn(module), state_fingerprint(module))[:24]
            self.signature = signature
        return self.value

    def reset(self) -> None:
        self.value = None


class FeatureCache:
    """Encoder features and caption embeddings of a model, on disk under ``directory``.

    ``attach(batch, keys)`` returns a copy of the batch with ``encoded`` (every input modality) and
    ``targets[m].text_embeds`` filled, computing and storing what is missing. The encoder must be frozen (the
    model's forward refuses cached features otherwise); features are computed in eval mode without gradients,
    exactly what a frozen encoder gives in ``model.forward``.
    """

    def __init__(self, directory: str | Path, model, *, features: bool = True, captions: bool = True,
                 memory_items: int = 4096):
        if not features and not captions:
            raise ValueError("a feature cache with neither features nor captions caches nothing")
        self.directory = Path(directory)
        self.model = model
        self.features, self.captions = features, captions
        self.memory_items = memory_items
        self._memory: OrderedDict[str, tuple[dict[str, str], dict[str, Tensor]]] = OrderedDict()
        self._encoder_fp = _Watched(lambda: model.encoder,
                                    lambda m: json.dumps(model.config.encoder.to_dict(), sort_keys=True))
        self._text_fp: dict[str, _Watched] = {}
        self.stats = {"feature_hits": 0, "feature_misses": 0, "feature_uncached": 0, "caption_hits": 0,
                      "caption_misses": 0}

    # ---------------------------------------------------------------------------------------------- fingerprints
    def encoder_fingerprint(self) -> str:
        return self._encoder_fp.get()

    def text_fingerprint(self, modality: str) -> str:
        if modality not in self._text_fp:
            def describe(m, modality=modality):
                decoder = self.model.decoder(modality)
                vocab = json.dumps(sorted(decoder.tokenizer.get_vocab().items()))
                return "|".join([modality, type(m).__name__, m.config.to_json_string(use_diff=False), vocab,
                                 str(decoder.tokenizer.model_max_length)])

            self._text_fp[modality] = _Watched(lambda: self.model.decoder(modality).text_encoder, describe)
        return self._text_fp[modality].get()

    def refresh(self) -> None:
        """Forget the fingerprints (after writing weights through ``param.data``) and the memory layer."""
        self._encoder_fp.reset()
        for w in self._text_fp.values():
            w.reset()
        self._memory.clear()

    # ------------------------------------------------------------------------------------------------ storage
    def _path(self, folder: str, name: str) -> Path:
        h = _sha(name)
        return self.directory / folder / h[:2] / f"{h}.safetensors"

    def _read(self, path: Path, check: dict[str, str]) -> dict[str, Tensor] | None:
        """The entry at ``path`` if it exists and its metadata equals ``check``, else None."""
        remembered = self._memory.get(str(path))
        if remembered is not None and remembered[0] == check:
            self._memory.move_to_end(str(path))
            return remembered[1]
        if not path.exists():
            return None
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                if any(meta.get(k) != v for k, v in check.items()):
                    return None
                entry = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # a torn or foreign file: recompute it
            logger.warning("feature cache: unreadable entry %s (%s); recomputing", path, e)
            return None
        self._remember(path, entry, check)
        return entry

    def _remember(self, path: Path, entry: dict[str, Tensor], check: dict[str, str]) -> None:
        if self.memory_items <= 0:
            return
        self._memory[str(path)] = (check, entry)
        self._memory.move_to_end(str(path))
        while len(self._memory) > self.memory_items:
            self._memory.popitem(last=False)

    def _write(self, path: Path, entry: dict[str, Tensor], check: dict[str, str]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        save_file({k: v.detach().to("cpu").contiguous() for k, v in entry.items()}, str(tmp), metadata=check)
        os.replace(tmp, path)  # atomic: concurrent ranks writing the same entry never leave a torn file
        self._remember(path, entry, check)

    # ------------------------------------------------------------------------------------------------ features
    def encode(self, modality: str, media: Tensor, keys: list[str | None]):
        """EncoderOutput of ``media`` (N, ...) with per-item ``keys`` (None: not cached)."""
        from xvila.encoders import EncoderOutput

        if len(keys) != media.shape[0]:
            raise ValueError(f"{len(keys)} keys for {media.shape[0]} {modality} items")
        if any(p.requires_grad for p in self.model.encoder.parameters()):
            raise ValueError("the encoder is being trained: its features change every step and cannot be cached; "
                             "turn the feature cache off for this phase")
        folder = f"encoder-{self.encoder_fingerprint()}/{modality}"
        found: list[dict[str, Tensor] | None] = [None] * len(keys)
        checks: list[dict[str, str] | None] = [None] * len(keys)
        for i, key in enumerate(keys):
            if key is None:
                self.stats["feature_uncached"] += 1
                continue
            checks[i] = {"key": key, "digest": data_digest(media[i])}
            found[i] = self._read(self._path(folder, f"{key}|{tuple(media.shape[1:])}"), checks[i])
            self.stats["feature_hits" if found[i] is not None else "feature_misses"] += 1
        missing = [i for i, f in enumerate(found) if f is None]
        if missing:
            encoder = self.model.encoder
            was_training = encoder.training
            encoder.eval()
            try:
                with torch.no_grad():
                    out = self.model.encode(modality, media[missing])
            finally:
                encoder.train(was_training)
            for j, i in enumerate(missing):
                found[i] = {"patch_embeds": out.patch_embeds[j].to("cpu").clone(),
                            "pooled_embeds": out.pooled_embeds[j].to("cpu").clone()}
                if keys[i] is not None:
                    self._write(self._path(folder, f"{keys[i]}|{tuple(media.shape[1:])}"), found[i], checks[i])
        return EncoderOutput(torch.stack([f["patch_embeds"] for f in found]),
                             torch.stack([f["pooled_embeds"] for f in found]))

    # ------------------------------------------------------------------------------------------------ captions
    def text_embeds(self, modality: str, captions: list[str]) -> Tensor:
        """(N, Q, D_cond) the ``modality`` decoder's text-encoder embedding of each caption."""
        folder = f"text-{modality}-{self.text_fingerprint(modality)}"
        found: dict[str, Tensor] = {}
        for text in dict.fromkeys(captions):
            entry = self._read(self._path(folder, text), {"caption": text})
            if entry is not None:
                found[text] = entry["text_embeds"]
        missing = [t for t in dict.fromkeys(captions) if t not in found]
        self.stats["caption_hits"] += len(captions) - len(missing)  # a repeat within a batch is computed once
        self.stats["caption_misses"] += len(missing)
        if missing:
            decoder = self.model.decoder(modality)
            with torch.no_grad():
                embeds = decoder.encode_text(missing).to("cpu")
            for text, e in zip(missing, embeds):
                found[text] = e.clone()
                self._write(self._path(folder, text), {"text_embeds": found[text]}, {"caption": text})
        return torch.stack([found[t] for t in captions])

    # ------------------------------------------------------------------------------------------------- batches
    def attach(self, batch: Batch, keys: dict[str, list[str | None]]) -> Batch:
        """A copy of ``batch`` with cached encoder features and caption embeddings attached.

        ``keys``: modality -> the keys of ``batch.media[modality]``'s items (see :func:`media_keys`).
        """
        encoded = batch.encoded
        if self.features and batch.media:
            encoded = {m: self.encode(m, x, keys.get(m) or [None] * x.shape[0]) for m, x in batch.media.items()}
        targets = batch.targets
        if self.captions:
            targets = {m: GenerationTargets(t.media, t.captions, t.guides, self.text_embeds(m, t.captions))
                       for m, t in batch.targets.items()}
        return dataclasses.replace(batch, encoded=encoded, targets=targets)
