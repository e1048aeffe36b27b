"""The trainer's data adapter: a :class:`DataSpec` -> an endless, rank-sharded stream of micro-batches.

A thin layer over ``xvila.data``: aligned clips come from a dataset folder (``xvila data world`` / ``xvila data
build``) or from the toy world rendered on the fly (``world:N``, the same clips ``xvila.data.world`` writes); the
conversations are ``xvila.data.tasks``' (``TASKS``, drawn by ``choose_task`` from the phase's mixture), batched by
``xvila.conversation.collate``; ``xvila.data.cache.FeatureCache`` attaches frozen-encoder features and caption
embeddings. The foundation objective reads plain aligned clips instead (:class:`ClipBatch`, task ``"clips"``).

What this module adds is the order, chosen for training: sample ``i`` of the global stream is a pure function of
``(seed, i)`` (its clip is entry ``i mod n`` of a permutation drawn per epoch, its task and conversation are drawn
from ``(seed, i)``). Rank ``r`` of ``W`` processes reads, at its micro-step ``u``, the global micro-slot
``j = u * W + r`` made of samples ``[j * B, (j + 1) * B)``. One optimizer step with gradient accumulation ``A``
covers micro-steps ``[s * A, (s + 1) * A)`` on every rank, so

- the micro-batches of step ``s`` depend only on the global batch ``B * A * W``: 1 process with ``A = 2`` and 2
  processes with ``A = 1`` train on the same micro-batches (``xvila.data.loader.Loader``'s rank-strided epochs
  would give the same samples per step but other micro-batches);
- a checkpoint's data position is its step, and resuming jumps there in O(1), without replaying the epoch.
"""

from __future__ import annotations

import ctypes
import functools
import gc
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from xvila.conversation import Batch, collate
from xvila.data.records import AlignedClip
from xvila.train.config import DataSpec, parse_source

MEDIA = ("image", "video", "audio")
WORLD_GROUP_SIZE = 4  # consecutive world scenes form one "long video" (as ``xvila data world`` writes them)


@dataclass
class ClipBatch:
    """Aligned clips for the foundation objective: item b of every modality and captions[b] show one scene."""

    media: dict[str, Tensor]  # image (B, 3, H, W), video (B, T, 3, H, W), audio (B, S)
    captions: list[str]
    keys: list[str] | None = None  # the clips' keys (unique in their dataset); None: unknown

    def to(self, device) -> ClipBatch:
        return ClipBatch({m: x.to(device) for m, x in self.media.items()}, self.captions, self.keys)

    def __len__(self) -> int:
        return len(self.captions)


# ----------------------------------------------------------------------------------------------------- sources
class ClipSource:
    """Random access to aligned clips and to the earlier clips of each clip's group (for ``interleaved``)."""

    def __len__(self) -> int:
        raise NotImplementedError

    def clip(self, index: int) -> AlignedClip:
        raise NotImplementedError

    def window(self, index: int, max_context: int) -> list[AlignedClip]:
        """At most ``max_context`` earlier clips of the clip's group, in order, then the clip itself."""
        raise NotImplementedError


class WorldClips(ClipSource):
    """Scenes ``0..n-1`` of a toy-world split, rendered on first use and kept (a 32x32 clip is ~35 kB of arrays,
    about 65 kB resident with its objects: 24000 clips hold 1.5 GB; up to ``MAX_KEPT``; rendering one takes about
    2 ms)."""

    MAX_KEPT = 32768

    def __init__(self, split: str, n: int):
        from xvila.world import WorldConfig

        self.split, self.n, self.config = split, n, WorldConfig()
        self.clip = functools.lru_cache(maxsize=min(n, self.MAX_KEPT))(self._render)

    def __len__(self) -> int:
        return self.n

    def _render(self, index: int) -> AlignedClip:
        from xvila.data.world import sample_clip
        from xvila.world import split_sample

        sample = split_sample(self.split, index, self.config)
        return sample_clip(sample, self.split, index, self.config, WORLD_GROUP_SIZE)

    def window(self, index: int, max_context: int) -> list[AlignedClip]:
        first = max(index - index % WORLD_GROUP_SIZE, index - max_context)
        return [self.clip(i) for i in range(first, index + 1)]


