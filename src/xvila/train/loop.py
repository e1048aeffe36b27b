"""The training loop: one function runs every phase of a recipe; phases differ by their :class:`PhaseConfig`.

    train(recipe)                         every phase in order, each from the previous phase's output
    train(recipe, phase="x2x_visual")     one phase, from the previous phase's output (or ``init=DIR``)
    train(recipe, resume="runs/tiny")     continue an interrupted run from its latest checkpoint

Layout of ``recipe.output_dir``::

    recipe.json                   the resolved recipe of the last start
    metrics.jsonl, tensorboard/   see xvila.train.feedback
    checkpoints/<phase>/step-N/   see xvila.train.checkpoint
    phase-<name>/                 the model at the end of each phase (XVilaModel.save_pretrained) + train_summary.json

One phase, in order: build the phase's starting model on the CPU (seeded, so a tiny random model is the same in
every process and on every resume); apply the trainability spec; build the decoders the phase's losses need and no
others; restore the checkpoint's trainable weights; wrap the objective (DDP / FSDP2); build AdamW over the
trainable parameters only, one group per component group; restore optimizer, scheduler and RNG states; loop.

Every micro-batch re-seeds torch's RNG from ``(seed, phase, global micro-slot)``, so diffusion noise and dropout
depend on the sample, not on the process that draws it: a run is reproducible across resumes and across world
sizes with the same global batch.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import random
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from xvila.train import checkpoint as ckpt_io
from xvila.train.config import NAMED_CONFIGS, OptimizerConfig, PhaseConfig, RecipeConfig, ScheduleConfig
from xvila.train.data import (
    chat_pairs,
    collect_generation_states,
    eval_source_of,
    generation_state_batches,
    make_batches,
    micro_slot,
    release_sources,
    sources_of,
)
from xvila.train.distributed import (
    DeepSpeedStrategy,
    Runtime,
    all_reduce_mean,
    autocast,
    barrier,
    check_precision,
    init_runtime,
    make_strategy,
    place,
    resolve_precision,
    shutdown_runtime,
)
from xvila.train.ema import EMA
from xvila.train.feedback import PhaseSummary, Reporter
from xvila.train.objectives import build_objective, needed_decoders

logger = logging.getLogger(__name__)

RECIPE_FILE = "recipe.json"
SUMMARY_FILE = "train_summary.json"


class NonFiniteLossError(RuntimeError):
    """A NaN or inf loss (or gradient) with ``nonfinite: stop``: nothing of that step was applied or saved."""


class TrainingError(RuntimeError):
    """A run that cannot start as asked: the message says what to do."""


def derive_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------- entry point
def train(recipe: RecipeConfig, resume: str | Path | None = None, phase: str | None = None,
          init: str | Path | None = None, progress: bool = False) -> list[PhaseSummary]:
    """Run the recipe's phases (or only ``phase``), optionally resuming the run folder or checkpoint ``resume``.

    ``init`` overrides where the first phase run starts from (a saved model folder). Returns one summary per
    phase run in this call.
    """
    runtime = init_runtime(recipe.device, recipe.distributed)
    reporter = None
    try:
        out, resume_ckpt = _resolve_output(recipe, resume)
        selected = [recipe.phase_index(phase)] if phase else list(range(len(recipe.phases)))
        if resume is None:
            _check_fresh(out, recipe, selected, runtime, single_phase=phase is not None)
        barrier(runtime)
        reporter = Reporter(out, enabled=runtime.is_main, progress=progress)
        if runtime.is_main:
            ckpt_io.atomic_write_text(out / RECIPE_FILE, json.dumps(recipe.to_dict(), indent=2) + "\n")
        summaries = []
        for k, index in enumerate(selected):
            p = recipe.phases[index]
            ckpt = None
            if resume_ckpt is not None:  # an explicit checkpoint: earlier phases are done, later ones start fresh
                position = recipe.phase_index(resume_ckpt.parent.name)
                if index < position:
                    continue
                ckpt = resume_ckpt if index == position else None
            elif resume is not None:
                if (out / f"phase-{p.name}" / SUMMARY_FILE).is_file():
                    logger.info("phase %s is complete: skipping it", p.name)
                    continue
                ckpt = ckpt_io.latest_checkpoint(out / "checkpoints" / p.name)
            summaries.append(run_phase(recipe, index, runtime, reporter, out, ckpt=ckpt,
                                       init=init if k == 0 else None))
            # a phase's clips stay open for the later phases that read the same source, and no longer
            later = {name for i in selected[k + 1:] for name in sources_of(recipe.phases[i].data)}
            released = release_sources(keep=later)
            if released:
                logger.info("closed the clip sources no later phase reads: %s", ", ".join(released))
        return summaries
    finally:
        if reporter is not None:
            reporter.close()
        shutdown_runtime(runtime)


def _resolve_output(recipe: RecipeConfig, resume) -> tuple[Path, Path | None]:
    """The run folder, and the checkpoint to resume when ``resume`` names one."""
    if resume is None:
        return Path(recipe.output_dir), None
    resume = Path(resume)
    if (resume / ckpt_io.STATE_FILE).is_file():  # .../checkpoints/<phase>/step-N
        return resume.parent.parent.parent, resume
    if not resume.is_dir():
        raise TrainingError(f"--resume {resume}: no such run folder or checkpoint")
    if Path(recipe.output_dir).resolve() != resume.resolve():
        logger.info("resuming the run in %s (the recipe's output_dir %s is not used)", resume, recipe.output_dir)
    return resume, None


def _check_fresh(out: Path, recipe: RecipeConfig, selected: list[int], runtime: Runtime, single_phase: bool) -> None:
    names = [recipe.phases[i].name for i in selected]
    existing = [n for n in names if (out / f"phase-{n}").exists() or ckpt_io.list_checkpoints(out / "checkpoints" / n)]
    if not existing:
        return
    if not single_phase:
        raise TrainingError(f"{out} already holds a run (phases {existing}): pass --resume {out} to continue it, "
                            f"--phase NAME to rerun one phase, or choose another output_dir")
    if runtime.is_main:  # rerunning one phase: its old checkpoints would otherwise be resumed by mistake
        logger.info("rerunning phase %s: removing its old checkpoints", names[0])
        shutil.rmtree(out / "checkpoints" / names[0], ignore_errors=True)


# ------------------------------------------------------------------------------------------------- one phase
def phase_start(recipe: RecipeConfig, index: int, out: Path, init=None):
    """Where phase ``index`` takes its weights from: a NAMED_CONFIGS name, a model folder, or an XVilaConfig dict."""
    phase = recipe.phases[index]
    if init is not None:
        return str(init)
    if phase.init is not None:
        return phase.init
    if index == 0:
        return recipe.model
    previous = out / f"phase-{recipe.phases[index - 1].name}"
    if not (previous / SUMMARY_FILE).is_file():
        raise TrainingError(f"phase {phase.name} starts from the output of phase {recipe.phases[index - 1].name} "
                            f"({previous}), which does not exist: run that phase first, or start from a saved "
                            f"model with --init DIR (or phases.{index}.init=DIR)")
    return str(previous)


def load_start_model(start):
    from xvila.config import XVilaConfig
    from xvila.model import XVilaModel

    if isinstance(start, dict):
        return XVilaModel(XVilaConfig.from_dict(start))
    if start in NAMED_CONFIGS:
        return XVilaModel(getattr(XVilaConfig, start)())
    if not Path(start).is_dir():
        raise TrainingError(f"model {start!r}: not a saved model folder (or one of {list(NAMED_CONFIGS)}, or an "
                            "XVilaConfig mapping)")
    return XVilaModel.from_pretrained(start)


def run_phase(recipe: RecipeConfig, index: int, runtime: Runtime, reporter: Reporter, out: Path, *,
              ckpt: Path | None = None, init=None) -> PhaseSummary:
    from xvila.trainability import apply_trainability

    t_start = time.perf_counter()
    phase = recipe.phases[index]
    strategy = make_strategy(runtime, recipe.distributed)
    if isinstance(strategy, DeepSpeedStrategy) and (phase.grad_accum != 1 or phase.checkpoint_every or ckpt):
        raise TrainingError(f"phase {phase.name}: with DeepSpeed set grad_accum: 1 (and "
                            "gradient_accumulation_steps: 1 in its JSON) and checkpoint_every: 0; checkpoints and "
                            "resume are not implemented for it")
    check_precision(phase.precision, runtime.device)
    if phase.objective == "projections" and phase.projections.collect_precision:
        check_precision(phase.projections.collect_precision, runtime.device)
    for name, value in (("precision", phase.precision), ("collect_precision", phase.projections.collect_precision)):
        if value == "auto":
            logger.info("phase %s: %s auto -> %s on %s", phase.name, name,
                        resolve_precision(value, runtime.device), runtime.device)
    state = ckpt_io.read_state(ckpt) if ckpt is not None else None
    if state is not None and state["recipe"]["phases"][index] != phase.to_dict():
        logger.warning("phase %s: the recipe differs from the one %s was written with; continuing with the new one",
                       phase.name, ckpt)
    start = state["start"] if state is not None else phase_start(recipe, index, out, init)
    logger.info("phase %s: starting from %s%s", phase.name, start if isinstance(start, str) else "a config",
                f", resuming {ckpt}" if ckpt else "")

    # ---- the model, on the CPU, the same in every process and on every resume
    def build():
        seed_everything(derive_seed(recipe.seed, index))
        model = load_start_model(start)
        for m in needed_decoders(model, phase):
            model.decoder(m)
        apply_trainability(model, phase.trainable)
        return model

    model = build()
    decoders = needed_decoders(model, phase)
    if ckpt is not None:
        ckpt_io.load_trainable(model, ckpt)
    if phase.activation_checkpointing:
        enable_activation_checkpointing(model)
    objective = build_objective(model, phase, decoders)
    _check_covered(model, objective, phase)
    place(objective, runtime.device)
    chat = chat_pairs(phase.data, model, progress=reporter.progress)  # runs the LLM: before sharding it
    wrapped = strategy.wrap(objective)
    optimizer = build_optimizer(model, phase.optimizer, fused=not strategy.sharded)  # DTensors: the foreach path
    scheduler = build_scheduler(optimizer, phase.schedule, phase.steps)
    if isinstance(strategy, DeepSpeedStrategy):
        wrapped, optimizer = strategy.initialize(objective, optimizer)
    ema = None
    if phase.ema_decay:
        if strategy.sharded:
            raise TrainingError(f"phase {phase.name}: ema_decay works with distributed.strategy 'ddp' (or one "
                                "process), not with sharded weights")
        ema = EMA(ckpt_io.trainable_parameters(model), phase.ema_decay)
    first_step = 0
    if ckpt is not None:
        ckpt_io.load_trainer_state(ckpt, optimizer, scheduler, strategy, runtime)
        if ema is not None:
            ema.load_state_dict(ckpt_io.load_ema(ckpt))
        first_step = state["step"]
    built = set(model.decoders)

    # ---- data
    data_seed = derive_seed(recipe.seed, index, 1)
    accum, world = phase.grad_accum, runtime.world_size
    global_batch = phase.batch_size * accum * world
    if state is not None and state["global_batch"] != global_batch:
        logger.warning("resuming with a global batch of %d samples where the checkpoint used %d: the data order "
                       "from here on differs from the interrupted run's", global_batch, state["global_batch"])
    cache = feature_cache(phase, model, out, strategy)
    batches = phase_batches(phase, model, runtime, data_seed, start=first_step * accum, cache=cache,
                            progress=reporter.progress, chat=chat)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    ckpt_dir = out / "checkpoints" / phase.name
    if runtime.is_main:
        ckpt_io.remove_leftovers(ckpt_dir)
        ckpt_io.remove_leftovers(out)
    base_state = {"phase": phase.name, "phase_index": index, "start": start, "recipe": recipe.to_dict(),
                  "global_batch": global_batch}

    reporter.start_phase(phase.name, phase.steps, first_step)
    objective.train()
    skipped = 0
    t_phase = time.perf_counter()
    for step in range(first_step, phase.steps):
        t_step = time.perf_counter()
        total, parts = accumulate_gradients(wrapped, strategy, batches, phase, runtime, step, data_seed)
        loss = float(all_reduce_mean(total, runtime))  # every process takes the same decision below
        grad_norm = float(strategy.grad_norm(params, phase.max_grad_norm))
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        if not finite and phase.nonfinite == "stop":
            optimizer.zero_grad(set_to_none=True)
            last = ckpt_io.latest_checkpoint(ckpt_dir)
            raise NonFiniteLossError(
                f"phase {phase.name}, step {step + 1}: the loss ({loss}) or gradient norm ({grad_norm}) is not "
                f"finite. Nothing of this step was applied or saved; the last checkpoint is {last}. Lower the "
                f"learning rate, use precision 'no', or set nonfinite: skip to drop such steps")
        if finite:
            strategy.step(optimizer)
            if ema is not None:
                ema.update()
        else:
            skipped += 1
            reporter.note(f"phase {phase.name}, step {step + 1}: non-finite loss {loss} / grad norm {grad_norm}: "
                          "step skipped")
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if set(model.decoders) != built:
            raise RuntimeError(f"decoders {sorted(set(model.decoders) - built)} were built during phase "
                               f"{phase.name}: the data asks for outputs its losses were not set up for")
        done = step + 1
        step_time = time.perf_counter() - t_step
        record = {"step": done, "loss": loss, "losses": _gather_losses(parts, runtime),
                  "lr": {g["name"]: g["lr"] for g in optimizer.param_groups if not g["name"].endswith("no_decay")},
                  "grad_norm": grad_norm, "samples_per_s": global_batch / step_time, "step_time_s": step_time,
                  "skipped": not finite}
        reporter.step(record, log=done % phase.log_every == 0 or done == phase.steps)
        if phase.eval_every and done % phase.eval_every == 0:
            reporter.eval(done, evaluate(wrapped, objective, model, phase, runtime, data_seed, cache, chat))
        if phase.checkpoint_every and done % phase.checkpoint_every == 0 and done < phase.steps:
            ckpt_io.save_checkpoint(ckpt_dir, done, model=model, objective=objective, optimizer=optimizer,
                                    scheduler=scheduler, strategy=strategy, runtime=runtime,
                                    state=dict(base_state, micro_step=done * accum, samples=done * global_batch),
                                    keep=phase.keep_checkpoints, ema=ema.state_dict() if ema else None)
    elapsed = time.perf_counter() - t_phase
    steps_run = phase.steps - first_step
    final = out / f"phase-{phase.name}"
    summary = PhaseSummary(phase.name, steps_run, phase.steps, round(elapsed, 3), steps_run * global_batch,
                           round(steps_run * global_batch / max(elapsed, 1e-9), 3), reporter.final_losses(),
                           skipped, str(final), round(t_phase - t_start, 3))
    if ema is not None:
        ema.copy_to_params()
    export = strategy.export_model(objective, model, rebuild=build)
    if export is not None and phase.objective == "foundation" and phase.foundation.autoencode > 0:
        calibrate_vaes(export, phase, decoders, data_seed)
    save_phase_output(export, runtime, final, summary, recipe)
    reporter.end_phase(summary)
    del wrapped, objective, optimizer, scheduler, model, export
    gc.collect()
    if runtime.device.type == "cuda":
        torch.cuda.empty_cache()
    return summary


def accumulate_gradients(wrapped, strategy, batches, phase: PhaseConfig, runtime: Runtime, step: int,
                         data_seed: int) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
    """Forward and backward ``phase.grad_accum`` micro-batches; the gradients are exchanged on the last one.

    Returns this process's mean total loss and every named loss of every micro-batch (detached)."""
    accum, world = phase.grad_accum, runtime.world_size
    total = torch.zeros((), device=runtime.device)
    parts: dict[str, list[torch.Tensor]] = {}
    for a in range(accum):
        u = step * accum + a
        batch = next(batches).to(runtime.device)
        torch.manual_seed(derive_seed(data_seed, micro_slot(u, runtime.rank, world)))  # noise follows the sample
        with strategy.sync_context(wrapped, sync=a == accum - 1):
            with autocast(phase.precision, runtime.device):
                result = wrapped(batch)
            strategy.backward(result.loss / accum)
        total += result.loss.detach().float() / accum
        for k, v in result.losses.items():
            parts.setdefault(k, []).append(v.float())
    return total, parts


