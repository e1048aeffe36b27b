"""Evaluation on held-out toy-world scenes: every modality pair, understanding, the highway, compositional
generalisation, and a baseline for comparison.

The prompts come from the same task builders as the training data (``xvila.data.tasks``), one user turn each.
Generated media are judged by the deterministic probes (``xvila.world.probes``) on the attributes that the
task's inputs carry, and by the paper's X-to-X alignment score: the cosine similarity, in the model's own encoder
space, between the generated item and the ground-truth target.

Every mean over scenes comes with its standard error over those scenes (the key with ``_se`` appended): on 10 or 20
scenes one scene judged otherwise moves an accuracy by 0.01-0.10, so small differences between models are noise.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from xvila.configuration import Config
from xvila.conversation import Message
from xvila.data.records import AlignedClip
from xvila.data.tasks import TaskSpec, build_sample, fit_media
from xvila.data.world import sample_clip, world_scene
from xvila.generation import GenerationConfig
from xvila.world import WorldConfig, split_sample
from xvila.world.probes import MEDIA_PROBES, MODALITY_ATTRIBUTES, mask_iou, probe_text
from xvila.world.probes import score as probe_score
from xvila.world.probes import shape_mask

logger = logging.getLogger(__name__)

GENERATION_TASKS = ("text->image", "text->video", "text->audio", "image->video", "image->audio", "video->image",
                    "video->audio", "audio->image", "audio->video", "image+audio->video")
UNDERSTANDING_TASKS = ("image->text", "video->text", "audio->text")
HIGHWAY_TASKS = ("image->video", "video->image")
SECTIONS = ("generation", "understanding", "highway", "compositional", "chat")


@dataclass
class EvalConfig(Config):
    n: int = 20  # test scenes per task
    start: int = 0  # the first scene of each split: scenes start .. start + n - 1 (and of the compositional split)
    sections: tuple[str, ...] = SECTIONS  # which parts to run (a baseline needs "generation")
    compositional_n: int | None = None  # scenes per generation task on held-out combinations (default: n)
    seed: int = 0
    max_new_tokens: int = 48
    num_inference_steps: int | None = None  # None: each decoder's default
    guidance_scale: float | None = None

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.start < 0:
            raise ValueError(f"start must be >= 0, got {self.start}")
        unknown = [s for s in self.sections if s not in SECTIONS]
        if unknown or not self.sections:
            raise ValueError(f"sections must be one or more of {', '.join(SECTIONS)}; got {list(self.sections)}")
        self.sections = tuple(self.sections)

    def check_baseline(self) -> None:
        """Raise ValueError unless these sections can score a baseline (it is compared on generation)."""
        if "generation" not in self.sections:
            raise ValueError("a baseline is compared on generation: include the 'generation' section")


def task_modalities(task: str) -> tuple[tuple[str, ...], str]:
    """``"image+audio->video"`` -> (("image", "audio"), "video"); text is no media."""
    source, target = task.split("->")
    return tuple(m for m in source.split("+") if m != "text"), target


def carried_attributes(task: str) -> tuple[str, ...]:
    """Attributes the task's inputs carry that its output can show (an image carries no motion)."""
    inputs, target = task_modalities(task)
    carried = set().union(*(MODALITY_ATTRIBUTES[m] for m in inputs or ("text",)))
    return tuple(a for a in MODALITY_ATTRIBUTES[target] if a in carried)


def world_clips(split: str, n: int, world: WorldConfig, start: int = 0) -> list[AlignedClip]:
    """Scenes ``start`` .. ``start + n - 1`` of ``split`` as aligned clips."""
    return [sample_clip(split_sample(split, i, world), split, i, world) for i in range(start, start + n)]


def prompt_of(task: str, clip: AlignedClip, spec: TaskSpec, seed: int) -> tuple[list[Message], Message]:
    """The first user turn of a ``task`` conversation about ``clip``, and the answer the data would give."""
    messages = build_sample(task, [clip], np.random.default_rng(seed), spec).messages
    return messages[:1], messages[1]


@torch.no_grad()
def alignment(model, modality: str, generated: torch.Tensor, truth: torch.Tensor) -> float:
    """Cosine similarity of two items in the model's encoder space (the paper's X-to-X alignment score)."""
    shape = model.input_shape(modality)
    both = torch.stack([fit_media(modality, generated.cpu(), shape), fit_media(modality, truth.cpu(), shape)])
    pooled = model.encode(modality, both).pooled_embeds  # (2, E)
    return float(torch.nn.functional.cosine_similarity(pooled[0], pooled[1], dim=0))