class FolderClips(ClipSource):
    """Every clip of one or more dataset folders (``xvila.data.records``), read once into memory."""

    def __init__(self, folder: str | Path):
        from xvila.data.records import read_clips

        self.clips = list(read_clips(folder))
        if not self.clips:
            raise ValueError(f"dataset {folder} holds no clips")
        groups: dict[str, list[int]] = {}
        for i, c in enumerate(self.clips):
            if c.group:
                groups.setdefault(c.group, []).append(i)
        self.earlier: list[list[int]] = [[] for _ in self.clips]
        for members in groups.values():
            members.sort(key=lambda i: self.clips[i].index)
            for j, i in enumerate(members):
                self.earlier[i] = members[:j]

    def __len__(self) -> int:
        return len(self.clips)

    def clip(self, index: int) -> AlignedClip:
        return self.clips[index]

    def window(self, index: int, max_context: int) -> list[AlignedClip]:
        return [self.clips[i] for i in self.earlier[index][-max_context:]] + [self.clips[index]]


_OPEN_SOURCES: OrderedDict[str, ClipSource] = OrderedDict()
MAX_OPEN_SOURCES = 8


def open_source(source: str) -> ClipSource:
    """The clip source ``source`` names, opened once per process and shared by the phases that read it (a world
    source keeps its rendered clips: 1.5 GB for 24000 scenes). At most ``MAX_OPEN_SOURCES`` stay open, the least
    recently used closed first; :func:`release_sources` closes those no later phase reads."""
    if source in _OPEN_SOURCES:
        _OPEN_SOURCES.move_to_end(source)
        return _OPEN_SOURCES[source]
    kind, split, n = parse_source(source)
    opened = WorldClips(split, n) if kind == "world" else FolderClips(source)
    _OPEN_SOURCES[source] = opened
    while len(_OPEN_SOURCES) > MAX_OPEN_SOURCES:
        _OPEN_SOURCES.popitem(last=False)
    return opened


def release_sources(keep: Iterable[str] = ()) -> list[str]:
    """Close the open sources not in ``keep`` (their clips are freed once no stream holds them); returns their names."""
    keep = set(keep)
    closed = [name for name in _OPEN_SOURCES if name not in keep]
    for name in closed:
        del _OPEN_SOURCES[name]
    if closed:
        gc.collect()  # a WorldClips and its clip cache refer to each other: only the cycle collector frees them
        _trim_heap()
    return closed