def _gather_losses(parts: dict[str, list[torch.Tensor]], runtime: Runtime) -> dict[str, float]:
    """The mean of each named loss over every micro-batch (of every process) that computed it."""
    keys = sorted(parts)
    sums = torch.stack([torch.stack(parts[k]).sum() for k in keys]).tolist() if keys else []  # one device sync
    local = {k: (s, len(parts[k])) for k, s in zip(keys, sums)}
    if runtime.distributed:
        import torch.distributed as dist

        gathered = [None] * runtime.world_size
        dist.all_gather_object(gathered, local)
    else:
        gathered = [local]
    merged: dict[str, list[float]] = {}
    for part in gathered:
        for k, (s, n) in part.items():
            acc = merged.setdefault(k, [0.0, 0])
            acc[0] += s
            acc[1] += n
    return {k: s / n for k, (s, n) in sorted(merged.items())}


@torch.no_grad()
def evaluate(wrapped: nn.Module, objective: nn.Module, model, phase: PhaseConfig, runtime: Runtime,
             data_seed: int, cache=None, chat: tuple = ()) -> dict[str, float]:
    """Mean losses over ``phase.eval_batches`` fixed held-out micro-batches per process."""
    batches = phase_batches(phase, model, runtime, data_seed, source=eval_source_of(phase.data), cache=cache,
                            chat=chat)
    objective.eval()
    parts: dict[str, list[torch.Tensor]] = {}
    try:
        for u in range(phase.eval_batches):
            torch.manual_seed(derive_seed(data_seed, 2, micro_slot(u, runtime.rank, runtime.world_size)))
            with autocast(phase.precision, runtime.device):
                result = wrapped(next(batches).to(runtime.device))
            for k, v in {"loss": result.loss.detach(), **result.losses}.items():
                parts.setdefault(k, []).append(v.float())
    finally:
        objective.train()
    return _gather_losses(parts, runtime)


