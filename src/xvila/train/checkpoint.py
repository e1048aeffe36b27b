"""Training checkpoints, written atomically: a crash at any instant leaves the previous checkpoints intact and never
a half-written one under a final name.

A checkpoint is a folder ``<output_dir>/checkpoints/<phase>/step-NNNNNNNN/`` holding

    trainable.safetensors   the trainable parameters only, whole (the frozen ones are rebuilt from the phase's
                            starting model, recorded in state.json)
    optimizer.pt            AdamW state and LR-scheduler state (one file; ``optimizer-rank{r}.pt`` per process
                            when the optimizer state is sharded, FSDP)
    rng-rank{r}.pt          python, numpy and torch RNG states of each process
    state.json              step, data position, world size, the resolved recipe, the phase's starting model,
                            the names of the trainable parameters; written last

It is first written as ``.tmp-step-NNNNNNNN`` and renamed when complete (a rename is atomic on POSIX file systems),
after every file in it was flushed to disk. Folders whose name starts with ``.tmp-`` are leftovers of a crash and
are removed by the next run.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from xvila.train.distributed import Runtime, Strategy, barrier

logger = logging.getLogger(__name__)

STATE_FILE = "state.json"
WEIGHTS_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
EMA_FILE = "ema.safetensors"
TMP_PREFIX = ".tmp-"
_STEP_DIR = re.compile(r"^step-(\d{8})$")
SHARDED_STRATEGIES = ("fsdp", "deepspeed")


class CheckpointError(RuntimeError):
    pass


# ------------------------------------------------------------------------------------------------ file helpers
def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write) -> None:
    """``write(tmp_path)`` writes the file; it is flushed and renamed to ``path`` only when complete."""
    path = Path(path)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def publish_dir(tmp: Path, final: Path) -> None:
    """Flush every file under ``tmp``, then rename it to ``final`` (replacing an older folder of that name)."""
    for file in tmp.rglob("*"):
        if file.is_file():
            with open(file, "rb+") as f:
                os.fsync(f.fileno())
    if final.exists():  # e.g. a phase output being rewritten: move the old one aside first
        old = final.with_name(f"{TMP_PREFIX}old-{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    fsync_dir(final.parent)


def remove_leftovers(folder: Path) -> None:
    """Remove ``.tmp-*`` entries a crash left in ``folder``."""
    if folder.is_dir():
        for p in folder.iterdir():
            if p.name.startswith(TMP_PREFIX):
                logger.info("removing the unfinished %s", p)
                shutil.rmtree(p) if p.is_dir() else p.unlink()


# --------------------------------------------------------------------------------------------------- finding
def step_dir(phase_dir: Path, step: int) -> Path:
    return phase_dir / f"step-{step:08d}"


def list_checkpoints(phase_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a phase, oldest first."""
    phase_dir = Path(phase_dir)
    if not phase_dir.is_dir():
        return []
    found = [p for p in phase_dir.iterdir() if _STEP_DIR.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(phase_dir: str | Path) -> Path | None:
    found = list_checkpoints(phase_dir)
    return found[-1] if found else None


def read_state(ckpt: str | Path) -> dict[str, Any]:
    path = Path(ckpt) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{ckpt} is not a complete checkpoint ({STATE_FILE} missing)")
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------------------------------- RNG
def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------------ save / load
def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(
    phase_dir: Path, step: int, *, model, objective, optimizer, scheduler, strategy: Strategy, runtime: Runtime,
    state: dict[str, Any], keep: int, ema: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the checkpoint of ``step`` atomically (every process calls this); returns its folder."""
    final = step_dir(phase_dir, step)
    tmp = phase_dir / f"{TMP_PREFIX}{final.name}"
    if runtime.is_main:
        phase_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier(runtime)
    with strategy.full_parameters(objective):  # FSDP: gather the shards (every process takes part)
        weights = {n: p.detach().to("cpu", copy=True).contiguous() for n, p in trainable_parameters(model).items()}
    bad = [n for n, w in weights.items() if not torch.isfinite(w).all()]
    if bad:  # never write a poisoned checkpoint
        raise CheckpointError(f"refusing to checkpoint step {step}: non-finite values in {bad[:3]}")
    torch.save(rng_state(), tmp / f"rng-rank{runtime.rank}.pt")
    trainer = {"scheduler": scheduler.state_dict(), "optimizer": _optimizer_state(optimizer, strategy)}
    if strategy.sharded:
        torch.save(trainer, tmp / f"optimizer-rank{runtime.rank}.pt")
    barrier(runtime)
    if runtime.is_main:
        save_file(weights, str(tmp / WEIGHTS_FILE))
        if ema is not None:
            save_file(ema, str(tmp / EMA_FILE))
        if not strategy.sharded:
            torch.save(trainer, tmp / OPTIMIZER_FILE)
        state = dict(state, step=step, world_size=runtime.world_size, strategy=strategy.name,
                     trainable=sorted(weights))
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
        publish_dir(tmp, final)
        for old in list_checkpoints(phase_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(runtime)
    return final


def load_trainable(model: torch.nn.Module, ckpt: Path) -> None:
    """Copy the checkpoint's trainable weights into ``model`` (before any distributed wrapping)."""
    weights = load_file(str(ckpt / WEIGHTS_FILE))
    params = trainable_parameters(model)
    if set(weights) != set(params):
        missing, extra = sorted(set(params) - set(weights)), sorted(set(weights) - set(params))
        raise CheckpointError(f"{ckpt} does not match this phase's trainable parameters (missing {missing[:3]}, "
                              f"unexpected {extra[:3]}): was the recipe's trainability changed?")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(weights[name])


def load_ema(ckpt: Path) -> dict[str, torch.Tensor]:
    path = ckpt / EMA_FILE
    if not path.is_file():
        raise CheckpointError(f"{ckpt} has no {EMA_FILE}: it was written by a run without ema_decay")
    return load_file(str(path))


def load_trainer_state(ckpt: Path, optimizer, scheduler, strategy: Strategy, runtime: Runtime) -> None:
    state = read_state(ckpt)
    if state["strategy"] in SHARDED_STRATEGIES or strategy.sharded:
        if state["strategy"] != strategy.name:
            raise CheckpointError(f"{ckpt} holds sharded optimizer states of strategy {state['strategy']!r}; resume "
                                  f"it with distributed.strategy={state['strategy']} (this run uses "
                                  f"{strategy.name!r})")
    if state["world_size"] != runtime.world_size and strategy.sharded:
        raise CheckpointError(f"{ckpt} was written by {state['world_size']} processes with sharded optimizer "
                              f"states; resume it with the same number of processes (got {runtime.world_size})")
    name = f"optimizer-rank{runtime.rank}.pt" if strategy.sharded else OPTIMIZER_FILE
    trainer = torch.load(ckpt / name, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(_restore_optimizer_state(trainer["optimizer"], optimizer))
    scheduler.load_state_dict(trainer["scheduler"])
    rng_file = ckpt / f"rng-rank{runtime.rank}.pt"
    if rng_file.is_file():  # a different world size: ranks without a file keep their seeded state
        set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=False))


def _optimizer_state(optimizer, strategy: Strategy) -> dict:
    sd = optimizer.state_dict()
    sd["state"] = {i: {k: strategy.local_tensor(v) if torch.is_tensor(v) else v for k, v in s.items()}
                   for i, s in sd["state"].items()}
    return sd


def _restore_optimizer_state(sd: dict, optimizer) -> dict:
    """Turn saved local shards back into DTensors where the parameters are DTensors (FSDP)."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = {}
    for i, s in sd["state"].items():
        p = params[int(i)]
        if hasattr(p, "device_mesh"):
            from torch.distributed.tensor import DTensor

            # the global shape and stride given: shards may be uneven (a (1, 1, 64) parameter over 2 processes)
            s = {k: DTensor.from_local(v.to(p.to_local().device), p.device_mesh, p.placements, shape=p.shape,
                                       stride=p.stride())
                 if torch.is_tensor(v) and v.ndim > 0 else v for k, v in s.items()}
        state[i] = s
    return dict(sd, state=state)