def judge(model, task: str, clip: AlignedClip, generated: torch.Tensor | None, truth: torch.Tensor) -> tuple[float, float]:
    """(probe accuracy on the carried attributes, alignment with the ground truth) of one generated item."""
    _, target = task_modalities(task)
    if generated is None:
        return 0.0, 0.0
    scene = world_scene(clip)[0]
    accuracy = probe_score(MEDIA_PROBES[target](generated.float().cpu()), scene, carried_attributes(task))
    return accuracy, alignment(model, target, generated, truth)


def _generate(model, messages, target: str, config: EvalConfig, seed: int, highway: bool = True):
    answer = model.generate(messages, GenerationConfig(
        max_new_tokens=config.max_new_tokens, outputs=(target,), seed=seed, highway=highway,
        num_inference_steps=config.num_inference_steps, guidance_scale=config.guidance_scale))
    items = [m for m in answer.media if m.modality == target]
    return items[0].data if items else None


def summarize(scores, names: tuple[str, ...]) -> dict[str, float]:
    """Per-scene scores (n,) or (n, len(names)) -> {name: mean, name_se: its standard error over the scenes, n}."""
    scores = np.asarray(scores, dtype=float).reshape(len(scores), len(names))
    se = scores.std(axis=0, ddof=1) / np.sqrt(len(scores)) if len(scores) > 1 else np.zeros(len(names))
    out = {}
    for name, mean, err in zip(names, scores.mean(axis=0), se):
        out[name], out[f"{name}_se"] = round(float(mean), 4), round(float(err), 4)
    return {**out, "n": len(scores)}


def summarize_generation(scores: dict[str, list]) -> dict[str, dict[str, float]]:
    """:meth:`Evaluator.generation_scores` -> per task, accuracy and alignment with their standard errors."""
    return {task: summarize(s, ("accuracy", "alignment")) for task, s in scores.items()}


def _first_frame(x: torch.Tensor) -> torch.Tensor:
    return x[0] if x.ndim == 4 else x  # video (T, 3, H, W) -> (3, H, W)