def _trim_heap() -> None:
    """Hand freed heap memory back to the system where the C library can (glibc's ``malloc_trim``): tens of
    thousands of freed 35 kB clips otherwise stay in the process's heap (24000 scenes: 1.9 GB resident after release,
    0.4 GB after the trim)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): the memory stays reusable by this process
        pass


def sources_of(spec: DataSpec) -> tuple[str, ...]:
    """The sources a phase with data ``spec`` opens: its training source and its evaluation source."""
    try:
        return (spec.source, eval_source_of(spec))
    except ValueError:  # a dataset folder without an eval_source: its phase cannot evaluate
        return (spec.source,)


def eval_source_of(spec: DataSpec) -> str:
    if spec.eval_source is not None:
        return spec.eval_source
    kind, _, n = parse_source(spec.source)
    if kind != "world":
        raise ValueError(f"eval needs data.eval_source for the dataset folder {spec.source}")
    return f"world:val:{min(n, 64)}"


# ----------------------------------------------------------------------------------------------------- samples
def task_spec(spec: DataSpec, model, chat: tuple[tuple[str, str], ...] = ()):
    """``xvila.data.tasks.TaskSpec`` of the model, restricted to ``spec.modalities``; ``chat``: the pairs of the
    ``chat`` task (:func:`chat_pairs`)."""
    from xvila.data.tasks import TaskSpec

    full = TaskSpec.from_model(model, follow_ups=spec.follow_ups, max_context=spec.max_context)
    allowed = set(spec.modalities or MEDIA)
    return full.replace(inputs=tuple(m for m in full.inputs if m in allowed),
                        gen_tokens={m: k for m, k in full.gen_tokens.items() if m in allowed}, chat=tuple(chat))


def chat_pairs(spec: DataSpec, model, progress: bool = False) -> tuple[tuple[str, str], ...]:
    """The ``chat`` task's (question, answer) pairs when ``spec`` mixes it in (the base LLM's answers, written
    once per LLM and cached: ``xvila.data.chat.rehearsal_pairs``), else (). Call it before the model is wrapped
    for sharded training: it runs the LLM."""
    if not spec.tasks.get("chat"):
        return ()
    from xvila.data.chat import rehearsal_pairs

    return rehearsal_pairs(model, progress=progress)


class SampleStream:
    """Sample index -> a conversation (or an aligned clip for task "clips"), a pure function of ``(seed, index)``."""

    def __init__(self, spec: DataSpec, source: ClipSource, model, seed: int, chat: tuple = ()):
        from xvila.data.tasks import check_mixture

        self.spec, self.source, self.seed = spec, source, seed
        self.clips_only = spec.wants_clips
        self.task_spec = task_spec(spec, model, chat)
        # sorted: the data must not depend on the order a YAML or JSON file happens to list the tasks in
        self.mixture = {} if self.clips_only else check_mixture(dict(sorted(spec.tasks.items())), self.task_spec)

    def clip_index(self, i: int) -> int:
        """A fresh permutation of the clips every epoch, so each epoch sees each clip once."""
        n = len(self.source)
        return int(_permutation(self.seed, i // n, n)[i % n])

    def _caption(self, clip: AlignedClip, i: int) -> str:
        """The clip's caption, or with probability ``spec.partial_captions`` a partial one (toy-world clips)."""
        if self.spec.partial_captions == 0:
            return clip.caption
        from xvila.data.world import world_scene
        from xvila.world import partial_caption

        rng = np.random.default_rng([self.seed, i, 2])
        if rng.random() >= self.spec.partial_captions:
            return clip.caption
        scene = world_scene(clip)
        if scene is None:
            raise ValueError(f"data.partial_captions needs toy-world clips; clip {clip.key} of {self.spec.source} "
                             "is not one")
        return partial_caption(scene[0], rng)

    def sample(self, i: int):
        """A conversation (list of messages), or (caption, media, key) of one aligned clip for task "clips"."""
        from xvila.data.tasks import TASKS, choose_task, clip_tensor, fit_media

        if self.clips_only:
            clip = self.source.clip(self.clip_index(i))
            shapes = self.task_spec.input_shapes
            media = {m: fit_media(m, clip_tensor(clip, m), shapes.get(m)) for m in MEDIA}
            return self._caption(clip, i), media, clip.key
        rng = np.random.default_rng([self.seed, i])
        n = len(self.source)
        for k in range(n):  # the first clip (from i on) that some task of the mixture applies to
            window = self.source.window(self.clip_index(i + k), self.task_spec.max_context)
            task = choose_task(self.mixture, window, rng, self.task_spec)
            if task is not None:
                return TASKS[task](window, rng, self.task_spec)
        raise ValueError(f"no task of the mixture {sorted(self.mixture)} applies to any clip of {self.spec.source}")


@functools.lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, 1 << 20, epoch]).permutation(n)


# ------------------------------------------------------------------------------------------------ the stream
def make_batch(stream: SampleStream, indices: range, model, cache=None) -> Batch | ClipBatch:
    samples = [stream.sample(i) for i in indices]
    if stream.clips_only:
        return ClipBatch({m: torch.stack([media[m] for _, media, _ in samples]) for m in MEDIA},
                         [caption for caption, _, _ in samples], [key for _, _, key in samples])
    batch = collate(samples, model.tokenizer, model.config.llm.template, stream.spec.max_length)
    if cache is not None:
        from xvila.data.cache import media_keys

        batch = cache.attach(batch, media_keys(samples))
    return batch


