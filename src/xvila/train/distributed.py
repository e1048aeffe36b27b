"""Processes, devices and the distributed wrapper: the one place that knows where tensors live.

A run is launched as one process, or as several by ``torchrun --nproc_per_node=N`` or
``accelerate launch --multi_gpu --num_processes N`` (on CPU with ``ACCELERATE_USE_CPU=1``); both set ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``, which :func:`init_runtime` reads.

Strategies (``DistributedConfig.strategy``, used when ``WORLD_SIZE > 1``):

- ``ddp``: replicated weights, gradients all-reduced (``torch.nn.parallel.DistributedDataParallel``);
- ``fsdp``: FSDP2 (``fully_shard``): the blocks the objective runs on every batch are shard units of their own
  (the LLM's layers; in phase 0 also the encoder blocks and decoder UNets), the rest of the objective is one more
  unit; parameters, gradients and optimizer states are sharded;
- ``deepspeed``: DeepSpeed ZeRO through ``deepspeed.initialize`` with the user's JSON config. GPU only; checked by
  ``scripts/check_cuda.py`` with one process on one GPU (ZeRO-2), never with several: treat it as a starting point.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from xvila.train.config import DistributedConfig

logger = logging.getLogger(__name__)


@dataclass
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool = False  # this module initialised the process group (and destroys it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_runtime(device: str, config: DistributedConfig) -> Runtime:
    """Read the launcher's environment, pick this process's device, and join the process group."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("recipe.device is 'cuda' but no CUDA device is visible")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    owns = False
    if world_size > 1 and not dist.is_initialized():
        backend = config.backend or ("nccl" if dev.type == "cuda" else "gloo")
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=datetime.timedelta(minutes=30))
        owns = True
    return Runtime(rank, world_size, local_rank, dev, owns)


def shutdown_runtime(runtime: Runtime) -> None:
    if runtime.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(runtime: Runtime) -> None:
    if runtime.distributed:
        dist.barrier()


def all_reduce_mean(x: Tensor, runtime: Runtime) -> Tensor:
    """The mean of ``x`` over processes (a copy; ``x`` is untouched)."""
    if not runtime.distributed:
        return x.clone()
    y = x.detach().clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y / runtime.world_size


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively: a GPU that supports it, or a CPU with AVX-512 (oneDNN's bf16
    kernels; AMX on newer Xeons). Elsewhere (e.g. an AVX2-only CPU) bf16 is emulated and several times slower."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """``"auto"`` -> ``"bf16"`` where the device computes it natively, else ``"no"``; other values unchanged."""
    if precision == "auto":
        return "bf16" if native_bf16(device) else "no"
    return precision


def check_precision(precision: str, device: torch.device) -> None:
    if resolve_precision(precision, device) != "bf16":
        return
    ok = torch.cuda.is_bf16_supported() if device.type == "cuda" else device.type == "cpu"
    if not ok:
        raise RuntimeError(f"precision 'bf16' is not supported on {device}: set precision: 'no' (or 'auto')")


def autocast(precision: str, device: torch.device):
    """bf16 autocast when ``precision`` (after :func:`resolve_precision`) is ``"bf16"``, else a no-op context."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=resolve_precision(precision, device) == "bf16")


# -------------------------------------------------------------------------------------------------- strategies
class Strategy:
    """One process: no wrapper. Subclasses change how the objective is wrapped and how gradients meet."""

    name = "single"
    sharded = False  # parameters and optimizer states are split across processes

    def __init__(self, runtime: Runtime, config: DistributedConfig):
        self.runtime, self.config = runtime, config

    def wrap(self, objective: nn.Module) -> nn.Module:
        return objective

    def sync_context(self, wrapped: nn.Module, sync: bool):
        """Gradient accumulation: skip the gradient exchange on all but the last micro-batch."""
        return contextlib.nullcontext()

    def backward(self, loss: Tensor) -> None:
        loss.backward()

    def grad_norm(self, params: list[nn.Parameter], max_norm: float | None) -> Tensor:
        """The global gradient norm, after which gradients are clipped to ``max_norm`` (when given)."""
        grads = [p.grad for p in params if p.grad is not None]
        sharded = [g for g in grads if hasattr(g, "full_tensor")]
        plain = [g for g in grads if not hasattr(g, "full_tensor")]
        parts = []
        if sharded:  # FSDP: a DTensor norm, reduced over the shards
            parts.append(torch.nn.utils.get_total_norm(sharded).full_tensor())
        if plain:
            parts.append(torch.nn.utils.get_total_norm(plain, foreach=True))
        norm = torch.linalg.vector_norm(torch.stack([x.float().cpu() for x in parts])) if parts else torch.zeros(())
        if max_norm is not None and torch.isfinite(norm):
            for group in (sharded, plain):
                if group:
                    torch.nn.utils.clip_grads_with_norm_(group, max_norm, norm.to(group[0].device),
                                                         foreach=group is plain or None)
        return norm

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.step()

    @contextlib.contextmanager
    def full_parameters(self, objective: nn.Module):
        """Within the block, the model's parameters are whole, plain tensors on every process (for saving)."""
        yield

    def local_tensor(self, x: Tensor) -> Tensor:
        return x

    def export_model(self, objective: nn.Module, model: nn.Module, rebuild) -> nn.Module | None:
        """The trained model with whole, plain parameters, on the main process (None on the others)."""
        return model if self.runtime.is_main else None