class Evaluator:
    def __init__(self, model, config: EvalConfig, world: WorldConfig | None = None, progress: bool = False):
        self.model = model.eval()
        self.config = config
        self.world = world or WorldConfig()
        self.spec = TaskSpec.from_model(model)
        self.progress = progress

    def _seed(self, i: int) -> int:
        """The prompt and sampling seed of the i-th clip: scene ``start + i`` gets the same one whatever the window."""
        return self.config.seed + self.config.start + i

    def _bar(self, items, desc: str):
        return tqdm(items, desc=desc, disable=not self.progress, leave=False)

    def generation(self, clips: list[AlignedClip], tasks=GENERATION_TASKS) -> dict[str, dict[str, float]]:
        return summarize_generation(self.generation_scores(clips, tasks))

    def generation_scores(self, clips: list[AlignedClip], tasks=GENERATION_TASKS) -> dict[str, list]:
        """{task: [(probe accuracy, alignment) of each clip's generated item]}, skipping unsupported tasks."""
        results = {}
        for task in tasks:
            if why := _unsupported(task, self.spec):
                logger.warning("skipping %s: %s", task, why)
                continue
            _, target = task_modalities(task)
            scores = []
            for i, clip in enumerate(self._bar(clips, task)):
                messages, answer = prompt_of(task, clip, self.spec, self._seed(i))
                generated = _generate(self.model, messages, target, self.config, self._seed(i))
                scores.append(judge(self.model, task, clip, generated, answer.media[0].data))
            results[task] = scores
        return results

    def understanding(self, clips: list[AlignedClip]) -> dict[str, dict[str, float]]:
        results = {}
        for task in UNDERSTANDING_TASKS:
            source = task.split("->")[0]
            scores = []
            for i, clip in enumerate(self._bar(clips, task)):
                messages, _ = prompt_of(task, clip, self.spec, self._seed(i))
                answer = self.model.generate(messages, GenerationConfig(
                    max_new_tokens=self.config.max_new_tokens, seed=self._seed(i), decode_media=False))
                scores.append(probe_score(probe_text(answer.text), world_scene(clip)[0], MODALITY_ATTRIBUTES[source]))
            results[task] = summarize(scores, ("accuracy",))
        return results

    def highway(self, clips: list[AlignedClip]) -> dict[str, dict[str, float]]:
        """IoU of the shape's mask in the visual input and in the output, with and without the highway."""
        results = {}
        for task in HIGHWAY_TASKS:
            (source,), target = task_modalities(task)
            ious = {True: [], False: []}
            for i, clip in enumerate(self._bar(clips, f"highway {task}")):
                messages, _ = prompt_of(task, clip, self.spec, self._seed(i))
                reference = shape_mask(_first_frame(messages[0].media[0].data))
                for on in (True, False):
                    out = _generate(self.model, messages, target, self.config, self._seed(i), highway=on)
                    if out is None:
                        ious[on].append(0.0)
                        continue
                    frame = fit_media("image", _first_frame(out).cpu(), tuple(messages[0].media[0].data.shape[-3:]))
                    ious[on].append(mask_iou(reference, shape_mask(frame)))
            results[task] = summarize(list(zip(ious[True], ious[False])), ("iou_with", "iou_without"))
        return results

    def chat(self) -> dict:
        """Ordinary text questions held out of the chat rehearsal (``xvila.data.chat.PROBES``): the share answered
        sensibly (an expected word, no media)."""
        from xvila.data.chat import ask_probes

        answers = ask_probes(self.model, self.config.max_new_tokens)
        return {**summarize([float(a["sensible"]) for a in answers], ("accuracy",)),
                "answers": {a["question"]: a["answer"] for a in answers}}

    def run(self, baseline: Evaluator | None = None) -> dict:
        """The configured sections (all by default); with ``baseline``, that evaluator's model scored on the same
        test scenes' generation (``baseline``) and this model's gain over it, scene by scene (``versus_baseline``)."""
        c = self.config
        sections = c.sections
        if baseline is not None:
            c.check_baseline()
        test = world_clips("test", c.n, self.world, c.start)
        results = {}
        if "generation" in sections:
            test_scores = self.generation_scores(test)
            results["generation"] = summarize_generation(test_scores)
        if "understanding" in sections:
            results["understanding"] = self.understanding(test)
        if "highway" in sections:
            results["highway"] = self.highway(test) if self.model.config.highway is not None else {}
        if "compositional" in sections:
            held_out = self.generation_scores(world_clips("compositional", c.compositional_n or c.n, self.world,
                                                          c.start))
            accuracy = {"accuracy": None, "accuracy_se": None}  # no task the model can do
            if held_out:
                # the tasks share the held-out scenes: the mean over tasks is the mean over scenes of each scene's
                # task mean, and its standard error is taken over those scene means
                accuracy = summarize(np.mean([np.asarray(s)[:, 0] for s in held_out.values()], axis=0),
                                     ("accuracy",))
            results["compositional"] = {**accuracy, "n": sum(len(s) for s in held_out.values()),
                                        "tasks": summarize_generation(held_out)}
        if "chat" in sections:
            results["chat"] = self.chat()
        if baseline is not None:
            base_scores = baseline.generation_scores(test)
            results["baseline"] = summarize_generation(base_scores)
            results["versus_baseline"] = {
                task: summarize(np.asarray(test_scores[task]) - np.asarray(s), ("accuracy", "alignment"))
                for task, s in base_scores.items() if task in test_scores}
        return results


def _unsupported(task: str, spec: TaskSpec) -> str | None:
    inputs, target = task_modalities(task)
    missing = [m for m in inputs if m not in spec.inputs] + ([target] if target not in spec.gen_tokens else [])
    return f"the model lacks {missing}" if missing else None


def evaluate(model, config: EvalConfig | None = None, baseline=None, world: WorldConfig | None = None,
             progress: bool = False) -> dict:
    """All of the evaluation, as one JSON-able dict. ``baseline``: a second model scored on generation (``baseline``)
    on the same scenes, and the model's gain over it scene by scene (``versus_baseline``: the mean difference of
    accuracy and of alignment, with its paired standard error)."""
    config = config or EvalConfig()
    other = Evaluator(baseline, config, world, progress) if baseline is not None else None
    return Evaluator(model, config, world, progress).run(other)