def make_batches(spec: DataSpec, model, *, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 start: int = 0, source: str | None = None, cache=None,
                 chat: tuple = ()) -> Iterator[Batch | ClipBatch]:
    """This rank's micro-batches from its micro-step ``start`` on (see the module docstring), forever.

    ``cache``: an ``xvila.data.cache.FeatureCache`` that attaches frozen-encoder features and caption embeddings.
    ``chat``: the ``chat`` task's pairs (:func:`chat_pairs`), when the mixture has it.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size}")
    stream = SampleStream(spec, open_source(source or spec.source), model, seed, chat)
    u = start
    while True:
        j = micro_slot(u, rank, world_size)
        yield make_batch(stream, range(j * batch_size, (j + 1) * batch_size), model, cache)
        u += 1


def micro_slot(micro_step: int, rank: int, world_size: int) -> int:
    """The global micro-slot a rank reads at a micro-step (also seeds that micro-batch's randomness)."""
    return micro_step * world_size + rank


def output_modalities(spec: DataSpec, model) -> tuple[str, ...]:
    """Output modalities whose decoders this data may ask for: the model's, within ``spec.modalities``."""
    allowed = set(spec.modalities or MEDIA)
    return tuple(m for m in model.config.output_modalities if m in allowed)


# ------------------------------------------------------------------------- generation states (phase "projections")
@dataclass
class GenStateBatch:
    """Pairs for the output projections: {modality: (the LLM hidden states each generation run's projection reads
    (N, W, D), their mask (N, W), the decoder's caption embeddings (N, Q, D_cond))}."""

    states: dict[str, tuple[Tensor, Tensor, Tensor]]

    def to(self, device) -> GenStateBatch:
        return GenStateBatch({m: tuple(t.to(device) for t in parts) for m, parts in self.states.items()})

    def __len__(self) -> int:
        return sum(h.shape[0] for h, _, _ in self.states.values())


def collect_generation_states(spec: DataSpec, model, *, samples: int, batch_size: int, rank: int = 0,
                              world_size: int = 1, seed: int = 0, source: str | None = None,
                              progress: bool = False, chat: tuple = ()) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
    """Run the (frozen) LLM once over this rank's share of ``samples`` conversations and keep, per output modality,
    what the projection reads of every generation run (hidden states, float32, and their mask) with its caption's
    embedding, on the CPU."""
    from tqdm.auto import tqdm

    stream = SampleStream(spec, open_source(source or spec.source), model, seed, chat)
    mine = list(range(rank, samples, world_size))
    chunks = [mine[i: i + batch_size] for i in range(0, len(mine), batch_size)]
    found: dict[str, tuple[list[Tensor], list[Tensor], list[Tensor]]] = {}
    for chunk in tqdm(chunks, desc="generation states", unit="batch", disable=not progress, leave=False):
        for m, (hidden, mask, embeds) in model.generation_states(make_batch(stream, chunk, model)).items():
            found.setdefault(m, ([], [], []))
            found[m][0].append(hidden.float().cpu())
            found[m][1].append(mask.cpu())
            found[m][2].append(embeds.float().cpu())
    if not found:
        raise ValueError(f"{samples} samples of the tasks {sorted(spec.tasks)} hold no generation run: the "
                         "projections phase needs tasks that generate media (e.g. text->image)")
    return {m: tuple(torch.cat(parts) for parts in lists) for m, lists in sorted(found.items())}


def generation_state_batches(states: dict[str, tuple[Tensor, Tensor, Tensor]], *, batch_size: int, rank: int = 0,
                             world_size: int = 1, seed: int = 0, start: int = 0) -> Iterator[GenStateBatch]:
    """Endless micro-batches of ``batch_size`` pairs per modality, drawn from ``states`` at random; micro-step ``u``'s
    draw is a pure function of ``(seed, its micro-slot)``, so a resumed run continues the same sequence."""
    u = start
    while True:
        rng = np.random.default_rng([seed, 2 << 20, micro_slot(u, rank, world_size)])
        picked = {}
        for m, parts in states.items():
            rows = torch.from_numpy(rng.integers(0, parts[0].shape[0], batch_size))
            picked[m] = tuple(t[rows] for t in parts)
        yield GenStateBatch(picked)
        u += 1
