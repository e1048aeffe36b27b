"""The recipe reader: YAML files under ``recipes/`` and ``key=value`` overrides -> :class:`RecipeConfig`.

This module (with the CLI) is the only place that parses YAML; the training loop takes dataclasses.

Overrides use dotted paths into the recipe's mapping; a list is indexed by position, and the phase list also by
phase name. Values are read as YAML scalars or flow collections::

    seed=3  phases.1.steps=5  phases.alignment.optimizer.lr=3e-4  phases.0.data.tasks={clips: 1.0}
    distributed.strategy=fsdp  phases.2.trainable.groups.llm=lora  model=runs/tiny/phase-0
"""

from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from xvila.train.config import RecipeConfig


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-3`` as a string (it wants ``1.0e-3``); recipes mean the number."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)?(?:\.[0-9_]*)?[eE][-+]?[0-9]+$|^[-+]?[0-9][0-9_]*\.[0-9_]*$|"
               r"^[-+]?\.[0-9_]+$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def _load_yaml(text: str) -> Any:
    return _unaliased(yaml.load(text, Loader=_Loader))  # noqa: S506 (a SafeLoader subclass)


def _unaliased(node: Any) -> Any:
    """``node`` with every mapping and list its own object: YAML aliases (``<<: *phase``) load as one shared object,
    so an override of one phase's ``schedule`` would otherwise change every phase that merged it."""
    if isinstance(node, dict):
        return {k: _unaliased(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_unaliased(v) for v in node]
    return node


class RecipeError(ValueError):
    """A recipe file or an override that cannot be read: the message says what to fix."""


def read_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RecipeConfig:
    """Parse the YAML recipe at ``path``, apply ``overrides`` and validate against :class:`RecipeConfig`."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe {path} not found")
    try:
        data = _load_yaml(path.read_text())
    except yaml.YAMLError as e:
        raise RecipeError(f"recipe {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {path} must be a mapping with at least 'phases'")
    data = {k: v for k, v in data.items() if not str(k).startswith("x-")}  # "x-" keys hold YAML anchors
    return recipe_from_dict(apply_overrides(data, overrides), source=str(path))


def recipe_from_dict(data: dict[str, Any], source: str = "recipe") -> RecipeConfig:
    _check_types(RecipeConfig, data, source, "")
    try:
        return RecipeConfig.from_dict(data)
    except (TypeError, ValueError) as e:
        raise RecipeError(f"{source}: {e}") from None


_SCALARS = (bool, int, float, str)


def _check_types(tp: Any, value: Any, source: str, path: str) -> None:
    """Scalar fields hold their declared type (an int is a float too): ``steps: five`` fails here with the field's
    name, not inside a comparison later. Unknown fields are left to ``from_dict``, which names them."""
    union = typing.get_origin(tp) in (typing.Union, types.UnionType)
    allowed = typing.get_args(tp) if union else (tp,)
    if value is None and type(None) in allowed:
        return
    for a in allowed:
        if dataclasses.is_dataclass(a) and isinstance(value, dict):
            hints = typing.get_type_hints(a)
            for key, item in value.items():
                if key in hints:
                    _check_types(hints[key], item, source, f"{path}.{key}" if path else key)
            return
        if typing.get_origin(a) is list and isinstance(value, list):
            (arg,) = typing.get_args(a)
            for i, item in enumerate(value):
                _check_types(arg, item, source, f"{path}.{i}")
            return
    if all(a in _SCALARS or a is type(None) for a in allowed):
        ok = any(isinstance(value, a) and not (a is not bool and isinstance(value, bool)) for a in allowed) or (
            float in allowed and isinstance(value, int) and not isinstance(value, bool))
        if not ok:
            names = " or ".join(a.__name__ for a in allowed)
            raise RecipeError(f"{source}: {path} must be {names}, got {value!r}")
    elif dataclasses.is_dataclass(tp) and not isinstance(value, dict):
        raise RecipeError(f"{source}: {path} must be a mapping, got {value!r}")


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """A copy of ``data`` with each ``dotted.path=value`` applied in order."""
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"override {item!r}: write key=value, e.g. phases.1.steps=5")
        try:
            value = _load_yaml(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise RecipeError(f"override {item!r}: the value is not valid YAML: {e}") from None
        _set(data, key.split("."), value, item)
    return data


def _set(node: Any, path: list[str], value: Any, item: str) -> None:
    for depth, part in enumerate(path):
        last = depth == len(path) - 1
        where = ".".join(path[: depth + 1])
        if isinstance(node, list):
            index = _list_index(node, part, where, item)
            if last:
                node[index] = value
                return
            node = node[index]
        elif isinstance(node, dict):
            if last:
                node[part] = value
                return
            if node.get(part) is None:
                node[part] = {}  # e.g. a default sub-config the file does not spell out
            node = node[part]
        else:
            raise RecipeError(f"override {item!r}: {'.'.join(path[:depth])} is a value, not a mapping or list")


def _list_index(node: list, part: str, where: str, item: str) -> int:
    if part.lstrip("-").isdigit():
        index = int(part)
        if not -len(node) <= index < len(node):
            raise RecipeError(f"override {item!r}: {where} is out of range (the list has {len(node)} items)")
        return index
    names = [x.get("name") for x in node if isinstance(x, dict)]
    if part in names:
        return names.index(part)
    raise RecipeError(f"override {item!r}: {where}: no item named {part!r}; names: {names}")