class DDPStrategy(Strategy):
    name = "ddp"

    def wrap(self, objective: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        # device_ids=None: the objective is already on this process's device and batches are moved by the loop
        # buffers (pixel statistics, mel filters) are constants: synced once at init, never per forward
        return DistributedDataParallel(objective, find_unused_parameters=self.config.find_unused_parameters,
                                       forward_sync_buffers=False)

    def sync_context(self, wrapped: nn.Module, sync: bool):
        return contextlib.nullcontext() if sync else wrapped.no_sync()


class FSDPStrategy(Strategy):
    name = "fsdp"
    sharded = True

    def wrap(self, objective: nn.Module) -> nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(self.runtime.device.type, (self.runtime.world_size,))
        # fully_shard refuses 0-d parameters (the encoder's logit scales): they stay replicated, and the trainable
        # ones get their gradients averaged by hand (see grad_norm)
        self.replicated = {p for p in objective.parameters() if p.ndim == 0}
        units = shard_units(objective)
        for unit in units:
            fully_shard(unit, mesh=mesh, ignored_params=self.replicated)
        fully_shard(objective, mesh=mesh, ignored_params=self.replicated)
        objective.set_reduce_scatter_unused_params(True)  # like DDP's find_unused_parameters
        logger.info("FSDP2: %d shard units + the root", len(units))
        return objective

    def grad_norm(self, params: list[nn.Parameter], max_norm: float | None) -> Tensor:
        for p in params:
            if p in self.replicated and p.grad is not None:
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                p.grad /= self.runtime.world_size
        return super().grad_norm(params, max_norm)

    def sync_context(self, wrapped: nn.Module, sync: bool):
        wrapped.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def full_parameters(self, objective: nn.Module):
        from torch.distributed.fsdp import FSDPModule

        modules = [m for m in objective.modules() if isinstance(m, FSDPModule)]
        for m in modules:
            m.unshard()
        try:
            yield
        finally:
            for m in modules:
                m.reshard()

    def local_tensor(self, x: Tensor) -> Tensor:
        return x.to_local() if hasattr(x, "to_local") else x

    def export_model(self, objective: nn.Module, model: nn.Module, rebuild) -> nn.Module | None:
        """Gather the full state dict to the main process and load it into a plain copy of the model there, built
        by ``rebuild()`` (FSDP's own parameters stay sharded, and their gathered views cannot be serialised)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        full = get_model_state_dict(objective, options=options)  # every process takes part
        if not self.runtime.is_main:
            return None
        plain = rebuild()
        state = {objective.model_key(k): v for k, v in full.items()}
        missing, unexpected = plain.load_state_dict(state, strict=False)
        if unexpected:
            raise RuntimeError(f"exporting the FSDP model: unexpected keys {unexpected[:3]}")
        return plain


class DeepSpeedStrategy(Strategy):
    """ZeRO via ``deepspeed.initialize`` (checked with one process on one GPU only). The engine owns accumulation,
    clipping and the optimizer step; configure them in the JSON (``gradient_accumulation_steps``,
    ``gradient_clipping``) to match the phase."""

    name = "deepspeed"
    sharded = True

    def __init__(self, runtime: Runtime, config: DistributedConfig):
        super().__init__(runtime, config)
        if runtime.device.type != "cuda":
            raise RuntimeError("distributed.strategy 'deepspeed' needs CUDA devices; use 'ddp' or 'fsdp' on CPU")
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise RuntimeError("distributed.strategy 'deepspeed' needs the deepspeed package (pip install deepspeed)"
                               ) from None
        self.engine = None

    def initialize(self, objective: nn.Module, optimizer: torch.optim.Optimizer):
        import deepspeed

        self.engine, optimizer, _, _ = deepspeed.initialize(model=objective, optimizer=optimizer,
                                                            config=self.config.deepspeed_config)
        return self.engine, optimizer

    def backward(self, loss: Tensor) -> None:
        self.engine.backward(loss)

    def grad_norm(self, params: list[nn.Parameter], max_norm: float | None) -> Tensor:
        return torch.zeros(())  # the engine clips (``gradient_clipping`` in its JSON) inside its step

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        self.engine.step()


def make_strategy(runtime: Runtime, config: DistributedConfig) -> Strategy:
    if not runtime.distributed:
        return Strategy(runtime, config)
    return {"ddp": DDPStrategy, "fsdp": FSDPStrategy, "deepspeed": DeepSpeedStrategy}[config.strategy](runtime, config)


def shard_units(objective: nn.Module) -> list[nn.Module]:
    """The submodules FSDP2 shards as units of their own: those the objective runs on EVERY batch of every process
    (FSDP gathers a unit when it runs, so every process must run the same units in the same order). Parts that only
    some batches use (a decoder without a target in this batch, the audio tower without audio) stay in the root
    unit, gathered once per forward, with zero gradients where a process did not use them."""
    return list(objective.fsdp_units())


def place(objective: nn.Module, device: torch.device) -> None:
    """Move the parts of the model this phase's objective uses to the device; the rest stays where it is (CPU)."""
    objective.to(device)
