"""The `training` section: any `transformers.TrainingArguments` field, read as its declared type and range-checked
before anything loads (transformers checks few values, and only once the models are loaded)."""

from __future__ import annotations

import dataclasses
import enum
import functools
import types
import typing
from typing import Any

from kdistill.errors import ConfigError

__all__ = ["TRAINING_RANGES", "check_training", "training_argument_names"]


def training_argument_names() -> set[str]:
    return set(_training_argument_types())


@functools.lru_cache(maxsize=1)
def _training_argument_types() -> dict[str, Any]:
    from transformers import TrainingArguments

    hints = typing.get_type_hints(TrainingArguments)
    return {f.name: hints[f.name] for f in dataclasses.fields(TrainingArguments) if f.init}


# Ranges of common TrainingArguments fields, checked before anything loads (transformers checks few of them, and
# only once the models are loaded): name -> (minimum, whether the minimum itself is allowed).
TRAINING_RANGES = {
    "learning_rate": (0, True), "weight_decay": (0, True), "max_grad_norm": (0, True), "adam_epsilon": (0, False),
    "per_device_train_batch_size": (1, True), "per_device_eval_batch_size": (1, True),
    "gradient_accumulation_steps": (1, True), "num_train_epochs": (0, False), "warmup_steps": (0, True),
    "logging_steps": (0, False), "save_steps": (0, False), "eval_steps": (0, False), "save_total_limit": (0, True),
    "dataloader_num_workers": (0, True),
}


def _check_training_value(name: str, value: Any, where: str) -> Any:
    """`value` for TrainingArguments field `name` read as its declared type (numbers as numbers, enum fields as one
    of their values), or a ConfigError naming what is allowed."""
    tp = _training_argument_types()[name]
    members = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    if value is None:
        if type(None) in members:
            return None
        raise ConfigError(f"{where}: a value is required")
    enums = [m for m in members if isinstance(m, type) and issubclass(m, enum.Enum)]
    if enums:
        allowed = [e.value for e in enums[0]]
        if isinstance(value, str) and value in allowed:
            return value
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, allowed))}")
    for member in members:
        origin = typing.get_origin(member) or member
        if member is bool and isinstance(value, bool):
            return value
        if member is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if member is int and isinstance(value, float) and value.is_integer() and float not in members:
            return int(value)
        if member is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if member is float and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if member is str and isinstance(value, str):
            return value
        if origin in (dict, list) and isinstance(value, origin):
            return value
        if typing.get_origin(member) is typing.Literal and value in typing.get_args(member):
            return value
        if isinstance(member, type) and not (member in (bool, int, float, str) or origin in (dict, list)) \
                and isinstance(value, member):
            return value
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string", dict: "a mapping",
             list: "a list"}
    wanted = " or ".join(sorted({names.get(typing.get_origin(m) or m, getattr(m, "__name__", str(m)))
                                 for m in members if m is not type(None)}))
    raise ConfigError(f"{where}: expected {wanted}, got {value!r}")


def check_training(training: dict, lines: dict, source: str) -> dict:
    """Every `training` entry read as its TrainingArguments type and range-checked: `file:line: key: reason`."""
    checked = {}
    for name, value in training.items():
        line = lines.get(("training", name))
        where = f"{source}:{line}: training.{name}" if line else f"{source}: training.{name}"
        value = _check_training_value(name, value, where)
        if name in TRAINING_RANGES and isinstance(value, (int, float)) and not isinstance(value, bool):
            low, inclusive = TRAINING_RANGES[name]
            if value < low or (value == low and not inclusive):
                raise ConfigError(f"{where}: must be {'>=' if inclusive else '>'} {low}, got {value!r}")
        if name == "max_steps" and (value == 0 or value < -1):
            raise ConfigError(f"{where}: must be >= 1, or -1 to train num_train_epochs, got {value!r}")
        checked[name] = value
    return checked