def save_phase_output(export, runtime: Runtime, final: Path, summary: PhaseSummary, recipe: RecipeConfig) -> None:
    """The phase's model as ``XVilaModel.save_pretrained`` writes it, published atomically by the main process."""
    if runtime.is_main:
        bad = [n for n, p in export.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
        if bad:
            raise ckpt_io.CheckpointError(f"refusing to save phase {summary.phase}: non-finite weights {bad[:3]}")
        tmp = final.with_name(ckpt_io.TMP_PREFIX + final.name)
        shutil.rmtree(tmp, ignore_errors=True)
        export.save_pretrained(tmp)
        (tmp / RECIPE_FILE).write_text(json.dumps(recipe.to_dict(), indent=2) + "\n")
        (tmp / SUMMARY_FILE).write_text(json.dumps(asdict(summary), indent=2) + "\n")  # written last
        ckpt_io.publish_dir(tmp, final)
    barrier(runtime)


# ------------------------------------------------------------------------------------------ building blocks
def phase_batches(phase: PhaseConfig, model, runtime: Runtime, data_seed: int, *, start: int = 0,
                  source: str | None = None, cache=None, progress: bool = False, chat: tuple = ()):
    """This process's micro-batches from micro-step ``start`` on: the phase's data (``source``: held-out data for
    eval instead), or, for the projections objective, pairs collected from the frozen LLM over that data (for
    training, the projections' input statistics are set from them first)."""
    rank, world = runtime.rank, runtime.world_size
    if phase.objective != "projections":
        return make_batches(phase.data, model, batch_size=phase.batch_size, rank=rank, world_size=world,
                            seed=data_seed, start=start, source=source, cache=cache, chat=chat)
    held_out = source is not None
    samples = phase.eval_batches * phase.batch_size * world if held_out else phase.projections.samples
    was_training = model.training
    model.eval()
    with autocast(phase.projections.collect_precision or phase.precision, runtime.device):
        states = collect_generation_states(phase.data, model, samples=samples, batch_size=phase.batch_size,
                                           rank=rank, world_size=world, seed=data_seed, source=source,
                                           progress=progress, chat=chat)
    model.train(was_training)
    if not held_out and phase.projections.standardize:
        for m, (hidden, mask, _) in states.items():
            model.output_projections[m].standardize(hidden, mask)  # DDP broadcasts rank 0's statistics
    return generation_state_batches(states, batch_size=phase.batch_size, rank=rank, world_size=world,
                                    seed=data_seed, start=start)


def calibrate_vaes(model, phase: PhaseConfig, decoders: tuple[str, ...], data_seed: int,
                   samples: int = 512) -> None:
    """After a phase that trained the decoders' VAEs: each VAE's per-channel latent statistics, measured on the
    first ``samples`` clips of the phase's data, go into the VAE and the model's config (saved with it)."""
    batches = make_batches(phase.data, model, batch_size=phase.batch_size, seed=data_seed)
    clips = [next(batches) for _ in range(max(1, -(-samples // phase.batch_size)))]
    device = model.device
    for m in decoders:
        decoder = model.decoder(m)
        media = torch.cat([c.media[m] for c in clips]).to(device)
        values = decoder.calibrate_latents(media)
        model.config.decoders.get(m).vae.update(values)
        logger.info("%s VAE latents: mean %s, std %s", m, values["latents_mean"], values["latents_std"])


def feature_cache(phase: PhaseConfig, model, out: Path, strategy):
    """``xvila.data.cache.FeatureCache`` for the phase's frozen encoder (and caption embeddings when the alignment
    loss is on), or None when ``data.cache_features`` is off."""
    if not phase.data.cache_features:
        return None
    if phase.trainable.mode("encoders") != "frozen":
        raise TrainingError(f"phase {phase.name}: data.cache_features needs a frozen encoder (it trains here)")
    if strategy.sharded:
        raise TrainingError(f"phase {phase.name}: data.cache_features runs the encoder outside the sharded model: "
                            "use distributed.strategy 'ddp' with it")
    from xvila.data.cache import FeatureCache

    directory = Path(phase.data.cache_dir) if phase.data.cache_dir else out / "feature-cache"
    return FeatureCache(directory, model, captions=phase.objective == "xvila" and phase.losses.active("align"))


def _check_covered(model, objective: nn.Module, phase: PhaseConfig) -> None:
    """Every trainable parameter must be reachable by the objective (else it would never get a gradient)."""
    reachable = {id(p) for p in objective.parameters()}
    stray = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in reachable]
    if stray:
        raise TrainingError(f"phase {phase.name}: {len(stray)} trainable parameters (e.g. {stray[0]}) are not used "
                            f"by the {phase.objective!r} objective: freeze their group in trainable.groups")


def enable_activation_checkpointing(model) -> None:
    """Recompute activations in the backward pass: LLM layers, encoder blocks, decoder UNets."""
    model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for trunk in model.encoder.modality_trunks.values():
        trunk.gradient_checkpointing = True
    for decoder in model.decoders.values():
        if getattr(decoder.denoiser, "_supports_gradient_checkpointing", False):
            decoder.denoiser.enable_gradient_checkpointing()


def build_optimizer(model, config: OptimizerConfig, fused: bool = True) -> torch.optim.AdamW:
    """AdamW over the trainable parameters only: one group per component group (its own learning rate), with
    weight decay on matrices and none on biases, norms and added token rows.

    ``fused``: one kernel for all parameters (CPU and CUDA); on the tiny model's ~1000 small tensors the
    per-parameter loop took 65 ms a step where the fused step takes 18 ms (benchmarks/bench_train.py)."""
    from xvila.trainability import group_parameters

    groups = []
    for group, named in group_parameters(model).items():
        train = [(n, p) for n, p in named if p.requires_grad]
        lr = config.group_lr.get(group, config.lr)
        decay = [p for n, p in train if p.ndim >= 2 and not n.endswith("new_rows")]
        no_decay = [p for n, p in train if not (p.ndim >= 2 and not n.endswith("new_rows"))]
        if decay:
            groups.append({"params": decay, "lr": lr, "weight_decay": config.weight_decay, "name": group})
        if no_decay:
            groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": f"{group}/no_decay"})
    if not groups:
        raise TrainingError("no trainable parameters: check the phase's trainable.groups")
    return torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas), eps=config.eps, fused=fused or None)


def lr_factor(config: ScheduleConfig, total_steps: int, step: int) -> float:
    """The learning-rate multiplier after ``step`` optimizer steps (LambdaLR's convention)."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.kind == "constant":
        return 1.0
    span = max(1, total_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    floor = config.min_lr_ratio
    if config.kind == "linear":
        return floor + (1 - floor) * (1 - progress)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer, config: ScheduleConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(config, total_steps, step))
