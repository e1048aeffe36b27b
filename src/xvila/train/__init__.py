"""Training: one loop for every phase of the X-VILA recipe, from one CPU to many GPUs.

The library side takes dataclasses (:class:`RecipeConfig`, :class:`PhaseConfig`, ...); YAML recipes are read by
:mod:`xvila.train.recipe` and the ``xvila train`` command (:mod:`xvila.train.cli`). See ``docs/training.md``.
"""

from xvila.train.config import (
    DataSpec,
    DistributedConfig,
    FoundationConfig,
    OptimizerConfig,
    PhaseConfig,
    ProjectionsConfig,
    RecipeConfig,
    ScheduleConfig,
)
from xvila.train.feedback import PhaseSummary
from xvila.train.loop import NonFiniteLossError, TrainingError, train

__all__ = [
    "DataSpec",
    "DistributedConfig",
    "FoundationConfig",
    "NonFiniteLossError",
    "OptimizerConfig",
    "PhaseConfig",
    "PhaseSummary",
    "ProjectionsConfig",
    "RecipeConfig",
    "ScheduleConfig",
    "TrainingError",
    "train",
]
