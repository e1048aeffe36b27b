"""Training configs: a recipe is a model, an output folder, a seed and a list of phases; a phase is data.

Every field that changes what a phase does lives here, so that one loop (``xvila.train.loop``) runs every phase of
X-VILA's recipe. The YAML files under ``recipes/`` map one to one onto these dataclasses (``xvila.train.recipe``
reads them); the loop only ever sees the dataclasses.

Batch sizes: ``PhaseConfig.batch_size`` is the micro-batch of ONE process; one optimizer step sees
``batch_size * grad_accum * world_size`` samples (the global batch). The data order depends on the global batch
only (see ``xvila.train.data``), so 1 process with ``grad_accum=2`` and 2 processes with ``grad_accum=1`` train on
the same samples in the same order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from xvila.configuration import Config
from xvila.losses import LossWeights
from xvila.trainability import GROUPS, TrainabilitySpec

OBJECTIVES = ("xvila", "foundation", "projections")
SCHEDULES = ("constant", "linear", "cosine")
PRECISIONS = ("no", "bf16", "auto")  # auto: bf16 where the device computes it natively, else fp32
NONFINITE = ("stop", "skip")
STRATEGIES = ("ddp", "fsdp", "deepspeed")
CLIPS_TASK = "clips"  # plain aligned clips for the foundation objective; other tasks: xvila.data.tasks.TASKS
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


# recipe.model names -> XVilaConfig class methods: "tiny" (random, for tests) and "embedded" (xvila-tiny: SmolLM2 +
# MiniLM-conditioned tiny decoders, what recipes/tiny.yaml trains)
NAMED_CONFIGS = ("tiny", "embedded")

@dataclass
class DataSpec(Config):
    """Where the samples come from and which tasks (``xvila.data.tasks.TASKS``) they are turned into."""

    # "world:N": the first N scenes of the toy world's train split, rendered on the fly ("world:SPLIT:N" for another
    # split); or a dataset folder written by `xvila data world` / `xvila data build` (manifest.json + tar shards)
    source: str = "world:256"
    # task -> sampling weight, e.g. {"image->text": 1, "text->video": 1} (xvila.data.tasks.TASKS_BY_PHASE lists
    # each phase's); {"clips": 1} feeds the foundation objective aligned clips
    tasks: dict[str, float] = field(default_factory=lambda: {"image->text": 1.0})
    modalities: tuple[str, ...] | None = None  # media modalities the tasks may use; None: all the model has
    max_length: int | None = None  # longest conversation in tokens (longer ones are an error, not truncated)
    follow_ups: int = 0  # at most this many extra turns after an X-to-X conversation's first (phase 3)
    max_context: int = 3  # "interleaved" shows at most this many earlier clips of the group
    eval_source: str | None = None  # held-out data for eval; None: the same world's "val" split (world sources)
    partial_captions: float = 0.0  # task "clips" on toy-world clips: the share of clips whose caption names only a
    # random non-empty subset of the scene's attributes (xvila.world.partial_caption; the media unchanged), so that
    # each attribute's words are also learned alone (tried on the audio UNet and the encoders, no gain on held-out
    # pairs: docs/training.md, "Where the held-out pairs are lost")
    cache_features: bool = False  # cache frozen-encoder features and caption embeddings (xvila.data.cache)
    cache_dir: str | None = None  # where the cache lives; None: <output_dir>/feature-cache

    def __post_init__(self):
        from xvila.data.tasks import TASKS

        if not self.tasks:
            raise ValueError("data.tasks is empty: name at least one task, e.g. {'image->text': 1.0}")
        for task, weight in self.tasks.items():
            if task not in TASKS and task != CLIPS_TASK:
                raise ValueError(f"unknown data task {task!r}; tasks: {[CLIPS_TASK, *sorted(TASKS)]}")
            if weight < 0:
                raise ValueError(f"data task {task!r} has a negative weight {weight}")
        if sum(self.tasks.values()) <= 0:
            raise ValueError("data.tasks: at least one task needs a positive weight")
        if not 0 <= self.partial_captions <= 1:
            raise ValueError(f"data.partial_captions must be in [0, 1], got {self.partial_captions}")
        if self.partial_captions > 0 and CLIPS_TASK not in self.tasks:
            raise ValueError("data.partial_captions applies to task 'clips' only")
        if CLIPS_TASK in self.tasks and len(self.tasks) > 1:
            raise ValueError("data task 'clips' (foundation training) cannot be mixed with conversation tasks")
        if self.follow_ups < 0 or self.max_context < 1:
            raise ValueError(f"data: need follow_ups >= 0 and max_context >= 1, got {self.follow_ups}, "
                             f"{self.max_context}")
        if self.cache_features and self.wants_clips:
            raise ValueError("data.cache_features: the foundation objective trains the encoders, nothing to cache")
        parse_source(self.source)
        if self.eval_source is not None:
            parse_source(self.eval_source)

    @property
    def wants_clips(self) -> bool:
        return CLIPS_TASK in self.tasks


def parse_source(source: str) -> tuple[str, str | None, int | None]:
    """("world", split, n) for a toy-world source, ("dir", None, None) for a dataset folder."""
    if source.startswith("world:"):
        parts = source.split(":")[1:]
        split, n = ("train", parts[0]) if len(parts) == 1 else (parts[0], parts[-1])
        if len(parts) > 2 or not n.isdigit() or int(n) < 1:
            raise ValueError(f"data source {source!r}: write 'world:N' or 'world:SPLIT:N' with N >= 1")
        from xvila.world import SPLITS

        if split not in SPLITS:
            raise ValueError(f"data source {source!r}: unknown split {split!r}; splits: {list(SPLITS)}")
        return "world", split, int(n)
    if not source:
        raise ValueError("data source is empty: give 'world:N' or a dataset folder")
    return "dir", None, None


@dataclass
class FoundationConfig(Config):
    """Phase 0 (tiny models only): ImageBind-style contrastive training of the encoders, text->X training of the
    decoders conditioned on their own text encoders, and the word pre-alignment of input projections that mix words
    (``InputProjectionConfig.vocabulary_scale``). Used when ``PhaseConfig.objective == "foundation"``."""

    contrastive: float = 1.0  # weight of the symmetric InfoNCE loss, averaged over ``pairs``
    denoise: float = 1.0  # weight of the decoders' denoising loss on captioned media, averaged over ``decoders``
    autoencode: float = 0.0  # weight of the decoders' VAE reconstruction loss (train group "vaes"), averaged over
    # ``decoders``; the phase then sets each VAE's per-channel latent statistics (Decoder.calibrate_latents)
    words: float = 0.0  # weight of the word loss of the input projections (train group "input_projections"), no
    # LLM pass: each word of a clip's caption should be the likeliest word of one of the clip's media tokens,
    # weighted by its inverse document frequency among the captions seen so far (so "a" and "," count little)
    vae_kl: float = 1.0e-4  # weight of the VAE posterior's KL term (per input element) in the autoencode loss
    vae_inputs: int | None = None  # at most this many VAE inputs per decoder and micro-batch, drawn at random (a
    # video clip gives one per frame); None: all
    pairs: list[tuple[str, str]] = field(default_factory=lambda: [
        ("image", "text"), ("video", "text"), ("audio", "text"), ("image", "video"), ("video", "audio")])
    decoders: tuple[str, ...] | None = None  # output modalities trained text->X; None: all the model has
    min_logit_scale: float = 10.0  # floor on the temperature (image/video have none of their own in ImageBind)
    cond_dropout: float = 0.1  # share of captions replaced by "" so the decoders learn the unconditional branch
    # that classifier-free guidance samples with
    cond_mix: float = 0.0  # denoising: each caption's text condition moves towards another caption's of the
    # micro-batch by a fraction drawn from [0, cond_mix); blanked captions are left as they are
    cond_noise: float = 0.0  # denoising: then Gaussian noise of this std is added to each of its elements (in the
    # condition's own units: the embedded model's MiniLM condition has norm 19.6). Both mimic the output
    # projections' errors, about half of which lie along the directions in which captions differ, so that a decoder
    # learns to draw what dominates a condition that is a little off
    timestep_power: float = 1.0  # denoising: timesteps t = T * u^(1/p), u uniform (Decoder.denoising_loss); p > 1
    # favours the noisiest ones, where a sample's layout is decided
    min_snr_gamma: float | None = None  # denoising: Min-SNR-gamma loss weights (Decoder.denoising_loss); None: off
    posterior_cache: int = 0  # denoising: keep the frozen VAEs' posteriors of up to this many clips in memory (per
    # decoder and process) and only sample from them when a clip comes again, instead of running the VAE encoder
    # each time (same loss; 0: no cache). A clip's media must be the same each time it comes (no random
    # augmentation). Costs clips x latent size, e.g. 4000 toy clips: about 70 MB for video

    def __post_init__(self):
        weights = (self.contrastive, self.denoise, self.autoencode, self.words)
        if min(weights) < 0 or sum(weights) <= 0 or self.vae_kl < 0:
            raise ValueError("foundation: contrastive, denoise, autoencode, words and vae_kl weights must be >= 0, "
                             "and one of the first four > 0")
        if self.vae_inputs is not None and self.vae_inputs < 1:
            raise ValueError(f"foundation.vae_inputs must be >= 1 or null, got {self.vae_inputs}")
        if self.denoise > 0 and self.autoencode > 0:
            raise ValueError("foundation: train the VAEs (autoencode) in a phase before the denoisers (denoise): "
                             "the latents the denoisers learn would move under them")
        known = ("image", "video", "audio", "text")
        for a, b in self.pairs:
            if a not in known or b not in known or a == b:
                raise ValueError(f"foundation pair ({a}, {b}): use two different modalities of {list(known)}")
        if self.timestep_power <= 0:
            raise ValueError(f"foundation.timestep_power must be > 0, got {self.timestep_power}")
        if self.min_snr_gamma is not None and self.min_snr_gamma <= 0:
            raise ValueError(f"foundation.min_snr_gamma must be > 0 or null, got {self.min_snr_gamma}")
        if self.posterior_cache < 0:
            raise ValueError(f"foundation.posterior_cache must be >= 0 clips, got {self.posterior_cache}")
        if not 0 <= self.cond_dropout < 1:
            raise ValueError(f"foundation.cond_dropout must be in [0, 1), got {self.cond_dropout}")
        if not 0 <= self.cond_mix < 0.5:
            raise ValueError(f"foundation.cond_mix must be in [0, 0.5) (the caption must stay the nearer one), "
                             f"got {self.cond_mix}")
        if self.cond_noise < 0:
            raise ValueError(f"foundation.cond_noise must be >= 0, got {self.cond_noise}")
        if self.contrastive > 0 and not self.pairs:
            raise ValueError("foundation.contrastive > 0 needs at least one pair")


@dataclass
class ProjectionsConfig(Config):
    """Textual alignment on cached LLM states, used when ``PhaseConfig.objective == "projections"``: the frozen LLM
    runs once over ``samples`` conversations of the phase's data; its hidden states at the generation runs, each
    with its caption's decoder embedding, are kept in memory; the output projections then train on those pairs
    (``batch_size`` per output modality per micro-batch) for the phase's steps. Many more projection updates than
    in-loop alignment affords on a CPU, where each one costs an LLM pass."""

    samples: int = 1600  # conversations run through the LLM (split among the processes)
    standardize: bool = True  # set each projection's input statistics from the collected hidden states
    # precision of the LLM pass that collects the states ("no" | "bf16" | "auto"); None: the phase's ``precision``,
    # which also sets the projections' training. On the 2-core AVX-512 dev machine bf16 collected about 2x faster
    # (11.7-11.9 against 5.1-6.2 conversations/s), with states at a cosine of 0.9996 to fp32's.
    collect_precision: str | None = None

    def __post_init__(self):
        if self.samples < 1:
            raise ValueError(f"projections.samples must be >= 1, got {self.samples}")
        if self.collect_precision is not None and self.collect_precision not in PRECISIONS:
            raise ValueError(f"projections.collect_precision {self.collect_precision!r}; choose one of "
                             f"{list(PRECISIONS)} (or leave it out: the phase's precision)")


@dataclass
class OptimizerConfig(Config):
    """AdamW over the trainable parameters, one parameter group per component group."""

    lr: float = 1e-4
    group_lr: dict[str, float] = field(default_factory=dict)  # component group -> its own learning rate
    weight_decay: float = 0.0  # applied to matrices only (not to biases, norms or added token rows)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"optimizer.lr must be > 0, got {self.lr}")
        for group, lr in self.group_lr.items():
            if group not in GROUPS:
                raise ValueError(f"optimizer.group_lr: unknown component group {group!r}; groups: {list(GROUPS)}")
            if lr <= 0:
                raise ValueError(f"optimizer.group_lr[{group!r}] must be > 0, got {lr}")
        if self.weight_decay < 0:
            raise ValueError(f"optimizer.weight_decay must be >= 0, got {self.weight_decay}")


@dataclass
class ScheduleConfig(Config):
    """Linear warm-up from 0, then constant, linear or cosine decay to ``min_lr_ratio`` of the peak."""

    kind: str = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise ValueError(f"schedule.kind {self.kind!r}; choose one of {list(SCHEDULES)}")
        if self.warmup_steps < 0:
            raise ValueError(f"schedule.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"schedule.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


@dataclass
class PhaseConfig(Config):
    """One phase of the recipe: what trains, on which losses and data, for how long."""

    name: str
    trainable: TrainabilitySpec
    data: DataSpec = field(default_factory=DataSpec)
    objective: str = "xvila"  # "xvila": the model's own losses; "foundation" / "projections": see their configs
    losses: LossWeights = field(default_factory=LossWeights)
    foundation: FoundationConfig = field(default_factory=FoundationConfig)
    projections: ProjectionsConfig = field(default_factory=ProjectionsConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    steps: int = 100  # optimizer steps
    batch_size: int = 4  # micro-batch per process
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0  # None: no clipping (the norm is still measured and logged)
    # "bf16": autocast to bfloat16 (CUDA, or CPUs with bf16 support); "auto": bf16 where the device computes it
    # natively (a GPU with bf16, a CPU with AVX-512), else fp32 (an AVX2-only CPU emulates bf16, far slower;
    # docs/training.md)
    precision: str = "no"
    activation_checkpointing: bool = False
    checkpoint_every: int = 0  # optimizer steps between checkpoints; 0: none before the phase ends
    keep_checkpoints: int = 2  # the newest this many are kept
    log_every: int = 1
    eval_every: int = 0  # optimizer steps between held-out evaluations; 0: none
    eval_batches: int = 2
    nonfinite: str = "stop"  # a NaN/inf loss or gradient: "stop" the run, or "skip" the step
    init: str | None = None  # a model folder to start from; None: the previous phase's output (or recipe.model)
    ema_decay: float = 0.0  # > 0: the phase saves an exponential moving average of its trainable weights

    def __post_init__(self):
        if not _NAME.match(self.name):
            raise ValueError(f"phase name {self.name!r}: use letters, digits, '-' and '_' (it names folders)")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"phase {self.name}: objective {self.objective!r}; choose one of {list(OBJECTIVES)}")
        if self.objective == "foundation" and not self.data.wants_clips:
            raise ValueError(f"phase {self.name}: the foundation objective trains on aligned clips: set "
                             "data.tasks to {clips: 1.0}")
        if self.objective != "foundation" and self.data.wants_clips:
            raise ValueError(f"phase {self.name}: data task 'clips' feeds the foundation objective only")
        if self.objective == "projections" and any(
                mode != "frozen" for g, mode in self.trainable.groups.items() if g != "output_projections"):
            raise ValueError(f"phase {self.name}: the projections objective trains output_projections only (the LLM "
                             "states it trains on are collected once, so everything before them stays frozen)")
        if self.objective == "xvila" and not any(self.losses.active(n) for n in ("lm", "align", "denoise", "highway")):
            raise ValueError(f"phase {self.name}: every loss weight is 0")
        for name in ("steps", "batch_size", "grad_accum", "log_every", "eval_batches", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"phase {self.name}: {name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"phase {self.name}: ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.checkpoint_every < 0 or self.eval_every < 0:
            raise ValueError(f"phase {self.name}: checkpoint_every and eval_every must be >= 0")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError(f"phase {self.name}: max_grad_norm must be > 0 or null")
        if self.precision not in PRECISIONS:
            raise ValueError(f"phase {self.name}: precision {self.precision!r}; choose one of {list(PRECISIONS)}")
        if self.nonfinite not in NONFINITE:
            raise ValueError(f"phase {self.name}: nonfinite {self.nonfinite!r}; choose one of {list(NONFINITE)}")
        if not any(m != "frozen" for m in self.trainable.groups.values()):
            raise ValueError(f"phase {self.name}: nothing is trainable; set trainable.groups, e.g. "
                             "{input_projections: full}")


@dataclass
class DistributedConfig(Config):
    """How several processes share the work. Used when the run is launched with torchrun / accelerate (the
    ``WORLD_SIZE`` environment variable > 1); a single process ignores it."""

    strategy: str = "ddp"  # "ddp": replicated weights; "fsdp": FSDP2 sharding (fully_shard); "deepspeed": GPU only
    find_unused_parameters: bool = True  # phases skip parts of the model on some batches (e.g. no audio target)
    backend: str | None = None  # None: nccl on CUDA, gloo on CPU
    deepspeed_config: str | None = None  # a DeepSpeed JSON config (e.g. recipes/deepspeed/zero2.json)

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"distributed.strategy {self.strategy!r}; choose one of {list(STRATEGIES)}")
        if self.strategy == "deepspeed" and not self.deepspeed_config:
            raise ValueError("distributed.strategy 'deepspeed' needs deepspeed_config= a DeepSpeed JSON file")


@dataclass
class RecipeConfig(Config):
    """A whole training run: phases run one after another, each starting from the previous one's weights."""

    phases: list[PhaseConfig]
    model: str | dict[str, Any] = "tiny"  # a NAMED_CONFIGS name, a saved model folder, or an XVilaConfig dict
    output_dir: str = "runs/xvila"
    seed: int = 0
    device: str = "auto"  # "auto": this process's CUDA device if there is one, else the CPU; or "cpu", "cuda"
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def __post_init__(self):
        if not self.phases:
            raise ValueError("a recipe needs at least one phase")
        names = [p.name for p in self.phases]
        if len(set(names)) != len(names):
            raise ValueError(f"phase names must be unique, got {names}")
        if isinstance(self.model, dict):
            from xvila.config import XVilaConfig

            XVilaConfig.from_dict(self.model)  # fail now, not after the first phases ran
        elif not self.model:
            raise ValueError("recipe.model is empty: give 'tiny', a saved model folder or an XVilaConfig mapping")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"recipe.device {self.device!r}; choose 'auto', 'cpu' or 'cuda'")

    def phase_index(self, name: str) -> int:
        for i, phase in enumerate(self.phases):
            if phase.name == name:
                return i
        raise ValueError(f"no phase named {name!r}; phases: {[p.name for p in self.phases]}")
