"""The loader: stored aligned clips -> task conversations -> model-ready :class:`~xvila.conversation.Batch` es.

One epoch visits every clip that some task of the mixture applies to, once, in an order fixed by (seed, epoch);
for each clip a task is drawn from the weighted mixture (among the tasks that apply to it) and its conversation is
built with a generator seeded by (seed, epoch, clip), so a clip's conversation does not depend on the batch size,
the number of ranks or workers. Ranks take disjoint, equally long slices of the epoch (``rank``,
``world_size``), so data-parallel ranks step together.

Two ways to read a dataset:
- in memory (default): every clip is read once; the epoch order is a permutation of all clips. Batches are
  independent of each other, so ``num_workers`` > 0 builds them in worker processes (same batches, same order).
- streaming: shards are read one at a time in an order fixed by (seed, epoch), clips pass through a shuffle
  buffer. Readers (rank x worker) take disjoint shards, or, when there are fewer shards than readers, every
  reader reads every shard and keeps every R-th clip; each reader yields the same count (from the manifest), so
  ranks stay in step unless tasks skip clips. The order depends on world_size and num_workers. ``interleaved``
  sees the earlier clips of a group within the same shard.

Packing (``packing=True``, needs ``max_length``) puts several conversations into one row, first fit over the
rows of the batch being filled. Attention is NOT blocked across packed conversations and positions run on: a
later conversation can attend to an earlier one in its row (as in most LLM pre-training packing); generation
targets keep their own conversation's visual guide. With packing the number of batches per epoch varies: pass
``batches_per_epoch`` to make every rank yield the same count.

``max_length`` counts the LLM sequence after splicing (each input item takes ``spec.media_tokens`` positions).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from xvila.conversation import Batch, Message, collate, encode_conversation
from xvila.data.cache import FeatureCache, media_keys
from xvila.data.records import AlignedClip, read_clips, read_manifest, read_shard
from xvila.data.tasks import (
    PHASE_FOLLOW_UPS,
    TASKS,
    Sample,
    TaskSpec,
    check_mixture,
    choose_task,
    phase_mixture,
)
from xvila.modalities import get_modality

logger = logging.getLogger(__name__)


@dataclass
class _Item:
    gid: int  # the clip's position in the datasets' manifest order: seeds its conversation
    clips: list[AlignedClip]  # earlier clips of its group (at most max_context), then the clip itself


def _identity(x):
    return x


class Loader:
    """Iterable over model-ready batches of one rank; call :meth:`set_epoch` before each epoch.

    data: a dataset folder, a list of folders, or a list of AlignedClips (in memory).
    mixture: task name -> weight (see ``xvila.data.tasks.TASKS``); :func:`~xvila.data.tasks.phase_mixture`.
    too_long: "error" (default) raises on a conversation over ``max_length``; "drop" skips it (counted in
        ``stats["too_long"]`` and logged).
    cache: a :class:`~xvila.data.cache.FeatureCache`: encoder features and caption embeddings are attached to
        every batch (in the main process).
    """

    def __init__(
        self,
        data: str | Path | Sequence[str | Path] | Sequence[AlignedClip],
        *,
        tokenizer,
        template,
        spec: TaskSpec,
        mixture: dict[str, float],
        batch_size: int = 8,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        drop_last: bool = True,
        max_length: int | None = None,
        too_long: str = "error",
        packing: bool = False,
        streaming: bool = False,
        shuffle_buffer: int = 1000,
        num_workers: int = 0,
        batches_per_epoch: int | None = None,
        cache: FeatureCache | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank} of {world_size}")
        if too_long not in ("error", "drop"):
            raise ValueError(f"too_long must be 'error' or 'drop', got {too_long!r}")
        if packing and max_length is None:
            raise ValueError("packing needs max_length: the row length to fill")
        if packing and num_workers:
            raise ValueError("packing fills rows one conversation after another in the main process: "
                             "use num_workers=0 with packing")
        if num_workers < 0 or shuffle_buffer < 1:
            raise ValueError(f"need num_workers >= 0 and shuffle_buffer >= 1, got {num_workers}, {shuffle_buffer}")
        self.tokenizer, self.template, self.spec = tokenizer, template, spec
        self.mixture = check_mixture(mixture, spec)
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.shuffle, self.drop_last, self.max_length, self.too_long = shuffle, drop_last, max_length, too_long
        self.packing, self.streaming, self.shuffle_buffer = packing, streaming, shuffle_buffer
        self.num_workers, self.batches_per_epoch, self.cache = num_workers, batches_per_epoch, cache
        self.epoch = 0
        self.stats = {"too_long": 0, "skipped": 0, "conversations": 0}  # counted in this process
        self._base_length = len(encode_conversation([], tokenizer, template)[0])  # system prompt (and BOS)

        if isinstance(data, (str, Path)):
            data = [data]
        data = list(data)
        if data and isinstance(data[0], AlignedClip):
            if streaming:
                raise ValueError("streaming reads dataset folders; in-memory clips are already loaded")
            self.dirs: list[Path] = []
            self.clips: list[AlignedClip] | None = data
        else:
            self.dirs = [Path(d) for d in data]
            self.shards = []  # (path, count, first gid)
            offset = 0
            for d in self.dirs:
                for shard in read_manifest(d)["shards"]:
                    self.shards.append((d / shard["name"], shard["count"], offset))
                    offset += shard["count"]
            self.clips = None if streaming else [c for d in self.dirs for c in read_clips(d)]
        if self.clips is not None:
            if not self.clips:
                raise ValueError("the dataset holds no clips")
            self._windows = self._group_windows(self.clips)
            self._eligible = [i for i in range(len(self.clips)) if self._applies(self._window(i))]
            if len(self._eligible) < world_size:
                raise ValueError(f"{len(self._eligible)} clips fit the task mixture {sorted(self.mixture)}, fewer "
                                 f"than the {world_size} ranks")

    @classmethod
    def from_model(cls, model, data, *, phase: int | None = None, mixture: dict[str, float] | None = None,
                   cache_dir: str | Path | None = None, follow_ups: int | None = None, **kwargs) -> Loader:
        """A loader for ``model``: its tokenizer, chat template, generation tokens and media shapes.

        ``phase`` gives the default mixture and follow-up turns; ``cache_dir`` turns the feature cache on.
        """
        if mixture is None:
            if phase is None:
                raise ValueError("give a phase (1, 2, 3) or a task mixture")
            mixture = phase_mixture(phase)
        if follow_ups is None:
            follow_ups = PHASE_FOLLOW_UPS[phase] if phase is not None else 0
        spec = TaskSpec.from_model(model, follow_ups=follow_ups)
        cache = FeatureCache(cache_dir, model) if cache_dir is not None else None
        return cls(data, tokenizer=model.tokenizer, template=model.config.llm.template, spec=spec, mixture=mixture,
                   cache=cache, **kwargs)

    # -------------------------------------------------------------------------------------------------- epochs
    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        """Batches per epoch of this rank (in memory without packing, or with ``batches_per_epoch``)."""
        if self.batches_per_epoch is not None:
            return self.batches_per_epoch
        if self.clips is None or self.packing:
            raise TypeError("the number of batches is known in memory without packing; pass batches_per_epoch")
        n = len(self._eligible) // self.world_size
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        produced = 0
        for batch, keys in self._produce():
            if self.batches_per_epoch is not None and produced == self.batches_per_epoch:
                break
            if self.cache is not None:
                batch = self.cache.attach(batch, keys)
            produced += 1
            yield batch
        if self.batches_per_epoch is not None and produced < self.batches_per_epoch:
            raise ValueError(f"rank {self.rank} made only {produced} batches in epoch {self.epoch}, fewer than "
                             f"batches_per_epoch={self.batches_per_epoch}: lower it")
        if self.stats["too_long"]:
            logger.warning("dropped %d conversations over max_length=%d so far", self.stats["too_long"],
                           self.max_length)

    def _produce(self) -> Iterator[tuple[Batch, dict]]:
        if self.num_workers == 0:
            yield from _EpochData(self, self.epoch)
            return
        loader = torch.utils.data.DataLoader(_EpochData(self, self.epoch), batch_size=None,
                                             num_workers=self.num_workers, collate_fn=_identity)
        yield from loader

    # ---------------------------------------------------------------------------------------------- the plan
    def _group_windows(self, clips: list[AlignedClip]) -> list[list[int]]:
        """For every clip, the indices of the earlier clips of its group (at most max_context), in order."""
        groups: dict[str, list[int]] = {}
        for i, c in enumerate(clips):
            if c.group:
                groups.setdefault(c.group, []).append(i)
        windows: list[list[int]] = [[] for _ in clips]
        for members in groups.values():
            members.sort(key=lambda i: clips[i].index)
            for j, i in enumerate(members):
                windows[i] = members[max(0, j - self.spec.max_context): j]
        return windows

    def _window(self, i: int) -> list[AlignedClip]:
        return [self.clips[j] for j in self._windows[i]] + [self.clips[i]]

    def _applies(self, clips: list[AlignedClip]) -> bool:
        return any(TASKS[name].applies(clips, self.spec) for name in self.mixture)

    def rank_order(self, epoch: int) -> list[int]:
        """In memory: the clip indices this rank visits in ``epoch``, in order."""
        if self.clips is None:
            raise TypeError("rank_order is for in-memory loading; streaming has no order before reading")
        order = np.asarray(self._eligible)
        if self.shuffle:
            order = order[np.random.default_rng([self.seed, epoch]).permutation(len(order))]
        per_rank = len(order) // self.world_size  # equal for every rank: the remainder waits for another epoch
        return [int(i) for i in order[self.rank :: self.world_size][:per_rank]]

    def _stream(self, epoch: int, reader: int, readers: int) -> Iterator[_Item]:
        """Streaming: this reader's clips (with their group windows) through a shuffle buffer."""
        perm = np.arange(len(self.shards))
        if self.shuffle:
            perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
        shards = [self.shards[i] for i in perm]
        if len(shards) >= readers:
            mine = shards[reader::readers]
            limit = min(sum(s[1] for s in shards[r::readers]) for r in range(readers))
            keep = None
        else:
            mine = shards
            limit = sum(s[1] for s in shards) // readers
            keep = reader
        rng = np.random.default_rng([self.seed, epoch, reader, 1])
        buffer: list[_Item] = []
        taken, position = 0, 0
        for path, _, first in mine:
            history: dict[str, list[AlignedClip]] = {}
            for j, clip in enumerate(read_shard(path)):
                earlier = [c for c in history.get(clip.group, []) if c.index < clip.index]
                window = earlier[-self.spec.max_context:] + [clip]
                if clip.group:
                    history.setdefault(clip.group, []).append(clip)
                    del history[clip.group][: -self.spec.max_context]
                mine_now = keep is None or position % readers == keep
                position += 1
                if not mine_now:
                    continue
                if taken == limit:
                    break
                taken += 1
                if not self._applies(window):
                    self.stats["skipped"] += 1
                    continue
                item = _Item(first + j, window)
                if not self.shuffle:
                    yield item
                    continue
                buffer.append(item)
                if len(buffer) >= self.shuffle_buffer:
                    k = int(rng.integers(len(buffer)))
                    buffer[k], buffer[-1] = buffer[-1], buffer[k]
                    yield buffer.pop()
            if taken == limit:
                break
        while buffer:
            k = int(rng.integers(len(buffer)))
            buffer[k], buffer[-1] = buffer[-1], buffer[k]
            yield buffer.pop()

    # ------------------------------------------------------------------------------------------------ samples
    def sample(self, item: _Item, epoch: int) -> Sample | None:
        """The conversation of one clip in ``epoch`` (None when no task of the mixture applies)."""
        rng = np.random.default_rng([self.seed, epoch, item.gid])
        task = choose_task(self.mixture, item.clips, rng, self.spec)
        if task is None:
            return None
        return Sample(task, TASKS[task](item.clips, rng, self.spec), tuple(c.key for c in item.clips))

    def samples(self, epoch: int | None = None) -> Iterator[Sample]:
        """This rank's conversations of ``epoch`` (default: the current one), in order, without batching."""
        epoch = self.epoch if epoch is None else epoch
        for item in self._items(epoch, 0, 1):
            s = self.sample(item, epoch)
            if s is not None:
                yield s

    def _items(self, epoch: int, worker: int, workers: int) -> Iterator[_Item]:
        if self.clips is not None:
            for i in self.rank_order(epoch):
                yield _Item(i, self._window(i))
        else:
            yield from self._stream(epoch, self.rank * workers + worker, self.world_size * workers)

    def length(self, conversation: list[Message]) -> int:
        """LLM positions of a conversation once its media are spliced in."""
        ids, _ = encode_conversation(conversation, self.tokenizer, self.template)
        n_items = sum(len(m.media) for m in conversation if m.role == "user")
        return len(ids) + n_items * (self.spec.media_tokens - 1)

    def _fits(self, length: int, sample: Sample) -> bool:
        if self.max_length is None or length <= self.max_length:
            return True
        if self.too_long == "error":
            raise ValueError(f"a {sample.task!r} conversation about {sample.clip_keys[-1]} takes {length} positions, "
                             f"over max_length={self.max_length}: raise max_length, lower spec.max_context / "
                             f"follow_ups, or pass too_long='drop'")
        self.stats["too_long"] += 1
        return False

    # ------------------------------------------------------------------------------------------------ batches
    def collate(self, rows: list[list[Sample]]) -> tuple[Batch, dict[str, list[str | None]]]:
        """One batch from rows of samples (one sample per row unless packed), and its input items' keys."""
        conversations = [[m for s in row for m in s.messages] for row in rows]
        batch = collate(conversations, self.tokenizer, self.template)
        self.stats["conversations"] += sum(len(row) for row in rows)
        if any(len(row) > 1 for row in rows):
            _reset_guides(batch, rows)
        return batch, media_keys(conversations)

    def _batches_of(self, samples: Iterator[Sample]) -> Iterator[tuple[Batch, dict]]:
        B = self.batch_size
        if not self.packing:
            rows = []
            for s in samples:
                if self.max_length is not None and not self._fits(self.length(s.messages), s):
                    continue
                rows.append([s])
                if len(rows) == B:
                    yield self.collate(rows)
                    rows = []
            if rows and not self.drop_last:
                yield self.collate(rows)
            return
        rows, used = [], []  # first fit over the rows of the batch being filled
        base = self._base_length
        for s in samples:
            length = self.length(s.messages)
            if not self._fits(length, s):
                continue
            extra = length - base  # the system prompt is shared by a row's conversations
            for r, u in enumerate(used):
                if u + extra <= self.max_length:
                    rows[r].append(s)
                    used[r] += extra
                    break
            else:
                if len(rows) == B:
                    yield self.collate(rows)
                    rows, used = [], []
                rows.append([s])
                used.append(length)
        if rows and not self.drop_last:
            yield self.collate(rows)


