"""Trainability as data: which component groups are frozen, trained with LoRA, or trained in full.

One function, :func:`apply_trainability`, applies a :class:`TrainabilitySpec` and reports trainable parameter counts
per group. The groups:

    encoders            the ImageBind-style encoder towers
    input_projections   encoder features -> LLM tokens, per modality
    llm                 the language model's pretrained weights (and LoRA adapters, when injected)
    token_rows          the embedding and output rows of the added tokens (placeholders, generation tokens)
    output_projections  generation-token hidden states -> decoder conditioning, per modality
    decoders            the diffusion denoisers (UNets)
    vaes                the decoders' VAEs (tiny ones train on the toy world; a pretrained VAE stays frozen); the
                        decoders' text encoders and vocoders are always frozen
    highway             the Visual Embedding Highway controllers

``TrainabilitySpec.outputs`` narrows the last three groups to some output modalities' parts (retrain the image and
video decoders, keep the audio one).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field

from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from xvila.configuration import Config

logger = logging.getLogger(__name__)

GROUPS = ("encoders", "input_projections", "llm", "token_rows", "output_projections", "decoders", "vaes",
          "highway")
MODES = ("frozen", "lora", "full")
LORA_GROUPS = ("llm", "decoders")
PER_OUTPUT_GROUPS = ("decoders", "vaes", "highway")  # parameters named "<top>.<output modality>. ..."
LLM_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


@dataclass
class LoraSettings(Config):
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] | None = None  # None: the group's default (LLM attention projections, UNet attention)

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")


@dataclass
class TrainabilitySpec(Config):
    groups: dict[str, str] = field(default_factory=dict)  # group -> mode; groups not named are frozen
    lora: LoraSettings = field(default_factory=LoraSettings)
    # the decoders, vaes and highway groups hold only these output modalities' parts (the others stay frozen);
    # None: every output modality's
    outputs: list[str] | None = None

    def __post_init__(self):
        if self.outputs is not None and not self.outputs:
            raise ValueError("trainable.outputs: name at least one output modality, or leave it out (all of them)")
        for group, mode in self.groups.items():
            if group not in GROUPS:
                raise ValueError(f"unknown component group {group!r}; groups: {list(GROUPS)}")
            if mode not in MODES:
                raise ValueError(f"group {group!r}: unknown mode {mode!r}; modes: {list(MODES)}")
            if mode == "lora" and group not in LORA_GROUPS:
                raise ValueError(f"group {group!r} cannot use LoRA; LoRA is for {list(LORA_GROUPS)}")

    def mode(self, group: str, modality: str | None = None) -> str:
        """The group's mode; with ``modality``, the mode of that output modality's part of a per-decoder group."""
        if modality is not None and self.outputs is not None and modality not in self.outputs:
            return "frozen"
        return self.groups.get(group, "frozen")


@dataclass
class GroupCount:
    mode: str
    trainable: int
    total: int


def group_parameters(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Every parameter of an XVilaModel that belongs to a group (frozen-forever decoder parts belong to none)."""
    groups: dict[str, list] = {g: [] for g in GROUPS}
    denoisers = {id(p) for decoder in model.decoders.values() for p in decoder.denoiser.parameters()}
    vaes = {id(p) for decoder in model.decoders.values() if decoder.vae is not None for p in decoder.vae.parameters()}
    for name, param in model.named_parameters():
        top = name.split(".", 1)[0]
        if top == "encoder":
            groups["encoders"].append((name, param))
        elif top == "llm":
            groups["token_rows" if name.endswith("new_rows") else "llm"].append((name, param))
        elif top in ("input_projections", "output_projections"):
            groups[top].append((name, param))
        elif top == "decoders":
            if id(param) in denoisers:
                groups["decoders"].append((name, param))
            elif id(param) in vaes:
                groups["vaes"].append((name, param))
        elif top == "highways":
            groups["highway"].append((name, param))
        else:
            raise RuntimeError(f"parameter {name} belongs to no component group")
    return groups


def inject_lora(module: nn.Module, settings: dict, default_targets: list[str] | None) -> None:
    lora = LoraSettings.from_dict(settings)
    targets = lora.target_modules or default_targets or LLM_LORA_TARGETS
    inject_adapter_in_model(
        LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets), module
    )


@contextmanager
def adapters_disabled(module: nn.Module):
    """Run ``module`` without its LoRA adapters (the base weights alone) inside the ``with`` block.

    Sets the flag peft's LoRA layers read in ``forward``; their ``enable_adapters`` would also change which
    parameters require gradients.
    """
    layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer)]
    saved = [m._disable_adapters for m in layers]
    for m in layers:
        m._disable_adapters = True
    try:
        yield
    finally:
        for m, flag in zip(layers, saved):
            m._disable_adapters = flag


def apply_trainability(model: nn.Module, spec: TrainabilitySpec) -> dict[str, GroupCount]:
    """Freeze / LoRA / unfreeze each group of ``model`` as ``spec`` says; returns counts per group.

    LoRA adapters are injected the first time a group asks for them and kept afterwards (a later phase that
    freezes the group freezes its adapters too). Decoders are built first when a spec trains them or the highway.
    """
    if spec.outputs is not None:
        unknown = set(spec.outputs) - set(model.config.output_modalities)
        if unknown:
            raise ValueError(f"trainable.outputs names {sorted(unknown)}, not output modalities of the model "
                             f"({list(model.config.output_modalities)})")
    if any(spec.mode(g) != "frozen" for g in PER_OUTPUT_GROUPS):
        model.load_decoders()
    for group in LORA_GROUPS:
        if spec.mode(group) != "lora":
            continue
        settings = spec.lora.to_dict()
        if group in model.adapters:
            if model.adapters[group] != settings:
                raise ValueError(f"group {group!r} already has LoRA adapters {model.adapters[group]}; "
                                 f"cannot re-inject with {settings}")
            continue
        if group == "llm":
            inject_lora(model.llm, settings, LLM_LORA_TARGETS)
        else:
            for decoder in model.decoders.values():
                inject_lora(decoder.denoiser, settings, decoder.lora_target_modules)
        model.adapters[group] = settings

    model.requires_grad_(False)
    counts = {}
    for group, params in group_parameters(model).items():
        mode = spec.mode(group)
        for name, param in params:
            own = spec.mode(group, name.split(".")[1]) if group in PER_OUTPUT_GROUPS else mode
            param.requires_grad_(own == "full" or (own == "lora" and "lora_" in name))
        counts[group] = GroupCount(mode, sum(p.numel() for _, p in params if p.requires_grad),
                                   sum(p.numel() for _, p in params))
    model.trainability = spec
    model.train(model.training)  # frozen components switch to eval mode (see XVilaModel.train)
    for group, c in counts.items():
        logger.info("%-19s %-6s %12d / %12d trainable", group, c.mode, c.trainable, c.total)
    return counts