class _EpochData(torch.utils.data.IterableDataset):
    """One epoch of one rank; in a DataLoader worker, that worker's share (whole batches)."""

    def __init__(self, loader: Loader, epoch: int):
        super().__init__()
        self.loader, self.epoch = loader, epoch

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        L = self.loader
        if L.clips is not None and not L.packing:
            # in memory, batch b is chunk b of the rank's order: batches are independent, so worker w builds
            # batches w, w + W, ... and the DataLoader takes them in turn (the same batches as without workers)
            order = L.rank_order(self.epoch)
            B = L.batch_size
            n = len(order) // B if L.drop_last else -(-len(order) // B)
            for b in range(worker, n, workers):
                samples = [L.sample(_Item(i, L._window(i)), self.epoch) for i in order[b * B : (b + 1) * B]]
                rows = [[s] for s in samples
                        if s is not None and (L.max_length is None or L._fits(L.length(s.messages), s))]
                if rows:
                    yield L.collate(rows)
            return
        items = L._items(self.epoch, worker, workers)
        yield from L._batches_of(s for s in (L.sample(it, self.epoch) for it in items) if s is not None)


def _reset_guides(batch: Batch, rows: list[list[Sample]]) -> None:
    """Packed rows: a generated item's visual guide comes from its own conversation, not an earlier one in the row."""
    counts: dict[str, int] = {}
    guides: dict[str, list] = {}
    for row in rows:
        for sample in row:
            last_visual = None
            for message in sample.messages:
                for item in message.media:
                    if message.role == "user":
                        counts[item.modality] = counts.get(item.modality, 0) + 1
                        if get_modality(item.modality).visual:
                            last_visual = (item.modality, counts[item.modality] - 1)
                    else:
                        guides.setdefault(item.modality, []).append(last_visual)
    for m, targets in batch.targets.items():
        targets.guides = guides[m]
